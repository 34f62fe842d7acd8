"""Shared test set-up: tests run on the CPU unless told otherwise, and import the references."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

"""Shared test set-up: tests run on the CPU unless told otherwise, and import the references.

Tests that train models, start processes or need Slurm are marked ``slow``; ``make test-fast``
(``pytest -m "not slow"``) runs the rest, the unit tests.
"""

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# Whole modules that train models, launch processes or need a cluster.
SLOW_MODULES = {"test_train", "test_sweep", "test_slurm", "test_runs", "test_report", "test_linear_vae",
                "test_sharding"}
# Single slow tests in otherwise fast modules (substring of the test's node id).
SLOW_TESTS = ("test_train_evaluate_report_and_load", "test_vmapped_member", "test_readme_example", "test_evaluate_run", "test_objective_and_gradients",
              "test_one_sample_elbo_is_unbiased")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains models, starts processes or needs Slurm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or any(s in item.nodeid for s in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)

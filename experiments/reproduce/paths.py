"""Where the reproduction configs find their data: never computed from where the checkout sits.

The MNIST subset (``mnist_partial.npz``: the first 24,345 training images and the full test set)
comes from the environment variable ``VAEKL_MNIST_NPZ`` or from ``--config.data_dir=PATH``;
without either, training stops before anything is written with an error naming both.
"""

from __future__ import annotations

import os

MNIST_ENV = "VAEKL_MNIST_NPZ"


def mnist_npz() -> str:
    """The .npz path from $VAEKL_MNIST_NPZ, or '' (then --config.data_dir must give it)."""
    return os.environ.get(MNIST_ENV, "")

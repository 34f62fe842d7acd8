"""Image datasets for VAEs: host-side loading, and on-device batching.

Loading (host, NumPy) gives a :class:`Dataset` of uint8 images [N, H, W, C] in
0..255 and int32 labels [N] (-1 where a source has none). :func:`load` picks the
source by name from the registry of sources (:func:`source`; each declares whether it has
ground-truth factors and whether it reads files):

  * ``"digits"``: scikit-learn's bundled 8×8 digits (1797 images, no download);
  * ``"idx"``: a directory in the original MNIST IDX layout (files optionally
    gzipped), e.g. Fashion-MNIST from Debian's ``dataset-fashion-mnist``;
  * ``"npz"``: an ``.npz`` file with ``x_train``, ``x_test`` and optionally
    ``y_train``, ``y_test``;
  * ``"dsprites"``, ``"dsprites_color"``, ``"dsprites_noisy"``: dSprites-like
    images rendered analytically (:mod:`vaekl.dsprites`; no download), with
    ground-truth factors;
  * ``"dsprites_npz"``: the original ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``
    (path in ``data_dir``), with ground-truth factors;
  * a name registered with :func:`source` (e.g. by a user module, see
    :mod:`vaekl.user_modules`)::

        @data.source("stripes", files="none")
        def stripes(data_dir, test_fraction, seed) -> data.Dataset: ...

  * ``"tfds:NAME"`` or any other name: a TFDS dataset already prepared in
    ``data_dir`` in the ``array_record`` format, read through ``tfds`` data
    sources (TensorFlow is neither needed nor imported; nothing is downloaded).
    The prefix reaches TFDS datasets whose names are taken above
    (``"tfds:dsprites"``); ``"shapes3d"`` is RGB 64×64.

Sources without a test split (digits, TFDS dsprites, shapes3d) get a deterministic
holdout: a ``seed``-ed permutation sends ``test_fraction`` of the images to test.

Ground-truth datasets (``Dataset.ground_truth`` set; factor attributes and methods
are forwarded to it) are never held as one image array: their ``train_images`` are
a fixed sample of :data:`GT_EVAL_TRAIN` images and ``test_images`` another of
:data:`GT_EVAL_TEST` (both drawn with ``seed``, labels -1; for evaluation rows, IWAE
and reconstructions only); training batches come from :meth:`Dataset.batch_source`,
which for the rendered datasets samples factors and renders on the device.
``Dataset.train_size`` is then the full grid (737,280 for dSprites).

Batching (device, JAX) runs inside the compiled training loop:
:meth:`Dataset.batch_source` gives ``(device_arrays, draw)``; for array datasets
the whole uint8 training set lives on device and :func:`sample_batch` draws a batch
from it; :func:`binarize` turns a batch into float32 model inputs. Binarization ``mode``:

  * ``"none"``: grey levels x / 255 (e.g. for a Bernoulli decoder on grey
    values, or a Gaussian/logistic decoder);
  * ``"dynamic"``: a fresh Bernoulli(x / 255) draw every call, i.e. every step;
  * ``"threshold"``: the fixed threshold x / 255 > ½, the same every call. This is *not*
    the "static MNIST" of the literature.

On the host, :func:`binarize_threshold` gives the threshold once (uint8 {0, 255}, then
``mode="none"`` gives the same inputs), and :func:`binarize_fixed` draws one fixed
Bernoulli(x / 255) sample per pixel from a seed: the construction of Larochelle & Murray's
(2011) "static MNIST" (one stochastic binarization, drawn once and kept), with our own draw,
not their file. Training uses it for the config's ``binarization="fixed_stochastic"``, and
every evaluation of a binarized run (dynamic or fixed) uses one such draw of its test and
validation images, the same for every run and seed (:data:`BINARIZATION_SEEDS`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import dsprites

__all__ = [
    "BINARIZATION_SEEDS",
    "BINARIZE_MODES",
    "SOURCES",
    "Source",
    "GT_EVAL_TEST",
    "GT_EVAL_TRAIN",
    "Dataset",
    "binarize",
    "binarize_fixed",
    "binarize_threshold",
    "for_config",
    "get_source",
    "ground_truth_dataset",
    "ground_truth_sources",
    "has_factors",
    "load",
    "register_source",
    "source",
    "sample_batch",
    "to_float",
]

GT_EVAL_TRAIN = 2000  # fixed images in a ground-truth dataset's train_images (evaluation only)
GT_EVAL_TEST = 5000  # ... and in its test_images
_TFDS_PREFIX = "tfds:"
BINARIZE_MODES = ("none", "dynamic", "threshold")
# Seeds of the fixed stochastic binarizations (binarize_fixed) of each split: the training
# set's under binarization="fixed_stochastic", and the evaluation splits' for every binarized
# run, so that all runs and seeds are evaluated on the same binary images.
BINARIZATION_SEEDS = {"train": 0, "valid": 1, "test": 2}

# TFDS datasets whose images are stored as {0, 1}; they are scaled to {0, 255}.
_TFDS_BINARY = frozenset({"binarized_mnist", "dsprites"})
_READ_CHUNK = 4096  # records per `__getitems__` call when reading a data source


class _GroundTruthAttribute:
    """A dataset attribute forwarded to its ``ground_truth`` (AttributeError when it has none)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        if obj.ground_truth is None:
            raise AttributeError(f"dataset {obj.name!r} has no ground-truth factors, so no "
                                 f"{self.name!r} (ground-truth sources: {ground_truth_sources()}).")
        return getattr(obj.ground_truth, self.name)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images as uint8 [N, H, W, C] in 0..255, labels int32 [N] (or -1 when unlabeled).

    Checked on construction: dtypes, ranks, matching image/label counts and the
    same image shape in train and test (and in ``ground_truth``, when given).

    ``ground_truth`` (a :class:`vaekl.dsprites.GroundTruthData`, or None) makes a
    ground-truth dataset: its ``factor_names``, ``factor_sizes``, ``num_factors``,
    ``observation_shape``, ``sample_factors(n, rng)``, ``sample_observations_from_factors(factors, rng)``,
    ``sample(n, rng)``, ``index_to_factors``, ``factors_to_index``,
    ``deterministic_observations`` are available
    on the dataset itself; training batches come from it (:meth:`batch_source`),
    and ``train_images`` / ``test_images`` are fixed evaluation samples.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    ground_truth: dsprites.GroundTruthData | None = None

    factor_names = _GroundTruthAttribute()
    factor_sizes = _GroundTruthAttribute()
    num_factors = _GroundTruthAttribute()
    observation_shape = _GroundTruthAttribute()
    sample_factors = _GroundTruthAttribute()
    sample_observations_from_factors = _GroundTruthAttribute()
    sample = _GroundTruthAttribute()
    index_to_factors = _GroundTruthAttribute()
    factors_to_index = _GroundTruthAttribute()
    deterministic_observations = _GroundTruthAttribute()

    def __post_init__(self):
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{self.name}: {split}_images must be uint8 [N, H, W, C], "
                    f"got {images.dtype} {images.shape}.")
            if labels.dtype != np.int32 or labels.ndim != 1:
                raise ValueError(
                    f"{self.name}: {split}_labels must be int32 [N], got {labels.dtype} {labels.shape}.")
            if len(images) != len(labels):
                raise ValueError(
                    f"{self.name}: {len(images)} {split} images but {len(labels)} {split} labels.")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images are {self.train_images.shape[1:]} but test images are "
                f"{self.test_images.shape[1:]} (H, W, C).")
        if self.ground_truth is not None and self.ground_truth.observation_shape != self.image_shape:
            raise ValueError(f"{self.name}: images are {self.image_shape} but the ground truth's "
                             f"observations are {self.ground_truth.observation_shape} (H, W, C).")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        h, w, c = self.train_images.shape[1:]
        return int(h), int(w), int(c)

    @property
    def train_size(self) -> int:
        """Size N of the training distribution's support (e.g. for β-TCVAE's estimator).

        The number of grid points (737,280 for dSprites) for ground-truth datasets,
        else ``len(train_images)``.
        """
        if self.ground_truth is not None:
            return self.ground_truth.num_observations
        return len(self.train_images)

    def batch_source(self) -> tuple[Any, Any]:
        """The on-device source of training batches: ``(device_arrays, draw)``.

        ``draw(key, device_arrays, batch_size) -> uint8 [B, H, W, C]`` is pure and
        jittable with ``batch_size`` static, and the same function object on
        every call. ``device_arrays`` is a pytree of host arrays for the caller to
        put on the device once (``jax.device_put``) and pass to every ``draw``:
        ``train_images`` with :func:`sample_batch` for array datasets; ``()`` for
        the rendered dSprites (``draw`` samples factors and renders); the
        bit-packed images for ``"dsprites_npz"``. Batches are the raw uint8
        images: apply :func:`binarize` (any mode) to the result.
        """
        if self.ground_truth is not None:
            return self.ground_truth.batch_source()
        return self.train_images, sample_batch


# ----------------------------------------------------------------------------------------
# The registry of sources.

Loader = Callable[[str | None, float, int], "Dataset"]  # (data_dir, test_fraction, seed) → Dataset
FILES = ("none", "required", "optional")


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered dataset source.

    Attributes:
      name: its ``config.dataset`` value.
      load: (data_dir or None, test_fraction, seed) → :class:`Dataset`.
      factors: whether its datasets have ground-truth factors (``Dataset.ground_truth``: the
        disentanglement metrics and ``config.metric_every`` need them).
      files: "none" (built or rendered here: a ``data_dir`` is refused), "required" (a
        ``data_dir`` must name them) or "optional".
      data_dir: what ``data_dir`` names, for the error when it is missing.
    """

    name: str
    load: Loader
    factors: bool = False
    files: str = "optional"
    data_dir: str = ""


SOURCES: dict[str, Source] = {}


def source(name: str, *, factors: bool = False, files: str = "optional",
           data_dir: str = "") -> Callable[[Loader], Loader]:
    """Decorator: registers ``load(data_dir, test_fraction, seed) -> Dataset`` as dataset
    ``name`` (see :class:`Source`); a name taken by another loader is refused."""
    if files not in FILES:
        raise ValueError(f"source {name!r}: files={files!r} is not one of {FILES}")
    if name.startswith(_TFDS_PREFIX):
        raise ValueError(f"dataset {name!r}: the prefix {_TFDS_PREFIX!r} is TFDS's")

    def deco(load_fn: Loader) -> Loader:
        old = SOURCES.get(name)
        if old is not None and old.load is not load_fn:
            raise ValueError(f"dataset {name!r} is registered already; register the source under another name")
        SOURCES[name] = Source(name, load_fn, factors, files, data_dir)
        return load_fn
    return deco


def register_source(name: str, loader: Loader, *, factors: bool = False, files: str = "optional") -> None:
    """``source(name, ...)(loader)`` as a call."""
    source(name, factors=factors, files=files)(loader)


def get_source(name: str) -> Source | None:
    """The registered source ``name`` (None: a TFDS name)."""
    return SOURCES.get(name)


def has_factors(name: str) -> bool:
    """Whether dataset ``name`` has ground-truth factors (a source registered with them)."""
    src = SOURCES.get(name)
    return bool(src and src.factors)


def ground_truth_sources() -> tuple[str, ...]:
    """The registered sources with ground-truth factors."""
    return tuple(n for n, s in SOURCES.items() if s.factors)


def load(
    name: str,
    data_dir: str | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Loads dataset ``name`` into host memory.

    Args:
      name: ``"digits"``, ``"idx"``, ``"npz"``, ``"dsprites"``, ``"dsprites_color"``,
        ``"dsprites_noisy"``, ``"dsprites_npz"``, or a TFDS name (``"mnist"``,
        ``"fashion_mnist"``, ``"binarized_mnist"``, ``"cifar10"``, ``"shapes3d"``, ...),
        optionally prefixed ``"tfds:"`` (needed for TFDS ``"tfds:dsprites"``).
      data_dir: the IDX directory for ``"idx"``, the ``.npz`` path for ``"npz"``
        and ``"dsprites_npz"``, the TFDS data_dir for TFDS names (None: TFDS's
        default); unused for digits and the rendered dSprites (sources with ``files="none"``,
        whose configs :func:`vaekl.config.validate` refuses with a data_dir).
      test_fraction: fraction of images held out as test by sources without a
        test split (digits, TFDS dsprites, shapes3d, ...); ignored by the others.
      seed: seed of that holdout's permutation, and of the fixed evaluation
        samples of ground-truth datasets.

    Returns:
      A :class:`Dataset`.

    Raises:
      FileNotFoundError: the files or the prepared TFDS dataset are missing.
      ValueError: unknown name, or malformed data (names what and where).
    """
    src = SOURCES.get(name)
    if src is None:
        return _load_tfds(name.removeprefix(_TFDS_PREFIX), data_dir, test_fraction, seed)
    if src.files == "required" and data_dir is None:
        raise ValueError(f"{name} dataset: data_dir must give {src.data_dir or 'its files'} "
                         f"(--config.data_dir=PATH)")
    return src.load(data_dir, test_fraction, seed)


def for_config(config) -> Dataset:
    """The dataset a config trains on: :func:`load` with its ``dataset``, ``data_dir``,
    ``test_fraction`` and ``data_seed`` (the one path from a config to its data)."""
    return load(config.dataset, config.data_dir or None, test_fraction=config.test_fraction,
                seed=config.data_seed)


def ground_truth_dataset(name: str, ground_truth: dsprites.GroundTruthData, seed: int = 0,
                         n_train: int | None = None, n_test: int | None = None) -> Dataset:
    """A :class:`Dataset` of ``ground_truth`` with fixed evaluation samples.

    ``train_images`` holds the images of ``n_train`` (default :data:`GT_EVAL_TRAIN`)
    uniformly drawn factor points and ``test_images`` another ``n_test`` (default
    :data:`GT_EVAL_TEST`), from independent NumPy streams seeded by ``[seed, 0]``
    and ``[seed, 1]``; labels -1. Training batches come from
    :meth:`Dataset.batch_source`.
    """
    n_train = GT_EVAL_TRAIN if n_train is None else n_train
    n_test = GT_EVAL_TEST if n_test is None else n_test
    splits = []
    for stream, n in ((0, n_train), (1, n_test)):
        rng = np.random.default_rng([seed, stream])
        images = ground_truth.images_from_factors(ground_truth.sample_factors(n, rng), rng)
        splits += [images, np.full((n,), -1, np.int32)]
    return Dataset(name, *splits, ground_truth=ground_truth)


# --------------------------------------------------------------------------------------
# Host-side helpers.


def _nhwc(images: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] -> [N, H, W, C]."""
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        return images
    raise ValueError(f"{where}: images must be [N, H, W] or [N, H, W, C], got shape {images.shape}.")


def _labels(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    """Integer labels [n] as int32, or all -1 when ``labels`` is None."""
    if labels is None:
        return np.full((n,), -1, np.int32)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise ValueError(f"{where}: labels must be integers [N], got {labels.dtype} {labels.shape}.")
    if len(labels) != n:
        raise ValueError(f"{where}: {n} images but {len(labels)} labels.")
    return labels.astype(np.int32)


def _holdout(
    name: str, images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> Dataset:
    """Splits one image set into train/test by a ``seed``-ed permutation."""
    n = len(images)
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise ValueError(
            f"{name}: test_fraction={test_fraction} of {n} images leaves an empty train or test split.")
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(name, images[train], labels[train], images[test], labels[test])


@source("digits", files="none")
def _digits(data_dir: str | None, test_fraction: float, seed: int) -> Dataset:
    return _load_digits(test_fraction, seed)


def _load_digits(test_fraction: float, seed: int) -> Dataset:
    """scikit-learn's 8×8 digits (values 0..16) as uint8 0..255, held out by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    return _holdout("digits", images, digits.target.astype(np.int32), test_fraction, seed)


# IDX: big-endian; magic = 0x00 0x00 <type: 0x08 = ubyte> <number of dims>, then one
# uint32 per dim, then the data in C order.
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", _IDX_IMAGES),
    "train_labels": ("train-labels-idx1-ubyte", _IDX_LABELS),
    "test_images": ("t10k-images-idx3-ubyte", _IDX_IMAGES),
    "test_labels": ("t10k-labels-idx1-ubyte", _IDX_LABELS),
}


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (gzipped when ``path`` ends in .gz).

    Args:
      path: the file.
      magic: the expected magic number (0x00000803 for images [N, H, W],
        0x00000801 for labels [N]); its last byte is the number of dims.

    Returns:
      uint8 array of the file's shape.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    got = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if got != magic:
        got_str = "none (file too short)" if got is None else f"0x{got:08x}"
        raise ValueError(f"{path}: not an IDX file of the expected kind: magic number {got_str}, "
                         f"expected 0x{magic:08x}.")
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header.")
    shape = tuple(int.from_bytes(data[4 * i: 4 * i + 4], "big") for i in range(1, ndim + 1))
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise ValueError(f"{path}: IDX header says shape {shape} ({size} bytes) but the file holds "
                         f"{len(data) - header} data bytes.")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()  # writable


def _find_idx(data_dir: str, stem: str) -> str:
    """Path of ``stem`` or ``stem.gz`` in ``data_dir``."""
    for path in (os.path.join(data_dir, stem), os.path.join(data_dir, stem + ".gz")):
        if os.path.isfile(path):
            return path
    found = sorted(os.listdir(data_dir))
    found_str = str(found[:20])[:-1] + (", ...]" if len(found) > 20 else "]")
    raise FileNotFoundError(f"idx dataset: expected {stem}[.gz] in {data_dir}, found: {found_str}")


def _load_idx(data_dir: str) -> Dataset:
    """The four MNIST-layout IDX files in ``data_dir``."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"idx dataset: {data_dir} is not a directory (expected the four "
                                f"MNIST-layout IDX files in it).")
    arrays = {key: _read_idx(_find_idx(data_dir, stem), magic)
              for key, (stem, magic) in _IDX_FILES.items()}
    where = f"idx dataset {data_dir}"
    splits = {}
    for split in ("train", "test"):
        images = _nhwc(arrays[f"{split}_images"], where)
        splits[split] = images, _labels(arrays[f"{split}_labels"], len(images), where)
    return Dataset("idx", *splits["train"], *splits["test"])


def _load_npz(path: str) -> Dataset:
    """``x_train``, ``x_test`` (uint8 or bool, [N, H, W(, C)]) and optional ``y_train``, ``y_test``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz dataset: no file {path}.")
    npz = dsprites.read_npz(path, "npz dataset")
    keys = sorted(npz)
    splits = {}
    for split in ("train", "test"):
        if f"x_{split}" not in npz:
            raise ValueError(f"npz dataset {path} has no key 'x_{split}' (keys: {keys}).")
        where = f"npz dataset {path} x_{split}"
        images = npz[f"x_{split}"]
        if images.dtype == np.bool_:
            images = images.astype(np.uint8) * np.uint8(255)
        elif images.dtype != np.uint8:
            raise ValueError(f"{where}: images must be uint8 (0..255) or bool, got {images.dtype}.")
        images = _nhwc(images, where)
        labels = npz.get(f"y_{split}")
        splits[split] = images, _labels(labels, len(images), f"npz dataset {path} y_{split}")
    return Dataset("npz", *splits["train"], *splits["test"])


source("idx", files="required", data_dir="the directory of IDX files")(lambda d, f, seed: _load_idx(d))
source("npz", files="required", data_dir="the .npz file (the MNIST reproduction configs also read "
       "$VAEKL_MNIST_NPZ)")(lambda d, f, seed: _load_npz(d))
for _name in dsprites.VARIANTS:  # rendered on the device from their factors
    source(_name, factors=True, files="none")(
        lambda d, f, seed, _name=_name: ground_truth_dataset(_name, dsprites.DSprites(_name), seed))
source("dsprites_npz", factors=True, files="required",
       data_dir="the path of dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz")(
    lambda d, f, seed: ground_truth_dataset("dsprites_npz", dsprites.load_npz(d), seed))


def _read_source(source: Sequence[dict[str, Any]], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a random-access source of {'image': [H, W, C], 'label'?: int} records.

    Uses ``__getitems__`` in chunks of records when the source has it (TFDS data
    sources do; much faster than one record at a time).

    Returns:
      uint8 images [N, H, W, C] and int32 labels [N] (-1 without 'label').
    """
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    images = labels = None
    for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, n)))
        records = getitems(keys) if getitems is not None else [source[k] for k in keys]
        for i, record in zip(keys, records):
            image = np.asarray(record["image"])
            if images is None:
                if image.ndim != 3:
                    raise ValueError(f"{where}: images must be [H, W, C], got shape {image.shape}.")
                images = np.empty((n, *image.shape), np.uint8)
                labels = np.full((n,), -1, np.int32)
            if image.shape != images.shape[1:] or image.dtype != np.uint8:
                raise ValueError(f"{where}: record {i} has a {image.dtype} image of shape {image.shape}, "
                                 f"expected uint8 {images.shape[1:]} (as record 0).")
            images[i] = image
            if "label" in record:
                labels[i] = record["label"]
    if images is None:
        raise ValueError(f"{where}: no records.")
    return images, labels


def _load_tfds(name: str, data_dir: str | None, test_fraction: float, seed: int) -> Dataset:
    """A TFDS dataset prepared in ``data_dir``: 'train' and 'test' splits (or a holdout of 'train')."""
    import tensorflow_datasets as tfds  # Imports no TensorFlow; slow-ish, so only here.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: not a registered source {tuple(SOURCES)} and not a TFDS dataset "
            f"(see tfds.list_builders()).") from None
    where_dir = data_dir if data_dir is not None else "(TFDS default)"
    hint = (f"run `tfds build {name} --data_dir={data_dir or '...'} --file_format=array_record` "
            f"on a machine with network and copy the directory here, or use dataset='idx'/'npz'")
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in data_dir={where_dir} "
                                f"(looked in {builder.data_dir}): {hint}.")
    splits = list(builder.info.splits)
    if "train" not in splits:
        raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} has no 'train' split "
                         f"(splits: {splits}).")
    wanted = ["train", "test"] if "test" in splits else ["train"]
    try:
        # Same as tfds.data_source(name, split=wanted, data_dir=data_dir, download=False),
        # without building the builder a second time.
        sources = builder.as_data_source(split=wanted)
    except NotImplementedError:  # Prepared, but e.g. as tfrecord (`tfds build`'s default).
        fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
        raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as {fmt}, which "
                         f"has no random access (array_record is needed): {hint}.") from None
    arrays = [_read_source(source, f"TFDS dataset {name!r} split {split!r}")
              for split, source in zip(wanted, sources)]
    if builder.name in _TFDS_BINARY:
        for images, _ in arrays:
            if images.max(initial=0) > 1:
                raise ValueError(f"TFDS dataset {name!r}: expected {{0, 1}} images, found values up "
                                 f"to {images.max()}.")
            images *= np.uint8(255)
    if len(arrays) == 1:
        return _holdout(name, *arrays[0], test_fraction, seed)
    return Dataset(name, *arrays[0], *arrays[1])


def binarize_threshold(images: np.ndarray) -> np.ndarray:
    """Thresholds uint8 images once on the host: uint8 {0, 255}, 255 where x / 255 > ½ (x >= 128).

    Same shape; ``binarize(None, binarize_threshold(x), "none")`` equals
    ``binarize(None, x, "threshold")``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"binarize_threshold: expected uint8 images, got {images.dtype}.")
    return np.where(images > 127, np.uint8(255), np.uint8(0))


def binarize_fixed(images: np.ndarray, seed: int) -> np.ndarray:
    """One fixed stochastic binarization: uint8 {0, 255}, each pixel 255 with probability
    x / 255, drawn once from ``seed`` (numpy's PCG64) on the host; same shape.

    The same images and seed give the same draw on any machine (the "static MNIST"
    construction of Larochelle & Murray 2011; ``binarize(None, result, "none")`` is then the
    model input).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"binarize_fixed: expected uint8 images, got {images.dtype}.")
    u = np.random.default_rng(seed).integers(0, 255, size=images.shape, dtype=np.uint8)
    return np.where(u < images, np.uint8(255), np.uint8(0))  # P(u < x) = x / 255 for u ~ U{0..254}


# --------------------------------------------------------------------------------------
# On-device batching (pure JAX; jittable with static `batch_size` and `mode`).


def sample_batch(key: jax.Array, images: jax.Array, batch_size: int) -> jax.Array:
    """Draws ``batch_size`` images uniformly with replacement (``batch_size`` static under jit).

    Args:
      key: PRNG key.
      images: uint8 [N, H, W, C], on device.
      batch_size: B.

    Returns:
      uint8 [B, H, W, C].
    """
    idx = jax.random.randint(key, (batch_size,), 0, images.shape[0])
    return jnp.take(images, idx, axis=0)


def to_float(images: jax.Array) -> jax.Array:
    """uint8 0..255 -> float32 in [0, 1] (x / 255); same shape."""
    return jnp.asarray(images).astype(jnp.float32) / 255.0


def binarize(key: jax.Array | None, images: jax.Array, mode: str) -> jax.Array:
    """uint8 images [..., H, W, C] -> float32 model inputs of the same shape.

    Args:
      key: PRNG key, used (and required) only by ``mode="dynamic"``.
      images: uint8 in 0..255.
      mode: ``"none"``: x / 255; ``"dynamic"``: Bernoulli(x / 255) in {0, 1},
        drawn anew for each key (pass a new key every step); ``"threshold"``:
        x / 255 > ½ in {0, 1}, the same on every call. A Python string (static
        under ``jit``).
    """
    x = to_float(images)
    if mode == "none":
        return x
    if mode == "threshold":
        return (x > 0.5).astype(jnp.float32)
    if mode == "dynamic":
        if key is None:
            raise ValueError('binarize: mode="dynamic" needs a PRNG key.')
        return jax.random.bernoulli(key, x).astype(jnp.float32)
    raise ValueError(f"binarize: unknown mode {mode!r}; expected one of {BINARIZE_MODES}.")

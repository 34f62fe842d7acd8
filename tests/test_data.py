"""Tests for vaekl.data: loaders (on data the tests write themselves) and on-device batching."""

import gzip
import json
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import data

tfds = pytest.importorskip("tensorflow_datasets")


def _rows(images, labels):
    """(image bytes, label) pairs, sorted: compares splits as multisets."""
    return sorted(zip((im.tobytes() for im in images), labels.tolist()))


# --------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_split():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    assert ds.name == "digits"
    assert ds.image_shape == (8, 8, 1)
    for images, labels in [(ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)]:
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert labels.dtype == np.int32 and labels.shape == (len(images),)
    assert len(ds.test_images) == round(0.2 * 1797)
    assert len(ds.train_images) + len(ds.test_images) == 1797
    both = np.concatenate([ds.train_images, ds.test_images])
    assert both.min() == 0 and both.max() == 255

    # Train and test are a partition of the 1797 (image, label) pairs, rescaled by 255/16.
    digits = load_digits()
    expected = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    got = _rows(both, np.concatenate([ds.train_labels, ds.test_labels]))
    assert got == _rows(expected, digits.target)


def test_digits_split_is_deterministic_in_seed_and_fraction():
    a, b = data.load("digits", seed=3), data.load("digits", seed=3)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    c = data.load("digits", seed=4)
    assert not np.array_equal(a.test_images, c.test_images)
    assert len(data.load("digits", test_fraction=0.5).test_images) == round(0.5 * 1797)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load("digits", test_fraction=0.0)


# --------------------------------------------------------------------------------------
# idx


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of uint8 ``array``: big-endian magic 0x0000 08 <ndim>, dims, data."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _idx_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (5,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (3,), dtype=np.uint8),
    }


def _write_idx(directory, arrays, gzipped=()):
    directory.mkdir(exist_ok=True)
    for stem, array in arrays.items():
        if stem in gzipped:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (directory / stem).write_bytes(_idx_bytes(array))


@pytest.mark.parametrize("gzipped", ["none", "all", "some"])
def test_idx_round_trip(tmp_path, gzipped):
    arrays = _idx_arrays()
    stems = list(arrays)
    gzipped = {"none": [], "all": stems, "some": stems[::2]}[gzipped]
    _write_idx(tmp_path / "d", arrays, gzipped=gzipped)
    ds = data.load("idx", str(tmp_path / "d"))
    np.testing.assert_array_equal(ds.train_images, arrays["train-images-idx3-ubyte"][..., None])
    np.testing.assert_array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images, arrays["t10k-images-idx3-ubyte"][..., None])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.image_shape == (4, 3, 1)


def test_idx_missing_file_names_file_and_directory(tmp_path):
    arrays = _idx_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    _write_idx(tmp_path / "d", arrays)
    with pytest.raises(FileNotFoundError) as e:
        data.load("idx", str(tmp_path / "d"))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in msg and str(tmp_path / "d") in msg
    assert "t10k-images-idx3-ubyte" in msg  # lists what it found
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load("idx", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data_dir"):
        data.load("idx")


def test_idx_bad_magic(tmp_path):
    _write_idx(tmp_path, _idx_arrays())
    labels = _idx_arrays()["train-labels-idx1-ubyte"]
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, magic=0x00000803))
    expected = r"train-labels-idx1-ubyte.*magic number 0x00000803, expected 0x00000801"
    with pytest.raises(ValueError, match=expected):
        data.load("idx", str(tmp_path))


def test_idx_truncated_and_mismatched_counts(tmp_path):
    arrays = _idx_arrays()
    _write_idx(tmp_path, arrays)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*data bytes"):
        data.load("idx", str(tmp_path))
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:2]
    _write_idx(tmp_path, arrays)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.load("idx", str(tmp_path))


# --------------------------------------------------------------------------------------
# npz


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, (6,))
    x_test = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x_train, y_train=y_train, x_test=x_test)
    ds = data.load("npz", str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(ds.train_images, x_train)
    np.testing.assert_array_equal(ds.train_labels, y_train)
    np.testing.assert_array_equal(ds.test_images, x_test)
    np.testing.assert_array_equal(ds.test_labels, [-1, -1])  # no y_test
    assert ds.train_labels.dtype == np.int32 and ds.image_shape == (5, 4, 3)


def test_npz_grey_and_bool_images(tmp_path):
    x = np.array([[[0, 1], [1, 0]]], bool)
    np.savez(tmp_path / "b.npz", x_train=x, x_test=x.astype(np.uint8) * 7)
    ds = data.load("npz", str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(ds.train_images[..., 0], x * 255)
    np.testing.assert_array_equal(ds.test_images[..., 0], x * 7)
    assert ds.image_shape == (2, 2, 1)


def test_npz_errors(tmp_path):
    ok = np.zeros((2, 3, 3), np.uint8)
    path = str(tmp_path / "c.npz")
    np.savez(path, x_train=ok, y_test=np.zeros(2, int))
    expected = rf"npz dataset {path} has no key 'x_test' \(keys: \['x_train', 'y_test'\]\)"
    with pytest.raises(ValueError, match=expected):
        data.load("npz", path)
    np.savez(path, x_train=ok, x_test=ok.astype(np.float32))
    with pytest.raises(ValueError, match="x_test.*uint8.*float32"):
        data.load("npz", path)
    np.savez(path, x_train=ok, x_test=ok[0])
    with pytest.raises(ValueError, match=r"x_test.*\[N, H, W\].*\(3, 3\)"):
        data.load("npz", path)
    np.savez(path, x_train=ok, y_train=np.zeros(3, int), x_test=ok)
    with pytest.raises(ValueError, match="y_train: 2 images but 3 labels"):
        data.load("npz", path)
    np.savez(path, x_train=ok, x_test=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="train images are"):
        data.load("npz", path)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load("npz", str(tmp_path / "nope.npz"))


# --------------------------------------------------------------------------------------
# TFDS, through `tfds.testing.mock_data` (nothing is downloaded or prepared).


def _write_tfds_metadata(root, name, splits, file_format="array_record"):
    """A dataset_info.json declaring ``splits`` ({name: size}) where TFDS looks for ``name``."""
    version = str(tfds.builder_cls(name).VERSION)
    directory = root / name / version
    directory.mkdir(parents=True)
    info = {"name": name, "version": version, "fileFormat": file_format,
            "splits": [{"name": s, "shardLengths": [str(n)], "numBytes": "0"} for s, n in splits.items()]}
    (directory / "dataset_info.json").write_text(json.dumps(info))


def _fixed_getitems(*args, generator, serialized=False):
    # tfds 4.9.10's mock stores `__getitems__` as an unbound functools.partial on a
    # MagicMock instance, so `source.__getitems__(keys)` passes `keys` as `self` and
    # fails; this replacement accepts either call form.
    assert not serialized
    return [generator[k] for k in args[-1]]


@pytest.fixture
def mock_tfds(tmp_path, monkeypatch):
    """Mocks TFDS with random records; split names come from metadata in tmp_path."""
    monkeypatch.setattr("tensorflow_datasets.testing.mocking._getitems", _fixed_getitems)
    _write_tfds_metadata(tmp_path, "mnist", {"train": 60000, "test": 10000})

    def mock(**kwargs):
        return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES,
                                      data_dir=str(tmp_path), **kwargs)
    return mock


def test_tfds_mnist(mock_tfds):
    with mock_tfds(num_examples=6):
        ds = data.load("mnist", "/ignored/by/the/mock")
        expected = tfds.data_source("mnist", split="test", download=False)
        expected_images = np.stack([expected[i]["image"] for i in range(len(expected))])
        expected_labels = np.array([expected[i]["label"] for i in range(len(expected))])
    assert ds.image_shape == (28, 28, 1)
    assert ds.train_images.shape == ds.test_images.shape == (6, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.test_images, expected_images)
    np.testing.assert_array_equal(ds.test_labels, expected_labels)
    assert 0 <= ds.test_labels.min() and ds.test_labels.max() < 10


class _Source:
    """A minimal random-access source (like a TFDS data source) that records its reads."""

    def __init__(self, records):
        self.records, self.reads = records, []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __getitems__(self, keys):
        self.reads.append(list(keys))
        return [self.records[k] for k in keys]


def _as_data_source_fn(sources):
    def as_data_source(builder, split, decoders=None, deserialize_method=None):
        del builder, decoders, deserialize_method
        return [sources[s] for s in split]
    return as_data_source


def test_tfds_without_test_split_is_held_out_and_binary_scaled(mock_tfds, tmp_path, monkeypatch):
    """TFDS dsprites ("tfds:" prefix; plain "dsprites" is rendered): {0, 1} images, no 'label',
    only a 'train' split."""
    _write_tfds_metadata(tmp_path, "dsprites", {"train": 737280})
    images = np.random.default_rng(0).integers(0, 2, (10, 64, 64, 1), dtype=np.uint8)
    source = _Source([{"image": im, "label_shape": np.int64(1)} for im in images])
    monkeypatch.setattr(data, "_READ_CHUNK", 4)
    with mock_tfds(as_data_source_fn=_as_data_source_fn({"train": source})):
        ds = data.load("tfds:dsprites", test_fraction=0.3, seed=1)
    assert source.reads == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # chunked __getitems__
    assert len(ds.train_images) == 7 and len(ds.test_images) == 3
    assert ds.image_shape == (64, 64, 1) and ds.train_images.dtype == np.uint8
    both = np.concatenate([ds.train_images, ds.test_images])
    labels = np.concatenate([ds.train_labels, ds.test_labels])
    np.testing.assert_array_equal(labels, -1)
    assert _rows(both, labels) == _rows(images * 255, np.full(10, -1))
    assert ds.ground_truth is None and ds.train_size == 7


def test_tfds_shapes3d_rgb_held_out(mock_tfds, tmp_path):
    """shapes3d: RGB 64×64 images with factor features but no 'label', only a 'train' split."""
    _write_tfds_metadata(tmp_path, "shapes3d", {"train": 480000})
    with mock_tfds(num_examples=10):
        ds = data.load("shapes3d", test_fraction=0.2, seed=0)
        source = tfds.data_source("shapes3d", split="train", download=False)
        expected = np.stack([source[i]["image"] for i in range(len(source))])
    assert ds.image_shape == (64, 64, 3) and len(ds.train_images) == 8 and len(ds.test_images) == 2
    both = np.concatenate([ds.train_images, ds.test_images])
    labels = np.concatenate([ds.train_labels, ds.test_labels])
    assert _rows(both, labels) == _rows(expected, np.full(10, -1))
    assert expected.max() > 1  # grey levels, not scaled as binary


def test_tfds_binarized_mnist_scaled_and_checked(mock_tfds, tmp_path):
    _write_tfds_metadata(tmp_path, "binarized_mnist", {"train": 50000, "validation": 10000, "test": 10000})
    rng = np.random.default_rng(0)
    split_images = {s: rng.integers(0, 2, (n, 28, 28, 1), dtype=np.uint8)
                    for s, n in [("train", 5), ("validation", 2), ("test", 3)]}
    sources = {s: _Source([{"image": im} for im in ims]) for s, ims in split_images.items()}
    with mock_tfds(as_data_source_fn=_as_data_source_fn(sources)):
        ds = data.load("binarized_mnist")
        np.testing.assert_array_equal(ds.train_images, split_images["train"] * 255)
        np.testing.assert_array_equal(ds.test_images, split_images["test"] * 255)
        assert not sources["validation"].reads
        sources["test"].records[1]["image"] = np.full((28, 28, 1), 2, np.uint8)
        with pytest.raises(ValueError, match=r"binarized_mnist.*\{0, 1\}"):
            data.load("binarized_mnist")
        sources["test"].records[1]["image"] = np.zeros((28, 27, 1), np.uint8)
        with pytest.raises(ValueError, match=r"record 1 .*\(28, 27, 1\)"):
            data.load("binarized_mnist")


def test_tfds_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load("mnist", str(tmp_path))
    msg = str(e.value)
    assert "'mnist' is not prepared" in msg and f"--data_dir={tmp_path}" in msg and "tfds build mnist" in msg


def test_tfds_prepared_without_random_access(tmp_path):
    _write_tfds_metadata(tmp_path, "mnist", {"train": 7, "test": 3}, file_format="tfrecord")
    with pytest.raises(ValueError, match="stored as tfrecord.*--file_format=array_record"):
        data.load("mnist", str(tmp_path))


def test_unknown_name_lists_builtin_sources():
    with pytest.raises(ValueError, match=r"'no_such_dataset': not a registered source \('digits', 'idx', 'npz', 'dsprites'"):
        data.load("no_such_dataset")


_NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys

    class FakeTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # Pretends TensorFlow is installed and records every attempt to import it.
        attempts = []
        def find_spec(self, fullname, path, target=None):
            if fullname == "tensorflow" or fullname.startswith("tensorflow."):
                return importlib.machinery.ModuleSpec(fullname, self)
        def create_module(self, spec):
            self.attempts.append(spec.name)
            raise ImportError("the test forbids importing " + spec.name)
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, FakeTensorFlow())
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking
    from vaekl import data

    mocking._getitems = lambda *args, generator, serialized=False: [generator[k] for k in args[-1]]
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=sys.argv[1]):
        ds = data.load("mnist")
    try:
        data.load("mnist", sys.argv[2])
    except FileNotFoundError:
        pass
    result = {"attempts": list(FakeTensorFlow.attempts), "in_modules": "tensorflow" in sys.modules,
              "shape": list(ds.train_images.shape)}
    try:  # Control: the finder does catch an import.
        import tensorflow
    except ImportError:
        pass
    result["control"] = FakeTensorFlow.attempts[len(result["attempts"]):]
    print(json.dumps(result))
""")


def test_tfds_loading_never_imports_tensorflow(tmp_path):
    _write_tfds_metadata(tmp_path / "meta", "mnist", {"train": 60000, "test": 10000})
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "meta"), str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [3, 28, 28, 1]
    assert result["control"] == ["tensorflow"]
    assert result["attempts"] == [] and not result["in_modules"]


# --------------------------------------------------------------------------------------
# On-device batching.


def test_sample_batch_under_jit():
    # Image i is filled with the value i, so a batch shows which images were drawn.
    n = 7
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint8)[:, None, None, None], (n, 3, 2, 1))
    sample = jax.jit(data.sample_batch, static_argnums=2)
    batch = sample(jax.random.key(0), images, 500)
    assert batch.shape == (500, 3, 2, 1) and batch.dtype == jnp.uint8
    drawn = np.asarray(batch[:, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(batch), np.broadcast_to(drawn[:, None, None, None], batch.shape))
    counts = np.bincount(drawn, minlength=n)
    assert len(counts) == n and counts.min() > 40  # every image, roughly 500/7 times each
    assert not np.array_equal(drawn, np.asarray(sample(jax.random.key(1), images, 500)[:, 0, 0, 0]))


def test_to_float():
    x = jnp.array([0, 51, 255], jnp.uint8)
    y = data.to_float(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, [0.0, 0.2, 1.0], rtol=1e-6)


_LEVELS = np.array([0, 1, 64, 127, 128, 200, 255], np.uint8)


def test_binarize_none_and_threshold_under_jit():
    images = jnp.asarray(_LEVELS.reshape(1, 1, 7, 1))
    none = jax.jit(data.binarize, static_argnums=2)(None, images, "none")
    assert none.dtype == jnp.float32 and none.shape == images.shape
    np.testing.assert_allclose(none.ravel(), _LEVELS / 255, rtol=1e-6)
    static = jax.jit(lambda x: data.binarize(None, x, "threshold"))
    np.testing.assert_array_equal(static(images).ravel(), [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(static(images), static(images))
    # Host-side binarization agrees with on-device thresholding for every level.
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    host = data.binarize_threshold(every)
    assert host.dtype == np.uint8 and set(np.unique(host)) == {0, 255}
    np.testing.assert_array_equal(data.binarize(None, host, "none"), static(every))


def test_binarize_dynamic_is_bernoulli_of_grey_level():
    images = jnp.asarray(np.tile(_LEVELS.reshape(1, 1, 7, 1), (4000, 1, 1, 1)))  # 4000 draws per level
    dynamic = jax.jit(lambda key, x: data.binarize(key, x, "dynamic"))
    a = dynamic(jax.random.key(0), images)
    assert a.dtype == jnp.float32 and a.shape == images.shape
    assert set(np.unique(np.asarray(a))) == {0.0, 1.0}
    p = _LEVELS / 255
    mean = np.asarray(a).mean(axis=(0, 1, 3))
    assert np.all(np.abs(mean - p) <= 5 * np.sqrt(p * (1 - p) / 4000)), (mean, p)  # exact at p = 0, 1
    np.testing.assert_array_equal(a, dynamic(jax.random.key(0), images))  # same key, same draw
    assert not np.array_equal(a, dynamic(jax.random.key(1), images))  # new key, new draw


def test_binarize_errors():
    x = jnp.zeros((1, 2, 2, 1), jnp.uint8)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        data.binarize(None, x, "dynamic")
    with pytest.raises(ValueError, match="unknown mode 'bernoulli'"):
        data.binarize(jax.random.key(0), x, "bernoulli")
    with pytest.raises(ValueError, match="uint8"):
        data.binarize_threshold(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        data.binarize_fixed(np.zeros((2, 2), np.float32), 0)
    with pytest.raises(ValueError, match="unknown mode 'static'"):  # renamed: threshold or fixed draw
        data.binarize(None, x, "static")


def test_binarize_fixed_is_one_bernoulli_draw_per_pixel():
    """Each grey level x becomes 255 with probability x / 255 (exact at 0 and 255), the same
    draw for the same seed and a different one for another seed."""
    n = 20000
    images = np.tile(_LEVELS, (n, 1)).reshape(n, 1, 7, 1)
    a = data.binarize_fixed(images, seed=3)
    assert a.dtype == np.uint8 and a.shape == images.shape and set(np.unique(a)) <= {0, 255}
    p, mean = _LEVELS / 255, (a == 255).mean(axis=(0, 1, 3))
    assert np.all(np.abs(mean - p) <= 5 * np.sqrt(p * (1 - p) / n)), (mean, p)
    assert mean[0] == 0 and mean[-1] == 1
    np.testing.assert_array_equal(a, data.binarize_fixed(images, seed=3))
    assert not np.array_equal(a, data.binarize_fixed(images, seed=4))
    # Pixels are independent: the two halves of a constant image at x = 128 agree about half the time.
    half = data.binarize_fixed(np.full((n, 2), 128, np.uint8), seed=0)
    assert abs((half[:, 0] == half[:, 1]).mean() - 0.5) < 0.02

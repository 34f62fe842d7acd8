"""Tests for vaekl.dsprites (rendered dSprites, ground-truth interface) and its hook in vaekl.data."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import data, dsprites

SIZES = (3, 6, 40, 32, 32)


def _grid(**fixed):
    """All factor rows over the factors not in ``fixed`` (name -> index or list of indices)."""
    axes = [np.atleast_1d(fixed.get(name, range(size))) for name, size in zip(dsprites.FACTOR_NAMES, SIZES)]
    return np.array(list(itertools.product(*axes)), np.int32)


def _render(factors):
    return np.asarray(dsprites.render(jnp.asarray(factors)))[..., 0] > 0  # bool [B, 64, 64]


def _centroids(masks):
    """(row, column) centroids [B, 2] of boolean masks [B, H, W]."""
    rows, cols = np.indices(masks.shape[1:])
    area = masks.sum((1, 2))
    return np.stack([(masks * rows).sum((1, 2)) / area, (masks * cols).sum((1, 2)) / area], -1)


# --------------------------------------------------------------------------------------
# Factor grid and indexing.


def test_factor_grid_strides_and_round_trip():
    gt = dsprites.DSprites()
    assert gt.factor_names == ("shape", "scale", "orientation", "posX", "posY")
    assert gt.factor_sizes == SIZES and gt.num_factors == 5 and gt.num_observations == 737280
    assert gt.observation_shape == (64, 64, 1)
    np.testing.assert_array_equal(gt.factor_strides, [245760, 40960, 1024, 32, 1])
    _, scales, angles, xs, ys = dsprites.factor_values()
    np.testing.assert_allclose(scales, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert angles[0] == 0 and angles[-1] == 2 * np.pi and len(angles) == 40
    assert xs[0] == ys[0] == 0 and xs[-1] == ys[-1] == 1 and len(xs) == len(ys) == 32

    index = np.arange(737280)
    factors = gt.index_to_factors(index)
    assert factors.shape == (737280, 5)
    np.testing.assert_array_equal(factors.max(0), np.array(SIZES) - 1)
    np.testing.assert_array_equal(gt.factors_to_index(factors), index)
    np.testing.assert_array_equal(gt.index_to_factors(1), [0, 0, 0, 0, 1])  # posY fastest
    np.testing.assert_array_equal(gt.index_to_factors(32), [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(gt.index_to_factors(245760), [1, 0, 0, 0, 0])
    assert gt.factors_to_index([2, 5, 39, 31, 31]) == 737279
    assert gt.factors_to_index([[1, 2, 3, 4, 5]]).tolist() == [245760 + 2 * 40960 + 3 * 1024 + 4 * 32 + 5]
    with pytest.raises(ValueError, match="out of range"):
        gt.factors_to_index([0, 6, 0, 0, 0])
    with pytest.raises(ValueError, match="out of range"):
        gt.index_to_factors(737280)


def test_factor_sampling_host_and_device_cover_the_grid():
    gt = dsprites.DSprites()
    a = gt.sample_factors(20000, np.random.default_rng(0))
    np.testing.assert_array_equal(a, gt.sample_factors(20000, np.random.default_rng(0)))
    device = np.asarray(jax.jit(dsprites.sample_factor_indices, static_argnums=1)(jax.random.key(0), 20000))
    assert device.dtype == np.int32
    for f in (a, device):
        assert f.shape == (20000, 5)
        for i, size in enumerate(SIZES):
            counts = np.bincount(f[:, i], minlength=size)
            assert len(counts) == size and counts.min() > 0.6 * 20000 / size  # every value, roughly uniform


# --------------------------------------------------------------------------------------
# Geometry of the rendering.


def test_position_moves_the_centroid_along_columns_and_rows():
    for shape, orient in itertools.product(range(3), (0, 7, 23)):
        along_x = _centroids(_render(_grid(shape=shape, scale=2, orientation=orient, posY=10)))
        along_y = _centroids(_render(_grid(shape=shape, scale=2, orientation=orient, posX=20)))
        assert np.all(np.diff(along_x[:, 1]) > 0.5) and np.ptp(along_x[:, 0]) < 0.5  # columns only
        assert np.all(np.diff(along_y[:, 0]) > 0.5) and np.ptp(along_y[:, 1]) < 0.5  # rows only
        # 31 steps move the centre by 0.6 of the 64-pixel frame.
        np.testing.assert_allclose(along_x[-1, 1] - along_x[0, 1], 0.6 * 64, atol=1.0)


def test_area_grows_with_scale_as_its_square():
    areas = _render(_grid(orientation=[0, 13], posX=16, posY=16)).sum((1, 2)).reshape(3, 6, 2)
    assert np.all(np.diff(areas, axis=1) > 0)
    np.testing.assert_allclose(areas[:, -1] / areas[:, 0], 4.0, rtol=0.1)  # scale 1 vs 0.5
    # Unit-shape areas 4 (square), π/2 (ellipse), ≈ 2.77 (heart), times (8 px × scale)².
    np.testing.assert_allclose(areas[:, -1, 0], np.array([4, np.pi / 2, 2.77]) * 64, rtol=0.05)


def test_orientation_is_counter_clockwise_and_shapes_keep_their_orientation():
    half_pi = jnp.full((1,), np.pi / 2)
    one, zero, centre = jnp.ones(1), jnp.zeros(1), jnp.full((1,), 0.5)

    render_values = jax.jit(dsprites.render_values)

    def mask(shape, angle):
        return np.asarray(render_values(jnp.full((1,), shape), one, angle, centre, centre))[0, ..., 0] > 0

    for angle, wide in ((zero, True), (half_pi, False)):  # ellipse: major axis along u
        rows, cols = np.nonzero(mask(1, angle))
        assert (np.ptp(cols) > np.ptp(rows) + 5) == wide
    rc = _centroids(mask(2, zero)[None])[0]
    assert rc[0] < 31.5 and abs(rc[1] - 31.5) < 0.2  # heart: lobes up, point down
    rc = _centroids(mask(2, half_pi)[None])[0]
    assert rc[1] < 31.5 and abs(rc[0] - 31.5) < 0.2  # a quarter turn CCW: lobes to the left


def test_full_turn_renders_the_same_image():
    first = _grid(orientation=0, posX=[0, 9, 31], posY=[3, 31])
    last = _grid(orientation=39, posX=[0, 9, 31], posY=[3, 31])
    np.testing.assert_array_equal(_render(first), _render(last))  # linspace(0, 2π, 40): index 0 ≡ 39
    b = len(first)
    _, scales, _, xs, ys = dsprites.factor_values()
    args = (jnp.asarray(first[:, 0]), jnp.asarray(scales[first[:, 1]]), None,
            jnp.asarray(xs[first[:, 3]]), jnp.asarray(ys[first[:, 4]]))

    render_values = jax.jit(dsprites.render_values)

    def at(angle):
        return np.asarray(render_values(*args[:2], jnp.full((b,), angle), *args[3:]))

    np.testing.assert_array_equal(at(0.0), at(2 * np.pi))
    # A generic angle and a full turn more: equal up to float32 rounding at the boundary.
    assert (at(0.7) != at(0.7 + 2 * np.pi)).sum() <= 5
    assert (at(0.7) != at(0.0)).sum() > 100


def test_shapes_stay_inside_the_frame_at_extreme_positions():
    masks = _render(_grid(scale=5, posX=[0, 31], posY=[0, 31]))  # 3 shapes × 40 orientations × 4 corners
    assert masks.sum((1, 2)).min() > 50
    border = masks[:, [0, -1], :].any((1, 2)) | masks[:, :, [0, -1]].any((1, 2))
    assert not border.any()


def test_shapes_differ():
    masks = _render(_grid(scale=[2, 5], orientation=[0, 5], posX=12, posY=20)).reshape(3, 4, 64, 64)
    for i, j in itertools.combinations(range(3), 2):
        assert np.all((masks[i] != masks[j]).sum((1, 2)) > 10)


def test_device_renderer_matches_numpy_reference():
    rng = np.random.default_rng(1)
    factors = np.concatenate([rng.integers(0, np.array(SIZES), (500, 5)),
                              _grid(scale=5, orientation=[0, 5, 39], posX=[0, 31], posY=[0, 31])])
    device = np.asarray(jax.jit(dsprites.render)(jnp.asarray(factors, jnp.int32)))
    host = dsprites.render_numpy(factors)
    assert device.shape == host.shape == (len(factors), 64, 64, 1)
    assert device.dtype == host.dtype == np.uint8
    assert set(np.unique(device)) == {0, 255}
    # float32 vs float64: at most a few pixel centres exactly on a boundary may differ (0 measured).
    assert (device != host).sum() <= 5


# --------------------------------------------------------------------------------------
# Variants and the on-device batch source.


def test_color_and_noisy_variants():
    factors = jnp.asarray(np.random.default_rng(2).integers(0, np.array(SIZES), (64, 5)), jnp.int32)
    mask = np.asarray(dsprites.render(factors))[..., 0] > 0
    observe = jax.jit(dsprites.observe, static_argnames="variant")
    color = np.asarray(observe(jax.random.key(0), factors, "dsprites_color"))
    noisy = np.asarray(observe(jax.random.key(0), factors, "dsprites_noisy"))
    for x in (color, noisy):
        assert x.shape == (64, 64, 64, 3) and x.dtype == np.uint8

    np.testing.assert_array_equal(color.any(-1), mask)  # black background, shape coloured
    assert np.all(color[~mask] == 0)
    colours = np.array([color[i][mask[i]][0] for i in range(64)])  # [64, 3]
    for i in range(64):
        assert np.all(color[i][mask[i]] == colours[i])  # one colour per image
    assert colours.min() >= 127 and colours.max() <= 255
    assert np.ptp(colours, axis=0).min() > 80  # varies per image
    assert np.abs(np.corrcoef(colours.T)[np.triu_indices(3, 1)]).max() < 0.5  # independent channels

    assert np.all(noisy[mask] == 255)  # white shape
    background = noisy[~mask].astype(np.float64)  # [pixels, 3]
    assert background.min() == 0 and background.max() == 255
    np.testing.assert_allclose(background.mean(0), 127.5, atol=1.5)
    np.testing.assert_allclose(background.std(0), 255 / np.sqrt(12), rtol=0.02)
    assert abs(np.corrcoef(background.T)[0, 1]) < 0.02  # independent channels
    with pytest.raises(ValueError, match="needs a PRNG key"):
        dsprites.observe(None, factors, "dsprites_noisy")


@pytest.mark.parametrize("variant", list(dsprites.VARIANTS))
def test_batch_source_draws_in_a_jitted_scan(variant):
    arrays, draw = dsprites.DSprites(variant).batch_source()
    assert arrays == () and dsprites.DSprites(variant).batch_source()[1] is draw

    @jax.jit
    def batches(key, arrays):
        def body(_, i):
            return None, draw(jax.random.fold_in(key, i), arrays, 16)
        return jax.lax.scan(body, None, jnp.arange(3))[1]

    a = np.asarray(batches(jax.random.key(0), arrays))
    c = dsprites.VARIANTS[variant]
    assert a.shape == (3, 16, 64, 64, c) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, batches(jax.random.key(0), arrays))
    assert not np.array_equal(a, batches(jax.random.key(1), arrays))
    assert not np.array_equal(a[0], a[1])
    lit = (a == 255).all(-1) if variant == "dsprites_noisy" else a.any(-1)
    area = lit.sum((2, 3))
    assert area.min() >= 0.9 * np.pi / 2 * (8 * 0.5) ** 2 and area.max() <= 1.1 * 4 * 8 ** 2


# --------------------------------------------------------------------------------------
# Ground-truth interface and data.load.


def test_observations_from_factors_chunked_and_seeded():
    gt = dsprites.DSprites()
    factors = np.random.default_rng(3).integers(0, np.array(SIZES), (1100, 5))  # two chunks
    obs = gt.sample_observations_from_factors(factors, None)
    assert obs.shape == (1100, 64, 64, 1) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs, np.asarray(dsprites.render(factors)) / 255)

    color = dsprites.DSprites("dsprites_color")
    assert color.observation_shape == (64, 64, 3)
    f1, x1 = color.sample(5, np.random.default_rng(4))
    f2, x2 = color.sample(5, np.random.default_rng(4))
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(x1, x2)
    assert f1.shape == (5, 5) and x1.shape == (5, 64, 64, 3) and x1.dtype == np.float32
    assert 0 <= x1.min() and x1.max() <= 1 and 0.5 <= x1[x1 > 0].min()
    np.testing.assert_array_equal(x1.max(-1) > 0, obs_mask := np.asarray(dsprites.render(f1))[..., 0] > 0)
    assert obs_mask.any()
    with pytest.raises(ValueError, match="needs an rng"):
        color.sample_observations_from_factors(f1, None)


def test_load_dsprites_is_a_ground_truth_dataset():
    ds = data.load("dsprites", seed=5)
    assert ds.factor_sizes == SIZES and ds.num_factors == 5 and ds.factor_names[0] == "shape"
    assert ds.train_size == 737280 and ds.image_shape == ds.observation_shape == (64, 64, 1)
    assert ds.train_images.shape == (data.GT_EVAL_TRAIN, 64, 64, 1) == (2000, 64, 64, 1)
    assert ds.test_images.shape == (data.GT_EVAL_TEST, 64, 64, 1) == (5000, 64, 64, 1)
    assert set(np.unique(ds.test_images)) == {0, 255}
    np.testing.assert_array_equal(np.concatenate([ds.train_labels, ds.test_labels]), -1)
    np.testing.assert_array_equal(ds.train_images, data.load("dsprites", seed=5).train_images)
    assert not np.array_equal(ds.train_images, data.load("dsprites", seed=6).train_images)
    factors, obs = ds.sample(4, np.random.default_rng(0))
    np.testing.assert_array_equal(ds.sample_observations_from_factors(factors, None), obs)
    np.testing.assert_array_equal(ds.index_to_factors(ds.factors_to_index(factors)), factors)
    assert ds.batch_source() == ((), dsprites.DSprites().batch_source()[1])

    digits = data.load("digits")
    assert digits.train_size == len(digits.train_images) and not hasattr(digits, "factor_sizes")
    arrays, draw = digits.batch_source()
    assert arrays is digits.train_images and draw is data.sample_batch
    with pytest.raises(AttributeError, match="no ground-truth factors"):
        digits.sample_factors(3, np.random.default_rng(0))


def test_load_rgb_variants(monkeypatch):
    monkeypatch.setattr(data, "GT_EVAL_TRAIN", 8)
    monkeypatch.setattr(data, "GT_EVAL_TEST", 8)
    for name in ("dsprites_color", "dsprites_noisy"):
        ds = data.load(name)
        assert ds.image_shape == (64, 64, 3) and ds.factor_sizes == SIZES and ds.train_size == 737280
        assert len(ds.train_images) == len(ds.test_images) == 8
        assert not np.array_equal(ds.train_images, ds.test_images)
        assert ds.batch_source()[1] is dsprites.DSprites(name).batch_source()[1]


def _fake_npz(path, sizes=(3, 2, 4, 2, 3), shape=(6, 10), drop=0, colour_column=None, seed=0):
    """A small dSprites-layout npz: every grid point once, rows shuffled; returns (imgs, classes)."""
    rng = np.random.default_rng(seed)
    grid = np.array(list(itertools.product(*map(range, sizes))))
    classes = np.concatenate([np.zeros((len(grid), 1), np.int64), grid], 1)[rng.permutation(len(grid))]
    if colour_column is not None:
        classes[:, 0] = colour_column
    classes = classes[: len(classes) - drop]
    imgs = rng.integers(0, 2, (len(classes), *shape), dtype=np.uint8)
    np.savez(path, imgs=imgs, latents_classes=classes, latents_values=classes.astype(np.float64))
    return imgs, classes


def test_load_dsprites_npz(tmp_path):
    path = tmp_path / "dsprites_ndarray.npz"
    imgs, classes = _fake_npz(path)
    ds = data.load("dsprites_npz", str(path), seed=1)
    assert ds.factor_sizes == (3, 2, 4, 2, 3) and ds.train_size == 144 and ds.image_shape == (6, 10, 1)
    assert ds.train_images.shape == (2000, 6, 10, 1)
    by_index = {int(ds.factors_to_index(c[1:])): im for c, im in zip(classes, imgs)}
    factors = ds.sample_factors(50, np.random.default_rng(0))
    obs = ds.sample_observations_from_factors(factors, None)
    assert obs.dtype == np.float32 and obs.shape == (50, 6, 10, 1)
    np.testing.assert_array_equal(obs[..., 0], [by_index[int(i)] for i in ds.factors_to_index(factors)])

    arrays, draw = ds.batch_source()
    batches = jax.jit(lambda k, a: jax.vmap(lambda kk: draw(kk, a, 32))(jax.random.split(k, 4)))
    drawn = np.asarray(batches(jax.random.key(0), jax.device_put(arrays))).reshape(-1, 6, 10, 1)
    assert drawn.dtype == np.uint8
    stored = {(im * 255).tobytes() for im in imgs}
    assert all(im.tobytes() in stored for im in drawn)
    assert len({im.tobytes() for im in drawn}) > 60  # 128 draws from 144 images
    assert all(im.tobytes() in stored for im in ds.test_images)


def test_load_dsprites_npz_errors(tmp_path):
    _fake_npz(tmp_path / "incomplete.npz", drop=1)
    with pytest.raises(ValueError, match="do not cover the factor grid"):
        data.load("dsprites_npz", str(tmp_path / "incomplete.npz"))
    _fake_npz(tmp_path / "colour.npz", colour_column=np.arange(144) % 2)
    with pytest.raises(ValueError, match="column 0"):
        data.load("dsprites_npz", str(tmp_path / "colour.npz"))
    np.savez(tmp_path / "keys.npz", imgs=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"missing keys \['latents_classes'\]"):
        data.load("dsprites_npz", str(tmp_path / "keys.npz"))
    with pytest.raises(FileNotFoundError, match="no file"):
        data.load("dsprites_npz", str(tmp_path / "absent.npz"))
    with pytest.raises(ValueError, match="data_dir"):
        data.load("dsprites_npz")

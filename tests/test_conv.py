"""vaekl.models.conv: the CPU formulation of strided convolutions and their transposes equals
XLA's native ops in values and gradients (float32 tolerance), and groups of conv models
computed member by member equal vmapped ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vaekl import loops, train
from vaekl.models import conv as conv_lib
from vaekl.models import networks

# (side, kernel, stride, in channels, out channels): the models' 4×4 stride-2 layers, the
# small-output-channel weight gradient (< SMALL_OUT_CHANNELS), other kernels and strides, and
# a wide 32×32 layer whose weight gradient is one matmul (matmul_kernel_grad_pays).
CASES = [(8, 4, 2, 3, 5), (8, 4, 2, 3, 1), (8, 2, 2, 3, 1), (12, 6, 3, 2, 4), (8, 6, 2, 3, 2),
         (6, 4, 1, 2, 3), (6, 3, 1, 2, 1), (8, 4, 2, 3, 9), (16, 4, 2, 4, 8), (32, 4, 2, 16, 16)]


def _vjp_all(f, x, w, seed):
    y, vjp = jax.vjp(f, x, w)
    g = jax.random.normal(jax.random.key(seed), y.shape)
    return (y, *vjp(g))


def _close(got, want, rtol=2e-5):
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("side,k,s,c_in,c_out", CASES)
def test_cpu_conv_equals_native(side, k, s, c_in, c_out):
    x = jax.random.normal(jax.random.key(side + k), (2, side, side, c_in))
    w = jax.random.normal(jax.random.key(7), (k, k, c_in, c_out))
    got = _vjp_all(lambda x, w: conv_lib.conv(x, w, s, impl="cpu"), x, w, 3)
    want = _vjp_all(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (s, s), "SAME", dimension_numbers=conv_lib.DIMENSION_NUMBERS), x, w, 3)
    assert got[0].shape == want[0].shape
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("side,k,s,c_in,c_out", CASES)
def test_cpu_conv_transpose_equals_native(side, k, s, c_in, c_out):
    x = jax.random.normal(jax.random.key(side + k), (2, side // 2, side // 2, c_in))
    w = jax.random.normal(jax.random.key(7), (k, k, c_in, c_out))
    got = _vjp_all(lambda x, w: conv_lib.conv_transpose(x, w, s, impl="cpu"), x, w, 4)
    want = _vjp_all(lambda x, w: jax.lax.conv_transpose(
        x, w, (s, s), "SAME", dimension_numbers=conv_lib.DIMENSION_NUMBERS), x, w, 4)
    assert got[0].shape == want[0].shape
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("side,k,s,c_in,c_out", [(8, 4, 2, 3, 5), (12, 6, 3, 2, 4), (8, 6, 2, 3, 2),
                                                 (6, 4, 1, 2, 3), (10, 2, 2, 1, 1), (8, 4, 2, 16, 16)])
def test_matmul_kernel_grad_equals_native(side, k, s, c_in, c_out):
    """The one-matmul weight gradient equals autodiff of lax's strided convolution, for any
    kernel that is a multiple of the stride (not only where the dispatch picks it)."""
    x = jax.random.normal(jax.random.key(side), (3, side, side, c_in))
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out))
    y, vjp = jax.vjp(lambda w: conv_lib.conv_native(x, w, (s, s), "SAME"), w)
    g = jax.random.normal(jax.random.key(2), y.shape)
    _close(conv_lib.strided_conv_kernel_grad_matmul(x, g, (k, k), (s, s)), vjp(g)[0])


@pytest.mark.parametrize("side,k,s,c_in,c_out", [(8, 4, 2, 1, 5), (12, 6, 3, 2, 4), (8, 6, 2, 3, 2),
                                                 (6, 4, 1, 2, 3), (10, 2, 2, 1, 1), (8, 4, 2, 3, 16)])
def test_taps_kernel_grad_equals_native(side, k, s, c_in, c_out):
    """The strided-slice matmul weight gradient equals autodiff of lax's strided convolution,
    for any channel count (the dispatch uses it at one input channel)."""
    x = jax.random.normal(jax.random.key(side), (3, side, side, c_in))
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out))
    y, vjp = jax.vjp(lambda w: conv_lib.conv_native(x, w, (s, s), "SAME"), w)
    g = jax.random.normal(jax.random.key(2), y.shape)
    _close(conv_lib.strided_conv_kernel_grad_taps(x, g, (k, k), (s, s)), vjp(g)[0])


@pytest.mark.parametrize("side,k,s,c_in,c_out,padding", [(8, 4, 2, 3, 1, "SAME"), (5, 4, 2, 2, 16, "SAME"),
                                                         (6, 3, 2, 3, 2, "SAME"), (4, 4, 2, 2, 9, "VALID"),
                                                         (4, 5, 3, 3, 1, "SAME")])
def test_one_conv_transpose_equals_native(side, k, s, c_in, c_out, padding):
    """The transposed convolution as one stride-1 convolution over s²·O channels equals
    lax.conv_transpose, for any output channel count (the dispatch uses it below
    SMALL_OUT_CHANNELS)."""
    x = jax.random.normal(jax.random.key(side), (2, side, side, c_in))
    w = jax.random.normal(jax.random.key(3), (k, k, c_in, c_out))
    want = jax.lax.conv_transpose(x, w, (s, s), padding, dimension_numbers=conv_lib.DIMENSION_NUMBERS)
    got = conv_lib._by_one_conv(x, w, (s, s), padding)  # pylint: disable=protected-access
    assert got.shape == want.shape
    _close(got, want)


def test_matmul_kernel_grad_dispatch():
    assert conv_lib.matmul_kernel_grad_pays((64, 32, 32, 32), 32)       # enc_conv1, dec_deconv2
    assert not conv_lib.matmul_kernel_grad_pays((64, 16, 16, 32), 64)   # enc_conv2
    assert not conv_lib.matmul_kernel_grad_pays((64, 64, 64, 1), 32)    # enc_conv0


def test_cpu_path_is_taken_and_falls_back():
    """The custom VJP is in the program where it applies (no input-dilated convolution in the
    gradient), and odd sizes or VALID padding fall back to XLA's native op (same values)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
    grad = jax.grad(lambda x: jnp.sum(conv_lib.conv(x, w, 2, impl="cpu") ** 2))
    dilated = "lhs_dilate = [2, 2]"
    assert dilated not in jax.jit(grad).lower(x).as_text()
    native = jax.jit(jax.grad(lambda x: jnp.sum(conv_lib.conv(x, w, 2, impl="native") ** 2))).lower(x).as_text()
    assert dilated in native  # the check above can fail
    odd = jax.random.normal(jax.random.key(2), (2, 7, 7, 3))
    _close(conv_lib.conv(odd, w, 2, impl="cpu"), conv_lib.conv_native(odd, w, (2, 2), "SAME"))
    _close(conv_lib.conv(x, w, 2, "VALID", impl="cpu"), conv_lib.conv_native(x, w, (2, 2), "VALID"))


def test_impl_choice():
    assert conv_lib.resolve_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "native")
    with pytest.raises(ValueError, match="unknown conv impl 'fast'"):
        conv_lib.resolve_impl("fast")


def test_encoder_conv_equals_flax():
    ref = nnx.Conv(3, 6, kernel_size=(4, 4), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    fast = networks.Conv(3, 6, kernel_size=(4, 4), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(fast.kernel[...], ref.kernel[...])
    x = jax.random.normal(jax.random.key(1), (5, 2, 16, 16, 3))  # extra leading axes are kept
    _close(fast(x), ref(x))
    loss = lambda m: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    for a, b in zip(jax.tree.leaves(nnx.grad(loss)(fast)), jax.tree.leaves(nnx.grad(loss)(ref))):
        _close(a, b, rtol=1e-4)


def test_run_map_sequential_equals_vmap():
    def f(state, shared, hp):
        return {"y": jnp.tanh(state["w"] @ shared) * hp, "n": jnp.sum(state["w"])}
    states = {"w": jax.random.normal(jax.random.key(0), (3, 4, 5))}
    shared = jax.random.normal(jax.random.key(1), (5,))
    hp = jnp.array([1.0, 2.0, 3.0])
    a = jax.jit(loops.run_map(f, (0, None, 0), "vmap"))(states, shared, hp)
    b = jax.jit(loops.run_map(f, (0, None, 0), "sequential"))(states, shared, hp)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    # Members in order: each after the previous one, through a conditional XLA keeps (2 for 3 members).
    hlo = jax.jit(loops.run_map(f, (0, None, 0), "sequential")).lower(states, shared, hp).compile().as_text()
    assert hlo.count(" conditional(") == 2
    with pytest.raises(ValueError, match="disagree on the run axis"):
        loops.run_map(f, (0, None, 0), "sequential")(states, shared, hp[:2])
    with pytest.raises(ValueError, match="unknown member mode 'loop'"):
        loops.run_map(f, (0, None, 0), "loop")


def test_conv_group_member_equals_standalone():
    """A conv group on the CPU, compiled as the trainer compiles it (train_group's one-device
    placement; members one after another in one program there) trains each member exactly as
    its standalone run: different k (padded and masked), β, learning rate and seed; and the
    members are not computed as grouped convolutions (which XLA:CPU runs ~4× slower)."""
    from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
    from vaekl import config as config_lib, data, sharding  # pylint: disable=g-import-not-at-top

    def conv_config(**kw):
        c = config_lib.defaults()
        c.model, c.conv_channels, c.conv_hidden, c.batch_size = "conv", (4, 8), 16, 16
        for k, v in kw.items():
            c[k] = v
        return c

    ds = data.load("digits")
    images, n = jnp.asarray(ds.train_images), ds.train_images.shape[0]
    configs = [conv_config(latent_dim=3, beta=0.5, learning_rate=1e-3, seed=0),
               conv_config(latent_dim=5, beta=2.0, learning_rate=3e-3, seed=1)]
    assert train.member_mode(configs[0]) == ("sequential" if jax.default_backend() == "cpu" else "vmap")
    small = configs[0]
    graphdef, init, tx = train.create(small, ds.image_shape)
    key = jax.random.fold_in(jax.random.key(small.seed), 2)
    want, want_m = train.compile_fns(small, graphdef, tx, vmapped=False, dataset_size=n).run_steps(
        jax.tree.map(jnp.copy, init), images, train.hyperparameters(small), key, None, num_steps=2)
    big = configs[1]
    graphdef, template, tx = train.create(big, ds.image_shape)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), train.pad_like(init, template), template)
    masks = jnp.asarray([np.arange(5) < c.latent_dim for c in configs], jnp.float32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 2) for c in configs])
    placement = sharding.plan(2, batch_size=big.batch_size)  # what train_group uses
    cpu = jax.default_backend() == "cpu"
    assert train.programs.program_members(big, placement) == ("sequential" if cpu else "vmap")
    assert train.programs.program_members(big, SimpleNamespace(devices=4)) == "vmap"  # run axis over devices
    fns = train.compile_fns(big, graphdef, tx, vmapped=True, dataset_size=n, placement=placement)
    stacked, images = placement.put_runs(stacked), placement.replicate(images)
    hp, keys, masks = (placement.put_runs(a) for a in (train.stack_hyperparameters(configs), keys, masks))
    lowered = jax.jit(lambda s: fns.run_steps(s, images, hp, keys, masks, num_steps=2)).lower(stacked).as_text()
    if cpu:
        assert "feature_group_count = 1" in lowered and "feature_group_count = 2" not in lowered
    got, got_m = fns.run_steps(stacked, images, hp, keys, masks, num_steps=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                 train.slice_like(jax.tree.map(lambda a: a[0], got), init), want)
    np.testing.assert_allclose(got_m["loss"][0], want_m["loss"], rtol=2e-5)
    assert not np.allclose(got_m["loss"][0], got_m["loss"][1])

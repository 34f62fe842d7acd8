"""Encoder and decoder torsos: MLPs and convolutional pairs for 28×28, 32×32 and 64×64 images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vaekl.models import conv as conv_lib

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nnx.relu, "tanh": jnp.tanh, "elu": nnx.elu, "gelu": nnx.gelu,
    "softplus": nnx.softplus, "swish": nnx.swish, "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """in → hidden… → out, the activation after every hidden layer (and after the last
    one too with ``activate_final``)."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int,
                 act: str, *, rngs: nnx.Rngs, activate_final: bool = False):
        sizes = [in_features, *hidden, out_features]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.act = activation(act)
        self.activate_final = activate_final

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        x = self.layers[-1](x)
        return self.act(x) if self.activate_final else x


class MLPEncoder(nnx.Module):
    """Images [..., H, W, C] → features [..., hidden[-1]]: flatten, then hidden layers, each
    followed by the activation. With no hidden layers the features are the pixels (a linear
    encoder, once the posterior head is applied)."""

    def __init__(self, image_shape: Sequence[int], hidden: Sequence[int], act: str, *, rngs: nnx.Rngs):
        self.image_ndim = len(image_shape)
        n_in = math.prod(image_shape)
        self.mlp = MLP(n_in, hidden[:-1], hidden[-1], act, rngs=rngs, activate_final=True) if hidden else None
        self.features = hidden[-1] if hidden else n_in

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(*x.shape[: x.ndim - self.image_ndim], -1)
        return x if self.mlp is None else self.mlp(x)


class MLPDecoder(nnx.Module):
    """Latents [..., k] → per-pixel parameters [..., H, W, C]."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], image_shape: Sequence[int],
                 act: str, *, rngs: nnx.Rngs):
        self.image_shape = tuple(image_shape)
        self.mlp = MLP(latent_dim, hidden, math.prod(image_shape), act, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.mlp(z).reshape(*z.shape[:-1], *self.image_shape)


def _check_conv_size(image_shape: Sequence[int], channels: Sequence[int]) -> int:
    h, w, _ = image_shape
    factor = 2 ** len(channels)
    if h != w or h % factor:
        raise ValueError(f"conv networks need square images whose side is divisible by "
                         f"2^{len(channels)} = {factor} (one stride-2 layer per channel entry); "
                         f"got {h}×{w}. Use 28×28 or 32×32 with 2 layers, 64×64 with 3 or 4.")
    return h // factor


class ConvEncoder(nnx.Module):
    """Images [..., H, W, C] → features [..., hidden]: stride-2 4×4 convs, then a dense layer."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], hidden: int,
                 act: str, *, rngs: nnx.Rngs):
        base = _check_conv_size(image_shape, channels)
        ins = [image_shape[-1], *channels[:-1]]
        self.convs = nnx.List([Conv(a, b, kernel_size=(4, 4), strides=2, padding="SAME", rngs=rngs)
                               for a, b in zip(ins, channels)])
        self.dense = nnx.Linear(base * base * channels[-1], hidden, rngs=rngs)
        self.act = activation(act)
        self.features = hidden

    def __call__(self, x: jax.Array) -> jax.Array:
        batch = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        for conv in self.convs:
            x = self.act(conv(x))
        x = self.act(self.dense(x.reshape(x.shape[0], -1)))
        return x.reshape(*batch, -1)


class Conv(nnx.Conv):
    """flax's Conv (same parameters, initialisation and function) evaluated by
    :func:`vaekl.models.conv.conv`: on the CPU with a backward pass that avoids XLA:CPU's slow
    kernels (padding 'SAME' or 'VALID', no dilation, groups or mask)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        batch = inputs.shape[:-3]
        x = inputs.reshape(-1, *inputs.shape[-3:])
        y = conv_lib.conv(x, self.kernel[...], self.strides, self.padding)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*batch, *y.shape[1:])


class ConvTranspose(nnx.ConvTranspose):
    """flax's ConvTranspose (same parameters, initialisation and function) evaluated by
    :func:`vaekl.models.conv.conv_transpose`: on the CPU by phases, never XLA:CPU's
    input-dilated convolution (padding 'SAME' or 'VALID', no dilation or mask)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        batch = inputs.shape[:-3]
        x = inputs.reshape(-1, *inputs.shape[-3:])
        y = conv_lib.conv_transpose(x, self.kernel[...], self.strides, self.padding)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*batch, *y.shape[1:])


class ConvDecoder(nnx.Module):
    """Latents [B, k] → per-pixel parameters [B, H, W, C]: dense, then stride-2 transposed convs."""

    def __init__(self, latent_dim: int, channels: Sequence[int], hidden: int,
                 image_shape: Sequence[int], act: str, *, rngs: nnx.Rngs):
        self.base = _check_conv_size(image_shape, channels)
        self.channels = tuple(reversed(channels))
        self.dense = nnx.Linear(latent_dim, hidden, rngs=rngs)
        self.project = nnx.Linear(hidden, self.base * self.base * self.channels[0], rngs=rngs)
        outs = [*self.channels[1:], image_shape[-1]]
        self.deconvs = nnx.List([
            ConvTranspose(a, b, kernel_size=(4, 4), strides=(2, 2), padding="SAME", rngs=rngs)
            for a, b in zip(self.channels, outs)])
        self.act = activation(act)

    def __call__(self, z: jax.Array) -> jax.Array:
        batch = z.shape[:-1]
        x = self.act(self.project(self.act(self.dense(z.reshape(-1, z.shape[-1])))))
        x = x.reshape(-1, self.base, self.base, self.channels[0])
        for deconv in self.deconvs[:-1]:
            x = self.act(deconv(x))
        x = self.deconvs[-1](x)
        return x.reshape(*batch, *x.shape[1:])

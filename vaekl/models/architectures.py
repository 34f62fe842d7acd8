"""Encoder/decoder architectures by name (``config.model``): one declaration each.

An architecture builds the encoder (images [..., H, W, C] in [0, 1] → features [..., F], with
an int attribute ``features`` = F) and the decoder (latents [..., k] → per-pixel likelihood
parameters [..., H, W, C]) from the config; the Gaussian head, prior and likelihood around
them are the VAE's (:func:`vaekl.models.vae.make_vae`). What the trainer and the sweep's
memory planner need to know about it is declared beside it::

    from vaekl.models import architectures, networks

    @architectures.register("wide_mlp", fields={"wide_width": 1024})
    def wide_mlp(config, image_shape, rngs):
        enc = networks.MLPEncoder(image_shape, (config.wide_width,), config.activation, rngs=rngs)
        dec = networks.MLPDecoder(config.latent_dim, (config.wide_width,), image_shape,
                                  config.activation, rngs=rngs)
        return enc, dec

``--config.model=wide_mlp --config.imports=my_module`` then trains it (the new field is a
config field with its default). ``fields`` lists the config fields the architecture reads
(with a default for a new one, or None for a field vaekl already has); reports show them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from flax import nnx

from vaekl.models import networks

__all__ = ["Architecture", "REGISTRY", "get", "register"]

Build = Callable[[Any, tuple[int, int, int], nnx.Rngs], tuple[nnx.Module, nnx.Module]]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    Attributes:
      name: its ``config.model`` value.
      build: (config, image_shape (H, W, C), rngs) → (encoder, decoder).
      fields: the config fields it reads → their defaults (None: a field vaekl declares).
      cpu_sequential: on XLA:CPU, train one step per compiled call and a group's members one
        after another inside the program (convolutions run ~20× slower inside a while loop
        and ~4× slower per member as vmapped grouped convolutions; see vaekl.loops).
      activation_floats: (config, image_size = H·W·C) → float32 activations per example
        beyond the dense widths, for the sweep's memory planner (vaekl.sweep.bytes_per_run).
    """

    name: str
    build: Build
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cpu_sequential: bool = False
    activation_floats: Callable[[Any, int], int] | None = None


REGISTRY: dict[str, Architecture] = {}


def register(name: str, *, fields: Mapping[str, Any] | None = None, cpu_sequential: bool = False,
             activation_floats: Callable[[Any, int], int] | None = None) -> Callable[[Build], Build]:
    """Decorator: registers ``build`` as architecture ``name`` (see the module docstring)."""
    def deco(build: Build) -> Build:
        if name in REGISTRY and REGISTRY[name].build is not build:
            raise ValueError(f"architecture {name!r} is registered twice")
        REGISTRY[name] = Architecture(name, build, dict(fields or {}), cpu_sequential, activation_floats)
        return build
    return deco


def get(name: str) -> Architecture:
    """The architecture ``name``; ValueError naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {tuple(REGISTRY)}")
    return REGISTRY[name]


@register("mlp", fields={"encoder_hidden": None, "decoder_hidden": None, "activation": None})
def mlp(config, image_shape, rngs):
    """Dense layers of ``encoder_hidden`` / ``decoder_hidden`` units (Kingma & Welling's MLP)."""
    enc = networks.MLPEncoder(image_shape, config.encoder_hidden, config.activation, rngs=rngs)
    dec = networks.MLPDecoder(config.latent_dim, config.decoder_hidden, image_shape, config.activation, rngs=rngs)
    return enc, dec


def _conv_activations(config, image_size: int) -> int:
    # stride-2 layers: layer i's output has image_size / 4^(i+1) positions, both passes
    return 2 * sum(image_size // 4 ** (i + 1) * c for i, c in enumerate(config.conv_channels))


@register("conv", fields={"conv_channels": None, "conv_hidden": None, "activation": None},
          cpu_sequential=True, activation_floats=_conv_activations)
def conv(config, image_shape, rngs):
    """Stride-2 convolutions of ``conv_channels`` and a dense layer of ``conv_hidden`` (the
    β-VAE paper's architecture with its settings); the decoder mirrors it."""
    enc = networks.ConvEncoder(image_shape, config.conv_channels, config.conv_hidden, config.activation, rngs=rngs)
    dec = networks.ConvDecoder(config.latent_dim, config.conv_channels, config.conv_hidden, image_shape,
                               config.activation, rngs=rngs)
    return enc, dec

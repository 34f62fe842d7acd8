"""The VAE: encoder → posterior q(z|x), prior p(z), decoder → likelihood p(x|z)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vaekl.models import architectures, posteriors
from vaekl.models.gaussian import Gaussian, Mixture, standard_normal
from vaekl.models.likelihoods import Likelihood
from vaekl.models.priors import Prior

class VAE(nnx.Module):
    """A VAE assembled from parts; all methods are pure given the parameters.

    Attributes:
      encoder: images [..., H, W, C] → features.
      head: features → the posterior q(z|x).
      decoder: latents [..., k] → per-pixel likelihood parameters [..., H, W, C].
      prior: p(z); ``prior()`` is a Gaussian or None for N(0, I).
      likelihood: p(x|z).
    """

    def __init__(self, encoder: nnx.Module, head: posteriors.GaussianHead, decoder: nnx.Module,
                 prior: Prior, likelihood: Likelihood, latent_dim: int):
        self.encoder, self.head, self.decoder = encoder, head, decoder
        self.prior, self.likelihood = prior, likelihood
        self.latent_dim = latent_dim

    def encode(self, x: jax.Array) -> Gaussian:
        """q(z|x) for images x [..., H, W, C] in [0, 1]."""
        return self.head(self.encoder(x))

    def prior_distribution(self) -> Gaussian | Mixture | None:
        """p(z): a Gaussian, a Mixture (mog, vamp), or None for N(0, I)."""
        return self.prior(self.encode) if self.prior.kind == "vamp" else self.prior()

    def decode(self, z: jax.Array) -> jax.Array:
        """Decoder outputs (logits or means) [..., H, W, C] for latents z [..., k]."""
        return self.decoder(z)

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        """E[x|z] for ``num`` draws z ~ p(z), [num, H, W, C]."""
        p = self.prior_distribution()
        if p is None:
            z = standard_normal(key, (num, self.latent_dim))
        else:
            z = p.sample(key, num)
        return self.likelihood.mean(self.decode(z))

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """E[x|z] at the posterior mean z = E_q[z|x], [..., H, W, C]."""
        return self.likelihood.mean(self.decode(self.encode(x).mean))


def make_vae(config: ml_collections.ConfigDict, image_shape: Sequence[int], key: jax.Array) -> VAE:
    """Builds the VAE that ``config`` describes for images of ``image_shape`` (H, W, C): the
    encoder and decoder of architecture ``config.model`` (:mod:`vaekl.models.architectures`)."""
    rngs = nnx.Rngs(params=key)
    enc, dec = architectures.get(config.model).build(config, tuple(image_shape), rngs)
    head = posteriors.GaussianHead(config.posterior, enc.features, config.latent_dim, rngs=rngs)
    prior = Prior(config.prior, config.latent_dim, config.get("prior_components", 1), image_shape,
                  jax.random.fold_in(key, 7))
    return VAE(enc, head, dec, prior,
               Likelihood(config.likelihood, config.likelihood_sigma), config.latent_dim)


def set_output_bias(model: VAE, bias: jax.Array) -> None:
    """Sets the decoder's last-layer bias, e.g. to the logit of the training mean (Burda et al.)."""
    last = model.decoder.mlp.layers[-1] if hasattr(model.decoder, "mlp") else None
    if last is None:
        raise ValueError("set_output_bias supports MLP decoders only")
    last.bias[...] = jnp.reshape(bias, last.bias.shape)

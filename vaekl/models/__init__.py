"""Flax (nnx) VAE building blocks: networks, Gaussian posteriors and priors, likelihoods."""

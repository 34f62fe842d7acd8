"""MNIST (28×28) with the convolutional encoder/decoder pair (32, 64 channels)."""

from experiments.configs import mnist_mlp


def get_config():
    c = mnist_mlp.get_config()
    c.model = "conv"
    c.conv_channels = (32, 64)
    c.conv_hidden = 256
    c.activation = "relu"
    c.latent_dim = 16
    return c

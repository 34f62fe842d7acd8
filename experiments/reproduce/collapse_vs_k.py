r"""Posterior collapse against the latent dimension k at β = 1, on MNIST and Fashion-MNIST.

    python -m launch.sweep --config=experiments/reproduce/collapse_vs_k.py \
        --backend=vmap --workdir=runs/collapse_mnist
    python -m launch.sweep --config=experiments/reproduce/collapse_vs_k.py \
        --config.dataset=idx --config.data_dir=/usr/share/datasets/fashion-mnist \
        --backend=vmap --workdir=runs/collapse_fashion

Fashion-MNIST comes from Debian's package dataset-fashion-mnist (IDX files). Same model as
the rate–distortion sweep; k from 2 to 128 in one program (masked latent dimensions).
"""

from experiments.reproduce import mnist_rate_distortion


def get_config():
    return mnist_rate_distortion.get_config()


def get_sweep():
    return "latent_dim=2,4,8,16,32,64,128"

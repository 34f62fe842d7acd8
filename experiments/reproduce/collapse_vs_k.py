r"""Posterior collapse against the latent dimension k at β = 1, on MNIST and Fashion-MNIST.

    python -m launch.sweep --config=experiments/reproduce/collapse_vs_k.py \
        --backend=vmap --workdir=runs/collapse_mnist
    python -m launch.sweep --config=experiments/reproduce/collapse_vs_k.py \
        --config.dataset=idx --config.data_dir=/usr/share/datasets/fashion-mnist \
        --backend=vmap --workdir=runs/collapse_fashion

Fashion-MNIST comes from Debian's package dataset-fashion-mnist (IDX files). Same model as
the rate–distortion sweep, trained 8,000 steps (evaluated every 2,000, so that the summary can
show whether the counts still move between the last two evaluations); k from 8 to 128 and two
seeds in one program (masked latent dimensions: every run costs as much as k = 128).
"""

from experiments.reproduce import mnist_rate_distortion


def get_config():
    c = mnist_rate_distortion.get_config()
    c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 8000, 2000, 1000, 4000
    return c


def get_sweep():
    return "latent_dim=8,16,32,64,128 seed=0,1"

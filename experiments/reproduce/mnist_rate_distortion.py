r"""Rate–distortion under β (Alemi et al. 2018, "Fixing a Broken ELBO"): a β sweep on MNIST.

    python -m launch.sweep --config=experiments/reproduce/mnist_rate_distortion.py \
        --backend=vmap --workdir=runs/rate_distortion
    python -m experiments.reproduce.summarize --workdir=runs/rate_distortion --kind=rate_distortion

The Flax example's MLP (784-500-k relu, k = 32), dynamically binarized MNIST (the 24,345-image
subset from $VAEKL_MNIST_NPZ or --config.data_dir=PATH; ``--config.dataset=mnist --config.data_dir=DIR`` for
the full set), one program for the whole β grid and two seeds.
"""

from experiments.reproduce import paths
from vaekl import config as config_lib



def get_config():
    c = config_lib.defaults()
    c.dataset, c.data_dir, c.binarization = "npz", paths.mnist_npz(), "dynamic"  # or --config.data_dir
    c.model, c.encoder_hidden, c.decoder_hidden, c.activation = "mlp", (500,), (500,), "relu"
    c.latent_dim, c.likelihood, c.output_bias_from_data = 32, "bernoulli", True
    c.batch_size, c.learning_rate = 100, 1e-3
    c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 8000, 1000, 1000, 4000
    # Evaluation batches of 250: the β-TCVAE split of each holds a [B, B, k] table per run.
    c.eval_batch_size, c.num_eval_train = 250, 5000
    return c


def get_sweep():
    return "beta=0.1,0.25,0.5,1,2,4,8 seed=0,1"

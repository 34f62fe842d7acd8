r"""dSprites (rendered on the device, 64×64) with Locatello et al.'s convolutional VAE, sized for
a CPU demo: β-TCVAE, 1,000 steps (the study trains 300,000), one evaluation at the end.

    python -m experiments.train --config=experiments/configs/dsprites_conv.py --workdir=runs/dsprites
    python -m launch.sweep --config=experiments/configs/dsprites_conv.py --max_group=1 \
        --workdir=runs/dsprites_sweep          # get_sweep(): β = 1 (a plain VAE's KL) and 4
    python -m experiments.evaluate --workdir=runs/dsprites_sweep --num_samples=2 --num_draws=2 \
        --metric_options='{"mig": {"num_train": 2000}, "dci": {"num_train": 2000, "num_test": 1000}}'

The architecture, optimizer and batch are those of experiments/reproduce/locatello_dsprites.py
(whose CPU-sized study measured ~244 s per model per 1,000 steps on 2 CPU cores); on the CPU,
``--max_group=1`` trains runs as separate programs (vmapped convolutions cost more per run there).
At 1,000 steps no model disentangles yet: this shows the pipeline, not the paper's scores.
"""

from vaekl import config as config_lib


def get_config():
    c = config_lib.defaults()
    c.dataset = "dsprites"
    c.binarization = "none"  # the images are already binary
    c.model = "conv"
    c.conv_channels = (32, 32, 64, 64)
    c.conv_hidden = 256
    c.activation = "relu"
    c.likelihood = "bernoulli"
    c.latent_dim = 10
    c.batch_size = 64
    c.learning_rate = 1e-4
    c.regularizer = "tcvae"
    c.beta = 4.0
    c.num_steps = 1000
    c.eval_every = 1000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_batch_size = 500
    c.num_eval_train = 2000
    c.num_images = 16
    return c


def get_sweep():
    """β-TCVAE's TC weight: 1 (the KL of a plain VAE) and 4, two seeds."""
    return "beta=1,4 seed=0,1"

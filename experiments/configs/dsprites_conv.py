r"""dSprites (rendered on the device, 64×64) with Locatello et al.'s convolutional VAE, sized for
a CPU demo: β-TCVAE (minibatch-weighted TC, as the study), 1,000 steps (the study trains
300,000), one evaluation at the end.

    python -m experiments.train --config=experiments/configs/dsprites_conv.py --workdir=runs/dsprites
    python -m launch.sweep --config=experiments/configs/dsprites_conv.py \
        --workdir=runs/dsprites_sweep          # get_sweep(): β = 1 (a plain VAE's KL) and 4
    python -m experiments.evaluate --workdir=runs/dsprites_sweep --num_samples=2 --num_draws=2 \
        --metric_options='{"mig": {"num_train": 2000}, "dci": {"num_train": 2000, "num_test": 1000}}'

Model, optimizer and batch are experiments/reproduce/locatello_dsprites.py's (this config
starts from it). On the CPU a sweep's conv runs share one program, computed member after
member (vaekl.train.member_mode). At 1,000 steps no model disentangles yet: this shows the
pipeline, not the paper's scores.
"""

from experiments.reproduce import locatello_dsprites


def get_config():
    c = locatello_dsprites.get_config("beta_tc_vae")
    c.beta = 4.0
    c.num_steps = 1000
    c.eval_every = 1000
    c.log_every = 50
    c.checkpoint_every = 1000
    return c


def get_sweep():
    """β-TCVAE's TC weight: 1 (the KL of a plain VAE) and 4, two seeds."""
    return "beta=1,4 seed=0,1"

"""The embedded default: an MLP VAE on scikit-learn's 8×8 digits (no download needed).

    python -m experiments.train --config=experiments/configs/digits_mlp.py \
        --config.beta=4 --config.latent_dim=16 --workdir=runs/x
"""

from vaekl import config as config_lib


def get_config():
    c = config_lib.defaults()
    c.dataset = "digits"
    c.binarization = "dynamic"
    c.model = "mlp"
    c.encoder_hidden = (128, 128)
    c.decoder_hidden = (128, 128)
    c.activation = "tanh"
    c.latent_dim = 8
    c.beta = 1.0
    c.batch_size = 100
    c.learning_rate = 1e-3
    c.num_steps = 3000
    c.eval_every = 500
    c.log_every = 250
    c.checkpoint_every = 500
    c.eval_batch_size = 512
    c.num_eval_train = 1437
    return c


def get_sweep():
    """The demo grid (`make demo`): β × k × seed, trained as one vmapped program."""
    return "beta=0.25,1,4 latent_dim=2,8,16 seed=0,1"

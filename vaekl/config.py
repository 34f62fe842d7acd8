"""The experiment config: every field with its default, and validation with clear errors.

Experiment configs (``experiments/configs/*.py``) start from :func:`defaults` and override
what they need; every field can be overridden from the command line
(``--config.beta=4``).
"""

from __future__ import annotations

import ml_collections

from vaekl.models.likelihoods import LIKELIHOODS
from vaekl.models.priors import PRIORS
from vaekl.models.vae import MODELS
from vaekl.models.networks import ACTIVATIONS

BINARIZATIONS = ("none", "static", "dynamic")
BETA_SCHEDULES = ("constant", "linear", "cyclical")
LR_SCHEDULES = ("constant", "cosine", "iwae")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "digits"          # digits | idx | npz | any TFDS name (mnist, fashion_mnist, ...)
    c.data_dir = ""               # TFDS data_dir, IDX directory or .npz path
    c.test_fraction = 0.2         # held-out fraction for sources without a test split
    c.data_seed = 0               # seed of that held-out split (fixed across training seeds)
    c.binarization = "dynamic"    # none | static | dynamic (resampled every step)
    # Model.
    c.model = "mlp"               # mlp | conv
    c.encoder_hidden = (200, 200)
    c.decoder_hidden = (200, 200)
    c.activation = "tanh"
    c.conv_channels = (32, 64)
    c.conv_hidden = 256
    c.posterior = "diag"          # diag | full
    c.prior = "std_normal"        # std_normal | diag | full
    c.likelihood = "bernoulli"    # bernoulli | gaussian | gaussian_learned
    c.likelihood_sigma = 1.0      # σ of the Gaussian likelihood (its start when learned)
    c.latent_dim = 8
    c.output_bias_from_data = False  # start the decoder output bias at logit(mean image)
    # Objective (nats): recon + β·w(t)·KL, with optional free bits or capacity.
    c.beta = 1.0
    c.beta_schedule = "constant"  # constant | linear | cyclical
    c.beta_warmup_steps = 1000    # linear: steps from w = 0 to 1
    c.beta_cycle_steps = 1000     # cyclical: period
    c.beta_cycle_ramp = 0.5       # cyclical: fraction of the period spent ramping 0 → 1
    c.free_bits = 0.0             # λ, nats per latent dimension (0 disables)
    c.capacity_max = 0.0          # C_max, nats (0 disables capacity control)
    c.capacity_steps = 10000      # steps over which C grows linearly from 0 to C_max
    # Optimization.
    c.batch_size = 100
    c.learning_rate = 1e-3
    c.lr_schedule = "constant"    # constant | cosine | iwae (Burda et al.'s 3^i stages)
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.num_steps = 2000
    c.seed = 0
    # Evaluation, logging and checkpoints.
    c.eval_every = 500
    c.log_every = 100
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.eval_batch_size = 500
    c.num_eval_train = 2000       # training examples used for the 'train' evaluation rows
    c.active_units_threshold = 0.01
    c.num_images = 64             # reconstructions and samples in the final PNG grids
    return c


def _choice(config, field, choices):
    if config[field] not in choices:
        raise ValueError(f"config.{field}={config[field]!r} is not one of {tuple(choices)}")


def _at_least(config, field, low, integer=False):
    value = config[field]
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"config.{field}={value!r} must be an integer")
    if not value >= low:  # also rejects NaN
        raise ValueError(f"config.{field}={value!r} must be >= {low}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field; dataset existence is checked on load."""
    unknown = set(config.keys()) - set(defaults().keys())
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    for field, choices in [("model", MODELS), ("posterior", ("diag", "full")), ("prior", PRIORS),
                           ("likelihood", LIKELIHOODS), ("binarization", BINARIZATIONS),
                           ("beta_schedule", BETA_SCHEDULES), ("lr_schedule", LR_SCHEDULES),
                           ("activation", tuple(ACTIVATIONS))]:
        _choice(config, field, choices)
    if not isinstance(config.dataset, str) or not config.dataset:
        raise ValueError(f"config.dataset={config.dataset!r} must be a dataset name")
    for field in ("latent_dim", "batch_size", "num_steps", "eval_every", "log_every",
                  "checkpoint_every", "keep_checkpoints", "eval_batch_size", "num_eval_train",
                  "beta_warmup_steps", "beta_cycle_steps", "capacity_steps"):
        _at_least(config, field, 1, integer=True)
    _at_least(config, "seed", 0, integer=True)
    _at_least(config, "data_seed", 0, integer=True)
    _at_least(config, "num_images", 0, integer=True)
    for field in ("beta", "free_bits", "capacity_max", "active_units_threshold"):
        _at_least(config, field, 0.0)
    for field in ("learning_rate", "likelihood_sigma", "adam_eps"):
        if not config[field] > 0:
            raise ValueError(f"config.{field}={config[field]!r} must be > 0")
    for field in ("adam_b1", "adam_b2", "beta_cycle_ramp", "test_fraction"):
        if not 0 <= config[field] < 1 or (field == "beta_cycle_ramp" and config[field] == 0):
            raise ValueError(f"config.{field}={config[field]!r} must be in (0, 1)"
                             if field == "beta_cycle_ramp" else
                             f"config.{field}={config[field]!r} must be in [0, 1)")
    if config.free_bits > 0 and config.capacity_max > 0:
        raise ValueError("config.free_bits and config.capacity_max are alternatives; set one to 0")
    if config.model == "mlp" and any(h < 1 for h in (*config.encoder_hidden, *config.decoder_hidden)):
        raise ValueError(f"hidden sizes must be >= 1: encoder_hidden={config.encoder_hidden}, "
                         f"decoder_hidden={config.decoder_hidden}")

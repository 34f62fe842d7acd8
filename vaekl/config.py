"""The experiment config: every field with its default, and validation with clear errors.

Experiment configs (``experiments/configs/*.py``) start from :func:`defaults` and override
what they need; every field can be overridden from the command line
(``--config.beta=4``).
"""

from __future__ import annotations

import math

import ml_collections

from vaekl import data, disentanglement, kl_estimators, regularizers, user_modules
from vaekl.models.likelihoods import LIKELIHOODS
from vaekl.models.priors import MIXTURES as MIXTURE_PRIORS
from vaekl.models.priors import PRIORS
from vaekl.models import architectures
from vaekl.models.networks import ACTIVATIONS

BINARIZATIONS = ("none", "threshold", "dynamic", "fixed_stochastic")
LR_SCHEDULES = ("constant", "cosine", "iwae")
OBJECTIVES = ("elbo", "iwae")


def defaults(imports: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Every field at its default. ``imports``: user modules (vaekl.user_modules) imported
    first, so that the fields they declare are there, and recorded in ``imports``."""
    imports = user_modules.import_all(imports)
    c = ml_collections.ConfigDict()
    c.imports = imports           # user modules this run needs (regularizers, metrics, datasets
    #                               defined outside vaekl), imported by every entry point
    # Data.
    c.dataset = "digits"          # digits | idx | npz | any TFDS name (mnist, fashion_mnist, ...)
    c.data_dir = ""               # TFDS data_dir, IDX directory or .npz path
    c.test_fraction = 0.2         # held-out fraction for sources without a test split
    c.data_seed = 0               # seed of that held-out split (fixed across training seeds)
    c.binarization = "dynamic"    # none | threshold (x > ½) | dynamic (resampled every step) |
    #                               fixed_stochastic (one draw, kept: "static MNIST"); vaekl.data
    c.validation_size = 0         # last training images held out as split "valid"; the best
    #                               checkpoint is chosen on it (none is ranked when 0)
    # Model.
    c.model = "mlp"               # mlp | conv | any registered architecture (vaekl.models.architectures)
    c.encoder_hidden = (200, 200)
    c.decoder_hidden = (200, 200)
    c.activation = "tanh"
    c.conv_channels = (32, 64)
    c.conv_hidden = 256
    c.posterior = "diag"          # diag | full
    c.prior = "std_normal"        # std_normal | diag | full | mog | vamp (mixtures: kl_estimator mc/stl)
    c.prior_components = 1        # C, components of a mog or vamp prior (pseudo-inputs for vamp)
    c.likelihood = "bernoulli"    # bernoulli | gaussian | gaussian_learned
    c.likelihood_sigma = 1.0      # σ of the Gaussian likelihood (its start when learned)
    c.latent_dim = 8
    c.output_bias_from_data = False  # start the decoder output bias at logit(mean image)
    # Objective (nats): recon + the regularizer's penalty (vaekl.regularizers); its fields
    # (β, schedules, strengths) are declared in vaekl.regularizers.FIELDS and added below.
    c.regularizer = "kl"          # kl | free_bits | capacity | tcvae | dip_i | dip_ii | mmd | factor
    c.kl_estimator = "analytic"   # the KL the penalty uses: analytic (closed form) | mc (one-sample
    #                               log q − log p) | stl (mc, q's parameters stopped in log q)
    c.objective = "elbo"          # elbo (recon + penalty) | iwae (Burda et al.'s K-sample bound)
    c.iwae_k = 1                  # K, importance samples of objective=iwae
    # Optimization.
    c.batch_size = 100
    c.learning_rate = 1e-3
    c.lr_schedule = "constant"    # constant | cosine | iwae (Burda et al.'s 3^i stages)
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.num_steps = 2000
    c.steps_per_call = 0          # steps per compiled call, unrolled (0: automatic, see train.steps_per_call)
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
    # Disentanglement metrics along training (datasets with ground-truth factors; vaekl.trajectory):
    c.metric_every = 0            # steps between rows of disentanglement.jsonl (0: off)
    c.metric_options = ""         # JSON {metric: {argument: value}} over disentanglement_lib's sizes
    c.metric_names = ("mig", "factor_vae_score", "dci")  # the metrics along training (the report draws these)
    for name, field in regularizers.FIELDS.items():
        c[name] = field.default
    for arch in architectures.REGISTRY.values():  # fields a user architecture adds
        for name, default in arch.fields.items():
            if default is not None and name not in c:
                c[name] = default
    return c


MAX_SEED = 2**32 - 1  # jax.random.key takes a uint32 seed; larger seeds would wrap around


def _choice(config, field, choices):
    if config[field] not in choices:
        raise ValueError(f"config.{field}={config[field]!r} is not one of {tuple(choices)}")


def _number(config, field, integer=False) -> float:
    value = config[field]
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"config.{field}={value!r} must be an integer")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.{field}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"config.{field}={value!r} must be finite")
    return value


def _at_least(config, field, low, integer=False, high=None):
    value = _number(config, field, integer)
    if not value >= low or (high is not None and not value <= high):
        raise ValueError(f"config.{field}={value!r} must be >= {low}" +
                         (f" and <= {high}" if high is not None else ""))


def _positive_ints(config, field, allow_empty=False):
    value = config[field]
    if (not isinstance(value, tuple) or (not value and not allow_empty)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"config.{field}={value!r} must be a tuple of integers >= 1")


def _regularizer_field(config, name: str, f: regularizers.Field) -> None:
    value = config[name]
    if f.choices is not None:
        _choice(config, name, f.choices)
    elif isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config.{name}={value!r} must be True or False")
    else:
        value = _number(config, name, integer=isinstance(f.default, int))
        if f.low is not None and not (value > f.low if f.low_open else value >= f.low):
            raise ValueError(f"config.{name}={value!r} must be {'>' if f.low_open else '>='} {f.low}")
        if f.high is not None and not value <= f.high:
            raise ValueError(f"config.{name}={value!r} must be <= {f.high}")


def _objective(config: ml_collections.ConfigDict) -> None:
    """objective=iwae is the bound itself: no regularizer or β, and K only with it."""
    if config.objective == "elbo":
        if config.iwae_k != 1:
            raise ValueError(f"config.iwae_k={config.iwae_k!r} has no effect with objective='elbo'; "
                             "set objective='iwae'")
        return
    if config.regularizer != "kl" or config.beta != 1 or config.beta_schedule != "constant":
        raise ValueError(f"config.objective='iwae' is the K-sample bound itself: it needs "
                         f"regularizer='kl', beta=1, beta_schedule='constant', not "
                         f"{config.regularizer!r}, {config.beta!r}, {config.beta_schedule!r}")


def _mixture_prior(config: ml_collections.ConfigDict) -> None:
    """mog and vamp have no closed-form KL and no per-dimension KL."""
    _at_least(config, "prior_components", 1, integer=True)
    if config.prior not in MIXTURE_PRIORS:
        if config.prior_components != 1:
            raise ValueError(f"config.prior_components={config.prior_components!r} has no effect with "
                             f"prior={config.prior!r}; it is read by prior 'mog' or 'vamp'")
        return
    if config.kl_estimator == "analytic":
        raise ValueError(f"config.prior={config.prior!r} has no closed-form KL: set kl_estimator='mc' "
                         "or 'stl', not 'analytic'")
    if config.regularizer in ("free_bits", "tcvae", "mmd"):
        raise ValueError(f"config.regularizer={config.regularizer!r} needs a per-dimension or "
                         f"factorized prior, not prior={config.prior!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field; dataset existence is checked on load.
    The user modules in ``config.imports`` are imported first (their fields and entries count)."""
    imports = config.get("imports", ())
    if not isinstance(imports, tuple) or not all(isinstance(m, str) and m for m in imports):
        raise ValueError(f"config.imports={imports!r} must be a tuple of module names")
    user_modules.import_all(imports)
    known = defaults()
    unknown = set(config.keys()) - set(known.keys())
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    if config.binarization == "static":
        raise ValueError("config.binarization='static' is ambiguous: use 'threshold' (x > ½) or "
                         "'fixed_stochastic' (one fixed Bernoulli draw, the literature's static MNIST)")
    for field, choices in [("model", tuple(architectures.REGISTRY)), ("posterior", ("diag", "full")), ("prior", PRIORS),
                           ("likelihood", LIKELIHOODS), ("binarization", BINARIZATIONS),
                           ("lr_schedule", LR_SCHEDULES), ("activation", tuple(ACTIVATIONS)),
                           ("regularizer", tuple(regularizers.REGISTRY)),
                           ("kl_estimator", kl_estimators.ESTIMATORS), ("objective", OBJECTIVES)]:
        _choice(config, field, choices)
    if not isinstance(config.dataset, str) or not config.dataset:
        raise ValueError(f"config.dataset={config.dataset!r} must be a dataset name")
    if config.data_dir and getattr(data.get_source(config.dataset), "files", "") == "none":  # as unread regularizer fields are
        raise ValueError(f"config.data_dir={config.data_dir!r} has no effect with dataset={config.dataset!r}, "
                         f"which reads no files; drop --config.data_dir, or name the dataset it holds "
                         f"(--config.dataset=npz, idx, dsprites_npz or a TFDS name)")
    for field in ("latent_dim", "batch_size", "num_steps", "eval_every", "log_every",
                  "checkpoint_every", "keep_checkpoints", "eval_batch_size", "num_eval_train",
                  "conv_hidden"):
        _at_least(config, field, 1, integer=True)
    _at_least(config, "seed", 0, integer=True, high=MAX_SEED)
    _at_least(config, "data_seed", 0, integer=True, high=MAX_SEED)
    _at_least(config, "num_images", 0, integer=True)
    _at_least(config, "validation_size", 0, integer=True)
    _at_least(config, "steps_per_call", 0, integer=True)
    _at_least(config, "metric_every", 0, integer=True)
    if not isinstance(config.metric_options, str):
        raise ValueError(f"config.metric_options={config.metric_options!r} must be a JSON string")
    unknown = [m for m in config.metric_names if m not in disentanglement.representation_metrics()]
    if unknown or not config.metric_names:
        raise ValueError(f"config.metric_names={tuple(config.metric_names)!r}: choose one or more of "
                         f"{disentanglement.representation_metrics()}")
    _at_least(config, "active_units_threshold", 0.0)
    _at_least(config, "iwae_k", 1, integer=True)
    _objective(config)
    for field in ("learning_rate", "likelihood_sigma", "adam_eps"):
        if not _number(config, field) > 0:
            raise ValueError(f"config.{field}={config[field]!r} must be > 0")
    for field in ("adam_b1", "adam_b2", "test_fraction"):
        if not 0 <= _number(config, field) < 1:
            raise ValueError(f"config.{field}={config[field]!r} must be in [0, 1)")
    for name, f in regularizers.FIELDS.items():
        _regularizer_field(config, name, f)
    _positive_ints(config, "encoder_hidden", allow_empty=True)
    _positive_ints(config, "decoder_hidden", allow_empty=True)
    _positive_ints(config, "conv_channels")
    reg = regularizers.REGISTRY[config.regularizer]
    for name, f in regularizers.FIELDS.items():
        if name not in reg.fields and config[name] != f.default:
            readers = [r.name for r in regularizers.REGISTRY.values() if name in r.fields]
            raise ValueError(f"config.{name}={config[name]!r} has no effect with "
                             f"regularizer={config.regularizer!r}; it is read by regularizer "
                             f"{' or '.join(map(repr, readers))}")
    if config.posterior not in reg.posteriors:
        raise ValueError(f"config.regularizer={config.regularizer!r} needs posterior in "
                         f"{reg.posteriors}, not {config.posterior!r}")
    if config.regularizer == "mmd" and config.prior != "std_normal":
        raise ValueError("config.regularizer='mmd' draws from N(0, I): set prior=std_normal")
    _mixture_prior(config)
    if config.regularizer in ("tcvae",) and config.prior == "full":
        raise ValueError("config.regularizer='tcvae' needs a factorized prior (std_normal or diag)")

r"""Locatello et al. (2019), "Challenging Common Assumptions in the Unsupervised Learning of
Disentangled Representations": disentanglement_lib's ``unsupervised_study_v1`` on dSprites.

One config per method (the argument after the colon); its ``get_sweep`` is the published grid,
6 strengths × 50 seeds, so one launcher command per method runs the study at full scale:

    python -m launch.sweep --config=experiments/reproduce/locatello_dsprites.py:beta_vae \
        --workdir=runs/locatello/beta_vae                       # + --backend=slurm on a cluster
    python -m experiments.evaluate --workdir=runs/locatello/beta_vae --num_samples=100

and a reduction for a CPU (3 strengths spanning the range, 2 seeds, fewer steps):

    python -m launch.sweep --config=experiments/reproduce/locatello_dsprites.py:factor_vae \
        --config.num_steps=1000 --sweep='factor_gamma=10,30,100 seed=0,1' --workdir=...

Methods and their published strengths (disentanglement_lib's model configs):
  beta_vae      regularizer=kl        β ∈ {1, 2, 4, 6, 8, 16}
  annealed_vae  regularizer=capacity  C_max ∈ {5, 10, 25, 50, 75, 100}, γ = 1000, C reached at 100,000 steps
  factor_vae    regularizer=factor    γ ∈ {10, 20, 30, 40, 50, 100} (discriminator Adam 1e-4, β1 0.5, β2 0.9)
  dip_vae_i     regularizer=dip_i     λ_od ∈ {1, 2, 5, 10, 20, 50}, λ_d = 10·λ_od
  dip_vae_ii    regularizer=dip_ii    λ_od ∈ {1, 2, 5, 10, 20, 50}, λ_d = λ_od
  beta_tc_vae   regularizer=tcvae     β ∈ {1, 2, 4, 6, 8, 10}, α = γ = 1, minibatch-weighted sampling

Shared settings, as disentanglement_lib's: 10 latent dimensions, batch 64, Adam (lr 1e-4,
β1 0.9, β2 0.999, ε 1e-8), Bernoulli likelihood on the binary images, the β-VAE paper's
conv encoder (4 × [4×4 stride-2 conv: 32, 32, 64, 64], dense 256, ReLU) and its mirror-image
deconv decoder (dense 256, dense 4·4·64, 4 × 4×4 stride-2 transposed conv: 64, 32, 32, 1),
300,000 steps, representation = the posterior mean.

Where ours differs, and why:
  * data: dSprites rendered on the device from its factors (vaekl.dsprites: dSprites-like, not
    pixel-identical; pass --config.dataset=dsprites_npz --config.data_dir=PATH/dsprites_ndarray_
    co1sh3sc6or40x32y32_64x64.npz to train on the original file);
  * β-TCVAE's TC uses the paper's minibatch-weighted estimate with N = 737,280 (same gradients
    as disentanglement_lib's, whose TC drops the log(N·M) constants);
  * initialisation: Flax's defaults (LeCun-normal kernels) rather than TF1's Glorot-uniform;
  * the evaluation uses 2,000/5,000 fixed rendered images for the ELBO rows; the metrics use
    disentanglement_lib's sample sizes, with DCI's importances from a random forest unless
    --dci_model=gbt (disentanglement_lib's gradient-boosted trees, ~15× slower here).
"""

from __future__ import annotations

import ml_collections

from vaekl import config as config_lib

SEEDS = 50
METHODS: dict[str, tuple[str, str, tuple[float, ...], dict]] = {
    # method: (regularizer, swept field, published values, fixed fields)
    "beta_vae": ("kl", "beta", (1, 2, 4, 6, 8, 16), {}),
    "annealed_vae": ("capacity", "capacity_max", (5, 10, 25, 50, 75, 100),
                     {"capacity_gamma": 1000.0, "capacity_steps": 100_000}),
    "factor_vae": ("factor", "factor_gamma", (10, 20, 30, 40, 50, 100), {}),
    "dip_vae_i": ("dip_i", "dip_lambda_od", (1, 2, 5, 10, 20, 50), {"dip_lambda_d_factor": 10.0}),
    "dip_vae_ii": ("dip_ii", "dip_lambda_od", (1, 2, 5, 10, 20, 50), {"dip_lambda_d_factor": 1.0}),
    "beta_tc_vae": ("tcvae", "beta", (1, 2, 4, 6, 8, 10), {"tc_estimator": "mws"}),
}


def method_of(config: ml_collections.ConfigDict) -> str:
    """The method a config trains (from its regularizer and fixed fields)."""
    for name, (reg, _, _, fixed) in METHODS.items():
        if config.regularizer == reg and all(config[k] == v for k, v in fixed.items()):
            return name
    raise ValueError(f"config.regularizer={config.regularizer!r} is none of {tuple(METHODS)}")


def get_config(method: str = "beta_vae") -> ml_collections.ConfigDict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
    c = config_lib.defaults()
    c.dataset = "dsprites"
    c.binarization = "none"          # the images are already binary
    c.model = "conv"
    c.conv_channels = (32, 32, 64, 64)
    c.conv_hidden = 256
    c.activation = "relu"
    c.posterior = "diag"
    c.prior = "std_normal"
    c.likelihood = "bernoulli"
    c.latent_dim = 10
    c.batch_size = 64
    c.learning_rate = 1e-4
    c.adam_b1, c.adam_b2, c.adam_eps = 0.9, 0.999, 1e-8
    c.num_steps = 300_000
    c.eval_every = 10_000
    c.log_every = 1_000
    c.checkpoint_every = 10_000
    c.eval_batch_size = 500
    c.num_eval_train = 2_000
    c.num_images = 16
    reg, _, _, fixed = METHODS[method]
    c.regularizer = reg
    for k, v in fixed.items():
        c[k] = v
    return c


def get_sweep(config: ml_collections.ConfigDict) -> str:
    """The published grid of the config's method: 6 strengths × 50 seeds."""
    _, field, values, _ = METHODS[method_of(config)]
    return f"{field}={','.join(f'{v:g}' for v in values)} seed={','.join(map(str, range(SEEDS)))}"

r"""Issue 21, row 5: the IWAE objective. VAE (k = 1) vs IWAE k = 5 and k = 50, ≥ 2 seeds.

The architecture and schedule of experiments/reproduce/mnist_kl_estimators.py with
objective=iwae (k = 1 is the VAE with the Monte Carlo KL on the same draw). NLL (K = 5000) and
active units beside Burda et al.'s Table 1 (one stochastic layer: VAE 86.76, IWAE k = 5 85.54,
k = 50 84.78 nats, with 3,280 epochs; the direction and the growth of the active units are
the claims tested here):

    python -m launch.sweep --config=experiments/reproduce/mnist_iwae_objective.py \
        --sweep='iwae_k=1,5,50 seed=0,1' --workdir=runs/iwae_objective
    python -m experiments.evaluate --workdir=runs/iwae_objective --num_samples=5000 --nll_examples=500
    python -m experiments.reproduce.summarize --runs=runs --only=iwae_objective

k = 50 decodes 50 samples per image per step (in chunks of objectives.IWAE_CHUNK): ~1.4 steps/s
for its two seeds on one core here, so the published row is 2,000 steps (8 epochs), evaluated
every 100.
"""

from experiments.reproduce import mnist_kl_estimators


def get_config():
    c = mnist_kl_estimators.get_config()
    c.objective = "iwae"
    c.kl_estimator = "mc"
    c.iwae_k = 5
    c.num_steps = 2000
    c.eval_every = 100
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    return c


def get_sweep():
    return "iwae_k=1,5,50 seed=0,1"

r"""Issue 21, row 4: priors without a closed form. N(0, I) vs MoG vs VampPrior, ≥ 2 seeds.

The architecture and schedule of experiments/reproduce/mnist_kl_estimators.py, every prior
trained with the Monte Carlo KL (kl_estimator=mc, the only one the mixtures allow, so N(0, I)
uses it too); C = 100 components / pseudo-inputs (Tomczak & Welling used 500 on MNIST). NLL
with K = 5000 and active units, beside their Table 2 (one stochastic layer, dynamic MNIST:
standard 88.56 → VampPrior 85.57 nats; their architecture, gated layers and warm-up differ).
Two commands, because prior_components must stay 1 for N(0, I):

    python -m launch.sweep --config=experiments/reproduce/mnist_priors.py \
        --sweep='prior=mog,vamp seed=0,1' --workdir=runs/priors
    python -m launch.sweep --config=experiments/reproduce/mnist_priors.py --config.prior_components=1 \
        --sweep='prior=std_normal seed=0,1' --workdir=runs/priors
    python -m experiments.evaluate --workdir=runs/priors --num_samples=5000 --nll_examples=1000
    python -m experiments.reproduce.summarize --runs=runs --only=priors

For the mixtures the logged kl (and −ELBO) is the one-draw estimate: there is no closed form.
"""

from experiments.reproduce import mnist_kl_estimators


def get_config():
    c = mnist_kl_estimators.get_config()
    c.kl_estimator = "mc"
    c.prior = "vamp"
    c.prior_components = 100
    c.keep_checkpoints = 2
    return c


def get_sweep():
    return "prior=mog,vamp seed=0,1"

r"""Issue 21, row 3: does the KL estimator matter for training? analytic vs mc vs stl × 3 seeds.

The MNIST subset, the IWAE paper's one-layer architecture (784-200-200-50 tanh, Bernoulli,
dynamic binarization, output bias from the data), Adam 1e-3 at batch 100 for 20,000 steps
(82 epochs of the subset; the published row),
the same for every estimator; test −ELBO, importance-weighted NLL (K = 5000), active units, and
the steps each run takes to reach a fixed test −ELBO (the worst run's final one unless
--target is given), mean and spread over seeds:

    python -m launch.sweep --config=experiments/reproduce/mnist_kl_estimators.py \
        --sweep='kl_estimator=analytic,mc,stl seed=0,1,2' --workdir=runs/kl_estimators
    python -m experiments.evaluate --workdir=runs/kl_estimators --num_samples=5000 --nll_examples=1000
    for s in 0 1 2; do python -m experiments.gradient_variance \
        --workdir=runs/kl_estimators/kl_estimator=analytic,seed=$s; done
    python -m experiments.reproduce.summarize --runs=runs --only=kl_estimators,gradient_variance

(the gradient-variance curve over training needs the checkpoints: this config keeps 11;
``closed_vs_mc --row=kl_estimators --row_runs=...`` prints the row alone. eval_batch_size 200:
the sweep planner's memory estimate at 1,000 trains one run per program.)
Data: $VAEKL_MNIST_NPZ or --config.data_dir (see experiments/reproduce/paths.py).
"""

from experiments.reproduce import paths
from vaekl import config as config_lib


def get_config():
    c = config_lib.defaults()
    c.dataset = "npz"
    c.data_dir = paths.mnist_npz()
    c.binarization = "dynamic"
    c.validation_size = 400
    c.model = "mlp"
    c.encoder_hidden = (200, 200)
    c.decoder_hidden = (200, 200)
    c.activation = "tanh"
    c.latent_dim = 50
    c.likelihood = "bernoulli"
    c.output_bias_from_data = True
    c.batch_size = 100
    c.learning_rate = 1e-3
    c.num_steps = 20000
    c.eval_every = 1000
    c.log_every = 500
    c.checkpoint_every = 2000
    c.keep_checkpoints = 11
    c.eval_batch_size = 200
    c.num_eval_train = 2000
    return c


def get_sweep():
    return "kl_estimator=analytic,mc,stl seed=0,1,2"

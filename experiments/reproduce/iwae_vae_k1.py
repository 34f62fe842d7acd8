r"""IWAE Table 1, VAE row, k = 1 (Burda et al. 2016): published test NLL 86.76 nats, 19 active units.

One stochastic layer of 50 units, 784-200-200-50 tanh encoder and the mirror decoder,
Bernoulli likelihood, MNIST dynamically binarized (re-sampled for every minibatch), the
decoder's output bias started at the logit of the training mean. The authors' released
code: batch 20, 3,280 epochs in 8 stages of 3^i epochs (i = 0..7) with the learning rate
1e-3 · 10^(−i/7), Adam with ε = 1e-4 and β1 = 0.99. NLL with K = 5000 importance samples.

    python -m launch.sweep --config=experiments/reproduce/iwae_vae_k1.py --config.num_steps=300000 \
        --sweep='seed=0,1' --max_group=2 --workdir=runs/iwae_vae    # both seeds in one program
    python -m experiments.evaluate --workdir=runs/iwae_vae --num_samples=5000
    python -m experiments.reproduce.summarize --only=iwae

(``--max_group=2``: the planner's memory estimate, which counts evaluation tables of
``eval_batch_size`` = 1,000, would otherwise train the seeds one after the other.)

Data: the .npz from $VAEKL_MNIST_NPZ or --config.data_dir (e.g. shared/data/mnist_partial.npz (the first 24,345 MNIST training images
and the full test set); with the full MNIST prepared for TFDS use
``--config.dataset=mnist --config.data_dir=DIR``. num_steps is 3,280 epochs of the training
set at batch 20 (3,991,020 steps for 24,345 images; 9,840,000 for 60,000): pass
``--config.num_steps`` accordingly, or fewer to shorten the schedule (its stages scale).
"""

from experiments.reproduce import paths
from vaekl import config as config_lib

EPOCHS = 3280


def get_config():
    c = config_lib.defaults()
    c.dataset = "npz"
    c.data_dir = paths.mnist_npz()  # $VAEKL_MNIST_NPZ or --config.data_dir
    c.binarization = "dynamic"  # evaluated on one fixed binarization of the test set
    c.validation_size = 400     # Burda et al. held out 400 training images; "best" is chosen on them
    c.model = "mlp"
    c.encoder_hidden = (200, 200)
    c.decoder_hidden = (200, 200)
    c.activation = "tanh"
    c.latent_dim = 50
    c.likelihood = "bernoulli"
    c.output_bias_from_data = True
    c.batch_size = 20
    c.learning_rate = 1e-3
    c.lr_schedule = "iwae"
    c.adam_b1 = 0.99
    c.adam_b2 = 0.999
    c.adam_eps = 1e-4
    c.num_steps = EPOCHS * 24345 // 20
    c.eval_every = 50000
    c.log_every = 10000
    c.checkpoint_every = 50000
    c.eval_batch_size = 1000
    c.num_eval_train = 10000
    return c

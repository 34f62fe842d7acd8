"""MNIST with the Flax example's MLP (784-500-k relu), dynamically binarized, Bernoulli.

Data: a prepared TFDS ``mnist`` (``--config.data_dir``), an IDX directory
(``--config.dataset=idx``) or an .npz file (``--config.dataset=npz``).
"""

from vaekl import config as config_lib


def get_config():
    c = config_lib.defaults()
    c.dataset = "mnist"
    c.binarization = "dynamic"
    c.model = "mlp"
    c.encoder_hidden = (500,)
    c.decoder_hidden = (500,)
    c.activation = "relu"
    c.latent_dim = 20
    c.batch_size = 128
    c.learning_rate = 1e-3
    c.num_steps = 20000
    c.eval_every = 2000
    c.log_every = 500
    c.checkpoint_every = 2000
    c.eval_batch_size = 1000
    c.num_eval_train = 10000
    return c

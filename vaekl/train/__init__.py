"""Training: pure functions over the split nnx state, many steps per ``jax.jit`` call.

The model is split once into a static graph definition and a pytree of parameters; the
training loop is ``lax.scan`` over a pure step function, with the dataset held on the
device as uint8 and every batch drawn (and binarized) inside the compiled loop. Step t
uses the key ``fold_in(key(seed), t)``, so a run is deterministic given its seed and a
resumed run repeats exactly the steps an uninterrupted one would take.

The pure functions take the per-run values (state, β, latent mask) as arguments, so that
a sweep can ``jax.vmap`` them over many runs in one program.

The package, bottom to top (each module imports only those before it):

  state     TrainState, the optimizers, the per-run values (hyperparameters), create
  step      the pure training step, run_steps (lax.scan) and evaluate
  programs  the jitted programs of a group, in one module-level cache (compile_fns)
  groups    members of a group, padding to the largest k, the group commit (fault_hook)
  loop      train_group / train_and_evaluate: the run loop with logging, checkpoints, resume

The public names below are re-exported so that ``from vaekl import train; train.create(...)``
reads as one API; the test hook ``fault_hook`` lives in :mod:`vaekl.train.groups`.
"""

from vaekl.train import groups, loop, programs, state, step
from vaekl.train.groups import GROUP_COMMIT, Member, pad_like, read_group_commit, slice_like
from vaekl.train.loop import (batch_source, check_extension, check_metrics, dataset_size, prepare,
                              train_and_evaluate, train_group, write_images)
from vaekl.train.programs import COMPILED_CACHE_SIZE, Compiled, clear_compiled, compile_fns
from vaekl.train.state import (OPTIMIZER_PER_RUN, Optimizers, TrainState, create, group_fields, group_key,
                               hyperparameters, learning_rate_schedule, make_optimizer, per_run_fields,
                               stack_hyperparameters, static_settings)
from vaekl.train.step import (EVAL_SPLITS, TRAIN_CURVE_SPLIT, EvalConfig, StepConfig, eval_config, eval_rows, evaluate,
                              member_mode, run_steps, step_binarization, steps_per_call, train_step)

__all__ = [
    "COMPILED_CACHE_SIZE", "Compiled", "EVAL_SPLITS", "EvalConfig", "GROUP_COMMIT", "Member", "OPTIMIZER_PER_RUN",
    "Optimizers", "StepConfig", "TRAIN_CURVE_SPLIT", "TrainState", "batch_source", "check_extension",
    "check_metrics", "clear_compiled", "compile_fns", "create", "dataset_size", "eval_config", "eval_rows", "evaluate",
    "group_fields", "group_key", "groups", "hyperparameters", "learning_rate_schedule", "loop", "make_optimizer",
    "member_mode", "pad_like", "per_run_fields", "prepare", "programs", "read_group_commit", "run_steps",
    "slice_like", "stack_hyperparameters", "state", "static_settings", "step", "step_binarization",
    "steps_per_call", "train_and_evaluate", "train_group", "train_step", "write_images",
]

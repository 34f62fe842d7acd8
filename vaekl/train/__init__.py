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

The names below are re-exported so that ``from vaekl import train; train.create(...)`` reads
as one API; the test hook ``fault_hook`` lives in :mod:`vaekl.train.groups`.
"""

from vaekl.train.state import (OPTIMIZER_PER_RUN, TrainState, Optimizers, learning_rate_schedule, make_optimizer, static_settings, per_run_fields, hyperparameters, stack_hyperparameters, create, group_fields, group_key)
from vaekl.train.step import (StepConfig, train_step, run_steps, steps_per_call, member_mode, step_binarization, EVAL_SPLITS, TRAIN_CURVE_SPLIT, EvalConfig, evaluate, eval_rows)
from vaekl.train.programs import (Compiled, compile_fns, COMPILED_CACHE_SIZE, clear_compiled)
from vaekl.train.groups import (pad_like, slice_like, Member, GROUP_COMMIT, fault, read_group_commit, member_rows, commit_group, drop_uncommitted, restore_start, agree_start)
from vaekl.train.loop import (batch_source, dataset_size, prepare, train_group, check_batch_size, check_metrics, check_extension, placement_of, train_opened, train_and_evaluate, write_images)

__all__ = ["COMPILED_CACHE_SIZE", "Compiled", "EVAL_SPLITS", "EvalConfig", "GROUP_COMMIT", "Member", "OPTIMIZER_PER_RUN", "Optimizers", "StepConfig", "TRAIN_CURVE_SPLIT", "TrainState", "agree_start", "batch_source", "check_batch_size", "check_extension", "check_metrics", "clear_compiled", "commit_group", "compile_fns", "create", "dataset_size", "drop_uncommitted", "eval_rows", "evaluate", "fault", "group_fields", "group_key", "hyperparameters", "learning_rate_schedule", "make_optimizer", "member_mode", "member_rows", "pad_like", "per_run_fields", "placement_of", "prepare", "read_group_commit", "restore_start", "run_steps", "slice_like", "stack_hyperparameters", "static_settings", "step_binarization", "steps_per_call", "train_and_evaluate", "train_group", "train_opened", "train_step", "write_images"]

"""The run loop: a group's runs trained together, logged, evaluated, scored along training
and checkpointed, resuming where they stopped (:func:`train_group`; one run:
:func:`train_and_evaluate`)."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import logging as pylogging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vaekl import checkpoints, data, rundir, sharding, trajectory
from vaekl import metrics as metrics_lib
from vaekl import config as config_lib
from vaekl.train.state import create, group_fields, group_key, stack_hyperparameters
from vaekl.train.step import EVAL_SPLITS, TRAIN_CURVE_SPLIT, steps_per_call
from vaekl.train.programs import compile_fns
from vaekl.train.groups import (GROUP_COMMIT, Member, agree_start, commit_group, fault, member_rows,
                                pad_like, read_group_commit, restore_start, slice_like)

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines


def batch_source(ds: data.Dataset) -> tuple[Any, Callable]:
    """(device arrays, draw) of the training batches: the dataset's own source when it has one
    (e.g. dSprites rendered on the device), else uniform draws from its uint8 training images."""
    if hasattr(ds, "batch_source"):
        return ds.batch_source()
    return ds.train_images, data.sample_batch


def dataset_size(ds: data.Dataset) -> int:
    """N, the training-set size (β-TCVAE's estimators weight by it)."""
    return int(getattr(ds, "train_size", ds.train_images.shape[0]))


def prepare(config: ml_collections.ConfigDict, ds: data.Dataset) -> tuple[data.Dataset, dict[str, np.ndarray]]:
    """(the dataset the training steps draw from, {split: uint8 evaluation images}).

    ``config.validation_size`` > 0 holds out the last training images as split "valid" (not
    trained on; the best checkpoint is chosen on it). The evaluation images are binarized
    here, once and for every run and seed alike, so that evaluation runs with mode "none":
    thresholded under "threshold", one fixed Bernoulli draw (:func:`vaekl.data.binarize_fixed`,
    seed ``data.BINARIZATION_SEEDS[split]``) under "dynamic" and "fixed_stochastic". Under
    "fixed_stochastic" the training images are such a draw too (the "static MNIST"
    construction); under "dynamic" the steps draw anew. Splits: "train" (the first
    ``num_eval_train`` training images), "valid" (if any), "test".
    """
    train, labels = ds.train_images, ds.train_labels
    valid = train[:0]
    if config.validation_size:
        if ds.ground_truth is not None:
            raise ValueError(f"config.validation_size={config.validation_size}: {config.dataset!r} renders its "
                             f"training images; it has no held-out validation split")
        n = train.shape[0] - config.validation_size
        if n < 1:
            raise ValueError(f"config.validation_size={config.validation_size} leaves no training images "
                             f"(dataset {config.dataset!r} has {train.shape[0]})")
        train, labels, valid = train[:n], labels[:n], train[n:]
    mode = config.binarization
    if mode == "threshold":
        fix = lambda a, split: data.binarize_threshold(a)
    elif mode in ("dynamic", "fixed_stochastic"):
        fix = lambda a, split: data.binarize_fixed(a, data.BINARIZATION_SEEDS[split])
    else:
        fix = lambda a, split: a
    if mode == "fixed_stochastic":
        train = fix(train, "train")
        evals = {"train": train[: config.num_eval_train]}
    else:
        evals = {"train": fix(train[: config.num_eval_train], "train")}
    if valid.shape[0]:
        evals["valid"] = fix(valid, "valid")
    evals["test"] = fix(ds.test_images, "test")
    if train is not ds.train_images:
        ds = dataclasses.replace(ds, train_images=train, train_labels=labels)
    return ds, evals


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                dataset: data.Dataset | None = None,
                group: list[str] | None = None) -> list[list[dict] | Exception]:
    """Trains runs that differ only in per-run values (:func:`group_fields`) together, in one
    vmapped program.

    Each run writes its own directory exactly as :func:`train_and_evaluate` does, and
    resumes from its checkpoints. Bad config values and missing datasets fail before any
    directory is written. A run whose loss turns non-finite is stopped (its last good
    checkpoint kept) without stopping the others.

    metrics.jsonl gets evaluation rows (splits 'train' and 'test') every ``eval_every`` steps
    and training-curve rows (split 'train_batch': the means of the steps' batch metrics since
    the previous log) every ``log_every`` steps. With ``metric_every`` > 0 (ground-truth data),
    disentanglement.jsonl gets the disentanglement metrics of step 0, every ``metric_every``
    steps and the last (:mod:`vaekl.trajectory`).

    Args:
      configs, workdirs: the runs.
      dataset: the runs' dataset, if already loaded.
      group: the run names of the whole group, for its commit markers (default: these runs';
        in a multi-process group, every process's).
    Returns:
      For each run, its final evaluation rows, or the exception that stopped it.
    """
    for c in configs:
        config_lib.validate(c)
    if len({group_key(c) for c in configs}) != 1:
        raise ValueError(f"a group's runs may differ only in {group_fields()}")
    config = configs[0]
    ds = dataset or data.for_config(config)
    if ds.train_images.shape[0] == 0 or ds.test_images.shape[0] == 0:
        raise ValueError(f"dataset {config.dataset!r} has {ds.train_images.shape[0]} training and "
                         f"{ds.test_images.shape[0]} test images; both must be > 0")
    ds, eval_images = prepare(config, ds)
    if config.metric_every > 0:
        if ds.ground_truth is None:
            raise ValueError(f"config.metric_every={config.metric_every} needs a dataset with ground-truth "
                             f"factors ({data.ground_truth_sources()}), not {config.dataset!r}")
        trajectory.parse_options(config.metric_options)
    members = [Member(c, w, ds.image_shape, ds.train_images) for c, w in zip(configs, workdirs)]
    for m in members:
        m.group = list(group) if group else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    big = config.copy_and_resolve_references()
    big.unlock()
    big.latent_dim = max(m.k for m in members)

    check_batch_size(config, ds)
    for m in members:  # every check before the first directory is written
        rundir.check_config(m.workdir, m.config.to_dict())
        check_extension(m.workdir, m.config)
        check_metrics(m.workdir)
    try:
        for m in members:  # one writer per run directory (RunLocked names the holder)
            os.makedirs(m.workdir, exist_ok=True)
            m.lock.acquire()
        meta = {"image_shape": list(ds.image_shape), "train_size": dataset_size(ds), **rundir.provenance()}
        for m in members:
            m.open()
            rundir.write_meta(m.workdir, meta)
        return train_opened(members, config, ds, big, eval_images)
    finally:
        for m in members:
            m.abort()
            m.lock.release()


def check_batch_size(config: ml_collections.ConfigDict, ds: data.Dataset) -> None:
    """Refuses a batch larger than the training images the steps draw from (after the
    validation split; the TC estimators need N ≥ M), before anything is written."""
    n = dataset_size(ds)
    if config.batch_size > n:
        held = f" after validation_size={config.validation_size}" if config.validation_size else ""
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} training images of "
                         f"dataset {config.dataset!r}{held}; use --config.batch_size={n} or less")


def check_metrics(workdir: str) -> None:
    """Refuses to resume a run whose metrics.jsonl lost a row for good to a torn last line
    (:func:`vaekl.rundir.check_torn_row`), resuming from its latest checkpoint or its group's
    last committed step, whichever is earlier."""
    start = rundir.latest_checkpoint(workdir)
    marker = read_group_commit(workdir) if start is not None else None
    if marker is not None:
        start = min(start, marker["step"])
    rundir.check_torn_row(workdir, start)


def check_extension(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to change num_steps of a run whose schedules depend on it."""
    path = os.path.join(workdir, rundir.CONFIG)
    if not os.path.exists(path):
        return
    old = rundir.read_config(workdir)
    if old.num_steps == config.num_steps:
        return
    depends = [f"lr_schedule={config.lr_schedule!r}"] * (config.lr_schedule in ("cosine", "iwae"))
    depends += [f"beta_schedule={config.beta_schedule!r}"] * (
        config.regularizer in ("kl", "free_bits") and config.beta_schedule == "cyclical")
    if depends and rundir.latest_checkpoint(workdir) is not None:
        raise ValueError(f"{workdir}: num_steps {old.num_steps} → {config.num_steps} would change the "
                         f"schedule of a started run ({', '.join(depends)} depends on num_steps); "
                         f"train a new run instead")


def placement_of(members: list[Member], config, big) -> sharding.Placement:
    """Where the group runs: the placement its planner set (:func:`vaekl.sharding.use`; its
    ``local_runs`` are ``members``, in order), else all of this process's devices, sharding
    the batch when there are fewer runs than devices. Raises ``big.latent_dim`` to the whole
    group's largest k when the group spans processes."""
    placement = sharding.current() or sharding.plan(len(members), batch_size=config.batch_size)
    if len(placement.local_runs) != len(members):
        raise ValueError(f"the placement gives this process {len(placement.local_runs)} run(s) of the "
                         f"group; it has {len(members)}")
    big.latent_dim = max(big.latent_dim, placement.latent_dim)
    LOG.info("program: %s", placement.describe())
    return placement


def train_opened(members: list[Member], config, ds, big, eval_images: dict[str, np.ndarray]
                  ) -> list[list[dict] | Exception]:
    """The body of :func:`train_group` once every member's directory is open and locked;
    ``eval_images`` as :func:`prepare` gives them."""
    train_np, test_np = ds.train_images, eval_images["test"]
    placement = placement_of(members, config, big)
    graphdef, template, tx = create(big, ds.image_shape, train_np)
    start = agree_start(members, restore_start(members), placement)
    member_states = []
    for m in members:
        if m.failure is not None:  # no usable checkpoint (restore_start): a placeholder, never saved
            member_states.append(pad_like(m.initial, template))
            continue
        state = m.initial if start is None else checkpoints.restore(m.mgr, start, m.initial)
        m.log.truncate(-1 if start is None else start)
        trajectory.truncate(m.workdir, -1 if start is None else start)
        m.restart_tensorboard()
        if start is not None:
            checkpoints.prune(m.mgr, m.config.keep_checkpoints)
        if len(m.group) == 1 and os.path.exists(os.path.join(m.workdir, GROUP_COMMIT)):
            os.remove(os.path.join(m.workdir, GROUP_COMMIT))  # now a run on its own
        member_states.append(pad_like(state, template))
    state = placement.put_runs(jax.tree.map(lambda *a: np.stack(a), *member_states))
    if start is not None:
        LOG.info("resuming %d run(s) from step %d", len(members), start)

    arrays, draw = batch_source(ds)
    fns = compile_fns(config, graphdef, tx, vmapped=True, draw=draw, dataset_size=dataset_size(ds),
                      placement=placement)
    arrays = placement.replicate(arrays)
    evals_on = {split: placement.replicate(images) for split, images in eval_images.items()}
    hp = placement.put_runs(stack_hyperparameters([m.config for m in members]))
    masks = placement.put_runs(np.asarray([np.arange(big.latent_dim) < m.k for m in members], np.float32))
    seeds = [jax.random.key(m.config.seed) for m in members]
    train_keys = placement.put_runs(jnp.stack([jax.random.fold_in(k, 2) for k in seeds]))
    eval_keys = placement.put_runs(jnp.stack([jax.random.fold_in(k, 3) for k in seeds]))
    live = lambda: [(i, m) for i, m in enumerate(members) if m.failure is None]

    def eval_and_log(step: int) -> None:
        evals = {split: fns.evaluate(state, imgs, hp, jnp.int32(step), eval_keys, masks)
                 for split, imgs in evals_on.items()}
        evals = placement.to_host(evals)
        for i, m in live():
            m.log_rows(member_rows(step, evals, i, m.k))

    def save(step: int, evaluated: bool) -> None:
        host = placement.to_host(state)
        for i, m in live():
            own = slice_like(jax.tree.map(lambda a: a[i], host), m.initial)
            checkpoints.save(m.mgr, step, own,
                             m.last_rows["valid"]["neg_elbo"] if evaluated and "valid" in m.last_rows else None)
            fault("member_saved", step, i)
        if len(members[0].group) > 1:
            commit_group([m for _, m in live()], step)

    metric_options = trajectory.parse_options(config.metric_options)

    def disentanglement_along(step: int) -> None:
        """Scores every live member at a due step that has no row yet (before its checkpoint)."""
        todo = [(i, m) for i, m in live() if step not in trajectory.steps(m.workdir)]
        if not trajectory.due(config, step) or not todo:
            return
        host_params = placement.to_host(state.params)
        for i, m in todo:
            params = slice_like(jax.tree.map(lambda a: a[i], host_params), m.initial.params)
            result = trajectory.score(ds, m.graphdef, params, m.config.seed, metric_options,
                                      metrics=tuple(config.metric_names))
            trajectory.record(m.workdir, step, result)
            LOG.info("%s step %d: MIG %.3f  FactorVAE %.3f  DCI-D %.3f (%s, %.0f s)", m.workdir, step,
                         result["scores"].get("mig", float("nan")),
                         result["scores"].get("factor_vae_score.eval_accuracy", float("nan")),
                         result["scores"].get("dci.disentanglement", float("nan")),
                         result["representation"], result["seconds"])

    step = 0 if start is None else start
    if start is None:
        eval_and_log(0)
        disentanglement_along(0)
        save(0, evaluated=True)
    else:
        disentanglement_along(start)  # a row lost to a crash, or metric_every set on resuming
    # The rate counts from the end of the first call, which includes compiling the program.
    warm: dict[str, float] = {}
    start_step = step
    curve: list[dict] = []  # per-chunk step metrics since the last training-curve row
    per_call = steps_per_call(config)

    t_first_call = time.perf_counter()

    def advance(state, n):
        """n steps, in calls of ``per_call`` steps (or one); metrics name → [members, n]."""
        sizes = [n] if not per_call else [per_call] * (n // per_call) + [n % per_call] * bool(n % per_call)
        chunks = []
        for size in sizes:
            state, m = fns.run_steps(state, arrays, hp, train_keys, masks, num_steps=size)
            chunks.append(m)
            if not warm:
                jax.block_until_ready(state)
                warm.update(t=time.perf_counter(), steps=size)
                LOG.info("first call (%d step(s), compiling the program) took %.1f s", size,
                         warm["t"] - t_first_call)
        chunks = placement.to_host(chunks)
        return state, {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}

    for stop in _boundaries(config, step):
        state, metrics = advance(state, stop - step)  # name → [members, steps]
        losses = np.asarray(metrics["loss"])
        for i, m in live():
            if not np.all(np.isfinite(losses[i])):
                bad = step + 1 + int(np.argmin(np.isfinite(losses[i])))
                m.mgr.wait_until_finished()
                m.failure = (f"non-finite loss at step {bad} of {m.workdir}; the last good checkpoint "
                             f"is step {m.mgr.latest_step()}. Lower learning_rate or check the data.")
                LOG.error("%s", m.failure)
        if not placement.any_process(bool(live())):  # processes of one program stop together
            break
        step = stop
        curve.append(metrics)
        if step % config.log_every == 0 or step == config.num_steps:
            steps = {k: np.concatenate([c[k] for c in curve], axis=1) for k in curve[0]}
            for i, m in live():
                m.log_rows([metrics_lib.row(step, TRAIN_CURVE_SPLIT,
                                            {k: np.mean(v[i]) for k, v in steps.items()})])
            curve = []
        rate = rate_since_compiled(step - start_step, warm["steps"], time.perf_counter() - warm["t"],
                                   warm["t"] - t_first_call)
        alive = [i for i, _ in live()]
        LOG.info("step %d/%d  loss %.3f  neg_elbo %.3f  kl %.3f  %.1f steps/s%s  ETA %s",
                 step, config.num_steps, losses[alive].mean(),
                 float(np.mean(np.asarray(metrics["neg_elbo"])[alive])),
                 float(np.mean(np.asarray(metrics["kl"])[alive])), rate,
                 f" × {len(alive)} runs" if len(members) > 1 else "",
                 _format_eta((config.num_steps - step) / rate))
        evaluated = step % config.eval_every == 0 or step == config.num_steps
        if evaluated:
            eval_and_log(step)
        disentanglement_along(step)
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            save(step, evaluated)

    results: list[list[dict] | Exception] = []
    host_params = placement.to_host(state.params)
    for i, m in enumerate(members):
        m.close()
        if m.failure is not None:
            results.append(m.error or FloatingPointError(m.failure))
            continue
        if m.last_rows is None:  # resumed a finished run: read its final rows back
            m.last_rows = {r["split"]: r for r in m.log.read()
                           if r["step"] == config.num_steps and r["split"] in EVAL_SPLITS}
        params = slice_like(jax.tree.map(lambda a: a[i], host_params), m.initial.params)
        write_images(m.config, m.workdir, m.graphdef, params, test_np)
        results.append(list(m.last_rows.values()))
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains one VAE as ``config`` says, writing everything to ``workdir``; resumes if it can.

    Bad config values and missing datasets fail before anything is written.

    Returns:
      The final evaluation rows (train and test).
    Raises:
      FloatingPointError: the loss became non-finite (the last good checkpoint is kept).
    """
    (result,) = train_group([config], [workdir])
    if isinstance(result, Exception):
        raise result
    return result


def _boundaries(config: ml_collections.ConfigDict, start: int) -> list[int]:
    """The steps after ``start`` where the loop stops to log, evaluate, score or checkpoint."""
    every = (config.log_every, config.eval_every, config.checkpoint_every) + (
        (config.metric_every,) if config.metric_every > 0 else ())
    stops = {s for e in every for s in range(e, config.num_steps, e)} | {config.num_steps}
    return sorted(s for s in stops if s > start)


def rate_since_compiled(steps: int, first_call_steps: int, seconds_since: float, first_call_seconds: float) -> float:
    """Steps per second after the first call (which compiles the program); of the first call
    itself while nothing else has run."""
    if steps > first_call_steps and seconds_since > 0:
        return (steps - first_call_steps) / seconds_since
    return first_call_steps / max(first_call_seconds, 1e-9)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def write_images(config, workdir: str, graphdef, params, test_images: np.ndarray) -> None:
    """PNG grids: test images above their reconstructions, and samples from the prior."""
    cols = math.isqrt(min(config.num_images, test_images.shape[0]))
    n = cols * cols
    if n == 0:
        return
    model = nnx.merge(graphdef, params)
    x = data.to_float(jnp.asarray(test_images[:n]))
    recon = np.asarray(model.reconstruct(x))
    pairs = []
    for r in range(0, n, cols):  # alternate rows: originals, then their reconstructions
        pairs += [np.asarray(x[r:r + cols]), recon[r:r + cols]]
    rundir.save_png(os.path.join(workdir, rundir.RECONSTRUCTIONS), np.concatenate(pairs), cols)
    samples = np.asarray(model.sample(jax.random.fold_in(jax.random.key(config.seed), 4), n))
    rundir.save_png(os.path.join(workdir, rundir.SAMPLES), samples, cols)

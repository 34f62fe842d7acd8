"""Issue 23: every message and every number trustworthy.

Fault cases (torn metrics row, garbage config.json, oversized batch, bad .npz files, disk
full while writing eval.json), a new user's mistakes (data_dir with digits, an empty or
misspelt sweep, a clone named ``vaekl`` flooding the log) and numbers shown without their
caveat (MI saturation, negative TC, the two TCs of eval.json), plus the README claims that
disagreed with the code.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import cli, data, estimators, regularizers, rundir, sweep, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_readme_evaluation_selects_by_validation_not_test():
    section = _readme().split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "test negative ELBO" not in section
    assert "validation negative ELBO" in section


def test_readme_explains_the_two_training_set_sizes():
    readme = _readme()
    para = readme[readme.index("24,345"):readme.index("<!-- reproductions:start -->")]
    assert "400" in para and "23,945" in para


def _dl_total_correlation(z, mean, log_var):
    """disentanglement_lib's ``vae.total_correlation`` (numpy transcription)."""
    lp = -0.5 * (np.log(2 * np.pi) + log_var[None] + (z[:, None] - mean[None]) ** 2 / np.exp(log_var[None]))
    lse = lambda a, axis: np.log(np.sum(np.exp(a - a.max(axis, keepdims=True)), axis)) + a.max(axis)
    return float(np.mean(lse(lp.sum(2), 1) - lse(lp, 1).sum(1)))


def test_tcvae_equals_disentanglement_lib_only_with_mws_and_says_so():
    """At α = γ = 1 the tcvae penalty is KL + (β−1)·TC; its TC equals disentanglement_lib's up
    to the constant (k−1)·log(N·M) with ``mws`` only; README and docstring say so."""
    rng = np.random.default_rng(0)
    m, k, n = 32, 4, 1000
    mean = rng.standard_normal((m, k))
    log_var = rng.normal(-1.0, 0.3, (m, k))
    z = mean + np.exp(0.5 * log_var) * rng.standard_normal((m, k))
    want = _dl_total_correlation(z, mean, log_var)
    got = {e: float(jnp.mean(estimators.tc_decomposition(jnp.asarray(z), jnp.asarray(mean), jnp.asarray(log_var),
                                                         n, estimator=e)["total_correlation"]))
           for e in ("mws", "mss")}
    assert got["mws"] - want == pytest.approx((k - 1) * math.log(n * m), abs=1e-3)
    assert abs(got["mss"] - want - (k - 1) * math.log(n * m)) > 0.1
    readme = re.sub(r"\s+", " ", _readme())
    claim = readme[readme.index("- `tcvae`:"):readme.index("- `dip_i`")]
    assert "α = γ = 1 with `tc_estimator=mws`" in claim and "`mss`" in claim
    doc = re.sub(r"\s+", " ", regularizers.tcvae.__doc__)
    assert 'At α = γ = 1 with ``tc_estimator="mws"``' in doc and '"mss"' in doc


# --------------------------------------------------------------------------------------
# Faults: torn rows, garbage config.json, oversized batches, bad .npz files, disk full.


def tiny(**overrides):
    from test_runs import tiny_config  # pylint: disable=g-import-not-at-top
    return tiny_config(**{**dict(num_steps=4, eval_every=2, log_every=2, checkpoint_every=2,
                                 num_eval_train=64), **overrides})


@pytest.fixture(scope="module")
def sweep_dirs(tmp_path_factory):
    """Two finished tiny runs of one vmapped group (β = 1, 2): (configs, run directories)."""
    root = tmp_path_factory.mktemp("sweep")
    configs = [tiny(beta=b) for b in (1.0, 2.0)]
    dirs = [str(root / f"beta={b}") for b in (1.0, 2.0)]
    assert sweep.run_groups([c.to_dict() for c in configs], dirs) == [None, None]
    return configs, dirs


def copies(dirs, tmp_path):
    out = [str(tmp_path / os.path.basename(d)) for d in dirs]
    for d, o in zip(dirs, out):
        shutil.copytree(d, o, ignore=shutil.ignore_patterns(rundir.LOCK))
    return out


def tear_last_line(run_dir) -> int:
    """Cuts metrics.jsonl's last line in half (outside damage); returns that row's step."""
    path = os.path.join(run_dir, rundir.METRICS)
    text = open(path).read()
    head, last = text[:-1].rsplit("\n", 1)
    open(path, "w").write(head + "\n" + last[:len(last) // 2])
    return json.loads(last)["step"]


@pytest.mark.slow
def test_torn_row_the_checkpoint_covers_fails_its_run_alone(sweep_dirs, tmp_path):
    configs, dirs = sweep_dirs
    torn, whole = copies(dirs, tmp_path)
    assert tear_last_line(torn) == 4 == rundir.latest_checkpoint(torn)
    with pytest.raises(ValueError, match=r"metrics.jsonl: its last line is torn, a row of step 4 .* "
                                         r"checkpoint step 4, losing that row for good; restore"):
        train.train_and_evaluate(configs[0], torn)
    message = sweep.check_run(configs[0], torn)  # what the launcher's table shows for the member
    assert message is not None and "its last line is torn" in message and torn in message
    assert sweep.check_run(configs[1], whole) is None
    errors = sweep.run_groups([c.to_dict() for c in configs], [torn, whole])
    assert "its last line is torn" in errors[0] and errors[1] is None
    # A torn row after the checkpoint (a crash before saving) is recomputed: no error.
    rundir.MetricsLog(os.path.join(whole, rundir.METRICS)).truncate(2)
    with open(os.path.join(whole, rundir.METRICS), "a") as f:
        f.write('{"step": 5, "split": "tr')
    rundir.check_torn_row(whole, 4)
    with pytest.raises(ValueError, match="step is unreadable"):
        rundir.check_torn_row(_with_last(whole, '{"st'), 4)


def _with_last(run_dir, fragment):
    rundir.MetricsLog(os.path.join(run_dir, rundir.METRICS)).truncate(2)
    with open(os.path.join(run_dir, rundir.METRICS), "a") as f:
        f.write(fragment)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("garbage", ["", "garbage\n", "[1, 2]", "\xff\xfe"])
def test_garbage_config_json_names_the_file_and_the_remedy_which_works(sweep_dirs, tmp_path, garbage):
    configs, dirs = sweep_dirs
    (run,) = copies(dirs[:1], tmp_path)
    path = os.path.join(run, rundir.CONFIG)
    want = open(path).read()
    with open(path, "w", encoding="latin-1") as f:
        f.write(garbage)
    for fail in (lambda: rundir.read_config(run), lambda: train.train_and_evaluate(configs[0], run)):
        with pytest.raises(ValueError) as e:
            fail()
        message = cli.one_line(e.value)
        assert message == str(e.value) and message.startswith(f"{path} is not a readable config (")
        assert message.endswith(f"checkpoint step 4 holds the run's config: delete {path} and run the training "
                                f"command again, which checks the command against it and rewrites the file")
    assert rundir.CONFIG in sweep.check_run(configs[0], run)  # a sweep member fails alone, saying so
    os.remove(path)  # the remedy
    with pytest.raises(ValueError, match="different config"):  # still checked against the checkpoint
        train.train_and_evaluate(tiny(beta=3.0), run)
    train.train_and_evaluate(configs[0], run)
    assert json.load(open(path)) == json.loads(want)
    shutil.rmtree(os.path.join(run, rundir.CHECKPOINTS))  # without checkpoints: restore or start afresh
    open(path, "w").write(garbage)
    with pytest.raises(ValueError, match=r"no checkpoint of the run holds its config; restore the file"):
        rundir.read_config(run)


@pytest.mark.slow
def test_oversized_batch_is_refused_before_writing_and_the_corrected_command_works(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"config.batch_size=5000 is larger than the 1438 training images of "
                                         r"dataset 'digits'; use --config.batch_size=1438 or less"):
        train.train_and_evaluate(tiny(batch_size=5000), run)
    assert not os.path.exists(run)
    with pytest.raises(ValueError, match=r"larger than the 1238 training images .* after validation_size=200"):
        train.train_and_evaluate(tiny(batch_size=1300, validation_size=200), run)
    assert not os.path.exists(run)
    train.train_and_evaluate(tiny(num_steps=2, checkpoint_every=2, eval_every=2, log_every=2), run)
    assert rundir.latest_checkpoint(run) == 2


def test_bad_npz_files_fail_with_one_line_naming_the_file(tmp_path):
    good = str(tmp_path / "good.npz")
    x = np.zeros((20, 8, 8), np.uint8)
    np.savez_compressed(good, x_train=np.random.default_rng(0).integers(0, 255, (500, 8, 8), np.uint8),
                        x_test=x)
    assert data.load("npz", good).train_images.shape == (500, 8, 8, 1)
    truncated = str(tmp_path / "truncated.npz")
    blob = open(good, "rb").read()
    text = str(tmp_path / "text.npz")
    open(text, "w").write("x_train,x_test\n1,2\n")
    for path, dataset in [(truncated, "npz"), (text, "npz"), (truncated, "dsprites_npz"), (text, "dsprites_npz")]:
        for cut in (len(blob) // 2, len(blob) - 10):
            open(truncated, "wb").write(blob[:cut])
            with pytest.raises(ValueError) as e:
                data.load(dataset, path)
            message = cli.one_line(e.value)
            assert path in message and message == str(e.value), message
            assert ("is not an .npz file" if path == text else "is damaged or truncated") in message
            assert "pickled" not in message


def test_data_dir_with_a_dataset_that_reads_no_files_is_refused(tmp_path):
    from vaekl import config as config_lib  # pylint: disable=g-import-not-at-top
    for name in ("digits", "dsprites"):
        with pytest.raises(ValueError, match=rf"^config.data_dir='/some/dir' has no effect with dataset='{name}', "
                                             r"which reads no files; drop --config.data_dir"):
            config_lib.validate(tiny(dataset=name, data_dir="/some/dir"))
    config_lib.validate(tiny())  # the default: no data_dir
    config_lib.validate(tiny(dataset="npz", data_dir="/some/file.npz"))
    with pytest.raises(ValueError, match="has no effect with dataset='digits'"):  # a sweep point too
        sweep.points("data_dir=/a,/b", tiny())
    run = str(tmp_path / "run")  # nothing is written
    with pytest.raises(ValueError, match="has no effect with dataset='digits'"):
        train.train_and_evaluate(tiny(data_dir=str(tmp_path)), run)
    assert not os.path.exists(run)
    assert data.load("digits", "/ignored").train_images.shape[0] == 1438  # old runs still load


def test_disk_full_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / rundir.EVAL)
    rundir.atomic_write(path, '{"old": 1}')
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(rundir.WriteFailed) as e:
        rundir.atomic_write(path, '{"new": 2}')
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert isinstance(e.value, cli.USER_ERRORS) and e.value.errno == errno.ENOSPC
    assert cli.one_line(e.value).startswith(f"cannot write {path}: No space left on device; it is unchanged")
    assert os.listdir(tmp_path) == [rundir.EVAL] and json.load(open(path)) == {"old": 1}
    # Temporaries a killed writer left are removed by the next successful write; a live
    # writer's (here the parent process's) or a fresh one is not.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale, live, fresh = (f"{path}.tmp{dead}", f"{path}.tmp{os.getppid()}", f"{path}.tmp{int(dead) + 1}")
    for p in (stale, live, fresh):
        open(p, "w").write("{")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    rundir.atomic_write(path, '{"new": 2}')
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (path, live, fresh))


@pytest.mark.slow
def test_disk_full_during_eval_json_is_one_line_through_the_cli(sweep_dirs, tmp_path):
    (run,) = copies(sweep_dirs[1][:1], tmp_path)
    script = textwrap.dedent(f"""
        import errno, os, sys
        from vaekl import cli, evaluate
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def main(argv):
            os.fsync = full
            evaluate.evaluate_run({run!r}, num_samples=2, num_draws=2, disentanglement=False)
        cli.main(main, [sys.argv[0]])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == cli.EXIT_USER_ERROR, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {os.path.join(run, rundir.EVAL)}: No space left on device; it is unchanged "
        f"(free space or fix the error, then run the command again)")
    assert "Traceback" not in out.stderr
    assert not [f for f in os.listdir(run) if f.startswith(rundir.EVAL)]


# --------------------------------------------------------------------------------------
# A new user's first day.


@pytest.mark.slow  # starts a process
def test_library_logs_stay_quiet_in_a_clone_named_vaekl(tmp_path):
    """A clone named ``vaekl`` holds its libraries under ``vaekl/.venv``: records are kept by
    logger name, so a library's INFO lines (orbax's, through absl's logger, or a std logger)
    are dropped there, its warnings and vaekl's own INFO lines (named loggers) kept."""
    clone = tmp_path / "vaekl"
    shutil.copytree(os.path.join(REPO, "vaekl"), clone / "vaekl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = clone / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    (site / "chattylib.py").write_text(textwrap.dedent("""
        import logging as pylogging
        from absl import logging
        def chatter():
            for i in range(50):
                logging.info("absl library info %d", i)  # orbax logs every file operation so
                pylogging.getLogger("chattylib").info("std library info %d", i)
            logging.warning("a library warning")
    """))
    script = textwrap.dedent("""
        import logging, sys
        import chattylib
        from vaekl import cli
        def main(argv):
            cli.quiet_library_logs()
            chattylib.chatter()
            logging.getLogger("vaekl.train").info("step 1/1 progress")
            logging.getLogger("experiments.train").info("final test: neg_elbo 1.0")
        cli.main(main, [sys.argv[0]])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{clone}:{site}")
    out = subprocess.run([sys.executable, "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import vaekl as pkg  # pylint: disable=g-import-not-at-top
    assert pkg.__file__.startswith(REPO)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, lines[:10]
    assert "a library warning" in lines[0] and "step 1/1 progress" in lines[1] and "final test" in lines[2]


def test_unknown_sweep_field_says_did_you_mean():
    from test_runs import tiny_config  # pylint: disable=g-import-not-at-top
    with pytest.raises(ValueError, match=r"^sweep: unknown config field 'bta' in 'bta=1,2'; did you mean beta\?$"):
        sweep.parse("bta=1,2 seed=0,1", tiny_config())
    with pytest.raises(ValueError, match=r"unknown config field 'zzzzzz' .*; the fields are the config's$"):
        sweep.parse("zzzzzz=1", tiny_config())


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--sweep=", "--sweep= "])
def test_empty_sweep_flag_uses_the_configs_get_sweep(tmp_path, flag):
    """``--sweep=''`` means the config file's own grid (here a misspelt one, so that the
    launcher stops at once with its one-line error instead of training a run named base)."""
    config_file = tmp_path / "cfg.py"
    config_file.write_text(textwrap.dedent("""
        from vaekl import config as config_lib
        def get_config():
            c = config_lib.defaults()
            c.encoder_hidden, c.decoder_hidden, c.latent_dim, c.batch_size = (8,), (8,), 2, 16
            c.num_steps = c.eval_every = c.log_every = c.checkpoint_every = 2
            c.num_eval_train = 64
            return c
        def get_sweep():
            return "bta=1,2"
    """))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={config_file}", flag,
                          f"--workdir={tmp_path / 'sweep'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == cli.EXIT_USER_ERROR, out.stdout + out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: sweep: unknown config field 'bta' in 'bta=1,2'; did you mean beta?")
    assert not os.path.exists(tmp_path / "sweep" / "base")


# --------------------------------------------------------------------------------------
# Numbers shown with their caveat.


def test_report_states_the_mi_bound_and_the_tc_standard_error(tmp_path):
    from test_report import fake_run  # pylint: disable=g-import-not-at-top
    from vaekl import analysis, report  # pylint: disable=g-import-not-at-top
    root = str(tmp_path)
    n_test, n_train = 359, 1438
    for seed, tc in ((0, -0.039), (1, -0.041)):
        ev = {"nll": 95.0, "nll_se": 0.2, "mutual_info": math.log(n_test) - 0.001, "mutual_info_se": 0.001,
              "index_code_mi": math.log(n_test) - 0.001, "index_code_mi_se": 0.001,
              "total_correlation": tc, "total_correlation_se": 0.012, "dimwise_kl": 1.0, "dimwise_kl_se": 0.01,
              "num_test": n_test,
              "disentanglement": {"gaussian_total_correlation_score.gaussian_total_correlation": 0.5}}
        run = fake_run(root, {"beta": 1.0, "seed": seed}, eval_json=ev,
                       meta={"train_size": n_train, "image_shape": [8, 8, 1]})
        path = os.path.join(run, rundir.METRICS)  # the logged batch MI: saturated at log N (training images)
        rows = [json.loads(line) for line in open(path).read().splitlines()[:-1]]
        for r in rows:
            r["index_code_mi"] = math.log(n_train) - 0.002 * (r["split"] == "train")
        open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    df = analysis.load_sweep(root)
    (summary,) = report.summary_rows(df)
    mi = f"MI (≤ log N = {math.log(n_test):.2f})"
    assert summary[mi] == f"{math.log(n_test) - 0.001:.2f} ± 0.00 (= log N)"
    se = math.sqrt(2 * 0.012 ** 2) / 2
    assert summary["TC of q(z) (± se)"] == f"{-0.04:.2f} ± {se:.2f}"  # no longer a bare −0.04
    rows = report.run_rows(df)
    assert rows[0][f"MI (log) (≤ log N = {math.log(n_train):.2f})"] == "7.27 (= log N)"
    assert rows[0][f"MI (eval) (≤ log N = {math.log(n_test):.2f})"].endswith("(= log N)")
    assert rows[0]["TC of q(z) (eval)"] == "-0.04 ± 0.01"
    assert rows[0]["Gaussian TC of the means (not of q(z))"] == "0.500"
    page = open(report.write_report(root)).read()
    assert "at most log N" in page and "negative estimate is noise" in page


def test_eval_json_defines_its_two_total_correlations():
    from vaekl import evaluate  # pylint: disable=g-import-not-at-top
    d = evaluate.DEFINITIONS
    assert "aggregate posterior q(z)" in d["total_correlation"] and "noise" in d["total_correlation"]
    gauss = d["disentanglement.gaussian_total_correlation_score.gaussian_total_correlation"]
    assert "posterior means" in gauss and "not of q(z)" in gauss
    assert "log N" in d["mutual_info"]
    section = re.sub(r"\s+", " ", _readme().split("## Evaluation", 1)[1].split("\n## ", 1)[0])
    assert "`definitions`" in section and "Gaussian fitted to the posterior means" in section


@pytest.mark.slow
def test_eval_json_carries_the_definitions_and_keeps_its_keys(sweep_dirs, tmp_path):
    from vaekl import evaluate  # pylint: disable=g-import-not-at-top
    (run,) = copies(sweep_dirs[1][:1], tmp_path)
    r = evaluate.evaluate_run(run, num_samples=2, num_draws=2, disentanglement=False)
    saved = json.load(open(os.path.join(run, rundir.EVAL)))
    assert saved == json.loads(json.dumps(r))
    for key in ("mutual_info", "total_correlation", "total_correlation_se", "index_code_mi", "dimwise_kl",
                "marginal_kl", "num_test"):
        assert isinstance(saved[key], (int, float)), key
    assert set(saved["definitions"]) == {"mutual_info", "total_correlation", "dimwise_kl", "marginal_kl"}
    from vaekl import analysis  # pylint: disable=g-import-not-at-top
    assert "eval_definitions" not in analysis.per_run(analysis.load_sweep(run)).columns


# --------------------------------------------------------------------------------------
# README facts.


@pytest.mark.slow  # builds the conv model
def test_a_dsprites_config_in_experiments_configs():
    import runpy  # pylint: disable=g-import-not-at-top
    path = os.path.join(REPO, "experiments", "configs", "dsprites_conv.py")
    module = runpy.run_path(path)
    c = module["get_config"]()
    assert c.dataset == "dsprites" and c.model == "conv"
    assert [p["beta"] for p in sweep.parse(module["get_sweep"](), c)][:2] == [1.0, 1.0]
    assert "experiments/configs/dsprites_conv.py" in _readme()
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from vaekl import config as config_lib  # pylint: disable=g-import-not-at-top
    config_lib.validate(c)
    graphdef, state, _ = train.create(c, (64, 64, 1))  # the model builds for dSprites' 64×64 images
    q = nnx.merge(graphdef, state.params).encode(jnp.zeros((2, 64, 64, 1)))
    assert q.mean.shape == (2, c.latent_dim)

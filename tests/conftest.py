"""Shared test set-up: tests run on the CPU unless told otherwise, and import the references.

Tests that train models, start processes or need Slurm are marked ``slow``; ``make test-fast``
(``pytest -m "not slow"``) runs the rest, the unit tests.
"""

import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent JAX compilation cache for the whole session: this process, the xdist workers
# and every subprocess the tests start (they inherit the environment, read by JAX when it is
# imported), so a program compiled once is loaded, not compiled again, everywhere after. Every
# CPU program is kept (no minimum compile time or size). Entries are written non-atomically;
# one cut short by a kill fails to decompress, and JAX then warns and compiles (never runs a
# wrong program). A JAX_COMPILATION_CACHE_DIR set by the caller is used (and kept) instead.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vaekl-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The suite's time is mostly XLA compiling small programs that then run for milliseconds: LLVM's
# optimization passes off (the programs compute the same functions; float32 results may differ
# in the last bits, within every test's tolerance) measured 25 % less time on the compile-bound
# tests (test_model_variants_train: 59 s → 45 s), and XLA:CPU's older fused-loop emitter instead
# of its MLIR fusion emitters a further 2.7× less compile time (a tiny digits run's programs:
# 15.5 s → 5.8 s of compiling, 21.6 s → 12.3 s in all). Appended to the caller's XLA_FLAGS; the
# benchmarks and experiments never set it. VAEKL_TEST_XLA_OPT=1 keeps XLA's defaults.
if os.environ.get("VAEKL_TEST_XLA_OPT") != "1":
    _FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                     "--xla_cpu_use_fusion_emitters=false")
    if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

# Whole modules that train models, launch processes or need a cluster.
SLOW_MODULES = {"test_train", "test_sweep", "test_slurm", "test_runs", "test_report", "test_linear_vae",
                "test_sharding"}
# Single slow tests in otherwise fast modules (substring of the test's node id).
SLOW_TESTS = ("test_train_evaluate_report_and_load", "test_a_user_dataset_architecture_and_metric", "test_vmapped_member", "test_readme_example", "test_evaluate_run", "test_objective_and_gradients",
              "test_one_sample_elbo_is_unbiased", "test_iwae_objective_trains", "test_sampled_estimators_train",
              "test_analysis_of_a_tiny_digits_run", "test_mixture_priors_train",
              "test_row_runs_on_tiny_settings", "test_conv_group_member",
              # trains, runs a script or a subprocess, or takes over 4 s (make test-fast ≤ 90 s)
              "test_tutorial_runs", "test_stl_gradient_vanishes_at_the_exact_posterior",
              "test_iwae_converges_to_the_exact_log_likelihood", "test_iwae_with_one_sample_is_the_mc_elbo",
              "test_chunked_and_unchunked_estimates_agree", "test_report_states_the_mi_bound",
              "test_local_sweep_children_get_the_modules", "test_one_component_mog_is_its_gaussian",
              "test_iwae_bound_is_above_the_elbo", "test_discriminator_learns_total_correlation",
              "test_objective_logs_the_closed_form", "test_analytic_is_unchanged_bit_for_bit",
              "test_mc_estimate_is_unbiased_and_stl_has_the_same_value[full",
              "test_mc_estimate_is_unbiased_and_stl_has_the_same_value[diag-std_normal]")


# Modules that exercise device code (numerics, models, estimators, objectives, training steps):
# benchmarks/gpu/run.sh runs them on an accelerator (`pytest -m device`).
DEVICE_MODULES = {"test_kl", "test_models", "test_estimators", "test_objectives", "test_regularizers",
                  "test_dsprites", "test_conv"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains models, starts processes or needs Slurm")
    config.addinivalue_line("markers", "device: exercises device code; run on an accelerator by benchmarks/gpu/run.sh")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it (not an xdist worker)
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The longest test files first (measured with --durations, idle, 2026-12-07): xdist's loadfile
# hands out whole files in collection order, so a long file collected last runs alone at the
# end (the GPU script's tiny mode did: 2.5 of 13 minutes on one worker). Longest first is the
# classic greedy schedule; the others keep their order.
LONGEST_FIRST = ("test_sweep", "test_gpu_script", "test_train", "test_sharding", "test_closed_vs_mc_rows",
                 "test_runs", "test_user_modules", "test_report", "test_faults", "test_trust")


def _file_rank(item) -> int:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: within a rank, collection order
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or any(s in item.nodeid for s in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        if module in DEVICE_MODULES:
            item.add_marker(pytest.mark.device)

#!/usr/bin/env bash
# Issue 24's CPU slice of Locatello et al.'s study: β-VAE, β-TCVAE (tc_estimator=mws) and
# FactorVAE, each at its weakest published strength and at the one its paper used for dSprites
# (β-VAE β = 4, Higgins et al. 2017) or a grid value near the middle of the published range
# (β-TCVAE β = 6, FactorVAE γ = 40: not tuned here), 3 seeds each, STEPS steps, with
# MIG / FactorVAE score / DCI along training every METRIC_EVERY steps (sample sizes below,
# stated in every disentanglement.jsonl row). Both cores: two launchers side by side, each
# pinned to one core with nine models each (FactorVAE's γ split across the cores); a method's runs
# are one program (members one after another).
#
#   bash experiments/reproduce/locatello_slice_cpu.sh [WORKDIR] [STEPS] [METRIC_EVERY]
#   python -m experiments.reproduce.summarize --only=locatello_slice --locatello_slice_runs=WORKDIR
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${1:-runs/locatello_slice}
STEPS=${2:-1000}
EVERY=${3:-500}
PY=${PY:-.venv/bin/python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/.jax_cache}
CONFIG=experiments/reproduce/locatello_dsprites.py
# Along training on one core: MIG at disentanglement_lib's size; FactorVAE score on 100/50
# votes and DCI on 2,000/1,000 points (the defaults would encode ~640,000 images per row).
METRICS='{"factor_vae_score": {"num_train": 100, "num_eval": 50}, "dci": {"num_train": 2000, "num_test": 1000}}'
COMMON=(--config.num_steps="$STEPS" --config.eval_every="$STEPS" --config.checkpoint_every="$EVERY"
        --config.log_every=50 --config.metric_every="$EVERY" --config.metric_options="$METRICS")
sweep() {  # sweep CORE METHOD SWEEP NAME
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c "$1" \
    "$PY" -m launch.sweep --config="$CONFIG:$2" "${COMMON[@]}" --sweep="$3" --workdir="$WORKDIR/$4" --max_group=6 \
    > "$WORKDIR/$4.$1.log" 2>&1
}
mkdir -p "$WORKDIR"
start=$(date +%s)
( sweep 0 beta_vae "beta=1,4 seed=0,1,2" beta_vae && sweep 0 factor_vae "factor_gamma=10 seed=0,1,2" factor_vae_g10 ) &
( sweep 1 beta_tc_vae "beta=1,6 seed=0,1,2" beta_tc_vae && sweep 1 factor_vae "factor_gamma=40 seed=0,1,2" factor_vae_g40 ) &
wait
echo "train_seconds=$(( $(date +%s) - start )) steps=$STEPS models=18 cores=2" | tee "$WORKDIR/timing.txt"

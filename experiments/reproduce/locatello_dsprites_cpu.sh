#!/usr/bin/env bash
# The CPU-sized run of Locatello et al.'s study (experiments/reproduce/locatello_dsprites.py):
# every method, 3 strengths spanning the published range, 2 seeds, STEPS steps each, on the
# on-device dSprites; then every run is evaluated (disentanglement metrics, KL decomposition)
# and summarized into docs/reproductions/locatello_dsprites.{json,png} and the README table.
#
#   bash experiments/reproduce/locatello_dsprites_cpu.sh [WORKDIR] [STEPS]
#
# The full published grid of one method on a GPU or Slurm cluster is
#   python -m launch.sweep --config=experiments/reproduce/locatello_dsprites.py:METHOD --workdir=DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${1:-runs/locatello_cpu}
STEPS=${2:-100}
PY=${PY:-.venv/bin/python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/.jax_cache}
CONFIG=experiments/reproduce/locatello_dsprites.py
# One evaluation and checkpoint at the end (each evaluation of 7,000 images costs ~10 s of CPU),
# training curves every 50 steps. A method's six runs are one program: on the CPU its members
# run one after another inside it (vaekl.train.step.member_mode, measured at ≤ 1.1× one model's
# time per model by benchmarks/bench_vs_pytorch.py), so each method compiles once. Both cores:
# two launchers side by side, each pinned to one core with one thread, three methods each.
COMMON=(--config.num_steps="$STEPS" --config.eval_every="$STEPS" --config.checkpoint_every="$STEPS"
        --config.log_every=50)

declare -A SWEEPS=(
  [beta_vae]="beta=1,4,16"
  [annealed_vae]="capacity_max=5,25,100"
  [factor_vae]="factor_gamma=10,30,100"
  [dip_vae_i]="dip_lambda_od=1,5,50"
  [dip_vae_ii]="dip_lambda_od=1,5,50"
  [beta_tc_vae]="beta=1,4,10"
)
train_methods() {  # train_methods CORE METHOD...
  local core=$1; shift
  for method in "$@"; do
    extra=()
    # AnnealedVAE reaches C_max at a third of the run, as at full scale (100,000 of 300,000 steps).
    [ "$method" = annealed_vae ] && extra=(--config.capacity_steps="$(( STEPS / 3 ))")
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c "$core" \
      "$PY" -m launch.sweep --config="$CONFIG:$method" "${COMMON[@]}" "${extra[@]}" \
        --sweep="${SWEEPS[$method]} seed=0,1" --workdir="$WORKDIR/$method" > "$WORKDIR/$method.log" 2>&1
  done
}
mkdir -p "$WORKDIR"
start=$(date +%s)
train_methods 0 beta_vae factor_vae dip_vae_ii &
train_methods 1 annealed_vae dip_vae_i beta_tc_vae &
wait
trained=$(date +%s)
# Every metric at disentanglement_lib's default sample sizes: the posterior means of all 737,280
# dSprites factor combinations are encoded once per model (the representation table, ~3.5 min of
# one core) and every metric reads its samples from it (~4.3 min per model in all). Both cores:
# two evaluators side by side, each pinned to one core with one thread, three methods each.
evaluate_methods() {  # evaluate_methods CORE METHOD...
  local core=$1; shift
  for method in "$@"; do
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c "$core" \
      "$PY" -m experiments.evaluate --workdir="$WORKDIR/$method" --checkpoint=latest --skip_done \
        --num_samples=2 --num_draws=2 --batch_size=500 > "$WORKDIR/$method.eval.log" 2>&1
  done
}
evaluate_methods 0 beta_vae factor_vae dip_vae_ii &
evaluate_methods 1 annealed_vae dip_vae_i beta_tc_vae &
wait
evaluated=$(date +%s)
echo "train_seconds=$(( trained - start )) eval_seconds=$(( evaluated - trained )) steps=$STEPS models=36" \
  | tee "$WORKDIR/timing.txt"
[ -n "${SKIP_SUMMARY:-}" ] || "$PY" -m experiments.reproduce.summarize --only=locatello --locatello_runs="$WORKDIR"

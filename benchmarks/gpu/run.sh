#!/usr/bin/env bash
# Everything vaekl measures on one GPU, in one call that ends within ~8 minutes:
#   bash benchmarks/gpu/run.sh OUTDIR [--tiny]
# writes into OUTDIR (each part on its own, a failing part does not stop the others):
#   env.json        devices, versions, nvidia-smi
#   tests.xml/.log  the tests marked `device` (tests/conftest.py: DEVICE_MODULES), float32 at full precision
#   conv_step.json  the Locatello conv VAE's training step, one model and a vmapped group (vaekl vs PyTorch)
#   train.log       benchmarks/bench_train.py (MNIST MLP: per-step loop vs vaekl's scan)
#   sweep.log       benchmarks/bench_sweep.py, a 64-run vmapped sweep against runs one at a time
#   slice.json      β-TCVAE × 6 strengths × 2 seeds (one vmapped program), as many steps as fit,
#                   evaluated (experiments/reproduce/locatello_gpu.py), plus runs.tgz (no checkpoints)
#   timing.json     each part's wall time and exit status
# --tiny runs every part at toy sizes on whatever device jax has (tests/test_gpu_script.py runs it
# on the CPU so the script cannot rot; the slice then trains a small MLP, not the conv VAE). Never called by CI: a GPU is lent only to some sessions.
set -uo pipefail
OUT=${1:?usage: run.sh OUTDIR [--tiny]}
TINY=${2:-}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false
MNIST=${VAEKL_MNIST_NPZ:-.gpu_data/mnist_partial.npz}
if [ "$TINY" = --tiny ]; then
  T_TESTS=120 T_STEP=240 T_TRAIN=120 T_SWEEP=240 T_SLICE=400
  TEST_SEL=(-k "run_map or impl_choice" tests/test_conv.py)
  STEP_ARGS=(--rounds 1 --steps 1 --group 2 --group_modes sequential) TRAIN_ARGS=(--steps 20) SWEEP_ARGS=(--steps 20 --grid "beta=1,4" --sequential_runs 1 --skip_local)
  SLICE_ARGS=(--tiny)
else
  T_TESTS=100 T_STEP=90 T_TRAIN=35 T_SWEEP=90 T_SLICE=300
  TEST_SEL=(-m "device and not slow" -n 4 tests)
  STEP_ARGS=(--rounds 5 --steps 200 --group 12 --group_modes vmap --torch_python python3 --device_torch cuda)
  TRAIN_ARGS=(--steps 2000)
  SWEEP_ARGS=(--steps 2000 --grid 'beta=0.25,0.5,1,2,4,8,16,32 latent_dim=2,4,8,16,32,64,96,128' --sequential_runs 2 --skip_local)
  SLICE_ARGS=(--seconds $((T_SLICE - 70)))
fi
[ -f "$MNIST" ] || MNIST=""

declare -A RC SECS
part() {  # part NAME TIMEOUT CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?; SECS[$name]=$(( $(date +%s) - t0 ))
  echo "   exit ${RC[$name]} after ${SECS[$name]} s"; tail -n 4 "$OUT/$name.log"
}

(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true) > "$OUT/nvidia-smi.txt" 2>&1
part env 60 "$PY" -c "
import json, jax, flax, optax, numpy, sys
d = jax.devices()
json.dump({'backend': jax.default_backend(), 'devices': [x.device_kind for x in d], 'jax': jax.__version__,
           'flax': flax.__version__, 'optax': optax.__version__, 'numpy': numpy.__version__,
           'python': sys.version.split()[0]}, open('$OUT/env.json', 'w'), indent=1)
print(open('$OUT/env.json').read())"
JAX_PLATFORMS= part tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TEST_SEL[@]}"
part conv_step "$T_STEP" "$PY" benchmarks/bench_vs_pytorch.py --no_pin "${STEP_ARGS[@]}" --out "$OUT/conv_step.json"
if [ -n "$MNIST" ]; then part train "$T_TRAIN" "$PY" benchmarks/bench_train.py --data "$MNIST" "${TRAIN_ARGS[@]}"; fi
part sweep "$T_SWEEP" "$PY" benchmarks/bench_sweep.py "${SWEEP_ARGS[@]}"
part slice "$T_SLICE" "$PY" -m experiments.reproduce.locatello_gpu --workdir="$OUT/slice_runs" --out="$OUT/slice.json" "${SLICE_ARGS[@]}"
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude='*.tfevents.*' -C "$OUT" slice_runs 2>/dev/null && rm -rf "$OUT/slice_runs"
"$PY" - "$OUT" <<PYEOF
import json, sys
rc = {$(for k in "${!RC[@]}"; do printf '"%s": [%s, %s], ' "$k" "${RC[$k]}" "${SECS[$k]}"; done)}
json.dump({k: {"exit": v[0], "seconds": v[1]} for k, v in rc.items()}, open(sys.argv[1] + "/timing.json", "w"), indent=1)
print(json.dumps(rc))
PYEOF

"""Benchmark: the Locatello et al. conv VAE's training step in vaekl against the same model in
PyTorch, one thread each on the same core, side by side in one run.

    python benchmarks/bench_vs_pytorch.py [--rounds 5] [--steps 5] [--group 4] [--layers]
        [--torch_python PATH] [--core N] [--out result.json]

Prints seconds per step for each, the ratio (PyTorch ÷ vaekl: above 1 means vaekl is faster),
the achieved GFLOP/s and their fraction of a float32 matmul ceiling measured in the same run;
then a group of R models in one program (members one after another, vaekl's CPU default, and
vmapped) against one model, seconds per model-step; with ``--layers`` each layer's forward and
forward + backward time in both frameworks (the table in docs/performance.md).

Rounds alternate between the frameworks (vaekl's steps, then PyTorch's, …) so that a busy
machine slows both alike; the medians over all steps are compared, and each round's ratio is
kept (``over_vaekl_by_round``, ``group_over_one_by_round``) for the spread. PyTorch runs twice: as a
researcher would run it (glibc's default allocator) and with the allocator setting vaekl's
entry points make (``vaekl/host_memory.py``: freed memory kept, no page faults per step),
so that the ratio is shown with and without that advantage.

PyTorch is not a vaekl dependency. Install it in a separate environment, e.g.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy

and pass ``--torch_python /tmp/torchenv/bin/python`` (or set VAEKL_TORCH_PYTHON); without
it the PyTorch columns are skipped with that message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_WORKER = os.path.join(REPO, "benchmarks", "torch_conv_vae.py")
INSTALL = ("PyTorch not found: install it in a separate environment (python3 -m venv /tmp/torchenv && "
           "/tmp/torchenv/bin/pip install torch numpy) and pass --torch_python /tmp/torchenv/bin/python")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per round and framework")
    p.add_argument("--group", type=int, default=4, help="models in the grouped program (0: skip)")
    p.add_argument("--layers", action="store_true")
    p.add_argument("--torch_python", default=os.environ.get("VAEKL_TORCH_PYTHON", ""))
    p.add_argument("--core", type=int, default=-1, help="the core both run on (-1: the last usable one)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("--group_modes", default="sequential,vmap", help="how the group's members are combined")
    p.add_argument("--no_pin", action="store_true", help="no core pinning or thread limit (an accelerator)")
    p.add_argument("--device_torch", default="cpu", help="PyTorch's device (cuda on a GPU)")
    p.add_argument("--steps_per_call", type=int, default=0,
                   help="vaekl steps per compiled call (0: the trainer's choice, 1 on the CPU, 100 elsewhere)")
    return p.parse_args()


def pin(core: int) -> int:
    """Pins this process (and the PyTorch worker it starts) to one core, one XLA thread."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[core] if core < 0 else core
    os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    return core


class TorchWorker:
    """The PyTorch model in another interpreter, driven line by line over a pipe."""

    def __init__(self, python: str, device: str = "cpu", threads: int = 1, keep_freed_memory: bool = False):
        flags = ["--keep_freed_memory"] if keep_freed_memory else []
        self.proc = subprocess.Popen([python, TORCH_WORKER, "--serve", "--threads", str(threads), "--device", device,
                                      *flags],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self.ask("info")

    def ask(self, cmd: str):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker died on {cmd!r}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def step_flops(params) -> float:
    """Multiply-adds of one image's forward pass, from the conv and dense kernels' shapes
    (a transposed conv's output side is twice its input's), ×2 FLOP, ×3 for forward + backward."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    macs = 0.0
    side = 64
    for i in range(len(params["encoder"]["convs"])):
        kernel = params["encoder"]["convs"][i]["kernel"]
        side //= 2
        macs += side * side * np.prod(kernel.shape)
    for i in range(len(params["decoder"]["deconvs"])):
        kernel = params["decoder"]["deconvs"][i]["kernel"]
        side *= 2
        macs += side * side * np.prod(kernel.shape) / 4  # (k/s)² = 4 of the 16 taps per output
    dense = [params["encoder"]["dense"], params["head"]["mean"], params["head"]["log_var"],
             params["decoder"]["dense"], params["decoder"]["project"]]
    macs += sum(np.prod(d["kernel"].shape) for d in dense)
    return 2 * 3 * float(macs)


def median_times(fn, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def main() -> None:
    args = parse()
    core = None if args.no_pin else pin(args.core)
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, REPO)
    from benchmarks import conv_step  # pylint: disable=g-import-not-at-top

    setup = conv_step.setup("beta_vae")
    per_call = args.steps_per_call or (1 if jax.default_backend() == "cpu" else 100)
    one = conv_step.compiled_step(setup, group=1, num_steps=per_call)
    batch = setup.config.batch_size
    flops = step_flops(setup.state.params) * batch

    torch, workers = None, {}
    if args.torch_python and (os.path.exists(args.torch_python) or "/" not in args.torch_python):
        threads = 1 if core is not None else os.cpu_count()
        workers = {"pytorch": TorchWorker(args.torch_python, args.device_torch, threads)}
        if args.device_torch == "cpu":
            workers["pytorch_keep_freed"] = TorchWorker(args.torch_python, args.device_torch, threads, True)
        torch = workers["pytorch"]
    else:
        print(INSTALL)
    n = 1024
    a = jnp.ones((n, n), jnp.float32) + jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    jax_peak = 2 * n**3 / float(np.median(median_times(lambda: jax.block_until_ready(mm(a)), 10))) / 1e9

    times = {"vaekl": [], **{name: [] for name in workers}}
    rounds = {k: [] for k in times}  # each round's median, for the spread of the ratios
    one()  # compile
    for worker in workers.values():
        worker.ask(f"steps {1}")
    for _ in range(args.rounds):
        got = {"vaekl": [t / per_call for t in median_times(one, max(1, args.steps // per_call))]}
        got.update({name: worker.ask(f"steps {args.steps}") for name, worker in workers.items()})
        for k, v in got.items():
            times[k] += v
            rounds[k].append(float(np.median(v)))
    res = {"device": jax.devices()[0].device_kind, "core": core, "jax": jax.__version__, "steps_per_call": per_call,
           "step_gflop": flops / 1e9, "matmul_ceiling_gflops": {"jax": jax_peak},
           "seconds_per_step": {k: float(np.median(v)) for k, v in times.items() if v}}
    if torch:
        res["torch"] = torch.info["torch"]
        res["matmul_ceiling_gflops"]["pytorch"] = torch.ask("matmul")
        for name in workers:
            res[f"{name}_over_vaekl"] = res["seconds_per_step"][name] / res["seconds_per_step"]["vaekl"]
        res["over_vaekl_by_round"] = {name: [p / v for p, v in zip(rounds[name], rounds["vaekl"])]
                                      for name in workers}
    res["gflops"] = {k: flops / 1e9 / v for k, v in res["seconds_per_step"].items()}

    where = f"one core ({core}), one thread each" if core is not None else res["device"]
    print(f"step: {flops / 1e9:.2f} GFLOP (batch {batch}); {where}; matmul "
          f"ceiling {jax_peak:.0f} GFLOP/s (jax)" +
          (f", {res['matmul_ceiling_gflops']['pytorch']:.0f} (PyTorch {res['torch']})" if torch else ""))
    for k, v in res["seconds_per_step"].items():
        print(f"  {k:18s} {v:.4f} s/step  {res['gflops'][k]:6.1f} GFLOP/s  "
              f"{res['gflops'][k] / jax_peak:5.1%} of the matmul ceiling")
    if torch:
        spread = lambda name: "{:.2f}–{:.2f}".format(*_range(res["over_vaekl_by_round"][name]))  # noqa: E731
        print(f"  PyTorch ÷ vaekl: {res['pytorch_over_vaekl']:.2f}× (rounds {spread('pytorch')}; above 1: vaekl "
              "faster)" + (f"; PyTorch with freed memory kept ÷ vaekl: {res['pytorch_keep_freed_over_vaekl']:.2f}× "
                           f"(rounds {spread('pytorch_keep_freed')})" if "pytorch_keep_freed" in workers else ""))

    save(args.out, res)  # what is measured so far survives a time limit on what follows
    if args.group > 1:
        modes = args.group_modes.split(",")
        res["group_size"] = args.group
        res["group"], res["group_over_one_by_round"] = group_times(conv_step, setup, args.group, args.rounds,
                                                                   args.steps, one, per_call, modes)
        save(args.out, res)
        g = res["group"]
        print(f"group of {args.group} in one program, seconds per model-step (one model: {g['one']:.4f}):")
        for mode in modes:
            lo, hi = _range(res["group_over_one_by_round"][mode])
            print(f"  {mode:10s} {g[mode]:.4f}  ({g[mode] / g['one']:.2f}× one model's; rounds {lo:.2f}–{hi:.2f})")
    if args.layers:
        res["layers"] = {"vaekl": conv_step.layer_times(args.steps * args.rounds)}
        if torch:
            res["layers"]["pytorch"] = torch.ask(f"layers {args.steps * args.rounds}")
        print_layers(res["layers"])
    for worker in workers.values():
        worker.close()
    save(args.out, res)


def save(path: str, res: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


def _range(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def group_times(conv_step, setup, r: int, rounds: int, steps: int, one, per_call: int,
                modes=("sequential", "vmap")) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(seconds per model-step of one model and of each mode's group of ``r``, medians over all
    rounds; {mode: each round's group ÷ one ratio})."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    fns = {mode: conv_step.compiled_step(setup, group=r, members=mode, num_steps=per_call) for mode in modes}
    for fn in fns.values():
        fn()
    calls = max(1, steps // per_call)
    t = {"one": [], **{mode: [] for mode in modes}}
    by_round = {mode: [] for mode in modes}
    for _ in range(rounds):
        one_round = [x / per_call for x in median_times(one, calls)]
        t["one"] += one_round
        for mode, fn in fns.items():
            got = [x / r / per_call for x in median_times(fn, max(1, calls // 2))]
            t[mode] += got
            by_round[mode].append(float(np.median(got) / np.median(one_round)))
    return {k: float(np.median(v)) for k, v in t.items()}, by_round


def print_layers(layers: dict) -> None:
    print("layer                      vaekl fwd  fwd+bwd (native)   PyTorch fwd  fwd+bwd   (ms)")
    for name, row in layers["vaekl"].items():
        tr = layers.get("pytorch", {}).get(name)
        ts = f"{tr[0] * 1e3:9.1f} {tr[1] * 1e3:8.1f}" if tr else ""
        print(f"  {name:24s} {row['fwd'] * 1e3:8.1f} {row['fwd_bwd'] * 1e3:8.1f} "
              f"({row['fwd_bwd_native'] * 1e3:6.1f})   {ts}")


if __name__ == "__main__":
    main()

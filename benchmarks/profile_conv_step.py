"""Where the conv VAE's training step spends its time on the CPU: XLA's own profile of the step.

    python benchmarks/profile_conv_step.py [--core N] [--steps 5] [--out profile.json]
        [--md docs/performance.md --vs_pytorch docs/reproductions/bench_vs_pytorch_cpu.json]
    python benchmarks/profile_conv_step.py --from_json profile.json --md docs/performance.md

Compiles the trainer's step of the Locatello et al. conv VAE (benchmarks/conv_step.py, one
model, batch 64), pins itself to one core with one XLA thread, runs ``--steps`` steps under
``jax.profiler`` and sums the time of every kernel XLA:CPU executed, per kernel and per kind:
convolutions and dots (XNNPACK/YNNPACK fusions, ``ynn_fusion``), layout changes (transposes and
copies), and the elementwise and reduction loops. Each of the slowest kernels is named by the
JAX operation it came from (the HLO metadata) and its output shape. With ``--md`` it writes
docs/performance.md from this profile and the per-layer table of bench_vs_pytorch.py's JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = (("ynn_fusion", "convolutions and dots (YNNPACK)"), ("transpose", "layout: transposes"),
         ("copy", "layout: copies"), ("concatenate", "layout: concatenations (phases interleaved)"),
         ("dot", "dots (Eigen)"), ("convolution", "convolutions (Eigen)"))


def kind(name: str) -> str:
    """The kernel's kind from its name (XLA names fusions after their ops)."""
    for key, title in KINDS:
        if name.startswith(key) or f"_{key}" in name.split(".")[0]:
            return title
    return "elementwise and reductions"


def hlo_info(dump: str) -> dict[str, dict]:
    """{instruction name: {shape, op}} from the step program's optimized HLO."""
    files = [f for f in glob.glob(os.path.join(dump, "*jit_steps*after_optimizations.txt")) if "buffer" not in f]
    info = {}
    pat = re.compile(r"^\s*%?([\w.\-]+) = (\S+) .*?(?:op_name=\"([^\"]*)\")?")
    for f in files:
        for line in open(f):
            m = pat.match(line)
            if m:
                op = re.search(r'op_name="([^"]*)"', line)
                info[m.group(1)] = {"shape": m.group(2), "op": op.group(1).replace("jit(steps)/", "") if op else ""}
    return info


def profile(steps: int, top: int = 20) -> dict:
    """Profiles ``steps`` steps; JAX is imported here, after XLA_FLAGS asks for one thread and an
    HLO dump (so that importing this module for :func:`markdown` changes nothing)."""
    dump = tempfile.mkdtemp(prefix="vaekl-profile-hlo-")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text "
                               "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    sys.path.insert(0, REPO)
    import jax  # pylint: disable=import-outside-toplevel
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    from benchmarks import conv_step  # pylint: disable=import-outside-toplevel

    s = conv_step.setup()
    run = conv_step.compiled_step(s)
    for _ in range(2):
        run()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    seconds = (time.perf_counter() - t0) / steps
    trace = tempfile.mkdtemp(prefix="vaekl-profile-")
    with jax.profiler.trace(trace):
        for _ in range(steps):
            run()
    data = ProfileData.from_file(glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True)[0])
    per = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA") or "Client" in line.name:
                continue  # the compute threads' kernels only
            for ev in line.events:
                if "ThunkExecutor" not in ev.name and not ev.name.startswith("end:"):
                    per[ev.name] += ev.duration_ns / 1e6 / steps
    info = hlo_info(dump)
    kinds = collections.defaultdict(float)
    for name, ms in per.items():
        kinds[kind(name)] += ms
    top = [{"kernel": n, "ms": round(ms, 3), "kind": kind(n), **info.get(n, {})}
           for n, ms in sorted(per.items(), key=lambda x: -x[1])[:top]]
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "seconds_per_step": seconds,
            "kernels_ms_per_step": sum(per.values()), "by_kind_ms": dict(sorted(kinds.items(), key=lambda x: -x[1])),
            "top_kernels": top, "kernels": len(per)}


def _rounds(vs: dict, name: str, lead: str = "; ") -> str:
    """'; rounds a–b×': the spread of a ratio over the benchmark's rounds ('' if not recorded)."""
    r = vs.get("over_vaekl_by_round", {}).get(name)
    return f"{lead}rounds {min(r):.2f}–{max(r):.2f}×{')' if lead == ' (' else ''}" if r else ""


def markdown(prof: dict, vs: dict | None) -> str:
    """docs/performance.md from the profile and bench_vs_pytorch.py's JSON (None: left out)."""
    out = ["# Where the conv VAE's CPU step spends its time", "",
           "Generated by `python benchmarks/profile_conv_step.py --out docs/reproductions/conv_step_profile_cpu.json "
           "--md docs/performance.md` from its profile (one pinned core, one XLA thread, the machine otherwise "
           "idle) and `docs/reproductions/bench_vs_pytorch_cpu.json` "
           "(`benchmarks/bench_vs_pytorch.py --layers`, PyTorch beside vaekl on the same core). "
           "The Locatello et al. conv VAE, batch 64, Bernoulli, Adam.", ""]
    if vs:
        sps = vs["seconds_per_step"]
        out += [f"## The step against PyTorch ({vs.get('torch', 'PyTorch')}, the same core)", "",
                f"vaekl {sps['vaekl']:.3f} s/step, PyTorch {sps['pytorch']:.3f} s/step: PyTorch ÷ vaekl "
                f"= **{vs['pytorch_over_vaekl']:.2f}×** (above 1: vaekl faster{_rounds(vs, 'pytorch')}). A step is "
                f"{vs['step_gflop']:.2f} GFLOP; the matmul ceiling measured in that run: "
                f"{vs['matmul_ceiling_gflops']['jax']:.0f} GFLOP/s, so the floor is "
                f"{vs['step_gflop'] / vs['matmul_ceiling_gflops']['jax']:.3f} s/step.", ""]
        if "pytorch_keep_freed" in sps:
            out += [f"PyTorch given the allocator setting vaekl's entry points make (`vaekl/host_memory.py`: "
                    f"glibc keeps freed memory, so a step's buffers are not page-faulted in again, and backs it "
                    f"with transparent huge pages) takes "
                    f"{sps['pytorch_keep_freed']:.3f} s/step: against that, PyTorch ÷ vaekl = "
                    f"**{vs['pytorch_keep_freed_over_vaekl']:.2f}×**{_rounds(vs, 'pytorch_keep_freed', ' (')}. Both frameworks lose ~20 ms a step to "
                    "page faults with glibc's defaults; a researcher's PyTorch script has them.", ""]
        out += [
                "| layer | vaekl fwd [ms] | vaekl fwd+bwd | vaekl fwd+bwd, XLA's native gradients | "
                "PyTorch fwd | PyTorch fwd+bwd |", "|---|---|---|---|---|---|"]
        lay = vs["layers"]
        for name, v in lay["vaekl"].items():
            t = lay["pytorch"].get(name, [float("nan")] * 2)
            out.append(f"| {name} | {1e3 * v['fwd']:.1f} | {1e3 * v['fwd_bwd']:.1f} | {1e3 * v['fwd_bwd_native']:.1f} "
                       f"| {1e3 * t[0]:.1f} | {1e3 * t[1]:.1f} |")
        tot = sum(v["fwd_bwd"] for v in lay["vaekl"].values())
        tt = sum(t[1] for t in lay["pytorch"].values())
        out += ["", f"Each layer alone: vaekl {1e3 * tot:.0f} ms, PyTorch {1e3 * tt:.0f} ms of forward + "
                f"backward; the whole step is {1e3 * sps['vaekl']:.0f} vs {1e3 * sps['pytorch']:.0f} ms. " +
                ("So vaekl's layers are faster alone by more than its step is: the rest of the time goes "
                 "between and around the layers, in the compiled step (below)."
                 if tot / tt < sps["vaekl"] / sps["pytorch"] else
                 "The layers alone account for the step's difference."), ""]
        if "group_size" in vs:
            g = vs["group"]
            spread = vs.get("group_over_one_by_round", {})
            out += [f"A group of {vs['group_size']} models in one compiled program: "
                    + ", ".join(f"{mode} {g[mode]:.3f} s per model-step ({g[mode] / g['one']:.2f}× one model's "
                                f"{g['one']:.3f}" + (f"; rounds {min(spread[mode]):.2f}–{max(spread[mode]):.2f}×"
                                                     if mode in spread else "") + ")"
                                for mode in g if mode != "one") + ".", ""]
    kt = prof["kernels_ms_per_step"]
    out += [f"## Inside vaekl's compiled step (XLA:CPU profile, {prof['device']}, jax {prof['jax']})", "",
            f"{prof['seconds_per_step']:.3f} s/step measured, {kt:.0f} ms of kernels per step in "
            f"{prof['kernels']} kernels.", "", "| kind | ms/step | share |", "|---|---|---|"]
    out += [f"| {k} | {v:.1f} | {100 * v / kt:.0f} % |" for k, v in prof["by_kind_ms"].items()]
    out += ["", "The slowest kernels:", "", "| kernel | ms/step | kind | output | from |", "|---|---|---|---|---|"]
    out += [f"| {t['kernel']} | {t['ms']:.1f} | {t['kind']} | `{t.get('shape', '')}` | `{t.get('op', '')[:70]}` |"
            for t in prof["top_kernels"][:15]]
    out += ["", "Reading it: the convolutions and dots XLA:CPU hands to YNNPACK are most of the step. "
            "The two 32×32×32→32 weight gradients are one matmul each over the space-to-depth phases "
            "(`vaekl.models.conv.strided_conv_kernel_grad_matmul`: the `dot_general` to `[128,128]`, with the "
            "phases' transpose `copy_bitcast_fusion` and the shifted cotangent `slice_concatenate_fusion` that "
            "feed it); XLA's own weight gradient there took a transpose of the activations plus a slower "
            "convolution (step 120.7 → 109.0 ms, A/B in one process). The one-channel weight gradients (the "
            "first layer's, and the last layer's through its adjoint) are one matmul of the taps' strided "
            "slices (`strided_conv_kernel_grad_taps`, the `dot_general` to `[16,32]`), and the last transposed "
            "convolution is one stride-1 convolution over its four phases' shared window (`_by_one_conv`, "
            "output `[64,32,32,4]`): 7.7 → 3.0 ms forward, where each phase alone was a matrix-vector "
            "product. The batch is rendered into memory once (`vaekl.loops.materialize`), where XLA used to "
            "re-render dSprites inside each padding or transpose that read it (step 3.6 % faster). The "
            "process backs its heap with transparent huge pages (`vaekl.host_memory`): 131 → 120 ms a step "
            "with both cores busy. A group's members run in order inside their program, each one's inputs "
            "taken after the previous one's outputs (`vaekl.loops.run_map`); interleaved by XLA, a group of 4 "
            "cost 1.09–1.13× one model's time per member, in order 1.00–1.03×.", "",
            "Tried and not kept (no gain in the step measured side by side): im2col for the first "
            "convolution's forward (1.0 → 9.2 ms), the matmul weight gradient on the 16×16 and 8×8 layers "
            "(slower), a 2×2 stride-1 convolution over space-to-depth input for the strided layers (32×32×32: "
            "5.1 → 11.3 ms with the rearrangement, 8.2 without), the ReLU's gradient from its output instead "
            "of its input (no change), YNNPACK's elementwise fusions (`--xla_cpu_experimental_ynn_fusion_type"
            "=+eltwise`: 141 → 180 ms), reductions outside YNNPACK (`-reduce`: slower), summing the "
            "likelihood over a flat pixel axis (XLA then fused the loss gradient into a 4-D pad costing as "
            "much). Eigen's dots instead of YNNPACK's (`-individual_dot`) were ~3 % faster in the step, but "
            "the flag is process-wide and would change every model's dots, so it is left to the user. What "
            "is left between vaekl and the floor: the layout changes around the convolutions (phase "
            "interleaving, padding, space-to-depth), the elementwise loops (bias + ReLU and its gradient at "
            "32×32×32 run at a few GB/s), and the convolutions' own efficiency (~90 GFLOP/s for the 32-channel "
            "layers against a ~145 GFLOP/s matmul ceiling)."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--core", type=int, default=-1, help="the core to run on (-1: the last usable one)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=20, help="how many of the slowest kernels to keep")
    p.add_argument("--out", default="", help="write the profile as JSON here")
    p.add_argument("--md", default="", help="write docs/performance.md here")
    p.add_argument("--vs_pytorch", default=os.path.join(REPO, "docs/reproductions/bench_vs_pytorch_cpu.json"))
    p.add_argument("--from_json", default="", help="a profile written by --out: only write --md from it")
    a = p.parse_args()
    if a.from_json:
        prof = json.load(open(a.from_json))
    else:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[a.core] if a.core < 0 else a.core})
        prof = profile(a.steps, a.top)
    print(f"{prof['seconds_per_step']:.3f} s/step; kernels {prof['kernels_ms_per_step']:.0f} ms/step")
    for k, v in prof["by_kind_ms"].items():
        print(f"  {v:8.1f} ms  {k}")
    for t in prof["top_kernels"][:10]:
        print(f"  {t['ms']:8.1f} ms  {t['kernel']:32s} {t.get('shape', '')}  {t.get('op', '')[:60]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(prof, f, indent=1)
    if a.md:
        vs = json.load(open(a.vs_pytorch)) if os.path.exists(a.vs_pytorch) else None
        with open(a.md, "w") as f:
            f.write(markdown(prof, vs))
        print(f"wrote {a.md}")


if __name__ == "__main__":
    main()

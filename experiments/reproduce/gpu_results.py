"""What ``benchmarks/gpu/run.sh`` measured on an accelerator, as committed result files.

    python -m experiments.reproduce.gpu_results --results=DIR [--out=docs/reproductions]

DIR is run.sh's output directory (as fetched back: env.json, timing.json, tests.xml, the parts'
logs and runs.tgz of the slice's run directories, checkpoints left out). Writes
``OUT/<device>_gpu.json`` (device, versions, each part's exit status and time, the device tests'
counts, the conv step against PyTorch as printed by bench_vs_pytorch) and the slice's curves
``OUT/locatello_beta_tc_vae_gpu.{json,png}`` (:mod:`locatello_curves`). Numbers are read from
the files, never typed in.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import xml.etree.ElementTree as ET

from absl import app
from absl import flags

from experiments.reproduce import locatello_curves

_RESULTS = flags.DEFINE_string("results", None, "run.sh's output directory.")
_OUT = flags.DEFINE_string("out", "docs/reproductions", "Where the result files go.")

SLICE = "locatello_beta_tc_vae_gpu"


def _read(path: str) -> str:
    return open(path).read() if os.path.exists(path) else ""


def tests_summary(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root[0]
    return {k: float(suite.attrib[k]) if k == "time" else int(suite.attrib[k])
            for k in ("tests", "failures", "errors", "skipped", "time")}


def conv_step(log: str) -> dict | None:
    """bench_vs_pytorch's printed lines: seconds per step and GFLOP/s of each framework."""
    out = {}
    for name, sec, gflops in re.findall(r"^\s+(vaekl|pytorch)\s+([\d.]+) s/step\s+([\d.]+) GFLOP/s", log, re.M):
        out[name] = {"seconds_per_step": float(sec), "gflops": float(gflops)}
    m = re.search(r"step: ([\d.]+) GFLOP .*matmul ceiling (\d+) GFLOP/s \(jax\), (\d+) \(PyTorch ([^)]+)\)", log)
    if m:
        out.update(step_gflop=float(m[1]), matmul_ceiling_gflops={"jax": float(m[2]), "pytorch": float(m[3])},
                   torch=m[4])
    if "vaekl" in out and "pytorch" in out:
        out["pytorch_over_vaekl"] = out["pytorch"]["seconds_per_step"] / out["vaekl"]["seconds_per_step"]
    return out or None


def slice_rate(log: str) -> dict | None:
    """The slice's logged training rates (group steps per second × runs)."""
    rates = [(int(s), float(r), int(n)) for s, r, n in
             re.findall(r"step (\d+)/\d+ .*?([\d.]+) steps/s × (\d+) runs", log)]
    steps = re.findall(r"--config\.num_steps=(\d+)", log)
    return {"logged": [{"step": s, "steps_per_second": r, "runs": n} for s, r, n in rates],
            "num_steps": [int(s) for s in steps]} if rates else None


def collect(results: str, out: str) -> dict:
    env = json.loads(_read(os.path.join(results, "env.json")) or "{}")
    device = (env.get("devices") or ["unknown"])[0]
    res = {"device": device, "env": env, "nvidia_smi": _read(os.path.join(results, "nvidia-smi.txt")).strip(),
           "parts": json.loads(_read(os.path.join(results, "timing.json")) or "{}"),
           "device_tests": tests_summary(os.path.join(results, "tests.xml")),
           "conv_step": conv_step(_read(os.path.join(results, "conv_step.log"))),
           "slice_training": slice_rate(_read(os.path.join(results, "slice.log")))}
    tgz = os.path.join(results, "runs.tgz")
    if os.path.exists(tgz):
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(tgz) as t:
                t.extractall(tmp, filter="data")
            runs = os.path.join(tmp, "slice_runs", "beta_tc_vae")
            sl = locatello_curves.summarize(runs, out, SLICE, extra={"device": device})
            res["slice"] = None if sl is None else {"file": f"{SLICE}.json", "runs": sl["runs"],
                                                    "last_step": sl["last_step"], "verdicts": sl["verdicts"]}
    name = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") + "_gpu"
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv):
    del argv
    res = collect(_RESULTS.value, _OUT.value)
    print(json.dumps({k: v for k, v in res.items() if k != "nvidia_smi"}, indent=1)[:3000])


if __name__ == "__main__":
    flags.mark_flags_as_required(["results"])
    app.run(main)

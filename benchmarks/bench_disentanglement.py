"""Benchmark: wall time of each disentanglement metric with disentanglement_lib's defaults.

    python benchmarks/bench_disentanglement.py [--factor-sizes 3,6,40,32,32] [--dim 10]
                                               [--skip-gbt] [--mig-sampling-stride 1,1,4,4,4]

The ground truth is a toy with dSprites' factor sizes (without colour) whose observation is
its factor vector scaled to [0, 1]; the representation is a jitted linear + tanh map to
``--dim`` codes standing in for an encoder (each factor mostly in one code, some mixing,
the remaining codes mixtures). Every metric runs once with its defaults (10,000 train /
5,000 test points, etc.); DCI with both importance models. ``mig_sampling`` (Chen's
estimator) runs on a sub-grid (``--mig-sampling-stride``) and is reported apart from the
total. Prints one table: wall and process CPU seconds (all threads; they differ when the
machine is shared) and the main scores per metric.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import disentanglement as dis


class ScaledFactors:
    """Uniform independent factors observed as factor / (size − 1), float32 [n, F]."""

    def __init__(self, sizes: tuple[int, ...]):
        self.factor_sizes = sizes
        self._scale = 1.0 / np.maximum(np.asarray(sizes, np.float32) - 1.0, 1.0)

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.factor_sizes, size=(n, len(self.factor_sizes)))

    def sample_observations_from_factors(self, factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(factors, np.float32) * self._scale


def make_encoder(num_factors: int, dim: int, seed: int = 0):
    """(representation_fn, posterior_fn): tanh(x W + b) codes [B, dim], and with log-variance −4."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = 0.4 * jax.random.normal(k1, (num_factors, dim))
    w = w.at[jnp.arange(min(num_factors, dim)), jnp.arange(min(num_factors, dim))].add(2.0)
    b = 0.1 * jax.random.normal(k2, (dim,))
    encode = jax.jit(lambda x: jnp.tanh((x - 0.5) @ w + b))
    posterior = jax.jit(lambda x: (encode(x), jnp.full((x.shape[0], dim), -4.0)))
    return encode, posterior


def _summary(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in scores.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor-sizes", default="3,6,40,32,32")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--skip-gbt", action="store_true", help="time DCI with random_forest only")
    parser.add_argument("--mig-sampling-stride", default="1,1,4,4,4",
                        help="grid stride per factor for mig_sampling; 'none' to skip it")
    args = parser.parse_args()

    sizes = tuple(int(s) for s in args.factor_sizes.split(","))
    gt = ScaledFactors(sizes)
    encode, posterior = make_encoder(len(sizes), args.dim)
    print(f"toy ground truth factor_sizes={sizes}, codes d={args.dim}, backend={jax.default_backend()}")

    runs = [(name, fn, {}) for name, fn in dis.METRICS.items() if name != "dci"]
    runs.insert(3, ("dci[random_forest]", dis.dci, {"model": "random_forest"}))
    if not args.skip_gbt:
        runs.insert(3, ("dci[gbt]", dis.dci, {"model": "gbt"}))

    rows = []
    for i, (name, fn, kwargs) in enumerate(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        scores = fn(gt, encode, np.random.default_rng(i), **kwargs)
        rows.append((name, time.perf_counter() - t0, time.process_time() - c0, scores))
        print(f"  done {name}: {rows[-1][1]:.2f} s", flush=True)

    extra = []
    if args.mig_sampling_stride != "none":
        stride = tuple(int(s) for s in args.mig_sampling_stride.split(","))
        t0, c0 = time.perf_counter(), time.process_time()
        scores = dis.mig_sampling(gt, posterior, np.random.default_rng(99), grid_stride=stride)
        grid = int(np.prod([len(range(0, s, st)) for s, st in zip(sizes, stride)]))
        extra.append((f"mig_sampling[stride={stride}, N={grid}]", time.perf_counter() - t0,
                      time.process_time() - c0, scores))

    width = max(len(r[0]) for r in rows + extra)
    print(f"\n{'metric':<{width}}  {'wall s':>8}  {'cpu s':>8}  scores")
    for name, sec, cpu, scores in rows + extra:
        print(f"{name:<{width}}  {sec:8.2f}  {cpu:8.2f}  {_summary(scores)}")
    totals = (("DCI[random_forest]", "dci[gbt]"), ("DCI[gbt] (disentanglement_lib)", "dci[random_forest]"))
    for label, skip in totals:
        if args.skip_gbt and skip == "dci[random_forest]":
            continue
        wall = sum(r[1] for r in rows if r[0] != skip)
        cpu = sum(r[2] for r in rows if r[0] != skip)
        print(f"total, all metrics with {label}: {wall:.2f} s wall, {cpu:.2f} s cpu")


if __name__ == "__main__":
    main()

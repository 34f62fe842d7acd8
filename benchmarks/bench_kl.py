"""Benchmark: the jitted diagonal KL against naive NumPy and the memory-bandwidth floor.

    python benchmarks/bench_kl.py [--rows 1048576] [--k 64] [--repeats 5]

For kl_std_normal (2 inputs) and kl_diag (4 inputs), on a [rows, k] float32 batch,
prints the median time of (a) the jitted vaekl function, (b) a naive unfused NumPy
version, and (c) the floor: bytes read / the device's copy bandwidth measured in the
same run by a jitted in-place ``x + 1``. All numbers come from one process, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import kl


def _median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _numpy_std_normal(m, v):
    return 0.5 * np.sum(np.exp(v) - 1.0 - v + m * m, axis=-1)


def _numpy_diag(mq, vq, mp, vp):
    return 0.5 * np.sum(np.exp(vq - vp) - 1.0 - (vq - vp) + (mq - mp) ** 2 / np.exp(vp), axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_048_576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.rows, args.k)
    host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    dev = [jax.device_put(x) for x in host]
    nbytes = host[0].nbytes

    # In-place copy (donated buffer): one read and one write per element, no page faults
    # from allocating a fresh output each call.
    copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    buf = [jnp.array(dev[0])]

    def run_copy():
        buf[0] = copy(buf[0])
        buf[0].block_until_ready()

    t_copy = _median_time(run_copy, args.repeats)
    bandwidth = 2 * nbytes / t_copy
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {shape} float32")
    print(f"measured copy bandwidth (jitted x + 1): {bandwidth / 1e9:.1f} GB/s")

    cases = [
        ("kl_std_normal", jax.jit(kl.kl_std_normal), _numpy_std_normal, 2),
        ("kl_diag", jax.jit(kl.kl_diag), _numpy_diag, 4),
    ]
    print(f"{'function':<15}{'vaekl jit':>12}{'numpy':>12}{'floor':>12}"
          f"{'numpy/vaekl':>14}{'vaekl/floor':>14}")
    for name, jitted, naive, n_in in cases:
        t_jax = _median_time(lambda: jitted(*dev[:n_in]).block_until_ready(), args.repeats)
        t_np = _median_time(lambda: naive(*host[:n_in]), max(1, args.repeats // 2))
        floor = (n_in * nbytes + args.rows * 4) / bandwidth
        np.testing.assert_allclose(np.asarray(jitted(*dev[:n_in])), naive(*host[:n_in]), rtol=1e-3)
        print(f"{name:<15}{t_jax * 1e3:>10.1f}ms{t_np * 1e3:>10.1f}ms{floor * 1e3:>10.1f}ms"
              f"{t_np / t_jax:>13.1f}x{t_jax / floor:>13.2f}x")


if __name__ == "__main__":
    main()

"""The Locatello et al. / β-VAE paper conv VAE in PyTorch, for ``bench_vs_pytorch.py`` only.

Runs under a separate Python that has torch (never a vaekl dependency) and prints one JSON
line of timings. Same model and float32 math as vaekl's ``experiments/reproduce/
locatello_dsprites.py:beta_vae``: 64×64×1 binary images, encoder 4 × [4×4 stride-2 conv:
32, 32, 64, 64] + dense 256 + linear head (μ, log σ²) for k = 10, decoder dense 256, dense
4·4·64, 4 × 4×4 stride-2 transposed conv (64, 32, 32, 1), ReLU, Bernoulli likelihood
(logits), closed-form KL to N(0, I) with weight β, Adam (1e-4, 0.9, 0.999, 1e-8), batch 64.

    python benchmarks/torch_conv_vae.py --steps 20 --threads 1 [--layers] [--keep_freed_memory]

``--keep_freed_memory`` gives PyTorch the glibc allocator setting vaekl's entry points use
(``vaekl/host_memory.py``, loaded by path so that this interpreter needs no jax: freed memory
kept, the heap backed by transparent huge pages): PyTorch's step page-faults its freed buffers
back in too, and is faster with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class ConvVAE(nn.Module):
    def __init__(self, k: int = 10, channels=(32, 32, 64, 64), hidden: int = 256):
        super().__init__()
        ins = (1, *channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, 2, 1) for a, b in zip(ins, channels))
        self.enc_dense = nn.Linear(4 * 4 * channels[-1], hidden)
        self.head = nn.Linear(hidden, 2 * k)
        rev = tuple(reversed(channels))
        self.dec_dense = nn.Linear(k, hidden)
        self.project = nn.Linear(hidden, 4 * 4 * rev[0])
        outs = (*rev[1:], 1)
        self.deconvs = nn.ModuleList(nn.ConvTranspose2d(a, b, 4, 2, 1) for a, b in zip(rev, outs))
        self.rev0 = rev[0]

    def encode(self, x):
        for c in self.convs:
            x = F.relu(c(x))
        h = F.relu(self.enc_dense(x.flatten(1)))
        mu, logvar = self.head(h).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        x = F.relu(self.project(F.relu(self.dec_dense(z))))
        x = x.view(-1, self.rev0, 4, 4)
        for d in self.deconvs[:-1]:
            x = F.relu(d(x))
        return self.deconvs[-1](x)


def loss_fn(model: ConvVAE, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    logits = model.decode(z)
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)
    return (nll + beta * kl).mean()


def median_time(fn, steps: int) -> float:
    fn()  # warm up
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", action="store_true", help="also time each layer, forward and backward")
    p.add_argument("--matmul", type=int, default=1024, help="size of the square matmul ceiling")
    p.add_argument("--device", default="cpu")
    p.add_argument("--serve", action="store_true",
                   help="answer commands on stdin, one JSON line each: info | steps N | matmul | layers N")
    p.add_argument("--keep_freed_memory", action="store_true", help="glibc keeps freed memory (as vaekl does)")
    args = p.parse_args()
    kept = _host_memory().keep_freed_memory() if args.keep_freed_memory else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = ConvVAE().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    x = (torch.rand(args.batch, 1, 64, 64) < 0.2).float().to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()
        opt.step()
        sync()

    n = args.matmul
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    matmul = lambda: 2 * n**3 / median_time(lambda: (a @ b, sync()), 10) / 1e9  # noqa: E731
    if args.serve:
        serve(model, x, step, matmul, kept)
        return
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "keep_freed_memory": kept,
           "step_s": median_time(step, args.steps), "matmul_gflops": matmul()}
    if args.layers:
        out["layers"] = layer_times(model, x, args.steps)
    print(json.dumps(out))


def _host_memory():
    """vaekl/host_memory.py as a module, without importing the vaekl package (and jax)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vaekl", "host_memory.py")
    spec = importlib.util.spec_from_file_location("host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(model, x, step, matmul, kept: bool = False) -> None:
    import sys  # pylint: disable=g-import-not-at-top
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "info":
            out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "keep_freed_memory": kept}
        elif cmd == "steps":
            step()
            out = []
            for _ in range(int(arg[0])):
                t0 = time.perf_counter()
                step()
                out.append(time.perf_counter() - t0)
        elif cmd == "matmul":
            out = matmul()
        elif cmd == "layers":
            out = layer_times(model, x, int(arg[0]))
        else:
            out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)


def layer_times(model: ConvVAE, x: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """{layer: [forward s, forward + backward s]} at the inputs the model feeds it."""
    res = {}
    h = x
    for i, c in enumerate(model.convs):
        res[f"enc_conv{i}"] = _fb(c, h, steps)
        h = F.relu(c(h)).detach()
    z = torch.randn(x.shape[0], model.dec_dense.in_features)
    h = F.relu(model.project(F.relu(model.dec_dense(z)))).view(-1, model.rev0, 4, 4).detach()
    for i, d in enumerate(model.deconvs):
        res[f"dec_deconv{i}"] = _fb(d, h, steps)
        h = F.relu(d(h)).detach()
    return res


def _fb(layer, h, steps):
    h = h.clone().requires_grad_(True)
    with torch.no_grad():
        fwd = median_time(lambda: layer(h), steps)
    g = torch.randn_like(layer(h))

    def both():
        layer.zero_grad(set_to_none=True)
        layer(h).backward(g)
    return [fwd, median_time(both, steps)]


if __name__ == "__main__":
    main()

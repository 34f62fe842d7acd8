"""The benchmark helpers that turn measurements into docs: kernel kinds and docs/performance.md."""

from __future__ import annotations

import os

from benchmarks import profile_conv_step as prof


def test_kernel_kinds():
    assert prof.kind("ynn_fusion.11") == "convolutions and dots (YNNPACK)"
    assert prof.kind("transpose_copy_fusion.5") == "layout: transposes"
    assert prof.kind("copy_bitcast_fusion.3") == "layout: copies"
    assert prof.kind("bitcast_concatenate_fusion.2") == "layout: concatenations (phases interleaved)"
    assert prof.kind("add_maximum_fusion") == "elementwise and reductions"


def test_performance_page_from_a_profile_and_the_pytorch_comparison(tmp_path):
    profile = {"device": "cpu", "jax": "0", "seconds_per_step": 0.2, "kernels_ms_per_step": 180.0, "kernels": 3,
               "by_kind_ms": {"convolutions and dots (YNNPACK)": 120.0, "layout: transposes": 60.0},
               "top_kernels": [{"kernel": "ynn_fusion.11", "ms": 30.0, "kind": "convolutions and dots (YNNPACK)",
                                "shape": "f32[32,4,4,32]", "op": "transpose(jvp())/conv_general_dilated"}]}
    vs = {"torch": "2.x", "seconds_per_step": {"vaekl": 0.2, "pytorch": 0.15}, "pytorch_over_vaekl": 0.75,
          "step_gflop": 6.0, "matmul_ceiling_gflops": {"jax": 120.0},
          "layers": {"vaekl": {"enc_conv0": {"fwd": 0.001, "fwd_bwd": 0.01, "fwd_bwd_native": 0.02}},
                     "pytorch": {"enc_conv0": [0.002, 0.03]}}}
    md = prof.markdown(profile, vs)
    assert "**0.75×**" in md and "| enc_conv0 | 1.0 | 10.0 | 20.0 | 2.0 | 30.0 |" in md
    assert "| layout: transposes | 60.0 | 33 % |" in md and "`f32[32,4,4,32]`" in md
    assert "floor is 0.050 s/step" in md
    assert "XLA_FLAGS" not in os.environ or "xla_dump_to" not in os.environ["XLA_FLAGS"]  # importing changed nothing
    assert "## The step against PyTorch" not in prof.markdown(profile, None)
    # The spread over the benchmark's rounds, where it was recorded.
    vs.update(over_vaekl_by_round={"pytorch": [0.7, 0.8, 0.76]}, group_size=4,
              group={"one": 0.2, "sequential": 0.21}, group_over_one_by_round={"sequential": [1.01, 1.08]})
    md = prof.markdown(profile, vs)
    assert "**0.75×** (above 1: vaekl faster; rounds 0.70–0.80×)" in md
    assert "sequential 0.210 s per model-step (1.05× one model's 0.200; rounds 1.01–1.08×)" in md

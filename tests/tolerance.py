"""Tolerances for fp32 results that two computations reach in different orders: a cached decoding step against the
full forward, a padded batch against an unpadded one, a fused or packed kernel against the plain one, the exported
class against our model.

Such results are not bitwise equal, and by how much they differ depends on the CPU: the kernels sum in blocks
sized to the vector width (AVX2 and AVX-512 give different orders), so a bare 1e-5 that passes on one x86-64 CPU
fails on another (issue 27: 1.04e-5 on an AMD EPYC with AVX-512). Rounding a sum of K fp32 terms of magnitude up
to m errs by about eps * sqrt(K) * m (K * eps * m at worst); a network of a few layers carries and amplifies that
by a small factor. So the tolerance is

    atol = C * eps_fp32 * sqrt(K) * max(max|reference|, 1)

with K the longest reduction of the computation (hidden, ffn, sequence or vocab size), the reference's largest
magnitude (at least 1: the layers in between are LayerNorm-normalised, of order 1, however small the compared
values are) and C = 32: the tiny models of these tests have up to 5 layers, and what was measured on AVX2 and with
ATEN_CPU_CAPABILITY=default stays below C / 8 (see docs/_notes_misc.md). The bugs these comparisons are there for (a
leaked mask, a wrong cache offset, a mixed-up weight) differ by 1e-3 to 1, far above it for the tests' sizes.

Exact equality stays exact where it is deliberate: the same computation in the same order (resume equality,
activation checkpointing's losses) is compared with rtol=0, atol=0, never with this.
"""
from __future__ import annotations

import math
import os

import torch

EPS_FP32 = torch.finfo(torch.float32).eps  # 1.19e-7
C = 32.0


def fp32_atol(reference: torch.Tensor, accumulation: int, c: float = C) -> float:
    """The absolute tolerance for an fp32 result near `reference` whose longest reduction sums `accumulation` terms."""
    scale = max(float(reference.detach().abs().max()), 1.0) if reference.numel() else 1.0
    return c * EPS_FP32 * math.sqrt(accumulation) * scale


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor, accumulation: int, what: str = "") -> None:
    """`got` equals `want` to fp32_atol(want, accumulation); with PRETRAIN_TOLERANCE_REPORT=1 the ratio of the
    difference to the tolerance is printed (how the constants above were checked)."""
    atol = fp32_atol(want, accumulation)
    if os.environ.get("PRETRAIN_TOLERANCE_REPORT") and got.numel():
        diff = float((got.detach().double() - want.detach().double()).abs().max())
        print(f"tolerance {what or '?'}: max diff {diff:.3g}, atol {atol:.3g}, ratio {diff / atol:.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}" if what else m)

"""Optimizers: which fused DeepSpeed kernels this machine can run, and the plain LAMB used where it cannot.

`train.optimizer=adamw`: DeepSpeed's AdamW, fused (FusedAdam on GPU; on CPU DeepSpeed JIT-builds its C++ fused
Adam) when `deepspeed.torch_adam=false`, torch.optim.AdamW when true (the plain fallback).
`train.optimizer=lamb`: DeepSpeed's `"type": "Lamb"` (FusedLamb, a CUDA kernel) where the accelerator can build it,
otherwise `Lamb` below, handed to `deepspeed.initialize` as a client optimizer.

Under ZeRO the optimizer never sees a layer: ZeRO hands it one flat fp32 tensor per parameter group (and sub-group)
holding this rank's partition of every parameter in the group. DeepSpeed's Lamb (FusedLamb) takes the trust ratio
||w|| / ||update|| over that whole tensor: over many layers at once, and over a share of them that changes with
the number of ranks. This one is told the layout (`lay_out`, from engine.initialize): it sums each parameter's
squares over its slice of the partition, adds them up across the ranks (one all-reduce per flat tensor and step)
and takes one ratio per parameter, as LAMB defines it. So under ZeRO `train.optimizer=lamb` always runs this one.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

OPTIMIZERS = ("adamw", "lamb")


def fused_lamb_status() -> tuple[bool, str]:
    """(True, how) if DeepSpeed's FusedLamb can run here, else (False, why not). Checks the accelerator's op
    builder without building anything: CUDA only, and either prebuilt or JIT-buildable (CUDA toolkit + ninja)."""
    from deepspeed.accelerator import get_accelerator  # deepspeed: ~2 s to import; only to ask about FusedLamb

    acc = get_accelerator()
    builder = acc.create_op_builder("FusedLambBuilder")
    if builder is None or type(builder).__name__ == "NotImplementedBuilder":
        return False, f"DeepSpeed's {acc.device_name()} accelerator has no FusedLamb op"
    if not builder.is_compatible(verbose=False):
        return False, f"FusedLamb is not compatible with this machine ({builder.error_log})"
    from deepspeed.git_version_info import installed_ops  # deepspeed: as above

    if installed_ops.get(builder.name, False):
        return True, "prebuilt"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available  # torch: its C++ build helpers, only here

    if CUDA_HOME is None or not is_ninja_available():
        return False, "FusedLamb is not prebuilt and there is no CUDA toolkit and ninja to JIT-build it"
    return True, "JIT-built on first use"


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) in plain torch, with DeepSpeed FusedLamb's arithmetic so either may replace the other:

        m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
        u = m / (sqrt(v) + eps) + wd * w      (weight decay decoupled: it never enters the moments)
        r = clamp(||w|| / ||u||, min_coeff, max_coeff), or 1 when either norm is 0
        w = w - lr * sqrt(1 - b2^t) / (1 - b1^t) * r * u

    Bias correction is folded into the step size, as in FusedLamb (and apex): the trust ratio is computed on the
    uncorrected update, so the factor sqrt(1 - b2^t) / (1 - b1^t) is not normalised away and acts as a slow
    warm-up (with b2=0.999: 0.32 at t=1, 0.15 at t=10, 0.31 at t=100, 0.8 at t=1000). With the
    trust ratio the step is about lr * ||w|| per tensor: LAMB's learning rate is not Adam's. Moments are kept in the parameter's dtype (fp32 under ZeRO: its master partitions), and
    the step count is an int, so a resumed run recomputes b^t exactly (bitwise resume).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_coeff: float = 10.0, min_coeff: float = 0.01,
                 bias_correction: bool = True):  # fmt: skip
        if lr <= 0 or eps < 0 or weight_decay < 0 or not 0 <= min_coeff <= max_coeff:
            raise ValueError(f"Lamb: bad settings lr={lr} eps={eps} weight_decay={weight_decay} "
                             f"min_coeff={min_coeff} max_coeff={max_coeff}")  # fmt: skip
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas={betas}: each must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_coeff=max_coeff,
                        min_coeff=min_coeff, bias_correction=bias_correction)  # fmt: skip
        super().__init__(params, defaults)
        self.layouts: dict[int, tuple[list[int], object]] = {}

    def lay_out(self, flat: torch.Tensor, sizes: list[int], group=None) -> None:
        """`flat` (a tensor this optimizer will step) holds the slices of len(sizes) parameters, one after
        another, `sizes` long (this rank's ZeRO partitions of them); the whole parameters are these slices on
        every rank of `group`. The trust ratio is then each parameter's, not flat's."""
        if sum(sizes) != flat.numel():
            raise ValueError(f"Lamb.lay_out: slices of {sum(sizes)} elements for a tensor of {flat.numel()}")
        self.layouts[id(flat)] = (list(sizes), group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                g = p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                step_size = group["lr"]
                if group["bias_correction"]:
                    step_size *= math.sqrt(1 - beta2**t) / (1 - beta1**t)
                sizes, over = self.layouts.get(id(p), ([p.numel()], None))
                slices = [(w.view(-1), u.view(-1)) for w, u in zip(p.view(-1).split(sizes), update.view(-1).split(sizes))]
                # squared norms in float64: a float32 sum's last bits follow the CPU's thread split, which would make
                # two identical runs (and a resumed one) differ
                squares = torch.stack([torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) ** 2 for x in pair])
                                       for pair in slices]) if slices else torch.zeros(0, 2, dtype=torch.float64)  # fmt: skip
                if over is not None and dist.get_world_size(over) > 1:
                    dist.all_reduce(squares, group=over)
                w_norm, u_norm = squares.sqrt().unbind(-1)
                ratio = torch.where(
                    (w_norm > 0) & (u_norm > 0),
                    (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"]),
                    torch.ones_like(w_norm),
                )  # fmt: skip
                for (w, u), r in zip(slices, ratio):
                    w.sub_(u.mul_((r * step_size).to(p.dtype)))
        return loss

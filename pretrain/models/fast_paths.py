"""The fast paths of the models, each a faster way to the result of a plain computation, kept apart from the
layers that use them (layers.py, palm.py): the lane dropout (CPU dropout masks from PCG64 lanes rather than torch's
Bernoulli draws), the attention implementations (SDPA, or the math path with the lane dropout), and the unpadded
rows (Packing: the position-wise work on real tokens only, with the host's indices and the per-device default).
tests/test_fast_paths.py holds each equal to its plain path; RESULTS.md has what each saves.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.config import ATTENTION_IMPLS


class _LaneDropout(torch.autograd.Function):
    """Dropout whose mask comes from 32-bit lanes of a fast counter-free generator (numpy's PCG64).

    On CPU, torch's dropout draws one Bernoulli variate per element through its Mersenne twister (in
    `bench/speed.py --profile`, 9% of BertForPreTraining's step and 19% of BART's). Here each call draws one
    int64 from torch's generator (so torch.manual_seed and the RNG states saved in checkpoints still fix every
    mask: resume stays exact) and seeds a PCG64 stream with it, whose 64-bit outputs, several times cheaper than
    the twister's, give two uniform 32-bit lanes each. An element is dropped when its lane falls below round(p * 2**32) from the
    bottom of the int32 range: P(drop) = round(p * 2**32) / 2**32, within 2**-33 of p (torch's float32
    comparison is coarser: 2**-24). The mask is kept as bool (1 byte per element), as torch's.

    rescale=False leaves out the 1 / (1 - p) of the kept elements, for a caller that applies it to a smaller
    tensor downstream (attention: to probs @ v rather than to probs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
        n = x.numel()
        seed = int(torch.empty((), dtype=torch.int64).random_())
        lanes = torch.from_numpy(np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.int32)[:n])
        drop = lanes.view(x.shape) < round(p * 2**32) - 2**31
        ctx.save_for_backward(drop)
        ctx.scale = 1.0 / (1.0 - p) if rescale else 1.0
        out = torch.where(drop, 0.0, x)  # one pass (masked_fill copies, then fills)
        return out.mul_(ctx.scale) if rescale else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        out = torch.where(drop, 0.0, grad)
        return (out.mul_(ctx.scale) if ctx.scale != 1.0 else out), None, None


def dropout(x: torch.Tensor, p: float, training: bool, rescale: bool = True) -> torch.Tensor:
    """Dropout with probability p: torch's on GPU (one fused kernel), the lane dropout above on CPU.
    rescale=False (CPU only): the caller multiplies by 1 / (1 - p) itself."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    if x.device.type == "cpu":
        return _LaneDropout.apply(x, p, rescale)
    if not rescale:
        raise ValueError("rescale=False is for the CPU lane dropout only")
    return F.dropout(x, p, True)


class Dropout(nn.Module):
    """nn.Dropout's interface over `dropout` (no parameters: state dicts are unchanged)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float,
    training: bool, impl: str, need_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Scaled dot-product attention over q [B, H, T, d] and k, v [B, H, S, d]; returns [B, H, T, d] and, if
    need_probs, the probabilities [B, H, T, S] before dropout (in q's dtype).

    mask: bool, broadcast to [B, H, T, S], True = may attend (None: everything). is_causal: query i sees keys
    <= i (top-left aligned, as SDPA's; SDPA refuses it together with a mask).

    impl="sdpa": F.scaled_dot_product_attention, which on GPU picks a fused kernel (FlashAttention on sm80+,
    the memory-efficient kernel on V100/sm70, both accumulating the softmax in fp32) and on CPU a fused or
    the math kernel (the math kernel upcasts fp16/bf16 to fp32 unless
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)). impl="math": the plain reference, also
    used whenever the probabilities are needed (SDPA does not return them): the scores in the input dtype
    (q is scaled before the product so that fp16 scores cannot overflow where the scaled ones would not),
    the softmax in float32 then cast back, dropout, then @ v.
    """
    p = dropout_p if training else 0.0
    # On CPU, SDPA with dropout runs its math kernel anyway, with torch's Bernoulli draws: the math path below
    # is the same computation with the cheaper lane dropout.
    if impl == "sdpa" and not need_probs and (p == 0.0 or q.device.type != "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal), None
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r}: must be one of {', '.join(ATTENTION_IMPLS)}")
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))  # in place: the product's output is not saved for backward
    probs = scores.float().softmax(-1).to(q.dtype)
    if p > 0.0 and q.device.type == "cpu":  # the dropout's rescaling on [B, H, T, d], not on [B, H, T, S]
        y = (dropout(probs, p, True, rescale=False) @ v).mul_(1.0 / (1.0 - p))
    else:
        y = (F.dropout(probs, p) if p > 0 else probs) @ v
    return y, probs if need_probs else None


# Whether the position-wise work runs on the real tokens only (Packing) where model.unpad is null (auto), by device
# type. CPU: measured faster at every padding share (bench/speed.py). CUDA: fewer FLOPs, but every projection then
# gathers and scatters [N, C] rows, memory-bound work a GPU pays for relatively more; bench/gpu_check.py measures
# both paths (its "packing" row) to settle this entry per GPU.
UNPAD_BY_DEVICE = {"cpu": True, "cuda": True}


def unpads(setting: bool | None, device: torch.device) -> bool:
    """model.unpad on a device: true or false as given; null (auto) by UNPAD_BY_DEVICE (True for a device missing)."""
    return UNPAD_BY_DEVICE.get(device.type, True) if setting is None else bool(setting)


def pack_index_key(mask_key: str) -> str:
    """The batch key of a mask's packing index: attention_mask -> pack_index, enc_attention_mask -> enc_pack_index."""
    return mask_key.replace("attention_mask", "pack_index")


def with_pack_indices(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A host batch with, beside each `*attention_mask` [B, T], the flat indices of its real tokens (Packing's
    index) under pack_index_key. Computed on the host, where the mask is: on a GPU, `nonzero` and `all` of the
    device mask would each make the host wait for the device, once per forward."""
    out = dict(batch)
    for key, mask in batch.items():
        if key.endswith("attention_mask") and mask.dim() == 2:
            out[pack_index_key(key)] = mask.reshape(-1).nonzero().squeeze(1)
    return out


class Packing:
    """The real-token rows of a padded [B, T] batch. The position-wise work (projections, FFN, norms, dropout:
    most of a layer's FLOPs) runs on these N rows only; attention unpacks to [B, T, ...] and keeps its mask.
    Results equal the padded computation at every real position (padding positions come out as zeros).
    `transformers`' BERT and BART compute every padded position."""

    def __init__(self, attention_mask: torch.Tensor, index: torch.Tensor | None = None):
        self.batch, self.length = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1) if index is None else index

    @staticmethod
    def of(attention_mask: torch.Tensor | None, index: torch.Tensor | None = None) -> Packing | None:
        """A packing where the batch has any padding, else None: the gathers and scatters move [N, C] rows
        once per projection, cheap next to the products they shrink. index: the real tokens' flat indices,
        computed on the host (with_pack_indices): then nothing here reads the mask's values (no device sync)."""
        if attention_mask is None:
            return None
        if index is not None:
            return None if index.numel() == attention_mask.numel() else Packing(attention_mask, index)
        if bool(attention_mask.all()):
            return None
        return Packing(attention_mask)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [N, C]"""
        return x.reshape(self.batch * self.length, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] -> [B, T, C], zeros at padding"""
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, x.shape[-1])

"""The pieces both stages' models are built of: attention, the BERT encoder (pre-LN or post-LN), the
pre-training heads, BERT initialisation under ZeRO-3, and the loss every objective uses (masked_ce).

The encoder is kept free of heads so that stage two (PALM) can reuse it as is: the same module and
parameter names, so initialising stage two from stage one is a plain mapping of names.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.config import ATTENTION_IMPLS, ModelConfig


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


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        # Post-LN BERT normalises the embeddings; pre-LN normalises at the input of every block instead.
        self.norm = nn.Identity() if cfg.pre_ln else nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        # position_offset: where a decoder continuing from a key/value cache is in its sequence
        positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.drop(self.norm(x))


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


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.attn_dropout, self.impl = cfg.heads, cfg.attn_dropout, cfg.attention
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)  # one fused projection, one GEMM
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        """x: [B, T, H], or [N, H] real rows with their packing."""
        qkv = self.qkv(x) if packing is None else packing.unpack(self.qkv(x))
        b, t, h3 = qkv.shape
        q, k, v = qkv.view(b, t, 3, self.heads, h3 // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        y, _ = attend(q, k, v, attn_mask, False, self.attn_dropout, self.training, self.impl)
        y = y.transpose(1, 2).reshape(b, t, h3 // 3)
        return self.out(y if packing is None else packing.pack(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.ffn)
        self.down = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.attn_norm(x), attn_mask, packing))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, attn_mask, packing)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool (True = real token) -> [B, 1, 1, T], broadcast by SDPA over heads and queries."""
    return attention_mask[:, None, None, :]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps) if cfg.pre_ln else nn.Identity()
        self.checkpointing = cfg.activation_checkpointing
        self.unpad = cfg.unpad

    def forward(self, input_ids, token_type_ids, attention_mask, unpad: bool | None = None,
                pack_index: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Hidden states [B, T, H]. unpad: the position-wise work on real tokens only (Packing), padding
        positions coming out as zeros; False: as transformers does, padding positions computed too (the
        reference the tests hold the packed path equal to); None: model.unpad (auto: by device type).
        pack_index: the real tokens' flat indices from the host (with_pack_indices), so that no device sync
        is needed to find them."""
        x = self.embeddings(input_ids, token_type_ids)
        mask = padding_mask(attention_mask)
        if pack_index is not None and pack_index.numel() == attention_mask.numel() and x.device.type == "cuda":
            mask = None  # no padding, known on the host: SDPA may then take FlashAttention, which has no mask input
        unpad = unpads(self.unpad, x.device) if unpad is None else unpad
        packing = Packing.of(attention_mask, pack_index) if unpad else None
        if packing is not None:
            x = packing.pack(x)
        for layer in self.layers:
            if self.checkpointing and self.training:
                x = checkpoint(layer, x, mask, packing, use_reentrant=False)
            else:
                x = layer(x, mask, packing)
        x = self.final_norm(x)
        return x if packing is None else packing.unpack(x)


class MLMHead(nn.Module):
    """Transform + output projection tied to the word embeddings (the weight is passed in, not owned)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)


class SentenceHead(nn.Module):
    """Pooler (dense + tanh on [CLS]) then the 3-way sentence-structure classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.classifier = nn.Linear(cfg.hidden, cfg.sso_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation, one module at a time.

    Under `deepspeed.zero.Init` each parameter is partitioned as soon as its module is built, so it is
    gathered here (only its own module's, never the whole model), set on rank 0 and re-partitioned.
    """
    import deepspeed  # imported here so that config errors surface before DeepSpeed's start-up noise

    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, MLMHead):
                nn.init.zeros_(m.bias)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor):
    """Mean cross-entropy, summed loss, correct count and count over labels != IGNORE."""
    n = labels.numel()
    if n == 0:  # keeps the graph connected so every rank runs the same backward
        zero = logits.sum() * 0.0
        return zero, zero.detach(), zero.detach(), 0
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum()
    return loss_sum / n, loss_sum.detach(), correct.detach().float(), n


def count_parameters(model: nn.Module) -> int:
    """Full parameter count, also for a ZeRO-3 partitioned model (ds_numel holds the unpartitioned size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


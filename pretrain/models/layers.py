"""The pieces both stages' models are built of: attention, the BERT encoder (pre-LN or post-LN), the
pre-training heads, BERT initialisation under ZeRO-3, and the loss every objective uses (masked_ce).

The encoder is kept free of heads so that stage two (PALM) can reuse it as is: the same module and
parameter names, so initialising stage two from stage one is a plain mapping of names. The faster paths these
layers take (the CPU lane dropout, the attention implementations, packed rows) are in fast_paths.py.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.config import ModelConfig
from pretrain.models.fast_paths import Dropout, Packing, attend, unpads


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        # Post-LN BERT normalises the embeddings; pre-LN normalises at the input of every block instead, unless
        # model.embedding_norm asks for this one too (PLUG's released model has it).
        normed = cfg.normed_embeddings
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps) if normed else nn.Identity()
        self.drop = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        # position_offset: where a decoder continuing from a key/value cache is in its sequence
        positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.drop(self.norm(x))


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


_SKIP_INIT = False


@contextlib.contextmanager
def skip_init():
    """Models built inside keep their parameters as allocated: for a model whose every parameter is read from a
    checkpoint next (pretrain.generate), so that init_weights' gather of each module (a full pass over the model
    under ZeRO-3) is not spent on values about to be overwritten."""
    global _SKIP_INIT
    previous, _SKIP_INIT = _SKIP_INIT, True
    try:
        yield
    finally:
        _SKIP_INIT = previous


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation, one module at a time (none inside skip_init).

    Under `deepspeed.zero.Init` each parameter is partitioned as soon as its module is built, so it is
    gathered here (only its own module's, never the whole model), set on rank 0 and re-partitioned.
    """
    if _SKIP_INIT:
        return
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


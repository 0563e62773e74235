"""PALM, the encoder-decoder of PLUG's stage two: the stage-one encoder (same module, same names) plus an
autoregressive decoder that cross-attends to it, and optionally PALM's copy mechanism over the source.

The decoder owns no embeddings: it is handed the encoder's embedding module, and its output projection is
the word embedding itself. A second registered reference would put the tied weight into the state dict
twice, which DeepSpeed's ZeRO checkpoint consolidation mishandles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.fast_paths import Dropout, Packing, attend, unpads
from pretrain.models.layers import (Embeddings, Encoder, FeedForward, MLMHead, SelfAttention, SentenceHead,
                                    init_weights, masked_ce, padding_mask)  # fmt: skip
from pretrain.objectives import LM, MLM


@dataclass
class LayerCache:
    """One decoder layer's keys and values, each [B, heads, length, head_dim]."""

    k: torch.Tensor | None = None  # self-attention: grows by the fed tokens each step
    v: torch.Tensor | None = None
    cross_k: torch.Tensor | None = None  # cross-attention: from the encoder output, computed on the first step
    cross_v: torch.Tensor | None = None


@dataclass
class DecoderCache:
    """The decoder's keys and values so far, one LayerCache per layer (Palm.new_cache makes an empty one)."""

    layers: list[LayerCache]

    @property
    def length(self) -> int:
        """Decoder tokens already fed (and so the position of the next one)."""
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep, in place, row indices[i] of every cached tensor as row i (beam search; it may also expand)."""
        for layer in self.layers:
            for name in ("k", "v", "cross_k", "cross_v"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, indices))


class CausalSelfAttention(SelfAttention):
    """model.SelfAttention's parameters (so encoder layers can initialise it), causal, with a key/value cache."""

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, packing: Packing | None = None) -> torch.Tensor:
        """x: [B, T, H], or [N, H] real rows with their packing (training only: no cache)."""
        qkv = self.qkv(x) if packing is None else packing.unpack(self.qkv(x))
        b, t, h3 = qkv.shape
        h = h3 // 3
        q, k, v = qkv.view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if cache.k is not None:
                past = cache.k.shape[2]
                k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
            cache.k, cache.v = k, v
        mask = None  # a single new query may see every key so far
        if t > 1 and past > 0:  # several new queries after a cache: query i sits at position past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y, _ = attend(q, k, v, mask, t > 1 and past == 0, self.attn_dropout, self.training, self.impl)
        y = y.transpose(1, 2).reshape(b, t, h)
        return self.out(y if packing is None else packing.pack(y))


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.attn_dropout, self.impl = cfg.heads, cfg.attn_dropout, cfg.attention
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)  # keys and values of the encoder output, one GEMM
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, cache: LayerCache | None, need_probs: bool,
        packing: Packing | None = None, memory_packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """mask: [B, 1, 1, S] bool, True = real source token. x: [B, T, H] or, with packing, [N, H]; memory:
        [B, S, H] or, with memory_packing, its real rows. Returns the output (x's layout) and, if need_probs,
        the attention probabilities averaged over heads [B, T, S] (before dropout: the copy distribution)."""
        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            kv = self.kv(memory) if memory_packing is None else memory_packing.unpack(self.kv(memory))
            b, s, h2 = kv.shape
            k, v = kv.view(b, s, 2, self.heads, h2 // (2 * self.heads)).permute(2, 0, 3, 1, 4)
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        q = self.q(x) if packing is None else packing.unpack(self.q(x))
        b, t, h = q.shape
        q = q.view(b, t, self.heads, h // self.heads).transpose(1, 2)
        # the copy distribution needs the probabilities, which SDPA does not return: attend computes them by hand
        y, a = attend(q, k, v, mask, False, self.attn_dropout, self.training, self.impl, need_probs)
        y = y.transpose(1, 2).reshape(b, t, h)
        return self.out(y if packing is None else packing.pack(y)), None if a is None else a.mean(1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.self_attn = CausalSelfAttention(cfg)
        self.self_attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, cache: LayerCache | None, need_probs: bool,
        packing: Packing | None = None, memory_packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if self.pre_ln:
            x = x + self.drop(self.self_attn(self.self_attn_norm(x), cache, packing))
            y, probs = self.cross_attn(self.cross_attn_norm(x), memory, mask, cache, need_probs, packing, memory_packing)
            x = x + self.drop(y)
            return x + self.drop(self.ffn(self.ffn_norm(x))), probs
        x = self.self_attn_norm(x + self.drop(self.self_attn(x, cache, packing)))
        y, probs = self.cross_attn(x, memory, mask, cache, need_probs, packing, memory_packing)
        x = self.cross_attn_norm(x + self.drop(y))
        return self.ffn_norm(x + self.drop(self.ffn(x))), probs


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps) if cfg.pre_ln else nn.Identity()
        self.checkpointing = cfg.activation_checkpointing
        self.unpad = cfg.unpad

    def forward(
        self, input_ids: torch.Tensor, embeddings: Embeddings, memory: torch.Tensor, enc_attention_mask: torch.Tensor,
        cache: DecoderCache | None = None, copy_probs: bool = False, attention_mask: torch.Tensor | None = None,
        pack_index: torch.Tensor | None = None, enc_pack_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """input_ids: the tokens not yet in the cache. Returns the final hidden states [B, T, H] and, if
        copy_probs, the last layer's head-averaged cross-attention probabilities [B, T, S].

        attention_mask (training, no cache): the decoder's real tokens [B, T]. The position-wise work then runs
        on the real decoder and encoder rows only (fast_paths.Packing, unless model.unpad says otherwise), and padding
        positions come out as zeros; pack_index and enc_pack_index: the masks' real tokens found on the host."""
        x = embeddings(input_ids, torch.zeros_like(input_ids), 0 if cache is None else cache.length)
        mask = padding_mask(enc_attention_mask)
        unpad = cache is None and attention_mask is not None and unpads(self.unpad, x.device)
        packing = Packing.of(attention_mask, pack_index) if unpad else None
        memory_packing = Packing.of(enc_attention_mask, enc_pack_index) if unpad else None
        if packing is not None:
            x = packing.pack(x)
        if memory_packing is not None:
            memory = memory_packing.pack(memory)
        probs = None
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            need = copy_probs and i == len(self.layers) - 1
            if self.checkpointing and self.training:
                x, probs = checkpoint(layer, x, memory, mask, layer_cache, need, packing, memory_packing,
                                      use_reentrant=False)  # fmt: skip
            else:
                x, probs = layer(x, memory, mask, layer_cache, need, packing, memory_packing)
        x = self.final_norm(x)
        return (x if packing is None else packing.unpack(x)), probs


class Palm(nn.Module):
    """Encoder (+ MLM head, for the masked-source phase) and decoder, all sharing one embedding module.

    The stage-one sentence head rides along frozen: stage two has no sentence objective, and PLUG's released
    encoder keeps its 3-way head, so a stage-two checkpoint holds a complete stage-one encoder (for export and
    fine-tuning) without training or decaying that head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.decoder_layers < 1:
            raise ValueError(f"PALM needs a decoder: decoder_layers={cfg.decoder_layers}, must be >= 1")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.mlm_head = MLMHead(cfg)
        self.decoder = Decoder(cfg)
        if cfg.copy:
            self.copy_gate = nn.Linear(2 * cfg.hidden, 1)
            self.register_buffer("copy_excluded", torch.tensor(cfg.copy_excluded, dtype=torch.long), persistent=False)
        self.sentence_head = SentenceHead(cfg).requires_grad_(False)  # last: the other modules' init is unchanged
        init_weights(self, cfg.init_std)

    def encode(self, enc_input_ids: torch.Tensor, enc_attention_mask: torch.Tensor,
               pack_index: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return self.encoder(enc_input_ids, torch.zeros_like(enc_input_ids), enc_attention_mask, pack_index=pack_index)

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict]:
        enc_ids, enc_mask = batch["enc_input_ids"], batch["enc_attention_mask"]
        memory = self.encode(enc_ids, enc_mask, batch.get("enc_pack_index"))
        word = self.encoder.embeddings.word.weight
        # The vocabulary projection is the costliest matmul: run it only where a token is predicted.
        mlm_labels, lm_labels = batch[MLM.labels], batch[LM.labels]
        mlm_at, lm_at = mlm_labels != IGNORE, lm_labels != IGNORE
        mlm = masked_ce(self.mlm_head(memory[mlm_at], word), mlm_labels[mlm_at])
        h, probs = self.decoder(batch["dec_input_ids"], self.encoder.embeddings, memory, enc_mask, None, self.cfg.copy,
                                batch["dec_attention_mask"], batch.get("dec_pack_index"), batch.get("enc_pack_index"))  # fmt: skip
        copyable = self._copyable(enc_ids, mlm_labels) if self.cfg.copy else None
        lm = masked_ce(self._vocab_scores(h, probs, memory, enc_ids, lm_at, copyable), lm_labels[lm_at])
        losses = {LM.name: lm, MLM.name: mlm}  # objective -> (mean, summed loss, correct, count)
        loss = sum(weights[name] * value[0] for name, value in losses.items())
        # tensors: a float() here would sync the GPU every micro-batch
        return loss, {name: value[1:] for name, value in losses.items()}

    def _copyable(self, enc_ids: torch.Tensor, mlm_labels: torch.Tensor | None) -> torch.Tensor:
        """[B, S]: the encoder positions the copy mechanism may copy: source text, not a special token ([CLS],
        [SEP], [PAD], [MASK], [UNK]) and not a token masked LM replaced by a random one."""
        keep = ~torch.isin(enc_ids, self.copy_excluded)
        if mlm_labels is not None:
            keep &= (mlm_labels == IGNORE) | (mlm_labels == enc_ids)
        return keep

    def _vocab_scores(
        self, h: torch.Tensor, probs: torch.Tensor | None, memory: torch.Tensor, enc_ids: torch.Tensor,
        at: torch.Tensor | tuple, copyable: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores at decoder positions `at` (an index into [B, T]) whose log_softmax is the next-token
        log-probability: the tied projection's logits, or with copy log P itself (P sums to 1 where anything
        is copyable, so the log_softmax that cross-entropy applies leaves it as it is). copyable: _copyable's
        mask (by default, of a source no masked LM touched)."""
        logits = F.linear(h[at], self.encoder.embeddings.word.weight)
        if probs is None:
            return logits
        context = (probs @ memory)[at]  # what the decoder reads from the source, the pointer-generator's input
        p_gen = torch.sigmoid(self.copy_gate(torch.cat([context, h[at]], -1))).float()
        if copyable is None:
            copyable = self._copyable(enc_ids, None)
        p_copy = copy_distribution(probs, enc_ids, copyable, at, logits.shape[-1])
        p = p_gen * logits.float().softmax(-1) + (1 - p_gen) * p_copy
        return p.clamp_min(1e-12).log()

    def new_cache(self) -> DecoderCache:
        return DecoderCache([LayerCache() for _ in self.decoder.layers])

    def next_token_logprobs(
        self, dec_input_ids: torch.Tensor, memory: torch.Tensor, enc_attention_mask: torch.Tensor,
        enc_input_ids: torch.Tensor, cache: DecoderCache | None = None,
    ) -> tuple[torch.Tensor, DecoderCache | None]:  # fmt: skip
        """Log-probabilities [B, V] (float32) of the token after dec_input_ids [B, T], and the cache.

        Without a cache the whole decoder prefix is run; with one only dec_input_ids[:, cache.length:] is fed
        and the cache is extended in place. memory, enc_attention_mask and enc_input_ids have B rows too."""
        new = dec_input_ids if cache is None else dec_input_ids[:, cache.length :]
        h, probs = self.decoder(new, self.encoder.embeddings, memory, enc_attention_mask, cache, self.cfg.copy)
        last = (slice(None), -1)
        return self._vocab_scores(h, probs, memory, enc_input_ids, last).float().log_softmax(-1), cache


def copy_distribution(probs: torch.Tensor, enc_ids: torch.Tensor, copyable: torch.Tensor, at, vocab: int) -> torch.Tensor:
    """[N, vocab] float32: the head-averaged cross-attention probabilities [B, T, S] at decoder positions `at`,
    kept on the copyable encoder positions [B, S] and renormalised there, scattered onto those positions' ids
    (all zero for a row with nothing to copy)."""
    a = (probs.float() * copyable[:, None, :])[at]  # [N, S]
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return torch.zeros(a.shape[0], vocab, dtype=a.dtype, device=a.device).scatter_add_(-1, enc_ids[:, None].expand_as(probs)[at], a)

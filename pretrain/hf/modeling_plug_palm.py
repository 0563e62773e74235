"""PALM (stage two) as a transformers model, for `pretrain.export`: copied into the export as
modeling_plug_palm.py and loaded with `trust_remote_code=True`, so it must not import this package.

No stock class holds PALM exactly: the decoder reads the encoder's embedding module, the output projection is
the bare word-embedding matrix (tied, no bias), and the encoder keeps its MLM and sentence heads. The modules and
their parameter names are ours (pretrain/models/layers.py and palm.py), so the exported weights are our state dict
as it is, the embeddings stored once.

Decoding keeps a key/value cache (generate's use_cache=True, the export's generation_config.json default), in
transformers' own EncoderDecoderCache: the decoder's self-attention keys and values grow by the tokens fed, each
step feeding only the new token, and the cross-attention keys and values of the encoder output are computed on
the first step of a generate call and read from then on; beam search reorders both through the cache's
reorder_cache. forward builds a cache only when asked (use_cache=True) or handed one (cache=, or the older name
past_key_values=); without one it computes exactly what it did before the cache existed. Only the dynamic cache
(the default) is supported: a static cache is refused.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput


class PlugPalmConfig(PretrainedConfig):
    model_type = "plug-palm"

    def __init__(self, vocab_size=21504, hidden_size=768, num_hidden_layers=12, num_decoder_layers=6,
                 num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512, type_vocab_size=3,
                 layer_norm_eps=1e-12, pre_ln=True, sso_classes=3, embedding_norm=False, **kwargs):  # fmt: skip
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_decoder_layers, self.num_attention_heads = num_decoder_layers, num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.type_vocab_size, self.layer_norm_eps, self.pre_ln, self.sso_classes = type_vocab_size, layer_norm_eps, pre_ln, sso_classes
        self.embedding_norm = embedding_norm  # a LayerNorm on the embeddings also when pre-LN (PLUG's released model)
        kwargs.setdefault("is_encoder_decoder", True)
        kwargs.setdefault("tie_word_embeddings", False)  # the projection is the embedding itself: nothing to tie
        super().__init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None):
        """transformers sizes generate()'s cache by the decoder's view of the config, whose num_hidden_layers would
        be the encoder's here (it renames only `decoder_*` keys): give the decoder's layer count instead."""
        text = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder:
            text = copy.deepcopy(self) if text is self else text
            text.num_hidden_layers = self.num_decoder_layers
        return text


class _Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        normed = not c.pre_ln or c.embedding_norm  # post-LN always; pre-LN when asked (PLUG's released model)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if normed else nn.Identity()

    def forward(self, ids, start=0, token_type_ids=None):
        # start: the position of ids[:, 0] (the decoder's tokens already cached); token types: 0 unless given
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        return self.norm(self.word(ids) + self.position(positions)[None] + self.token_type(types))


def _heads(x, n):  # [B, T, H] -> [B, n, T, H / n]
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _merge(y):  # [B, n, T, d] -> [B, T, n * d]
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)


class _SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, mask=None, causal=False, cache=None, layer=0):
        """cache (the decoder's, causal): a transformers Cache holding the keys and values of the tokens fed
        before x, extended here by x's."""
        q, k, v = (_heads(t, self.n) for t in self.qkv(x).chunk(3, -1))
        if cache is not None:
            past, t = cache.get_seq_length(layer), x.shape[1]
            k, v = cache.update(k, v, layer)
            if k.shape[2] != past + t:  # a static cache returns its whole preallocated length, unmasked here
                raise NotImplementedError("PlugPalm supports the dynamic key/value cache only (no cache_implementation)")
            if past > 0:  # SDPA's is_causal aligns the queries to the first keys: query i sits at past + i
                causal = False
                mask = None if t == 1 else torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)))


class _CrossAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n = c.num_attention_heads
        self.q = nn.Linear(c.hidden_size, c.hidden_size)
        self.kv = nn.Linear(c.hidden_size, 2 * c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, memory, mask, cache=None, layer=0):
        """cache: an EncoderDecoderCache; the keys and values of memory are computed once and then read from it."""
        if cache is not None and cache.is_updated.get(layer):
            k, v = cache.cross_attention_cache.layers[layer].keys, cache.cross_attention_cache.layers[layer].values
        else:
            k, v = (_heads(t, self.n) for t in self.kv(memory).chunk(2, -1))
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, layer)
                cache.is_updated[layer] = True
        return self.out(_merge(F.scaled_dot_product_attention(_heads(self.q(x), self.n), k, v, attn_mask=mask)))


class _FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.up, self.down = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _norm(c):
    return nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class _EncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre_ln = c.pre_ln
        self.attn, self.attn_norm, self.ffn, self.ffn_norm = _SelfAttention(c), _norm(c), _FeedForward(c), _norm(c)

    def forward(self, x, mask):
        if self.pre_ln:
            x = x + self.attn(self.attn_norm(x), mask)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, mask))
        return self.ffn_norm(x + self.ffn(x))


class _DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre_ln = c.pre_ln
        self.self_attn, self.self_attn_norm = _SelfAttention(c), _norm(c)
        self.cross_attn, self.cross_attn_norm = _CrossAttention(c), _norm(c)
        self.ffn, self.ffn_norm = _FeedForward(c), _norm(c)

    def forward(self, x, memory, mask, cache=None, layer=0):
        """cache: an EncoderDecoderCache or None; layer: this layer's index in it."""
        own = None if cache is None else cache.self_attention_cache
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_norm(x), causal=True, cache=own, layer=layer)
            x = x + self.cross_attn(self.cross_attn_norm(x), memory, mask, cache, layer)
            return x + self.ffn(self.ffn_norm(x))
        x = self.self_attn_norm(x + self.self_attn(x, causal=True, cache=own, layer=layer))
        x = self.cross_attn_norm(x + self.cross_attn(x, memory, mask, cache, layer))
        return self.ffn_norm(x + self.ffn(x))


class _Encoder(nn.Module):
    main_input_name = "input_ids"  # what generate() asks of the encoder it finds

    def __init__(self, c):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.layers = nn.ModuleList(_EncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.final_norm = _norm(c) if c.pre_ln else nn.Identity()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids=token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return BaseModelOutput(last_hidden_state=self.final_norm(x))


class _Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(c) for _ in range(c.num_decoder_layers))
        self.final_norm = _norm(c) if c.pre_ln else nn.Identity()


class _MLMHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense, self.norm = nn.Linear(c.hidden_size, c.hidden_size), _norm(c)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))


class _SentenceHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pooler, self.classifier = nn.Linear(c.hidden_size, c.hidden_size), nn.Linear(c.hidden_size, c.sso_classes)


class PlugPalmForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = PlugPalmConfig
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.encoder, self.mlm_head, self.decoder = _Encoder(config), _MLMHead(config), _Decoder(config)
        self.sentence_head = _SentenceHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.embeddings.word

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None, labels=None,
                cache=None, use_cache=None, token_type_ids=None, **kwargs):  # fmt: skip
        """decoder_input_ids: with a cache, the tokens not yet in it (their positions follow the cached ones).
        token_type_ids: the encoder's, as a BERT tokenizer returns them (zeros for one text, what our PALM always
        encodes with, so `generate(**tokenizer(text, return_tensors="pt"))` gives our tokens); the decoder's are 0.
        cache (or past_key_values): an EncoderDecoderCache from an earlier call, extended in place and returned;
        use_cache=True without one starts one. Neither (the default): no cache, the whole decoder input is run."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is None and use_cache:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        elif cache is not None and not isinstance(cache, EncoderDecoderCache):  # a decoder-only Cache: self-attention
            cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask, token_type_ids)
        memory = encoder_outputs[0]
        if attention_mask is None:
            attention_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((memory.shape[0], 1), self.config.decoder_start_token_id, device=memory.device)
        x = self.encoder.embeddings(decoder_input_ids, 0 if cache is None else cache.get_seq_length())
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, memory, attention_mask.bool()[:, None, None, :], cache, i)
        logits = F.linear(self.decoder.final_norm(x), self.encoder.embeddings.word.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=cache, encoder_last_hidden_state=memory)

    def prepare_inputs_for_generation(self, input_ids, cache=None, encoder_outputs=None, attention_mask=None,
                                      use_cache=None, **kwargs):  # fmt: skip
        # with a cache only the tokens not yet in it are fed (the new one); without, everything generated so far
        if cache is None:
            cache = kwargs.get("past_key_values")
        past = 0 if cache is None else cache.get_seq_length()
        return {"decoder_input_ids": input_ids[:, past:], "encoder_outputs": encoder_outputs,
                "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}  # fmt: skip


"""Reading a local transformers BERT (post-LN) or MegatronBERT (pre-LN) directory into our models:
`init_from=hf:<dir>` (pretrain/init_sources.py picks it; training/init_from.py loads it), to continue
pre-training or fine-tune from it. Checked before any rank starts (architecture, shapes, vocab), read by rank 0
and copied into the partitioned model one parameter at a time. A MegatronBERT has no embedding LayerNorm: it
loads into a model with model.embedding_norm=false only (a fresh one, weight 1 and bias 0, would still normalise
the embeddings: not the model the directory holds)."""
from __future__ import annotations

import json
import os
from functools import partial

import torch

from pretrain.data.tokenizer import VocabExtension, read_vocab, vocab_extension
from pretrain.errors import UserError
from pretrain.hf.layout import from_hf
from pretrain.models.config import ModelConfig
from pretrain.training.init_from import InitSource, map_by_name, source_names

_ROWS_MAY_GROW = ("encoder.embeddings.word.weight", "mlm_head.bias", "encoder.embeddings.token_type.weight")


def hf_source(init_from: str, path: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
              vocab_path: str | None) -> InitSource:  # fmt: skip
    """A local transformers BERT (post-LN) or MegatronBERT (pre-LN) directory, checked before any rank starts:
    its architecture and shapes against ours, and its vocab against the data's."""
    where = f"init_from={init_from}"
    if not os.path.isdir(path):
        raise UserError(f"{where}: no such directory")
    try:
        with open(os.path.join(path, "config.json")) as f:
            their = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: no readable config.json ({e})") from None
    kind = their.get("model_type")
    if kind not in ("bert", "megatron-bert"):
        raise UserError(f"{where}: model_type {kind!r}; a BERT (post-LN) or MegatronBERT (pre-LN) is needed")
    if (kind == "megatron-bert") != cfg.pre_ln:
        raise UserError(f"{where}: a {kind} model is {'pre' if kind == 'megatron-bert' else 'post'}-LN; "
                        f"set model.pre_ln={str(kind == 'megatron-bert').lower()}")  # fmt: skip
    if kind == "megatron-bert" and cfg.embedding_norm:  # a fresh LayerNorm would change what the model computes
        raise UserError(f"{where}: a megatron-bert model has no embedding LayerNorm; set model.embedding_norm=false")
    for ours, key in (("hidden", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
                      ("ffn", "intermediate_size")):  # fmt: skip
        if their.get(key) != getattr(cfg, ours):
            raise UserError(f"{where}: {key}={their.get(key)}, model.{ours}={getattr(cfg, ours)}")
    if their.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{where}: hidden_act={their['hidden_act']}; this model uses gelu")
    extension = _check_vocab(path, vocab_path, where) if vocab_path is not None else None
    shapes = {name: tuple(t.shape) for name, t in _from_hf_meta(path, cfg, where).items()}
    wanted = source_names(list(target_shapes), cfg)  # stage two's decoder may come from the top encoder layers
    # the decoder, or a head the directory lacks (a plain BertModel has no MLM head), stays fresh
    mapping, fresh = map_by_name(target_shapes, wanted, shapes, cfg, where, (), _ROWS_MAY_GROW)
    if not any(n.startswith("encoder.layers.") for n in mapping):
        raise UserError(f"{where}: no encoder layer found in model.safetensors")
    return InitSource(init_from, mapping, tuple(fresh), extension, partial(hf_weights, path, cfg))


def _from_hf_meta(path: str, cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """The directory's tensors under our names, as meta tensors (shapes only; nothing is read)."""
    from safetensors import safe_open  # safetensors: the `hf` extra

    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise UserError(f"{where}: no model.safetensors (save the model with transformers' save_pretrained)")
    with safe_open(file, framework="pt") as f:
        meta = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    return from_hf(meta, cfg)


def hf_weights(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The directory's tensors under our names (cfg: ours, to read its names with)."""
    from safetensors.torch import load_file  # safetensors: the `hf` extra

    return from_hf(load_file(os.path.join(path, "model.safetensors")), cfg)


def _check_vocab(path: str, vocab_path: str, where: str) -> VocabExtension | None:
    """The data's token ids must mean what the model learnt: the same vocab, token for token, or one extending it."""
    if os.path.isfile(os.path.join(path, "vocab.txt")):
        theirs = read_vocab(os.path.join(path, "vocab.txt"))
    elif os.path.isfile(os.path.join(path, "tokenizer.json")):
        with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
            ids = json.load(f)["model"]["vocab"]
        theirs = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    else:
        raise UserError(f"{where}: no vocab.txt or tokenizer.json to check the data's vocab against")
    return vocab_extension(theirs, vocab_path, where, os.path.join(path, "vocab.txt"))

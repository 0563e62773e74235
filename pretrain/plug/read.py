"""`init_from=plug:<dir>`: PLUG's tensor-parallel shards checked against our model before any rank starts, and read
into it one merged parameter at a time."""
from __future__ import annotations

import json
import os
import re
from functools import partial

import torch

from pretrain.data.tokenizer import read_vocab, vocab_extension
from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.plug.layout import SHARD, SHARD_FILE, TIED, Entry, layout, merge
from pretrain.training import safe_load
from pretrain.training.init_from import InitSource, map_by_name, source_names


class ShardSet:
    """A directory of PLUG shards, each memory-mapped (only the pages a merge touches are read): the full tensor
    of any entry, merged from the ranks' pieces one at a time."""

    def __init__(self, path: str, where: str):
        if not os.path.isdir(path):
            raise UserError(f"{where}: no such directory")
        found = {int(m.group(1)): n for n in os.listdir(path) if (m := SHARD_FILE.match(n))}
        if not found and os.path.isdir(os.path.join(path, "model")):  # ModelScope's layout: the shards in model/
            path = os.path.join(path, "model")
            found = {int(m.group(1)): n for n in os.listdir(path) if (m := SHARD_FILE.match(n))}
        if not found:
            raise UserError(f"{where}: no mp_rank_XX_model_states.pt (not PLUG's tensor-parallel shards)")
        self.path, self.tp = path, max(found) + 1
        absent = [r for r in range(self.tp) if r not in found]
        if absent:
            raise UserError(f"{where}: {SHARD.format(absent[0])} is missing ({len(found)} of {self.tp} ranks there)")
        self.modules: list[dict[str, torch.Tensor]] = []
        for rank in range(self.tp):
            file = os.path.join(path, SHARD.format(rank))
            try:
                saved = safe_load.load(file, map_location="cpu", mmap=True)
            except RuntimeError as e:  # torch's pre-1.6 format cannot be memory-mapped
                raise UserError(f"{file}: cannot be memory-mapped ({str(e).splitlines()[0]}); re-save it with a recent "
                                "torch.save") from None  # fmt: skip
            module = saved.get("module") if isinstance(saved, dict) else None
            if not isinstance(module, dict):
                raise UserError(f"{file}: no ['module'] state dict (not a PLUG shard)")
            mp = saved.get("mp_world_size")
            if mp is not None and mp != self.tp:
                raise UserError(f"{where}: {SHARD.format(rank)} was written for {mp} tensor-parallel ranks, the directory"
                                f" holds {self.tp} (a rank missing, or shards of different tensor-parallel degrees mixed)")  # fmt: skip
            if rank and set(module) != set(self.modules[0]):
                other = sorted(set(module) ^ set(self.modules[0]))[0]
                raise UserError(f"{where}: {SHARD.format(rank)} and {SHARD.format(0)} differ in their tensors ({other}):"
                                " shards of different models mixed?")  # fmt: skip
            for name, t in module.items():
                if rank and t.shape != self.modules[0][name].shape:
                    raise UserError(f"{where}: {name} is {list(t.shape)} in {SHARD.format(rank)}, "
                                    f"{list(self.modules[0][name].shape)} in {SHARD.format(0)} (shards of different "
                                    "tensor-parallel degrees or models mixed?)")  # fmt: skip
            self.modules.append(module)
        self.where = where

    def __contains__(self, name: str) -> bool:
        return name in self.modules[0]

    def shape(self, e: Entry) -> tuple[int, ...]:
        """The full shape of entry e, from rank 0's piece."""
        shape = list(self.modules[0][e.plug].shape)
        if e.dim is not None:
            shape[e.dim] *= self.tp
        return tuple(shape)

    def tensor(self, e: Entry) -> torch.Tensor:
        """The full tensor of entry e (its dtype in the files). A replicated tensor must be the same on every rank."""
        pieces = [m[e.plug] for m in self.modules]
        if e.dim is None:
            for rank, p in enumerate(pieces[1:], 1):
                if not torch.equal(p, pieces[0]):
                    raise UserError(f"{self.where}: {e.plug}, replicated in PLUG, differs between {SHARD.format(0)}"
                                    f" and {SHARD.format(rank)}")  # fmt: skip
            return pieces[0]
        return merge(pieces, e)

    def layers(self, prefix: str) -> int:
        return len({m.group(1) for n in self.modules[0] if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))})


def _their_config(path: str, where: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: config.json is not readable ({e})") from None


def plug_source(init_from: str, path: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
                vocab_path: str | None, needs_stage_two: bool = False):  # fmt: skip
    """The InitSource of a directory of PLUG shards, checked against our model before any rank starts: its ranks,
    layout, dimensions and vocab. Our parameters take PLUG's by name (`layout`), the decoder too where the shards
    have one (else it is fresh, or the top encoder layers' with model.decoder_init=encoder_top)."""
    where = f"init_from={init_from}"
    shards = ShardSet(path, where)
    their = _their_config(path, where)
    _check_config(shards, their, cfg, where)
    if "bert.embeddings.position_embeddings.weight" not in shards:
        raise UserError(f"{where}: no bert.embeddings.position_embeddings.weight (not PLUG's layout)")
    hidden = shards.modules[0]["bert.embeddings.position_embeddings.weight"].shape[-1]
    if hidden != cfg.hidden:
        raise UserError(f"{where}: the shards' hidden size is {hidden}, model.hidden={cfg.hidden}")
    if shards.layers("bert.encoder.layer.") != cfg.layers:
        raise UserError(f"{where}: the shards have {shards.layers('bert.encoder.layer.')} encoder layers, model.layers={cfg.layers}")
    their_decoder = shards.layers("decoder.decoder.layer.")
    wants_decoder = any(n.startswith("decoder.") for n in target_shapes)
    if needs_stage_two and not their_decoder:
        raise UserError(f"{where}: encoder-only shards (stage one); a generation task needs PLUG's decoder too")
    if their_decoder and wants_decoder and their_decoder != cfg.decoder_layers:
        raise UserError(f"{where}: the shards have {their_decoder} decoder layers, model.decoder_layers={cfg.decoder_layers}")
    entries = layout(cfg, decoder=bool(their_decoder and wants_decoder))
    absent = [e.plug for e in entries if e.plug not in shards and e.plug != TIED and e.ours is not None]
    if absent:
        raise UserError(f"{where}: the shards have no {absent[0]} (and {len(absent) - 1} more): not PLUG's layout of this model")
    for e in entries:
        if e.ours is None and e.plug in shards:
            t = shards.tensor(e).float()
            if not torch.equal(t, torch.ones_like(t) if e.plug.endswith(".weight") else torch.zeros_like(t)):
                raise UserError(f"{where}: its {e.plug} is not the identity, and this pre-LN model has no embedding"
                                " LayerNorm to hold it (dropping it would change what the model computes): set"
                                " model.embedding_norm=true, as model=plug has")  # fmt: skip
    have = {e.ours: shards.shape(e) for e in entries if e.ours is not None and e.plug != TIED}
    qkv = have["encoder.layers.0.attn.qkv.weight"]
    if qkv[0] != 3 * hidden:  # a trailing rank missing, or shards of another degree: the ranks' pieces do not add up
        raise UserError(f"{where}: the first layer's query_key_value merges to {qkv[0]} rows over {shards.tp} ranks,"
                        f" not 3 x hidden {hidden} (a rank missing, or shards of several tensor-parallel degrees?)")  # fmt: skip
    words = have["encoder.embeddings.word.weight"][0]
    if "vocab_size" in their and their["vocab_size"] != words:
        raise UserError(f"{where}: the word embedding merges to {words} rows over {shards.tp} ranks, config.json"
                        f" says vocab_size={their['vocab_size']} (a rank missing?)")  # fmt: skip
    extension = _check_vocab(path, vocab_path, words, where) if vocab_path is not None else None
    wanted = source_names(list(target_shapes), cfg)  # the pooler of a fine-tuned classifier, encoder_top
    if their_decoder:
        wanted.update({n: n for n in target_shapes if n.startswith("decoder.")})
    # the decoder of encoder-only shards, the copy gate, a task's new layer stay fresh; PLUG's padding rows of the
    # vocab are cut or kept fresh on load
    mapping, fresh = map_by_name(target_shapes, wanted, have, cfg, where,
                                 ("encoder.embeddings.word.weight", "mlm_head.bias"),
                                 ("encoder.embeddings.token_type.weight",))  # fmt: skip
    return InitSource(init_from, mapping, tuple(fresh), extension, partial(PlugWeights, path, where, cfg))


def _check_config(shards: ShardSet, their: dict, cfg: ModelConfig, where: str) -> None:
    """The shards' LN placement, and what config.json says of their model, against ours."""
    pre_ln = "bert.encoder.LayerNorm.weight" in shards
    if pre_ln != cfg.pre_ln:
        raise UserError(f"{where}: the shards are {'pre' if pre_ln else 'post'}-LN; set model.pre_ln={str(pre_ln).lower()}")
    # shards of our own export say whether their model had an embedding LayerNorm: one at weight 1 and bias 0 (its
    # init, or the identity written for a model without one) still normalises, so neither way is it the same model
    recorded = (their.get("pretrain_export") or {}).get("embedding_layernorm") if isinstance(their, dict) else None
    if isinstance(recorded, str) and (recorded == "ours") != cfg.normed_embeddings:
        had = recorded == "ours"
        raise UserError(f"{where}: config.json says the shards were exported from a model {'with' if had else 'without'}"
                        f" an embedding LayerNorm; set model.embedding_norm={str(had).lower()}")  # fmt: skip
    for ours, key in (("hidden", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
                      ("ffn", "intermediate_size"), ("ln_eps", "layernorm_epsilon")):  # fmt: skip
        if key in their and their[key] != getattr(cfg, ours):
            raise UserError(f"{where}: config.json has {key}={their[key]}, model.{ours}={getattr(cfg, ours)}")


def _check_vocab(path: str, vocab_path: str, rows: int, where: str):
    """The data's token ids must mean what PLUG learnt: its vocab.txt (beside the shards), token for token, or the
    extension of it (VocabExtension) the data's is."""
    file = next((f for f in (os.path.join(path, "vocab.txt"), os.path.join(path, "model", "vocab.txt"))
                 if os.path.isfile(f)), None)  # fmt: skip
    if file is None:
        raise UserError(f"{where}: no vocab.txt beside the shards (put the vocab PLUG was trained with there: "
                        "bert-base-chinese's for the released model)")  # fmt: skip
    theirs = read_vocab(file)
    extension = vocab_extension(theirs, vocab_path, where, file)
    if len(theirs) > rows:
        raise UserError(f"{where}: vocab.txt has {len(theirs)} tokens, the word embedding {rows} rows")
    return extension


class PlugWeights:
    """Our parameters from PLUG's shards, by our name, merged one at a time on demand (what init_from's
    _load_gathered reads: rank 0 sets each gathered parameter from it, one after another)."""

    def __init__(self, path: str, where: str, cfg: ModelConfig):
        self.shards = ShardSet(path, where)
        entries = layout(cfg, decoder=bool(self.shards.layers("decoder.decoder.layer.")))
        self.entries = {}
        for e in entries:
            if e.ours is not None and e.plug != TIED:
                self.entries.setdefault(e.ours, e)

    def __getitem__(self, ours: str) -> torch.Tensor:
        return self.shards.tensor(self.entries[ours])

"""PLUG's own released layout, both ways: AliceMind's Megatron tensor-parallel shards <-> our parameters.

    python -m pretrain.export run.dir=<run> out=<dir> format=plug [tp=8] [dtype=fp16] [step=<N>] [check=true]
    python -m pretrain.train stage=palm init_from=plug:<dir> ...   (also stage one, and pretrain.finetune)

Read from AliceMind's PLUG/ sources (model/modeling.py, mpu/layers.py, mpu/transformer.py, generate_plug.py,
load_checkpoint.py): the released weights are `mp_rank_00..07_model_states.pt`, one per tensor-parallel rank,
each a torch pickle whose ['module'] is that rank's state dict of `PalmForPreTraining` (the names of `layout`
below), loaded with `load_state_dict(strict=False)` into a model made `.half()` whose modules named *LayerNorm*
are then made float again (`fp32_layernorm`). load_state_dict copies, and so casts: the dtype in the files does not
matter to PLUG's loader, their shapes do (a size mismatch fails even with strict=False).

How a rank's piece is cut from the full tensor (`_initialize_affine_weight`): ColumnParallelLinear splits the
weight and its bias on dim 0, RowParallelLinear the weight on dim 1 (its bias is whole on every rank),
VocabParallelEmbedding dim 0 in contiguous blocks. With stride s the dim is cut into s * tp equal chunks and rank
r takes chunks r, r + tp, ..., r + (s - 1) tp: the fused [Q; K; V] (stride 3) leaves rank r [Q_r; K_r; V_r], the
queries, keys and values of its own heads, which its forward splits in three; the cross-attention's [K; V]
(stride 2) leaves [K_r; V_r]. Everything else (LayerNorms, position and token-type embeddings, pooler, MLM
transform, sentence head) is replicated. `cls.predictions.bias` is vocab-split like the embedding, and
`cls.predictions.decoder_weight` is the word embedding itself (a registered alias, so the state dict holds it
twice; written here sharing its storage). The vocab is padded to a multiple of 128 x tp (generate_plug.py:
`make_vocab_size_divisible_by` 128 times the model-parallel size; 21128 -> 21504 at tp 8).

Where PLUG's model and ours differ (the names map one to one; what is computed does not always):
- PLUG's embeddings always end in a LayerNorm (`bert.embeddings.LayerNorm`), also when pre-LN. Ours has one when
  post-LN, or pre-LN with model.embedding_norm=true (model=plug sets it): then the two map one to one, both ways,
  PLUG's trained one is read and ours is written, and PLUG's code computes what ours does. A pre-LN model with
  model.embedding_norm=false has none: exported, the shards hold the identity LayerNorm (weight 1, bias 0), which
  PLUG's code still applies (it normalises the embeddings), so it does not compute what ours does (config.json's
  pretrain_export.embedding_layernorm says so); read, shards whose embedding LayerNorm is not the identity (PLUG's
  trained weights) are refused, pointing to model.embedding_norm=true: dropping it changes the scale of the whole
  residual stream. Shards of our own export record which it was (config.json's pretrain_export), and are read only
  with the same setting: a LayerNorm at weight 1 and bias 0 still normalises, so it can be neither dropped nor
  added without changing the model. (PLUG's released shards record nothing; their LayerNorm is trained.)
- PLUG's sentence head reads [CLS]'s hidden state directly: its `bert.pooler.dense` is in the state dict but its
  forward never applies it (`pooled_output = sequence_output[:, 0]`). Ours is tanh(pooler(h)) then the classifier.
  The tensors are carried by name all the same (the sentence head is frozen in stage two; fine-tuning retrains
  the pooler).
- PLUG's decoder is always pre-LN: a post-LN stage two has no place in its layout (refused); a post-LN stage one
  maps onto PLUG's post-LN BertForPreTraining (`attention.output.LayerNorm`, `output.LayerNorm`).
- Our copy mechanism (model.copy) has no counterpart (refused on export; left fresh on import).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import partial

import torch

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig

VOCAB_DIVISOR = 128  # PLUG's --make-vocab-size-divisible-by (arguments.py), times the tensor-parallel size
SHARD = "mp_rank_{:02d}_model_states.pt"
_SHARD_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
COLUMN, ROW, VOCAB, WHOLE = "column", "row", "vocab", "replicated"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
FP16_MAX = 65504.0
WORD = "bert.embeddings.word_embeddings.weight"
TIED = "cls.predictions.decoder_weight"  # PLUG's alias of WORD (a second name of the same parameter)


@dataclass(frozen=True)
class Entry:
    """One tensor of PLUG's state dict: its name, ours (None: we have no such tensor, the identity is written),
    how it is split over the tensor-parallel ranks, and the stride of that split."""

    plug: str
    ours: str | None
    split: str = WHOLE
    stride: int = 1

    @property
    def dim(self) -> int | None:
        """The dimension split over the ranks (None: replicated)."""
        return {COLUMN: 0, VOCAB: 0, ROW: 1}.get(self.split)

    @property
    def is_norm(self) -> bool:
        return "layernorm" in self.plug.lower()


def _linear(plug: str, ours: str, split: str = WHOLE, stride: int = 1) -> list[Entry]:
    """An nn.Linear, ColumnParallelLinear (split with its bias) or RowParallelLinear (its bias whole)."""
    return [Entry(f"{plug}.weight", f"{ours}.weight", split, stride),
            Entry(f"{plug}.bias", f"{ours}.bias", WHOLE if split == ROW else split, stride)]  # fmt: skip


def _norm(plug: str, ours: str | None) -> list[Entry]:
    return [Entry(f"{plug}.{p}", None if ours is None else f"{ours}.{p}") for p in ("weight", "bias")]


def layout(cfg: ModelConfig, decoder: bool) -> list[Entry]:
    """PLUG's state dict of our model, in PLUG's order: BertForPreTraining's names for an encoder (stage one),
    PalmForPreTraining's (the same plus `decoder.decoder.*`) for an encoder-decoder (stage two).

    Where a stage is passed below (export), it is the stage's class: its `generates` says whether its model has
    the decoder, its `name` is recorded in config.json."""
    e = "bert.embeddings."
    out = [
        Entry(WORD, "encoder.embeddings.word.weight", VOCAB),
        Entry(f"{e}position_embeddings.weight", "encoder.embeddings.position.weight"),
        Entry(f"{e}token_type_embeddings.weight", "encoder.embeddings.token_type.weight"),
        *_norm(f"{e}LayerNorm", "encoder.embeddings.norm" if cfg.normed_embeddings else None),
    ]
    for i in range(cfg.layers):
        p, o = f"bert.encoder.layer.{i}.", f"encoder.layers.{i}."
        qkv = _linear(f"{p}attention.self.query_key_value", f"{o}attn.qkv", COLUMN, 3)
        attn_out = _linear(f"{p}attention.output.dense", f"{o}attn.out", ROW)
        ffn = _linear(f"{p}intermediate.dense", f"{o}ffn.up", COLUMN) + _linear(f"{p}output.dense", f"{o}ffn.down", ROW)
        if cfg.pre_ln:  # BertAttention.LayerNorm before attention, BertLayer.LayerNorm before the FFN
            out += _norm(f"{p}attention.LayerNorm", f"{o}attn_norm") + qkv + attn_out + ffn[:2] + ffn[2:]
            out += _norm(f"{p}LayerNorm", f"{o}ffn_norm")
        else:  # post-LN: BertSelfOutput.LayerNorm and BertOutput.LayerNorm, after each residual
            out += qkv + attn_out + _norm(f"{p}attention.output.LayerNorm", f"{o}attn_norm") + ffn
            out += _norm(f"{p}output.LayerNorm", f"{o}ffn_norm")
    if cfg.pre_ln:
        out += _norm("bert.encoder.LayerNorm", "encoder.final_norm")
    out += _linear("bert.pooler.dense", "sentence_head.pooler")
    out += [Entry(TIED, "encoder.embeddings.word.weight", VOCAB), Entry("cls.predictions.bias", "mlm_head.bias", VOCAB)]
    out += _linear("cls.predictions.transform.dense", "mlm_head.dense")
    out += _norm("cls.predictions.transform.LayerNorm", "mlm_head.norm")
    out += _linear("cls.seq_relationship", "sentence_head.classifier")
    if not decoder:
        return out
    for j in range(cfg.decoder_layers):
        p, o = f"decoder.decoder.layer.{j}.", f"decoder.layers.{j}."
        out += _linear(f"{p}attention.query_key_value", f"{o}self_attn.qkv", COLUMN, 3)
        out += _linear(f"{p}attention.dense", f"{o}self_attn.out", ROW)
        out += _linear(f"{p}cross_attention.query", f"{o}cross_attn.q", COLUMN)
        out += _linear(f"{p}cross_attention.key_value", f"{o}cross_attn.kv", COLUMN, 2)
        out += _linear(f"{p}cross_attention.dense", f"{o}cross_attn.out", ROW)
        out += _norm(f"{p}input_layernorm", f"{o}self_attn_norm")  # before the self-attention
        out += _norm(f"{p}post_attention_layernorm", f"{o}cross_attn_norm")  # before the cross-attention
        out += _norm(f"{p}post_cross_attention_layernorm", f"{o}ffn_norm")  # before the FFN
        out += _linear(f"{p}intermediate", f"{o}ffn.up", COLUMN) + _linear(f"{p}output", f"{o}ffn.down", ROW)
    return out + _norm("decoder.decoder.final_layernorm", "decoder.final_norm")


def plug_vocab_size(tokens: int, tp: int) -> int:
    """PLUG's padded vocab: the tokens rounded up to a multiple of 128 x tp (21128 -> 21504 at tp 8)."""
    multiple = VOCAB_DIVISOR * tp
    return -(-tokens // multiple) * multiple


def piece(full: torch.Tensor, e: Entry, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor (a view), cut as PLUG's _initialize_affine_weight cuts it."""
    if e.dim is None:
        return full
    chunks = full.chunk(tp * e.stride, e.dim)  # equal: check_export checked the sizes divide
    return chunks[rank] if e.stride == 1 else torch.cat(chunks[rank::tp], e.dim)


def merge(pieces: list[torch.Tensor], e: Entry) -> torch.Tensor:
    """The full tensor from the ranks' pieces (the inverse of `piece`)."""
    if e.dim is None:
        return pieces[0]
    parts = [p.chunk(e.stride, e.dim) for p in pieces]
    return torch.cat([parts[r][j] for j in range(e.stride) for r in range(len(pieces))], e.dim)


# ---- out: pretrain.export format=plug ----------------------------------------------------------------------
def check_export(cfg: ModelConfig, stage, tp: int, dtype: str, where: str) -> None:
    """Everything that can make an export in PLUG's layout impossible, before anything is read or written."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UserError(f"tp={tp}: must be an integer >= 1 (PLUG's released shards: 8)")
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: must be {' or '.join(DTYPES)}")
    if stage.generates and cfg.copy:
        raise UserError(f"{where}: model.copy=true; PLUG has no copy mechanism (export a run with model.copy=false)")
    if stage.generates and not cfg.pre_ln:
        raise UserError(f"{where}: model.pre_ln=false; PLUG's decoder is pre-LN, a post-LN stage two has no place in"
                        " its layout")  # fmt: skip
    for key, n in (("heads", cfg.heads), ("hidden", cfg.hidden), ("ffn", cfg.ffn)):
        if n % tp:
            raise UserError(f"tp={tp} does not divide model.{key}={n} (each rank holds 1/tp of the heads and of the FFN)")


def _full(state, e: Entry, cfg: ModelConfig, rows: int) -> torch.Tensor:
    """Our full tensor for entry e, as PLUG holds it: fp32, the vocab padded (or cut) to `rows`, the identity
    LayerNorm where we have none."""
    if e.ours is None:
        return torch.ones(cfg.hidden) if e.plug.endswith(".weight") else torch.zeros(cfg.hidden)
    t = state[e.ours].contiguous().detach().float()
    if e.split == VOCAB and t.shape[0] != rows:
        if t.shape[0] > rows:  # rows past PLUG's padded vocab: padding rows of ours, never a real token's
            return t[:rows]
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return t


def write_shards(state, cfg: ModelConfig, stage, tokens: int, out_dir: str, tp: int, dtype: str = "fp16") -> list[str]:
    """Write `state` (our names: tensors, or DeepSpeed's lazy consolidated ones) as PLUG's tp shards into out_dir.

    One shard at a time, one parameter at a time: each full tensor is assembled, its rank's piece copied out, and
    only that shard's pieces are held (1/tp of the model). The price is reading: every full tensor is assembled
    once per shard, tp times in all (at tp 8, PLUG-27B's 104 GB of fp32 partitions read 8 times), for a peak of
    one shard (7 GB in fp16) where writing every shard in one pass would hold the whole model. dtype fp16: the LayerNorms stay fp32, as in PLUG's
    model under fp32_layernorm; everything else fp16 (what PLUG's loader casts to anyway; half the disk)."""
    check_export(cfg, stage, tp, dtype, "the model")
    entries = layout(cfg, stage.generates)
    known = {e.ours for e in entries}
    missing = [e.ours for e in entries if e.ours is not None and e.ours not in state]
    if missing:
        raise UserError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of PLUG's layout")
    unknown = [name for name in state if name not in known]
    if unknown:  # refuse rather than drop a parameter silently
        raise UserError(f"the checkpoint has {unknown[0]}, which PLUG's layout has no place for")
    rows = plug_vocab_size(tokens, tp)
    paths = []
    for rank in range(tp):
        module: dict[str, torch.Tensor] = {}
        for e in entries:
            if e.plug == TIED:  # the same parameter as the word embedding: stored once, under both names
                module[e.plug] = module[WORD]
                continue
            full = _full(state, e, cfg, rows)
            out = torch.float32 if e.is_norm else DTYPES[dtype]
            if rank == 0 and out == torch.float16 and full.numel() and float(full.abs().max()) > FP16_MAX:
                raise UserError(f"{e.ours} holds values beyond fp16's range ({float(full.abs().max()):.3g}): export"
                                " with dtype=fp32")  # fmt: skip
            part = piece(full, e, tp, rank)
            module[e.plug] = torch.empty(part.shape, dtype=out).copy_(part)  # its own storage: a view would save all
        path = os.path.join(out_dir, SHARD.format(rank))
        torch.save({"module": module, "mp_world_size": tp}, path)
        paths.append(path)
        del module
    return paths


def plug_config(cfg: ModelConfig, stage, tokens: int, tp: int, dtype: str, tag_dir: str) -> dict:
    """config.json in the keys of PLUG's BertConfig (model/modeling.py), and what the export adds."""
    return {
        "vocab_size": plug_vocab_size(tokens, tp), "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "intermediate_size": cfg.ffn, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab,
        "initializer_range": cfg.init_std, "deep_init": False, "pre_ln": cfg.pre_ln,
        "fp32_layernorm": dtype == "fp16", "fp32_embedding": False, "fp32_tokentypes": False,
        "layernorm_epsilon": cfg.ln_eps, "dec_hidden_layers": cfg.decoder_layers if stage.generates else 0,
        "model_type": "plugNLG" if stage.generates else "plugNLU",
        "pretrain_export": {
            "stage": stage.name, "tensor_parallel": tp, "dtype": dtype, "vocab_tokens": tokens, "checkpoint": tag_dir,
            "embedding_layernorm": "ours" if cfg.normed_embeddings else
            "identity: the model has none, and PLUG's forward normalises the embeddings (it differs from ours)",
        },
    }  # fmt: skip


def export_plug(run_dir: str, record, out: str, step: int | None = None, overwrite: bool = False, tp: int = 8,
                dtype: str = "fp16", check: bool = True) -> tuple[str, dict]:  # fmt: skip
    """Write run_dir's newest (or step's) checkpoint in PLUG's layout to out: the shards, config.json, vocab.txt.
    record: the run's model record (pretrain/run_record.py: the stage's class and the model's config).
    Built beside out and renamed into place at the end. check: the shards are read back (ShardSet) and every
    tensor compared with the checkpoint's (cast to what was written) before that. Returns the checkpoint and the
    largest difference per kind of split (all 0.0)."""
    from pretrain.data.tokenizer import read_vocab
    from pretrain.training import checkpoint, partitions, run_dir as run_dir_files

    stage, cfg = record.stage_class, record.cfg
    check_export(cfg, stage, tp, dtype, f"run.dir={run_dir}")
    if os.path.exists(out) and not overwrite and os.listdir(out):
        raise UserError(f"out={out}: exists and is not empty (overwrite=true replaces it)")
    where = os.path.join(run_dir, "checkpoints", f"step{step}") if step is not None else run_dir
    tag_dir = checkpoint.find(where, "step" if step is not None else "run.dir", option="step={step}")
    tokens = len(read_vocab(os.path.join(run_dir, "vocab.txt")))
    state = partitions.consolidate(tag_dir, lazy=True)
    diffs: dict[str, float] = {}
    with run_dir_files.built_beside(out) as tmp:
        write_shards(state, cfg, stage, tokens, tmp, tp, dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plug_config(cfg, stage, tokens, tp, dtype, tag_dir), f, indent=2)
        shutil.copyfile(os.path.join(run_dir, "vocab.txt"), os.path.join(tmp, "vocab.txt"))
        if check:
            diffs = compare(tmp, state, cfg, stage, tokens, dtype)
            if any(v != 0.0 for v in diffs.values()):
                raise UserError(f"out={out}: the shards read back differ from the checkpoint ({diffs})")
    return tag_dir, diffs


def compare(shard_dir: str, state, cfg: ModelConfig, stage, tokens: int, dtype: str) -> dict[str, float]:
    """The largest |read back - written| per kind of split, over every tensor of the shards in shard_dir."""
    shards = ShardSet(shard_dir, f"out={shard_dir}")
    rows = plug_vocab_size(tokens, shards.tp)
    diffs: dict[str, float] = {}
    for e in layout(cfg, stage.generates):
        want = _full(state, e, cfg, rows).to(torch.float32 if e.is_norm else DTYPES[dtype]).float()
        got = shards.tensor(e).float()
        d = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        diffs[e.split] = max(diffs.get(e.split, 0.0), d)
    return diffs


def main(cfg, record) -> None:
    """pretrain.export format=plug (export.py hands its parsed settings and the run's model record over)."""
    tp = 8 if cfg.tp is None else cfg.tp
    dtype = "fp16" if cfg.dtype is None else str(cfg.dtype)
    tag_dir, diffs = export_plug(cfg.run.dir, record, cfg.out, None if cfg.step is None else int(cfg.step),
                                 bool(cfg.overwrite), tp, dtype, bool(cfg.check))  # fmt: skip
    print(f"pretrain.export: {tag_dir} -> {cfg.out} (PLUG's layout, {tp} tensor-parallel shards, {dtype})")
    if diffs:
        print("pretrain.export: check, shards read back vs the checkpoint, max |difference|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))  # fmt: skip


# ---- in: init_from=plug:<dir> ------------------------------------------------------------------------------
class ShardSet:
    """A directory of PLUG shards, each memory-mapped (only the pages a merge touches are read): the full tensor
    of any entry, merged from the ranks' pieces one at a time."""

    def __init__(self, path: str, where: str):
        from pretrain.training import safe_load

        if not os.path.isdir(path):
            raise UserError(f"{where}: no such directory")
        found = {int(m.group(1)): n for n in os.listdir(path) if (m := _SHARD_FILE.match(n))}
        if not found and os.path.isdir(os.path.join(path, "model")):  # ModelScope's layout: the shards in model/
            path = os.path.join(path, "model")
            found = {int(m.group(1)): n for n in os.listdir(path) if (m := _SHARD_FILE.match(n))}
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
    from pretrain.training.init_from import InitSource, map_by_name, source_names

    where = f"init_from={init_from}"
    shards = ShardSet(path, where)
    their = _their_config(path, where)
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


def _check_vocab(path: str, vocab_path: str, rows: int, where: str):
    """The data's token ids must mean what PLUG learnt: its vocab.txt (beside the shards), token for token, or the
    extension of it (VocabExtension) the data's is."""
    from pretrain.data.tokenizer import read_vocab, vocab_extension

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

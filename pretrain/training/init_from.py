"""Reading a run's first weights, once pretrain/init_sources.py has said where they come from: a stage-one (or any)
ZeRO-3 checkpoint written by any number of ranks, each rank reading its own partition of each parameter from it, or
a directory of another project (transformers, PLUG) that reads itself (InitSource.read_weights) and is copied into
the partitioned model one parameter at a time.

The encoder and its heads (MLM, sentence) keep their names across the stages, so the mapping is the identity on them;
the decoder is new, or (`model.decoder_init=encoder_top`) takes the self-attention and FFN of the top
encoder layers. Everything that can be wrong with `init_from` is checked from the checkpoint's recorded
parameter shapes, before any rank starts or writes, so a bad path costs one line, not a failed job.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from pretrain.data.tokenizer import VocabExtension, read_vocab, vocab_extension
from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.training import checkpoint, distributed, partitions

VOCAB_TABLES = ("encoder.embeddings.word.weight", "mlm_head.bias")  # a row per token id
_DECODER_FROM_ENCODER = {"self_attn.": "attn.", "self_attn_norm.": "attn_norm.", "ffn.": "ffn.", "ffn_norm.": "ffn_norm."}


@dataclass(frozen=True)
class InitSource:
    """Where a run's weights come from (a run's checkpoint, or another project's directory: hf:, plug:), and which
    of its parameters each of ours takes."""

    tag_dir: str  # a DeepSpeed checkpoint directory, or what init_from= named (hf:<dir>, plug:<dir>)
    mapping: dict[str, str]  # our parameter -> the checkpoint's (missing: keeps its fresh init)
    fresh: tuple[str, ...]  # our parameters that keep their fresh init
    extension: VocabExtension | None = None  # the data's vocab extends the source's: VOCAB_TABLES take new rows
    # Another project's directory: its weights by the source's names, read on rank 0 (a mapping read on demand).
    # None for a DeepSpeed checkpoint, which each rank reads in partitions.
    read_weights: Callable[[], Mapping[str, torch.Tensor]] | None = None

    def restricted(self, target_shapes: dict[str, tuple[int, ...]], fresh: tuple[str, ...]) -> InitSource:
        """The same source with every parameter whose name starts with one of `fresh` left fresh."""
        mapping = {n: s for n, s in self.mapping.items() if not n.startswith(fresh)}
        return dataclasses.replace(self, mapping=mapping, fresh=tuple(n for n in target_shapes if n not in mapping))

    def report(self) -> dict[str, dict[str, int]]:
        """Parameter tensors carried from the checkpoint and left fresh, counted per top-level module."""
        def count(names):
            out: dict[str, int] = {}
            for name in names:
                out[name.split(".")[0]] = out.get(name.split(".")[0], 0) + 1
            return out
        return {"carried": count(self.mapping), "fresh": count(self.fresh)}

    def describe(self) -> str:
        """The report as the one line rank 0 prints."""
        r = self.report()
        line = lambda per_module: ", ".join(f"{module} {n}" for module, n in per_module.items())  # noqa: E731
        grown = f"; {len(self.extension.pieces)} new token rows from their pieces" if self.extension else ""
        return f"init_from {self.tag_dir}: carried {line(r['carried'])}; fresh {line(r['fresh']) or 'none'} (parameter tensors){grown}"


def checkpoint_source(init_from: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
                      vocab_path: str | None = None) -> InitSource:  # fmt: skip
    """A run directory or one of its checkpoints (a stage-one model for a stage-one or stage-two run), checked
    against our shapes, and the run's vocab against the data's."""
    tag_dir = checkpoint.find(init_from, "init_from")
    theirs = vocab_beside(init_from)
    extension = None
    if vocab_path is not None and theirs is not None:  # the ids must mean what the run learnt, padded size or not
        extension = vocab_extension(read_vocab(theirs), vocab_path, f"init_from={init_from}", theirs)
    mapping = check(init_from, tag_dir, target_shapes, cfg, extension)
    return InitSource(tag_dir, mapping, tuple(n for n in target_shapes if n not in mapping), extension=extension)


def source_names(target_names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Stage-two parameter -> the stage-one parameter it starts from (missing = keeps its fresh init)."""
    mapping = {n: n for n in target_names if n.startswith(("encoder.", "mlm_head.", "sentence_head."))}
    # a fine-tuned classifier's pooler is the sentence head's (BERT's practice: the pooler is pre-trained)
    mapping.update({n: "sentence_head." + n for n in target_names if n.startswith("pooler.")})
    if cfg.decoder_init == "encoder_top":
        first = cfg.layers - cfg.decoder_layers  # decoder layer i <- encoder layer first + i
        for name in target_names:
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
            if not m:
                continue
            for dec, enc in _DECODER_FROM_ENCODER.items():
                if m.group(2).startswith(dec):
                    mapping[name] = f"encoder.layers.{first + int(m.group(1))}.{enc}{m.group(2)[len(dec):]}"
    return mapping


def check(init_from: str, tag_dir: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
          extension: VocabExtension | None = None) -> dict[str, str]:  # fmt: skip
    """The mapping, once the checkpoint is known to be a stage-one model of this model's dimensions (with an
    extended vocab, the token tables may have other rows: each holds the source's tokens)."""
    have = checkpoint.recorded_shapes(tag_dir, "init_from")
    where = f"init_from={init_from}"
    if any(n.startswith("decoder.") for n in have):
        raise UserError(f"{where}: a stage-two (palm) checkpoint; stage two starts from a stage-one (structbert) one")
    if not any(n.startswith("encoder.") for n in have):
        raise UserError(f"{where}: no encoder parameters; not a stage-one (structbert) checkpoint")
    if cfg.decoder_init == "encoder_top" and cfg.decoder_layers > cfg.layers:
        raise UserError(f"model.decoder_init=encoder_top: model.decoder_layers={cfg.decoder_layers} > model.layers={cfg.layers}")
    _check_layers(have, cfg, where)
    _check_embedding_norm(have, target_shapes, where)
    mapping = source_names(list(target_shapes), cfg)
    for target, source in mapping.items():
        if source not in have:
            raise UserError(f"{where}: the checkpoint has no {source} (model.pre_ln or the model differ)")
        theirs, ours = have[source], target_shapes[target]
        if not (extension and source in VOCAB_TABLES and theirs[1:] == ours[1:] and theirs[0] >= extension.rows):
            _check_shape(where, source, theirs, ours, cfg)
    return mapping


def _check_layers(have: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
    their_layers = len({m.group(1) for n in have if (m := re.match(r"encoder\.layers\.(\d+)\.", n))})
    if their_layers != cfg.layers:
        raise UserError(f"{where}: the checkpoint has {their_layers} encoder layers, model.layers={cfg.layers}")


def _check_embedding_norm(have: dict[str, tuple[int, ...]], target_shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Two pre-LN models that differ in model.embedding_norm: the checkpoint's embedding LayerNorm would be dropped
    (the mapping takes only what the model has), or the model's left fresh; either changes what is computed."""
    norm, pre_ln = "encoder.embeddings.norm.weight", "encoder.final_norm.weight"
    if pre_ln in have and pre_ln in target_shapes and (norm in have) != (norm in target_shapes):
        theirs = norm in have
        raise UserError(f"{where}: the checkpoint has {'an' if theirs else 'no'} embedding LayerNorm, this model has"
                        f" {'none' if theirs else 'one'}; set model.embedding_norm={str(theirs).lower()}")  # fmt: skip


def _check_shape(where: str, source: str, theirs: tuple[int, ...], ours: tuple[int, ...], cfg: ModelConfig) -> None:
    if theirs != ours:
        raise UserError(f"{where}: {source} is {list(theirs)} in the checkpoint, {list(ours)} in this model"
                        f" ({likely_cause(source, theirs, ours, cfg)})")  # fmt: skip


def finetune_checkpoint_source(init_from: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
                               needs_stage_two: bool) -> InitSource:  # fmt: skip
    """Fine-tuning (pretrain.finetune) from a stage-one or stage-two checkpoint: the encoder (and for generation the
    whole PALM) is carried by name, the task's new layer is fresh."""
    where = f"init_from={init_from}"
    tag_dir = checkpoint.find(init_from, "init_from")
    have = checkpoint.recorded_shapes(tag_dir, "init_from")
    stage_two = any(n.startswith("decoder.") for n in have)
    if needs_stage_two and not stage_two:
        raise UserError(f"{where}: a stage-one (structbert) checkpoint; a generation task needs a stage-two (palm) one")
    _check_layers(have, cfg, where)
    _check_embedding_norm(have, target_shapes, where)
    wanted = {n: n for n in target_shapes if n.startswith(("encoder.", "decoder.", "mlm_head.", "copy_gate."))}
    wanted.update(source_names([n for n in target_shapes if n.startswith(("pooler.", "sentence_head."))], cfg))
    mapping = {}
    for target, source in wanted.items():
        if source not in have:
            if target.startswith(("encoder.", "decoder.")):
                raise UserError(f"{where}: the checkpoint has no {source} (model.pre_ln, model.decoder_layers or the "
                                "model differ)")  # fmt: skip
            continue  # a head the checkpoint lacks keeps its fresh init
        _check_shape(where, source, have[source], target_shapes[target], cfg)
        mapping[target] = source
    return InitSource(tag_dir, mapping, tuple(n for n in target_shapes if n not in mapping))


def vocab_beside(path: str) -> str | None:
    """The vocab.txt of the run that `path` (a run directory, one of its checkpoints, another project's directory)
    holds or is in."""
    for d in (path, os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        if os.path.isfile(os.path.join(d, "vocab.txt")):
            return os.path.join(d, "vocab.txt")
    return None


def map_by_name(target_shapes: dict[str, tuple[int, ...]], wanted: dict[str, str], have: dict[str, tuple[int, ...]],
                cfg: ModelConfig, where: str, rows_any: tuple[str, ...], rows_grow: tuple[str, ...],
                ) -> tuple[dict[str, str], list[str]]:  # fmt: skip
    """(our parameter -> the source's, our fresh parameters) of a source directory whose tensors have the shapes
    `have` (hf:, plug:): each of ours takes `wanted`'s source where the directory has it, else stays fresh. Shapes
    must be equal, but for tables with other rows: those of rows_any (vocab padding, cut or kept fresh on load),
    those of rows_grow with fewer rows there, and a position table with more (cut)."""
    mapping, fresh = {}, []
    for name, shape in target_shapes.items():
        source = wanted.get(name)
        theirs = have.get(source) if source else None
        if theirs is None:  # the decoder of an encoder, a head the directory lacks, a task's new layer
            fresh.append(name)
            continue
        rows = theirs[1:] == shape[1:] and (source in rows_any or (source in rows_grow and theirs[0] <= shape[0])
                                            or (source == "encoder.embeddings.position.weight" and theirs[0] >= shape[0]))
        if theirs != shape and not rows:
            raise UserError(f"{where}: {source} is {list(theirs)} there, {list(shape)} in this model"
                            f" ({likely_cause(source, theirs, shape, cfg)})")  # fmt: skip
        mapping[name] = source
    return mapping, fresh


def likely_cause(name: str, theirs: tuple, ours: tuple, cfg: ModelConfig) -> str:
    if name == "encoder.embeddings.word.weight" and theirs[0] != ours[0]:
        return f"vocab size {theirs[0]} vs {ours[0]}: the data or model.vocab_size differ"
    if name == "encoder.embeddings.position.weight" and theirs[0] != ours[0]:
        return f"model.max_positions={cfg.max_positions} vs {theirs[0]}"
    if theirs[-1] != ours[-1]:
        return f"model.hidden={cfg.hidden} vs {theirs[-1]}"
    return "model.ffn or model.heads differ"


def load_into(model: torch.nn.Module, source: InitSource, rank: int) -> None:
    """Copy the mapped weights into the ZeRO-3-partitioned model.

    From a DeepSpeed checkpoint, each rank copies only its own partition of each parameter, read from the
    checkpoint's partition files where they hold it (partitions.PartitionReader): no rank holds the model, or
    even one whole parameter, whatever the two world sizes (at PLUG's 27B, a full fp32 copy would be 108 GB in
    one process). From another project's directory (transformers, PLUG), rank 0 reads it and each parameter is
    gathered, set on rank 0 and re-partitioned."""
    if source.read_weights is not None:  # another project's directory: merged one parameter at a time, on rank 0
        _load_gathered(model, source.read_weights() if rank == 0 else None, source, rank)
        return

    reader = partitions.PartitionReader(source.tag_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():  # no collective: any order, every rank on its own
            if name not in source.mapping:
                continue
            theirs, numel = source.mapping[name], getattr(param, "ds_numel", param.numel())
            grows = source.extension is not None and theirs in VOCAB_TABLES
            if reader.numel(theirs) != numel and not grows:  # init_source checked the shapes; this is a bug
                raise RuntimeError(f"{name}: {numel} elements, the checkpoint's {theirs} {reader.numel(theirs)}")
            if hasattr(param, "ds_tensor"):  # this rank's partition: [r * size, (r + 1) * size), the last padded
                part = param.ds_tensor.view(-1)
                group = getattr(param, "ds_process_group", None)
                start = min(numel, (dist.get_rank(group) if dist.is_initialized() else 0) * part.numel())
            else:
                part, start = param.data.view(-1), 0
            end = min(numel, start + part.numel())
            read = lambda a, b, theirs=theirs: reader.read(theirs, a, b)  # noqa: E731
            if grows:
                _copy_token_rows(read, numel // _rows(param), source.extension, start, end, part)
            else:
                part[: end - start].copy_(read(start, end))
    # Each rank saw only its slices: every rank learns of a non-finite one, and refuses with the same line.
    partitions.refuse_nonfinite(source.tag_dir, next((n for n in distributed.gather_objects(reader.nonfinite) if n), None))


def _load_gathered(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None, source: InitSource,
                   rank: int) -> None:  # fmt: skip
    """Rank 0 holds `weights`; one parameter at a time is gathered, set there and re-partitioned."""
    import deepspeed  # deepspeed: ~2 s to import; only on this gathered path

    for name, param in model.named_parameters():  # the same order on every rank: gathering is collective
        if name not in source.mapping:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                theirs = source.mapping[name]
                w = weights[theirs].to(param.dtype)
                if source.extension is not None and theirs in VOCAB_TABLES:
                    flat = w.reshape(-1)
                    _copy_token_rows(lambda a, b: flat[a:b], param[0].numel(), source.extension, 0, param.numel(),
                                     param.data.view(-1))  # fmt: skip
                elif w.shape == param.shape:
                    param.data.copy_(w)
                else:  # hf: an embedding table with other rows (vocab padding, token types, positions)
                    n = min(w.shape[0], param.shape[0])  # rows past the source's keep their fresh init
                    param.data[:n].copy_(w[:n])


def _rows(param: torch.nn.Parameter) -> int:
    return (getattr(param, "ds_shape", None) or param.shape)[0]


def _copy_token_rows(read: Callable[[int, int], torch.Tensor], width: int, extension: VocabExtension, start: int,
                     end: int, part: torch.Tensor) -> None:  # fmt: skip
    """Elements [start, end) of a token table (`width` to a row) into `part`, with the data's vocab extending the
    source's: the source's tokens' rows as they are, each new token's row the mean of its pieces' rows (what stood
    for it before; so the model starts where it was on that text), padding rows untouched (their fresh init).
    read(a, b) gives the source's flat elements [a, b); only the rows this slice needs are read."""
    kept = min(end, extension.rows * width)
    if kept > start:
        part[: kept - start].copy_(read(start, kept))
    for token, pieces in extension.pieces.items():
        lo, hi = max(start, token * width), min(end, (token + 1) * width)
        if lo < hi:
            row = torch.stack([read(p * width, (p + 1) * width).float() for p in pieces]).mean(0)
            part[lo - start: hi - start].copy_(row[lo - token * width: hi - token * width])

"""Export a run's checkpoint to a Hugging Face `transformers` directory (needs `pip install -e .[hf]`):

    python -m pretrain.export run.dir=<run> out=<dir> [step=<N>] [overwrite=false] [check=true]

The newest checkpoint (or `step=N`'s), written by any number of ranks, is consolidated once (DeepSpeed's
zero_to_fp32) and its tensors are renamed, not copied, into transformers' layout:
- stage one, pre-LN (PLUG): `model_type` megatron-bert; post-LN (`model.pre_ln=false`): bert. One
  model.safetensors holds `bert.*`, `cls.predictions.*` (the MLM head; its decoder is the tied word embedding)
  and `classifier.*` (the 3-way sentence head), so AutoModel, AutoModelForMaskedLM and
  AutoModelForSequenceClassification (num_labels=3) load it with no missing key.
- stage two: our PALM's own modules and parameter names in a small PreTrainedModel + GenerationMixin class
  (pretrain/hf_palm.py, written as modeling_plug_palm.py and named in config.json's auto_map), so that
  AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).generate(...) works; the weights are our
  state dict as it is (the shared embeddings once), with generation_config.json ([CLS] starts, [SEP] ends).
  model.copy=true is refused: the class has no copy mechanism (PLUG does not use it).
Also written: config.json, the tokenizer (save_pretrained, with split_special_tokens so that literal "[MASK]"
text tokenizes as ours does), and a model card (README.md). The directory is built beside `out` and renamed
into place at the end: an error leaves nothing half-written.

format=plug [tp=8] [dtype=fp16]: PLUG's own released layout instead (AliceMind's tensor-parallel shards
mp_rank_XX_model_states.pt, config.json, vocab.txt; see pretrain/plug_layout.py), its check a read-back.

check=true (the default) then loads the export with transformers' Auto classes, runs it and our model on one
fixed padded batch in fp32, prints the largest differences (hidden states, MLM and sentence logits; stage two:
decoder logits, and whether greedy and beam generate() give our tokens) and fails above 1e-4 or on other tokens.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile

import torch

from pretrain.cli import parse
from pretrain.data.tokenizer import Tokenizer, read_vocab
from pretrain.errors import UserError, exit_on_user_error
from pretrain.models.config import ModelConfig
from pretrain.models.hf_layout import SSO_LABELS, to_hf_plan
from pretrain.training import checkpoint, safe_load

DEFAULTS = {"run": {"dir": None}, "out": None, "step": None, "overwrite": False, "check": True, "trust_checkpoint": False,
            "format": "hf", "tp": None, "dtype": None}  # tp, dtype: format=plug's (pretrain/plug_layout.py)
CHECK_TOLERANCE = 1e-4  # max |difference| between transformers' outputs and ours that `check` accepts


def stage_one_config(cfg: ModelConfig, pad_id: int):
    from transformers import BertConfig, MegatronBertConfig

    kind, arch = (MegatronBertConfig, "MegatronBertForMaskedLM") if cfg.pre_ln else (BertConfig, "BertForMaskedLM")
    return kind(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn, hidden_act="gelu", hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout, max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab, initializer_range=cfg.init_std, layer_norm_eps=cfg.ln_eps, pad_token_id=pad_id,
        tie_word_embeddings=True, architectures=[arch], num_labels=cfg.sso_classes,
        id2label=dict(SSO_LABELS), label2id={v: k for k, v in SSO_LABELS.items()},
    )  # fmt: skip


def write_safetensors(path: str, plan: list[tuple[str, str, int | None]], state: dict) -> None:
    """The safetensors file of `plan` (their name, our name, third of a fused QKV or None), fp32, written one
    tensor at a time: the header (names, shapes, byte offsets) first, then each tensor's bytes as it is assembled,
    so no second full copy of the model is ever held (safetensors' own save_file builds one)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for theirs, ours, third in plan:
        shape = list(state[ours].shape)
        if third is not None:
            shape[0] //= 3
        size = 4 * math.prod(shape)
        header[theirs] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        last_name, last = None, None
        for _, ours, third in plan:
            if ours != last_name:  # the parts of one tensor are consecutive in the plan
                last_name, last = ours, state[ours].contiguous().detach().float()
            piece = last if third is None else last.chunk(3, dim=0)[third]
            f.write(memoryview(piece.contiguous().numpy()).cast("B"))


PALM_MODULE = "modeling_plug_palm"  # the file the export writes pretrain/hf_palm.py to


def palm_config(cfg: ModelConfig, tok: Tokenizer):
    from pretrain.hf_palm import PlugPalmConfig

    return PlugPalmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_decoder_layers=cfg.decoder_layers, num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
        max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab, layer_norm_eps=cfg.ln_eps,
        pre_ln=cfg.pre_ln, sso_classes=cfg.sso_classes, pad_token_id=tok.pad_id, bos_token_id=tok.cls_id,
        eos_token_id=tok.sep_id, decoder_start_token_id=tok.cls_id, architectures=["PlugPalmForConditionalGeneration"],
        auto_map={"AutoConfig": f"{PALM_MODULE}.PlugPalmConfig",
                  "AutoModelForSeq2SeqLM": f"{PALM_MODULE}.PlugPalmForConditionalGeneration"},
    )  # fmt: skip


def save_tokenizer(vocab_path: str, out: str) -> None:
    """bert-base-chinese's pipeline over our vocab; literal "[MASK]" text is text, as in our tokenizer."""
    from transformers import BertTokenizer  # the fast one in transformers 5

    tokens = read_vocab(vocab_path)
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first occurrence wins, as in ours
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                        split_special_tokens=True)  # fmt: skip
    tok.save_pretrained(out)


def model_card(run_dir: str, tag_dir: str, stage: str, cfg: ModelConfig, model_type: str) -> str:
    """A short README.md: what the model is, the run's config, steps, data and final metrics."""
    info, rows = {}, []
    if os.path.isfile(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            info = json.load(f)
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    last = {split: next((r for r in reversed(rows) if r["split"] == split), None) for split in ("train", "valid")}
    data = info.get("train_data", {})
    lines = [
        f"# {os.path.basename(os.path.normpath(run_dir))}: {'StructBERT (stage one)' if stage == 'structbert' else 'PALM (stage two)'}",
        "", f"Exported by `python -m pretrain.export` from `{tag_dir}` (model_type `{model_type}`).", "",
        "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in (
            ("hidden x layers x heads", f"{cfg.hidden} x {cfg.layers} x {cfg.heads}"), ("ffn", cfg.ffn),
            ("decoder layers", cfg.decoder_layers), ("vocab (padded)", cfg.vocab_size), ("positions", cfg.max_positions),
            ("pre-LN", cfg.pre_ln), ("parameters", info.get("parameters")), ("global batch", info.get("global_batch")),
            ("steps", (last["train"] or {}).get("step")), ("documents", data.get("num_docs")),
        )),
    ]  # fmt: skip
    for split, row in last.items():
        if row:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("_loss", "_acc", "_ppl")) and v is not None)
            lines += ["", f"Last {split} row (step {row['step']}): {metrics}."]
    if stage == "structbert":
        lines += ["", "Sentence head: `AutoModelForSequenceClassification`, labels 0 random, 1 next, 2 previous."]
    return "\n".join(lines) + "\n"


def export(run_dir: str, out: str, step: int | None = None, overwrite: bool = False) -> str:
    """Write the export of run_dir's newest (or step's) checkpoint to out; returns the checkpoint exported."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("the export needs transformers and safetensors: pip install -e '.[hf]'") from None
    stage, cfg = checkpoint.run_model_config(run_dir)
    if os.path.exists(out) and not overwrite and os.listdir(out):
        raise UserError(f"out={out}: exists and is not empty (overwrite=true replaces it)")
    if stage == "palm" and cfg.copy:
        raise UserError(f"run.dir={run_dir}: model.copy=true; the exported PALM class has no copy mechanism "
                        "(PLUG does not use it): export a run trained with model.copy=false")  # fmt: skip
    where = os.path.join(run_dir, "checkpoints", f"step{step}") if step is not None else run_dir
    tag_dir = checkpoint.find(where, "step" if step is not None else "run.dir")
    # lazily: the ranks' fp32 partitions stay as they are, and one full tensor at a time is assembled and written
    state = checkpoint.consolidate(tag_dir, lazy=True)
    # stage two: our own names, which the exported class (pretrain/hf_palm.py) keeps; the embeddings once
    plan = to_hf_plan(state, cfg) if stage == "structbert" else [(name, name, None) for name in state]
    tok = Tokenizer(os.path.join(run_dir, "vocab.txt"))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), plan, state)
        del state
        hf_cfg = stage_one_config(cfg, tok.pad_id) if stage == "structbert" else palm_config(cfg, tok)
        hf_cfg.save_pretrained(tmp)
        if stage == "palm":
            from transformers import GenerationConfig

            from pretrain import hf_palm

            shutil.copyfile(hf_palm.__file__, os.path.join(tmp, f"{PALM_MODULE}.py"))
            GenerationConfig(decoder_start_token_id=tok.cls_id, bos_token_id=tok.cls_id, eos_token_id=tok.sep_id,
                             pad_token_id=tok.pad_id, max_new_tokens=64, use_cache=False).save_pretrained(tmp)  # fmt: skip
        save_tokenizer(os.path.join(run_dir, "vocab.txt"), tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(run_dir, tag_dir, stage, cfg, hf_cfg.model_type))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep other users out of the export
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return tag_dir


def check(run_dir: str, out: str, tag_dir: str) -> dict[str, float]:
    """Largest |transformers - ours| of each output on one fixed padded batch (fp32, eval mode); for stage two
    also whether greedy and beam generate() give our tokens (0 when they do)."""
    import transformers

    transformers.logging.set_verbosity_error()  # its load report lists the other heads' keys as unexpected
    transformers.logging.disable_progress_bar()
    stage, cfg = checkpoint.run_model_config(run_dir)
    ours = checkpoint.load_run_model(run_dir, tag_dir)  # in eval mode: no dropout
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (3, min(24, cfg.max_positions)), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, ids.shape[1] * 2 // 3 :], mask[2, ids.shape[1] // 3 :] = False, False
    with torch.no_grad():
        if stage == "palm":
            return _check_palm(ours, out, ids, mask, g)
        types = torch.randint(0, 2, ids.shape, generator=g)
        h = ours.encoder(ids, types, mask)
        want = {"hidden": h, "mlm_logits": ours.mlm_head(h, ours.encoder.embeddings.word.weight),
                "sentence_logits": ours.sentence_head(h)}  # fmt: skip
        diffs = {}
        for key, cls in (("hidden", "AutoModel"), ("mlm_logits", "AutoModelForMaskedLM"),
                         ("sentence_logits", "AutoModelForSequenceClassification")):  # fmt: skip
            model = getattr(transformers, cls).from_pretrained(out).eval()
            got = model(input_ids=ids, token_type_ids=types, attention_mask=mask.long())
            got = got.last_hidden_state if key == "hidden" else got.logits
            diffs[key] = float((got - want[key])[mask if got.dim() == 3 else slice(None)].abs().max())
    return diffs


def _check_palm(ours, out: str, ids: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> dict[str, float]:
    from transformers import AutoModelForSeq2SeqLM

    from pretrain.models.decoding import generate

    theirs = AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
    dec = torch.randint(5, ours.cfg.vocab_size, (ids.shape[0], 9), generator=g)
    h, _ = ours.decoder(dec, ours.encoder.embeddings, ours.encode(ids, mask), mask)
    want = torch.nn.functional.linear(h, ours.encoder.embeddings.word.weight)
    got = theirs(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
    diffs = {"decoder_logits": float((got - want).abs().max())}
    cfg, src = theirs.config, ids[:1]
    for strategy, beams in (("greedy", 1), ("beam", 4)):
        mine = generate(ours, src, bos_id=cfg.decoder_start_token_id, eos_id=cfg.eos_token_id, max_new_tokens=16,
                        strategy=strategy, num_beams=beams, length_penalty=1.0)  # fmt: skip
        hf = theirs.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=16, do_sample=False,
                             num_beams=beams, length_penalty=1.0)[0, 1:].tolist()  # fmt: skip
        hf = hf[: hf.index(cfg.eos_token_id)] if cfg.eos_token_id in hf else hf
        diffs[f"{strategy}_tokens_differ"] = float(hf != mine)
    return diffs


def main(argv: list[str]) -> None:
    cfg, _ = parse(argv, DEFAULTS, command="pretrain.export", doc=__doc__, verbatim=("run.dir", "out"))
    if cfg.run.dir is None or cfg.out is None:
        raise UserError("run.dir and out are required (python -m pretrain.export run.dir=<run> out=<dir>)")
    safe_load.trust(safe_load.trust_setting(cfg.trust_checkpoint))
    if cfg.format == "plug":
        from pretrain import plug_layout

        return plug_layout.main(cfg)
    if cfg.format != "hf" or cfg.tp is not None or cfg.dtype is not None:
        raise UserError(f"format={cfg.format}: must be hf or plug (tp= and dtype= are format=plug's)")
    tag_dir = export(cfg.run.dir, cfg.out, None if cfg.step is None else int(cfg.step), bool(cfg.overwrite))
    print(f"pretrain.export: {tag_dir} -> {cfg.out}")
    if cfg.check:
        diffs = check(cfg.run.dir, cfg.out, tag_dir)
        print("pretrain.export: check, max |transformers - ours| in fp32: "
              + ", ".join(f"{k} {v:.2e}" if "tokens" not in k else f"{k} {bool(v)}" for k, v in diffs.items()))  # fmt: skip
        worst = max(v for k, v in diffs.items() if "tokens" not in k)
        if worst > CHECK_TOLERANCE or any(v for k, v in diffs.items() if "tokens" in k):
            raise UserError(f"out={cfg.out}: transformers' model differs from ours (max |difference| {worst:.2e}, "
                            f"tokens differ: {[k for k, v in diffs.items() if 'tokens' in k and v] or 'none'})")


if __name__ == "__main__":
    with exit_on_user_error("pretrain.export"):
        main(sys.argv[1:])

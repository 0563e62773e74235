"""Writing our models as transformers directories, and checking them against ours: one class per stage's model,
named by the stage (pretrain/stages/), used by `pretrain.export`.

- A stage-one encoder, pre-LN (PLUG): `model_type` megatron-bert; post-LN (`model.pre_ln=false`): bert. One
  model.safetensors holds `bert.*`, `cls.predictions.*` (the MLM head; its decoder is the tied word embedding)
  and `classifier.*` (the 3-way sentence head), so AutoModel, AutoModelForMaskedLM and
  AutoModelForSequenceClassification (num_labels=3) load it with no missing key (layout.py: the names).
  A pre-LN encoder with an embedding LayerNorm (model.embedding_norm=true, PLUG's) is refused: MegatronBERT has
  none (format=plug writes it).
- A stage-two PALM: our own modules and parameter names in a small PreTrainedModel + GenerationMixin class
  (modeling_plug_palm.py, copied into the export and named in config.json's auto_map), so that
  AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).generate(...) works; the weights are our
  state dict as it is (the shared embeddings once), with generation_config.json ([CLS] starts, [SEP] ends).
  model.copy=true is refused: the class has no copy mechanism (PLUG does not use it). config.json's
  embedding_norm carries model.embedding_norm (the class then normalises the embeddings also when pre-LN).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct

import torch

from pretrain.data.tokenizer import Tokenizer, read_vocab
from pretrain.errors import UserError
from pretrain.hf.layout import SSO_LABELS, to_hf_plan
from pretrain.models.config import ModelConfig
from pretrain.models.decoding import generate
from pretrain.training.partitions import refuse_nonfinite

PALM_MODULE = "modeling_plug_palm"  # the file of the exported PALM class, in this package and in the export


def write_safetensors(path: str, plan: list[tuple[str, str, int | None]], state: dict, tag_dir: str | None = None) -> None:
    """The safetensors file of `plan` (their name, our name, third of a fused QKV or None), fp32, written one
    tensor at a time: the header (names, shapes, byte offsets) first, then each tensor's bytes as it is assembled,
    so no second full copy of the model is ever held (safetensors' own save_file builds one). With tag_dir (the
    checkpoint the state is read from), a tensor holding NaN or inf refuses the export as it is assembled."""
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
                if tag_dir is not None and not bool(torch.isfinite(last).all()):
                    refuse_nonfinite(tag_dir, ours)
            piece = last if third is None else last.chunk(3, dim=0)[third]
            f.write(memoryview(piece.contiguous().numpy()).cast("B"))


def save_tokenizer(vocab_path: str, out: str) -> None:
    """bert-base-chinese's pipeline over our vocab; literal "[MASK]" text is text, as in our tokenizer."""
    from transformers import BertTokenizer  # the fast one in transformers 5

    tokens = read_vocab(vocab_path)
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # first occurrence wins, as in ours
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                        split_special_tokens=True)  # fmt: skip
    tok.save_pretrained(out)


def stage_one_config(cfg: ModelConfig, pad_id: int):
    from transformers import BertConfig, MegatronBertConfig  # transformers: only when exporting

    kind, arch = (MegatronBertConfig, "MegatronBertForMaskedLM") if cfg.pre_ln else (BertConfig, "BertForMaskedLM")
    return kind(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn, hidden_act="gelu", hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout, max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab, initializer_range=cfg.init_std, layer_norm_eps=cfg.ln_eps, pad_token_id=pad_id,
        tie_word_embeddings=True, architectures=[arch], num_labels=cfg.sso_classes,
        id2label=dict(SSO_LABELS), label2id={v: k for k, v in SSO_LABELS.items()},
    )  # fmt: skip


def palm_config(cfg: ModelConfig, tok: Tokenizer):
    from pretrain.hf.modeling_plug_palm import PlugPalmConfig  # transformers: only when exporting

    return PlugPalmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_decoder_layers=cfg.decoder_layers, num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
        max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab, layer_norm_eps=cfg.ln_eps,
        pre_ln=cfg.pre_ln, embedding_norm=cfg.embedding_norm, sso_classes=cfg.sso_classes, pad_token_id=tok.pad_id, bos_token_id=tok.cls_id,
        eos_token_id=tok.sep_id, decoder_start_token_id=tok.cls_id, architectures=["PlugPalmForConditionalGeneration"],
        auto_map={"AutoConfig": f"{PALM_MODULE}.PlugPalmConfig",
                  "AutoModelForSeq2SeqLM": f"{PALM_MODULE}.PlugPalmForConditionalGeneration"},
    )  # fmt: skip


class EncoderExport:
    """A stage-one encoder as transformers' MegatronBERT (pre-LN) or BERT (post-LN)."""

    title = "StructBERT (stage one)"
    card_lines = ["", "Sentence head: `AutoModelForSequenceClassification`, labels 0 random, 1 next, 2 previous."]

    @staticmethod
    def refuse(cfg: ModelConfig, run_dir: str) -> None:
        """Every stage-one model exports but a pre-LN one with an embedding LayerNorm (model.embedding_norm):
        MegatronBERT normalises no embeddings, and dropping the LayerNorm would change what the model computes."""
        if cfg.pre_ln and cfg.embedding_norm:
            raise UserError(f"run.dir={run_dir}: model.embedding_norm=true; transformers' MegatronBERT (the pre-LN "
                            "export) has no embedding LayerNorm to hold it: export with format=plug")  # fmt: skip

    @staticmethod
    def plan(state: dict, cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
        return to_hf_plan(state, cfg)

    @staticmethod
    def config(cfg: ModelConfig, tok: Tokenizer):
        return stage_one_config(cfg, tok.pad_id)

    @staticmethod
    def write_extra(out: str, tok: Tokenizer, cfg: ModelConfig) -> None:
        """Nothing beside the weights, config and tokenizer: the classes are transformers' own."""

    @staticmethod
    def check(ours, out: str, ids: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        """Largest |transformers - ours| of the hidden states, MLM and sentence logits."""
        import transformers  # transformers: only when exporting

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


class PalmExport:
    """A stage-two PALM as our own transformers class (modeling_plug_palm.py), loaded with trust_remote_code."""

    title = "PALM (stage two)"
    card_lines: list[str] = []

    @staticmethod
    def refuse(cfg: ModelConfig, run_dir: str) -> None:
        if cfg.copy:
            raise UserError(f"run.dir={run_dir}: model.copy=true; the exported PALM class has no copy mechanism "
                            "(PLUG does not use it): export a run trained with model.copy=false")  # fmt: skip

    @staticmethod
    def plan(state: dict, cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
        """Our own names, which the exported class keeps; the embeddings once."""
        return [(name, name, None) for name in state]

    @staticmethod
    def config(cfg: ModelConfig, tok: Tokenizer):
        return palm_config(cfg, tok)

    @staticmethod
    def write_extra(out: str, tok: Tokenizer, cfg: ModelConfig) -> None:
        """The model's class (config.json's auto_map names it) and its generation defaults: the embedding's padding
        rows past the tokenizer's tokens (which no text has) are never generated, as in pretrain.generate."""
        from transformers import GenerationConfig  # transformers: only when exporting

        from pretrain.hf import modeling_plug_palm  # transformers: only when exporting

        shutil.copyfile(modeling_plug_palm.__file__, os.path.join(out, f"{PALM_MODULE}.py"))
        padding = list(range(tok.vocab_size, cfg.vocab_size))
        GenerationConfig(decoder_start_token_id=tok.cls_id, bos_token_id=tok.cls_id, eos_token_id=tok.sep_id,
                         pad_token_id=tok.pad_id, max_new_tokens=64, use_cache=True,
                         suppress_tokens=padding or None).save_pretrained(out)  # fmt: skip

    @staticmethod
    def check(ours, out: str, ids: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        """Largest |transformers - ours| of the decoder logits, and whether greedy and beam generate() give our
        tokens (0 when they do), ours barred from the ids the export's generation config suppresses."""
        from transformers import AutoModelForSeq2SeqLM  # transformers: only when exporting

        theirs = AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
        suppressed = theirs.generation_config.suppress_tokens  # the embedding's padding rows: the tail of the vocab
        dec = torch.randint(5, ours.cfg.vocab_size, (ids.shape[0], 9), generator=g)
        h, _ = ours.decoder(dec, ours.encoder.embeddings, ours.encode(ids, mask), mask)
        want = torch.nn.functional.linear(h, ours.encoder.embeddings.word.weight)
        got = theirs(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits
        diffs = {"decoder_logits": float((got - want).abs().max())}
        cfg, src = theirs.config, ids[:1]
        for strategy, beams in (("greedy", 1), ("beam", 4)):
            mine = generate(ours, src, bos_id=cfg.decoder_start_token_id, eos_id=cfg.eos_token_id, max_new_tokens=16,
                            strategy=strategy, num_beams=beams, length_penalty=1.0,
                            vocab_tokens=min(suppressed) if suppressed else None)  # fmt: skip
            hf = theirs.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=16, do_sample=False,
                                 num_beams=beams, length_penalty=1.0)[0, 1:].tolist()  # fmt: skip
            hf = hf[: hf.index(cfg.eos_token_id)] if cfg.eos_token_id in hf else hf
            diffs[f"{strategy}_tokens_differ"] = float(hf != mine)
        return diffs

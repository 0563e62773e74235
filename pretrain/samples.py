"""Write the first training samples of a run as the trainer builds them, one JSON object per line:

    python -m pretrain.samples stage=structbert data.dir=<dir> n=<N> out=<file.jsonl> [world_size=1] [trainer keys]

Any key=value of the trainer's config (data.seq_len=, palm.src_len=[32,96], seed=, train.max_steps=, ...) applies as
it does to `pretrain.train`, so the samples are those of the run: the same seed, epochs, indices and step order
(the n first samples the steps consume, step by step). world_size matters only where the global batch is
train.micro_batch_size x ranks: it decides which step a sample lands in and, in stage two, where masked LM stops.

Each line holds the global sample index and its step, the model's input as ids and as tokens, and the targets
with their positions. Stage one: the token types, the MLM and word-structure (WSO) targets, the SSO label and
name, and A and B as the corpus has them (token span, document, text). Stage two: the encoder input and its MLM
targets, the decoder input and labels (null where a position predicts nothing), the drawn and the realised
lengths, whether the target reaches its document's end (and so ends with [SEP]), whether masked LM is active,
and the context and target as the corpus has them.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from pretrain.cli import parse
from pretrain.data.structbert import SSO_NEXT, SSO_PREVIOUS, SSO_RANDOM
from pretrain.errors import UserError, exit_on_user_error
from pretrain.labels import IGNORE

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
OWN_KEYS = ("n", "out", "world_size")
SSO_NAMES = {SSO_RANDOM: "random", SSO_NEXT: "next", SSO_PREVIOUS: "previous", IGNORE: None}


def compose_config(overrides: list[str]):
    """The trainer's config with these overrides (run.dir is not needed to build samples)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("config", overrides=["run.dir=unused", *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad argument: {str(e).splitlines()[0]}") from None


def step_order(stage, data, global_batch: int, n: int) -> list[tuple[int, int]]:
    """(step, global index) of the first n samples, in the order the steps consume them."""
    from pretrain.data.sampling import LengthGroupedStepSampler, StepSampler

    steps = -(-n // global_batch)
    common = dict(micro_batch=global_batch, grad_accum=1, world_size=1, rank=0, max_steps=steps)
    if stage.name == "palm":  # grouped by length within pools: the same samples per step whatever the ranks
        sampler = LengthGroupedStepSampler(data.lengths, **common, group_steps=stage.group_steps, seed=stage.seed,
                                           boundary_step=stage.mlm_steps)  # fmt: skip
    else:
        sampler = StepSampler(**common)
    return [(t + 1, int(g)) for t, batch in enumerate(sampler) for g in batch][:n]


def _targets(labels: np.ndarray, tok) -> list[dict]:
    return [{"position": int(i), "id": int(labels[i]), "token": tok.id_to_token(int(labels[i]))}
            for i in np.flatnonzero(labels != IGNORE)]  # fmt: skip


def _source(data, span: tuple[int, int], tok) -> dict:
    """Where a span of the corpus lies, and its text as the corpus has it (before masking or shuffling)."""
    return {"span": [int(span[0]), int(span[1])], "document": data.corpus.document_of(span[0]),
            "text": tok.decode(int(i) for i in data.corpus.tokens[span[0] : span[1]])}  # fmt: skip


def structbert_row(data, g: int, tok) -> dict:
    s = data[g]
    span_a, span_b, label = data.sample_spans(g)
    ids = s["input_ids"].tolist()
    return {
        "input_ids": ids, "tokens": [tok.id_to_token(i) for i in ids], "token_type_ids": s["token_type_ids"].tolist(),
        "mlm": _targets(s["mlm_labels"], tok), "wso": _targets(s["wso_labels"], tok),
        "sso_label": label, "sso": SSO_NAMES[label],
        "a": _source(data, span_a, tok), "b": None if span_b is None else _source(data, span_b, tok),
    }  # fmt: skip


def palm_row(data, g: int, tok) -> dict:
    s, span = data[g], data.sample_spans(g)
    enc, dec_in, dec_lab = s["enc_input_ids"].tolist(), s["dec_input_ids"].tolist(), s["dec_labels"].tolist()
    return {
        "enc_input_ids": enc, "enc_tokens": [tok.id_to_token(i) for i in enc], "mlm": _targets(s["mlm_labels"], tok),
        "mlm_active": g < data.mlm_until,
        "dec_input_ids": dec_in, "dec_tokens": [tok.id_to_token(i) for i in dec_in],
        "dec_labels": [None if i == IGNORE else i for i in dec_lab],
        "dec_label_tokens": [None if i == IGNORE else tok.id_to_token(i) for i in dec_lab],
        "drawn_lengths": list(span["drawn"]), "realised_lengths": list(span["realised"]),
        "ends_document": span["ends_document"], "moved_to_longer_document": span["moved"],
        "context": _source(data, (span["start"], span["split"]), tok), "target": _source(data, (span["split"], span["end"]), tok),
    }  # fmt: skip


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    own = [a for a in argv if a.split("=", 1)[0] in OWN_KEYS]
    args, _ = parse(own, {"n": 16, "out": "???", "world_size": 1}, command="pretrain.samples", verbatim=("out",))
    n, world = int(args.n), int(args.world_size)
    if n < 1:
        raise UserError(f"n={n}: must be >= 1")
    cfg = compose_config([a for a in argv if a.split("=", 1)[0] not in OWN_KEYS])
    if cfg.data.dir is None:  # one corpus at a time (a blend's sources each have their own data.dir)
        raise UserError("data.dir is required (python -m pretrain.samples stage=... data.dir=<prepared dir> n=... out=...)")

    from pretrain.training.config import batch_geometry
    from pretrain.training.stages import build_stage

    stage = build_stage(cfg)
    geometry = batch_geometry(cfg.train, world)
    data, row = stage.train_dataset(geometry), (palm_row if stage.name == "palm" else structbert_row)
    order = step_order(stage, data, geometry.global_batch, n)
    tmp = f"{args.out}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # renamed when complete: never a half-written file
            for step, g in order:
                f.write(json.dumps({"index": g, "step": step, **row(data, g, stage.tokenizer)}, ensure_ascii=False) + "\n")
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"pretrain.samples: {len(order)} {stage.name} samples (steps 1-{order[-1][0]}, global batch "
          f"{geometry.global_batch}) -> {args.out}")
    print("\n".join(overview(stage.name, data, [g for _, g in order])))


def overview(stage_name: str, data, indices: list[int]) -> list[str]:
    """What to check in a new corpus at a glance: SSO label shares (stage one), drawn and realised lengths (two)."""
    if stage_name == "palm":
        from pretrain.summary import render_lengths

        r = data.length_report(indices)
        return render_lengths(r) + [
            f"  contexts ending on a sentence end: {r['context_ends_sentence']:.1%}; targets: {r['target_ends_sentence']:.1%}; "
            f"targets ending where their document ends ([SEP]): {r['target_ends_document']:.1%}",
            f"  samples moved to a document long enough for their lengths: {r['moved_to_longer_document']:.1%}"]
    labels = np.array([data.sample_spans(g)[2] for g in indices])
    shares = ", ".join(f"{SSO_NAMES[k] or 'none (one-sentence document)'} {np.mean(labels == k):.1%}" for k in SSO_NAMES)
    return [f"  SSO labels: {shares}"]


if __name__ == "__main__":
    with exit_on_user_error("pretrain.samples"):
        main(sys.argv[1:])

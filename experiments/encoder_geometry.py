"""How spread out a stage-one encoder's token representations are, per checkpoint and for random init: a check of
whether a checkpoint is a better place to start fine-tuning from than random weights.

    python experiments/encoder_geometry.py --run runs/demo/structbert --tasks data/demo/tasks/ner/test.jsonl \
        [--checkpoint step600 ...] [--sentences 256]

For each encoder: the mean cosine similarity between the final hidden states of two different real tokens (1.0:
every token looks the same to a classifier on top; random init gives a small value), and the participation ratio
of the token representations (sum(s^2)^2 / sum(s^4) of their singular values after centring: the number of
directions they effectively use, at most the hidden size). A model stuck on the unigram plateau of masked LM
(predicting frequent tokens whatever the input) collapses them, and fine-tuning must first undo that.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.tokenizer import Tokenizer  # noqa: E402
from pretrain import run_record  # noqa: E402


def token_states(model, tok: Tokenizer, sentences: list[str]) -> torch.Tensor:
    """The final hidden states of every real token but [CLS]/[SEP], [N, hidden]."""
    out = []
    with torch.no_grad():
        for s in sentences:
            ids = torch.tensor([[tok.cls_id, *tok.encode(s)[:62], tok.sep_id]])
            h = model.encoder(ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
            out.append(h[0, 1:-1])
    return torch.cat(out)


def geometry(h: torch.Tensor) -> dict[str, float]:
    unit = torch.nn.functional.normalize(h, dim=-1)
    n = len(unit)
    gram = unit @ unit.T
    cosine = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    s = torch.linalg.svdvals(h - h.mean(0))
    return {"mean_cosine": float(cosine), "participation_ratio": float((s**2).sum() ** 2 / (s**4).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a stage-one run directory")
    parser.add_argument("--tasks", required=True, help="a jsonl of NER examples (tokens) or sentences")
    parser.add_argument("--checkpoint", action="append", default=[], help="tags under run/checkpoints (default: all)")
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()
    tok = Tokenizer(os.path.join(args.run, "vocab.txt"))
    with open(args.tasks, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][: args.sentences]
    sentences = ["".join(r["tokens"]) if "tokens" in r else r.get("sentence", r.get("src")) for r in rows]
    record = run_record.stage_model_record(args.run, "encoder_geometry")
    stage, cfg = record.stage, record.cfg
    if record.stage_class.generates:
        sys.exit(f"encoder_geometry: error: {args.run} is a {stage} run; a stage-one run is needed")
    from pretrain.models.structbert import StructBert

    torch.manual_seed(1234)  # the fine-tuning default seed: the random init a baseline run starts from
    encoders = {"random init": StructBert(cfg).eval()}
    tags = args.checkpoint or sorted((d for d in os.listdir(os.path.join(args.run, "checkpoints")) if d.startswith("step")),
                                     key=lambda d: int(d[4:]))  # fmt: skip
    for tag in tags:
        encoders[tag] = run_record.load_stage_model(record, os.path.join(args.run, "checkpoints", tag))
    print(f"{len(sentences)} sentences of {args.tasks}; final hidden states of their tokens")
    print("encoder".ljust(14) + "mean cosine".rjust(13) + "participation ratio".rjust(21) + f" (of {cfg.hidden})")
    for name, model in encoders.items():
        g = geometry(token_states(model, tok, sentences))
        print(name.ljust(14) + f"{g['mean_cosine']:.3f}".rjust(13) + f"{g['participation_ratio']:.1f}".rjust(21))


if __name__ == "__main__":
    main()

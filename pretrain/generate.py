"""Continue Chinese text with a stage-two model, in one process, straight from its ZeRO-3 checkpoint:

    python -m pretrain.generate run.dir=<stage-two run.dir> prompt="<text>" max_new_tokens=64 strategy=greedy
    python -m pretrain.generate run.dir=<dir> prompts_file=<one prompt a line> strategy=beam num_beams=4
    (also: top_k, top_p, temperature, length_penalty, min_new_tokens, no_repeat_ngram_size, seed, echo=true,
     device=auto|cpu|cuda (auto: the GPU when there is one), precision=fp32|bf16|fp16 (fp16: GPU only))

Sampling draws from a generator on the model's device: the same seed gives the same tokens on the same kind of
device, not across CPU and GPU (their generators differ), nor across precisions.

The checkpoint (the newest, or `checkpoint=<dir>`) is consolidated from however many ranks wrote it; the
model is built on the meta device and takes the consolidated tensors as they are, so no second copy is made.
"""
from __future__ import annotations

import os
import sys

import torch

from pretrain.cli import parse
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError, exit_on_user_error
from pretrain.training import checkpoint, run_dir as run_files, safe_load

DEFAULTS = {
    "run": {"dir": None}, "checkpoint": None, "prompt": None, "prompts_file": None, "max_new_tokens": 64,
    "strategy": "greedy", "top_k": 0, "top_p": 1.0, "temperature": 1.0, "num_beams": 4, "length_penalty": 1.0,
    "seed": 0, "echo": False, "min_new_tokens": 0, "no_repeat_ngram_size": 0, "device": "auto", "precision": "fp32",
    "trust_checkpoint": False,
}  # fmt: skip
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def placement(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype that `device=` and `precision=` ask for, checked against this machine."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={device}: must be auto, cpu or cuda")
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision}: must be {', '.join(PRECISIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA GPU here (device=auto or cpu)")
    where = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if precision == "fp16" and where.type == "cpu":
        raise UserError("precision=fp16 needs a GPU (on CPU: fp32 or bf16)")
    return where, PRECISIONS[precision]


def parse_args(argv: list[str]):
    cfg, _ = parse(argv, DEFAULTS, command="pretrain.generate", doc=__doc__,
                   verbatim=("run.dir", "checkpoint", "prompt", "prompts_file"))  # fmt: skip
    if cfg.run.dir is None:
        raise UserError("run.dir is required (a stage-two run directory)")
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise UserError("give exactly one of prompt=<text> or prompts_file=<file>")
    placement(str(cfg.device), str(cfg.precision))
    safe_load.trust(safe_load.trust_setting(cfg.trust_checkpoint))
    return cfg


def load_model(run_dir: str, checkpoint_dir: str | None):
    """The model of `run_dir` with the weights of its newest (or the given) checkpoint, and its tokenizer."""
    from pretrain.stages import STAGES

    record = run_files.stage_model_record(run_dir, "pretrain.generate")
    if not record.stage_class.generates:
        want = next(cls for cls in STAGES.values() if cls.generates)
        raise UserError(f"run.dir={run_dir}: a {record.stage_class.ordinal} run; generation needs a {want.ordinal}"
                        f" (stage={want.name}) run")  # fmt: skip
    tag_dir = checkpoint.find(checkpoint_dir, "checkpoint") if checkpoint_dir else checkpoint.find(run_dir, "run.dir")
    return run_files.load_stage_model(record, tag_dir), Tokenizer(os.path.join(run_dir, "vocab.txt")), tag_dir


def encoder_input(tok: Tokenizer, prompt: str, max_positions: int, where: str) -> torch.Tensor:
    """[CLS] prompt [SEP], the prompt cut from the left (its end is what the continuation follows)."""
    ids = tok.encode(prompt)
    room = max_positions - 2
    if len(ids) > room:
        print(f"pretrain.generate: warning: {where}: {len(ids)} tokens, truncated from the left to the last {room}"
              f" (model.max_positions={max_positions})", file=sys.stderr)  # fmt: skip
        ids = ids[-room:]
    return torch.tensor([[tok.cls_id, *ids, tok.sep_id]], dtype=torch.long)


def main(argv: list[str]) -> None:
    from pretrain.models.decoding import check_args, generate

    cfg = parse_args(argv)
    try:
        check_args(str(cfg.strategy), int(cfg.top_k), float(cfg.top_p), float(cfg.temperature), int(cfg.num_beams),
                   int(cfg.min_new_tokens), int(cfg.no_repeat_ngram_size))  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.prompts_file is not None:
        if not os.path.isfile(cfg.prompts_file):
            raise UserError(f"prompts_file={cfg.prompts_file}: no such file")
        with open(cfg.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UserError(f"prompts_file={cfg.prompts_file}: no prompts (one a line)")
    else:
        prompts = [str(cfg.prompt)]
    device, dtype = placement(str(cfg.device), str(cfg.precision))
    model, tok, _ = load_model(cfg.run.dir, cfg.checkpoint)
    model = model.to(device=device, dtype=dtype)  # consolidated on the host in fp32, then moved once
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    for i, prompt in enumerate(prompts, 1):
        where = f"prompt {i}" if cfg.prompts_file is not None else "prompt"
        try:
            new = generate(
                model, encoder_input(tok, prompt, model.cfg.max_positions, where).to(device), bos_id=tok.cls_id,
                eos_id=tok.sep_id,
                max_new_tokens=int(cfg.max_new_tokens), strategy=str(cfg.strategy), top_k=int(cfg.top_k),
                top_p=float(cfg.top_p), temperature=float(cfg.temperature), num_beams=int(cfg.num_beams),
                length_penalty=float(cfg.length_penalty), generator=generator, min_new_tokens=int(cfg.min_new_tokens),
                no_repeat_ngram_size=int(cfg.no_repeat_ngram_size),
            )  # fmt: skip
        except ValueError as e:
            raise UserError(str(e)) from None
        text = tok.decode(new)
        print(f"prompt: {prompt}\noutput: {text}\n" if cfg.echo else text, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # one CPU process by design: DeepSpeed need not probe and warn
    with exit_on_user_error("pretrain.generate"):
        main(sys.argv[1:])

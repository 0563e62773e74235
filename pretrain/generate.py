"""Continue Chinese text with a stage-two model, on one process or many, straight from its ZeRO-3 checkpoint:

    python -m pretrain.generate run.dir=<stage-two run.dir> prompt="<text>" max_new_tokens=64 strategy=greedy
    deepspeed --num_gpus 8 --module pretrain.generate run.dir=<dir> prompts_file=<one prompt a line> precision=bf16
    (also: num_beams, top_k, top_p, temperature, length_penalty, min_new_tokens, no_repeat_ngram_size, seed,
     echo=true, batch_size=8, checkpoint=<dir>, device=auto|cpu|cuda (auto: the GPU when there is one),
     precision=fp32|bf16|fp16 (fp16: GPU only), timeout_s=1800, max_live_parameters=1000000000)

The model is never assembled in one place: it is built under ZeRO-3 (`zero.Init`) and each rank reads its own
partition of each parameter from the checkpoint's partition files, whatever number of ranks wrote them (as
init_from does), so N ranks hold 1/N of it each and gather the parameters of a module as they run it. ZeRO-3 keeps
up to max_live_parameters of them gathered (DeepSpeed's default, 1e9, also its reuse distance): a model smaller
than that ends up gathered whole on every rank after the first step, which saves the gathers of later steps; a
lower bound trades them for memory.

The prompts are cut into batches of batch_size consecutive ones (padded), dealt to the ranks in turn. Every rank
runs every step together, a rank whose batch is done (or that has no batch left) joining the others' gathers until
all are done (transformers' synced_gpus). Sampling draws prompt i from a generator seeded with (seed, i), and the
batches are the same whatever the number of ranks, so 1 and N ranks give the same tokens for the same batch_size
(tested on CPU in fp32; another batch_size pads otherwise, which can move the last bits of a score). The
outputs are printed by rank 0 in the prompts' order; each rank's peak memory goes to stderr. Generators differ
across CPU and GPU, and results across precisions.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import numpy as np
import torch

from pretrain import run_record
from pretrain.cli import parse
from pretrain.data.sampling import pad_side
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError, exit_on_user_error
from pretrain.models.decoding import decoding_settings, generate_batch, row_generator
from pretrain.models.layers import skip_init
from pretrain.stages import STAGES
from pretrain.training import checkpoint, distributed, init_from, safe_load
from pretrain.training.engine import build_model, local_partition_numel
from pretrain.training.metrics import peak_memory_gb

DEFAULTS = {
    "run": {"dir": None}, "checkpoint": None, "prompt": None, "prompts_file": None, "max_new_tokens": 64,
    "strategy": "greedy", "top_k": 0, "top_p": 1.0, "temperature": 1.0, "num_beams": 4, "length_penalty": 1.0,
    "seed": 0, "echo": False, "min_new_tokens": 0, "no_repeat_ngram_size": 0, "device": "auto", "precision": "fp32",
    "trust_checkpoint": False, "batch_size": 8, "timeout_s": 1800, "max_live_parameters": 10**9,
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
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731  (YAML reads true as a bool)
    for key in ("batch_size", "timeout_s", "max_live_parameters", "max_new_tokens", "num_beams"):
        if not is_int(cfg[key]) or cfg[key] < 1:
            raise UserError(f"{key}={cfg[key]}: must be an integer >= 1")
    for key in ("top_k", "min_new_tokens", "no_repeat_ngram_size", "seed"):
        if not is_int(cfg[key]):
            raise UserError(f"{key}={cfg[key]}: must be an integer")
    for key in ("top_p", "temperature", "length_penalty"):
        if not (is_int(cfg[key]) or isinstance(cfg[key], float)):
            raise UserError(f"{key}={cfg[key]}: must be a number")
    placement(str(cfg.device), str(cfg.precision))
    safe_load.trust(safe_load.trust_setting(cfg.trust_checkpoint))
    return cfg


def read_prompts(cfg) -> list[str]:
    if cfg.prompts_file is None:
        return [str(cfg.prompt)]
    if not os.path.isfile(cfg.prompts_file):
        raise UserError(f"prompts_file={cfg.prompts_file}: no such file")
    with open(cfg.prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"prompts_file={cfg.prompts_file}: no prompts (one a line)")
    return prompts


def model_source(run_dir: str, checkpoint_dir: str | None):
    """The record (stage and shapes) of `run_dir` and its newest (or the given) checkpoint, checked before any
    rank starts: a stage whose model generates, and a checkpoint of that model's shapes."""
    record = run_record.stage_model_record(run_dir, "pretrain.generate")
    if not record.stage_class.generates:
        want = next(cls for cls in STAGES.values() if cls.generates)
        raise UserError(f"run.dir={run_dir}: a {record.stage_class.ordinal} run; generation needs a {want.ordinal}"
                        f" (stage={want.name}) run")  # fmt: skip
    tag_dir = checkpoint.find(checkpoint_dir or run_dir, "checkpoint" if checkpoint_dir else "run.dir", option="checkpoint={dir}")
    have = checkpoint.recorded_shapes(tag_dir, "checkpoint")
    with torch.device("meta"):
        want = {n: tuple(p.shape) for n, p in record.stage_class.model_class()(record.cfg).named_parameters()}
    for name, shape in want.items():
        if have.get(name) != shape:
            raise UserError(f"checkpoint={tag_dir}: {name} is {have.get(name)} there, {list(shape)} in run.dir={run_dir}'s"
                            " model.json (a checkpoint of another run?)")  # fmt: skip
    return record, tag_dir


def load_model(run_dir: str, checkpoint_dir: str | None):
    """The model of `run_dir` consolidated into this one process (eval mode), with its newest (or the given)
    checkpoint's weights, its tokenizer and the checkpoint: for tools that compare it with another implementation
    (the export's tests, experiments/hf_continue.py), at a size one process holds."""
    record, tag_dir = model_source(run_dir, checkpoint_dir)
    return run_record.load_stage_model(record, tag_dir), Tokenizer(os.path.join(run_dir, "vocab.txt")), tag_dir


def encoder_input(tok: Tokenizer, prompt: str, max_positions: int, where: str, warn: bool = True) -> list[int]:
    """[CLS] prompt [SEP], the prompt cut from the left (its end is what the continuation follows)."""
    ids = tok.encode(prompt)
    room = max_positions - 2
    if len(ids) > room:
        if warn:
            print(f"pretrain.generate: warning: {where}: {len(ids)} tokens, truncated from the left to the last {room}"
                  f" (model.max_positions={max_positions})", file=sys.stderr)  # fmt: skip
        ids = ids[-room:]
    return [tok.cls_id, *ids, tok.sep_id]


class _Calls(torch.nn.Module):
    """The model's decoding calls as this module's forward: ZeRO-3 gathers a partitioned parameter only while a
    module's forward runs, and the tied output projection reads the word embedding outside the embedding module."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args):
        return getattr(self.model, method)(*args)


class PartitionedModel:
    """What decoding calls (models/decoding.py: encode, next_token_logprobs, new_cache), run through the ZeRO-3
    engine that holds this rank's partition of the model."""

    def __init__(self, engine, model: torch.nn.Module):
        self.engine, self.cfg, self.module = engine, model.cfg, model

    @property
    def training(self) -> bool:
        return self.engine.training

    def eval(self):
        self.engine.eval()

    def train(self, mode: bool = True):
        self.engine.train(mode)

    def encode(self, *args):
        return self.engine("encode", *args)

    def next_token_logprobs(self, *args):
        return self.engine("next_token_logprobs", *args)

    def new_cache(self):
        return self.module.new_cache()


def load_partitioned(record, tag_dir: str, dtype: torch.dtype, info: distributed.DistInfo,
                     max_live: int) -> PartitionedModel:  # fmt: skip
    """The model built under zero.Init, each rank reading its own partition of each parameter from tag_dir."""
    import deepspeed  # deepspeed: only after main() has sent stdout aside (its logger keeps the stream it finds)

    zero = {"stage": 3, "stage3_max_live_parameters": max_live, "stage3_max_reuse_distance": max_live}
    ds_config = {"train_batch_size": info.world_size, "zero_optimization": zero,
                 "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}  # fmt: skip
    with skip_init():  # every parameter is read from the checkpoint: no random init to gather and overwrite
        model = build_model(lambda: record.stage_class.model_class()(record.cfg), ds_config, seed=0)
    names = [n for n, _ in model.named_parameters()]
    init_from.load_into(model, init_from.InitSource(tag_dir, {n: n for n in names}, ()), rank=info.rank)
    engine, _, _, _ = deepspeed.initialize(model=_Calls(model), config=ds_config)
    return PartitionedModel(engine, model)


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    # DeepSpeed reports on stdout (its logger, which keeps the stream it finds when first imported, and the ops it
    # builds): imported here, before anything else imports it, and run below with stdout sent to stderr, it leaves
    # stdout to the outputs.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        decoding = decoding_settings(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    prompts = read_prompts(cfg)
    device, dtype = placement(str(cfg.device), str(cfg.precision))
    record, tag_dir = model_source(cfg.run.dir, cfg.checkpoint)
    if not 1 <= int(cfg.max_new_tokens) <= record.cfg.max_positions:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens}: must be in [1, max_positions={record.cfg.max_positions}]")
    info = distributed.read_env()
    tok = Tokenizer(os.path.join(cfg.run.dir, "vocab.txt"))
    where = lambda i: f"prompt {i + 1}" if cfg.prompts_file is not None else "prompt"  # noqa: E731
    sources = [encoder_input(tok, p, record.cfg.max_positions, where(i), warn=info.rank == 0) for i, p in enumerate(prompts)]
    size = int(cfg.batch_size)
    batches = [list(range(b, min(b + size, len(prompts)))) for b in range(0, len(prompts), size)]
    mine = batches[info.rank :: info.world_size]
    rounds = -(-len(batches) // info.world_size)  # every rank runs as many batches: a rank short of one runs a dummy

    with contextlib.redirect_stdout(sys.stderr):
        distributed.init(info, float(cfg.timeout_s))
        model = load_partitioned(record, tag_dir, dtype, info, int(cfg.max_live_parameters))
    if model.engine.device.type != device.type:  # DS_ACCELERATOR set beforehand to another device
        raise UserError(f"device={cfg.device}: DeepSpeed's accelerator is {model.engine.device.type}"
                        f" (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}); unset it or ask for that device")  # fmt: skip
    device = model.engine.device
    all_done = lambda done: distributed.all_reduce_sum([0.0 if done else 1.0])[0] == 0  # noqa: E731
    outputs = []
    for r in range(rounds):
        indices = mine[r] if r < len(mine) else [0]  # the dummy: prompt 0 again, its output dropped
        batch, mask = pad_side([{"ids": np.array(sources[i])} for i in indices], {"ids": tok.pad_id},
                               record.cfg.max_positions)  # fmt: skip
        generators = [row_generator(int(cfg.seed), i, device) for i in indices]
        try:
            new = generate_batch(model, batch["ids"].to(device), mask.to(device), bos_id=tok.cls_id, eos_id=tok.sep_id,
                                 generators=generators, all_done=all_done, vocab_tokens=tok.vocab_size, **decoding)  # fmt: skip
        except ValueError as e:
            raise UserError(str(e)) from None
        if r < len(mine):
            outputs += [(i, tok.decode(tokens)) for i, tokens in zip(indices, new)]
    gathered = distributed.gather_objects(outputs)
    peaks = distributed.gather_objects(round(peak_memory_gb(device.type), 3))
    held = distributed.gather_objects(round(local_partition_numel(model.module) * dtype.itemsize / 2**30, 3))
    if info.rank == 0:
        for i, text in sorted(pair for part in gathered for pair in part):
            print(f"prompt: {prompts[i]}\noutput: {text}\n" if cfg.echo else text, flush=True)
        print(f"pretrain.generate: {len(prompts)} prompts on {info.world_size} rank(s), {device.type} "
              f"{cfg.precision}; weights held per rank (GiB): {held}; peak memory per rank (GiB): {peaks}",
              file=sys.stderr)  # fmt: skip
    distributed.barrier()


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    if "DS_ACCELERATOR" not in os.environ:  # device=cpu on a GPU machine: DeepSpeed's CPU accelerator and gloo
        device_arg = ([a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("device=")] or ["auto"])[-1]  # the last wins
        if device_arg == "cpu" or (device_arg == "auto" and not torch.cuda.is_available()):
            os.environ["DS_ACCELERATOR"] = "cpu"
    info = distributed.read_env()
    with exit_on_user_error("pretrain.generate", rank=info.rank):
        main(sys.argv[1:])

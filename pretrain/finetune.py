"""Fine-tuning and evaluation entry point, the same under `deepspeed`, `torchrun`, `srun` and plain `python`:

    deepspeed --num_gpus 2 --module pretrain.finetune task=ner data.dir=<task dir> init_from=<run.dir> run.dir=R

The recipe: read, encode and check the task and the config (`setup`, which writes nothing), join the ranks, build
the ZeRO-3-partitioned task model with the pre-trained weights (or random ones: init_from=null), resume the newest
checkpoint, train; at each eval step score valid and save a checkpoint; at the end score the test split once with
the checkpoint the valid metric picked: run.dir/results.json, predictions.jsonl and a "test" row in metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pretrain import init_sources
from pretrain.data.tokenizer import Tokenizer, read_vocab
from pretrain.errors import UserError, exit_on_user_error
from pretrain.overrides import check_command_line
from pretrain.run_record import ModelRecord
from pretrain.tasks import metrics
from pretrain.tasks.task import build_task
from pretrain.training import distributed, init_from, loop, memory, peers, run_lock, safe_load, watchdog
from pretrain.training.checkpoint import Checkpoints
from pretrain.training.config import BatchGeometry, RunSettings, batch_geometry, deepspeed_config, run_settings
from pretrain.training.engine import to_device
from pretrain.training.metrics import MetricsLog, Window, metrics_row
from pretrain.training.run_dir import load_weights, write_atomic, write_run_files

warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)


@dataclass
class Setup:
    settings: RunSettings
    geometry: BatchGeometry
    task: object  # pretrain.tasks.task: ClassificationTask | TaggingTask | GenerationTask
    vocab_path: str
    init: init_from.InitSource | None
    ds_config: dict
    checkpoints: Checkpoints
    resume_from: str | None  # the checkpoint the run resumes; None: it starts afresh


def setup(cfg: DictConfig, world_size: int, rank: int = 0) -> Setup:
    """Read every setting and every task file, and check them, and the checkpoint the run resumes, before any
    rank writes a byte."""
    epochs = cfg.train.epochs is not None  # then the steps follow from the train split: checked once it is read
    settings = None if epochs else run_settings(cfg)
    source = None if cfg.init_from is None else str(cfg.init_from)
    vocab_path = None if cfg.vocab is None else str(cfg.vocab)
    if vocab_path is None:
        if source is None:
            raise UserError("init_from=null (random init) needs vocab=<vocab.txt> (the pre-trained run's, for the same shapes)")
        vocab_path = init_sources.run_vocab(source)
        if vocab_path is None:
            raise UserError(f"init_from={source}: no vocab.txt beside it (an export holds tokenizer.json only); give "
                            "vocab=<the vocab.txt it was trained with>: it is checked against the checkpoint's")  # fmt: skip
    if not os.path.isfile(vocab_path):
        raise UserError(f"vocab={vocab_path}: no such file")
    tok = Tokenizer(vocab_path)
    task = build_task(cfg, tok)
    if epochs:
        settings = run_settings(steps_from_epochs(cfg, len(task.splits["train"]), world_size))
    safe_load.trust(settings.trust_checkpoint)  # before init_from's checkpoint is read
    init = None
    if source is not None:
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in task.make_model().named_parameters()}
        init = init_sources.finetune_source(source, shapes, task.model_cfg, vocab_path, task.needs_stage_two, task.fresh)
        theirs = init_sources.run_vocab(source)  # the ids must mean what the model learnt (hf: checked above)
        if theirs is not None and read_vocab(theirs) != read_vocab(vocab_path):
            raise UserError(f"vocab={vocab_path} differs from {theirs}, the vocab init_from={source} was trained with")
    run_lock.check_free(settings.run_dir, settings.lock_lease_s)  # its checkpoints may be changing under us
    checkpoints = Checkpoints(settings.run_dir, rank, world_size, settings.keep_last)
    resume_from = checkpoints.resolve(settings.resume, TaskJob.kind_of(task))
    geometry = batch_geometry(cfg.train, world_size, resume_from, checkpoints.global_batch)
    return Setup(settings, geometry, task, vocab_path, init, deepspeed_config(cfg, geometry), checkpoints, resume_from)


def steps_from_epochs(cfg: DictConfig, examples: int, world_size: int) -> DictConfig:
    """cfg with train.max_steps = ceil(train.epochs x examples / the global batch)."""
    epochs = cfg.train.epochs
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0:
        raise UserError(f"train.epochs={epochs}: must be a number > 0 (or null: train.max_steps)")
    exact = Fraction(str(epochs)) * examples / batch_geometry(cfg.train, world_size).global_batch  # no float error
    cfg.train.max_steps = max(1, math.ceil(exact))
    return cfg


class TaskJob:
    """A fine-tuning task as the loop drives it (training/loop.py): no FLOPs columns, and every evaluation also
    saves a checkpoint, from which the test split is scored with the best."""

    counts_flops, saves_at_eval = False, True

    def __init__(self, task, geometry: BatchGeometry, info: distributed.DistInfo):
        self.task, self.geometry, self.info = task, geometry, info
        self.kind, self.objectives, self.weights = self.kind_of(task), task.objectives, task.weights
        self.token_counts = task.token_counts

    @staticmethod
    def kind_of(task) -> str:
        """What the checkpoints of the task's runs record as their stage."""
        return f"finetune:{task.kind}"

    def forward(self, engine, batch):
        loss, stats, _ = self.task.forward(engine, batch, predict=False)
        return loss, stats

    def train_flops(self, host_batch: dict) -> float:
        return 0.0

    def phase_columns(self, step: int) -> dict:
        return {}

    def evaluate(self, engine, step: int) -> list[dict]:
        return [evaluate(engine, self.task, self.geometry, self.info, step)]


def finetune(cfg: DictConfig, info: distributed.DistInfo) -> None:
    # 1. Check everything before any rank writes a byte.
    began = time.perf_counter()
    run = setup(cfg, info.world_size, info.rank)
    s, geometry, task = run.settings, run.geometry, run.task
    checkpoints, resume_from = run.checkpoints, run.resume_from
    loop.check_precision(s)
    job = TaskJob(task, geometry, info)
    generation = task.generates  # a decoder and its vocabulary projection; the others project no vocab
    shape = memory.run_shape(task.model_cfg, generation, int(generation), task.seq_len, geometry.micro, run.ds_config,
                             s.precision, info.world_size)  # fmt: skip
    memory.check(s.memory_check, shape, task.make_model, info.local_rank, info.world_size, task.stage, s.hardware)

    # 2. Join the ranks, build the partitioned model with the pre-trained weights, restore the newest checkpoint.
    started = loop.start(s, info, checkpoints, resume_from, task.make_model, run.ds_config, run.init, "pretrain.finetune",
                         before_model=task.warn_truncated if info.rank == 0 else lambda: None)  # fmt: skip
    step = started.step
    task_info = {"name": task.name, "type": task.kind, "examples": {k: len(v) for k, v in task.splits.items()},
                 "truncated": task.truncation_report(), "skipped": task.skipped, "labels": task.labels}  # fmt: skip
    write_run_files(s.run_dir, cfg, info, started.model, geometry, step, run.init, run.ds_config,
                    ModelRecord(task.stage, task.kind, task.model_cfg), run.vocab_path, task=task_info)  # fmt: skip
    log = MetricsLog(s.run_dir, info.rank, s.wandb, OmegaConf.to_container(cfg, resolve=True), step, ("test",))
    protect_best = lambda: _protect_best(checkpoints, s.run_dir, task, info.rank)  # noqa: E731
    protect_best()

    # 3. Train; score valid and save at each eval step.
    make_loader = lambda data_step, end: task.train_loader(geometry, info.rank, data_step, end)  # noqa: E731
    step = loop.train(job, started, make_loader, s, geometry, info.rank, log, checkpoints, "pretrain.finetune",
                      f"finetune {task.name}", after_eval=protect_best)  # fmt: skip
    watchdog.disarm()  # no more steps to time
    train_s = time.perf_counter() - began

    # 4. The test split, once, with the checkpoint the valid metric picked.
    if step == s.max_steps:
        test(task, s.run_dir, geometry, info, log, train_s, run, started.engine.device)
    log.close()
    distributed.barrier()


@watchdog.long_phase("an evaluation")
@torch.no_grad()
def evaluate(engine, task, geometry: BatchGeometry, info, step: int) -> dict:
    """The valid row: the loss (every task) and, for the understanding tasks, the metric of the predictions."""
    engine.eval()
    window, predictions = Window(task.objectives), []
    predict = not task.generates  # generation is picked on its loss; decoding waits for the test
    for host in task.eval_loader("valid", geometry.micro, geometry.world, info.rank):
        _, stats, pred = task.forward(engine, to_device(host, engine.device), predict=predict)
        window.add(stats, *task.token_counts(host))
        if pred is not None:
            predictions += task.decode("valid", host, pred.cpu())
    engine.train()
    row = metrics_row(step, "valid", window.reduce(), task.weights, {})
    if predict:
        row.update(task.score("valid", _merged(distributed.gather_objects(predictions))))
    return row


def _merged(parts: list[list[tuple[int, object]]]) -> list:
    """The ranks' (index, prediction) lists as one list in example order."""
    return [p for _, p in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]


def best_valid(run_dir: str, select: tuple[str, bool]) -> dict | None:
    """The valid row of metrics.jsonl with the best `select` column (the earliest of equals); None before the
    first. A function of the rows, which a resumed run truncates to its step: so it resumes exactly too."""
    column, higher = select
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "valid" and r.get(column) is not None]
    return max(rows, key=lambda r: (r[column] if higher else -r[column], -r["step"])) if rows else None


def _protect_best(checkpoints: Checkpoints, run_dir: str, task, rank: int) -> None:
    """Rank 0 prunes: it keeps the best checkpoint so far besides the last ones."""
    best = best_valid(run_dir, task.select) if rank == 0 else None
    checkpoints.protected = set() if best is None else {f"step{best['step']}"}


def test(task, run_dir: str, geometry: BatchGeometry, info, log: MetricsLog, train_s: float, run: Setup,
         device) -> None:  # fmt: skip
    started = time.perf_counter()
    best = distributed.broadcast_object(best_valid(run_dir, task.select) if info.rank == 0 else None)
    if best is None:
        raise UserError(f"run.dir={run_dir}: metrics.jsonl has no valid row to pick a checkpoint with")
    tag_dir = os.path.join(run_dir, "checkpoints", f"step{best['step']}")
    with torch.device("meta"):
        model = task.make_model()
    model = load_weights(model, tag_dir).to(device)  # each rank: a plain copy of the picked checkpoint
    predictions = _merged(distributed.gather_objects(task.predict(model, "test", geometry.micro, geometry.world, info.rank)))
    if info.rank != 0:
        return
    scores = task.score("test", predictions) if task.test_labelled else {}  # a hidden test set: predicted only
    test_s = time.perf_counter() - started
    write_atomic(os.path.join(run_dir, "predictions.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task.records("test", predictions)))  # fmt: skip
    outputs = task.write_outputs(run_dir, predictions)
    results = {
        "task": task.name, "type": task.kind, "initialized_from": None if run.init is None else run.init.tag_dir,
        "selected_by": f"valid {task.select[0]} ({'higher' if task.select[1] else 'lower'} is better)",
        "best_step": best["step"], "valid": {k: best.get(k) for k in _metric_keys(task, best)},
        "test": scores, "test_examples": len(predictions), "truncated": task.truncation_report(),
        "seconds": {"train_this_launch": round(train_s, 1), "test": round(test_s, 1)},
        **outputs, "data_files": task.files_read, "skipped": task.skipped,
    }  # fmt: skip
    if task.generates:
        results.update(decoding=task.decoding, bleu_signature=metrics.bleu_signature(),
                       references="the targets as the tokenizer normalises them (lower case, no [UNK])")
    write_atomic(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if scores:
        log.write({"step": best["step"], "split": "test", **scores})
    shown = scores or {f"valid {k}": best[k] for k in ("accuracy", "macro_f1") if best.get(k) is not None}
    print(f"pretrain.finetune: {task.name} test ({len(predictions)} examples, checkpoint step {best['step']}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in shown.items())
          + "".join(f"; {what}: {path}" for what, path in outputs.items()), file=sys.stderr)  # fmt: skip


def _metric_keys(task, row: dict) -> list[str]:
    return [k for k in (task.select[0], *(f"{o.name}_loss" for o in task.objectives), "accuracy", "macro_f1", "precision",
                        "recall", "f1", "lm_ppl") if k in row]  # fmt: skip


@hydra.main(config_path="../conf", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    info = distributed.read_env()
    with (exit_on_user_error("pretrain.finetune", rank=info.rank),
          peers.lost_peers_as_one_line("pretrain.finetune", info.rank)):  # fmt: skip
        finetune(cfg, info)


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    with exit_on_user_error("pretrain.finetune", rank=distributed.read_env().rank):  # before Hydra composes
        check_command_line(sys.argv[1:], "finetune", "pretrain.finetune")
    main()

"""The checkpoint format, in one place: how a run saves, finds, resumes and hands on its weights.

A checkpoint is a DeepSpeed tag directory `run.dir/checkpoints/step<N>/` (partitioned model and optimizer
states, LR scheduler, and our client state: step, stage, global batch) plus one `rng_rank<R>.pt` per rank.
`checkpoints/latest` names the newest complete one. It is written here, not by DeepSpeed: DeepSpeed's rank 0
writes it as soon as its own part is on disk, before the other ranks are done, so a rank dying mid-save could
leave `latest` naming a checkpoint that lacks its part. Here it is replaced atomically only after every rank has
returned from the save, so it always names a complete one.

Resuming on another number of ranks (`train.elastic=true`) goes through DeepSpeed's universal checkpoint
(elastic.py): rank 0 converts `step<N>/` once into `step<N>.universal/` beside it, which any number of ranks can
re-split on load.

Readers: the trainer (resume), init_from (stage two from stage one), generate and export, through
`find`, `saved_state`, `recorded_shapes`, `consolidate` and `load_run_model`, which work whatever number of
ranks wrote it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from pretrain.errors import UserError
from pretrain.training import distributed, safe_load
from pretrain.training.elastic import UNIVERSAL, complete_universal_load, convert_universal, elastic_seed

_STEP_DIR = re.compile(r"^step(\d+)$")
_MODEL_STATES = "*mp_rank_00_model_states.pt"  # DeepSpeed's rank-0 file: client state and parameter shapes


def read_latest(checkpoints_dir: str) -> str | None:
    """The tag `checkpoints/latest` names, or None when there is none yet."""
    path = os.path.join(checkpoints_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def find(path: str, key: str) -> str:
    """The checkpoint directory that the setting `key`=`path` names: a run directory (its newest checkpoint)
    or a checkpoint directory."""
    if not os.path.isdir(path):
        raise UserError(f"{key}={path}: no such directory")
    tag = read_latest(os.path.join(path, "checkpoints"))
    if tag is not None:
        path = os.path.join(path, "checkpoints", tag)
    if not glob.glob(os.path.join(path, _MODEL_STATES)):
        raise UserError(f"{key}={path}: neither a run directory with checkpoints/latest nor a DeepSpeed checkpoint")
    return path


def saved_state(tag_dir: str) -> dict:
    """DeepSpeed's rank-0 model-states file of a checkpoint (small under ZeRO-3: the weights are in the
    partition files): our client state at top level, and `param_shapes`."""
    files = sorted(glob.glob(os.path.join(tag_dir, _MODEL_STATES)))
    if not files:
        raise UserError(f"{tag_dir}: no {_MODEL_STATES} (not a DeepSpeed checkpoint)")
    return safe_load.load(files[0], map_location="cpu")


def recorded_shapes(tag_dir: str, key: str) -> dict[str, tuple[int, ...]]:
    """Every parameter's full (unpartitioned) shape, as DeepSpeed records it beside rank 0's partition (the
    frozen ones apart)."""
    state = saved_state(tag_dir)
    shapes = {name: tuple(shape) for name, shape in (state.get("frozen_param_shapes") or {}).items()}
    for group in state.get("param_shapes") or []:
        shapes.update({name: tuple(shape) for name, shape in group.items()})
    if not shapes:
        raise UserError(f"{key}={tag_dir}: the checkpoint records no parameter shapes (not a ZeRO-3 checkpoint?)")
    return shapes


def consolidate(tag_dir: str, lazy: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO checkpoint, whatever number of ranks wrote it (DeepSpeed's own tool).
    lazy=True: the values assemble their tensor from the ranks' partitions on .contiguous(), one at a time
    (DeepSpeed's lazy mode), instead of all at once beside the partitions: half the peak memory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    safe_load.check_dir(tag_dir)  # DeepSpeed's tool unpickles with weights_only=False: it sees vetted files only
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its per-shard progress report
        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir),
                                                        lazy_mode=lazy)  # fmt: skip


class PartitionReader:
    """Any slice of any parameter of a ZeRO-3 checkpoint, read from the ranks' fp32 partitions where they lie,
    whatever number of ranks wrote it: nothing is assembled, neither the model nor one whole parameter. The
    partition files are memory-mapped, so only the pages sliced are read. A rank of a run on M ranks that reads
    its own 1/M of each parameter holds about its share of the model and no more (init_from.load_into)."""

    def __init__(self, tag_dir: str):
        def files(kind: str) -> list[str]:
            found = glob.glob(os.path.join(tag_dir, f"zero_pp_rank_*_mp_rank_00_{kind}_states.pt"))
            return sorted(found, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))

        optim, model = files("optim"), files("model")
        if not optim or len(optim) != len(model):
            raise UserError(f"{tag_dir}: {len(optim)} optimizer and {len(model)} model-states partition files"
                            " (not a complete ZeRO-3 checkpoint)")  # fmt: skip
        self.world = len(optim)
        load = lambda f: safe_load.load(f, map_location="cpu", mmap=True)  # noqa: E731
        # Only the fp32 partitions are kept; Adam's moments beside them in the same files are never touched.
        flats = [load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim]
        states = [load(f) for f in model]
        self._where: dict[str, tuple[list[torch.Tensor], int, int]] = {}  # name -> (per-rank flat, offset, numel)
        for g, group in enumerate(states[0]["param_shapes"]):
            offset = 0  # each rank's flat group holds its partition of every parameter of the group, in order
            for name, shape in group.items():
                self._where[name] = ([flat[g] for flat in flats], offset, torch.Size(shape).numel())
                offset += -(-torch.Size(shape).numel() // self.world)
            if offset != flats[0][g].numel():
                raise UserError(f"{tag_dir}: partition group {g} holds {flats[0][g].numel()} elements, its"
                                f" parameters {offset} (not a ZeRO-3 checkpoint of {self.world} ranks?)")  # fmt: skip
        for name, shape in (states[0].get("frozen_param_shapes") or {}).items():  # outside the optimizer
            self._where[name] = ([s["frozen_param_fragments"][name].view(-1) for s in states], 0, torch.Size(shape).numel())

    def numel(self, name: str) -> int:
        return self._where[name][2]

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of parameter `name` flattened, in the checkpoint's dtype (fp32)."""
        parts, offset, numel = self._where[name]
        size = -(-numel // self.world)  # each rank's partition, the last one padded
        out = torch.empty(end - start, dtype=parts[0].dtype)
        for r in range(start // size, (end - 1) // size + 1) if end > start else ():
            lo, hi = max(start, r * size), min(end, (r + 1) * size)
            out[lo - start : hi - start] = parts[r][offset + lo - r * size : offset + hi - r * size]
        return out


def run_model_config(run_dir: str):
    """(stage, ModelConfig) that a run directory records in model.json (vocab.txt must be there too: it is what
    reading the run's checkpoints back needs besides the weights)."""
    from pretrain.models.config import ModelConfig

    for name in ("model.json", "vocab.txt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UserError(f"run.dir={run_dir}: no {name} (not a training run directory)")
    with open(os.path.join(run_dir, "model.json")) as f:
        saved = json.load(f)
    return saved.pop("stage"), ModelConfig(**saved)


def write_run_files(cfg, info, model, geometry, step: int, init, ds_config: dict, stage: str, model_cfg,
                    vocab_path: str, **extra) -> None:
    """What a run directory holds besides its checkpoints, written by rank 0 (every rank calls it: the partition
    sizes are gathered): config.yaml (resolved), run.json (world size, parameter counts, each rank's partition
    size, batch geometry, where the weights came from, `extra`, the DeepSpeed config), and what reading the
    checkpoints back needs without the data: model.json (stage and shapes, read by run_model_config) and vocab.txt.
    The JSON files appear whole (written beside and renamed)."""
    from omegaconf import OmegaConf

    from pretrain.models.layers import count_parameters
    from pretrain.training.engine import local_partition_numel

    per_rank = distributed.gather_objects(local_partition_numel(model))
    if info.rank != 0:
        return
    run_dir = str(cfg.run.dir)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    run_info = {
        "world_size": info.world_size, "parameters": count_parameters(model), "partition_numel_per_rank": per_rank,
        "micro_batch": geometry.micro, "grad_accum": geometry.accum, "global_batch": geometry.global_batch,
        "resumed_from_step": step, "initialized_from": None if init is None else init.tag_dir,
        "init_tensors": None if init is None else init.report(), **extra, "deepspeed_config": ds_config,
    }  # fmt: skip
    write_atomic(os.path.join(run_dir, "run.json"), json.dumps(run_info, indent=2, ensure_ascii=False))
    write_atomic(os.path.join(run_dir, "model.json"), json.dumps({"stage": stage, **dataclasses.asdict(model_cfg)}, indent=2))
    if os.path.abspath(vocab_path) != os.path.abspath(os.path.join(run_dir, "vocab.txt")):
        shutil.copyfile(vocab_path, os.path.join(run_dir, "vocab.txt"))


def write_atomic(path: str, text: str) -> None:
    """`text` at `path`, all at once: written beside it and renamed."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_run_model(run_dir: str, tag_dir: str):
    """The run's model (stage one or two, in eval mode) with the weights of checkpoint tag_dir: built on the meta
    device, so the consolidated tensors are taken as they are and no second copy is made."""
    from pretrain.models.palm import Palm
    from pretrain.models.structbert import StructBert

    stage, cfg = run_model_config(run_dir)
    with torch.device("meta"):
        model = (Palm if stage == "palm" else StructBert)(cfg)
    return load_weights(model, tag_dir)


def load_weights(model: torch.nn.Module, tag_dir: str) -> torch.nn.Module:
    """`model`, built on the meta device, with the consolidated weights of checkpoint tag_dir, in eval mode."""
    state = consolidate(tag_dir)
    missing = sorted(set(n for n, _ in model.named_parameters()) - set(state))
    if missing:
        raise UserError(f"{tag_dir}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of this model")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def rng_state() -> dict:
    """This rank's generators: Python's, NumPy's, torch's CPU one and, on a GPU, its CUDA one (dropout there)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: one GPU per rank
    return state


def seed_rng(seed: int) -> None:
    """torch.manual_seed seeds the CPU generator and every CUDA device's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise UserError("the checkpoint holds a CUDA generator state, and this run has no GPU (resume on GPUs)")
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoints:
    """A run's checkpoints: save with the commit protocol above, resume exactly, keep the last few."""

    def __init__(self, run_dir: str, rank: int, world_size: int, keep_last: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.protected: set[str] = set()  # tags never pruned (fine-tuning: the checkpoint the valid metric picked)

    def save(self, engine, step: int, stage: str, global_batch: int) -> None:
        tag = f"step{step}"
        os.makedirs(os.path.join(self.dir, tag), exist_ok=True)
        torch.save(rng_state(), os.path.join(self.dir, tag, f"rng_rank{self.rank}.pt"))
        _fault_point(step, self.rank)
        client_state = {"step": step, "stage": stage, "global_batch": global_batch}
        engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)  # ends in a barrier
        if self.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._prune(keep=tag)
        distributed.barrier()

    def discard_uncommitted(self) -> None:
        """Rank 0: remove step directories newer than `latest`, left by a run that died while saving."""
        tag = read_latest(self.dir)
        newest = int(_STEP_DIR.match(tag).group(1)) if tag and _STEP_DIR.match(tag) else -1
        if self.rank != 0 or not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            if name.endswith(UNIVERSAL + ".tmp"):  # a conversion that died half-way
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
            m = _STEP_DIR.match(name)
            if m and int(m.group(1)) > newest:
                print(f"pretrain.train: removing {os.path.join(self.dir, name)}: an unfinished checkpoint", file=sys.stderr)
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def _prune(self, keep: str) -> None:
        tags = sorted((int(m.group(1)), n) for n in os.listdir(self.dir) if (m := _STEP_DIR.match(n)))
        for _, name in tags[: -self.keep_last]:
            if name != keep and name not in self.protected:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
                shutil.rmtree(os.path.join(self.dir, name + UNIVERSAL), ignore_errors=True)

    def resolve(self, resume: str, stage: str, global_batch: int, elastic: bool | None = None) -> str | None:
        """The checkpoint directory `train.resume` names (auto: the newest complete one), checked against this
        run's stage, global batch and world size before anything is loaded or written; None to start fresh.
        Another world size needs `elastic` true (train.elastic; None: the caller offers no re-sharding), and then
        `resharded_from` is the checkpoint's world size."""
        self.resharded_from = None
        if resume == "never":
            return None
        if resume == "auto":
            tag = read_latest(self.dir)
            if tag is None:
                return None
            tag_dir = os.path.join(self.dir, tag)
        else:
            tag_dir = os.path.abspath(resume)
        saved_ranks = sum(1 for n in os.listdir(tag_dir) if n.startswith("rng_rank")) if os.path.isdir(tag_dir) else 0
        if saved_ranks == 0:
            raise UserError(f"{tag_dir}: no rng_rank<R>.pt (not a checkpoint of pretrain.train)")
        saved = saved_state(tag_dir)
        if saved.get("stage") != stage:
            raise UserError(f"{tag_dir}: a checkpoint of stage={saved.get('stage')}, this run has stage={stage}"
                            " (stage two starts from stage one with init_from=, in a new run.dir)")  # fmt: skip
        if saved.get("global_batch") != global_batch:
            raise UserError(f"train.global_batch_size={global_batch} differs from the checkpoint's {saved.get('global_batch')}")
        if saved_ranks != self.world_size:
            if elastic is None:
                raise UserError(f"{tag_dir}: written by {saved_ranks} ranks, this run has {self.world_size}"
                                " (resume with the same number of ranks)")  # fmt: skip
            # Checked last, so that the opt-in it offers is the one change the resume still needs.
            if not elastic:
                ranks = f"{self.world_size} rank{'s' if self.world_size > 1 else ''}"
                raise UserError(f"{tag_dir}: written by {saved_ranks} ranks, this run has {self.world_size}; add"
                                f" train.elastic=true to resume it re-sharded onto {ranks}")  # fmt: skip
            self.resharded_from = saved_ranks
        return tag_dir

    def to_universal(self, tag_dir: str) -> str:
        """The universal copy of checkpoint tag_dir (`<tag>.universal` beside it), made once by rank 0 and reused;
        every rank returns once it is complete. Collective."""
        out = tag_dir.rstrip(os.sep) + UNIVERSAL
        if self.rank == 0 and not os.path.isdir(out):
            print(f"pretrain.train: converting {tag_dir} to a universal checkpoint", file=sys.stderr)
            convert_universal(tag_dir, out)
        distributed.barrier()
        return out

    def load(self, engine, tag_dir: str, seed: int = 0) -> int:
        """Restore model, optimizer, scheduler and this rank's RNG; returns the step the checkpoint ended.
        A universal copy (another world size) is re-split by DeepSpeed (the engine was built with
        "checkpoint": {"load_universal": true}), and the RNG starts afresh, see elastic_seed."""
        safe_load.check_dir(tag_dir)  # DeepSpeed's load unpickles with weights_only=False: vetted files only
        path, client_state = engine.load_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
        if path is None:
            raise UserError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        step = int(client_state["step"])
        if tag_dir.endswith(UNIVERSAL):
            complete_universal_load(engine, tag_dir, self.rank, self.world_size)
            seed_rng(elastic_seed(seed, step, self.rank))
        else:
            set_rng_state(safe_load.load(os.path.join(tag_dir, f"rng_rank{self.rank}.pt")))
        return step


def _fault_point(step: int, rank: int) -> None:
    """Fault injection for the tests of a crash mid-save: PRETRAIN_CRASH_IN_SAVE=<step>:<rank> kills that rank
    after its RNG file is written and before its model and optimizer partitions are."""
    spec = os.environ.get("PRETRAIN_CRASH_IN_SAVE")
    if spec and spec == f"{step}:{rank}":
        print(f"pretrain.train: PRETRAIN_CRASH_IN_SAVE={spec}: rank {rank} dies while saving step {step}", file=sys.stderr)
        os._exit(113)

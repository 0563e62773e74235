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

Readers: the trainer (resume), init_from (stage two from stage one), generate and export, through `find`,
`saved_state` and `recorded_shapes` here, partitions.py (the weights) and run_dir.py (the model), which work
whatever number of ranks wrote it.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

import torch

from pretrain.errors import UserError
from pretrain.training import distributed, safe_load, watchdog
from pretrain.training.elastic import UNIVERSAL, complete_universal_load, convert_universal, elastic_seed
from pretrain.training.rng import rng_state, seed_rng, set_rng_state

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


class Checkpoints:
    """A run's checkpoints: save with the commit protocol above, resume exactly, keep the last few."""

    def __init__(self, run_dir: str, rank: int, world_size: int, keep_last: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.protected: set[str] = set()  # tags never pruned (fine-tuning: the checkpoint the valid metric picked)
        self._health: dict[str, bool] = {}  # tag -> its recorded health, read once
        self.loaded_state: dict = {}  # the client state of the checkpoint `load` restored
        self.resharded_from, self.global_batch = None, None  # set by resolve

    @watchdog.long_phase("a checkpoint save")
    def save(self, engine, step: int, stage: str, global_batch: int, healthy: bool = True,
             health: dict | None = None) -> None:  # fmt: skip
        """healthy: the run saw no divergence since its previous checkpoint (training/health.py), which `_prune`
        and a rollback read back; health: the monitor's state, so a resumed run judges as the straight one would."""
        tag = f"step{step}"
        os.makedirs(os.path.join(self.dir, tag), exist_ok=True)
        torch.save(rng_state(), os.path.join(self.dir, tag, f"rng_rank{self.rank}.pt"))
        _fault_point(step, self.rank)
        client_state = {"step": step, "stage": stage, "global_batch": global_batch, "healthy": healthy,
                        "health": health or {}}  # fmt: skip
        engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)  # ends in a barrier
        if self.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._health[tag] = healthy
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

    def healthy(self, tag: str) -> bool:
        """Whether checkpoint `tag` was written by a healthy run (one written before the record existed: yes)."""
        if tag not in self._health:
            self._health[tag] = saved_state(os.path.join(self.dir, tag)).get("healthy", True) is not False
        return self._health[tag]

    def committed_tags(self) -> list[str]:
        """The complete checkpoints, oldest first: step directories up to the one `latest` names."""
        latest = read_latest(self.dir) if os.path.isdir(self.dir) else None
        if latest is None or not _STEP_DIR.match(latest):
            return []
        newest = int(_STEP_DIR.match(latest).group(1))
        steps = sorted(int(m.group(1)) for n in os.listdir(self.dir) if (m := _STEP_DIR.match(n)))
        return [f"step{k}" for k in steps if k <= newest]

    def newest_healthy(self) -> str | None:
        """The directory of the newest complete checkpoint written by a healthy run; None when there is none."""
        for tag in reversed(self.committed_tags()):
            if self.healthy(tag):
                return os.path.join(self.dir, tag)
        return None

    def _prune(self, keep: str) -> None:
        tags = sorted((int(m.group(1)), n) for n in os.listdir(self.dir) if (m := _STEP_DIR.match(n)))
        # A long unhealthy stretch (train.on_divergence=warn) must not age the last healthy checkpoint out.
        newest_healthy = next((n for _, n in reversed(tags) if self.healthy(n)), None)
        for _, name in tags[: -self.keep_last]:
            if name != keep and name not in self.protected and name != newest_healthy:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
                shutil.rmtree(os.path.join(self.dir, name + UNIVERSAL), ignore_errors=True)

    def resolve(self, resume: str, stage: str, elastic: bool | None = None) -> str | None:
        """The checkpoint directory `train.resume` names (auto: the newest complete one), checked against this
        run's stage and world size before anything is loaded or written; None to start fresh. Another world size
        needs `elastic` true (train.elastic; None: the caller offers no re-sharding), and then `resharded_from` is
        the checkpoint's world size. `global_batch` is the checkpoint's (None to start fresh): the run's batch
        geometry keeps it (config.batch_geometry)."""
        self.resharded_from, self.global_batch = None, None
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
        if saved_ranks != self.world_size:
            if elastic is None:
                raise UserError(f"{tag_dir}: written by {saved_ranks} ranks, this run has {self.world_size}"
                                " (resume with the same number of ranks)")  # fmt: skip
            # Checked before the batch geometry, which follows the world size: the opt-in comes first.
            if not elastic:
                ranks = f"{self.world_size} rank{'s' if self.world_size > 1 else ''}"
                raise UserError(f"{tag_dir}: written by {saved_ranks} ranks, this run has {self.world_size}; add"
                                f" train.elastic=true to resume it re-sharded onto {ranks}")  # fmt: skip
            self.resharded_from = saved_ranks
        self.global_batch = saved.get("global_batch")
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

    @watchdog.long_phase("a checkpoint load")
    def load(self, engine, tag_dir: str, seed: int = 0) -> int:
        """Restore model, optimizer, scheduler and this rank's RNG; returns the step the checkpoint ended.
        A universal copy (another world size) is re-split by DeepSpeed (the engine was built with
        "checkpoint": {"load_universal": true}), and the RNG starts afresh, see elastic_seed."""
        safe_load.check_dir(tag_dir)  # DeepSpeed's load unpickles with weights_only=False: vetted files only
        path, client_state = engine.load_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
        if path is None:
            raise UserError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        self.loaded_state = client_state
        step = int(client_state["step"])
        if tag_dir.endswith(UNIVERSAL):
            complete_universal_load(engine, tag_dir, self.rank, self.world_size)
            seed_rng(elastic_seed(seed, step, self.rank))
        else:
            set_rng_state(safe_load.load(os.path.join(tag_dir, f"rng_rank{self.rank}.pt")))
        return step


def _fault_point(step: int, rank: int) -> None:
    """Fault injection for the tests of a crash mid-save: PRETRAIN_CRASH_IN_SAVE=<step>:<rank>[:<status>] kills that
    rank after its RNG file is written and before its model and optimizer partitions are. It exits with status 113
    (a crash), or with <status>: the Slurm tests make one rank exit as a configuration error (2) or a divergence
    stop (3) would, while the others are still running, and check that the job script never requeues it."""
    spec = os.environ.get("PRETRAIN_CRASH_IN_SAVE")
    if spec and spec.split(":")[:2] == [str(step), str(rank)]:
        status = int(spec.split(":")[2]) if spec.count(":") == 2 else 113
        print(f"pretrain.train: PRETRAIN_CRASH_IN_SAVE={spec}: rank {rank} dies while saving step {step}", file=sys.stderr)
        os._exit(status)

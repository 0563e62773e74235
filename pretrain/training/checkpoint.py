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

import errno
import glob
import os
import re
import shutil
import sys

import torch

from pretrain.errors import UserError
from pretrain.training import distributed, integrity, safe_load, watchdog
from pretrain.training.elastic import UNIVERSAL, complete_universal_load, convert_universal, elastic_seed
from pretrain.training.engine import local_partition_numel
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


def find(path: str, key: str, option: str | None = None) -> str:
    """The checkpoint directory that the setting `key`=`path` names: a run directory (its newest checkpoint)
    or a checkpoint directory, verified against its record (integrity.py). A damaged one is refused, naming the
    newest intact older one and how to ask for it: `option` (default "<key>={dir}", see integrity.older_hint)."""
    if not os.path.isdir(path):
        raise UserError(f"{key}={path}: no such directory")
    tag = read_latest(os.path.join(path, "checkpoints"))
    if tag is not None:
        path = os.path.join(path, "checkpoints", tag)
    if not glob.glob(os.path.join(path, _MODEL_STATES)):
        raise UserError(f"{key}={path}: neither a run directory with checkpoints/latest nor a DeepSpeed checkpoint")
    if not path.rstrip(os.sep).endswith(UNIVERSAL):  # a universal copy is derived from a verified checkpoint
        integrity.check(path, option or f"{key}={{dir}}")
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
        self.damaged: list[str] = []  # resume=auto skipped these (integrity.py); discard_uncommitted sets them aside
        self.last_bytes: int | None = None  # the size of the newest checkpoint saved, from its record

    @watchdog.long_phase("a checkpoint save")
    def save(self, engine, step: int, stage: str, global_batch: int, healthy: bool = True,
             health: dict | None = None) -> None:  # fmt: skip
        """healthy: the run saw no divergence since its previous checkpoint (training/health.py), which `_prune`
        and a rollback read back; health: the monitor's state, so a resumed run judges as the straight one would."""
        tag = f"step{step}"
        need = self._check_room(engine, tag)  # before a byte of it is written
        _fill_disk_point(step, self.rank, self.dir)
        os.makedirs(os.path.join(self.dir, tag), exist_ok=True)
        rng_file = os.path.join(self.dir, tag, f"rng_rank{self.rank}.pt")
        self._agree_saved(tag, need, _attempt(lambda: torch.save(rng_state(), rng_file)))  # collective: all or none
        _fault_point(step, self.rank)
        client_state = {"step": step, "stage": stage, "global_batch": global_batch, "healthy": healthy,
                        "health": health or {}}  # fmt: skip
        failed = _attempt(lambda: engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False))
        if failed is not None:  # the other ranks wait in the barrier that ends save_checkpoint: join them there
            distributed.barrier()
        self._agree_saved(tag, need, failed)
        self.last_bytes = integrity.record(os.path.join(self.dir, tag), self.rank, self.world_size)  # before latest
        if self.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._health[tag] = healthy
            self._prune(keep=tag)
        distributed.barrier()

    def _check_room(self, engine, tag: str) -> int:
        """Collective: the bytes a checkpoint needs (the last one's size, from its record; before the first, an
        estimate from the parameters), checked by rank 0 against the free space of the checkpoints' file system.
        A save that cannot fit stops the run (exit 2, every rank) before it writes anything: the previous
        checkpoint is the one to resume from once there is room. keep_last prunes only after a save is committed,
        so the disk holds keep_last + 1 checkpoints while one is written."""
        verdict = None
        if self.rank == 0:
            need = self.last_bytes or integrity.recorded_bytes(os.path.join(self.dir, read_latest(self.dir) or "-"))
            need = need or _estimate_bytes(engine, self.world_size)
            free = _free_bytes(self.dir)
            verdict = (need, free)
        need, free = distributed.broadcast_object(verdict)
        if need > free:
            raise UserError(f"{os.path.join(self.dir, tag)}: not saved: the checkpoint needs about {need} bytes and"
                            f" {free} are free on its file system; {self._previous()} (free space, then resume)")  # fmt: skip
        return need

    def _agree_saved(self, tag: str, need: int, failed: BaseException | None) -> None:
        """Collective: whether every rank wrote its part. A full disk (ENOSPC, or a write that failed with less free
        than a checkpoint needs: torch.save reports it as `basic_ios::clear: iostream error` or `unexpected pos`)
        removes the partial checkpoint and stops every rank with one line; `latest` still names the previous one.
        Any other failure is raised as it is."""
        tag_dir = os.path.join(self.dir, tag)
        full = failed is not None and (_is_enospc(failed) or _free_bytes(self.dir) < need)
        outcome = distributed.gather_objects(None if failed is None else (full, f"{type(failed).__name__}: {failed}"))
        if all(o is None for o in outcome):
            return
        if not all(o[0] for o in outcome if o is not None):
            if failed is not None:
                raise failed
            raise RuntimeError(f"{tag_dir}: rank {next(r for r, o in enumerate(outcome) if o)} failed to save its part")
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        distributed.barrier()
        raise UserError(f"{tag_dir}: no space left on its file system while saving: the checkpoint needs about {need}"
                        f" bytes, {_free_bytes(self.dir)} are free; the partial checkpoint is removed and"
                        f" {self._previous()} (free space, then resume)")  # fmt: skip

    def _previous(self) -> str:
        tag = read_latest(self.dir)
        return f"{os.path.join(self.dir, tag)} is intact" if tag else "no checkpoint was saved before"

    def _write_latest(self, tag: str) -> None:
        tmp = os.path.join(self.dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(self.dir, "latest"))

    def _set_aside_damaged(self, resumed: str) -> None:
        """Rank 0: the damaged checkpoints resolve skipped are renamed <tag>.damaged (kept for a look, never resumed
        or pruned; delete them yourself), their universal copies removed, and `latest` names the one resumed."""
        for tag_dir in self.damaged:
            aside, n = f"{tag_dir}.damaged", 1
            while os.path.exists(aside):
                aside, n = f"{tag_dir}.damaged{n}", n + 1
            os.replace(tag_dir, aside)
            shutil.rmtree(tag_dir + UNIVERSAL, ignore_errors=True)
        self._write_latest(os.path.basename(resumed))

    def discard_uncommitted(self) -> None:
        """Rank 0: set aside the damaged checkpoints resume=auto skipped, and remove step directories newer than
        `latest`, left by a run that died while saving."""
        if self.rank == 0 and self.damaged:
            self._set_aside_damaged(self.intact)
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
        """The directory of the newest complete checkpoint written by a healthy run and intact (integrity.py; read
        once per process); None when there is none."""
        for tag in reversed(self.committed_tags()):
            if not integrity.verify(os.path.join(self.dir, tag)) and self.healthy(tag):
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
            tag_dir = self._intact_or_older(os.path.join(self.dir, tag))
        else:
            tag_dir = os.path.abspath(resume)
            if os.path.isdir(tag_dir) and not tag_dir.endswith(UNIVERSAL):
                integrity.check(tag_dir, "train.resume={dir}")
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

    def _intact_or_older(self, tag_dir: str) -> str:
        """resume=auto: the checkpoint `latest` names if it is intact, else the newest intact older one, said in
        one line (the damaged ones are set aside by discard_uncommitted, once the ranks are joined). Every rank
        verifies the same files and comes to the same answer, before any collective exists."""
        found = integrity.verify(tag_dir) if os.path.isdir(tag_dir) else [f"{tag_dir}: missing (checkpoints/latest names it)"]
        if not found:
            return tag_dir
        newest = integrity.step_of(tag_dir)
        older = integrity.newest_intact(self.dir, below=newest)
        if older is None:
            raise UserError(f"{found[0]}; no older intact checkpoint in {self.dir} to resume from"
                            " (train.resume=never starts afresh)")  # fmt: skip
        oldest = integrity.step_of(older)
        self.damaged = sorted(os.path.join(self.dir, n) for n in os.listdir(self.dir)
                              if (m := _STEP_DIR.match(n)) and oldest < int(m.group(1)) <= (newest or -1))  # fmt: skip
        self.intact = older
        if self.rank == 0:
            names = ", ".join(os.path.basename(d) for d in self.damaged)
            print(f"{integrity._prog()}: {found[0]}: resuming from {older}, the newest intact checkpoint; damaged"
                  f" {names} set aside as <tag>.damaged", file=sys.stderr, flush=True)  # fmt: skip
        return older

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
        if not tag_dir.endswith(UNIVERSAL):  # verified by resolve already: once per process
            integrity.check(tag_dir, "train.resume={dir}")
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


def _attempt(write) -> BaseException | None:
    """Run a write of the save; the exception it raised (a full disk, say), or None."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        return e
    return None


def _is_enospc(e: BaseException) -> bool:
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _free_bytes(path: str) -> int:
    """Free bytes of the file system holding `path` (or its nearest existing parent)."""
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return shutil.disk_usage(path).free


def _estimate_bytes(engine, world_size: int) -> int:
    """A first checkpoint's size before there is a record of one: its optimizer partitions hold 12 bytes per
    parameter (fp32 master weights and two moments, AdamW's and LAMB's), the rest is small."""
    return 12 * local_partition_numel(engine.module) * world_size


def _fill_disk_point(step: int, rank: int, checkpoints_dir: str) -> None:
    """Fault injection for the tests of a disk that fills during a save (another job writing, say):
    PRETRAIN_FILL_DISK_IN_SAVE=<step> makes rank 0 fill the checkpoints' file system, but for 64 KiB, with
    run.dir/disk_filler after the free-space check of that step's save and before its first byte."""
    if os.environ.get("PRETRAIN_FILL_DISK_IN_SAVE") == str(step):
        if rank == 0:
            left = 64 * 1024
            with open(os.path.join(os.path.dirname(checkpoints_dir), "disk_filler"), "wb") as f:
                while (free := _free_bytes(checkpoints_dir)) > left:
                    f.write(bytes(min(free - left, 2**20)))
                    f.flush()
            print(f"pretrain.train: PRETRAIN_FILL_DISK_IN_SAVE={step}: {_free_bytes(checkpoints_dir)} bytes left free",
                  file=sys.stderr)  # fmt: skip
        distributed.barrier()

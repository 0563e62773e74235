"""Process-group setup that works the same under `deepspeed`, `torchrun`, Slurm `srun` and plain `python`."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove the `--local_rank=N` the deepspeed launcher appends (Hydra would reject it); keep it in LOCAL_RANK."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistInfo:
    """Rank and world size from the launcher's environment; a lone process is rank 0 of 1."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init(info: DistInfo, timeout_s: float) -> None:
    """Join the process group; a rank that dies makes the others fail after `timeout_s`, not hang."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
        rank=info.rank,
        world_size=info.world_size,
    )
    _unlink_shm_segment(info)


def shm_segment(rank: int) -> str:
    """The /dev/shm file of DeepSpeed's CPU all-reduce workspace for `rank` (its ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_segment(info: DistInfo) -> None:
    """DeepSpeed's CPU all-reduce maps one shared-memory segment per rank (66 MB) and never unlinks it, so every
    run left its segments in /dev/shm, a RAM-backed tmpfs: a few hundred runs filled this machine's memory and
    got processes killed. Once every rank has mapped every segment (DeepSpeed's init does so before it returns;
    the barrier waits for all of them), the name can go: the mappings stay valid until the process exits."""
    if info.world_size > 1:
        dist.barrier()
    if os.path.exists(shm_segment(info.rank)):
        os.unlink(shm_segment(info.rank))


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def world_size() -> int:
    """The process group's size; 1 before it is joined (or in a lone process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


"""Process-group setup that works the same under `deepspeed`, `torchrun`, Slurm `srun` and plain `python`."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from pretrain.errors import UserError


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
    import deepspeed  # deepspeed: ~2 s to import; this module also serves torch-only helpers
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        # Before any collective: NCCL binds each rank to the current device, and every rank would otherwise
        # take cuda:0 (zero.Init sets the device too, but only later, after the barriers below).
        accelerator.set_device(info.local_rank)
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    backend, timeout = accelerator.communication_backend_name(), timedelta(seconds=timeout_s)
    with _port_in_use_as_one_line():
        if backend == "gloo":  # DeepSpeed's CPU all-reduce maps its /dev/shm segment as soon as it has joined
            _join_checked(info, backend, timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, rank=info.rank,
                                   world_size=info.world_size)  # fmt: skip
    _unlink_shm_segment(info)
    _make_host_group()


CLOCK_SKEW_S = 30.0  # between the nodes' clocks, with a wide margin (NTP keeps them within milliseconds)
_RANK0_JOINED = "pretrain/rank0_joined"


@contextlib.contextmanager
def _port_in_use_as_one_line():
    """The rendezvous port in use (rank 0's store cannot listen): one line naming it, not DistNetworkError's trace."""
    try:
        yield
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e):
            raise
        port, addr = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
        raise UserError(f"MASTER_PORT={port}: the rendezvous port is in use on {addr} (another run?); give this run "
                        "a free port: deepspeed --master_port=<port> (torchrun --master_port=<port>, srun: "
                        "MASTER_PORT=<port>)") from None  # fmt: skip


def _join_checked(info: DistInfo, backend: str, timeout: timedelta) -> None:
    """Join the process group (DeepSpeed's init then wraps it), and check that the rendezvous is this launch's.
    A second run on a port in use fails in rank 0 (the store cannot listen), but its other ranks find the first
    run's store there and join it: DeepSpeed would then map a 66 MB /dev/shm segment per rank that nothing unlinks
    once the launcher kills them. So rank 0 records in the store when it joined, and every other rank compares
    that with its own start: this launch's rank 0 cannot have joined before this rank existed (joining waits for
    every rank); another run's did. A rank waiting for a rank 0 that failed is killed by its launcher (or gives up
    after dist.timeout_s) before it maps anything."""
    dist.init_process_group(backend, timeout=timeout, rank=info.rank, world_size=info.world_size)
    if info.world_size == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    if info.rank == 0:
        store.set(_RANK0_JOINED, repr(time.time()))
    store.wait([_RANK0_JOINED], timeout)
    joined, started = float(store.get(_RANK0_JOINED).decode()), psutil.Process().create_time()
    if joined < started - CLOCK_SKEW_S:
        port, addr = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
        raise UserError(f"MASTER_PORT={port}: the rendezvous on {addr} is another run's (its rank 0 joined "
                        f"{started - joined:.0f} s before this rank started); give this run a free port: deepspeed "
                        "--master_port=<port>")  # fmt: skip


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


_HOST_GROUP = None  # a gloo group over the same ranks where the default backend is not gloo (NCCL)


def _make_host_group() -> None:
    """The group that host values travel in. NCCL reduces only device tensors, and a reduction on the device makes
    the host wait for the GPU's queue: the stop request, asked at every step, would stall the pipeline each time.
    So host values (the stop flag, peak memory, objects) go through gloo, on the CPU; new_group is collective, so
    every rank builds it here, right after joining."""
    global _HOST_GROUP
    if dist.is_initialized() and dist.get_backend() != "gloo":
        _HOST_GROUP = dist.new_group(backend="gloo")


def host_group():
    """The process group for host (CPU) tensors and objects: the default one under gloo, else the gloo side group."""
    return _HOST_GROUP


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums of host numbers over the ranks, through the host group (no device, no wait on the GPU)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, group=_HOST_GROUP)
    return t.tolist()


def reduction_device(tensor_device):
    """Where a tensor must be for the default group's collectives: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return tensor_device if tensor_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensor_sum(t):
    """The sum over the ranks of a float64 tensor, in place on the default group's device (a GPU tensor is summed
    where it is, with no copy to the host first); returns it as a host list, read once."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(reduction_device(t.device))
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
    dist.all_gather_object(out, obj, group=_HOST_GROUP)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_HOST_GROUP)
    return box[0]


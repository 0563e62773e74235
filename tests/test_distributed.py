"""Collectives of host values and of device tensors: host values travel in a gloo group of their own where the
default backend is not gloo (NCCL reduces only GPU tensors, and a reduction there would make the host wait for the
GPU at every step); device tensors are reduced on the default group's device. Two real gloo processes; the NCCL
side is simulated by making the default backend report itself as nccl, which makes `init` build the side group."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.objectives import MLM
from pretrain.training import distributed
from pretrain.training.metrics import Window
from runs import free_port


def _worker(rank: int, port: int, simulate_nccl: bool, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        real_backend = dist.get_backend
        if simulate_nccl:
            dist.get_backend = lambda group=None: "nccl" if group is None else real_backend(group)
        distributed._make_host_group()
        dist.get_backend = real_backend
        group = distributed.host_group()
        result = {
            "side_group": group is not None,
            "side_backend": None if group is None else dist.get_backend(group),
            "sum": distributed.all_reduce_sum([rank + 1.0, 10.0 * rank]),
            "gathered": distributed.gather_objects({"rank": rank}),
            "broadcast": distributed.broadcast_object(f"from {rank}"),
        }
        window = Window((MLM,))
        window.add({"mlm": (torch.tensor(2.0 + rank), torch.tensor(1.0), 4)}, tokens=8, padded=10)
        window.add({"mlm": (torch.tensor(1.0), torch.tensor(rank * 1.0), 4)}, tokens=8, padded=10)
        window.mark_step()
        reduced = window.reduce()
        result["window"] = (reduced["mlm_loss"], reduced["mlm_acc"], reduced["mlm_count"], reduced["tokens"])
        out.put((rank, result))
    finally:
        distributed._HOST_GROUP = None
        dist.destroy_process_group()


@pytest.mark.e2e  # two spawned ranks
@pytest.mark.parametrize("simulate_nccl", [False, True])
def test_host_collectives_and_window_reduction_on_two_ranks(simulate_nccl):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, simulate_nccl, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, r in results.items():
        assert r["side_group"] is simulate_nccl  # gloo default: host values use the default group itself
        if simulate_nccl:
            assert r["side_backend"] == "gloo"
        assert r["sum"] == [3.0, 10.0]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert r["broadcast"] == "from 0"
        # loss sums 2+1 and 3+1 over 16 predictions; correct 1+0 and 1+1; 32 tokens
        assert r["window"] == (7.0 / 16, 3.0 / 16, 16, 32)


def test_reduction_device_follows_the_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert distributed.reduction_device(cpu) == cpu
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.reduction_device(cpu) == cpu
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.reduction_device(cpu) == torch.device("cuda", 3)  # NCCL: a host tensor goes to this rank's GPU
    assert distributed.reduction_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # already there: stays

"""Peak host memory per rank of stage two's `init_from` (a stage-one ZeRO-3 checkpoint copied into the partitioned
stage-two model), three ways, each in its own `deepspeed` launch on the same number of ranks:

- partitions: `init_from.load_into` as the trainer runs it; each rank reads its own partition of each parameter
  from the checkpoint's memory-mapped partition files (partitions.PartitionReader), no collective.
- lazy: rank 0 holds DeepSpeed's lazy consolidation (`get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`,
  the partition files memory-mapped) and assembles one parameter at a time, which is gathered on every rank, set
  on rank 0 and re-partitioned.
- eager: the same with the whole fp32 state dict consolidated on rank 0 first (what load_into did before).

Each rank resets its peak RSS (/proc/self/clear_refs) just before the copy and reads it (VmHWM) just after, so
the figure is the copy's own peak; a thread samples RssAnon and RssFile (memory-mapped file pages, which the
kernel can drop) every millisecond to split it.

    python bench/init_memory.py <stage-one run.dir> [ranks]
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's pretrain
MODES = ("eager", "lazy", "partitions")


def status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Peaks(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.running = True

    def run(self):
        while self.running:
            s = status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"] + s["RssShmem"])
            time.sleep(0.001)


def worker(mode: str, run_dir: str, out_path: str) -> None:
    import gc

    import torch

    from pretrain import init_sources
    from pretrain.models.palm import Palm
    from pretrain.run_record import read_model_record
    from pretrain.training import checkpoint, distributed, init_from, partitions
    from pretrain.training.engine import build_model

    info = distributed.read_env()
    distributed.init(info, timeout_s=600)
    record = read_model_record(run_dir)
    assert not record.stage_class.generates, "a stage-one run.dir"
    cfg = record.cfg
    ds_config = {"train_batch_size": info.world_size, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = build_model(lambda: Palm(cfg), ds_config, seed=0)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Palm(cfg).named_parameters()}
    source = init_sources.init_source(run_dir, shapes, cfg, os.path.join(run_dir, "vocab.txt"))
    gc.collect()
    distributed.barrier()
    before = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    peaks = Peaks()
    peaks.start()
    start = time.perf_counter()
    if mode == "partitions":
        init_from.load_into(model, source, info.rank)
    else:
        weights = None
        if info.rank == 0:
            weights = partitions.consolidate(source.tag_dir, lazy=mode == "lazy")
            if mode == "lazy":  # a parameter is assembled when it is taken
                weights = {k: _Contiguous(v) for k, v in weights.items()}
        init_from._load_gathered(model, weights, source.mapping, info.rank)
        del weights
    seconds = time.perf_counter() - start
    peaks.running = False
    peaks.join()
    after = status()
    row = {"rank": info.rank, "rss_before": before["VmRSS"], "peak": after["VmHWM"], "peak_anon": peaks.anon,
           "peak_file": peaks.file, "anon_before": before["RssAnon"], "seconds": seconds}  # fmt: skip
    rows = distributed.gather_objects(row)
    if info.rank == 0:
        largest = max(torch.Size(s).numel() for s in checkpoint.recorded_shapes(source.tag_dir, "run.dir").values())
        total = sum(torch.Size(s).numel() for s in checkpoint.recorded_shapes(source.tag_dir, "run.dir").values())
        with open(out_path, "w") as f:
            json.dump({"ranks": rows, "stage_one_numel": total, "largest_numel": largest}, f)
    distributed.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # as tests/init_equality.py: skip the process group's teardown, everything is on disk


class _Contiguous:
    """A lazy tensor of DeepSpeed's that behaves, for _load_gathered, as the tensor it assembles."""

    def __init__(self, lazy):
        self.lazy = lazy

    def to(self, dtype):
        return self.lazy.contiguous().to(dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(run_dir: str, ranks: int = 2) -> None:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in MODES:
            out = os.path.join(tmp, f"{mode}.json")
            cmd = ["deepspeed", "--num_gpus", str(ranks), f"--master_port={free_port()}", os.path.abspath(__file__),
                   "--worker", mode, os.path.abspath(run_dir), out]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode}: rc={proc.returncode}\n{proc.stderr[-3000:]}")
            with open(out) as f:
                results[mode] = json.load(f)
    first = results[MODES[0]]
    print(f"stage one: {first['stage_one_numel']:,} parameters, {mib(first['stage_one_numel'] * 4)} MiB in fp32;"
          f" largest parameter {mib(first['largest_numel'] * 4)} MiB; {ranks} ranks")  # fmt: skip
    print("MiB per rank, during the copy only: peak RSS (VmHWM) above the RSS before it; of which anonymous and"
          " memory-mapped file pages (sampled peaks)")
    for mode in MODES:
        for r in results[mode]["ranks"]:
            print(f"  {mode:<10} rank {r['rank']}: peak {mib(r['peak'])} = before {mib(r['rss_before'])}"
                  f" + {mib(r['peak'] - r['rss_before'])}; anonymous +{mib(r['peak_anon'] - r['anon_before'])},"
                  f" file pages up to {mib(r['peak_file'])}; {r['seconds']:.1f} s")  # fmt: skip


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if args and args[0] == "--worker":
        worker(*args[1:4])
    else:
        main(args[0], *(int(a) for a in args[1:2]))

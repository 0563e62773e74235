"""What a checkpoint's record of its files (pretrain/training/integrity.py) costs, against the save it follows.

    PYTHONPATH=. python bench/checkpoint_integrity.py [--gb 2] [--dir /tmp/ckpt_bench] [--ranks 2]

1. Each candidate hash's throughput on 256 MiB in memory (the one chosen, xxh3_64, and the others measured).
2. The demo model (model=toy, its prepared vocab size) and a 1B-parameter model: a ZeRO-3 checkpoint holds 12 bytes
   per parameter in its ranks' optimizer partitions (fp32 master weights, Adam's two moments; the model-states and
   RNG files are small), written here as `--ranks` files of fp32 tensors with torch.save, as DeepSpeed writes them.
   Timed: that save, the record (every rank hashing its own files, here one after the other: in a run the ranks
   hash at once, so the wall time is one rank's share) and a verification (a resume's or export's read-back).
   The 1B checkpoint (12 GB) is more than this disk and time allow: `--gb` GB are written and timed, and the
   figures for 12 GB are extrapolated at the measured throughputs (said in the output).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
import zlib

import torch

from pretrain.training import integrity

BYTES_PER_PARAMETER = 12


def hash_throughputs() -> dict[str, float]:
    import xxhash

    data = os.urandom(256 * 2**20)
    algorithms = {"xxh3_64": lambda b: xxhash.xxh3_64(b).digest(), "xxh64": lambda b: xxhash.xxh64(b).digest(),
                  "crc32": zlib.crc32, "blake2b": lambda b: hashlib.blake2b(b).digest(),
                  "sha256": lambda b: hashlib.sha256(b).digest()}  # fmt: skip
    out = {}
    for name, fn in algorithms.items():
        fn(data)
        began = time.perf_counter()
        fn(data)
        out[name] = len(data) / (time.perf_counter() - began) / 1e9
    return out


def demo_parameters() -> int:
    from pretrain.models.config import ModelConfig
    from pretrain.stages import stage_class

    cfg = ModelConfig(vocab_size=21128, hidden=128, layers=4, heads=4, ffn=512)  # model=toy, a Chinese BERT vocab
    with torch.device("meta"):
        model = stage_class("structbert").model_class()(cfg)
    return sum(p.numel() for p in model.parameters())


def checkpoint(tag_dir: str, total_bytes: int, ranks: int) -> dict[str, float]:
    """Write a checkpoint of total_bytes as `ranks` partition files, then record and verify it; seconds each."""
    shutil.rmtree(tag_dir, ignore_errors=True)
    os.makedirs(tag_dir)
    numel = total_bytes // 4 // ranks
    save_s = 0.0
    for r in range(ranks):
        flat = torch.randn(numel)  # made outside the timing, one rank's at a time
        path = os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        began = time.perf_counter()
        torch.save({"optimizer_state_dict": {"fp32_flat_groups": [flat]}}, path)  # no fsync: nor does DeepSpeed's
        save_s += time.perf_counter() - began
        del flat
    began = time.perf_counter()
    shares = {}
    for r in range(ranks):
        shares.update(integrity.hash_share(tag_dir, r, ranks))
    integrity.write_manifest(tag_dir, shares)
    record_s = time.perf_counter() - began
    began = time.perf_counter()
    assert integrity.problems(tag_dir) == []
    verify_s = time.perf_counter() - began
    return {"bytes": sum(size for size, _ in shares.values()), "save_s": save_s, "record_s": record_s, "verify_s": verify_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="GB written for the 1B-parameter measurement")
    ap.add_argument("--dir", default="/tmp/ckpt_bench")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    print("hash throughput, 256 MiB in memory (GB/s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in hash_throughputs().items()))  # fmt: skip
    demo = demo_parameters()
    for name, params, write_bytes in (("demo (model=toy)", demo, demo * BYTES_PER_PARAMETER),
                                      ("1B parameters", 10**9, int(args.gb * 1e9))):  # fmt: skip
        t = checkpoint(os.path.join(args.dir, "step1"), write_bytes, args.ranks)
        gb = t["bytes"] / 1e9
        line = (f"{name}: {params / 1e6:.1f}M parameters, {gb:.3f} GB written on {args.ranks} ranks: save {t['save_s']:.2f} s"
                f" ({gb / t['save_s']:.2f} GB/s), record {t['record_s']:.2f} s ({gb / t['record_s']:.2f} GB/s, "
                f"{100 * t['record_s'] / t['save_s']:.0f}% of the save; per rank at once: {t['record_s'] / args.ranks:.2f} s),"
                f" verify {t['verify_s']:.2f} s ({gb / t['verify_s']:.2f} GB/s)")  # fmt: skip
        print(line)
        full = params * BYTES_PER_PARAMETER / 1e9
        if write_bytes < params * BYTES_PER_PARAMETER:
            print(f"  extrapolated to the whole checkpoint ({full:.0f} GB) at these throughputs: save"
                  f" {full / (gb / t['save_s']):.1f} s, record {full / (gb / t['record_s']):.1f} s on one process"
                  f" ({full / (gb / t['record_s']) / args.ranks:.1f} s with {args.ranks} ranks hashing at once),"
                  f" verify {full / (gb / t['verify_s']):.1f} s")  # fmt: skip
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

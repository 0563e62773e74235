"""Peak memory of exporting a stage-one run: `pretrain.export`'s streaming path (DeepSpeed's lazy consolidation,
one tensor assembled and written at a time) against consolidating everything first and calling safetensors'
save_file (the usual recipe). Each runs in its own process; the figure is the process's peak RSS, and the
model's fp32 size is printed beside it.

    python bench/export_memory.py <stage-one run.dir>
"""
import json
import os
import subprocess
import sys
import tempfile

STREAMING = """
import sys
from pretrain.export import export
export(sys.argv[1], sys.argv[2])
"""
EAGER = """
import sys
from safetensors.torch import save_file
from pretrain.hf.layout import to_hf_plan
from pretrain.training import checkpoint, partitions
from pretrain.run_record import read_model_record
cfg = read_model_record(sys.argv[1]).cfg
state = partitions.consolidate(checkpoint.find(sys.argv[1], "run.dir"))
plan = to_hf_plan(state, cfg)
tensors = {theirs: (state[ours] if third is None else state[ours].chunk(3)[third]).contiguous() for theirs, ours, third in plan}
save_file(tensors, sys.argv[2] + "/model.safetensors")
"""


def peak_rss_mb(code: str, run_dir: str, out: str) -> float:
    wrapper = code + "\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    proc = subprocess.run([sys.executable, "-c", wrapper, run_dir, out], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main(run_dir: str) -> None:
    with open(os.path.join(run_dir, "run.json")) as f:
        params = json.load(f)["parameters"]
    baseline = peak_rss_mb("import torch, deepspeed, transformers, safetensors, pretrain.export", run_dir, "")
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "eager"))
        eager = peak_rss_mb(EAGER, run_dir, os.path.join(tmp, "eager"))
        streaming = peak_rss_mb(STREAMING, run_dir, os.path.join(tmp, "streaming"))
    print(f"model: {params:,} parameters, {params * 4 / 2**20:.0f} MiB in fp32; imports alone: {baseline:.0f} MiB peak RSS")
    print(f"consolidate, then safetensors save_file: {eager:.0f} MiB peak RSS ({eager - baseline:.0f} above the imports)")
    print(f"pretrain.export (lazy, streaming):       {streaming:.0f} MiB peak RSS ({streaming - baseline:.0f} above the imports)")


if __name__ == "__main__":
    main(sys.argv[1])

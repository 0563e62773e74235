"""bench/gpu_check.sh's dry run: every part of the GPU check, on CPU with tiny shapes, as the GPU machine runs it
(the same script, the same parts, the same outputs), so that it cannot rot between the rare GPU runs."""
import argparse
import importlib.util
import json
import os
import subprocess

import pytest

from runs import REPO

pytestmark = pytest.mark.e2e  # every test here starts processes (pyproject.toml)

SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
PARTS = ["env", "ops", "corpus", "tests", "stage1-bf16", "throughput-1b", "peer", "stage1-fp16", "stage2-bf16",
         "generate", "throughput-base", "stage2-fp16", "check-cost"]  # fmt: skip


def run(out, *args, timeout=900):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", SCRIPT, str(out), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


# On CPU these parts run the code of a part that is run (fp32 in place of fp16: part_train with the other
# DeepSpeed profile; throughput-1b: the tiny dims, as throughput-base), so the suite leaves them out, saving a
# minute; their command lines are checked below, and `make gpu-check-dry-run` runs every part.
SAME_ON_CPU = ("stage1-fp16", "stage2-fp16", "throughput-1b")
RUN = [name for name in PARTS if name not in SAME_ON_CPU]


def test_dry_run_runs_every_part_and_writes_its_figures(tmp_path):
    proc = run(tmp_path / "out", "--dry-run", "--work", str(tmp_path / "work"), "--only", ",".join(RUN))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.json", "logs.txt", "summary.txt"]
    report = json.load(open(tmp_path / "out" / "gpu_check.json"))
    assert report["dry_run"] and list(report["parts"]) == RUN
    assert {name: p["status"] for name, p in report["parts"].items()} == dict.fromkeys(RUN, "ok")
    parts = {name: p["result"] for name, p in report["parts"].items()}
    assert parts["env"]["device"] == "cpu" and parts["env"]["matmul_tflops"] > 0
    assert parts["corpus"]["splits"]["train"]["tokens"] > 10_000
    assert parts["tests"]["counts"]["passed"] >= 1 and not parts["tests"]["failed"]
    for name in ("stage1-bf16", "stage2-bf16"):
        r = parts[name]
        assert r["finite"] and r["steps"] == 4 and r["tokens_per_s"] > 0 and r["tflops"] > 0, (name, r)
        assert r["mfu"] is None  # no peak on CPU
    assert any(a.startswith("init_from=") and a != "init_from=null" for a in parts["stage2-bf16"]["args"])
    assert "deepspeed=zero3_bf16" in parts["stage1-bf16"]["args"]
    rows = parts["throughput-base"]["rows"]
    assert {(r["activation_checkpointing"], r["micro_batch"]) for r in rows} == {(c, m) for c in (False, True) for m in (2, 4)}
    assert all(r["tokens_per_s"] > 0 and r["tflops"] >= 0 for r in rows)
    packing = parts["throughput-base"]["packing"]
    assert [r["unpad"] for r in packing] == [True, False, True] and all(r["padding"] > 0 for r in packing)
    assert parts["peer"]["ratio"] > 0 and parts["peer"]["padding"] > 0  # the corpus gives padded batches
    cost = parts["check-cost"]
    assert cost["step_time_s_checks_on"] > 0 and cost["step_time_s_checks_off"] > 0 and cost["overhead"] is not None
    assert parts["generate"]["fp32"]["rc"] == 0 and "weights held per rank (GiB): [" in parts["generate"]["fp32"]["memory"]
    summary = open(tmp_path / "out" / "summary.txt").read()
    assert summary.startswith("gpu_check (dry run, CPU)") and all(f"\n{name} " in summary for name in RUN)
    logs = open(tmp_path / "out" / "logs.txt").read()
    assert all(f"===== {name}: ok" in logs for name in RUN)


def test_the_parts_left_out_differ_only_where_they_should():
    """stage*-fp16 are stage*-bf16 with DeepSpeed's fp16 profile (fp32 in a dry run); on a GPU, throughput-1b
    builds the 1B model."""
    _load_check()  # puts bench/ on the path: its parts are modules beside it
    import gpu_parts
    import gpu_throughput

    for stage in ("structbert", "palm"):
        for dry in (False, True):
            a = argparse.Namespace(dry_run=dry, work="/w")
            bf16, fp16 = (gpu_parts._train_args(a, stage, p, "/r") for p in ("bf16", "fp16"))
            assert [x for x in fp16 if x not in bf16] == ["deepspeed=zero3_v100"]
            assert [x for x in bf16 if x not in fp16] == ["deepspeed=zero3_bf16"]
            assert ("deepspeed.precision=fp32" in fp16) == dry
    assert gpu_throughput.throughput_dims(argparse.Namespace(dry_run=False), "1b") == gpu_parts.ONE_B
    assert gpu_throughput.throughput_dims(argparse.Namespace(dry_run=False), "base") == ["model=base"]
    assert gpu_throughput.throughput_dims(argparse.Namespace(dry_run=True), "1b") == gpu_parts.TINY


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "bench", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_and_part_selection(tmp_path):
    """Out of time, the remaining parts are recorded as skipped (exit 1); --only runs the named parts alone; an
    unknown part is one line, exit 1, before anything runs."""
    proc = run(tmp_path / "out", "--dry-run", "--budget-s", "5", "--only", "env,corpus", timeout=120)
    assert proc.returncode == 1
    report = json.load(open(tmp_path / "out" / "gpu_check.json"))
    assert list(report["parts"]) == ["env", "corpus"]
    assert report["parts"]["corpus"] == {"status": "skipped", "why": "out of time (--budget-s)"} or \
        report["parts"]["env"]["status"] == "timeout"
    bad = run(tmp_path / "bad", "--dry-run", "--only", "env,warp", timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().endswith(f"--only warp: unknown part (parts: {', '.join(PARTS)})")
    assert not (tmp_path / "bad" / "gpu_check.json").exists()

"""The GPU check: what only a GPU can show, in one command that fits a few minutes of a lent GPU.

    bash bench/gpu_check.sh OUT [--gpus N] [--budget-s 480] [--only PART,PART]   # installs .whl/, then runs:
    python bench/gpu_check.py --out OUT [--gpus N] [--budget-s 480] [--only ...] [--dry-run]

Parts, in this order (each in its own process with its own time budget, cut to what is left of --budget-s; a
failure or an overrun is recorded and the next part runs; a part whose input failed is skipped):
  env             device, driver, torch/CUDA/DeepSpeed versions, the dense bf16 matmul rate (the practical ceiling)
  ops             DeepSpeed's FusedAdam and FusedLamb JIT-built for this GPU (seconds each; cached for what follows)
  corpus          a synthetic corpus made on the spot (long and short documents: real padding), pretrain.prepare
  tests           pytest tests/test_gpu.py tests/test_fused.py (its two CPU launcher runs left to CI)
  stage1-bf16     the real trainer (deepspeed launcher, ZeRO-3, model=base, seq 512, 50 steps), deepspeed=zero3_bf16
  throughput-1b   a 1.2B encoder (hidden 2048, 24 layers, 16 heads, FFN 8192), stage one, bf16, seq 512, ZeRO-3, in
                  one process: each power-of-two micro-batch up to the largest that fits, activation checkpointing
                  off and on: tokens/s, TFLOP/s, MFU, peak memory
  peer            our stage-one step against transformers' BertForPreTraining (SDPA), base shapes, seq 512, bf16
                  autocast, fused torch AdamW on both sides, the same batches, interleaved rounds (bench/speed.py's)
  stage1-fp16     as stage1-bf16 with deepspeed=zero3_v100 (fp16, dynamic loss scaling: skipped steps, final scale)
  stage2-bf16     stage two from stage1-bf16's checkpoint, PLUG's [32, 512] lengths, 50 steps
  generate        pretrain.generate on stage2-bf16's checkpoint (ZeRO-3 partitions on every GPU), bf16 then fp16:
                  16 prompts in batches of 8, 64 new tokens, greedy: seconds, weights held and peak memory per rank
  throughput-base as throughput-1b for model=base, plus packing (model.unpad) on and off, and host syncs per step
  stage2-fp16     stage two in fp16
--gpus N: the training parts launch `deepspeed --num_gpus N` (NCCL across the GPUs); default all visible ones.
--dry-run: the same parts on CPU with tiny shapes and a few steps, fp32 in place of fp16/bf16 and torch's AdamW in
place of FusedAdam (tests/test_gpu_check.py runs it), so that the script cannot rot between GPU runs.
Written as each part ends: OUT/gpu_check.json (every figure), OUT/summary.txt (the table), OUT/logs.txt (each
part's output, its tail). Work files (corpus, runs) go to --work (a temporary folder by default); the JIT-built
ops to torch's extension cache (~/.cache/torch_extensions), where the later parts find them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its parts, beside it, also when loaded by path
from gpu_parts import (LOG_TAIL, REPO, TORCH_ADAM_ENV, PartFailed, part_check_cost, part_corpus, part_env,
                       part_generate, part_ops, part_tests, part_train)
from gpu_throughput import part_peer, part_throughput

# (name, seconds it may take on an H200, what it needs): run in this order, the most telling first.
PARTS = (
    ("env", 30, ()),
    ("ops", 150, ()),
    ("corpus", 45, ()),
    ("tests", 90, ("corpus",)),
    ("stage1-bf16", 75, ("corpus",)),
    ("throughput-1b", 105, ("corpus",)),
    ("peer", 60, ("corpus",)),
    ("stage1-fp16", 75, ("corpus",)),
    ("stage2-bf16", 75, ("corpus",)),
    ("generate", 60, ("stage2-bf16",)),
    ("throughput-base", 75, ("corpus",)),
    ("stage2-fp16", 75, ("corpus",)),
    ("check-cost", 75, ("stage1-bf16",)),
)


RUNNERS = {
    "env": part_env, "ops": part_ops, "corpus": part_corpus, "tests": part_tests,
    "stage1-bf16": lambda a: part_train(a, "structbert", "bf16"), "stage1-fp16": lambda a: part_train(a, "structbert", "fp16"),
    "stage2-bf16": lambda a: part_train(a, "palm", "bf16"), "stage2-fp16": lambda a: part_train(a, "palm", "fp16"),
    "generate": part_generate, "check-cost": part_check_cost,
    "throughput-1b": lambda a: part_throughput(a, "1b"), "throughput-base": lambda a: part_throughput(a, "base"),
    "peer": part_peer,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the driver


def run_part(a) -> None:
    """--part NAME: run one part here and write {"status", "result"} to --result."""
    try:
        record = {"status": "ok", "result": RUNNERS[a.part](a)}
    except PartFailed as e:
        record = {"status": "failed", "result": e.result, "error": "its figures fail the part's check"}
    except Exception as e:
        import traceback

        traceback.print_exc()
        record = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    with open(a.result, "w") as f:
        json.dump(record, f, indent=1, default=str)


def drive(a) -> int:
    only = set(a.only.split(",")) if a.only else None
    unknown = (only or set()) - set(RUNNERS)
    if unknown:
        sys.exit(f"bench/gpu_check.py: --only {','.join(sorted(unknown))}: unknown part"
                 f" (parts: {', '.join(name for name, _, _ in PARTS)})")  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": a.dry_run, "budget_s": a.budget_s,
              "work": a.work, "parts": {}}  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    arch = None if a.dry_run or "TORCH_CUDA_ARCH_LIST" in env else _gpu_archs()
    if arch:  # the CUDA ops built for these GPUs only: faster, and no arch that this CUDA no longer compiles
        env["TORCH_CUDA_ARCH_LIST"] = arch
    start = time.perf_counter()
    logs = []
    for name, budget, needs in PARTS:
        if only is not None and name not in only:
            continue
        left = a.budget_s - (time.perf_counter() - start)
        failed_needs = [n for n in needs if report["parts"].get(n, {}).get("status") in ("failed", "timeout", "skipped")]
        if failed_needs:
            report["parts"][name] = {"status": "skipped", "why": f"needs {', '.join(failed_needs)}"}
        elif left < 10:
            report["parts"][name] = {"status": "skipped", "why": "out of time (--budget-s)"}
        else:
            report["parts"][name], log = _spawn(a, name, min(budget * (1 if not a.dry_run else 4), left), env)
            logs.append(f"===== {name}: {report['parts'][name]['status']} in {report['parts'][name]['seconds']} s\n{log}")
        if name == "ops" and report["parts"][name]["status"] != "ok":
            env[TORCH_ADAM_ENV] = "1"
            report["fallback"] = "FusedAdam unavailable (see ops): the training parts ran torch.optim.AdamW"
        report["total_s"] = round(time.perf_counter() - start, 1)
        _write(a.out, report, logs)
        print(f"gpu_check: {name}: {report['parts'][name]['status']}", flush=True)
    print(open(os.path.join(a.out, "summary.txt")).read())
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


def _gpu_archs() -> str | None:
    """The visible GPUs' compute capabilities ("9.0"), from nvidia-smi: the driver process stays off the GPU (a
    CUDA context of its own would hold memory the parts measure)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    q = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    caps = sorted(set(q.stdout.split()))
    return ";".join(caps) if q.returncode == 0 and caps and all(c.replace(".", "").isdigit() for c in caps) else None


def _spawn(a, name: str, budget: float, env: dict) -> tuple[dict, str]:
    log_path = os.path.join(a.work, f"{name}.log")
    result_path = os.path.join(a.work, f"{name}.result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", result_path, "--work", a.work,
           "--out", a.out, "--gpus", str(a.gpus)] + (["--dry-run"] if a.dry_run else [])  # fmt: skip
    began = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=budget)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started (a launcher's ranks)
            proc.wait()
            timed_out = True
    seconds = round(time.perf_counter() - began, 1)
    if timed_out:
        record = {"status": "timeout", "error": f"over its budget of {budget:.0f} s"}
    elif os.path.exists(result_path):
        with open(result_path) as f:
            record = json.load(f)
    else:
        record = {"status": "failed", "error": f"exit {proc.returncode} with no result"}
    with open(log_path, errors="replace") as f:
        text = f.read()
    return {**record, "seconds": seconds, "budget_s": round(budget)}, text[-LOG_TAIL:]


def _write(out: str, report: dict, logs: list[str]) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)), ("summary.txt", summary(report)),
                       ("logs.txt", "\n".join(logs))):  # fmt: skip
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def summary(report: dict) -> str:
    parts = report["parts"]
    env = parts.get("env", {}).get("result", {})
    lines = [f"gpu_check {'(dry run, CPU) ' if report['dry_run'] else ''}{report['started']}: {env.get('device', '?')}"
             f" x{env.get('gpus', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, DeepSpeed"
             f" {env.get('deepspeed', '?')}; matmul {env.get('matmul_tflops')} TFLOP/s, table peak"
             f" {env.get('peak_tflops_table')}; {report.get('total_s')} s of {report['budget_s']}",
             *([report["fallback"]] if "fallback" in report else []), ""]  # fmt: skip
    for name, p in parts.items():
        r = p.get("result") or {}
        head = f"{name:<16} {p['status']:<8} {p.get('seconds', '-'):>6} s  "
        if name.startswith("stage") and "loss_first" in r:
            fp16 = f", skipped {r['skipped_steps']}, scale {r['loss_scale']}" if r.get("loss_scale") is not None else ""
            head += (f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {r['tokens_per_s']:.0f} tok/s, "
                     f"{_fmt(r['tflops'], 3)} TFLOP/s, mfu {_fmt(r['mfu'], 3)}, {r['peak_mem_gb']:.1f} GiB{fp16}")  # fmt: skip
        elif name.startswith("throughput") and "rows" in r:
            for key in ("best_plain", "best_checkpointed"):
                if key in r:
                    b = r[key]
                    head += (f"\n    {key[5:]:<12} micro {b['micro_batch']:>3}: {b['tokens_per_s']} tok/s, {b['tflops']}"
                             f" TFLOP/s, mfu {b['mfu']}, {b['peak_mem_gb']} GiB")  # fmt: skip
            for row in r.get("packing", []):
                head += f"\n    unpad={row['unpad']!s:<5} micro {row['micro_batch']}: {row['tokens_per_s']} tok/s (padding {row['padding']})"
            if r.get("host_syncs_per_step") is not None:
                head += f"\n    host syncs in one step: {r['host_syncs_per_step']}"
        elif name == "peer" and "ratio" in r:
            head += f"ours {r['tokens_per_s_ours']} tok/s, BertForPreTraining {r['tokens_per_s_peer']} tok/s: {r['ratio']}x"
        elif name == "tests" and "counts" in r:
            head += ", ".join(f"{v} {k}" for k, v in r["counts"].items()) + "".join(f"\n    {f}" for f in r.get("failed", []))
        elif name == "generate":
            head += "; ".join(f"{k} {v['seconds']} s, {v['memory']}" for k, v in r.items() if isinstance(v, dict))
        elif name == "check-cost" and "overhead" in r:
            head += (f"divergence checks: {_fmt(r['step_time_s_checks_on'], 4)} s/step on, "
                     f"{_fmt(r['step_time_s_checks_off'], 4)} off ({_fmt(r['overhead'], 4)})")  # fmt: skip
        elif name == "ops":
            head += ", ".join(f"{k} {v}" for k, v in r.items())
        if p.get("error") or p.get("why"):
            head += f"  [{p.get('error') or p.get('why')}]"
        lines.append(head)
    return "\n".join(lines) + "\n"


def _fmt(x, digits: int) -> str:
    """digits significant figures (a CPU dry run's TFLOP/s are thousandths)."""
    return "-" if x is None else f"{x:.{digits}g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where gpu_check.json, summary.txt and logs.txt go")
    p.add_argument("--work", help="work files (corpus, runs, builds); default: a temporary folder, removed after")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the training parts (default: all visible)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall time for all parts together")
    p.add_argument("--only", help="run only these parts (comma-separated), e.g. for a rerun of the failed ones")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.part:
        return run_part(a)
    keep = a.work is not None
    a.work = os.path.abspath(a.work or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(a.work, exist_ok=True)
    try:
        rc = drive(a)
    finally:
        if not keep:
            shutil.rmtree(a.work, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()

"""The GPU check's parts (bench/gpu_check.py runs each in its own process): the environment, the fused ops, the
corpus, the GPU tests, the real trainer in each precision, the check's cost and generation. The throughput and
the peer comparison: bench/gpu_throughput.py."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Where FusedAdam could not be built (the ops part failed), the training parts run torch's AdamW instead, and say so.
TORCH_ADAM_ENV = "GPU_CHECK_TORCH_ADAM"
ONE_B = ["model=large", "model.hidden=2048", "model.heads=16", "model.ffn=8192", "model.layers=24"]
TINY = ["model=toy", "model.hidden=64", "model.layers=2", "model.heads=2", "model.ffn=128", "model.decoder_layers=1"]
LOG_TAIL = 6000  # characters of each part's output kept in logs.txt


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def part_env(a) -> dict:
    import torch

    from pretrain.training.flops import peak_tflops

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": "cpu", "gpus": 0}  # fmt: skip
    for name in ("deepspeed", "transformers", "hydra", "jieba", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # recorded, not fatal: the parts that need it fail on their own
            out[name] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), capability=[p.major, p.minor],
                   memory_gib=round(p.total_memory / 2**30, 1), peak_tflops_table=peak_tflops(None))  # fmt: skip
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)  # fmt: skip
            out["nvidia_smi"] = q.stdout.strip()
    out["matmul_tflops"] = _matmul_rate(a.dry_run)
    return out


def _matmul_rate(dry: bool) -> float:
    """Dense matmul TFLOP/s on random data: bf16 8192^3 on the GPU (the ceiling MFU is read against, beside the
    datasheet's peak), fp32 256^3 on CPU in a dry run."""
    import torch

    n, dtype, device = (256, torch.float32, "cpu") if dry else (8192, torch.bfloat16, "cuda")
    x, y = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        x @ y
    _sync()
    reps, start = (3 if dry else 20), time.perf_counter()
    for _ in range(reps):
        x @ y
    _sync()
    return float(f"{2 * n**3 * reps / (time.perf_counter() - start) / 1e12:.4g}")  # a loaded CPU's 0.004 is not 0


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_ops(a) -> dict:
    """FusedAdam and FusedLamb, each JIT-built in a process of its own, both at once (each is a couple of files)."""
    from pretrain.training.optim import fused_lamb_status

    fused, how = fused_lamb_status()
    out = {"fused_lamb_status": how}
    if a.dry_run:
        return {**out, "built": "nothing (dry run: CPU, no CUDA ops)"}
    code = ("import sys, time; from deepspeed.accelerator import get_accelerator; t = time.perf_counter(); "
            "get_accelerator().create_op_builder(sys.argv[1]).load(verbose=False); print(round(time.perf_counter() - t, 1))")
    procs = {b: subprocess.Popen([sys.executable, "-c", code, b], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for b in ("FusedAdamBuilder", "FusedLambBuilder")}  # fmt: skip
    for builder, p in procs.items():
        text, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{builder} failed to build:\n{text[-3000:]}")
        out[f"{builder}_s"] = float(text.strip().splitlines()[-1])
    return out


def long_and_short_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of the tests' synthetic story corpus: two in three long (about 30 to 60 sentences: full seq-512
    samples), one in three short (3 to 8 sentences: padded ones), so batches have real padding."""
    import random

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from synthetic import synthetic_documents

    rng = random.Random(seed)
    stories = synthetic_documents(count * 8, seed)
    docs, i = [], 0
    for d in range(count):
        take = 1 if d % 3 == 2 else rng.randint(6, 10)
        doc = [p for story in stories[i : i + take] for p in story]
        i += take
        docs.append("\n".join("".join(p) for p in doc))
    return docs


def part_corpus(a) -> dict:
    corpus = os.path.join(a.work, "corpus.txt")
    count = 120 if a.dry_run else 1500
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n\n".join(long_and_short_documents(count)) + "\n")
    out = os.path.join(a.work, "prepared")
    workers = 2 if a.dry_run else min(8, os.cpu_count() or 1)
    _run([sys.executable, "-m", "pretrain.prepare", f"input={corpus}", f"out={out}", f"workers={workers}"])
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    return {"documents": count, "prepared": out, "vocab_size": meta["vocab_size"], "splits": meta["splits"]}


def part_tests(a) -> dict:
    files = ["tests/test_gpu.py", "tests/test_fused.py"]
    # the two launcher runs of test_fused.py train on CPU ranks, as CI does: nothing there is the GPU's
    select = ["-k", "not on_cpu and not over_ten_steps"] if not a.dry_run else ["-k", "validated or sdpa_kernels"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *files, *select],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    print(proc.stdout[-LOG_TAIL:], proc.stderr[-2000:])
    counts = {}
    for line in proc.stdout.splitlines()[::-1]:
        words = line.replace(",", " ").split()
        if any(w in ("passed", "failed", "skipped", "error", "errors") for w in words):
            counts = {words[i + 1]: int(words[i]) for i in range(len(words) - 1) if words[i].isdigit()}
            break
    failed = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    result = {"counts": counts, "failed": failed, "rc": proc.returncode}
    if proc.returncode not in (0, 5):
        raise PartFailed(result)
    return result


def _train_args(a, stage: str, precision: str, run_dir: str) -> list[str]:
    """The training command line of a stage-one or stage-two part: the real recipe at base size (tiny in a dry run)."""
    data = os.path.join(a.work, "prepared")
    profile = {"bf16": "zero3_bf16", "fp16": "zero3_v100"}[precision]
    args = [f"stage={stage}", f"deepspeed={profile}", f"data.dir={data}", f"run.dir={run_dir}", "logger.progress=false",
            "logger.wandb.mode=disabled", "train.log_every=10", "train.eval_every=50", "train.eval_samples=64",
            "train.save_every=50", "train.lr=2e-4", "train.max_steps=50"]  # fmt: skip
    if os.environ.get(TORCH_ADAM_ENV) and not a.dry_run:
        args.append("deepspeed.torch_adam=true")
    if a.dry_run:  # CPU: no fp16, no CUDA Adam, tiny shapes, 4 steps
        args += TINY + ["deepspeed.precision=fp32", "deepspeed.torch_adam=true", "train.micro_batch_size=4",
                        "train.max_steps=4", "train.log_every=2", "train.eval_every=4", "train.save_every=4",
                        "train.eval_samples=8"]  # fmt: skip
        args += ["stage.seq_len=64"] if stage == "structbert" else ["stage.src_len=[16,64]", "stage.tgt_len=[16,48]"]
    else:
        args += ["model=base", "train.micro_batch_size=16"] + (["stage.seq_len=512"] if stage == "structbert" else [])
    return args


def part_train(a, stage: str, precision: str, extra: tuple[str, ...] = (), suffix: str = "") -> dict:
    import torch

    run_dir = os.path.join(a.work, "runs", f"{stage}-{precision}{suffix}")
    args = _train_args(a, stage, precision, run_dir) + list(extra)
    if stage == "palm":  # from stage one's checkpoint when it was trained (init_from on the GPU too), else random
        first = os.path.join(a.work, "runs", "structbert-bf16")
        args.append(f"init_from={first}" if os.path.isfile(os.path.join(first, "checkpoints", "latest")) else "init_from=null")
    gpus = a.gpus or max(1, torch.cuda.device_count())
    _run(["deepspeed", "--num_gpus", str(1 if a.dry_run else gpus), "--master_port", str(_free_port()),
          "--module", "pretrain.train", *args])  # fmt: skip
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    losses = [r["loss"] for r in train]
    finite = all(x is not None and math.isfinite(x) for x in losses)
    steady = train[1:] or train  # the first window holds the start-up
    out = {
        "args": args, "gpus": gpus, "steps": train[-1]["step"], "loss_first": losses[0], "loss_last": losses[-1],
        "finite": finite, "loss_falls": finite and losses[-1] < losses[0],
        "valid_loss": valid[-1]["loss"] if valid else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "tflops": _median(r.get("tflops") for r in steady), "mfu": _median(r.get("mfu") for r in steady),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in train), "padding": _median(r.get("padding") for r in steady),
        "skipped_steps": train[-1].get("skipped_steps"), "loss_scale": train[-1].get("loss_scale"),
    }  # fmt: skip
    if not finite or (not out["loss_falls"] and not a.dry_run):  # a dry run's 4 steps need not lower the loss
        raise PartFailed(out)
    return out


def part_check_cost(a) -> dict:
    """What the divergence checks (training/health.py) cost a step: stage one in bf16 again with
    train.on_divergence=off, beside stage1-bf16's step time (checks on, the default)."""
    off = part_train(a, "structbert", "bf16", ("train.on_divergence=off",), "-nochecks")
    with open(os.path.join(a.work, "runs", "structbert-bf16", "metrics.jsonl")) as f:
        on = [json.loads(line) for line in f]
    steady = [r["step_time_s"] for r in on if r["split"] == "train"][1:]
    on_s = statistics.median(steady) if steady else None
    return {"step_time_s_checks_on": on_s, "step_time_s_checks_off": off["step_time_s"],
            "overhead": None if on_s is None else round(on_s / off["step_time_s"] - 1, 4)}  # fmt: skip


def part_generate(a) -> dict:
    import torch

    run_dir = os.path.join(a.work, "runs", "palm-bf16")
    prompts = os.path.join(a.work, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:  # each prompt a document's first paragraph
        f.write("\n".join(doc.split("\n")[0] for doc in long_and_short_documents(16, seed=1)) + "\n")
    gpus = 1 if a.dry_run else (a.gpus or max(1, torch.cuda.device_count()))
    out = {"gpus": gpus}
    for precision in ("fp32",) if a.dry_run else ("bf16", "fp16"):
        cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(_free_port()), "--module", "pretrain.generate",
               f"run.dir={run_dir}", f"prompts_file={prompts}", "max_new_tokens=64", "batch_size=8",
               f"precision={precision}"]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        began = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(proc.stdout[-LOG_TAIL:], proc.stderr[-LOG_TAIL:], flush=True)
        report = next((line for line in proc.stderr.splitlines() if "peak memory per rank" in line), None)
        out[precision] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - began, 1),
                          "memory": None if report is None else report.split("; ", 1)[1]}  # fmt: skip
        if proc.returncode != 0 or report is None:
            raise PartFailed(out)
    return out


def _stage(a, name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from pretrain.stages import build_stage

    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=[f"stage={name}", f"data.dir={os.path.join(a.work, 'prepared')}",
                                           "run.dir=unused", "train.max_steps=1000", *overrides])  # fmt: skip
    return build_stage(cfg), cfg


class PartFailed(Exception):
    """A part that ran to the end but whose figures fail its check: they are recorded all the same."""

    def __init__(self, result: dict):
        super().__init__(json.dumps(result, default=str)[:2000])
        self.result = result


def _run(cmd: list[str]) -> None:
    """A child command, its output into this part's log; a non-zero exit fails the part."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stdout, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:6])} ...")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

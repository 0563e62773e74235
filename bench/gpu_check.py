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
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

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
# Where FusedAdam could not be built (the ops part failed), the training parts run torch's AdamW instead, and say so.
TORCH_ADAM_ENV = "GPU_CHECK_TORCH_ADAM"
ONE_B = ["model=large", "model.hidden=2048", "model.heads=16", "model.ffn=8192", "model.layers=24"]
TINY = ["model=toy", "model.hidden=64", "model.layers=2", "model.heads=2", "model.ffn=128", "model.decoder_layers=1"]
LOG_TAIL = 6000  # characters of each part's output kept in logs.txt


# ------------------------------------------------------------------------------------------------ the parts


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
        args += ["data.seq_len=64"] if stage == "structbert" else ["palm.src_len=[16,64]", "palm.tgt_len=[16,48]"]
    else:
        args += ["model=base", "train.micro_batch_size=16"] + (["data.seq_len=512"] if stage == "structbert" else [])
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


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def throughput_dims(a, size: str) -> list[str]:
    return (ONE_B if size == "1b" else ["model=base"]) if not a.dry_run else TINY


def part_throughput(a, size: str) -> dict:
    """One ZeRO-3 engine (one GPU, bf16, the trainer's own build_model/initialize) over stage one's real batches;
    activation checkpointing toggled on the built model, the micro-batch grown by powers of two while the peak
    memory, extrapolated from the last two sizes, stays under 90% of the GPU's (an out-of-memory error ends the
    ascent too)."""
    import torch

    from pretrain.training import distributed
    from pretrain.training.engine import build_model, initialize

    dims = throughput_dims(a, size)
    seq = 64 if a.dry_run else 512
    st, cfg = _stage(a, "structbert", *dims, f"data.seq_len={seq}", "deepspeed=zero3_bf16",
                     *(["deepspeed.precision=fp32"] if a.dry_run else []),
                     *(["deepspeed.torch_adam=true"] if a.dry_run or os.environ.get(TORCH_ADAM_ENV) else []))  # fmt: skip
    from pretrain.training.config import batch_geometry, deepspeed_config

    geometry = batch_geometry(cfg.train, 1)
    ds_config = deepspeed_config(cfg, geometry)
    distributed.init(distributed.DistInfo(0, 0, 1), 600)
    engine = initialize(build_model(st.make_model, ds_config, 0), ds_config, 0.01)
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    sizes = [2, 4] if a.dry_run else [8, 16, 32, 64, 128]
    rows = []
    for ckpt in (False, True):
        engine.module.encoder.checkpointing = ckpt
        measured = []
        for micro in sizes:
            if total and len(measured) >= 2:
                (m1, p1), (m2, p2) = measured[-2:]
                if p2 + (p2 - p1) / (m2 - m1) * (micro - m2) > 0.9 * total:
                    break
            try:
                row = _timed_steps(a, st, engine, micro, ckpt)
            except torch.cuda.OutOfMemoryError:
                rows.append({"activation_checkpointing": ckpt, "micro_batch": micro, "oom": True})
                torch.cuda.empty_cache()
                break
            measured.append((micro, row.pop("peak_bytes")))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"model": dims, "seq_len": seq, "params": sum(p.ds_numel for p in engine.module.parameters()), "rows": rows}
    for ckpt in (False, True):
        ok = [r for r in rows if r["activation_checkpointing"] == ckpt and not r.get("oom")]
        if ok:
            out[f"best_{'checkpointed' if ckpt else 'plain'}"] = max(ok, key=lambda r: r["tokens_per_s"])
    if size == "base":
        out["packing"] = _packing_rows(a, st, engine)
        out["host_syncs_per_step"] = _count_syncs(a, st, engine)
    return out


def _batches(a, st, micro: int, count: int, start: int = 0) -> list[dict]:
    from pretrain.training.config import BatchGeometry

    geometry = BatchGeometry(micro, 1, 1)
    st.index(geometry)
    it = iter(st.train_loader(geometry, 0, start))
    return [next(it) for _ in range(count)]


def _timed_steps(a, st, engine, micro: int, ckpt: bool, warmup: int = 2, timed: int = 6) -> dict:
    """Training steps (forward, backward, the ZeRO-3 optimizer step) at one micro-batch size, timed after warm-up."""
    from dataclasses import replace

    import torch

    from pretrain.training import flops
    from pretrain.training.engine import to_device

    if a.dry_run:
        warmup, timed = 1, 2
    batches = _batches(a, st, micro, warmup + timed)
    model_cfg = replace(st.model_cfg, activation_checkpointing=ckpt)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i, b in enumerate(batches):
        if i == warmup:
            _sync()
            start = time.perf_counter()
        loss, _ = engine(to_device(b, engine.device), st.weights)
        engine.backward(loss)
        engine.step()
    _sync()
    seconds = time.perf_counter() - start
    measured = batches[warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in measured)
    model_flops = sum(flops.structbert_train_flops(model_cfg, b) for b in measured)
    peak = flops.peak_tflops(None)
    tflops = model_flops / seconds / 1e12
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"activation_checkpointing": ckpt, "micro_batch": micro, "tokens_per_s": round(tokens / seconds),
            "step_s": round(seconds / timed, 4), "tflops": float(f"{tflops:.4g}"), "mfu": round(tflops / peak, 3) if peak else None,
            "peak_mem_gb": round(peak_bytes / 2**30, 2), "padding": round(1 - tokens / sum(b["attention_mask"].numel()
            for b in measured), 3), "peak_bytes": peak_bytes}  # fmt: skip


def _packing_rows(a, st, engine) -> list[dict]:
    """The same steps with the position-wise work on real tokens only (model.unpad=true) and on every slot (false)."""
    micro = 4 if a.dry_run else 32
    engine.module.encoder.checkpointing = False
    rows = []
    for unpad in (True, False, True):  # on, off, on again: a drift of the device's clocks shows as on != on
        engine.module.encoder.unpad = unpad
        row = _timed_steps(a, st, engine, micro, False)
        row.pop("peak_bytes")
        rows.append({"unpad": unpad, **row})
    engine.module.encoder.unpad = None
    return rows


def _count_syncs(a, st, engine) -> int | None:
    """Host syncs of one training step (ours and DeepSpeed's), counted by torch's CUDA sync debug mode."""
    import warnings

    import torch

    from pretrain.training.engine import to_device

    if not torch.cuda.is_available():
        return None
    b = _batches(a, st, 8, 1)[0]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss, _ = engine(to_device(b, engine.device), st.weights)
            engine.backward(loss)
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def part_peer(a) -> dict:
    """bench/speed.py's stage-one comparison on the GPU: the same batches, each side's forward, backward and fused
    AdamW step under bf16 autocast, in interleaved rounds; the ratio is the median of the per-round ratios."""
    from dataclasses import replace

    import torch
    from transformers import BertConfig, BertForPreTraining

    from bench.speed import ab_rounds, bert_pretraining_inputs
    from pretrain.models.structbert import StructBert

    dims = TINY if a.dry_run else ["model=base"]
    st, _ = _stage(a, "structbert", *dims, f"data.seq_len={64 if a.dry_run else 512}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    micro, count = (4, 2) if a.dry_run else (16, 4)
    inputs = _batches(a, st, micro, count)
    c = st.model_cfg
    torch.manual_seed(0)
    ours = StructBert(replace(c, dropout=0.1, attn_dropout=0.1)).to(device)
    peer = BertForPreTraining(BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.ffn, max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")).to(device)  # fmt: skip
    from pretrain.training.engine import to_device

    ours_in = [to_device(b, device) for b in inputs]
    peer_in = [{k: v.to(device) for k, v in bert_pretraining_inputs(b).items()} for b in inputs]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def steps(model, loss_of, xs):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        model.train()

        def run():
            for x in xs:
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    loss = loss_of(model, x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync()

        return run

    timing = ab_rounds(steps(ours, lambda m, x: m(x, st.weights)[0], ours_in), steps(peer, lambda m, x: m(**x).loss, peer_in),
                       2 if a.dry_run else 5)  # fmt: skip
    tokens = sum(int(b["attention_mask"].sum()) for b in inputs)
    return {"model": dims, "micro_batch": micro, "batches_per_round": count, "dtype": str(dtype),
            "tokens_per_s_ours": round(tokens / timing["s_ours"]), "tokens_per_s_peer": round(tokens / timing["s_peer"]),
            "ratio": round(timing["ratio"], 3),
            "padding": round(1 - tokens / sum(b["attention_mask"].numel() for b in inputs), 3)}  # fmt: skip


def _stage(a, name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from pretrain.stages import build_stage

    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=[f"stage={name}", f"data.dir={os.path.join(a.work, 'prepared')}",
                                           "run.dir=unused", "train.max_steps=1000", *overrides])  # fmt: skip
    return build_stage(cfg), cfg


RUNNERS = {
    "env": part_env, "ops": part_ops, "corpus": part_corpus, "tests": part_tests,
    "stage1-bf16": lambda a: part_train(a, "structbert", "bf16"), "stage1-fp16": lambda a: part_train(a, "structbert", "fp16"),
    "stage2-bf16": lambda a: part_train(a, "palm", "bf16"), "stage2-fp16": lambda a: part_train(a, "palm", "fp16"),
    "generate": part_generate, "check-cost": part_check_cost,
    "throughput-1b": lambda a: part_throughput(a, "1b"), "throughput-base": lambda a: part_throughput(a, "base"),
    "peer": part_peer,
}  # fmt: skip


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

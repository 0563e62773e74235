"""Seconds per greedy `generate` of the exported PALM class (pretrain/hf/modeling_plug_palm.py) with and without its key/value
cache, at the demo's toy dims and at base dims, random weights, on the CPU (or what torch sees first).

    python bench/hf_cache.py [--threads N] [--dims toy,base] [--tokens 64,256] [--batch 1,4] [--repeats 3]
                             [--once-above 20] [--max-time 120] [--src-len 64]

The dims are conf/model/<dims>.yaml's; the vocab is the demo's (5,391 WordPiece tokens padded to 5,392) for toy
and PLUG's (21,504) for base. Each generate makes exactly --tokens new tokens (min_new_tokens = max_new_tokens,
so eos cannot end it early) from a random source of --src-len tokens per row. Every (dims, batch) pair is warmed
up first with a short generate each way; a cell is then the median of --repeats runs, or of one where the first
run took over --once-above seconds. An uncached run is stopped by generate's own max_time after --max-time seconds:
its cell then reads ">T (k/N)", k new tokens made of N, and its speed-up is a lower bound. The last column says
whether both ways gave the same tokens (when neither was stopped). Prints figures only; nothing about speed is
asserted.

On a machine whose cores other work also uses, --threads 1 gives steadier figures: with every core's thread in
each op, an op waits for the most delayed one (on 2 shared cores at load 5, all threads ran 4-80x slower).
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's pretrain

from pretrain.hf import modeling_plug_palm as hf_palm  # noqa: E402

VOCAB = {"toy": 5392, "base": 21504}  # the demo's prepared vocab padded to 8; PLUG's, padded


def build(dims: str) -> tuple[hf_palm.PlugPalmForConditionalGeneration, str]:
    with open(os.path.join(ROOT, "conf", "model", f"{dims}.yaml")) as f:
        m = yaml.safe_load(f)
    cfg = hf_palm.PlugPalmConfig(
        vocab_size=VOCAB[dims], hidden_size=m["hidden"], num_hidden_layers=m["layers"],
        num_decoder_layers=m["decoder_layers"], num_attention_heads=m["heads"], intermediate_size=m["ffn"],
        max_position_embeddings=m["max_positions"], type_vocab_size=m["type_vocab"], layer_norm_eps=m["ln_eps"],
        pre_ln=m["pre_ln"], embedding_norm=m["embedding_norm"], pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = hf_palm.PlugPalmForConditionalGeneration(cfg).eval()
    label = f"{dims} {m['hidden']}x{m['layers']}+{m['decoder_layers']}, V {VOCAB[dims]}"
    return model, label


def timed(model, src, new: int, use_cache: bool, max_time: float | None) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, num_beams=1, use_cache=use_cache, max_time=max_time)  # fmt: skip
    return time.perf_counter() - start, out


def cell(model, src, new, use_cache, args) -> tuple[float, int, torch.Tensor, int]:
    """Median seconds, runs, the last output, and its new tokens (fewer than new if max_time stopped it)."""
    max_time = None if use_cache else args.max_time
    seconds, out = [], None
    for _ in range(args.repeats):
        s, out = timed(model, src, new, use_cache, max_time)
        seconds.append(s)
        if s > args.once_above or out.shape[1] - 1 < new:
            break
    return statistics.median(seconds), len(seconds), out, out.shape[1] - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--dims", default="toy,base")
    p.add_argument("--tokens", default="64,256")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--once-above", type=float, default=20.0, help="one run only where the first took longer (s)")
    p.add_argument("--max-time", type=float, default=120.0, help="stop an uncached generate after this long (s)")
    p.add_argument("--src-len", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  python bench/hf_cache.py {' '.join(sys.argv[1:])}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads "
          f"of {os.cpu_count()} cores, {platform.processor() or platform.machine()}; greedy, source {args.src_len} tokens")  # fmt: skip
    print("| dims | new tokens | batch | uncached s | cached s | speed-up | runs (u/c) | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    began = time.perf_counter()
    for dims in args.dims.split(","):
        model, label = build(dims)
        for batch in (int(b) for b in args.batch.split(",")):
            src = torch.randint(5, model.config.vocab_size, (batch, args.src_len), generator=torch.Generator().manual_seed(1))
            for use_cache in (False, True):  # warm-up: allocator, thread pool, the dynamic module's first calls
                timed(model, src, 4, use_cache, None)
            for new in (int(n) for n in args.tokens.split(",")):
                u, un, u_out, u_new = cell(model, src, new, False, args)
                c, cn, c_out, _ = cell(model, src, new, True, args)
                stopped = u_new < new
                uncached = f">{u:.1f} ({u_new}/{new})" if stopped else f"{u:.2f}"
                speedup = f">{u / c:.1f}x" if stopped else f"{u / c:.1f}x"
                same = "n/a (stopped)" if stopped else ("yes" if torch.equal(u_out, c_out) else "NO")
                print(f"| {label} | {new} | {batch} | {uncached} | {c:.2f} | {speedup} | {un}/{cn} | {same} |", flush=True)
        del model
    print(f"# total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

"""Training start-up against corpus size: time to the first step and each rank's peak memory, for corpora of
0.1B and 1B tokens synthesised from a prepared corpus (its sentences drawn at random into documents of varied
length), with this checkout and, optionally, another revision of the code for comparison.

    python bench/data_scale.py --source data/demo/prepared --work /tmp/data_scale [--tokens 0.1e9 1e9]
        [--old-rev 75a8aba] [--keep]

Each run is a real 2-rank `deepspeed` launch of stage one (toy model, seq_len 128) for 2 steps. This checkout
runs twice per corpus: "cold" (the index cache is built by the local rank 0 first) and "warm" (it is there, as on
every resume). Peak memory is read from /proc for every rank process while it runs: VmHWM (resident high-water
mark, memory-mapped corpus pages included, which the page cache shares between the ranks) and the peak of
RssAnon (the rank's private memory: what the ranks of a node cannot share).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pretrain.data.indexed import _CODES, _HEADER, MAGIC, VERSION, IndexedCorpus  # noqa: E402

BLOCK_SENTENCES = 1 << 20


def synthesize(source: str, out: str, tokens: float, seed: int = 0) -> dict:
    """A prepared corpus of about `tokens` train tokens: sentences of `source`'s train split drawn at random, in
    documents of 1 to ~300 sentences (log-normal), and `source`'s own valid split and vocab."""
    corpus = IndexedCorpus.open(os.path.join(source, "train"))
    sent_start = np.asarray(corpus.sent_offsets[:-1], dtype=np.int64)
    sent_len = np.diff(np.asarray(corpus.sent_offsets, dtype=np.int64))
    tok, ws = np.asarray(corpus.tokens), np.asarray(corpus.word_start)
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    tmp_sent, tmp_ws = os.path.join(out, "sent.tmp"), os.path.join(out, "ws.tmp")
    n_tok = n_sent = 0
    doc_offsets = [np.zeros(1, np.int64)]
    with open(os.path.join(out, "train.bin"), "wb") as fbin, open(tmp_sent, "wb") as fsent, open(tmp_ws, "wb") as fws:
        fsent.write(np.zeros(1, "<i8").tobytes())
        while n_tok < tokens:
            ids = rng.integers(0, len(sent_len), BLOCK_SENTENCES)
            lens = sent_len[ids]
            keep = np.searchsorted(np.cumsum(lens), tokens - n_tok) + 1  # stop at the target
            ids, lens = ids[:keep], lens[:keep]
            ends = np.cumsum(lens)
            gather = np.repeat(sent_start[ids] - (ends - lens), lens) + np.arange(ends[-1])
            fbin.write(tok[gather].astype(corpus.tokens.dtype).tobytes())
            fws.write(ws[gather].astype(np.uint8).tobytes())
            fsent.write((n_tok + ends).astype("<i8").tobytes())
            doc_sizes = np.maximum(1, rng.lognormal(2.5, 1.0, len(ids) // 4 + 2).astype(np.int64))
            cuts = np.cumsum(doc_sizes)
            cuts = np.append(cuts[cuts < len(ids)], len(ids))
            doc_offsets.append(n_sent + cuts)
            n_tok, n_sent = n_tok + int(ends[-1]), n_sent + len(ids)
    doc_offsets = np.concatenate(doc_offsets).astype("<i8")
    with open(os.path.join(out, "train.idx"), "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, _CODES[np.dtype(corpus.tokens.dtype)], n_tok, n_sent, len(doc_offsets) - 1))
        for part in (tmp_sent,):
            with open(part, "rb") as g:
                shutil.copyfileobj(g, f, 1 << 24)
        f.write(doc_offsets.tobytes())
        with open(tmp_ws, "rb") as g:
            shutil.copyfileobj(g, f, 1 << 24)
    os.remove(tmp_sent), os.remove(tmp_ws)
    for name in ("valid.bin", "valid.idx", "vocab.txt"):
        shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    with open(os.path.join(source, "meta.json")) as f:
        meta = json.load(f)
    meta["splits"]["train"] = {"documents": len(doc_offsets) - 1, "sentences": n_sent, "tokens": n_tok,
                               "single_sentence_documents": int((np.diff(doc_offsets) == 1).sum())}  # fmt: skip
    meta["inputs"] = [f"synthesised from {source} by bench/data_scale.py (seed {seed})"]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    IndexedCorpus.open(os.path.join(out, "train"))  # the sizes check out
    return meta["splits"]["train"]


def _rank_pids(launcher_pid: int) -> list[int]:
    """The launcher's descendants that run pretrain.train (the ranks)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    cmd = f.read()
                if b"pretrain.train" in cmd and b"--local_rank" in cmd and pid not in out:  # not a loader worker
                    out.append(child)
            except OSError:
                pass
    return out


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def start_up(repo: str, data_dir: str, run_dir: str) -> dict:
    """Launch 2 ranks of stage one on `data_dir` with the code of `repo`; seconds to the first train row in
    metrics.jsonl, and the ranks' peak VmHWM and RssAnon (MiB)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["deepspeed", "--num_gpus", "2", f"--master_port={port}", "--module", "pretrain.train", "model=toy",
           f"data.dir={data_dir}", f"run.dir={run_dir}", "stage.seq_len=128", "train.micro_batch_size=8",
           "train.max_steps=2", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
           "logger.progress=false", "logger.wandb.mode=disabled", "data.num_workers=1"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=repo)  # the code of `repo`, whatever is installed
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm: dict[int, int] = {}
    anon: dict[int, int] = {}
    first_step = None
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while proc.poll() is None:
        for pid in _rank_pids(proc.pid):
            try:
                hwm[pid] = max(hwm.get(pid, 0), _status_kb(pid, "VmHWM"))
                anon[pid] = max(anon.get(pid, 0), _status_kb(pid, "RssAnon"))
            except OSError:
                pass
        if first_step is None and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"run failed (rc {proc.returncode}):\n{err[-3000:]}")
    return {"first_step_s": first_step, "total_s": time.perf_counter() - start,
            "peak_hwm_mib": max(hwm.values()) / 1024, "peak_anon_mib": max(anon.values()) / 1024, "ranks": len(hwm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=os.path.join(REPO, "data/demo/prepared"))
    ap.add_argument("--work", default="/tmp/data_scale")
    ap.add_argument("--tokens", type=float, nargs="+", default=[0.1e9, 1e9])
    ap.add_argument("--old-rev", default=None, help="also run this git revision (e.g. the commit before the cache)")
    ap.add_argument("--keep", action="store_true", help="keep the synthesised corpora")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    old = None
    if args.old_rev:
        old = os.path.join(args.work, "old-code")
        if not os.path.isdir(old):
            subprocess.run(["git", "worktree", "add", "--detach", old, args.old_rev], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
    rows = []
    try:
        for tokens in args.tokens:
            data = os.path.join(args.work, f"corpus-{tokens:.0e}")
            t0 = time.perf_counter()
            if os.path.isfile(os.path.join(data, "meta.json")):  # kept from an earlier --keep run
                with open(os.path.join(data, "meta.json")) as f:
                    counts = json.load(f)["splits"]["train"]
                shutil.rmtree(os.path.join(data, "index"), ignore_errors=True)  # so that "cold" is cold
            else:
                counts = synthesize(args.source, data, tokens)
            print(f"synthesised {data}: {counts['tokens']:,} tokens, {counts['sentences']:,} sentences, "
                  f"{counts['documents']:,} documents in {time.perf_counter() - t0:.0f}s", flush=True)
            runs = [("this checkout, cold", REPO), ("this checkout, warm", REPO)]
            if old:
                runs.append((f"{args.old_rev}", old))
            for label, repo in runs:
                r = start_up(repo, data, os.path.join(args.work, "run"))
                rows.append((f"{counts['tokens'] / 1e9:.1f}B", label, r))
                print(f"  {label:24s} first step {r['first_step_s']:6.1f}s  peak VmHWM {r['peak_hwm_mib']:7.0f} MiB"
                      f"  peak RssAnon {r['peak_anon_mib']:7.0f} MiB  per rank ({r['ranks']} ranks)", flush=True)
            if not args.keep:
                shutil.rmtree(data)
    finally:
        if old:
            subprocess.run(["git", "worktree", "remove", "--force", old], cwd=REPO, capture_output=True)
    print("\n| corpus | code | time to first step (s) | peak VmHWM per rank (MiB) | peak RssAnon per rank (MiB) |")
    print("|---|---|---|---|---|")
    for size, label, r in rows:
        print(f"| {size} | {label} | {r['first_step_s']:.1f} | {r['peak_hwm_mib']:.0f} | {r['peak_anon_mib']:.0f} |")


if __name__ == "__main__":
    main()

"""Throughput and memory of `python -m pretrain.prepare` on a large corpus, with 1 and with 2 workers, per segmenter.

    python bench/prepare_scale.py [--gb 2] [--work /tmp/prepare_scale] [--workers 1 2] [--segmenters jieba rjieba] [--keep]

It writes a corpus of --gb gigabytes (.txt files of 256 MB): the demo corpus's sentences (data/demo/raw, else the
tests' synthetic stories), shuffled into documents of 1 to 8 paragraphs of 1 to 6 sentences. It builds the vocab
once (python -m pretrain.vocab, timed apart), then prepares the corpus with that vocab for each segmenter and worker
count, printing MB/s of raw text, MB/s per core (the CPU seconds of all its processes), what 1 TB would cost in
core-hours at that rate, the peak RSS (VmHWM) of the main process and of each worker, and the scaling. Last, a
profile of a small sample says where a worker's time goes. Everything it wrote is deleted unless --keep.
Run it on an otherwise idle machine: the load average is printed beside each figure.
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

FILE_BYTES = 256 << 20


def sentences_to_draw_from() -> list[str]:
    from pretrain.data.corpus import iter_input_files, iter_paragraphs, split_sentences

    raw = os.path.join(REPO, "data", "demo", "raw")
    if os.path.isdir(raw):
        paragraphs = [p for _, p in iter_paragraphs(iter_input_files(raw))]
    else:
        from synthetic import synthetic_documents

        paragraphs = ["".join(p) for doc in synthetic_documents(2000, seed=0) for p in doc]
    return [s for p in paragraphs for s in split_sentences(p)]


def write_corpus(root: str, gb: float, seed: int = 0) -> int:
    """Shuffled sentences in documents of varied length, about `gb` GB in 256 MB .txt files; returns the bytes."""
    rng = random.Random(seed)
    os.makedirs(root)
    total, target = 0, int(gb * (1 << 30))
    while total < target:
        path = os.path.join(root, f"part-{len(os.listdir(root)):04d}.txt")
        total += write_corpus_file(path, min(FILE_BYTES, target - total), rng)
    return total


def write_corpus_file(path: str, size: int, rng: random.Random) -> int:
    pool = _pool()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            doc = "\n".join("".join(rng.choices(pool, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 8)))
            f.write(doc + "\n\n")
            written += len(doc.encode("utf-8")) + 2
    return written


_POOL: list[str] = []


def _pool() -> list[str]:
    if not _POOL:
        _POOL.extend(sentences_to_draw_from())
    return _POOL


def _status(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    hwm = int(status.get("VmHWM", "0 kB").split()[0]) / 1024
    return {"hwm_mb": hwm, "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def run_measured(argv: list[str]) -> dict:
    """Run a command, polling the peak RSS and CPU time of it and of its children; returns the figures."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, dict] = {}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for pid in [proc.pid] + _children(proc.pid):
                figures = _status(pid)
                if figures:
                    seen[pid] = figures
            done.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate()
    done.set()
    poller.join()
    if proc.returncode != 0:
        sys.exit(f"prepare_scale: {' '.join(argv)} failed:\n{err}")
    main = seen.pop(proc.pid, {"hwm_mb": 0.0, "cpu_s": 0.0})
    return {"seconds": time.perf_counter() - start, "main": main, "workers": list(seen.values()), "load": load,
            "stdout": out}


def profile_sample(vocab: str, scratch: str, segmenter_name: str, sample_bytes: int = 8 << 20) -> None:
    """Where the time goes, stage by stage, on `sample_bytes` of the same kind of text, in this one process."""
    from pretrain.data.corpus import iter_paragraphs, sentence_spans
    from pretrain.data.tokenizer import Tokenizer, count_words, encode_paragraphs, segmenter
    from pretrain.data.wordpiece import SentenceEncoder
    from pretrain.prepare import _chunks

    sample = os.path.join(scratch, "sample.txt")
    os.makedirs(scratch, exist_ok=True)
    write_corpus_file(sample, sample_bytes, random.Random(1))
    tok, segment = Tokenizer(vocab), segmenter(segmenter_name)
    clock = time.perf_counter
    spent = dict.fromkeys(["read", "split", "segment", "encode", "encode_paragraphs", "pickle", "write", "vocab"], 0.0)

    start = clock()
    chunks = [texts for _, texts in _chunks(iter_paragraphs([sample]))]
    spent["read"] = clock() - start

    def cut(paragraph):
        start = clock()
        words = segment(paragraph)
        spent["segment"] += clock() - start
        return words

    untimed = SentenceEncoder.encode

    def timed(self, text, spans):  # what encode_paragraphs calls, timed
        start = clock()
        tokens = untimed(self, text, spans)
        spent["encode"] += clock() - start
        return tokens

    SentenceEncoder.encode = timed
    start = clock()
    encoded = [encode_paragraphs(tok, texts, cut) for texts in chunks]
    spent["encode_paragraphs"] = clock() - start
    SentenceEncoder.encode = untimed
    start = clock()
    for texts in chunks:
        for p in texts:
            sentence_spans(p)
    spent["split"] = clock() - start
    spent.update(time_main_process(encoded, tok.vocab_size, scratch))
    start = clock()
    count_words(p[b:e] for texts in chunks for p in texts for b, e in sentence_spans(p))
    spent["vocab"] = clock() - start

    print_profile(spent, os.path.getsize(sample) / 1e6, segmenter_name)


def time_main_process(encoded: list, vocab_size: int, scratch: str) -> dict:
    """Seconds of the main process's part: the workers' results through a pipe (pickle), and writing them."""
    import pickle

    import numpy as np

    from pretrain.data.indexed import IndexedWriter

    start = time.perf_counter()
    for enc in encoded:
        pickle.loads(pickle.dumps(enc._replace(ids=enc.ids.astype(np.uint16)), protocol=pickle.HIGHEST_PROTOCOL))
    spent = {"pickle": time.perf_counter() - start}
    start = time.perf_counter()
    writer = IndexedWriter(os.path.join(scratch, "train"), vocab_size)
    for enc in encoded:
        writer.add_sentences(enc.ids.astype(np.uint16), enc.word_start, enc.sentence_tokens)
        writer.end_document()
    writer.close()
    spent["write"] = time.perf_counter() - start
    return spent


def print_profile(spent: dict, mb: float, segmenter_name: str) -> None:
    """profile_sample's seconds per stage, as shares of the whole and MB/s on one core."""
    rest = spent["encode_paragraphs"] - spent["segment"] - spent["encode"] - spent["split"]
    worker = [("sentence splitting", spent["split"]), (f"{segmenter_name}, one cut per paragraph", spent["segment"]),
              ("WordPiece (wordpiece.SentenceEncoder)", spent["encode"]), ("word starts and flat arrays", rest)]
    main_process = [("reading and chunking", spent["read"]), ("results through a pipe (pickle)", spent["pickle"]),
                    ("writing .bin/.idx", spent["write"])]
    total = sum(seconds for _, seconds in worker + main_process)
    print(f"\nwhere the time goes on a {mb:.1f} MB sample, one process, segmenter={segmenter_name} (seconds, share of all):")
    for title, stages in (("worker", worker), ("main process", main_process)):
        print(f"  {title}:")
        for name, seconds in stages:
            print(f"    {name:38s} {seconds:6.2f} s  {100 * seconds / total:5.1f}%")
    print(f"  total {total:.2f} s = {mb / total:.2f} MB/s on one core; the main process's share bounds the scaling")
    print(f"  (vocab word counting, the first pass without vocab=: {spent['vocab']:.2f} s, {mb / spent['vocab']:.1f} MB/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="corpus size in GB (default 2)")
    ap.add_argument("--work", default="/tmp/prepare_scale", help="scratch directory, deleted at the end")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--segmenters", nargs="+", default=["jieba", "rjieba"], help="prepare's segmenter= values to time")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and the prepared directories")
    args = ap.parse_args()
    if os.path.exists(args.work):
        sys.exit(f"prepare_scale: {args.work} exists: remove it or pass another --work")
    raw, vocab = os.path.join(args.work, "raw"), os.path.join(args.work, "vocab.txt")
    try:
        start = time.perf_counter()
        size = write_corpus(raw, args.gb)
        mb = size / 1e6
        print(f"corpus: {mb:.0f} MB in {len(os.listdir(raw))} files, written in {time.perf_counter() - start:.0f} s")
        vocab_run = run_measured([sys.executable, "-m", "pretrain.vocab", f"input={raw}", f"out={vocab}",
                                  f"workers={max(args.workers)}"])
        print(f"vocab: {vocab_run['seconds']:.0f} s with {max(args.workers)} workers ({mb / vocab_run['seconds']:.1f} MB/s,"
              f" load {vocab_run['load']:.1f}): {vocab_run['stdout'].strip()}")
        for name in args.segmenters:
            rates = {}
            for workers in args.workers:
                out = os.path.join(args.work, f"prepared-{name}-{workers}")
                r = run_measured([sys.executable, "-m", "pretrain.prepare", f"input={raw}", f"out={out}",
                                  f"vocab={vocab}", f"workers={workers}", f"segmenter={name}"])  # fmt: skip
                rates[workers] = mb / r["seconds"]
                peaks = ", ".join(f"{w['hwm_mb']:.0f}" for w in r["workers"]) or "none (in-process)"
                worker_cpu = sum(w["cpu_s"] for w in r["workers"])
                cpu = r["main"]["cpu_s"] + worker_cpu
                cores = cpu / r["seconds"]  # below `workers`: other load took cores
                print(f"segmenter={name} workers={workers}: {r['seconds']:.0f} s, {rates[workers]:.2f} MB/s, "
                      f"{mb / cpu:.2f} MB/s per core, 1 TB in {1e6 / (mb / cpu) / 3600:.0f} core-hours (load "
                      f"{r['load']:.1f} at start); peak RSS main {r['main']['hwm_mb']:.0f} MB, workers {peaks} MB; "
                      f"CPU main {r['main']['cpu_s']:.0f} s, workers {worker_cpu:.0f} s ({cores:.2f} cores busy)")  # fmt: skip
                if not args.keep:
                    shutil.rmtree(out)
            for workers in sorted(rates):
                if workers > 1 and 1 in rates:
                    print(f"segmenter={name} scaling: {workers} workers / 1 = {rates[workers] / rates[1]:.2f}x")
        for name in args.segmenters:
            profile_sample(vocab, os.path.join(args.work, f"profile-{name}"), name)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

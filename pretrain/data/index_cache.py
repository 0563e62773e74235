"""The datasets' derived arrays (units, chunks, document orders, epoch permutations), computed once per prepared
corpus and setting and memory-mapped by every rank, so that a rank's start-up time and private memory do not grow
with the corpus.

The arrays live beside the corpus, in `<data dir>/index/<split>/<name>/*.npy`. They are a cache in the strict
sense: what is read back is exactly what would be computed, so a dataset built without them (tests, tools, a
corpus never indexed) gives the same samples. Only code run inside `writing()` writes them (the trainer's local
rank 0, before the other ranks build their datasets); elsewhere a missing entry is computed in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Callable

import numpy as np

_writing = False
_STAMP = "corpus.json"  # the corpus counts an entry was computed from: a re-prepared corpus is never misread
# The builders' format: raise it whenever a builder (spans.py, structbert.py, palm.py, sampling.py) changes what it
# computes. An entry stamped with another format is computed afresh (and, inside writing(), replaced), never read.
FORMAT_VERSION = 1


@contextlib.contextmanager
def writing():
    """Within it, entries that are missing are computed and stored."""
    global _writing
    previous, _writing = _writing, True
    try:
        yield
    finally:
        _writing = previous


def _entry_dir(corpus, name: str) -> str | None:
    if corpus.prefix is None:
        return None
    directory, split = os.path.split(corpus.prefix)
    return os.path.join(directory, "index", split, name)


def _stamp(corpus) -> dict:
    return {"format": FORMAT_VERSION, "tokens": corpus.num_tokens, "sentences": corpus.num_sents,
            "documents": corpus.num_docs}  # fmt: skip


def arrays(corpus, name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `build()` returns for `corpus`: memory-mapped when the corpus's index holds entry `name`,
    else computed (and stored, inside `writing()`)."""
    entry = _entry_dir(corpus, name)
    if entry is not None and os.path.isfile(os.path.join(entry, _STAMP)):
        with open(os.path.join(entry, _STAMP)) as f:
            if json.load(f) == _stamp(corpus):
                names = [n[: -len(".npy")] for n in os.listdir(entry) if n.endswith(".npy")]
                return {n: np.load(os.path.join(entry, n + ".npy"), mmap_mode="r") for n in names}
    out = build()
    if entry is not None and _writing:
        try:
            _store(entry, out, _stamp(corpus))
        except OSError as e:  # a read-only data directory: every rank computes the arrays, as without the cache
            print(f"pretrain: cannot cache {entry} ({e.strerror}); each rank computes it", file=sys.stderr)
    return out


def _store(entry: str, out: dict[str, np.ndarray], stamp: dict) -> None:
    """Written beside and renamed into place: a reader sees a whole entry or none. Two writers (two nodes on one
    file system) write the same bytes; the second rename finds the first's entry and its copy is dropped."""
    tmp = f"{entry}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        for key, value in out.items():
            np.save(os.path.join(tmp, key + ".npy"), np.ascontiguousarray(value))
        with open(os.path.join(tmp, _STAMP), "w") as f:
            json.dump(stamp, f)
        if os.path.isdir(entry):  # a stale entry (the corpus was re-prepared in place)
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, _STAMP)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

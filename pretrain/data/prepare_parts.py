"""prepare's parts that need no process pool: which input files a shard prepares, which documents are held out,
and what each worker does with a chunk of paragraphs (count their words, or encode them). The workers' state is
set once per process by init_worker (multiprocessing's initializer)."""
from __future__ import annotations

import heapq
import os
import random
from collections import Counter
from typing import Callable

import numpy as np

from pretrain.data.corpus import split_sentences
from pretrain.data.indexed import token_dtype
from pretrain.data.tokenizer import Tokenizer, count_words, encode_paragraphs, segmenter
from pretrain.errors import UserError


def shard_files(files: list[str], shard: int, num_shards: int) -> list[str]:
    """The files (sorted, as iter_input_files gives them) of shard `shard` of `num_shards`: largest first, each
    file goes to the shard with the fewest bytes so far (then the fewest files, then the lowest number)."""
    if num_shards == 1:
        return files
    sizes = {}
    for path in files:
        try:
            sizes[path] = os.path.getsize(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
    shards = [(0, 0, i) for i in range(num_shards)]  # a heap of (bytes, files, shard)
    owner = {}
    for path in sorted(files, key=lambda p: (-sizes[p], p)):
        size, count, i = heapq.heappop(shards)
        owner[path] = i
        heapq.heappush(shards, (size + sizes[path], count + 1, i))
    return [path for path in files if owner[path] == shard]


def valid_documents(num_docs: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random choice of round(valid_fraction * num_docs) documents, at least one,
    never all."""
    if valid_fraction <= 0 or num_docs < 2:
        return np.zeros(0, dtype=np.int64)
    n = min(max(1, round(valid_fraction * num_docs)), num_docs - 1)
    return np.sort(np.array(random.Random(seed).sample(range(num_docs), n), dtype=np.int64))


_worker_tok: Tokenizer | None = None
_worker_convert: Callable[[str], str] | None = None
_worker_segment: Callable[[str], list[str]] | None = None


def init_worker(vocab_path: str | None, to_simplified: bool = False, segmenter_name: str = "jieba") -> None:
    """A worker's tokenizer and segmenter (when it encodes) and the Traditional-to-Simplified converter (when
    asked): conversion runs in the workers, not in the process that reads the input."""
    global _worker_tok, _worker_convert, _worker_segment
    _worker_tok = Tokenizer(vocab_path) if vocab_path is not None else None
    _worker_convert = simplified_converter() if to_simplified else None
    _worker_segment = segmenter(segmenter_name) if vocab_path is not None else None


def simplified_converter() -> Callable[[str], str]:
    try:
        import opencc  # opencc: only for to_simplified=true
    except ImportError:
        raise UserError("to_simplified=true needs OpenCC: pip install opencc") from None
    return opencc.OpenCC("t2s").convert


def _converted(paragraphs: list[str]) -> list[str]:
    return paragraphs if _worker_convert is None else [_worker_convert(p) for p in paragraphs]


def encode_chunk(paragraphs: list[str]):
    enc = encode_paragraphs(_worker_tok, _converted(paragraphs), _worker_segment)
    return enc._replace(ids=enc.ids.astype(token_dtype(_worker_tok.vocab_size)))  # uint16: half the bytes to send


def count_chunk_words(paragraphs: list[str]) -> Counter[str]:
    return count_words(s for p in _converted(paragraphs) for s in split_sentences(p))

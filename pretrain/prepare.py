"""Raw text -> prepared corpus: vocab.txt, {train,valid}.{bin,idx} and meta.json in one directory.

    python -m pretrain.prepare input=<file|dir|glob> out=<dir> [vocab=<vocab.txt>] [vocab_size=8000]
        [workers=1] [valid_fraction=0.01] [seed=1234] [on_error=raise|skip] [max_line_bytes=1000000]
        [text_key=text] [to_simplified=false] [segmenter=jieba|rjieba] [shard=0 num_shards=1] [overwrite=false]

The input: .txt, .jsonl or .parquet files, .txt and .jsonl also compressed (.gz, .bz2, .xz, .zst), read as they lie
(pretrain/data/input_files.py); text_key= names the text's field or column. to_simplified=true converts Traditional
Chinese to Simplified (OpenCC's t2s) before segmentation, for a corpus that mixes them; meta.json records it.

The output is a function of the input and these settings only (never of `workers`), and it appears at
`out` all at once: it is written to a temporary directory beside it and renamed at the end.

The input is streamed, twice: a first pass counts the documents (the valid split is drawn from that count) and,
without vocab=, the words the vocab is built from; the second encodes. Memory does not grow with the input: the
main process holds a few chunks of text per worker in flight, a worker one chunk and jieba's dictionary.

On many machines: build one vocab (python -m pretrain.vocab), then prepare each shard with vocab=<it> shard=<i>
num_shards=<N> (launch/slurm/prepare.sbatch runs them as a job array). The input files are dealt to the shards
by size: largest first, each to the shard with the fewest bytes so far. A shard is a complete prepared corpus
of its files, split into train and valid by the same rule as the whole would be.
"""
from __future__ import annotations

import heapq
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
from omegaconf import MISSING, OmegaConf

from pretrain.cli import parse
from pretrain.data.corpus import bounded_pieces, iter_input_files, iter_paragraphs, split_sentences
from pretrain.data.indexed import IndexedWriter, token_dtype
from pretrain.data.tokenizer import (
    SPECIAL_TOKENS, Tokenizer, check_segmenter, count_words, encode_paragraphs, segmenter, segmenter_version, vocab_sha256,
    write_vocab,
)  # fmt: skip
from pretrain.errors import UserError, exit_on_user_error

FORMAT_VERSION = 1
SPLITS = ("train", "valid")
_CHUNK_CHARS = 1 << 16  # characters per task sent to a worker (a document may be cut between tasks)
# A longer paragraph goes to the workers in pieces of at most this many characters, cut between sentences (see
# bounded_pieces): what a worker holds for one task (its text, jieba's words, the tokenizer's encodings, several
# hundred bytes per character) must not grow with the longest line.
_PIECE_CHARS = 1 << 16
_IN_FLIGHT = 3  # tasks per worker submitted and not yet written: enough to keep every worker busy
UNKNOWN_TOP = 20  # meta.json's most frequent texts that became [UNK]
UNKNOWN_WARN = 0.001  # a share of [UNK] tokens above it is worth a warning (bert-base-chinese leaves “ and ” out)


@dataclass
class PrepareConfig:
    input: str = MISSING
    out: str = MISSING
    vocab: Optional[str] = None  # an existing vocab.txt; built from the corpus when not given
    vocab_size: int = 8000
    workers: int = 1
    valid_fraction: float = 0.01
    seed: int = 1234
    on_error: str = "raise"
    max_line_bytes: int = 1_000_000
    text_key: str = "text"  # the text's field in .jsonl, column in .parquet (corpora name it content, raw_content, ...)
    to_simplified: bool = False  # Traditional to Simplified Chinese (OpenCC t2s) before anything else
    segmenter: str = "jieba"  # the word boundaries of whole-word masking: jieba, or rjieba (faster; see tokenizer.py)
    shard: int = 0  # prepare only this shard's part of the input files ...
    num_shards: int = 1  # ... dealt to num_shards shards (see the module's docstring)
    overwrite: bool = False


def load_config(args: list[str], doc: str | None = None) -> PrepareConfig:
    """PrepareConfig from key=value arguments (paths verbatim: 'input=*.txt' is no YAML); bad ones are UserErrors.
    With doc, -h/--help prints it and exits."""
    cfg, _ = parse(args, PrepareConfig, command="pretrain.prepare", doc=doc, verbatim=("input", "out", "vocab"))
    return OmegaConf.to_object(cfg)


def _check(cfg: PrepareConfig) -> None:
    check_input_settings(cfg)
    if not 0 <= cfg.valid_fraction < 1:
        raise UserError(f"valid_fraction={cfg.valid_fraction}: must be in [0, 1)")
    if cfg.num_shards < 1:
        raise UserError(f"num_shards={cfg.num_shards}: must be >= 1")
    if not 0 <= cfg.shard < cfg.num_shards:
        raise UserError(f"shard={cfg.shard}: must be in [0, {cfg.num_shards}) for num_shards={cfg.num_shards}")
    if cfg.num_shards > 1 and cfg.vocab is None:
        raise UserError(f"num_shards={cfg.num_shards} needs vocab=: the shards must share one vocab "
                        f"(build it once: python -m pretrain.vocab input={cfg.input} out=<vocab.txt>)")
    if cfg.vocab is None and cfg.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size={cfg.vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens")
    out = os.path.normpath(cfg.out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"out={cfg.out}: exists and is not a directory")
        if os.listdir(out) and not cfg.overwrite:
            raise UserError(f"out={cfg.out}: exists and is not empty (pass overwrite=true to replace it)")
    check_segmenter(cfg.segmenter)  # an unknown or missing one fails before the corpus is read
    if cfg.vocab is not None:
        Tokenizer(cfg.vocab)  # a bad vocab fails before the corpus is read


def check_input_settings(cfg) -> None:
    """The settings prepare and pretrain.vocab share: on_error, workers, max_line_bytes, text_key."""
    if not cfg.text_key:
        raise UserError("text_key=: must name the text's field (.jsonl) or column (.parquet)")
    if cfg.on_error not in ("raise", "skip"):
        raise UserError(f"on_error={cfg.on_error}: expected raise or skip")
    if cfg.workers < 1:
        raise UserError(f"workers={cfg.workers}: must be >= 1")
    if cfg.max_line_bytes < 1:
        raise UserError(f"max_line_bytes={cfg.max_line_bytes}: must be >= 1")


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare the corpus `cfg.input` (or its shard) into the directory `cfg.out`; returns what it writes to
    meta.json."""
    _check(cfg)
    files = iter_input_files(cfg.input)
    inputs = shard_files(files, cfg.shard, cfg.num_shards)
    if not inputs:
        raise UserError(f"shard={cfg.shard}: no input files for this shard (input={cfg.input} has {len(files)} "
                        f"files; num_shards={cfg.num_shards} must not exceed that)")
    skipped: Counter[str] = Counter()

    def paragraphs(skipped=None):  # the input is read once per pass
        return iter_paragraphs(inputs, cfg.on_error, cfg.max_line_bytes, skipped, cfg.text_key)

    if cfg.vocab is None:
        num_docs, words = count_documents_and_words(paragraphs(skipped), cfg.workers, cfg.to_simplified)
    else:
        num_docs, words = sum(starts for starts, _ in paragraphs(skipped)), None
    if not num_docs:
        raise UserError(f"input={cfg.input}: no text found (empty input)")

    out = os.path.normpath(cfg.out)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        vocab_path = os.path.join(tmp, "vocab.txt")
        if cfg.vocab is not None:
            shutil.copyfile(cfg.vocab, vocab_path)
        else:
            write_vocab(words, cfg.vocab_size, vocab_path)
            del words  # not needed through the second pass
        tok = Tokenizer(vocab_path)
        valid = _valid_documents(num_docs, cfg.valid_fraction, cfg.seed)
        unknown: Counter[str] = Counter()
        counts, seen = _write_splits(paragraphs(), tok, valid, tmp, cfg.workers, unknown, cfg.to_simplified,
                                     cfg.segmenter)  # fmt: skip
        if seen != num_docs:
            raise UserError(f"input={cfg.input}: changed while being prepared ({num_docs} documents, then {seen})")

        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": tok.vocab_size,
            "vocab_sha256": vocab_sha256(vocab_path),
            "token_dtype": token_dtype(tok.vocab_size).name,
            "segmenter": segmenter_version(cfg.segmenter),
            "lowercase": True,
            "to_simplified": cfg.to_simplified,
            "inputs": inputs,
            "skipped_lines": dict(sorted(skipped.items())),
            "valid_fraction": cfg.valid_fraction,
            "seed": cfg.seed,
            "splits": counts,
            "unknown": unknown_report(unknown, sum(c["tokens"] for c in counts.values())),
        }
        if cfg.num_shards > 1:
            meta.update(shard=cfg.shard, num_shards=cfg.num_shards)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, sort_keys=True, indent=2, ensure_ascii=False)
            f.write("\n")
        _install(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


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


def _valid_documents(num_docs: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random choice of round(valid_fraction * num_docs) documents, at least one,
    never all."""
    if valid_fraction <= 0 or num_docs < 2:
        return np.zeros(0, dtype=np.int64)
    n = min(max(1, round(valid_fraction * num_docs)), num_docs - 1)
    return np.sort(np.array(random.Random(seed).sample(range(num_docs), n), dtype=np.int64))


def count_documents_and_words(paragraphs: Iterable[tuple[bool, str]], workers: int,
                              to_simplified: bool = False) -> tuple[int, Counter[str]]:  # fmt: skip
    """The number of documents in `paragraphs` (from iter_paragraphs) and the counts of their words."""
    num_docs, words = 0, Counter()
    with _Workers(workers, _init_worker, (None, to_simplified)) as pool:
        for starts, counted in pool.map(_count_words, _chunks(paragraphs)):
            num_docs += sum(starts)
            words.update(counted)
    return num_docs, words


def _count_words(paragraphs: list[str]) -> Counter[str]:
    return count_words(s for p in _converted(paragraphs) for s in split_sentences(p))


def _write_splits(paragraphs: Iterable[tuple[bool, str]], tok: Tokenizer, valid: np.ndarray, out: str,
                  workers: int, unknown: Counter, to_simplified: bool = False, segmenter_name: str = "jieba",
                  ) -> tuple[dict, int]:  # fmt: skip
    """Encode `paragraphs` into out/{train,valid}.{bin,idx}; documents whose index is in `valid` (sorted) go to
    valid. Returns the counts per split and the number of documents seen; counts what [UNK] stood for in
    `unknown`."""
    writers = {split: IndexedWriter(os.path.join(out, split), tok.vocab_size) for split in SPLITS}
    single = dict.fromkeys(SPLITS, 0)
    index, split, next_valid = -1, "train", 0
    with _Workers(workers, _init_worker, (tok.vocab_path, to_simplified, segmenter_name)) as pool:
        for starts, enc in pool.map(_encode_chunk, _chunks(paragraphs)):
            unknown.update(enc.unknown)
            sentence_end = np.concatenate([[0], np.cumsum(enc.paragraph_sentences)])
            token_end = np.concatenate([[0], np.cumsum(enc.sentence_tokens)])
            # Runs of paragraphs of one document: a chunk may begin or end inside a document.
            cuts = [i for i, s in enumerate(starts) if s]
            cuts = ([] if cuts[:1] == [0] else [0]) + cuts + [len(starts)]
            for p0, p1 in zip(cuts, cuts[1:]):
                if starts[p0]:
                    single[split] += writers[split].end_document() == 1
                    index += 1
                    is_valid = next_valid < len(valid) and valid[next_valid] == index
                    next_valid += is_valid
                    split = "valid" if is_valid else "train"
                s0, s1 = sentence_end[p0], sentence_end[p1]
                if s1 > s0:
                    t0, t1 = token_end[s0], token_end[s1]
                    writers[split].add_sentences(enc.ids[t0:t1], enc.word_start[t0:t1], enc.sentence_tokens[s0:s1])
    single[split] += writers[split].end_document() == 1
    counts = {}
    for split, writer in writers.items():
        writer.close()
        counts[split] = dict(documents=writer.num_docs, sentences=writer.num_sents, tokens=writer.num_tokens,
                             single_sentence_documents=single[split])
    return counts, index + 1


def _chunks(paragraphs: Iterable[tuple[bool, str]]) -> Iterator[tuple[list[bool], list[str]]]:
    """(starts a document, paragraph) pairs grouped into tasks of about _CHUNK_CHARS characters; a paragraph longer
    than _PIECE_CHARS becomes several, cut between sentences, which gives the same sentences and words."""
    starts, texts, size = [], [], 0
    for starts_document, paragraph in paragraphs:
        for i, text in enumerate(bounded_pieces(paragraph, _PIECE_CHARS)):
            starts.append(starts_document and i == 0)
            texts.append(text)
            size += len(text)
            if size >= _CHUNK_CHARS:
                yield starts, texts
                starts, texts, size = [], [], 0
    if texts:
        yield starts, texts


_worker_tok: Tokenizer | None = None
_worker_convert: Callable[[str], str] | None = None
_worker_segment: Callable[[str], list[str]] | None = None


def _init_worker(vocab_path: str | None, to_simplified: bool = False, segmenter_name: str = "jieba") -> None:
    """A worker's tokenizer and segmenter (when it encodes) and the Traditional-to-Simplified converter (when
    asked): conversion runs in the workers, not in the process that reads the input."""
    global _worker_tok, _worker_convert, _worker_segment
    _worker_tok = Tokenizer(vocab_path) if vocab_path is not None else None
    _worker_convert = simplified_converter() if to_simplified else None
    _worker_segment = segmenter(segmenter_name) if vocab_path is not None else None


def simplified_converter() -> Callable[[str], str]:
    try:
        import opencc
    except ImportError:
        raise UserError("to_simplified=true needs OpenCC: pip install opencc") from None
    return opencc.OpenCC("t2s").convert


def _converted(paragraphs: list[str]) -> list[str]:
    return paragraphs if _worker_convert is None else [_worker_convert(p) for p in paragraphs]


def _encode_chunk(paragraphs: list[str]):
    enc = encode_paragraphs(_worker_tok, _converted(paragraphs), _worker_segment)
    return enc._replace(ids=enc.ids.astype(token_dtype(_worker_tok.vocab_size)))  # uint16: half the bytes to send


class _Workers:
    """`workers` processes, or this one for 1, mapping a function over tasks; the results come in task order, so
    the output does not depend on `workers`, and at most _IN_FLIGHT tasks per worker are submitted and not yet
    taken, so memory does not depend on the input (Pool.imap would read all of it ahead)."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers, self.initializer, self.initargs = workers, initializer, initargs
        self.pool = None

    def __enter__(self) -> "_Workers":
        if self.workers == 1:
            if self.initializer is not None:
                self.initializer(*self.initargs)
        else:
            # The workers are the parallelism; tokenizers' own thread pool would oversubscribe and warns after fork.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self.pool = multiprocessing.Pool(self.workers, self.initializer, self.initargs)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """(tag, fn(arg)) for each (tag, arg) of `tasks`, in order; the tags stay in this process."""
        if self.pool is None:
            for tag, arg in tasks:
                yield tag, fn(arg)
            return
        pending: deque = deque()
        for tag, arg in tasks:
            pending.append((tag, self.pool.apply_async(fn, (arg,))))
            if len(pending) >= _IN_FLIGHT * self.workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.get()


def _install(tmp: str, out: str, overwrite: bool) -> None:
    """Move the finished `tmp` to `out`; a previous `out` (overwrite=true) is removed only after that."""
    old = None
    try:
        if os.path.isdir(out) and os.listdir(out):
            if not overwrite:  # appeared while we were working
                raise UserError(f"out={out}: exists and is not empty (pass overwrite=true to replace it)")
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
        elif os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except OSError as e:
        if old is not None and not os.path.exists(out):
            os.replace(old, out)
        raise UserError(f"out={out}: cannot move the prepared corpus into place ({e.strerror})") from None
    if old is not None:
        shutil.rmtree(old)


def unknown_report(unknown: Counter, tokens: int) -> dict:
    """The share of the tokens that are [UNK], and what they stood for most often."""
    n = sum(unknown.values())
    return {"tokens": n, "rate": n / tokens if tokens else 0.0, "top": [[text, count] for text, count in
            sorted(unknown.items(), key=lambda item: (-item[1], item[0]))[:UNKNOWN_TOP]]}  # fmt: skip


def summary(meta: dict, out: str, seconds: float) -> str:
    lines = [f"prepared {out} in {seconds:.1f}s: vocab {meta['vocab_size']} tokens ({meta['token_dtype']})"]
    for split in SPLITS:
        c = meta["splits"][split]
        lines.append(f"  {split}: {c['documents']} documents, {c['sentences']} sentences, {c['tokens']} tokens, "
                     f"{c['single_sentence_documents']} single-sentence documents")
    skipped = meta["skipped_lines"]
    detail = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
    lines.append(f"  skipped lines: {sum(skipped.values())}" + (f" ({detail})" if detail else ""))
    unknown = meta["unknown"]
    top = " ".join(f"{text} {count}" for text, count in unknown["top"][:10])
    lines.append(f"  [UNK]: {unknown['tokens']} tokens, {unknown['rate']:.3%}" + (f"; most often for: {top}" if top else ""))
    return "\n".join(lines)


def unknown_warning(meta: dict, vocab: str | None) -> str | None:
    """One line when the vocab leaves more than UNKNOWN_WARN of the tokens unknown."""
    unknown = meta["unknown"]
    if unknown["rate"] <= UNKNOWN_WARN:
        return None
    chars = "".join(text for text, _ in unknown["top"][:5])
    return (f"pretrain.prepare: warning: {unknown['rate']:.2%} of the tokens are [UNK] (above {UNKNOWN_WARN:.1%})"
            f"{' under vocab=' + vocab if vocab else ''}, most often for {chars!r}: extend the vocab "
            "(python -m pretrain.vocab base=<vocab.txt> extra=<N> ...) or normalise the text")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with exit_on_user_error("pretrain.prepare"):
        cfg = load_config(args, doc=__doc__)
        start = time.perf_counter()
        meta = prepare(cfg)
        print(summary(meta, cfg.out, time.perf_counter() - start))
        warning = unknown_warning(meta, cfg.vocab)
        if warning:
            print(warning, file=sys.stderr)


if __name__ == "__main__":
    main()

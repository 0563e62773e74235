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

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
from omegaconf import MISSING, OmegaConf

from pretrain.cli import parse
from pretrain.data.corpus import bounded_pieces, iter_input_files, iter_paragraphs
from pretrain.data.indexed import IndexedWriter, token_dtype
from pretrain.data.prepare_parts import count_chunk_words, encode_chunk, init_worker, shard_files, valid_documents
from pretrain.data.tokenizer import (SPECIAL_TOKENS, Tokenizer, check_segmenter, segmenter_version, vocab_sha256,
                                     write_vocab)  # fmt: skip
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
        valid = valid_documents(num_docs, cfg.valid_fraction, cfg.seed)
        unknown: Counter[str] = Counter()
        counts, seen = _write_splits(paragraphs(), tok, valid, tmp, cfg.workers, unknown, cfg.to_simplified,
                                     cfg.segmenter)  # fmt: skip
        if seen != num_docs:
            raise UserError(f"input={cfg.input}: changed while being prepared ({num_docs} documents, then {seen})")

        meta = _meta(cfg, tok, inputs, skipped, counts, unknown)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, sort_keys=True, indent=2, ensure_ascii=False)
            f.write("\n")
        _install(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _meta(cfg: PrepareConfig, tok: Tokenizer, inputs: list[str], skipped: Counter, counts: dict,
          unknown: Counter) -> dict:  # fmt: skip
    """What meta.json says of the prepared directory."""
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "vocab_sha256": vocab_sha256(tok.vocab_path),
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
    return meta


def count_documents_and_words(paragraphs: Iterable[tuple[bool, str]], workers: int,
                              to_simplified: bool = False) -> tuple[int, Counter[str]]:  # fmt: skip
    """The number of documents in `paragraphs` (from iter_paragraphs) and the counts of their words."""
    num_docs, words = 0, Counter()
    with _Workers(workers, init_worker, (None, to_simplified)) as pool:
        for starts, counted in pool.map(count_chunk_words, _chunks(paragraphs)):
            num_docs += sum(starts)
            words.update(counted)
    return num_docs, words


def _write_splits(paragraphs: Iterable[tuple[bool, str]], tok: Tokenizer, valid: np.ndarray, out: str,
                  workers: int, unknown: Counter, to_simplified: bool = False, segmenter_name: str = "jieba",
                  ) -> tuple[dict, int]:  # fmt: skip
    """Encode `paragraphs` into out/{train,valid}.{bin,idx}; documents whose index is in `valid` (sorted) go to
    valid. Returns the counts per split and the number of documents seen; counts what [UNK] stood for in
    `unknown`."""
    writers = {split: IndexedWriter(os.path.join(out, split), tok.vocab_size) for split in SPLITS}
    single = dict.fromkeys(SPLITS, 0)
    index, split, next_valid = -1, "train", 0
    with _Workers(workers, init_worker, (tok.vocab_path, to_simplified, segmenter_name)) as pool:
        for starts, enc in pool.map(encode_chunk, _chunks(paragraphs)):
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

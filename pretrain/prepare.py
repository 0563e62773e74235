"""Raw text -> prepared corpus: vocab.txt, {train,valid}.{bin,idx} and meta.json in one directory.

    python -m pretrain.prepare input=<file|dir|glob> out=<dir> [vocab=<vocab.txt>] [vocab_size=8000]
        [workers=1] [valid_fraction=0.01] [seed=1234] [on_error=raise|skip] [max_line_bytes=1000000]
        [overwrite=false]

The output is a function of the input and these settings only (never of `workers`), and it appears at
`out` all at once: it is written to a temporary directory beside it and renamed at the end.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from omegaconf import MISSING, OmegaConf

from pretrain.cli import parse
from pretrain.data.corpus import iter_input_files, read_documents, split_sentences
from pretrain.data.indexed import IndexedWriter, token_dtype
from pretrain.data.tokenizer import (
    SPECIAL_TOKENS, Tokenizer, build_vocab, encode_sentences, jieba_segmenter, jieba_version, vocab_sha256,
)  # fmt: skip
from pretrain.errors import UserError, exit_on_user_error

FORMAT_VERSION = 1
SPLITS = ("train", "valid")
_CHUNK_DOCS = 64  # documents per task sent to a worker


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
    overwrite: bool = False


def load_config(args: list[str], doc: str | None = None) -> PrepareConfig:
    """PrepareConfig from key=value arguments (paths verbatim: 'input=*.txt' is no YAML); bad ones are UserErrors.
    With doc, -h/--help prints it and exits."""
    cfg, _ = parse(args, PrepareConfig, command="pretrain.prepare", doc=doc, verbatim=("input", "out", "vocab"))
    return OmegaConf.to_object(cfg)


def _check(cfg: PrepareConfig) -> None:
    if cfg.on_error not in ("raise", "skip"):
        raise UserError(f"on_error={cfg.on_error}: expected raise or skip")
    if cfg.workers < 1:
        raise UserError(f"workers={cfg.workers}: must be >= 1")
    if not 0 <= cfg.valid_fraction < 1:
        raise UserError(f"valid_fraction={cfg.valid_fraction}: must be in [0, 1)")
    if cfg.vocab is None and cfg.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size={cfg.vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if cfg.max_line_bytes < 1:
        raise UserError(f"max_line_bytes={cfg.max_line_bytes}: must be >= 1")
    out = os.path.normpath(cfg.out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"out={cfg.out}: exists and is not a directory")
        if os.listdir(out) and not cfg.overwrite:
            raise UserError(f"out={cfg.out}: exists and is not empty (pass overwrite=true to replace it)")
    if cfg.vocab is not None:
        Tokenizer(cfg.vocab)  # a bad vocab fails before the corpus is read


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare the corpus `cfg.input` into the directory `cfg.out`; returns what it writes to meta.json."""
    _check(cfg)
    inputs = iter_input_files(cfg.input)
    paragraphs, stats = read_documents(inputs, cfg.on_error, cfg.max_line_bytes)
    # Paragraph boundaries are sentence boundaries: a document is the concatenation of its paragraphs' sentences.
    documents = [[s for p in doc for s in split_sentences(p)] for doc in paragraphs]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise UserError(f"input={cfg.input}: no text found (empty input)")

    out = os.path.normpath(cfg.out)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        vocab_path = os.path.join(tmp, "vocab.txt")
        if cfg.vocab is not None:
            shutil.copyfile(cfg.vocab, vocab_path)
        else:
            build_vocab((s for doc in documents for s in doc), cfg.vocab_size, vocab_path)
        tok = Tokenizer(vocab_path)

        valid = _valid_documents(len(documents), cfg.valid_fraction, cfg.seed)
        writers = {split: IndexedWriter(os.path.join(tmp, split), tok.vocab_size) for split in SPLITS}
        counts = {split: dict(documents=0, sentences=0, tokens=0, single_sentence_documents=0) for split in SPLITS}
        for index, doc in enumerate(_encode_documents(documents, vocab_path, cfg.workers)):
            if not doc:  # nothing in it survived tokenization
                continue
            split = "valid" if index in valid else "train"
            writers[split].add_document(doc)
            c = counts[split]
            c["documents"] += 1
            c["sentences"] += len(doc)
            c["tokens"] += sum(len(ids) for ids, _ in doc)
            c["single_sentence_documents"] += len(doc) == 1
        for writer in writers.values():
            writer.close()

        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": tok.vocab_size,
            "vocab_sha256": vocab_sha256(vocab_path),
            "token_dtype": token_dtype(tok.vocab_size).name,
            "segmenter": f"jieba {jieba_version()}",
            "lowercase": True,
            "inputs": inputs,
            "skipped_lines": stats["skipped_lines"],
            "valid_fraction": cfg.valid_fraction,
            "seed": cfg.seed,
            "splits": counts,
        }
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, sort_keys=True, indent=2, ensure_ascii=False)
            f.write("\n")
        _install(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _valid_documents(num_docs: int, valid_fraction: float, seed: int) -> set[int]:
    """A seeded random choice of round(valid_fraction * num_docs) documents, at least one, never all."""
    if valid_fraction <= 0 or num_docs < 2:
        return set()
    n = min(max(1, round(valid_fraction * num_docs)), num_docs - 1)
    return set(random.Random(seed).sample(range(num_docs), n))


_worker_tok: Tokenizer | None = None


def _init_worker(vocab_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(vocab_path)
    jieba_segmenter()


def _encode_chunk(documents: list[list[str]]):
    return [encode_sentences(_worker_tok, doc, jieba_segmenter()) for doc in documents]


def _encode_documents(documents: list[list[str]], vocab_path: str, workers: int) -> Iterator[list]:
    """Encoded documents in input order; ordered imap keeps the output independent of `workers`."""
    chunks = (documents[i : i + _CHUNK_DOCS] for i in range(0, len(documents), _CHUNK_DOCS))
    if workers == 1:
        _init_worker(vocab_path)
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    # The workers are the parallelism; tokenizers' own thread pool would oversubscribe and warns after fork.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(vocab_path,)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks):
            yield from encoded


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


def summary(meta: dict, out: str, seconds: float) -> str:
    lines = [f"prepared {out} in {seconds:.1f}s: vocab {meta['vocab_size']} tokens ({meta['token_dtype']})"]
    for split in SPLITS:
        c = meta["splits"][split]
        lines.append(f"  {split}: {c['documents']} documents, {c['sentences']} sentences, {c['tokens']} tokens, "
                     f"{c['single_sentence_documents']} single-sentence documents")
    skipped = meta["skipped_lines"]
    detail = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
    lines.append(f"  skipped lines: {sum(skipped.values())}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with exit_on_user_error("pretrain.prepare"):
        cfg = load_config(args, doc=__doc__)
        start = time.perf_counter()
        meta = prepare(cfg)
        print(summary(meta, cfg.out, time.perf_counter() - start))


if __name__ == "__main__":
    main()

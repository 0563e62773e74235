"""Build a corpus's vocab.txt once, for preparing the corpus in shards (the shards must share one vocab):

    python -m pretrain.vocab input=<file|dir|glob> out=<vocab.txt> [vocab_size=8000] [workers=1]
        [on_error=raise|skip] [max_line_bytes=1000000] [overwrite=false]
    python -m pretrain.prepare input=<same> out=<dir>/shard-<i> vocab=<vocab.txt> shard=<i> num_shards=<N>

It is, byte for byte, the vocab.txt that `python -m pretrain.prepare` builds from the same input and settings.
The input is streamed: memory holds the word counts (which grow with the distinct words, not the corpus) and
a few chunks of text per worker.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf

from pretrain.cli import parse
from pretrain.data.corpus import iter_input_files, iter_paragraphs
from pretrain.data.tokenizer import SPECIAL_TOKENS, read_vocab, write_vocab
from pretrain.errors import UserError, exit_on_user_error
from pretrain.prepare import check_input_settings, count_documents_and_words


@dataclass
class VocabConfig:
    input: str = MISSING
    out: str = MISSING
    vocab_size: int = 8000
    workers: int = 1
    on_error: str = "raise"
    max_line_bytes: int = 1_000_000
    overwrite: bool = False


def load_config(args: list[str], doc: str | None = None) -> VocabConfig:
    cfg, _ = parse(args, VocabConfig, command="pretrain.vocab", doc=doc, verbatim=("input", "out"))
    return OmegaConf.to_object(cfg)


def build(cfg: VocabConfig) -> dict:
    """Write the vocab of `cfg.input` to `cfg.out` (all at once: a temporary file renamed); returns a summary."""
    check_input_settings(cfg)
    if cfg.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size={cfg.vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if os.path.isdir(cfg.out):
        raise UserError(f"out={cfg.out}: is a directory (name the vocab file, e.g. out={cfg.out}/vocab.txt)")
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"out={cfg.out}: exists (pass overwrite=true to replace it)")
    files = iter_input_files(cfg.input)
    skipped: Counter[str] = Counter()
    num_docs, words = count_documents_and_words(iter_paragraphs(files, cfg.on_error, cfg.max_line_bytes, skipped),
                                                cfg.workers)
    if not num_docs:
        raise UserError(f"input={cfg.input}: no text found (empty input)")
    tmp = f"{cfg.out}.tmp-{os.getpid()}"
    try:
        write_vocab(words, cfg.vocab_size, tmp)
        os.replace(tmp, cfg.out)
    except OSError as e:
        raise UserError(f"out={cfg.out}: cannot write ({e.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"vocab_size": len(read_vocab(cfg.out)), "documents": num_docs, "files": len(files),
            "skipped_lines": dict(sorted(skipped.items()))}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with exit_on_user_error("pretrain.vocab"):
        cfg = load_config(args, doc=__doc__)
        start = time.perf_counter()
        info = build(cfg)
        skipped = sum(info["skipped_lines"].values())
        print(f"wrote {cfg.out} in {time.perf_counter() - start:.1f}s: {info['vocab_size']} tokens from "
              f"{info['documents']} documents in {info['files']} files"
              + (f", {skipped} lines skipped" if skipped else ""))


if __name__ == "__main__":
    main()

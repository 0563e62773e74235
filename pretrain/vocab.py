"""Build a corpus's vocab.txt once, for preparing the corpus in shards (the shards must share one vocab):

    python -m pretrain.vocab input=<file|dir|glob> out=<vocab.txt> [vocab_size=8000] [workers=1]
        [on_error=raise|skip] [max_line_bytes=1000000] [text_key=text] [to_simplified=false] [overwrite=false]
    python -m pretrain.prepare input=<same> out=<dir>/shard-<i> vocab=<vocab.txt> shard=<i> num_shards=<N>
    python -m pretrain.vocab base=<vocab.txt> input=<corpus> extra=<N> out=<vocab.txt>    # extend a vocab

With base=, the output is the base vocab unchanged, byte for byte (so every id keeps its meaning), followed by the
N most frequent tokens of the corpus that the base lacks: first the characters of the words the base makes [UNK]
(a word's first character, the others as continuation pieces ##c), then whole words seen at least twice, each
group most frequent first (ties by the token). vocab_size is not used then. A model started from a run, hf: or plug: with the base vocab takes the
extended one (new rows from the pieces they replace: training.init_from, docs/data.md).

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
from typing import Optional

from omegaconf import MISSING, OmegaConf

from pretrain.cli import parse
from pretrain.data.corpus import iter_input_files, iter_paragraphs
from pretrain.data.tokenizer import (MAX_WORD_CHARS, SPECIAL_TOKENS, Tokenizer, by_count, character_pieces, read_vocab,
                                     write_vocab)
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
    text_key: str = "text"  # as prepare's
    to_simplified: bool = False  # as prepare's: give the same setting to both
    base: Optional[str] = None  # a vocab.txt to extend (then extra= tokens are added; vocab_size is not used)
    extra: int = 0
    overwrite: bool = False


def load_config(args: list[str], doc: str | None = None) -> VocabConfig:
    cfg, _ = parse(args, VocabConfig, command="pretrain.vocab", doc=doc, verbatim=("input", "out", "base"))
    return OmegaConf.to_object(cfg)


def build(cfg: VocabConfig) -> dict:
    """Write the vocab of `cfg.input` to `cfg.out` (all at once: a temporary file renamed); returns a summary."""
    check_input_settings(cfg)
    if cfg.base is not None:
        Tokenizer(cfg.base)  # a vocab with the special tokens, read as training will read it
        if cfg.extra < 1:
            raise UserError(f"extra={cfg.extra}: base= needs extra=<the number of tokens to add> (>= 1)")
    elif cfg.extra:
        raise UserError(f"extra={cfg.extra}: goes with base=<the vocab.txt to extend>")
    if cfg.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size={cfg.vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if os.path.isdir(cfg.out):
        raise UserError(f"out={cfg.out}: is a directory (name the vocab file, e.g. out={cfg.out}/vocab.txt)")
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"out={cfg.out}: exists (pass overwrite=true to replace it)")
    files = iter_input_files(cfg.input)
    skipped: Counter[str] = Counter()
    num_docs, words = count_documents_and_words(iter_paragraphs(files, cfg.on_error, cfg.max_line_bytes, skipped, cfg.text_key),
                                                cfg.workers, cfg.to_simplified)
    if not num_docs:
        raise UserError(f"input={cfg.input}: no text found (empty input)")
    tmp = f"{cfg.out}.tmp-{os.getpid()}"
    try:
        if cfg.base is None:
            write_vocab(words, cfg.vocab_size, tmp)
        else:
            with open(cfg.base, "rb") as f:
                base = f.read()
            added = missing_tokens(words, Tokenizer(cfg.base), cfg.extra)
            with open(tmp, "wb") as f:
                f.write(base + (b"" if base.endswith(b"\n") or not base else b"\n"))
                f.write("".join(t + "\n" for t in added).encode("utf-8"))
        os.replace(tmp, cfg.out)
    except OSError as e:
        raise UserError(f"out={cfg.out}: cannot write ({e.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"vocab_size": len(read_vocab(cfg.out)), "documents": num_docs, "files": len(files),
            "added": len(read_vocab(cfg.out)) - len(read_vocab(cfg.base)) if cfg.base else None,
            "skipped_lines": dict(sorted(skipped.items()))}


def missing_tokens(words: Counter[str], base: Tokenizer, n: int) -> list[str]:
    """The n most frequent tokens of a corpus's words (count_words) that the `base` vocab lacks: first the
    characters of the words it makes [UNK] (a word's first character as itself, the others as ##c continuation
    pieces), then whole words seen at least twice."""
    have = set(read_vocab(base.vocab_path))
    distinct = [w for w in words if len(w) <= MAX_WORD_CHARS]
    unknown = ((w, words[w]) for w, enc in zip(distinct, base.encode_batch(distinct)) if base.unk_id in enc.ids)
    whole = Counter({w: words[w] for w in distinct if len(w) > 1 and words[w] >= 2})
    return [t for t in by_count(character_pieces(unknown)) + by_count(whole) if t not in have][:n]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with exit_on_user_error("pretrain.vocab"):
        cfg = load_config(args, doc=__doc__)
        start = time.perf_counter()
        info = build(cfg)
        skipped = sum(info["skipped_lines"].values())
        added = "" if info["added"] is None else f" ({cfg.base}'s and {info['added']} added)"
        print(f"wrote {cfg.out} in {time.perf_counter() - start:.1f}s: {info['vocab_size']} tokens{added} from "
              f"{info['documents']} documents in {info['files']} files"
              + (f", {skipped} lines skipped" if skipped else ""))


if __name__ == "__main__":
    main()

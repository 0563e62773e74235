"""Prompts for the demo's generations, from the held-out (valid) split of a prepared corpus: the opening
sentences of the first documents, decoded back to text, one a line.

    python data/held_out_prompts.py --prepared data/demo/prepared --count 4 --out data/demo/prompts.txt
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.indexed import IndexedCorpus  # noqa: E402
from pretrain.data.tokenizer import Tokenizer  # noqa: E402


def opening(corpus: IndexedCorpus, doc: int, min_tokens: int, max_tokens: int) -> tuple[int, int]:
    """Token range of the document's first sentences: at least min_tokens when the document has them."""
    s0, s1 = int(corpus.doc_offsets[doc]), int(corpus.doc_offsets[doc + 1])
    start = int(corpus.sent_offsets[s0])
    end = start
    for s in range(s0, s1):
        end = int(corpus.sent_offsets[s + 1])
        if end - start >= min_tokens:
            break
    return start, min(end, start + max_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--min-tokens", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    corpus = IndexedCorpus.open(os.path.join(args.prepared, "valid"))
    tok = Tokenizer(os.path.join(args.prepared, "vocab.txt"))
    docs = [d for d in range(corpus.num_docs) if corpus.doc_offsets[d + 1] - corpus.doc_offsets[d] >= 2]
    if not docs:
        sys.exit(f"{args.prepared}: the valid split has no document of two sentences or more")
    lines = []
    for d in docs[: args.count]:
        start, end = opening(corpus, d, args.min_tokens, args.max_tokens)
        lines.append(tok.decode(corpus.tokens[start:end]))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()

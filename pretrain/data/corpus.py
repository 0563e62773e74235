"""Reading raw text: input files, documents made of paragraphs, Chinese sentence splitting.

.txt    UTF-8, one paragraph per line, a blank line between documents.
.jsonl  one JSON object per line whose "text" is one document; newlines inside it split paragraphs.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from typing import BinaryIO, Iterator

from pretrain.errors import UserError

EXTENSIONS = (".txt", ".jsonl")
_CHUNK = 1 << 20

# A sentence ends after a run of 。！？；!? or ellipsis characters, together with the closing quotes and
# brackets that follow it, so '“你好。”' stays one sentence and the next one does not start with '”'
# ('《好！》。' too: punctuation after a closer still belongs to the sentence).
_SENTENCE = re.compile(r"[^。！？；!?…]*(?:(?:[。！？；!?…]+[”’」』）)\"'》】]*)+|$)")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of `paragraph`, each keeping its final punctuation; whitespace-stripped, empties dropped."""
    return [paragraph[begin:end] for begin, end in sentence_spans(paragraph)]


def sentence_spans(paragraph: str) -> list[tuple[int, int]]:
    """(begin, end) of each of split_sentences(paragraph) in `paragraph`."""
    spans = []
    for m in _SENTENCE.finditer(paragraph):
        text = m.group()
        stripped = text.lstrip()
        if stripped:
            begin = m.start() + len(text) - len(stripped)
            spans.append((begin, begin + len(stripped.rstrip())))
    return spans


# jieba segments each run of these characters on its own (its re_han_default) and every other character alone, so
# text cut after a character outside them is cut into the same words as the whole.
_JIEBA_RUN_CHAR = re.compile(r"[\u4E00-\u9FD5a-zA-Z0-9+#&._%\-]")


def bounded_pieces(paragraph: str, limit: int) -> Iterator[str]:
    """`paragraph` in consecutive pieces of at most `limit` characters, for a consumer's memory to be bounded
    whatever the length of a line. The pieces are cut only between sentences, so their sentences (split_sentences)
    are the paragraph's and jieba cuts them into the same words: a sentence ends with punctuation that is in no
    jieba run. A paragraph of at most `limit` characters is one piece, itself.

    A sentence longer than `limit` (no 。！？；!?… in that many characters) is cut into pieces of at most `limit`
    characters, each a sentence of its own, after a character outside jieba's runs where the second half of the
    piece has one (then jieba's words are unchanged), else at `limit`.
    """
    if len(paragraph) <= limit:
        yield paragraph
        return
    start = end = 0  # the piece being gathered is paragraph[start:end], whole sentences
    for m in _SENTENCE.finditer(paragraph):
        while m.end() - start > limit:
            if end == start:  # one sentence longer than limit
                end = _cut_point(paragraph, start, start + limit)
            yield paragraph[start:end]
            start = end
        end = m.end()
    if end > start:
        yield paragraph[start:end]


def _cut_point(text: str, start: int, stop: int) -> int:
    """The last position in (start + (stop - start) // 2, stop] after a character outside jieba's runs, else stop."""
    for cut in range(stop, start + (stop - start) // 2, -1):
        if not _JIEBA_RUN_CHAR.match(text, cut - 1):
            return cut
    return stop


def iter_input_files(spec: str) -> list[str]:
    """The input files named by `spec`: a file, a directory (its *.txt / *.jsonl, recursively) or a glob."""
    if os.path.isfile(spec):
        return [spec]
    matches = [spec] if os.path.isdir(spec) else glob.glob(spec, recursive=True)
    files = set()
    for match in matches:
        if os.path.isdir(match):
            for root, _, names in os.walk(match):
                files.update(os.path.join(root, n) for n in names if n.endswith(EXTENSIONS))
        elif match.endswith(EXTENSIONS) and os.path.isfile(match):
            files.add(match)
    if not files:
        raise UserError(f"input={spec}: no .txt or .jsonl files found")
    return sorted(files)


def _lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(byte offset, line without its newline, length in bytes) per line; the line is None when longer than
    max_line_bytes, and such a line is read past in chunks so that its size never has to fit in memory."""
    offset = 0
    while head := f.readline(max_line_bytes + 2):  # + 2: room for the '\r\n' of a line of the maximum length
        size, last = len(head), head
        while not last.endswith(b"\n") and (more := f.readline(_CHUNK)):
            size, last = size + len(more), more
        length = size - (2 if last.endswith(b"\r\n") else 1 if last.endswith(b"\n") else 0)
        yield offset, (head[:length] if length <= max_line_bytes else None), length
        offset += size


def read_documents(paths: list[str], on_error: str = "raise", max_line_bytes: int = 1_000_000
                   ) -> tuple[list[list[str]], dict]:
    """Documents (lists of non-blank paragraphs) from .txt / .jsonl files, and reading statistics: all in memory,
    for small inputs and tools; prepare streams `iter_paragraphs` instead."""
    skipped: Counter[str] = Counter()
    documents: list[list[str]] = []
    for starts_document, paragraph in iter_paragraphs(paths, on_error, max_line_bytes, skipped):
        if starts_document:
            documents.append([])
        documents[-1].append(paragraph)
    return documents, {"files": len(paths), "skipped_lines": dict(sorted(skipped.items()))}


def iter_paragraphs(paths: list[str], on_error: str = "raise", max_line_bytes: int = 1_000_000,
                    skipped: Counter | None = None) -> Iterator[tuple[bool, str]]:
    """(starts a document, paragraph) for every non-blank paragraph of .txt / .jsonl files, read lazily: memory
    holds one line, however large the input or its documents. A document has at least one paragraph.

    A bad line (invalid UTF-8, longer than max_line_bytes, bad JSON) is a UserError naming where it is, or,
    with on_error="skip", is left out and counted by reason in `skipped`.
    """
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error={on_error}: expected raise or skip")
    for path in paths:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        with f:
            jsonl = path.endswith(".jsonl")
            in_document = False  # a .txt document is open: its next paragraph continues it
            for lineno, (offset, raw, length) in enumerate(_lines(f, max_line_bytes), start=1):
                try:
                    text = _decode(path, lineno, offset, raw, length, max_line_bytes)
                    if jsonl:
                        paragraphs = _jsonl_document(path, lineno, text)
                    else:
                        paragraphs = [text.strip()] if text.strip() else []
                except _BadLine as bad:
                    if on_error == "raise":
                        raise UserError(str(bad)) from None
                    if skipped is not None:
                        skipped[bad.reason] += 1
                    continue
                if not paragraphs:
                    in_document = False  # a blank .txt line ends the document
                for i, paragraph in enumerate(paragraphs):
                    yield i == 0 and not in_document, paragraph
                    in_document = not jsonl  # a .jsonl line is a whole document


class _BadLine(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_BOM = b"\xef\xbb\xbf"


def _decode(path: str, lineno: int, offset: int, raw: bytes | None, length: int, max_line_bytes: int) -> str:
    if raw is None:
        raise _BadLine("too_long", f"{path}:{lineno}: line of {length} bytes exceeds max_line_bytes={max_line_bytes} "
                                   "(raise max_line_bytes= or split the input)")
    try:
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        bom = len(_BOM) if offset == 0 and raw.startswith(_BOM) else 0  # utf-8-sig counts from after the BOM
        raise _BadLine("invalid_utf8", f"{path}: invalid UTF-8 at byte offset {offset + bom + e.start} (line {lineno})")


def _jsonl_document(path: str, lineno: int, line: str) -> list[str]:
    if not line.strip():
        return []
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine("invalid_json", f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "text" not in obj:
        raise _BadLine("no_text", f'{path}:{lineno}: expected a JSON object with a "text" field')
    if not isinstance(obj["text"], str):
        raise _BadLine("no_text", f'{path}:{lineno}: "text" is {type(obj["text"]).__name__}, expected a string')
    return [p.strip() for p in obj["text"].splitlines() if p.strip()]

"""Reading raw text: documents made of paragraphs, Chinese sentence splitting. The files and their formats
(.txt, .jsonl, .parquet, compressed or not): input_files.py. In .jsonl and .parquet, newlines inside a
document's text split its paragraphs."""
from __future__ import annotations

import json
import re
from collections import Counter
from functools import partial
from typing import BinaryIO, Iterator

from pretrain.data.input_files import checked, file_kind, find_input_files, open_binary, parquet_texts
from pretrain.errors import UserError

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
    """The input files named by `spec`: a file, a directory (recursively) or a glob (input_files.py)."""
    return find_input_files(spec)


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


def read_documents(paths: list[str], on_error: str = "raise", max_line_bytes: int = 1_000_000,
                   text_key: str = "text") -> tuple[list[list[str]], dict]:
    """Documents (lists of non-blank paragraphs) from input files, and reading statistics: all in memory, for
    small inputs and tools; prepare streams `iter_paragraphs` instead."""
    skipped: Counter[str] = Counter()
    documents: list[list[str]] = []
    for starts_document, paragraph in iter_paragraphs(paths, on_error, max_line_bytes, skipped, text_key):
        if starts_document:
            documents.append([])
        documents[-1].append(paragraph)
    return documents, {"files": len(paths), "skipped_lines": dict(sorted(skipped.items()))}


def iter_paragraphs(paths: list[str], on_error: str = "raise", max_line_bytes: int = 1_000_000,
                    skipped: Counter | None = None, text_key: str = "text") -> Iterator[tuple[bool, str]]:
    """(starts a document, paragraph) for every non-blank paragraph of the input files, read lazily: memory holds
    one line (a .parquet file: one batch of rows), however large the input or its documents. A document has at
    least one paragraph.

    A bad line or row (invalid UTF-8, longer than max_line_bytes, bad JSON, no text) is a UserError naming where
    it is, or, with on_error="skip", is left out and counted by reason in `skipped`. A damaged or truncated
    (compressed) file is a UserError naming it.
    """
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error={on_error}: expected raise or skip")
    for path in paths:
        fmt, compression = file_kind(path, named=True)
        if fmt == ".parquet":
            documents = (partial(_row_paragraphs, path, row, value, text_key) for row, value in parquet_texts(path, text_key))
            yield from _paragraphs_of(documents, on_error, skipped, whole_documents=True)
            continue
        with open_binary(path) as f:
            jsonl = fmt == ".jsonl"
            where = f"{path} (decompressed)" if compression else path

            def documents():
                for lineno, (offset, raw, length) in enumerate(checked(path, _lines(f, max_line_bytes)), start=1):
                    yield partial(_line_paragraphs, where, lineno, offset, raw, length, max_line_bytes, jsonl, text_key)

            yield from _paragraphs_of(documents(), on_error, skipped, whole_documents=jsonl)


def _paragraphs_of(documents, on_error: str, skipped: Counter | None, whole_documents: bool) -> Iterator[tuple[bool, str]]:
    """(starts a document, paragraph) from thunks that each give one line's or row's paragraphs (or raise
    _BadLine): a row or .jsonl line is a whole document; .txt lines run on until a blank one."""
    in_document = False  # a .txt document is open: its next paragraph continues it
    for read in documents:
        try:
            paragraphs = read()
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
            in_document = not whole_documents


def _line_paragraphs(where, lineno, offset, raw, length, max_line_bytes, jsonl: bool, text_key: str) -> list[str]:
    text = _decode(where, lineno, offset, raw, length, max_line_bytes)
    if jsonl:
        return _jsonl_document(where, lineno, text, text_key)
    return [text.strip()] if text.strip() else []


def _row_paragraphs(path: str, row: int, value, text_key: str) -> list[str]:
    if value is None:
        raise _BadLine("no_text", f'{path}: row {row}: "{text_key}" is null')
    return _document_paragraphs(value)


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


def _jsonl_document(path: str, lineno: int, line: str, text_key: str = "text") -> list[str]:
    if not line.strip():
        return []
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine("invalid_json", f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _BadLine("no_text", f'{path}:{lineno}: expected a JSON object with a "{text_key}" field')
    if text_key not in obj:
        raise _BadLine("no_text", f'{path}:{lineno}: no "{text_key}" field (its fields: {", ".join(obj) or "none"});'
                                  " name the text's with text_key=")  # fmt: skip
    if not isinstance(obj[text_key], str):
        raise _BadLine("no_text", f'{path}:{lineno}: "{text_key}" is {type(obj[text_key]).__name__}, expected a string')
    return _document_paragraphs(obj[text_key])


def _document_paragraphs(text: str) -> list[str]:
    """A .jsonl or .parquet document's paragraphs: its lines, stripped, empties dropped."""
    return [p.strip() for p in text.splitlines() if p.strip()]

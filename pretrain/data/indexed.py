"""The prepared-corpus format: token ids in `<split>.bin`, boundaries and word starts in `<split>.idx`.

`<split>.bin`  token ids, little-endian uint16 when the vocab fits, else int32, all sentences back to back.
`<split>.idx`  a 64-byte header, then
               sent_offsets  int64[num_sents + 1]   token offset of each sentence (last = num_tokens)
               doc_offsets   int64[num_docs + 1]    sentence offset of each document (last = num_sents)
               word_start    uint8[num_tokens]      1 where a token starts a jieba word
Both files are memory-mapped on read, so a corpus of any size costs only what is touched.
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pretrain.errors import UserError

MAGIC = b"PLUGIDX\x00"
VERSION = 1
_HEADER = struct.Struct("<8sII QQQ 24x")  # magic, version, dtype code, tokens, sentences, documents
assert _HEADER.size == 64
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
_CODES = {v: k for k, v in _DTYPES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    return _DTYPES[1] if vocab_size <= np.iinfo(np.uint16).max + 1 else _DTYPES[2]


@dataclass
class IndexedCorpus:
    """A split of the prepared corpus: documents made of sentences made of tokens."""

    tokens: np.ndarray  # [num_tokens] uint16 or int32
    word_start: np.ndarray  # [num_tokens] uint8
    sent_offsets: np.ndarray  # [num_sents + 1] int64
    doc_offsets: np.ndarray  # [num_docs + 1] int64
    prefix: str | None = None  # `<dir>/<split>` when opened from disk: where its index cache lives (index_cache.py)

    @property
    def num_tokens(self) -> int:
        return int(self.sent_offsets[-1])

    @property
    def num_sents(self) -> int:
        return len(self.sent_offsets) - 1

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @cached_property
    def doc_token_offsets(self) -> np.ndarray:
        """[num_docs + 1] int64: the token offset of each document (last = num_tokens)."""
        return np.asarray(self.sent_offsets, dtype=np.int64)[np.asarray(self.doc_offsets, dtype=np.int64)]

    def document_of(self, t: int) -> int:
        """The document holding token offset t."""
        return int(np.searchsorted(self.doc_token_offsets, t, side="right")) - 1

    def is_sentence_boundary(self, t):
        """Whether token offset(s) t fall where a sentence starts or ends (offset num_tokens included)."""
        offsets = self.sent_offsets
        return offsets[np.minimum(np.searchsorted(offsets, t), len(offsets) - 1)] == t

    def sentence(self, s: int) -> np.ndarray:
        return self.tokens[self.sent_offsets[s] : self.sent_offsets[s + 1]]

    def doc_sentence_range(self, d: int) -> range:
        return range(int(self.doc_offsets[d]), int(self.doc_offsets[d + 1]))

    @classmethod
    def open(cls, prefix: str) -> "IndexedCorpus":
        """Memory-map `<prefix>.bin` and `<prefix>.idx`."""
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise UserError(f"{p}: missing (prepare the corpus with python -m pretrain.prepare)")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise UserError(f"{idx_path}: truncated header")
        magic, version, code, n_tok, n_sent, n_doc = _HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or code not in _DTYPES:
            raise UserError(f"{idx_path}: not a version-{VERSION} prepared index (magic {magic!r}, version {version})")
        dtype = _DTYPES[code]
        expect_idx = _HEADER.size + 8 * (n_sent + 1) + 8 * (n_doc + 1) + n_tok
        if os.path.getsize(idx_path) != expect_idx:
            raise UserError(f"{idx_path}: size {os.path.getsize(idx_path)} bytes, header implies {expect_idx}")
        if os.path.getsize(bin_path) != n_tok * dtype.itemsize:
            raise UserError(f"{bin_path}: size {os.path.getsize(bin_path)} bytes, index implies {n_tok * dtype.itemsize}")
        off = _HEADER.size
        sent_offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=off, shape=(n_sent + 1,))
        off += 8 * (n_sent + 1)
        doc_offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=off, shape=(n_doc + 1,))
        off += 8 * (n_doc + 1)
        word_start = np.memmap(idx_path, dtype=np.uint8, mode="r", offset=off, shape=(n_tok,)) if n_tok else np.zeros(0, np.uint8)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tok,)) if n_tok else np.zeros(0, dtype)
        return cls(tokens, word_start, np.asarray(sent_offsets), np.asarray(doc_offsets), prefix)


class IndexedWriter:
    """Streams documents to `<prefix>.bin` / `<prefix>.idx`; call `close()` to write the index.

    Memory does not grow with the corpus: token ids go straight to the .bin, and the index's three arrays go to
    temporary files beside it until close() assembles the .idx from them (its header needs the final counts).
    """

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = self.num_sents = self.num_docs = 0
        self._doc_sents = 0  # sentences of the document being written
        self._bin = open(prefix + ".bin", "wb", buffering=_BUFFER)
        self._parts = {name: open(f"{prefix}.idx.{name}.tmp", "wb", buffering=_BUFFER) for name in _PARTS}

    def add_sentences(self, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Sentences appended to the current document: ids and word starts back to back, each sentence's length
        in tokens (all > 0)."""
        lengths = np.asarray(lengths, dtype="<i8")
        assert len(ids) == len(starts) == lengths.sum() and (lengths > 0).all()
        self._bin.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._parts["word_start"].write(np.asarray(starts, dtype=np.uint8).tobytes())
        self._parts["sent_ends"].write((self.num_tokens + np.cumsum(lengths)).astype("<i8").tobytes())
        self.num_tokens += len(ids)
        self.num_sents += len(lengths)
        self._doc_sents += len(lengths)

    def end_document(self) -> int:
        """End the current document; returns its number of sentences (a document with none is not recorded)."""
        n, self._doc_sents = self._doc_sents, 0
        if n:
            self._parts["doc_ends"].write(np.array([self.num_sents], dtype="<i8").tobytes())
            self.num_docs += 1
        return n

    def add_document(self, sentences: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """One document: a list of (token ids, word-start flags) per sentence, each non-empty."""
        for ids, starts in sentences:
            self.add_sentences(ids, starts, [len(ids)])
        self.end_document()

    def close(self) -> None:
        self._bin.close()
        for part in self._parts.values():
            part.close()
        zero = np.zeros(1, dtype="<i8").tobytes()
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self.num_tokens, self.num_sents, self.num_docs))
            for name, prefix in (("sent_ends", zero), ("doc_ends", zero), ("word_start", b"")):
                f.write(prefix)
                with open(self._parts[name].name, "rb") as part:
                    shutil.copyfileobj(part, f, _BUFFER)
                os.remove(part.name)


_BUFFER = 1 << 20
_PARTS = ("sent_ends", "doc_ends", "word_start")  # sent_offsets and doc_offsets without their leading 0


def corpus_from_documents(documents: list[list[tuple[list[int], list[int]]]]) -> IndexedCorpus:
    """An in-memory corpus with the same layout, for tests and small tools."""
    ids, starts, sent_offsets, doc_offsets = [], [], [0], [0]
    for doc in documents:
        for s_ids, s_starts in doc:
            assert len(s_ids) == len(s_starts) and len(s_ids) > 0
            ids.extend(s_ids)
            starts.extend(s_starts)
            sent_offsets.append(len(ids))
        doc_offsets.append(len(sent_offsets) - 1)
    return IndexedCorpus(
        np.asarray(ids, dtype=np.int32),
        np.asarray(starts, dtype=np.uint8),
        np.asarray(sent_offsets, dtype=np.int64),
        np.asarray(doc_offsets, dtype=np.int64),
    )

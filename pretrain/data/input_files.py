"""The raw input as corpora ship it: which files an `input=` names, and their bytes or rows, read as they lie.

By name, a format and, after it, an optional compression:

.txt      UTF-8, one paragraph per line, a blank line between documents.
.jsonl    one JSON object per line; its `text_key` field ("text" unless told) is one document.
.parquet  one row per document: the `text_key` column, read in row batches with pyarrow.
.gz .bz2 .xz .zst   on .txt and .jsonl (corpus.jsonl.zst): decompressed as a stream, never to disk. A file named
          with a compression alone (corpus.zst) is read as .txt when input= names it; a directory's are passed
          over, as any file of another kind is.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
import os
import zlib
from typing import BinaryIO, Iterator

from pretrain.errors import UserError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow batch: memory holds one batch of documents


def file_kind(path: str, named: bool = False) -> tuple[str | None, str | None]:
    """(format, compression) of `path` by its name; format None where it is neither of FORMATS (`named`: the
    user named this file itself, so a bare compressed file is taken as .txt)."""
    name, compression = path.lower(), None
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name, compression = name[: -len(ext)], ext
            break
    fmt = next((ext for ext in FORMATS if name.endswith(ext)), None)
    if fmt == ".parquet" and compression is not None:
        return None, compression  # parquet compresses inside the file
    if fmt is None and named:
        fmt = ".txt"
    return fmt, compression


def find_input_files(spec: str) -> list[str]:
    """The input files named by `spec`: a file, a directory (its files of a known format, recursively) or a glob."""
    if os.path.isfile(spec):
        if file_kind(spec, named=True)[0] is None:
            raise UserError(f"input={spec}: a compressed .parquet file cannot be read (parquet compresses inside)")
        return [spec]
    matches = [spec] if os.path.isdir(spec) else glob.glob(spec, recursive=True)
    if not matches:
        raise UserError(f"input={spec}: {'matches no file' if glob.has_magic(spec) else 'no such file or directory'}")
    files, others = set(), set()
    for match in matches:
        found = [os.path.join(root, n) for root, _, names in os.walk(match) for n in names] if os.path.isdir(match) else [match]
        for path in filter(os.path.isfile, found):
            (files if file_kind(path)[0] is not None else others).add(path)
    if not files:
        seen = ", ".join(sorted(os.path.basename(p) for p in others)[:5]) or "nothing"
        raise UserError(f"input={spec}: no {', '.join(FORMATS)} files, plain or {'/'.join(COMPRESSIONS)}, found "
                        f"(found {seen}{', ...' if len(others) > 5 else ''})")  # fmt: skip
    return sorted(files)


def open_binary(path: str) -> BinaryIO:
    """`path` opened for reading its (decompressed) bytes."""
    compression = file_kind(path, named=True)[1]
    try:
        if compression == ".zst":
            return io.BufferedReader(_ZstdReader(path), 1 << 20)
        return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(compression, open)(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame. zstandard's own stream_reader ends quietly at a
    truncated frame (it gave 0 of 50 kB, no error): this one raises."""

    def __init__(self, path: str):
        import zstandard  # zstandard: only for .zst inputs

        self._zstd, self._file = zstandard, open(path, "rb")
        self._frame, self._pending, self._out, self._at = None, b"", b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            chunk, self._pending = self._pending or self._file.read(1 << 20), b""
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise self._zstd.ZstdError("the file ends inside a frame (truncated)")
                return 0
            if self._frame is None or self._frame.eof:  # the next frame (pzstd and appended files have several)
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            self._out, self._at = self._frame.decompress(chunk), 0
            if self._frame.eof:
                self._pending = self._frame.unused_data
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or truncated (compressed) file raises."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    try:
        import zstandard  # zstandard: only for .zst inputs

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def checked(path: str, items: Iterator) -> Iterator:
    """`items` (read from `path`), with a damaged or truncated file turned into one line naming it."""
    try:
        yield from items
    except read_errors() as e:
        compression = file_kind(path, named=True)[1]
        what = f"as {compression[1:]}" if compression else "it"
        raise UserError(f"{path}: cannot read {what} ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None


def parquet_texts(path: str, text_key: str) -> Iterator[tuple[int, object]]:
    """(row number from 1, value of the text_key column) of every row of a parquet file, a batch at a time."""
    import pyarrow.parquet as pq  # pyarrow: ~0.3 s to import; only for .parquet inputs

    try:
        f = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    with f:
        names = f.schema_arrow.names
        if text_key not in names:
            raise UserError(f'{path}: no column "{text_key}" (its columns: {", ".join(names)}); name it with text_key=')
        kind = f.schema_arrow.field(text_key).type
        if not (str(kind) in ("string", "large_string", "string_view")):
            raise UserError(f'{path}: column "{text_key}" holds {kind}, not text')
        row = 0
        for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value

"""A checkpoint's record of its own files, so that a reader can tell a damaged checkpoint from a healthy one.

When a checkpoint is committed (Checkpoints.save, after every rank's part is on disk and before `latest` names it),
`step<N>/manifest.json` records every file of it with its size and a checksum (xxh3-64: the fastest of the hashes
measured, bench/checkpoint_integrity.py). Each rank hashes its own files (zero_pp_rank_<R>_*, rng_rank<R>.pt), which
it has just written and which are likely still in its node's page cache; rank 0 writes the record. At PLUG's
27B parameters a checkpoint is about 430 GB: one process hashing it all would take minutes, the ranks together
take their 1/world of it each.

Readers (resume, export, generate, finetune, init_from) call `check` or `verify` once per checkpoint and process
before they read: a missing file, another size (truncated) or another checksum (flipped bits) is one line naming
the file and what differs. A checkpoint written before the record existed still loads, with one line saying it
carries none. A universal copy (`step<N>.universal`, elastic.py) is derived from a verified checkpoint and carries
no record of its own.
"""
from __future__ import annotations

import json
import os
import re
import sys
import zlib

import xxhash

from pretrain.errors import UserError

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_64"
FORMAT = 1
_CHUNK = 16 * 2**20
_OWNED = re.compile(r"^(?:zero_pp_rank_(\d+)_|rng_rank(\d+)\.pt$)")
_STEP_DIR = re.compile(r"^step(\d+)$")
_verified: dict[str, list[str] | None] = {}  # real path -> problems (None: no record); once per process


class _Crc32:
    """zlib.crc32 behind hashlib's interface (a manifest may name it; xxhash's wheels are missing somewhere)."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _hasher(algorithm: str):
    if algorithm == "crc32":
        return _Crc32()
    if algorithm in ("xxh3_64", "xxh64"):
        return getattr(xxhash, algorithm)()
    raise UserError(f"{MANIFEST}: checksum algorithm {algorithm} unknown to this version")


def digest(path: str, algorithm: str = ALGORITHM) -> str:
    h = _hasher(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(tag_dir: str) -> list[str]:
    """Every file of the checkpoint, relative to tag_dir, the record itself apart."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != MANIFEST and not rel.startswith(MANIFEST):
                out.append(rel)
    return sorted(out)


def owner(rel: str, world_size: int) -> int:
    """The rank that hashes file `rel`: the one whose file it is, rank 0 for the shared ones."""
    m = _OWNED.match(os.path.basename(rel))
    r = int(m.group(1) or m.group(2)) if m else 0
    return r if r < world_size else 0


def hash_share(tag_dir: str, rank: int, world_size: int) -> dict[str, list]:
    """{file: [size, checksum]} of this rank's files of the checkpoint."""
    return {rel: [os.path.getsize(os.path.join(tag_dir, rel)), digest(os.path.join(tag_dir, rel))]
            for rel in _files(tag_dir) if owner(rel, world_size) == rank}  # fmt: skip


def write_manifest(tag_dir: str, files: dict[str, list]) -> int:
    """Write the record of `files` ({file: [size, checksum]}) into tag_dir, whole (written beside, renamed);
    returns the checkpoint's size in bytes."""
    total = sum(size for size, _ in files.values())
    record = {"format": FORMAT, "algorithm": ALGORITHM, "bytes": total, "files": dict(sorted(files.items()))}
    tmp = os.path.join(tag_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, MANIFEST))
    return total


def record(tag_dir: str, rank: int, world_size: int) -> int:
    """Collective: every rank hashes its share of the committed files, rank 0 writes the record; returns the
    checkpoint's size in bytes on every rank."""
    from pretrain.training import distributed  # torch: only to record; checking stays torch-free

    shares = distributed.gather_objects(hash_share(tag_dir, rank, world_size))
    files = {rel: entry for share in shares for rel, entry in share.items()}
    if rank == 0:
        return write_manifest(tag_dir, files)
    return sum(size for size, _ in files.values())


def read_manifest(tag_dir: str) -> dict | None:
    """The record of tag_dir, None when it has none (written before records existed)."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["files"].items()
        return manifest
    except (ValueError, KeyError, AttributeError, TypeError):
        return {"unreadable": True}


def recorded_bytes(tag_dir: str) -> int | None:
    """The checkpoint's size as its record gives it; None without a (readable) record."""
    manifest = read_manifest(tag_dir)
    return manifest.get("bytes") if manifest else None


def problems(tag_dir: str) -> list[str] | None:
    """What differs between tag_dir and its record, one line each naming the file ([] when intact); None when the
    checkpoint has no record. Sizes first (a stat each), then the checksums of the files whose size agrees."""
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return None
    if manifest.get("unreadable"):
        return [f"{os.path.join(tag_dir, MANIFEST)}: not a readable record of the checkpoint's files (damaged)"]
    out, same_size = [], []
    for rel, (size, checksum) in manifest["files"].items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            out.append(f"{path}: missing (the record lists it, {size} bytes)")
        elif (have := os.path.getsize(path)) != size:
            out.append(f"{path}: {have} bytes, {size} recorded when the checkpoint was saved "
                       f"({'truncated' if have < size else 'grown'})")  # fmt: skip
        else:
            same_size.append((path, checksum))
    algorithm = manifest.get("algorithm", ALGORITHM)
    for path, checksum in same_size:
        if (have := digest(path, algorithm)) != checksum:
            out.append(f"{path}: {algorithm} checksum {have}, {checksum} recorded when the checkpoint was saved"
                       " (its bytes changed: damaged)")  # fmt: skip
    return out


def _prog() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("pretrain.") else "pretrain"


def verify(tag_dir: str) -> list[str] | None:
    """problems(tag_dir), once per process (a cache by real path). A checkpoint without a record is said so, once,
    on rank 0's stderr."""
    key = os.path.realpath(tag_dir)
    if key not in _verified:
        _verified[key] = problems(tag_dir)
        if _verified[key] is None and os.environ.get("RANK", "0") == "0":
            print(f"{_prog()}: {tag_dir}: no {MANIFEST}: a checkpoint written before checkpoints recorded their files"
                  " carries no record, so damage to its files cannot be detected", file=sys.stderr, flush=True)  # fmt: skip
    return _verified[key]


def step_of(tag_dir: str) -> int | None:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(tag_dir)))
    return int(m.group(1)) if m else None


def newest_intact(checkpoints_dir: str, below: int | None = None) -> str | None:
    """The newest step<N> directory of checkpoints_dir (N < below) that verifies (one without a record counts as
    intact: it cannot be checked); None when there is none."""
    if not os.path.isdir(checkpoints_dir):
        return None
    steps = sorted((int(m.group(1)), n) for n in os.listdir(checkpoints_dir) if (m := _STEP_DIR.match(n)))
    for step, name in reversed(steps):
        if below is not None and step >= below:
            continue
        tag_dir = os.path.join(checkpoints_dir, name)
        if not verify(tag_dir):
            return tag_dir
    return None


def older_hint(tag_dir: str, option: str | None) -> str:
    """`the newest intact checkpoint is <dir> (<option>)`, for the line refusing damaged checkpoint tag_dir;
    option formats {dir} and {step}, e.g. "train.resume={dir}" or "step={step}"."""
    step = step_of(tag_dir)
    older = newest_intact(os.path.dirname(os.path.normpath(tag_dir)), below=step) if step is not None else None
    if older is None:
        return "no older intact checkpoint beside it"
    if option is None:
        return f"the newest intact checkpoint is {older}"
    return f"the newest intact checkpoint is {os.path.basename(older)}: {option.format(dir=older, step=step_of(older))}"


def check(tag_dir: str, option: str | None = None) -> None:
    """Refuse a damaged checkpoint: one line naming the first file that differs and what, and the newest intact
    older checkpoint (`option` says how to ask for it, see older_hint)."""
    found = verify(tag_dir)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{found[0]}{more}; {older_hint(tag_dir, option)}")

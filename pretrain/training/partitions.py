"""Reading weights out of a ZeRO-3 checkpoint's partition files, whatever number of ranks wrote them: all of them
consolidated into one state dict (DeepSpeed's own tool), or any slice of one parameter where it lies."""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re

import torch

from pretrain.errors import UserError
from pretrain.training import integrity, safe_load


def consolidate(tag_dir: str, lazy: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO checkpoint, whatever number of ranks wrote it (DeepSpeed's own tool).
    lazy=True: the values assemble their tensor from the ranks' partitions on .contiguous(), one at a time
    (DeepSpeed's lazy mode), instead of all at once beside the partitions: half the peak memory."""
    # deepspeed: ~2 s to import; only when consolidating
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _verify(tag_dir)
    safe_load.check_dir(tag_dir)  # DeepSpeed's tool unpickles with weights_only=False: it sees vetted files only
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its per-shard progress report
        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir),
                                                        lazy_mode=lazy)  # fmt: skip


class PartitionReader:
    """Any slice of any parameter of a ZeRO-3 checkpoint, read from the ranks' fp32 partitions where they lie,
    whatever number of ranks wrote it: nothing is assembled, neither the model nor one whole parameter. The
    partition files are memory-mapped, so only the pages sliced are read. A rank of a run on M ranks that reads
    its own 1/M of each parameter holds about its share of the model and no more (init_from.load_into)."""

    def __init__(self, tag_dir: str):
        _verify(tag_dir)
        self.nonfinite: str | None = None  # the first parameter read that holds NaN or inf (see read)

        def files(kind: str) -> list[str]:
            found = glob.glob(os.path.join(tag_dir, f"zero_pp_rank_*_mp_rank_00_{kind}_states.pt"))
            return sorted(found, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))

        optim, model = files("optim"), files("model")
        if not optim or len(optim) != len(model):
            raise UserError(f"{tag_dir}: {len(optim)} optimizer and {len(model)} model-states partition files"
                            " (not a complete ZeRO-3 checkpoint)")  # fmt: skip
        self.world = len(optim)
        load = lambda f: safe_load.load(f, map_location="cpu", mmap=True)  # noqa: E731
        # Only the fp32 partitions are kept; Adam's moments beside them in the same files are never touched.
        flats = [load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim]
        states = [load(f) for f in model]
        self._where: dict[str, tuple[list[torch.Tensor], int, int]] = {}  # name -> (per-rank flat, offset, numel)
        for g, group in enumerate(states[0]["param_shapes"]):
            offset = 0  # each rank's flat group holds its partition of every parameter of the group, in order
            for name, shape in group.items():
                self._where[name] = ([flat[g] for flat in flats], offset, torch.Size(shape).numel())
                offset += -(-torch.Size(shape).numel() // self.world)
            if offset != flats[0][g].numel():
                raise UserError(f"{tag_dir}: partition group {g} holds {flats[0][g].numel()} elements, its"
                                f" parameters {offset} (not a ZeRO-3 checkpoint of {self.world} ranks?)")  # fmt: skip
        for name, shape in (states[0].get("frozen_param_shapes") or {}).items():  # outside the optimizer
            self._where[name] = ([s["frozen_param_fragments"][name].view(-1) for s in states], 0, torch.Size(shape).numel())

    def numel(self, name: str) -> int:
        return self._where[name][2]

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of parameter `name` flattened, in the checkpoint's dtype (fp32)."""
        parts, offset, numel = self._where[name]
        size = -(-numel // self.world)  # each rank's partition, the last one padded
        out = torch.empty(end - start, dtype=parts[0].dtype)
        for r in range(start // size, (end - 1) // size + 1) if end > start else ():
            lo, hi = max(start, r * size), min(end, (r + 1) * size)
            out[lo - start : hi - start] = parts[r][offset + lo - r * size : offset + hi - r * size]
        if self.nonfinite is None and not bool(torch.isfinite(out).all()):  # on the slice just read: no second pass
            self.nonfinite = name
        return out


def _verify(tag_dir: str) -> None:
    """The checkpoint against its record (integrity.py), once per process; a universal copy is derived from a
    verified one."""
    if not tag_dir.rstrip(os.sep).endswith(".universal"):
        integrity.check(tag_dir)


def refuse_nonfinite(tag_dir: str, name: str | None) -> None:
    """One line for a checkpoint whose parameter `name` holds NaN or inf (a diverged run's): nothing is written
    from it."""
    if name is not None:
        step = integrity.step_of(tag_dir)
        raise UserError(f"{tag_dir}: parameter {name} holds NaN or inf: the weights of step {step} are not finite"
                        " (a diverged run's); choose an earlier checkpoint")  # fmt: skip



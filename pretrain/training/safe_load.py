"""Checkpoint files are read without running code: a `.pt` file is a pickle, and unpickling can call anything it
names, so a checkpoint from someone else (init_from=, pretrain.generate, pretrain.export, a resume) could run code.

Every file of a checkpoint is first vetted (`check_dir`, `check_file`): torch lists the globals its pickle names
without unpickling it (torch.serialization.get_unsafe_globals_in_checkpoint), and any outside torch's own safe set
and SAFE_GLOBALS below (what DeepSpeed's and our files hold) refuses the checkpoint, with one line naming the file
and the type. Our own reads then unpickle with weights_only=True and that allow-list (`load`); DeepSpeed's reads
(engine.load_checkpoint, zero_to_fp32), which pass weights_only=False themselves, only ever see vetted files.
`trust_checkpoint=true` (`trust(True)`) is the explicit opt-out, for a checkpoint one wrote oneself with other types.
"""
from __future__ import annotations

import glob
import importlib
import os

import torch

from pretrain.errors import UserError
from pretrain.training import integrity

# What the files of a DeepSpeed ZeRO-3 checkpoint of ours name beyond torch's own safe set, by file:
# zero_pp_rank_*_optim_states.pt and universal optimizer_state.pt (DeepSpeed's loss scaler, even in fp32 and bf16,
# and its ZeRO stage enum), rng_rank*.pt (NumPy's generator state: an ndarray); the others hold tensors, dicts and
# numbers. Each of these is data: its constructor or __setstate__ runs nothing else.
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "numpy._core.multiarray._reconstruct",  # NumPy 2
    "numpy.core.multiarray._reconstruct",  # NumPy 1
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)
TRUST_KEY = "trust_checkpoint"
_trusted = False


def trust(on: bool) -> None:
    """trust_checkpoint=true: load checkpoint files whatever their pickles name (they may run code)."""
    global _trusted
    _trusted = bool(on)


def trust_setting(value) -> bool:
    """The trust_checkpoint setting, which must be a real boolean: a typo must not switch the check off."""
    if not isinstance(value, bool):
        raise UserError(f"{TRUST_KEY}={value}: must be true or false")
    return value


def check_file(path: str) -> None:
    """Refuse `path` (one line: the file and the first type outside the allow-list) unless trusted. Nothing in the
    file is run: torch reads the names out of its pickle without unpickling it."""
    if _trusted:
        return
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a zip-format torch file: damaged or truncated (its pickle cannot be vetted either)
        tag_dir = os.path.dirname(os.path.abspath(path))
        raise UserError(f"{path}: not a readable checkpoint file ({type(e).__name__}: damaged or truncated); "
                        f"{integrity.older_hint(tag_dir, None)}") from None  # fmt: skip
    unknown = [g for g in named if g not in SAFE_GLOBALS]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(f"{path}: holds {unknown[0]}{more}, a type outside the checkpoint allow-list: refused, as"
                        f" loading it could run code ({TRUST_KEY}=true loads it anyway)")  # fmt: skip


def check_dir(tag_dir: str) -> None:
    """check_file on every .pt file of a checkpoint directory (its zero/ subfolders too: a universal copy)."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "**", "*.pt"), recursive=True)):
        check_file(path)


def load(path: str, **kwargs):
    """torch.load of a vetted file with weights_only=True and the allow-list (weights_only=False when trusted)."""
    check_file(path)
    if _trusted:
        return torch.load(path, weights_only=False, **kwargs)
    with torch.serialization.safe_globals(_allowed()):
        return torch.load(path, weights_only=True, **kwargs)


def _allowed() -> list:
    """The allow-list's objects that exist in this environment (NumPy 1 or 2, this DeepSpeed)."""
    out = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append((getattr(importlib.import_module(module), attr), name))
        except (ImportError, AttributeError):
            continue
    return out

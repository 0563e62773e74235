"""Each rank's random generators: saved with every checkpoint (rng_rank<R>.pt) and restored on resume, so that a
resumed run draws the same dropout masks and samples as one that never stopped."""
from __future__ import annotations

import random

import numpy as np
import torch

from pretrain.errors import UserError


def rng_state() -> dict:
    """This rank's generators: Python's, NumPy's, torch's CPU one and, on a GPU, its CUDA one (dropout there)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: one GPU per rank
    return state


def seed_rng(seed: int) -> None:
    """torch.manual_seed seeds the CPU generator and every CUDA device's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise UserError("the checkpoint holds a CUDA generator state, and this run has no GPU (resume on GPUs)")
        torch.cuda.set_rng_state(state["cuda"])



"""Checkpoints: `from_pretrained` folders (safetensors + tokenizer), plus the state to resume a run."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from mft_pipeline.errors import MFTError
from mft_pipeline.files import atomic_write
from mft_pipeline.train import distributed

from mft_pipeline.run_folder import TRAINER_STATE as STATE


class CheckpointError(MFTError):
    """A resume checkpoint that cannot be used safely."""


def save_pretrained(model, tokenizer, path: Path, state: dict | None = None) -> None:
    """Write a folder that ``AutoModelForCausalLM.from_pretrained`` loads, replacing ``path`` whole.

    The folder is built beside ``path`` and swapped in, so a crash mid-save leaves the previous
    checkpoint intact. Under torchrun only rank 0 writes; an FSDP-sharded model is first gathered
    into one full state dict, so then every rank must call this.
    """
    weights = distributed.full_state_dict(model)
    if distributed.rank() != 0:
        return
    path = Path(path)

    def write(tmp: Path) -> None:
        if weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(plain(state), tmp / STATE)

    # One fixed temp name, so that a save killed midway is cleared by the next one.
    atomic_write(path, write, temp_name=path.name + ".tmp")


def load_state(path: Path) -> dict:
    """The resume state in ``path``, read with ``weights_only=True``: tensors and plain values only.

    A run folder can come from anyone; unpickling arbitrary objects from it could run their code,
    so a state holding anything else is refused instead.
    """
    file = Path(path) / STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise CheckpointError(
            f"{file}: holds Python objects besides tensors and plain values, and loading them could run code; "
            f"refusing it ({first_line.strip()}). Resume only from run folders this package wrote."
        ) from None


def plain(value):
    """``value`` with numpy scalars and arrays made Python numbers and tensors, so ``weights_only`` loading accepts it."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def rng_state(device: torch.device) -> dict:
    """The random generators' states a resumed run needs: the CPU one, and the device's own on CUDA."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        # Rank 0's state, as for the CPU generator: every rank resumes with the same one.
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Put back ``rng_state``'s generators; a CUDA state saved by a GPU run is ignored on CPU."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)

"""Checkpoints: `from_pretrained` folders (safetensors + tokenizer), plus the state to resume a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mft_pipeline.train import distributed

STATE = "trainer_state.pt"


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
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    if weights is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / STATE)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def find_resumable(run_dir: Path) -> Path | None:
    """The newest complete resume checkpoint, surviving a crash between the two renames above."""
    for name in ("last", "last.old"):
        if (run_dir / name / STATE).exists():
            return run_dir / name
    return None


def load_state(path: Path) -> dict:
    # The state holds optimizer tensors and plain Python values written by this package.
    return torch.load(path / STATE, map_location="cpu", weights_only=False)

"""The packaged GGUF model, de-quantized once into a folder that loads in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mft_pipeline.config import DEFAULT_MODEL
from mft_pipeline.models import load_model, load_tokenizer


def local_model(folder: Path, spec: str) -> str:
    """``spec`` as a safetensors ``from_pretrained`` folder at ``folder`` if it is a GGUF; other specs as given.

    De-quantizing the 4-bit GGUF takes about half a minute a load, and the quickstart and the
    quality benchmark load the model for every cache and run. The folder appears by a rename,
    so one that exists is complete.
    """
    if spec != DEFAULT_MODEL and not spec.endswith(".gguf"):
        return spec
    folder = Path(folder)
    if not (folder / "config.json").exists():
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        load_model(spec, torch.device("cpu"), torch.float32).save_pretrained(tmp)
        load_tokenizer(spec).save_pretrained(tmp)
        tmp.rename(folder)
    return str(folder)

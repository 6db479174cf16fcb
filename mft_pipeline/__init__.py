"""Minifinetuning (MFT) from cached teacher targets."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Exported names and the module that defines each. Loaded on first use, so that `import mft_pipeline.X`
# for a light module (the report, the run folder) does not pull in torch.
_EXPORTS = {
    "IGNORE_INDEX": "mft_pipeline.labels",
    "VARIANTS": "mft_pipeline.distill",
    "correction_weight": "mft_pipeline.distill",
    "dense_corrected_target": "mft_pipeline.distill",
    "fused_sparse_mft_loss": "mft_pipeline.distill",
    "sparse_mft_loss": "mft_pipeline.distill",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(__all__)

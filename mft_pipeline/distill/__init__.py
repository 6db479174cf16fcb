"""MFT correction and the sparse cached-target loss (spec sections 2 and 3)."""

from mft_pipeline.labels import IGNORE_INDEX

from .correction import VARIANTS, check_tau, correction_weight, dense_corrected_target
from .fused_loss import fused_sparse_mft_loss
from .sparse_loss import sparse_mft_loss

__all__ = [
    "IGNORE_INDEX",
    "VARIANTS",
    "check_tau",
    "correction_weight",
    "dense_corrected_target",
    "fused_sparse_mft_loss",
    "sparse_mft_loss",
]

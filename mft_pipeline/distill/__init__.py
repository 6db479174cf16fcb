"""MFT correction and the sparse cached-target loss (spec sections 2 and 3)."""

from .correction import VARIANTS, check_tau, correction_weight, dense_corrected_target
from .sparse_loss import IGNORE_INDEX, sparse_mft_loss

__all__ = [
    "IGNORE_INDEX",
    "VARIANTS",
    "check_tau",
    "correction_weight",
    "dense_corrected_target",
    "sparse_mft_loss",
]

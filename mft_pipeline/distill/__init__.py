"""MFT correction and the sparse cached-target loss (spec sections 2 and 3); the label-only baselines DFT and TALR."""

from mft_pipeline.labels import IGNORE_INDEX

from .correction import VARIANTS, check_tau, correction_weight, dense_corrected_target
from .fused_loss import fused_label_logprobs, fused_sparse_mft_loss
from .label_loss import LABEL_VARIANTS, label_only_loss
from .sparse_loss import sparse_mft_loss

__all__ = [
    "IGNORE_INDEX",
    "LABEL_VARIANTS",
    "VARIANTS",
    "check_tau",
    "correction_weight",
    "dense_corrected_target",
    "fused_label_logprobs",
    "fused_sparse_mft_loss",
    "label_only_loss",
    "sparse_mft_loss",
]

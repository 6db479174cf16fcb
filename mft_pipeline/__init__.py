"""Minifinetuning (MFT) from cached teacher targets."""

from mft_pipeline.distill import (
    IGNORE_INDEX,
    VARIANTS,
    correction_weight,
    dense_corrected_target,
    fused_sparse_mft_loss,
    sparse_mft_loss,
)

__version__ = "0.1.0"
__all__ = ["IGNORE_INDEX", "VARIANTS", "correction_weight", "dense_corrected_target", "fused_sparse_mft_loss", "sparse_mft_loss", "__version__"]

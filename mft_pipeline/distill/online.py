"""Online reference mode: the dense MFT loss against a live teacher's full distribution.

Not the default path. It exists to measure the sparse cache's fidelity: at ``k = vocab size``
the cached loss must agree with this one (docs/method.md, "The sparse loss over cached targets", property 1).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from mft_pipeline.labels import IGNORE_INDEX

from .correction import check_tau, check_variant, dense_corrected_target


def dense_mft_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    variant: str = "mft",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the student against the corrected dense teacher target.

    Args:
        logits: (B, T, V) student logits, ``logits[:, t]`` predicts ``labels[:, t]``.
        teacher_logits: (B, T, V) teacher logits for the same positions (no gradient needed).
        labels: (B, T) int64; ``ignore_index`` marks positions that do not count.
        tau, variant: as for ``sparse_mft_loss``.
        chunk_size: positions per chunk; the float32 vocab-sized intermediates of one chunk
            are recomputed in backward instead of being kept.

    Returns:
        ``(loss_sum, n_tokens)`` like ``sparse_mft_loss``: sum both over micro-batches and
        divide once per optimizer step.
    """
    tau = check_tau(tau)
    check_variant(variant)
    if logits.dim() != 3 or teacher_logits.shape != logits.shape or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits and teacher_logits (B, T, V) and labels (B, T); got {tuple(logits.shape)}, "
            f"{tuple(teacher_logits.shape)}, {tuple(labels.shape)}"
        )
    vocab = logits.shape[-1]
    n = logits.shape[0] * logits.shape[1]
    n_tokens = (labels != ignore_index).sum()
    if n == 0:
        return logits.float().sum(), n_tokens
    flat = (logits.reshape(n, vocab), teacher_logits.detach().reshape(n, vocab), labels.reshape(n).long())
    chunk_loss = functools.partial(_chunk_loss, tau=tau, variant=variant, ignore_index=ignore_index)
    use_checkpoint = torch.is_grad_enabled() and logits.requires_grad
    loss_sum = None
    for pieces in zip(*(t.split(chunk_size) for t in flat)):
        part = checkpoint(chunk_loss, *pieces, use_reentrant=False) if use_checkpoint else chunk_loss(*pieces)
        loss_sum = part if loss_sum is None else loss_sum + part
    return loss_sum, n_tokens


def _chunk_loss(logits, teacher_logits, labels, *, tau, variant, ignore_index) -> torch.Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    valid = labels != ignore_index
    teacher_probs = torch.softmax(teacher_logits.to(dtype), dim=-1)
    target = dense_corrected_target(teacher_probs, torch.where(valid, labels, 0), tau, variant)
    loss = -(target * torch.log_softmax(logits.to(dtype), dim=-1)).sum(-1)
    return torch.where(valid, loss, 0.0).sum()

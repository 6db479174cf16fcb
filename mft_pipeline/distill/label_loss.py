"""Label-only objectives: cross-entropy reweighted per token by the student's own label probability.

They need no teacher: a cache's top-k columns are ignored, only its labels are read. Each is a
weighted cross-entropy ``L = sum_i w_i * (-s_i)`` over the counted positions, where
``s_i = log p_theta(y_i)`` is the student's log-prob of the label and the weights ``w`` are
computed from ``s`` under stop-gradient (they scale each token's gradient, nothing flows
through them):

- ``dft`` (Dynamic Fine-Tuning, Wu et al. 2025, "On the Generalization of SFT"):
  ``w_i = p_theta(y_i)``.
- ``talr`` (Token-Adaptive Loss Reweighting, Lin et al. 2025, "SFT Doesn't Always Hurt General
  Capabilities"): ``w`` solves ``min_{w in simplex} sum_i w_i l_i + T sum_i w_i log w_i`` over the
  batch's n tokens, i.e. ``w_i = p_theta(y_i)^(1/T) / sum_j p_theta(y_j)^(1/T)``, with the
  temperature ``T`` the median over the batch's sequences of each sequence's mean token loss
  (so it falls as training goes on), and each weight floored at ``TALR_MIN_WEIGHT / n`` so no
  token is dropped entirely. Here the weights are scaled by n (mean 1 before the floor), so the
  returned sum divided by the token count is the paper's ``sum_i w_i l_i``.

The batch of ``talr`` is one call: the training loop's micro-batch, on each process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mft_pipeline.labels import IGNORE_INDEX

LABEL_VARIANTS = ("dft", "talr")
# Floor of a TALR weight, relative to the uniform weight 1/n.
TALR_MIN_WEIGHT = 0.01
# Lowest TALR temperature, so a batch the student already predicts perfectly gives finite weights.
TALR_MIN_TEMPERATURE = 1e-6


def dft_weights(label_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) DFT weights ``p(y)`` at counted positions (``mask`` True), 0 elsewhere."""
    return torch.where(mask, label_logprobs.exp(), 0.0)


def talr_temperature(label_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-dim TALR temperature: the median (the lower middle value for an even count, as ``torch.median``)
    over rows with a counted position of the row's mean token loss ``-s``, at least ``TALR_MIN_TEMPERATURE``."""
    counts = mask.sum(-1)
    row_loss = torch.where(mask, -label_logprobs, 0.0).sum(-1) / counts.clamp(min=1)
    return row_loss[counts > 0].median().clamp(min=TALR_MIN_TEMPERATURE)


def talr_weights(label_logprobs: torch.Tensor, mask: torch.Tensor, min_weight: float = TALR_MIN_WEIGHT) -> torch.Tensor:
    """(B, T) TALR weights: n times the softmax of ``s / T`` over the n counted positions, floored at ``min_weight``; 0 elsewhere."""
    n = mask.sum()
    scaled = torch.where(mask, label_logprobs / talr_temperature(label_logprobs, mask), float("-inf"))
    weights = n * scaled.reshape(-1).softmax(0).reshape(scaled.shape)
    return torch.where(mask, weights.clamp(min=min_weight), 0.0)


def label_only_loss(
    label_logprobs: torch.Tensor, labels: torch.Tensor, variant: str, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed weighted cross-entropy of one batch under ``variant`` (``dft`` or ``talr``).

    Args:
        label_logprobs: (B, T) float student log-probs of the labels (any value at ignored
            positions); the loss is differentiable through it.
        labels: (B, T) integer labels; ``ignore_index`` marks positions that do not count.
        variant: one of ``LABEL_VARIANTS``.

    Returns:
        ``(loss_sum, n_tokens)`` like ``sparse_mft_loss``: the 0-dim sum over counted positions of
        ``w_i * (-s_i)`` and the 0-dim int64 count. An all-ignored batch gives 0.
    """
    if variant not in LABEL_VARIANTS:
        raise ValueError(f"unknown label-only variant {variant!r}; expected one of {', '.join(LABEL_VARIANTS)}")
    if label_logprobs.shape != labels.shape:
        raise ValueError(f"label_logprobs shape {tuple(label_logprobs.shape)} must equal labels shape {tuple(labels.shape)}")
    mask = labels != ignore_index
    n_tokens = mask.sum()
    if not mask.any():
        return label_logprobs.sum() * 0.0, n_tokens
    s = label_logprobs.float() if label_logprobs.dtype in (torch.float16, torch.bfloat16) else label_logprobs
    with torch.no_grad():
        weights = dft_weights(s, mask) if variant == "dft" else talr_weights(s, mask)
    return -(weights * torch.where(mask, s, 0.0)).sum(), n_tokens


def logits_label_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, T) float32 label log-probs from (B, T, V) logits (0 at ignored positions): the unfused path."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long(), ignore_index=ignore_index, reduction="none")
    return -nll.view(labels.shape)

"""The MFT correction DC (spec section 2) as pure tensor functions.

The correction moves the teacher distribution ``p`` toward the one-hot label ``l``:
``c = (1 - a) * p + a * onehot(l)``. The weight ``a`` depends only on the teacher's
argmax probability ``p_m``, the label probability ``p_l``, whether the label is the
argmax, and the margin ``tau``; that is what lets one sparse cache serve every ``tau``.
"""

from __future__ import annotations

import math
import numbers

import torch
from mft_pipeline.errors import ConfigError

VARIANTS = ("mft", "ft", "distill+ft", "single-correction")
# The variants whose weight `a` depends on tau (the variant table below); the others ignore it.
TAU_VARIANTS = ("mft", "single-correction")


def check_tau(tau: float) -> float:
    """Return ``tau`` as a float, or raise ``ConfigError`` unless it is a finite number in [0, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise ConfigError(f"tau must be a number in [0, 1], got {tau!r}")
    tau = float(tau)
    if not math.isfinite(tau) or not 0.0 <= tau <= 1.0:
        raise ConfigError(f"tau must be a finite number in [0, 1], got {tau!r}")
    return tau


def check_variant(variant: str) -> str:
    """Return ``variant``, or raise ``ConfigError`` unless it is one of ``VARIANTS``."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def correction_weight(
    p_argmax: torch.Tensor,
    p_label: torch.Tensor,
    label_is_argmax: torch.Tensor,
    tau: float,
    variant: str = "mft",
) -> torch.Tensor:
    """Weight ``a`` of the one-hot label in the corrected target, per position.

    Args:
        p_argmax: (...) float, teacher probability of its argmax token ``p_m``.
        p_label: (...) float, teacher probability of the label ``p_l``.
        label_is_argmax: (...) bool, True where the label is the teacher's argmax
            (the "right prediction" branch).
        tau: margin in [0, 1].
        variant: one of ``VARIANTS`` (the ablations of paper Table 3).

    Returns:
        (...) tensor ``a`` in [0, 1], same dtype as ``p_argmax``/``p_label`` promoted.
    """
    tau = check_tau(tau)
    check_variant(variant)
    dtype = torch.promote_types(p_argmax.dtype, p_label.dtype)
    # Cached log-probs can round to slightly above 0, and garbage at ignored positions
    # can be anything; keep every probability inside [0, 1] so `a` stays in [0, 1].
    p_m = p_argmax.to(dtype).clamp(0.0, 1.0)
    p_l = p_label.to(dtype).clamp(0.0, 1.0)
    right = label_is_argmax.to(torch.bool)

    # Wrong branch: the denominator is >= 1 whenever p_m >= p_l (true for a real argmax);
    # the guard only protects inconsistent inputs from dividing by zero.
    gap = p_m - p_l
    wrong_den = 1.0 + gap
    wrong_den = torch.where(wrong_den > 0, wrong_den, torch.ones_like(wrong_den))
    a_wrong = ((gap + tau) / wrong_den).clamp(0.0, 1.0)

    # Right branch: at p_l == 1 the formula is 0/0; the spec defines a = 1 there. The
    # denominator is replaced (not just the result) so no inf/NaN reaches a backward pass.
    certain = p_l >= 1.0
    right_den = torch.where(certain, torch.ones_like(p_l), 1.0 - p_l)
    a_right = (torch.clamp(p_l + tau, max=1.0) - p_l) / right_den
    a_right = torch.where(certain, torch.ones_like(a_right), a_right).clamp(0.0, 1.0)

    # The variant table of spec section 2: (right-prediction a, wrong-prediction a).
    ones, zeros = torch.ones_like(a_wrong), torch.zeros_like(a_wrong)
    a_if_right, a_if_wrong = {
        "ft": (ones, ones),
        "distill+ft": (zeros, ones),
        "single-correction": (zeros, a_wrong),
        "mft": (a_right, a_wrong),
    }[variant]
    return torch.where(right, a_if_right, a_if_wrong)


def dense_corrected_target(
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    variant: str = "mft",
) -> torch.Tensor:
    """Corrected target ``c = (1 - a) * p + a * onehot(l)`` over the full vocabulary.

    For an online (teacher-in-the-loop) mode; the cached pipeline uses the sparse loss.

    Args:
        teacher_probs: (..., V) float, teacher distribution ``p`` (rows sum to 1).
        labels: (...) int64, label ids in [0, V). Ignored positions must be replaced by
            a valid id (e.g. 0) by the caller and masked out of the loss.
        tau: margin in [0, 1].
        variant: one of ``VARIANTS``.

    Returns:
        (..., V) tensor ``c``, same dtype as ``teacher_probs``.
    """
    if teacher_probs.dim() < 1 or labels.shape != teacher_probs.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal teacher_probs shape "
            f"{tuple(teacher_probs.shape)} without its last (vocab) dimension"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    vocab = teacher_probs.shape[-1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}); mask ignored positions before calling")

    labels = labels.long()
    p_m, argmax = teacher_probs.max(dim=-1)
    p_l = teacher_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    a = correction_weight(p_m, p_l, argmax == labels, tau, variant).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(labels, vocab).to(teacher_probs.dtype)
    return (1.0 - a) * teacher_probs + a * onehot

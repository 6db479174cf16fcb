"""The MFT loss against sparse cached teacher targets (spec section 3).

The cache keeps, per position, the teacher's top-k ids and log-probs plus the exact
log-prob of the label. The target lives on the support ``S = topk ∪ {l}`` plus one tail
bucket ``R`` holding the teacher's uncached mass, so the student is asked to keep as
much total mass outside ``S`` as the teacher had, without saying where.

A cache made with ``--tail-samples N`` also holds, per position, N ids drawn i.i.d. from the
teacher's distribution restricted to the vocabulary outside ``S``. Given them (``tail_ids``),
the tail term ``-c_R * log(student mass outside S)`` is replaced by
``-c_R * mean_n s_{j_n}``: the dense loss's tail part is ``-(1 - a) * sum_{j not in S} p_j s_j
= -c_R * E_{j ~ p | not S}[s_j]``, and the sample mean is linear in ``s``, so the loss and
its gradient are unbiased estimates of the dense corrected cross-entropy's (Anshumann et al.
2025, "Sparse Logit Sampling").
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from mft_pipeline.labels import IGNORE_INDEX

from .correction import check_tau, check_variant, correction_weight

TAILS = ("bucket", "renormalize")


def sparse_mft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    label_logprobs: torch.Tensor,
    tau: float,
    variant: str = "mft",
    ignore_index: int = IGNORE_INDEX,
    tail: str = "bucket",
    chunk_size: int = 4096,
    tail_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed MFT cross-entropy of the student against the corrected sparse teacher target.

    Args:
        logits: (B, T, V) student logits, aligned so ``logits[:, t]`` predicts
            ``labels[:, t]``. Any float dtype; computed in at least float32. A contiguous
            tensor is used without a copy; a non-contiguous one such as ``logits[:, :-1]``
            is copied once (shift the labels instead to avoid that).
        labels: (B, T) int64 label ids; ``ignore_index`` marks positions that do not count.
        topk_ids: (B, T, k) int64 teacher top-k ids sorted by probability (``[..., 0]`` is
            the argmax). May be garbage at ignored positions.
        topk_logprobs: (B, T, k) float teacher log-probs of ``topk_ids``; ``[..., 0]`` is the
            exact argmax log-prob.
        label_logprobs: (B, T) float teacher log-prob of the label, in or out of the top-k.
        tau: correction margin in [0, 1].
        variant: one of ``correction.VARIANTS``.
        ignore_index: label value of positions to skip.
        tail: "bucket" (default, spec) keeps the teacher's uncached mass as one tail target;
            "renormalize" drops it and rescales the teacher over ``S`` to sum to 1 first.
        chunk_size: positions per chunk; bounds the float32 vocab-sized intermediates, which
            are recomputed in backward instead of being kept.
        tail_ids: optional (B, T, N) integer ids sampled by stage one from the teacher's
            distribution outside ``S`` (``--tail-samples N``). Given, the tail mass ``c_R`` is
            spread over them, ``c_R / N`` each, instead of the bucket: an unbiased estimate
            of the dense loss. Positions whose ``S`` is the whole vocabulary give them no
            weight (they may hold anything there), nor does ``tail="renormalize"``.

    Returns:
        ``(loss_sum, n_tokens)``: 0-dim loss summed over non-ignored positions
        (differentiable w.r.t. ``logits``) and 0-dim int64 count of those positions. Sum
        both over micro-batches and divide once per optimizer step.
    """
    tau = check_tau(tau)
    check_variant(variant)
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; expected one of {', '.join(TAILS)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_inputs(logits, labels, topk_ids, topk_logprobs, label_logprobs, tail_ids)

    batch, seq, vocab = logits.shape
    k = topk_ids.shape[-1]
    n = batch * seq
    valid = labels != ignore_index
    n_tokens = valid.sum()
    # Ignored positions may hold anything; only the counted ones must be real ids. This is
    # one host sync per call, cheap next to the forward pass, and turns a silent wrong
    # gather into a clear error.
    bad_ids = (topk_ids < 0) | (topk_ids >= vocab)
    if tail_ids is not None:
        bad_ids = torch.cat([bad_ids, (tail_ids < 0) | (tail_ids >= vocab)], dim=-1)
    bad_labels = (labels < 0) | (labels >= vocab)
    if (valid & (bad_labels | bad_ids.any(-1))).any():
        raise ValueError(f"labels, topk_ids and tail_ids of non-ignored positions must be in [0, {vocab})")

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    if n == 0:
        # Summing the empty logits keeps the result attached to the graph, so a caller's
        # backward() still works.
        return logits.to(compute_dtype).sum(), n_tokens

    flat = (
        logits.reshape(n, vocab),
        labels.reshape(n).long(),
        topk_ids.reshape(n, k).long(),
        topk_logprobs.reshape(n, k),
        label_logprobs.reshape(n),
    )
    if tail_ids is not None:
        flat += (tail_ids.reshape(n, tail_ids.shape[-1]).long(),)
    chunk_loss = functools.partial(
        _chunk_loss, tau=tau, variant=variant, ignore_index=ignore_index, tail=tail
    )
    # Checkpointing keeps only the (views of the) input logits alive between forward and
    # backward; each chunk's float32 log-softmax is rebuilt during backward.
    use_checkpoint = torch.is_grad_enabled() and logits.requires_grad
    loss_sum = None
    for pieces in zip(*(t.split(chunk_size) for t in flat)):
        if use_checkpoint:
            part = checkpoint(chunk_loss, *pieces, use_reentrant=False)
        else:
            part = chunk_loss(*pieces)
        loss_sum = part if loss_sum is None else loss_sum + part
    return loss_sum, n_tokens


def _check_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    label_logprobs: torch.Tensor,
    tail_ids: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` on shapes or dtypes that do not fit the documented layout."""
    if logits.dim() != 3 or not logits.dtype.is_floating_point:
        raise ValueError(
            f"logits must be a (B, T, V) float tensor, got {logits.dtype} {tuple(logits.shape)}"
        )
    batch, seq, vocab = logits.shape
    for name, tensor in (("labels", labels), ("topk_ids", topk_ids), ("tail_ids", tail_ids)):
        if tensor is not None and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")
    for name, tensor in (("topk_logprobs", topk_logprobs), ("label_logprobs", label_logprobs)):
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor, got {tensor.dtype}")
    for name, tensor in (("labels", labels), ("label_logprobs", label_logprobs)):
        if tensor.shape != (batch, seq):
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must be (B, T) = {(batch, seq)}")
    if topk_ids.dim() != 3 or topk_ids.shape[:2] != (batch, seq):
        raise ValueError(
            f"topk_ids shape {tuple(topk_ids.shape)} must be (B, T, k) with (B, T) = {(batch, seq)}"
        )
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"topk_logprobs shape {tuple(topk_logprobs.shape)} must equal "
            f"topk_ids shape {tuple(topk_ids.shape)}"
        )
    k = topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size must be in [1, V={vocab}], got {k}")
    if tail_ids is not None and (tail_ids.dim() != 3 or tail_ids.shape[:2] != (batch, seq) or tail_ids.shape[-1] < 1):
        raise ValueError(
            f"tail_ids shape {tuple(tail_ids.shape)} must be (B, T, N) with (B, T) = {(batch, seq)} and N >= 1 "
            "(pass None for the tail bucket)"
        )


def corrected_targets(
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    label_logprobs: torch.Tensor,
    *,
    tau: float,
    variant: str,
    tail: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The corrected sparse target of n positions: the teacher side of both sparse losses.

    Shapes: labels (n,) and topk_ids (n, k), ids in range; topk_logprobs (n, k) with the
    argmax first; label_logprobs (n,). Returns ``c_top`` (n, k), 0 where a top-k id is the
    label (the label is counted once, with its exact probability), ``c_label`` (n,) and
    ``c_tail`` (n,), the mass of the tail bucket (0 under ``tail="renormalize"``).
    """
    p_top = topk_logprobs.to(dtype).exp().clamp(0.0, 1.0)  # (n, k)
    p_l = label_logprobs.to(dtype).exp().clamp(0.0, 1.0)  # (n,)
    p_m = p_top[:, 0]
    label_is_argmax = topk_ids[:, 0] == labels
    p_top = p_top.masked_fill(topk_ids == labels[:, None], 0.0)
    support_mass = p_top.sum(-1) + p_l
    if tail == "renormalize":
        scale = 1.0 / support_mass.clamp_min(torch.finfo(dtype).tiny)
        p_top, p_l, p_m = p_top * scale[:, None], p_l * scale, p_m * scale
        uncached = torch.zeros_like(p_l)
    else:
        uncached = (1.0 - support_mass).clamp_min(0.0)
    a = correction_weight(p_m, p_l, label_is_argmax, tau, variant)
    return (1.0 - a)[:, None] * p_top, (1.0 - a) * p_l + a, (1.0 - a) * uncached


def _chunk_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    label_logprobs: torch.Tensor,
    tail_ids: torch.Tensor | None = None,
    *,
    tau: float,
    variant: str,
    ignore_index: int,
    tail: str,
) -> torch.Tensor:
    """Summed loss of n flattened positions.

    Shapes: logits (n, V), labels (n,), topk_ids and topk_logprobs (n, k), label_logprobs (n,),
    tail_ids (n, N) or None (the bucket).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    vocab = z.shape[-1]
    valid = labels != ignore_index
    # Ignored positions may carry garbage ids; clamping keeps the gathers in range.
    label = torch.where(valid, labels, 0).clamp(0, vocab - 1).unsqueeze(-1)  # (n, 1)
    ids = topk_ids.clamp(0, vocab - 1)  # (n, k)

    # Teacher side. Ignored positions may hold NaN; zeroing their target weights (rather than
    # masking the loss afterwards) keeps 0 * NaN out of the gradient.
    c_top, c_label, c_tail = corrected_targets(label[:, 0], ids, topk_logprobs, label_logprobs, tau=tau, variant=variant, tail=tail, dtype=dtype)
    c_top = torch.where(valid[:, None], c_top, 0.0)  # (n, k)
    c_label = torch.where(valid, c_label, 0.0)  # (n,)
    c_tail = torch.where(valid, c_tail, 0.0)  # (n,)

    # Student side.
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    s_top = z.gather(-1, ids) - lse[:, None]
    s_label = z.gather(-1, label).squeeze(-1) - lse
    support = torch.zeros_like(z, dtype=torch.bool)
    support.scatter_(-1, ids, True).scatter_(-1, label, True)
    # With an empty tail any positive c_tail is rounding noise of the cached log-probs (and
    # the sampled ids are placeholders); multiplying it by the floor would swamp the loss.
    use_tail = (c_tail > 0) & ~support.all(-1)
    if tail_ids is None:
        # A finite floor instead of -inf: when S covers the whole vocabulary the tail
        # logsumexp stays finite, and so does its gradient (which is then multiplied by 0).
        tail_logits = z.masked_fill(support, torch.finfo(dtype).min)
        log_tail = torch.logsumexp(tail_logits, dim=-1) - lse
    else:
        # The sampled estimate of E_{j ~ p outside S}[s_j]; c_R times it replaces c_R log(tail mass).
        log_tail = (z.gather(-1, tail_ids.clamp(0, vocab - 1)) - lse[:, None]).mean(-1)
    tail_term = torch.where(use_tail, c_tail * log_tail, 0.0)

    loss = -(c_top * s_top).sum(-1) - c_label * s_label - tail_term
    return loss.sum()

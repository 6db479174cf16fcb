"""The sparse MFT loss taken straight from the final hidden states: logits exist one chunk at a time.

``sparse_mft_loss`` needs the model's whole (B, T, V) logits, which at a 128k vocabulary and
8 × 2048 tokens is 8 GB in float32 before the loss starts. Here the output head is applied
inside the loss, chunk by chunk of positions (the fused-linear pattern of Liger-Kernel): for
each chunk the forward pass computes its float32 logits, its loss and the gradient of that
loss with respect to the chunk's logits, turns that gradient into the chunk's share of the
hidden-state, weight and bias gradients, and drops the chunk. Backward then only scales the
stored gradients by the incoming one.

The gradient of a chunk is written in closed form, in place over the chunk's logits: going
through autograd on ``sparse_mft_loss``'s chunk function made the loss 3-6 times slower than
Hugging Face's cross-entropy on CPU (some 25 vocab-sized passes and allocations per chunk
instead of a few fused kernels). The corrected targets are ``sparse_loss.corrected_targets``, the
same function ``sparse_mft_loss`` uses; the tests hold the two losses equal in value and
gradient for every variant and tail, with and without sampled tail ids.
"""

from __future__ import annotations

import torch

from mft_pipeline.labels import IGNORE_INDEX

from .correction import check_tau, check_variant
from .sparse_loss import TAILS, _check_inputs, corrected_targets

# Fewest positions per default chunk, so a small call does not launch kernels row by row.
MIN_CHUNK = 32


def fused_sparse_mft_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    label_logprobs: torch.Tensor,
    tau: float,
    variant: str = "mft",
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    *,
    tail: str = "bucket",
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    tail_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_mft_loss`` of the logits ``transform(hidden @ lm_head_weight.T + bias)``, never built whole.

    The logits of position ``(b, t)`` are ``z = hidden[b, t] @ lm_head_weight.T + bias``, then
    ``z = z * logit_scale`` if given, then ``z = softcap * tanh(z / softcap)`` if given (the
    order of Hugging Face models that have both kinds of transform). ``logit_scale``
    multiplies: Cohere's ``logit_scale`` is passed as is, Granite's ``logits_scaling``
    (which divides) as its reciprocal. Only non-ignored positions are computed, so padding
    costs nothing.

    Args:
        hidden: (B, T, H) final hidden states, ``hidden[:, t]`` predicts ``labels[:, t]``.
            Any float dtype.
        lm_head_weight: (V, H) output-head weight.
        labels, topk_ids, topk_logprobs, label_logprobs, tau, variant, ignore_index, tail:
            exactly as for ``sparse_mft_loss``: labels (B, T), topk_ids and topk_logprobs
            (B, T, k), label_logprobs (B, T).
        chunk_size: positions per chunk; by default ``default_chunk_size(n, V, H)`` for n
            counted positions.
        bias: optional (V,) output-head bias.
        logit_scale: optional factor applied to the logits.
        softcap: optional final-logit soft-capping value (Gemma 2 style).
        tail_ids: optional (B, T, N) sampled tail ids, exactly as for ``sparse_mft_loss``:
            each takes ``c_R / N`` of the target instead of the tail bucket. Their term is a
            gather of N log-probs per position, so no (B, T, V) tensor appears here either.

    The head matmuls run in the autocast dtype when autocast is on for ``hidden``'s device,
    else in the promoted dtype of ``hidden`` and the weight; logits and the loss are float32
    (float64 if the inputs are). Gradients of the weight and bias are accumulated in at
    least float32 and returned in their own dtypes.

    Returns:
        ``(loss_sum, n_tokens)`` as ``sparse_mft_loss``: the 0-dim summed loss,
        differentiable w.r.t. ``hidden``, ``lm_head_weight`` and ``bias``, and the 0-dim int64
        count of non-ignored positions.
    """
    tau = check_tau(tau)
    check_variant(variant)
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; expected one of {', '.join(TAILS)}")
    _check_head(hidden, lm_head_weight, bias, chunk_size, logit_scale, softcap)
    batch, seq, width = hidden.shape
    vocab = lm_head_weight.shape[0]
    # The shape and dtype rules are those of sparse_mft_loss; a meta tensor stands in for
    # the logits, so checking them allocates nothing.
    _check_inputs(hidden.new_empty((batch, seq, vocab), device="meta"), labels, topk_ids, topk_logprobs, label_logprobs, tail_ids)

    k = topk_ids.shape[-1]
    valid = (labels != ignore_index).reshape(-1)
    n_tokens = valid.sum()
    rows = valid.nonzero().squeeze(-1)  # one host sync, which the range check needs anyway
    flat_ids = topk_ids.reshape(-1, k)[rows].long()
    flat_labels = labels.reshape(-1)[rows].long()
    flat_tail = None if tail_ids is None else tail_ids.reshape(-1, tail_ids.shape[-1])[rows].long()
    bad_ids = ((flat_ids < 0) | (flat_ids >= vocab)).any(-1)
    if flat_tail is not None:
        bad_ids |= ((flat_tail < 0) | (flat_tail >= vocab)).any(-1)
    if ((flat_labels < 0) | (flat_labels >= vocab) | bad_ids).any():
        raise ValueError(f"labels, topk_ids and tail_ids of non-ignored positions must be in [0, {vocab})")

    if rows.numel() == 0:
        # Empty sums: 0, attached to every input so a caller's backward() (and DDP) still works.
        zero = hidden.reshape(-1)[:0].float().sum() + lm_head_weight.reshape(-1)[:0].float().sum()
        if bias is not None:
            zero = zero + bias[:0].float().sum()
        return zero, n_tokens

    options = _Options(
        chunk_size=chunk_size or default_chunk_size(rows.numel(), vocab, width),
        matmul_dtype=_matmul_dtype(hidden, lm_head_weight),
        logit_scale=None if logit_scale is None else float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        tau=tau,
        variant=variant,
        tail=tail,
    )
    loss_sum = _FusedSparseMFT.apply(
        hidden.reshape(-1, width)[rows],  # an ordinary indexing op: autograd scatters its gradient back
        lm_head_weight,
        bias,
        flat_labels,
        flat_ids,
        topk_logprobs.reshape(-1, k)[rows],
        label_logprobs.reshape(-1)[rows],
        flat_tail,
        options,
    )
    return loss_sum, n_tokens


def default_chunk_size(positions: int, vocab: int, hidden: int) -> int:
    """Positions per chunk: ``max(n * H / V, H / 2, MIN_CHUNK)`` for n counted positions.

    One chunk's float32 logits are then about as large as the call's hidden states, or as
    half the float32 weight gradient, whichever is more. The first bound lets the working set
    (about three chunks of logits) grow with the batch like the model's activations do, never
    with B × T × V; the second keeps the (V, H) weight-gradient update, which every chunk
    pays, a small share of the chunk's own work.
    """
    return max(MIN_CHUNK, hidden // 2, -(-positions * hidden // vocab))


def _check_head(hidden, lm_head_weight, bias, chunk_size, logit_scale, softcap) -> None:
    """The shape and value rules of the head arguments: hidden (B, T, H), weight (V, H), bias (V,)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a (B, T, H) float tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    width = hidden.shape[-1]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != width or not lm_head_weight.dtype.is_floating_point:
        raise ValueError(
            f"lm_head_weight must be a (V, H={width}) float tensor, got {lm_head_weight.dtype} {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be (V,) = ({vocab},)")


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if hidden.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h, w, b, loss_dtype, options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, V) logits ``transform(h @ w.T + b)`` in ``loss_dtype``, and what the soft-cap's derivative needs (tanh) or None."""
    raw = (h @ w.T).to(loss_dtype)
    if b is not None:
        raw += b
    # The model's transform, keeping what its derivative needs: scale, then soft-cap.
    if options.softcap is not None:
        t = raw.mul_((options.logit_scale or 1.0) / options.softcap).tanh_()
        return t * options.softcap, t
    if options.logit_scale is not None:
        return raw.mul_(options.logit_scale), None
    return raw, None


def _through_transform(grad: torch.Tensor, t: torch.Tensor | None, options) -> torch.Tensor:
    """The gradient w.r.t. the logits turned, in place, into the gradient w.r.t. ``h @ w.T + b``."""
    if options.softcap is not None:
        grad.mul_(t.square_().neg_().add_(1.0))  # d(cap * tanh(x / cap)) = 1 - tanh^2
    if options.logit_scale is not None:
        grad.mul_(options.logit_scale)
    return grad


class _Options:
    """Non-tensor settings handed through ``autograd.Function.apply``."""

    def __init__(self, *, chunk_size, matmul_dtype, logit_scale, softcap, tau=None, variant=None, tail=None):
        self.chunk_size = chunk_size
        self.matmul_dtype = matmul_dtype
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.tau = tau
        self.variant = variant
        self.tail = tail


def _chunk_loss_and_grad(z, labels, topk_ids, topk_logprobs, label_logprobs, tail_ids, options: _Options, need_grad: bool):
    """Summed loss of n counted positions and, if asked, its gradient w.r.t. the logits.

    Shapes: z (n, V) float logits (overwritten), labels (n,), topk_ids and topk_logprobs
    (n, k), label_logprobs (n,), tail_ids (n, N) or None. Returns (0-dim loss, (n, V)
    gradient or None).

    With ``s = log_softmax(z)``, ``C = sum(c)`` over the support and the used tail, and the
    tail's own log-softmax ``u`` over the logits with S masked out:
    ``L = -sum_S c_i s_i - c_R log(tail mass)``, where ``log(tail mass) = s_j - u_j`` for any
    j outside S, and ``dL/dz = C exp(s) - c_R exp(u) - c [on S]``. Both log-softmaxes are
    single fused kernels; a logsumexp is several passes on CPU.

    With sampled tail ids ``j_1..j_N`` the tail term is ``-(c_R / N) sum_n s_{j_n}`` instead,
    whose gradient is ``(c_R / N) sum_n (exp(s) - onehot(j_n))``: the ``c_R exp(s)`` part joins
    ``C exp(s)`` and the rest is a scatter of ``-c_R / N`` onto the sampled ids, so ``u`` is
    not needed.
    """
    dtype = z.dtype
    vocab, k = z.shape[-1], topk_ids.shape[-1]
    c_top, c_label, c_tail = corrected_targets(
        labels, topk_ids, topk_logprobs, label_logprobs, tau=options.tau, variant=options.variant, tail=options.tail, dtype=dtype
    )
    label = labels[:, None]
    s = torch.log_softmax(z, dim=-1)
    loss = -(c_top * s.gather(-1, topk_ids)).sum(-1) - c_label * s.gather(-1, label).squeeze(-1)
    u = None
    if options.tail == "bucket":
        support = torch.cat([topk_ids, label], dim=-1)  # (n, k + 1)
        # A column outside S: among the first k + 2 columns at least one is, unless S is everything.
        candidates = torch.arange(min(k + 2, vocab), device=s.device)
        outside = ~(candidates[None, :, None] == support[:, None, :]).any(-1)  # (n, k + 2)
        # With an empty tail any positive c_tail is rounding noise of the cached log-probs (and
        # sampled ids are placeholders there).
        c_tail = torch.where((c_tail > 0) & outside.any(-1), c_tail, 0.0)
        if tail_ids is None:
            # A finite floor instead of -inf on S, so a fully covered row stays finite (and unused).
            floor = torch.finfo(dtype).min
            u = torch.log_softmax(z.scatter_(-1, topk_ids, floor).scatter_(-1, label, floor), dim=-1)
            del z
            j = candidates[outside.float().argmax(-1)][:, None]  # argmax of a float mask: supported on every device
            log_tail = (s.gather(-1, j) - u.gather(-1, j)).squeeze(-1)
        else:
            del z
            log_tail = s.gather(-1, tail_ids).mean(-1)
        loss = loss - torch.where(c_tail > 0, c_tail * log_tail, 0.0)
    else:
        del z
        c_tail = torch.zeros_like(c_label)
    loss = loss.sum()
    if not need_grad:
        return loss, None
    total = c_top.sum(-1) + c_label + c_tail  # C
    # C exp(s) as exp(s + log C), in place; C = 0 gives exp(-inf) = 0.
    grad = s.add_(total.log()[:, None]).exp_()
    if u is not None:
        grad.sub_(u.add_(c_tail.log()[:, None]).exp_())
        del u
    elif tail_ids is not None:
        grad.scatter_add_(-1, tail_ids, (-c_tail / tail_ids.shape[-1])[:, None].expand(tail_ids.shape))
    # On the support: minus its target. A label inside the top-k has c_top = 0 there.
    grad.scatter_add_(-1, topk_ids, -c_top).scatter_add_(-1, label, -c_label[:, None])
    return loss, grad


def _accumulate(grad, h, w, piece, first, grad_hidden, grad_weight, grad_bias, options) -> None:
    """Add one chunk's share to the hidden, weight and bias gradients, from its gradient w.r.t. ``h @ w.T + b``."""
    g = grad.to(options.matmul_dtype)
    if grad_hidden is not None:
        torch.mm(g, w, out=grad_hidden[piece])
    if grad_weight is not None:
        if g.dtype != grad_weight.dtype:
            grad_weight += (g.T @ h).to(grad_weight.dtype)
        elif first:
            torch.mm(g.T, h, out=grad_weight)  # no zero fill: the first chunk writes it
        else:
            grad_weight.addmm_(g.T, h)
    if grad_bias is not None:
        grad_bias += grad.sum(0).to(grad_bias.dtype)


class _FusedSparseMFT(torch.autograd.Function):
    """Loss over n valid positions; all gradients are computed in forward, chunk by chunk.

    Shapes: hidden (n, H), weight (V, H), bias (V,) or None, labels (n,), topk_ids and
    topk_logprobs (n, k), label_logprobs (n,), tail_ids (n, N) or None.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk_ids, topk_logprobs, label_logprobs, tail_ids, options):
        need_grad = any(ctx.needs_input_grad[:3])
        loss_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        # Autocast is handled by hand: matmuls in options.matmul_dtype, everything else float32.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(options.matmul_dtype)
            h_all = hidden.detach().to(options.matmul_dtype)
            b = None if bias is None else bias.detach().to(loss_dtype)
            grad_hidden = torch.empty_like(h_all) if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:
                # Written whole by the first chunk when it has the accumulator's dtype; else summed into zeros.
                make = torch.empty if options.matmul_dtype == acc_dtype else torch.zeros
                grad_weight = make(weight.shape, dtype=acc_dtype, device=weight.device)
            grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if bias is not None and ctx.needs_input_grad[2] else None
            loss_sum = torch.zeros((), dtype=loss_dtype, device=hidden.device)
            for start in range(0, h_all.shape[0], options.chunk_size):
                piece = slice(start, start + options.chunk_size)
                h = h_all[piece]
                z, t = _chunk_logits(h, w, b, loss_dtype, options)
                loss, grad = _chunk_loss_and_grad(
                    z, labels[piece], topk_ids[piece], topk_logprobs[piece], label_logprobs[piece],
                    None if tail_ids is None else tail_ids[piece], options, need_grad,
                )
                loss_sum += loss
                if grad is None:
                    continue
                del z
                grad = _through_transform(grad, t, options)
                del t
                _accumulate(grad, h, w, piece, start == 0, grad_hidden, grad_weight, grad_bias, options)
                # Gone before the next chunk's logits exist; held over, it was a fourth (c, V) tensor at its peak.
                del grad
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.used = False
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # Scaled in place: a copy would hold a second (V, H) weight gradient at the peak. The
        # stored gradients are used once, so a second backward through this graph is refused.
        if ctx.used:
            raise RuntimeError("fused_sparse_mft_loss: backward can run only once per forward")
        ctx.used = True
        grads = []
        for needed, stored, dtype in zip(ctx.needs_input_grad[:3], ctx.saved_tensors, ctx.dtypes):
            grads.append(stored.mul_(grad_output).to(dtype) if needed else None)
        return (*grads, None, None, None, None, None, None)


def fused_label_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The student's log-prob of each label, ``log_softmax(transform(hidden @ lm_head_weight.T + bias))[label]``,
    with logits built one chunk of positions at a time: what label-only objectives (``label_loss``) need.

    Args:
        hidden: (B, T, H) final hidden states; ``hidden[:, t]`` predicts ``labels[:, t]``.
        lm_head_weight: (V, H) output-head weight.
        labels: (B, T) integer labels; ``ignore_index`` marks positions that are not computed.
        chunk_size, bias, logit_scale, softcap: as for ``fused_sparse_mft_loss``.

    Returns:
        (B, T) float32 (float64 for float64 inputs) log-probs, 0 at ignored positions,
        differentiable w.r.t. ``hidden``, ``lm_head_weight`` and ``bias``. Backward recomputes
        each chunk's logits: ``d s_i / d z_i = onehot(label_i) - softmax(z_i)``.
    """
    _check_head(hidden, lm_head_weight, bias, chunk_size, logit_scale, softcap)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be (B, T) = {tuple(hidden.shape[:2])}")
    width, vocab = hidden.shape[-1], lm_head_weight.shape[0]
    valid = (labels != ignore_index).reshape(-1)
    rows = valid.nonzero().squeeze(-1)
    flat_labels = labels.reshape(-1)[rows].long()
    if ((flat_labels < 0) | (flat_labels >= vocab)).any():
        raise ValueError(f"labels of non-ignored positions must be in [0, {vocab})")
    options = _Options(
        chunk_size=chunk_size or default_chunk_size(rows.numel(), vocab, width),
        matmul_dtype=_matmul_dtype(hidden, lm_head_weight),
        logit_scale=None if logit_scale is None else float(logit_scale),
        softcap=None if softcap is None else float(softcap),
    )
    values = _FusedLabelLogprobs.apply(hidden.reshape(-1, width)[rows], lm_head_weight, bias, flat_labels, options)
    out = values.new_zeros(labels.numel())
    return out.index_put((rows,), values).view(labels.shape)


class _FusedLabelLogprobs(torch.autograd.Function):
    """(n,) label log-probs of n positions; backward recomputes the logits chunk by chunk.

    Shapes: hidden (n, H), weight (V, H), bias (V,) or None, labels (n,).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options):
        loss_dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        out = torch.empty(hidden.shape[0], dtype=loss_dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, h_all = weight.detach().to(options.matmul_dtype), hidden.detach().to(options.matmul_dtype)
            b = None if bias is None else bias.detach().to(loss_dtype)
            for start in range(0, h_all.shape[0], options.chunk_size):
                piece = slice(start, start + options.chunk_size)
                z, _ = _chunk_logits(h_all[piece], w, b, loss_dtype, options)
                out[piece] = torch.log_softmax(z, dim=-1).gather(-1, labels[piece, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.options, ctx.loss_dtype = options, loss_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, labels = ctx.saved_tensors
        options, loss_dtype = ctx.options, ctx.loss_dtype
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w, h_all = weight.detach().to(options.matmul_dtype), hidden.detach().to(options.matmul_dtype)
            b = None if bias is None else bias.detach().to(loss_dtype)
            grad_hidden = torch.empty_like(h_all) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if ctx.needs_input_grad[1] else None
            grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if bias is not None and ctx.needs_input_grad[2] else None
            g_all = grad_output.to(loss_dtype)
            for start in range(0, h_all.shape[0], options.chunk_size):
                piece = slice(start, start + options.chunk_size)
                z, t = _chunk_logits(h_all[piece], w, b, loss_dtype, options)
                g = g_all[piece, None]
                # d(g * s_label)/dz = g * (onehot(label) - softmax(z)), built in place over z.
                grad = torch.softmax(z, dim=-1).mul_(-g).scatter_add_(-1, labels[piece, None], g)
                del z
                grad = _through_transform(grad, t, options)
                del t
                _accumulate(grad, h_all[piece], w, piece, False, grad_hidden, grad_weight, grad_bias, options)
                del grad
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )

"""Sampled tail targets (``tail_ids``): an unbiased estimate of the dense corrected cross-entropy.

The Monte Carlo test draws the tail ids here, with ``torch.multinomial`` from the teacher's
exact distribution restricted to the vocabulary outside S = topk ∪ {label}, and compares the
average loss and logit gradient over many draws with the dense float64 reference
(``mft_reference.dense_mft_ce``, autograd for its gradient). The tolerance is a multiple of
each quantity's standard error over the draws, so the test is as sharp as the draw count
allows, and it also checks that the tail bucket (a different, biased objective) would fail it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mft_pipeline import IGNORE_INDEX, VARIANTS, fused_sparse_mft_loss, sparse_mft_loss

from mft_reference import dense_mft_ce

V, K, T = 50, 5, 4


def teacher_case(seed, *, vocab=V, seq=T, batch=1):
    """Student logits, a sharp-ish random teacher's log-probs, labels (argmax and random, some outside the top-k)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)
    teacher = (torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 2.0).log_softmax(-1)
    right = (torch.arange(seq) % 2 == 0).expand(batch, seq)
    labels = torch.where(right, teacher.argmax(-1), torch.randint(0, vocab, (batch, seq), generator=gen))
    return student, teacher, labels, gen


def cache_for(teacher, labels, k):
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    label_logprobs = teacher.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return topk_ids, topk_logprobs, label_logprobs


def restricted_teacher(teacher, labels, topk_ids):
    """(B, T, V) float64: the teacher's distribution with S = topk ∪ {label} removed, renormalised."""
    p = teacher.exp().clone()
    p.scatter_(-1, topk_ids, 0.0).scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 0.0)
    return p / p.sum(-1, keepdim=True)


def draw(p_rest, draws, n, gen):
    """(draws, T, n) ids, i.i.d. from each position's restricted distribution (batch 1)."""
    seq, vocab = p_rest.shape[1:]
    ids = torch.multinomial(p_rest[0], draws * n, replacement=True, generator=gen)  # (T, draws * n)
    return ids.view(seq, draws, n).permute(1, 0, 2).contiguous()


@pytest.mark.parametrize("variant", VARIANTS)
def test_monte_carlo_mean_equals_the_dense_loss_and_gradient(variant):
    draws, n = 3000, 3
    student, teacher, labels, gen = teacher_case(seed=11)
    tau = float(torch.rand((), generator=gen, dtype=torch.float64))
    topk_ids, topk_logprobs, label_logprobs = cache_for(teacher, labels, K)
    tail_ids = draw(restricted_teacher(teacher, labels, topk_ids), draws, n, gen)
    # Every draw gets its own copy of the logits, so the per-copy gradient is that draw's gradient.
    z = student.expand(draws, T, V).clone().requires_grad_(True)
    rep = lambda t: t.expand(draws, *t.shape[1:])  # noqa: E731
    targets = (rep(labels), rep(topk_ids), rep(topk_logprobs), rep(label_logprobs))
    loss, _ = sparse_mft_loss(z, *targets, tau, variant, tail_ids=tail_ids)
    loss.backward()
    per_draw_grad = z.grad  # (draws, T, V)
    with torch.no_grad():
        per_draw_value = torch.stack([
            sparse_mft_loss(student, labels, topk_ids, topk_logprobs, label_logprobs, tau, variant, tail_ids=tail_ids[m : m + 1])[0]
            for m in range(draws)
        ])  # fmt: skip
    torch.testing.assert_close(per_draw_value.sum(), loss.detach(), rtol=1e-12, atol=1e-9)

    dense_z = student.clone().requires_grad_(True)
    dense = dense_mft_ce(dense_z, teacher, labels, tau, variant)
    dense.backward()

    # Value: within 4 standard errors of the mean over the draws (plus rounding: under "ft"
    # the tail has no weight and every draw gives the same value).
    se = per_draw_value.std() / draws**0.5
    assert (se > 1e-9) == (variant != "ft")
    assert abs(per_draw_value.mean() - dense.detach()) <= 4 * se + 1e-9
    # Gradient: rare tail ids are drawn a handful of times or never, so a per-coordinate band
    # from their sample variance is unreliable. The normalised squared error of the whole
    # mean gradient, Q = |mean - dense|^2 / E|mean - dense|^2 (the denominator is the sum of
    # the coordinates' variances of the mean, estimated from the draws), has expectation 1
    # for an unbiased estimator and, a sum over ~180 varying coordinates, rarely exceeds 2;
    # Q <= 4 is asked (Markov's bound alone gives a false-alarm chance below 1/4 at any seed).
    mean_grad = per_draw_grad.mean(0, keepdim=True)
    expected_sq_error = per_draw_grad.var(0).sum() / draws
    sq_error = ((mean_grad - dense_z.grad) ** 2).sum()
    assert sq_error <= 4.0 * expected_sq_error + 1e-20, (sq_error, expected_sq_error)
    # Coordinates in S do not depend on the draw and must match to rounding.
    in_support = torch.zeros(1, T, V, dtype=torch.bool)
    in_support.scatter_(-1, topk_ids, True).scatter_(-1, labels.unsqueeze(-1), True)
    assert ((mean_grad - dense_z.grad).abs()[in_support] <= 1e-12).all()

    # The test can fail: the tail bucket's gradient is another one, far outside the same band.
    if variant != "ft":
        bucket_z = student.clone().requires_grad_(True)
        sparse_mft_loss(bucket_z, labels, topk_ids, topk_logprobs, label_logprobs, tau, variant)[0].backward()
        assert ((bucket_z.grad - dense_z.grad) ** 2).sum() / expected_sq_error > 100.0


def loss_and_grad(loss_fn, student):
    z = student.clone().requires_grad_(True)
    value = loss_fn(z)
    value.backward()
    return value.detach(), z.grad


def test_full_vocabulary_with_samples_equals_dense_whatever_the_samples():
    """k = V: S is everything, so the samples (placeholders there) carry no weight."""
    student, teacher, labels, gen = teacher_case(seed=12, batch=2)
    cache = cache_for(teacher, labels, V)
    tail_ids = torch.randint(0, V, (2, T, 4), generator=gen)
    got, got_grad = loss_and_grad(lambda z: sparse_mft_loss(z, labels, *cache, 0.3, tail_ids=tail_ids)[0], student)
    want, want_grad = loss_and_grad(lambda z: dense_mft_ce(z, teacher, labels, 0.3), student)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", (1, 5, V))
def test_tau_one_is_cross_entropy_for_any_samples(k):
    student, teacher, labels, gen = teacher_case(seed=13, batch=2)
    cache = cache_for(teacher, labels, k)
    tail_ids = torch.randint(0, V, (2, T, 3), generator=gen)
    got, got_grad = loss_and_grad(lambda z: sparse_mft_loss(z, labels, *cache, 1.0, tail_ids=tail_ids)[0], student)
    want, want_grad = loss_and_grad(lambda z: F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), reduction="sum"), student)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


def test_renormalize_gives_the_samples_no_weight():
    student, teacher, labels, gen = teacher_case(seed=14, batch=2)
    cache = cache_for(teacher, labels, K)
    tail_ids = torch.randint(0, V, (2, T, 3), generator=gen)
    with_samples = sparse_mft_loss(student, labels, *cache, 0.25, tail="renormalize", tail_ids=tail_ids)[0]
    without = sparse_mft_loss(student, labels, *cache, 0.25, tail="renormalize")[0]
    torch.testing.assert_close(with_samples, without, rtol=0, atol=0)


# The fused hidden-state loss with samples: the same loss, from hidden states.

H = 12


def fused_case(seed, *, k=K, n=3, vocab=29, seq=7):
    """Hidden states, head weight and bias (leaves), a cache with sampled tail ids, two ignored positions with garbage."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, seq, H, generator=gen, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(vocab, H, generator=gen, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher = (torch.randn(2, seq, vocab, generator=gen, dtype=torch.float64) * 2.5).log_softmax(-1)
    right = (torch.arange(seq) % 2 == 0).expand(2, seq)
    labels = torch.where(right, teacher.argmax(-1), torch.randint(0, vocab, (2, seq), generator=gen))
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    label_logprobs = teacher.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if k < vocab:
        p_rest = restricted_teacher(teacher, labels, topk_ids)
        tail_ids = torch.multinomial(p_rest.reshape(-1, vocab), n, replacement=True, generator=gen).view(2, seq, n)
    else:
        tail_ids = torch.zeros(2, seq, n, dtype=torch.long)
    for b, t in ((0, 3), (1, 6)):
        labels[b, t] = IGNORE_INDEX
        topk_ids[b, t] = -7
        tail_ids[b, t] = -9  # garbage at an ignored position: must not be gathered
        label_logprobs[b, t] = float("nan")
    cache = (labels, topk_ids, topk_logprobs.float(), label_logprobs.float())
    return (hidden, weight, bias), cache, tail_ids


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", (1, 4, None))
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_equals_sparse_with_samples(variant, chunk_size):
    (hidden, weight, bias), cache, tail_ids = fused_case(seed=21)
    want, want_n = sparse_mft_loss(hidden @ weight.T + bias, *cache, 0.25, variant, tail_ids=tail_ids)
    got, got_n = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, variant, chunk_size=chunk_size, bias=bias, tail_ids=tail_ids)
    assert got_n == want_n == 12
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, (hidden, weight, bias)), grads(want, (hidden, weight, bias))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # The samples change the loss (the bucket is another objective), so the comparison above means something.
    bucket, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, variant, bias=bias)
    if variant != "ft":
        assert abs(bucket.item() - got.item()) > 1e-6


def test_fused_with_samples_full_vocabulary_and_tau_one():
    (hidden, weight, bias), cache, tail_ids = fused_case(seed=22, k=29)
    plain = lambda **kw: fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, chunk_size=3, **kw)[0]  # noqa: E731
    torch.testing.assert_close(plain(tail_ids=tail_ids), plain(), rtol=1e-12, atol=1e-12)
    (hidden, weight, bias), cache, tail_ids = fused_case(seed=23)
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 1.0, bias=bias, tail_ids=tail_ids)
    labels = cache[0]
    want = F.cross_entropy((hidden @ weight.T + bias).reshape(-1, 29), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, (hidden, weight, bias)), grads(want, (hidden, weight, bias))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ("sparse", "fused"))
def test_rejects_bad_tail_ids(loss):
    (hidden, weight, bias), cache, tail_ids = fused_case(seed=24)
    call = {
        "sparse": lambda ids: sparse_mft_loss(hidden @ weight.T, *cache, 0.25, tail_ids=ids),
        "fused": lambda ids: fused_sparse_mft_loss(hidden, weight, *cache, 0.25, tail_ids=ids),
    }[loss]
    with pytest.raises(ValueError, match="tail_ids shape"):
        call(tail_ids[:, :-1])
    with pytest.raises(ValueError, match="tail_ids shape"):
        call(tail_ids[..., :0])
    with pytest.raises(ValueError, match="tail_ids must be an integer"):
        call(tail_ids.double())
    bad = tail_ids.clone()
    bad[0, 0, 1] = 29
    with pytest.raises(ValueError, match="in \\[0, 29\\)"):
        call(bad)

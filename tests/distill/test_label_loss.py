"""DFT and TALR from the fused head path: loss and gradients against a float64 reference written out here."""

from __future__ import annotations

import pytest
import torch

from conftest import label_only_reference
from mft_pipeline.distill import IGNORE_INDEX
from mft_pipeline.distill.fused_loss import fused_label_logprobs
from mft_pipeline.distill.label_loss import label_only_loss, logits_label_logprobs

B, T, H, V = 3, 6, 10, 23
IGNORED = ((0, 5), (1, 0), (2, 2), (2, 3))


def make_case(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=gen, dtype=torch.float64) * 0.8).to(dtype).requires_grad_(True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    for b, t in IGNORED:
        labels[b, t] = IGNORE_INDEX
    return hidden, weight, bias, labels


def reference(hidden, weight, bias, labels, variant, logit_scale=None, softcap=None):
    """Float64, position by position, through ``label_only_reference``."""
    h, w, b = (x.detach().double().requires_grad_(True) for x in (hidden, weight, bias))
    logp, where = [], []
    for i in range(B):
        for t in range(T):
            if int(labels[i, t]) == IGNORE_INDEX:
                continue
            z = h[i, t] @ w.T + b
            if logit_scale is not None:
                z = z * logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            logp.append(z[int(labels[i, t])] - torch.logsumexp(z, 0))
            where.append(i)
    loss = label_only_reference(logp, where, variant)
    return loss, torch.autograd.grad(loss, (h, w, b))


@pytest.mark.parametrize("variant", ("dft", "talr"))
@pytest.mark.parametrize("chunk_size", (1, 4, None))
@pytest.mark.parametrize("transform", ({}, {"logit_scale": 0.7, "softcap": 2.5}))
def test_fused_label_objectives_match_the_float64_reference(variant, chunk_size, transform):
    hidden, weight, bias, labels = make_case(seed=1)
    s = fused_label_logprobs(hidden, weight, labels, chunk_size=chunk_size, bias=bias, **transform)
    loss, n = label_only_loss(s, labels, variant)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want_loss, want = reference(hidden, weight, bias, labels, variant, **transform)
    assert int(n) == B * T - len(IGNORED)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ("dft", "talr"))
def test_logits_path_matches_the_float64_reference(variant):
    hidden, weight, bias, labels = make_case(seed=2, dtype=torch.float64)
    logits = hidden @ weight.T + bias
    loss, _ = label_only_loss(logits_label_logprobs(logits, labels), labels, variant)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want_loss, want = reference(hidden, weight, bias, labels, variant)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_talr_weights_favour_likely_tokens_and_keep_a_floor():
    """A token the student finds unlikely gets far less weight than an easy one, but never nothing."""
    s = torch.tensor([[-0.01, -0.02, -0.03], [-0.02, -0.01, -0.04], [-0.01, -9.0, -0.05]], requires_grad=True)
    labels = torch.zeros(3, 3, dtype=torch.long)
    loss, _ = label_only_loss(s, labels, "talr")
    (grad,) = torch.autograd.grad(loss, s)
    weights = -grad  # the loss is sum_i w_i * (-s_i) with w under stop-gradient
    assert float(weights[2, 1]) == pytest.approx(0.01)
    assert float(weights[0, 0]) > float(weights[0, 2]) > 0.5
    assert float(weights.sum()) == pytest.approx(9.0, abs=0.02)


@pytest.mark.parametrize("variant", ("dft", "talr"))
def test_all_ignored_batch_gives_zero_with_a_gradient(variant):
    hidden, weight, bias, labels = make_case(seed=3)
    labels[:] = IGNORE_INDEX
    loss, n = label_only_loss(fused_label_logprobs(hidden, weight, labels, bias=bias), labels, variant)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    loss.backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0

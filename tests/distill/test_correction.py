"""The correction DC of spec section 2, checked against plain-Python formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mft_pipeline.distill import VARIANTS, check_tau, correction_weight, dense_corrected_target
from mft_pipeline.distill.correction import check_variant
from mft_pipeline.labels import IGNORE_INDEX

from mft_reference import reference_weight

TAUS = (0.0, 0.1, 0.25, 0.7, 1.0)


def reference_target(p: list[float], label: int, tau: float, variant: str) -> list[float]:
    """Corrected target for one position, element by element."""
    m = max(range(len(p)), key=lambda i: p[i])
    a = reference_weight(p[m], p[label], m == label, tau, variant)
    return [(1.0 - a) * p_i + (a if i == label else 0.0) for i, p_i in enumerate(p)]


def random_distributions(n: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale).softmax(-1)


def right_and_wrong_labels(p: torch.Tensor) -> torch.Tensor:
    """Even rows get the argmax as label (right branch), odd rows the second-best (wrong)."""
    order = p.argsort(dim=-1, descending=True)
    return torch.where(torch.arange(len(p)) % 2 == 0, order[:, 0], order[:, 1])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_check_tau_rejects(bad):
    with pytest.raises(ValueError, match="tau"):
        check_tau(bad)


def test_check_tau_accepts_closed_interval():
    assert check_tau(0) == 0.0 and isinstance(check_tau(0), float)
    assert check_tau(1) == 1.0
    assert check_tau(0.25) == 0.25


def test_check_variant():
    for variant in VARIANTS:
        assert check_variant(variant) == variant
    with pytest.raises(ValueError, match="distill\\+ft"):
        check_variant("kd")


def test_correction_weight_rejects_bad_tau_and_variant():
    p = torch.tensor([0.5])
    with pytest.raises(ValueError):
        correction_weight(p, p, torch.tensor([True]), 1.5)
    with pytest.raises(ValueError):
        correction_weight(p, p, torch.tensor([True]), 0.5, variant="nope")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", TAUS)
def test_weight_matches_variant_table(variant, tau):
    gen = torch.Generator().manual_seed(0)
    p_m = torch.rand(4, 3, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    p_l = p_m * torch.rand(4, 3, generator=gen, dtype=torch.float64)
    right = torch.rand(4, 3, generator=gen) < 0.5
    p_l = torch.where(right, p_m, p_l)  # a right prediction has p_l == p_m

    a = correction_weight(p_m, p_l, right, tau, variant)

    assert a.shape == (4, 3) and a.dtype == torch.float64
    rows = zip(p_m.flatten().tolist(), p_l.flatten().tolist(), right.flatten().tolist())
    expected = torch.tensor(
        [reference_weight(pm, pl, r, tau, variant) for pm, pl, r in rows], dtype=torch.float64
    )
    torch.testing.assert_close(a.flatten(), expected, rtol=0, atol=1e-15)
    assert ((a >= 0) & (a <= 1)).all()


def test_tau_one_is_plain_finetuning():
    p_m = torch.tensor([0.9, 0.4, 0.3, 0.999, 1.0], dtype=torch.float64)
    p_l = torch.tensor([0.9, 0.1, 0.0, 0.999, 1.0], dtype=torch.float64)
    right = torch.tensor([True, False, False, True, True])
    a = correction_weight(p_m, p_l, right, 1.0)
    assert torch.equal(a, torch.ones_like(a))


def test_certain_label_gives_weight_one_without_nan():
    p_l = torch.tensor([1.0, 1.0, 1.0 - 1e-17], dtype=torch.float64, requires_grad=True)
    p_m = p_l.detach().clone().requires_grad_(True)
    for tau in (0.0, 0.3):
        a = correction_weight(p_m, p_l, torch.tensor([True, True, True]), tau)
        assert torch.equal(a, torch.ones_like(a))
        a.sum().backward()
        assert torch.isfinite(p_l.grad).all() and torch.isfinite(p_m.grad).all()


def test_probabilities_are_clamped():
    # A cached log-prob that rounds to slightly above 0 gives p > 1.
    a = correction_weight(
        torch.tensor([1.0 + 1e-6]), torch.tensor([1.0 + 1e-6]), torch.tensor([True]), 0.2
    )
    assert a.item() == 1.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", TAUS)
def test_dense_target_matches_reference(variant, tau):
    p = random_distributions(12, 9, seed=1)
    labels = right_and_wrong_labels(p)
    c = dense_corrected_target(p, labels, tau, variant)
    rows = zip(p.tolist(), labels.tolist())
    expected = torch.tensor(
        [reference_target(row, label, tau, variant) for row, label in rows], dtype=torch.float64
    )
    torch.testing.assert_close(c, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", TAUS)
def test_target_sums_to_one(variant, tau):
    p = random_distributions(12, 9, seed=2)
    c = dense_corrected_target(p, right_and_wrong_labels(p), tau, variant)
    torch.testing.assert_close(c.sum(-1), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-14)
    assert (c >= 0).all()


@pytest.mark.parametrize("tau", TAUS)
def test_wrong_branch_label_beats_old_argmax_by_tau(tau):
    p = random_distributions(10, 7, seed=3)
    order = p.argsort(dim=-1, descending=True)
    labels = order[:, 3]  # never the argmax
    for variant in ("mft", "single-correction"):
        c = dense_corrected_target(p, labels, tau, variant)
        rows = torch.arange(10)
        gap = c[rows, labels] - c[rows, order[:, 0]]
        expected = torch.full((10,), tau, dtype=torch.float64)
        torch.testing.assert_close(gap, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("tau", TAUS)
def test_right_branch_label_gains_tau_capped_at_one(tau):
    # Scale 6 makes some teachers confident enough that p_l + tau exceeds 1.
    p = random_distributions(10, 7, seed=4, scale=6.0)
    labels = p.argmax(-1)
    rows = torch.arange(10)
    p_l = p[rows, labels]
    assert (p_l + 0.7 > 1).any() and (p_l + 0.1 < 1).any()
    c = dense_corrected_target(p, labels, tau)
    torch.testing.assert_close(c[rows, labels], torch.clamp(p_l + tau, max=1.0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", (0.0, 0.25, 0.7))
def test_ratios_between_non_label_tokens_preserved(variant, tau):
    p = random_distributions(10, 7, seed=5)
    labels = right_and_wrong_labels(p)
    c = dense_corrected_target(p, labels, tau, variant)
    for row in range(10):
        others = [i for i in range(7) if i != labels[row]]
        ratio = c[row, others] / p[row, others]  # a common factor (1 - a), so ratios are kept
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)


def test_dense_target_any_leading_shape_and_validation():
    p = random_distributions(6, 5, seed=6).reshape(2, 3, 5)
    labels = torch.tensor([[0, 1, 2], [3, 4, 0]])
    assert dense_corrected_target(p, labels, 0.25).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="shape"):
        dense_corrected_target(p, labels[:, :2], 0.25)
    with pytest.raises(ValueError, match="labels"):
        dense_corrected_target(p, torch.full((2, 3), IGNORE_INDEX), 0.25)
    with pytest.raises(ValueError, match="integer"):
        dense_corrected_target(p, labels.double(), 0.25)


def test_certain_teacher_target_is_one_hot():
    p = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    c = dense_corrected_target(p, torch.tensor([1]), 0.25)
    assert torch.equal(c, p)
    assert not math.isnan(c.sum().item())

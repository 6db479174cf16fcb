"""Stage one's tail sampler: draws follow the teacher restricted to the vocabulary outside S, and never hit S."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mft_pipeline.teacher.tail_samples import sample_outside, tail_uniforms

V = 50


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of ``counts`` against ``probs`` over the ids with positive probability."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def threshold(df: int) -> float:
    """df + 6 standard deviations of a chi-square with df degrees of freedom: a false alarm is far below 1e-6."""
    return df + 6 * (2 * df) ** 0.5


def case(seed, n=3, support_size=6):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=gen) * 2.0
    support = torch.stack([torch.randperm(V, generator=gen)[:support_size] for _ in range(n)])
    return logits, support, gen


def restricted(logits, support):
    p = logits.double().softmax(-1).scatter(-1, support, 0.0)
    return p / p.sum(-1, keepdim=True)


def test_frequencies_follow_the_teacher_outside_the_support():
    draws = 40_000
    logits, support, gen = case(seed=0)
    ids = sample_outside(logits.clone(), support, torch.rand(3, draws, generator=gen, dtype=torch.float64))
    assert ids.shape == (3, draws) and ids.dtype == torch.int64
    assert not (ids[:, :, None] == support[:, None, :]).any()  # never a top-k id or the label
    want = restricted(logits, support)
    df = V - support.shape[1] - 1
    for row in range(3):
        counts = torch.bincount(ids[row], minlength=V).double()
        assert chi_square(counts, want[row]) < threshold(df)
        # The test has power: a teacher only slightly sharper (logits x 1.15) is rejected.
        assert chi_square(counts, restricted(logits * 1.15, support)[row]) > threshold(df)


def test_a_tail_that_underflows_in_probability_is_still_drawn_from():
    """Support logits 200 above the tail: every tail probability is 0 in float32, the tail is still sampled right."""
    draws = 20_000
    logits, support, gen = case(seed=1, n=1)
    logits.scatter_(-1, support, 200.0)
    assert (logits.softmax(-1).scatter(-1, support, 0.0) == 0).all()
    ids = sample_outside(logits.clone(), support, torch.rand(1, draws, generator=gen, dtype=torch.float64))
    assert not (ids[:, :, None] == support[:, None, :]).any()
    counts = torch.bincount(ids[0], minlength=V).double()
    assert chi_square(counts, restricted(logits, support)[0]) < threshold(V - 7)  # float64 keeps the tail


def test_uniform_edges_land_on_the_first_and_last_tail_ids():
    logits = torch.zeros(1, 10)
    support = torch.tensor([[0, 1, 9]])
    u = torch.tensor([[0.0, 1.0 - 2.0**-53]])  # the second rounds to 1.0 in float32
    assert sample_outside(logits.clone(), support, u).tolist() == [[2, 8]]


def test_no_tail_gives_zeros():
    """k + label cover the vocabulary: nothing to draw, 0s stored (stage two gives them no weight)."""
    logits = torch.randn(2, 6)
    support = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    ids = sample_outside(logits, support, torch.rand(2, 4, dtype=torch.float64))
    assert ids.tolist() == [[0] * 4] * 2


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share n"):
        sample_outside(torch.zeros(2, 5), torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, 4))


def test_uniforms_depend_only_on_seed_split_and_row():
    whole = tail_uniforms(7, "train", 0, 6, 5, 3)
    assert whole.shape == (6, 5, 3) and whole.dtype == np.float64
    assert ((whole >= 0) & (whole < 1)).all()
    # Any batching of the rows gives the same numbers.
    np.testing.assert_array_equal(np.concatenate([tail_uniforms(7, "train", 0, 2, 5, 3), tail_uniforms(7, "train", 2, 4, 5, 3)]), whole)
    assert not np.array_equal(tail_uniforms(7, "validation", 0, 6, 5, 3), whole)
    assert not np.array_equal(tail_uniforms(8, "train", 0, 6, 5, 3), whole)
    assert len(np.unique(whole.reshape(6, -1), axis=0)) == 6  # rows differ from each other

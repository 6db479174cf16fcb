"""Perplexity of a model on packed sequences: the one evaluation path, checked against float64 by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_model
from mft_pipeline.eval.metrics import model_nll, model_perplexity


def _reference_nll(model, input_ids, num_tokens):
    """Sum of -log p(next token) over each row's first num_tokens - 1 predictions, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n in zip(input_ids, num_tokens):
            logits = model(input_ids=torch.as_tensor(ids[None], dtype=torch.long)).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(int(n) - 1):
                total -= float(logp[t, ids[t + 1]])
                count += 1
    return total, count


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_counts_only_real_labels_at_any_batch_size(batch_size):
    model = make_model(50, seed=3)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 50, size=(5, 12))
    num_tokens = np.array([12, 7, 1, 0, 10])  # a row of one token has no label; padding rows none either
    nll, count = model_nll(model, input_ids, num_tokens, batch_size)
    ref_nll, ref_count = _reference_nll(model, input_ids, num_tokens)
    assert count == ref_count == 11 + 6 + 9
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert model_perplexity(model, input_ids, num_tokens, batch_size) == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)


def test_evaluation_leaves_the_training_mode_as_it_was():
    model = make_model(50).train()
    model_perplexity(model, np.zeros((1, 4), dtype=np.int64), np.array([4]))
    assert model.training

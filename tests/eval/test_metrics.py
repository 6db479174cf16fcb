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


def test_chunked_head_path_never_builds_the_full_logits_and_matches_float64():
    """The fused head path: the model's output head (as a module) only ever sees the 4-token probe, and the
    NLL equals the dense float64 reference, whatever the chunk size."""
    from mft_pipeline.eval.metrics import head_nll
    from mft_pipeline.train.student_loss import output_head

    model = make_model(50, seed=4)
    rng = np.random.default_rng(2)
    input_ids = rng.integers(0, 50, size=(4, 16))
    num_tokens = np.array([16, 9, 16, 2])
    ref_nll, ref_count = _reference_nll(model, input_ids, num_tokens)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    nll, count = model_nll(model, input_ids, num_tokens, batch_size=3)
    hook.remove()
    assert count == ref_count and nll == pytest.approx(ref_nll, rel=1e-6)
    assert seen and max(seen) <= 4, seen
    head = output_head(model)
    ids = torch.as_tensor(input_ids)
    labels = ids[:, 1:].clone()
    labels[torch.arange(15)[None] >= torch.as_tensor(num_tokens)[:, None] - 1] = -100
    with torch.no_grad():
        hidden = head.hidden_states(model, ids)[:, :-1]
        for chunk in (1, 7, 1000):
            assert head_nll(head, hidden, labels, chunk_size=chunk) == pytest.approx(ref_nll, rel=1e-6)


def test_a_head_that_cannot_be_fused_is_scored_through_its_logits():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(50, seed=5), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    rng = np.random.default_rng(3)
    input_ids, num_tokens = rng.integers(0, 50, size=(3, 10)), np.array([10, 4, 10])
    ref_nll, ref_count = _reference_nll(model, input_ids, num_tokens)
    for fused in (True, False):  # no fusable head: both take the logits path
        nll, count = model_nll(model, input_ids, num_tokens, batch_size=2, fused=fused)
        assert count == ref_count and nll == pytest.approx(ref_nll, rel=1e-6)
    plain = make_model(50, seed=6)
    assert model_nll(plain, input_ids, num_tokens, fused=False)[0] == pytest.approx(_reference_nll(plain, input_ids, num_tokens)[0], rel=1e-6)

"""Perplexity and the paper's specialization / degeneralization metrics (MFT-SPEC section 4)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mft_pipeline.distill.sparse_loss import IGNORE_INDEX


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total NLL / total tokens)."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def specialization(ppl_spec_before: float, ppl_spec_after: float) -> float:
    """S = (before - after) / before on the specialized split; higher is better."""
    return (ppl_spec_before - ppl_spec_after) / ppl_spec_before


def degeneralization(ppl_gen_before: float, ppl_gen_after: float) -> float:
    """DG = (after - before) / before on the general split; lower is better."""
    return (ppl_gen_after - ppl_gen_before) / ppl_gen_before


def dg_over_s(dg: float, s: float) -> float:
    """DG / S; undefined (nan) when the model did not specialize at all."""
    return dg / s if s > 0 else float("nan")


def model_perplexity(model, input_ids: np.ndarray, num_tokens: np.ndarray, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on packed sequences (N, T), counting each row's real labels only."""
    return perplexity(*model_nll(model, input_ids, num_tokens, batch_size))


@torch.no_grad()
def model_nll(model, input_ids: np.ndarray, num_tokens: np.ndarray, batch_size: int = 8) -> tuple[float, int]:
    """Summed NLL and label count of ``model`` on packed sequences (N, T), for sums over several processes."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(num_tokens), batch_size):
        ids = torch.as_tensor(input_ids[start : start + batch_size], dtype=torch.long, device=device)
        num = torch.as_tensor(num_tokens[start : start + batch_size], dtype=torch.long, device=device)
        labels = ids[:, 1:].clone()
        labels[torch.arange(labels.shape[1], device=device)[None] >= (num[:, None] - 1)] = IGNORE_INDEX
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits[:, :-1]
        # Row by row keeps the fp32 upcast of the logits to one sequence at a time.
        for row in range(ids.shape[0]):
            nll += F.cross_entropy(logits[row].float(), labels[row], ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return nll, count

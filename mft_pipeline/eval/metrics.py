"""Perplexity and the paper's specialization / degeneralization metrics (MFT-SPEC section 4)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mft_pipeline.labels import IGNORE_INDEX


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


def compare(before: dict, after: dict) -> dict:
    """S, DG and DG/S of perplexities ``after`` against ``before`` (keys ``ppl_spec``, ``ppl_gen``), where both have them."""
    row = {}
    if "ppl_spec" in after and "ppl_spec" in before:
        row["S"] = specialization(before["ppl_spec"], after["ppl_spec"])
    if "ppl_gen" in after and "ppl_gen" in before:
        row["DG"] = degeneralization(before["ppl_gen"], after["ppl_gen"])
    if "S" in row and "DG" in row:
        row["DG_over_S"] = dg_over_s(row["DG"], row["S"])
    return row


def model_perplexity(model, input_ids: np.ndarray, num_tokens: np.ndarray, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on packed sequences (N, T), counting each row's real labels only.

    The one evaluation path for one process and many: under ``torch.distributed`` every rank must
    call it with the same rows; each scores a contiguous share and the NLL sums and label counts
    are all-reduced. With one process it scores every row and the sums are its own.
    """
    return perplexity(*model_nll(model, input_ids, num_tokens, batch_size))


@torch.no_grad()
def model_nll(model, input_ids: np.ndarray, num_tokens: np.ndarray, batch_size: int = 8) -> tuple[float, int]:
    """Summed NLL and label count of ``model`` on packed sequences (N, T), over all processes (see ``model_perplexity``)."""
    rank, world = _rank_and_world()
    share = -(-len(num_tokens) // world)
    ids, num = input_ids[rank * share : (rank + 1) * share], num_tokens[rank * share : (rank + 1) * share]
    if len(num) < share:
        # Every rank runs the same number of forwards (FSDP gathers weights inside each one);
        # padding rows have no tokens, so they add nothing to the sums.
        ids = np.concatenate([ids, np.zeros((share - len(num), input_ids.shape[1]), dtype=input_ids.dtype)])
        num = np.concatenate([num, np.zeros(share - len(num), dtype=num_tokens.dtype)])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(num), batch_size):
        batch_ids = torch.as_tensor(ids[start : start + batch_size], dtype=torch.long, device=device)
        batch_num = torch.as_tensor(num[start : start + batch_size], dtype=torch.long, device=device)
        labels = batch_ids[:, 1:].clone()
        labels[torch.arange(labels.shape[1], device=device)[None] >= (batch_num[:, None] - 1)] = IGNORE_INDEX
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch_ids).logits[:, :-1]
        # Row by row keeps the fp32 upcast of the logits to one sequence at a time.
        for row in range(batch_ids.shape[0]):
            nll += F.cross_entropy(logits[row].float(), labels[row], ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if world == 1:
        return nll, count
    # NCCL reduces only CUDA tensors; gloo CPU ones.
    sums_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = torch.tensor([nll, count], dtype=torch.float64, device=sums_device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return float(totals[0]), int(totals[1])


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

"""Perplexity and the paper's specialization / degeneralization metrics (docs/method.md, "Metrics")."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mft_pipeline.distill.fused_loss import MIN_CHUNK
from mft_pipeline.labels import IGNORE_INDEX
from mft_pipeline.train.student_loss import Head, output_head


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


def model_perplexity(model, input_ids: np.ndarray, num_tokens: np.ndarray, batch_size: int = 8, target: np.ndarray | None = None) -> float:
    """Perplexity of ``model`` on packed sequences (N, T), counting each row's real labels only.

    With ``target`` ((N, T - 1) bool, as ``Packed.target`` and ``CachedSplit.target``), only the
    labels of target positions count: an instruction or chat corpus's answers.

    The one evaluation path for one process and many: under ``torch.distributed`` every rank must
    call it with the same rows; each scores a contiguous share and the NLL sums and label counts
    are all-reduced. With one process it scores every row and the sums are its own.
    """
    return perplexity(*model_nll(model, input_ids, num_tokens, batch_size, target=target))


@torch.no_grad()
def model_nll(
    model, input_ids: np.ndarray, num_tokens: np.ndarray, batch_size: int = 8, fused: bool = True, target: np.ndarray | None = None
) -> tuple[float, int]:
    """Summed NLL and label count of ``model`` on packed sequences (N, T), over all processes (see ``model_perplexity``).

    Where the output head can be fused (``train.student_loss.output_head``, as for the training
    loss), the head is applied to the final hidden states a chunk of positions at a time
    (``head_nll``), so the (B, T, V) logits never exist; otherwise (or with ``fused=False``)
    the model's own logits are scored row by row. ``target`` as in ``model_perplexity``.
    """
    rank, world = _rank_and_world()
    share = -(-len(num_tokens) // world)
    ids, num = input_ids[rank * share : (rank + 1) * share], num_tokens[rank * share : (rank + 1) * share]
    if target is None:
        target = np.ones((len(input_ids), input_ids.shape[1] - 1), dtype=bool)
    mask = target[rank * share : (rank + 1) * share]
    if len(num) < share:
        # Every rank runs the same number of forwards (FSDP gathers weights inside each one);
        # padding rows have no tokens, so they add nothing to the sums.
        ids = np.concatenate([ids, np.zeros((share - len(num), input_ids.shape[1]), dtype=input_ids.dtype)])
        num = np.concatenate([num, np.zeros(share - len(num), dtype=num_tokens.dtype)])
        mask = np.concatenate([mask, np.zeros((share - len(mask), mask.shape[1]), dtype=bool)])
    device = next(model.parameters()).device
    head = output_head(model) if fused else None
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(num), batch_size):
        batch_ids = torch.as_tensor(ids[start : start + batch_size], dtype=torch.long, device=device)
        batch_num = torch.as_tensor(num[start : start + batch_size], dtype=torch.long, device=device)
        labels = batch_ids[:, 1:].clone()
        labels[torch.arange(labels.shape[1], device=device)[None] >= (batch_num[:, None] - 1)] = IGNORE_INDEX
        labels[~torch.as_tensor(mask[start : start + batch_size], device=device)] = IGNORE_INDEX
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if head is not None:
                nll += head_nll(head, head.hidden_states(model, batch_ids)[:, :-1], labels)
            else:
                logits = model(input_ids=batch_ids).logits[:, :-1]
                # Row by row keeps the fp32 upcast of the logits to one sequence at a time.
                for row in range(batch_ids.shape[0]):
                    nll += F.cross_entropy(logits[row].float(), labels[row], ignore_index=IGNORE_INDEX, reduction="sum").item()
                del logits
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if world == 1:
        return nll, count
    # NCCL reduces only CUDA tensors; gloo CPU ones.
    sums_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = torch.tensor([nll, count], dtype=torch.float64, device=sums_device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return float(totals[0]), int(totals[1])


def head_nll(head: Head, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None) -> float:
    """Summed next-token NLL of the labelled positions, through ``head`` one chunk of positions at a time.

    ``hidden`` (B, T, H) final hidden states, ``hidden[:, t]`` predicting ``labels[:, t]``
    (B, T), ``IGNORE_INDEX`` where nothing is scored. Only labelled positions are computed.
    Each chunk's logits are made float32, as the logits path scores them. By default a chunk's
    logits are about as large as the call's hidden states (at least ``MIN_CHUNK`` positions),
    as in the fused loss, so memory grows with B × T × H, never with B × T × V.
    """
    width = hidden.shape[-1]
    keep = (labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(-1)
    h, y = hidden.reshape(-1, width)[keep], labels.reshape(-1)[keep]
    chunk_size = chunk_size or max(MIN_CHUNK, -(-len(y) * width // head.weight.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, len(y), chunk_size):
        logits = head.logits(h[start : start + chunk_size]).float()
        total += F.cross_entropy(logits, y[start : start + chunk_size], reduction="sum").double()
    return float(total)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

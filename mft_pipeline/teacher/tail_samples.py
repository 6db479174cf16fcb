"""Stage one's tail samples (``--tail-samples N``): ids drawn from the teacher outside S = topk ∪ {label}.

Stage two's loss spreads the teacher's uncached mass ``c_R`` over these ids, ``c_R / N`` each,
which estimates the dense corrected cross-entropy without bias (see ``distill.sparse_loss``).
That needs the draws to follow the teacher's full distribution restricted to the vocabulary
outside S and renormalised, so they are taken here from the full float32 logits.

The randomness comes from one ``torch.Generator`` per sequence, seeded from the cache's
seed, the split and the sequence's row, never from the batch: a resumed cache, one written by
several workers, or one scored with another batch size holds the same draws as a single
uninterrupted run.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def tail_uniforms(seed: int, split: str, first_row: int, rows: int, positions: int, num_samples: int) -> np.ndarray:
    """The uniform numbers behind the draws of ``rows`` consecutive sequences of a split.

    Args:
        seed: the cache's tail seed (``CacheConfig.tail_seed``).
        split: "train" or "validation".
        first_row: the split's row index of the first sequence.
        rows, positions, num_samples: the output shape (B, T - 1, N).

    Returns:
        (rows, positions, num_samples) float64 in [0, 1). Row ``b`` depends only on
        ``(seed, split, first_row + b)``.
    """
    out = np.empty((rows, positions, num_samples), dtype=np.float64)
    stream = zlib.crc32(split.encode())
    for b in range(rows):
        state = np.random.SeedSequence((seed, stream, first_row + b)).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        out[b] = torch.rand((positions, num_samples), generator=generator, dtype=torch.float64).numpy()
    return out


def sample_outside(logits: torch.Tensor, support: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw ids from ``softmax(logits)`` restricted to the vocabulary outside ``support``, by inverse CDF.

    Args:
        logits: (n, V) float teacher logits; overwritten (it is the caller's chunk of a
            full-vocabulary projection, too large to copy).
        support: (n, m) int64 ids to leave out (the top-k and the label).
        uniforms: (n, N) floats in [0, 1), one per draw.

    Returns:
        (n, N) int64 ids, each outside its row's ``support``, distributed as the teacher's
        probabilities outside it, renormalised. A row whose ``support`` covers the whole
        vocabulary has nothing to draw from: it gets 0s, which stage two gives no weight.

    The weights are ``exp(z - max over the tail)``, so a tail whose probabilities underflow
    float32 still has a well-defined distribution; the cumulative sum is float32, whose
    rounding (relative 1e-7 per step) changes the draw probabilities by far less than any
    Monte Carlo test can see.
    """
    if logits.dim() != 2 or support.dim() != 2 or uniforms.dim() != 2 or not (logits.shape[0] == support.shape[0] == uniforms.shape[0]):
        raise ValueError(
            f"logits (n, V), support (n, m) and uniforms (n, N) must share n; got {tuple(logits.shape)}, "
            f"{tuple(support.shape)}, {tuple(uniforms.shape)}"
        )
    z = logits.float() if logits.dtype != torch.float32 else logits
    z.scatter_(-1, support, float("-inf"))
    top = z.max(dim=-1, keepdim=True).values
    empty = torch.isinf(top).squeeze(-1)  # nothing outside the support
    weights = z.sub_(torch.where(empty[:, None], 0.0, top)).exp_()  # 0 on the support
    cdf = torch.cumsum(weights, dim=-1)
    del weights, z
    total = cdf[:, -1:].contiguous()
    # Inverse CDF: the first id whose cumulative weight exceeds u * total. Ids on the support
    # add no weight, so they are never the first to exceed it.
    x = uniforms.to(device=cdf.device, dtype=cdf.dtype) * total
    ids = torch.searchsorted(cdf, x.contiguous(), right=True)
    # u * total can round up to total itself; the last id with weight is where it must land.
    last = torch.searchsorted(cdf, total, right=False)
    ids = torch.minimum(ids, last)
    return torch.where(empty[:, None], 0, ids)

"""What every teacher backend returns, so the cache writer never knows which one ran."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's sparse view of one batch of packed sequences.

    Position ``t`` holds the teacher's prediction of ``input_ids[:, t + 1]`` given
    ``input_ids[:, : t + 1]``. Positions at or past ``num_tokens - 1`` (padding) are zero.

    Attributes:
        topk_ids: (B, T - 1, k) int64, sorted by probability, so ``[..., 0]`` is the argmax.
        topk_logprobs: (B, T - 1, k) float32, natural-log probabilities, descending.
        label_logprobs: (B, T - 1) float32, log-probability of the actual next token,
            whether or not it is in the top-k.
        tail_ids: (B, T - 1, N) int64 ids drawn i.i.d. from the teacher's distribution
            outside the top-k and the label (``teacher.tail_samples.sample_outside``), or
            None when no tail samples were asked for. 0 where there is nothing to draw from
            (the top-k and the label cover the vocabulary) and on padding.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    label_logprobs: np.ndarray
    tail_ids: np.ndarray | None = None


class TeacherBackend(Protocol):
    """A frozen teacher that scores packed sequences.

    Attributes:
        name: "transformers" or "vllm", recorded in the cache manifest.
        max_top_k: the largest k this backend can return (vocab size, or vLLM's cap).
        vocab_size: the teacher's output vocabulary size.
        samples_tail: whether ``score`` can draw tail samples (it needs the full logits).
        schedules_rows: whether ``score`` bounds its own memory however many rows it gets
            (an engine that schedules them in steps): stage one then hands it a whole shard
            per call; otherwise ``--batch-size`` rows, which bound the memory of one forward.
    """

    name: str
    max_top_k: int
    vocab_size: int
    samples_tail: bool
    schedules_rows: bool

    def score(self, input_ids: np.ndarray, num_tokens: np.ndarray, top_k: int, tail_uniforms: np.ndarray | None = None) -> TeacherScores:
        """Score a batch of rows (a whole shard where ``schedules_rows``).

        Args:
            input_ids: (B, T) int64 packed token ids; row ``b`` is real up to ``num_tokens[b]``.
            num_tokens: (B,) int64 count of real tokens per row (``T`` except in a last,
                padded sequence).
            top_k: how many candidates to keep per position.
            tail_uniforms: (B, T - 1, N) floats in [0, 1) (``tail_samples.tail_uniforms``)
                to draw N tail ids per position from, or None for no tail samples.
        """
        ...

    def close(self) -> None:
        """Release what the backend started (an engine, its processes); build_cache calls it when done."""
        ...

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries that produced the scores, for the manifest."""
        ...

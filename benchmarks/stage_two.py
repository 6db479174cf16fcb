"""Stage-two benchmark: offline sparse MFT (fused) against plain finetuning and online dense MFT.

    python -m benchmarks.stage_two [--quick] [--only models,loader,eval] [--device cpu|cuda]
        [--models smollm2-135m,llama-128k-cpu] [--seq-len 256] [--batch-size 2] [--batches 2] [--repeats 5]
        [--top-k 20] [--seed 0] [--threads N] [--json PATH] [--out docs/results/stage-two-<device>.md]

On the same batches, one training step (forward, backward, AdamW step) each of:

- ``offline``: sparse MFT from cached top-k targets through the training loop's
  ``micro_batch_loss`` (the fused hidden-state loss wherever the head allows it), the method
  under test;
- ``ft``: plain finetuning through the standard Hugging Face loss,
  ``model(input_ids, labels=input_ids).loss`` (full logits, float32 cross-entropy);
- ``online``: dense MFT with a live frozen teacher (``micro_batch_loss`` with a teacher: a
  second forward + ``dense_mft_loss``).

On CUDA all three run under the training loop's bf16 autocast, with float32 weights.

Speed: one process, one student and one AdamW, the methods alternate (the order rotates each
repeat) over the same batches, after one warm-up step each; tokens/s is B × T input tokens per
second, the median over repeats, and each paired ratio is the median of the per-repeat
ratios. Peak memory: a fresh process per method (same model, same batches) takes one warm-up
step, so AdamW's state exists, then measures one step: torch.cuda.max_memory_allocated on
CUDA, the peak resident set on CPU (VmHWM reset through /proc/self/clear_refs, with glibc
told to return large blocks to the OS so the figure counts live memory). The loss alone:
a fresh process per loss takes random hidden states and the head weight of the model's
shape and measures the peak growth of loss + backward, for the fused loss and for FT's naive
cross-entropy on full float32 logits. The reader alone (``loader_rate``) and evaluation's
peak memory (``eval_peak_memory``) are measured apart.

Targets are cached synthetically: the model itself, as its own teacher, scores the batches
the stage-one way (``TransformersTeacher.score``), once, before anything is timed. The
token ids are random: speed and memory do not depend on the text. The measurements take the
device and sizes as arguments, so that the GPU check calls them at its own.
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.measure import in_fresh_process, peak_growth, random_token_batches, say, synchronizer, timed_rounds
from benchmarks.results import comma_list, command_line, fmt_mib, loadavg, machine_info, machine_line, table

TAU = 0.25
METHODS = ("offline", "ft", "online")

# Random-weight Llama shapes. "llama-128k-cpu" is small enough for a CPU and has Llama 3's vocabulary;
# the other two are about 360M (SmolLM2-360M's shape) and 1.2B (Llama-3.2-1B's) for a GPU.
SHAPES = {
    "llama-128k-cpu": dict(
        vocab_size=128256, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
    "llama-360m": dict(
        vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True,
    ),
    "llama-1.2b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
    ),
}

# --quick: small steps. One torch thread: on a shared machine, small ops with two OpenMP threads wait
# on each other's descheduled thread at every barrier (a 64-token SmolLM2 step took 50-100 s at load 10).
QUICK = dict(seq_len=64, batch_size=1, batches=1, repeats=3, threads=1)
PARTS = ("models", "loader", "eval")
# The reader alone: Llama 3's vocabulary, 4 shards of 64 rows (8 row groups, 537 MB decoded).
LOADER = dict(seq_len=2048, top_k=20, vocab=128256, shards=4, rows_per_shard=64, batch_size=4, epochs=2, random_rows=48)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage_two", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,llama-128k-cpu", help=f"comma-separated model specs or shapes ({', '.join(SHAPES)})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    for name, default, what in (("seq-len", 256, None), ("batch-size", 2, None), ("batches", 2, "batches per timed pass"),
                                ("repeats", 5, "timed passes per method (median reported)"), ("top-k", 20, None), ("seed", 0, None)):
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    p.add_argument("--loss-tokens", type=int, default=2048, help="positions (1 x N) for the loss-alone memory measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help=f"small sizes ({QUICK}), under 3 minutes on 2 CPU cores")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, from {', '.join(PARTS)}")
    p.add_argument("--eval-model", default="llama-128k-cpu", help="model spec or shape of the evaluation peak-memory part (V >= 128k)")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--json", default=None, help="write the ratios (and all numbers) as JSON here; with --only, the "
                   "figures of the other parts in an existing file are kept, and its run under earlier_runs")
    p.add_argument("--out", default=None, help="markdown results file (default: none)")
    args = p.parse_args(argv)
    if args.quick:  # the quick sizes as defaults, so that options given still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "batches", "repeats", "top_k"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    args.models, args.only = comma_list(args.models), comma_list(args.only)
    if not args.only or not set(args.only) <= set(PARTS):
        p.error(f"--only takes parts from {', '.join(PARTS)}")
    return args


# ---------------------------------------------------------------------------------------------
# Building blocks, callable from a GPU check


def build_model(spec: str, device, seed: int = 0):
    """A float32 causal LM in training mode: a named random Llama shape, or any ``load_model`` spec."""
    import torch

    device = torch.device(device)
    if spec in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(**SHAPES[spec], max_position_embeddings=8192)
        with device:  # initialised where it runs: a 1.2B model's CPU init alone would take minutes
            model = LlamaForCausalLM(config)
    else:
        from mft_pipeline.models import load_model

        model = load_model(spec, device, dtype=torch.float32)
    return model.train()


def make_batches(model, n_batches: int, batch_size: int, seq_len: int, top_k: int, seed: int) -> list[dict]:
    """Random token batches with the model's own top-k targets, laid out as ``CachedSplit.batch`` gives them.

    Returns a list of dicts on the model's device: input_ids (B, T); labels (B, T), the next
    token with one ignored position at the end; topk_ids and topk_logprobs (B, T, k);
    label_logprobs (B, T).
    """
    import numpy as np
    import torch

    from mft_pipeline.labels import IGNORE_INDEX
    from mft_pipeline.models import model_vocab_size
    from mft_pipeline.teacher.transformers_backend import TransformersTeacher

    device = next(model.parameters()).device
    teacher = TransformersTeacher(model)
    pad = lambda a, value=0: np.concatenate([a, np.full_like(a[:, :1], value)], axis=1)  # noqa: E731
    batches = []
    for ids in random_token_batches(model_vocab_size(model), n_batches, batch_size, seq_len, seed):
        scores = teacher.score(ids, np.full(batch_size, seq_len), top_k)
        part = {"input_ids": ids, "labels": pad(ids[:, 1:], IGNORE_INDEX), "topk_ids": pad(scores.topk_ids),
                "topk_logprobs": pad(scores.topk_logprobs), "label_logprobs": pad(scores.label_logprobs)}  # fmt: skip
        batches.append({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in part.items()})
    model.train()
    return batches


def training_autocast(device):
    """The training loop's autocast: bf16 on CUDA, off elsewhere."""
    import torch

    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_step(method: str, model, optimizer=None):
    """One training step function ``step(batch)`` for a method: forward, backward, AdamW step.

    ``optimizer``: an AdamW over the model's trainable parameters to share with other
    methods' steps (its cost per step is the same for all); a new one by default.
    """
    import torch

    from mft_pipeline.config import TrainConfig
    from mft_pipeline.train.loop import micro_batch_loss

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    device = next(model.parameters()).device
    config = TrainConfig(cache="", out="", tau=TAU)  # micro_batch_loss reads its tau, variant and tail
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    teacher = None
    if method == "online":  # as the training loop's online mode: a frozen copy, bf16 on GPU where it runs under autocast anyway
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        teacher = teacher.to(torch.bfloat16) if device.type == "cuda" else teacher

    def step(batch: dict) -> None:
        if method == "ft":
            with training_autocast(device):
                out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
            # ``out`` and its (B, T, V) logits live until the step ends: FT's figures in docs/results were measured so.
            loss, n_tokens = out.loss, 1
        else:
            loss, n_tokens = micro_batch_loss(model, [batch], config, teacher)
        (loss / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_methods(model, batches, *, repeats=5) -> dict:
    """Paired timing of the methods' training steps on one model and the same batches.

    The methods share the model and take turns (the order rotates each repeat); the weights
    drift a little between steps, which changes no step's cost.

    Returns {"tokens_per_s": {method: median}, "seconds": {method: [per repeat]},
    "paired_ratio_vs_ft": {method: median of per-repeat tokens/s ratios}, "fused": bool,
    "fallback_reason", "tokens_per_pass"}.
    """
    import torch

    from mft_pipeline.train.student_loss import head_or_reason

    sync = synchronizer(next(model.parameters()).device)
    head = head_or_reason(model)
    # One AdamW for all: three copies of its state would only crowd the memory.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    steps = {m: make_step(m, model, optimizer) for m in METHODS}
    for m in METHODS:  # warm-up: kernels, allocator, AdamW state
        steps[m](batches[0])
    sync()

    def run_pass(m: str) -> None:
        for batch in batches:
            steps[m](batch)
        sync()

    seconds, _ = timed_rounds({m: functools.partial(run_pass, m) for m in METHODS}, repeats)
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    return {
        "tokens_per_s": {m: tokens / statistics.median(s) for m, s in seconds.items()},
        "seconds": seconds,
        "fused": not isinstance(head, str),
        "fallback_reason": head if isinstance(head, str) else None,
        "tokens_per_pass": tokens,
        "paired_ratio_vs_ft": {m: statistics.median(f / s for f, s in zip(seconds["ft"], seconds[m])) for m in METHODS if m != "ft"},
    }


def measure_model(spec, device, seq_len, batch_size, *, n_batches=2, repeats=5, top_k=20, seed=0, loss_tokens=None) -> dict:
    """Everything the benchmark reports for one model: paired speed, each method's step peak, the loss alone.

    ``spec``: a name in ``SHAPES`` (random weights) or any ``load_model`` spec. The peak
    memories are measured in fresh processes. The loss alone is measured on ``loss_tokens``
    positions (1 × loss_tokens; default batch × seq_len).
    """
    import torch

    from mft_pipeline.models import model_vocab_size

    device = torch.device(device)
    t0 = time.perf_counter()
    model = build_model(spec, device, seed)
    vocab, hidden_size = model_vocab_size(model), model.get_output_embeddings().weight.shape[1]
    batches = make_batches(model, n_batches, batch_size, seq_len, top_k, seed)
    say(f"{spec}: timing {', '.join(METHODS)} ({repeats} paired repeats of {n_batches} x {batch_size} x {seq_len} tokens)")
    speed = time_methods(model, batches, repeats=repeats)
    with tempfile.TemporaryDirectory(prefix="mft-bench-stage-two-") as tmp:
        model_spec, batch_file = hand_over(spec, model, batches[0], Path(tmp))
        del model, batches  # the fresh processes' model needs the room on a GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say(f"{spec}: peak memory of a step, one fresh process per method")
        peaks = {m: peak_memory(model_spec, batch_file, m, device, seed=seed) for m in METHODS}
    loss_shape = (loss_tokens, 1) if loss_tokens else (seq_len, batch_size)
    say(f"{spec}: loss + backward alone at V={vocab}, H={hidden_size}, {loss_shape[1]} x {loss_shape[0]} positions, one fresh process per loss")
    losses = {name: loss_peak_memory(name, vocab, hidden_size, device, *loss_shape, top_k=top_k, seed=seed) for name in ("fused", "ft-naive")}
    return {
        "vocab": vocab, "hidden_size": hidden_size, "speed": speed, "peak": peaks, "loss": losses,
        "offline_vs_ft_speed": speed["paired_ratio_vs_ft"]["offline"],
        "online_vs_ft_speed": speed["paired_ratio_vs_ft"]["online"],
        "offline_vs_ft_peak_memory": peaks["offline"]["peak"] / peaks["ft"]["peak"],
        "online_vs_ft_peak_memory": peaks["online"]["peak"] / peaks["ft"]["peak"],
        "loss_peak_memory_vs_ft_naive": losses["fused"]["growth"] / losses["ft-naive"]["growth"],
        "loss_positions": loss_shape[0] * loss_shape[1],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def hand_over(spec: str, model, batch: dict, folder: Path) -> tuple[str, str]:
    """The model and a batch as a fresh process loads them: a ``SHAPES`` name stays a name, a
    loaded model is saved as a folder; the batch is ``torch.save``d."""
    import torch

    model_spec, batch_file = spec, str(folder / "batch.pt")
    if spec not in SHAPES:
        model_spec = str(folder / "model")
        model.save_pretrained(model_spec)
    torch.save({k: v.cpu() for k, v in batch.items()}, batch_file)
    return model_spec, batch_file


@in_fresh_process
def peak_memory(spec, batch_file, method, device, *, seed=0) -> dict:
    """Peak memory of one training step of ``method`` after a warm-up step, in a fresh process.

    ``spec``: a ``SHAPES`` name or a model folder; ``batch_file``: a ``torch.save``d batch dict.
    Returns {"peak", "before"} in bytes (``before``: held just before the measured step).
    """
    import torch

    device = torch.device(device)
    model = build_model(spec, device, seed)
    batch = {k: v.to(device) for k, v in torch.load(batch_file, weights_only=True).items()}
    step = make_step(method, model)
    step(batch)  # warm-up: AdamW's state now exists, as in every step after the first
    memory, _ = peak_growth(device, lambda: step(batch))
    return {"peak": memory["peak"], "before": memory["before"]}


@in_fresh_process
def loss_peak_memory(loss, vocab, hidden_size, device, seq_len, batch_size, *, top_k=20, seed=0, chunk_size=None, repeats=0) -> dict:
    """Peak memory growth of one loss + backward from (B, T, H) hidden states and a (V, H) head, in a fresh process.

    ``loss``: "fused" (``fused_sparse_mft_loss``, ``chunk_size`` positions per chunk; None: its
    default) or "ft-naive" (full logits, float32 cross-entropy, as Hugging Face's loss).
    Returns {"growth", "before", "peak"} in bytes and "seconds": the measured call's, or with
    ``repeats`` the median of that many more calls (the first call on a device pays its start-up).
    """
    import torch

    inputs = random_head_inputs(torch.device(device), batch_size, seq_len, vocab, hidden_size, top_k, seed)
    result, seconds = peak_growth(device, lambda: loss_and_backward(loss, inputs, chunk_size))
    if repeats:
        times = []
        for _ in range(repeats):
            inputs["hidden"].grad = inputs["weight"].grad = None
            times.append(loss_and_backward(loss, inputs, chunk_size))
        seconds = statistics.median(times)
    return {**result, "seconds": seconds}


def random_head_inputs(device, batch_size: int, seq_len: int, vocab: int, hidden_size: int, top_k: int, seed: int) -> dict:
    """A loss call's inputs as the model hands them over: (B, T, H) hidden states (bf16 on a GPU,
    as autocast leaves them), a float32 (V, H) head weight, both requiring grad; labels (B, T)
    with the last position ignored; sorted top-k targets (B, T, k) and label log-probs (B, T)."""
    import torch

    from mft_pipeline.labels import IGNORE_INDEX

    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, H, V = batch_size, seq_len, hidden_size, vocab
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(B, T, H, device=device, generator=gen, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=device, generator=gen) * H**-0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device=device, generator=gen)
    labels[:, -1] = IGNORE_INDEX
    return {
        "hidden": hidden, "weight": weight, "labels": labels,
        "topk_ids": torch.randint(0, V, (B, T, top_k), device=device, generator=gen),
        "topk_logprobs": -(torch.rand(B, T, top_k, device=device, generator=gen).sort(-1).values * 6 + 1),
        "label_logprobs": -(torch.rand(B, T, device=device, generator=gen) * 10 + 1),
    }  # fmt: skip


def loss_and_backward(loss: str, x: dict, chunk_size: int | None) -> float:
    """Seconds of one ``loss`` ("fused" or "ft-naive") + backward on ``random_head_inputs``, the device's queue drained."""
    import torch.nn.functional as F

    from mft_pipeline.distill import fused_sparse_mft_loss

    sync = synchronizer(x["hidden"].device)
    t0 = time.perf_counter()
    with training_autocast(x["hidden"].device):
        if loss == "fused":
            value, _ = fused_sparse_mft_loss(x["hidden"], x["weight"], x["labels"], x["topk_ids"], x["topk_logprobs"],
                                             x["label_logprobs"], TAU, chunk_size=chunk_size)  # fmt: skip
        elif loss == "ft-naive":
            logits = x["hidden"] @ x["weight"].T
            value = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), x["labels"].view(-1), reduction="sum")
            del logits
        else:
            raise ValueError(f"unknown loss {loss!r}")
    value.backward()
    sync()
    return time.perf_counter() - t0


def write_synthetic_cache(out, seq_len: int, top_k: int, vocab: int, shards: int, rows_per_shard: int, seed: int = 0) -> Path:
    """A finished training cache of random, well-formed teacher scores, written with ``CacheWriter``.

    Only the first shard is encoded; the others are byte copies of it under their own names
    (Parquet at zstd level 9 takes a while per shard). Decoding does not depend on the values.
    """
    import shutil

    import numpy as np

    from mft_pipeline.cache.format import SCHEMA_VERSION, shard_name
    from mft_pipeline.cache.shard import arrow_schema, encode_shard
    from mft_pipeline.cache.writer import CacheWriter

    out, rng, T, k = Path(out), np.random.default_rng(seed), seq_len, top_k
    plan = [{"file": shard_name("train", j), "split": "train", "start": j * rows_per_shard, "rows": rows_per_shard,
             "labels": rows_per_shard * (T - 1), "worker": 0} for j in range(shards)]  # fmt: skip
    settings = {"schema_version": SCHEMA_VERSION, "model": {"id": "synthetic", "fingerprint": "-", "vocab_size": vocab},
                "top_k": k, "seq_len": T, "rows_per_shard": rows_per_shard, "num_workers": 1, "plan": plan}  # fmt: skip
    with CacheWriter(out, settings) as writer:
        m = rows_per_shard
        topk_lp = -np.sort(rng.exponential(2, size=(m, T - 1, k)), axis=-1).astype(np.float32)
        table = encode_shard(
            arrow_schema(T, k, vocab), 0, rng.integers(0, vocab, size=(m, T)).astype(np.int32), np.full(m, T, dtype=np.int32),
            rng.integers(0, vocab, size=(m, T - 1, k)), topk_lp, -rng.exponential(3, size=(m, T - 1)).astype(np.float32),
        )  # fmt: skip
        writer.write_shard(plan[0]["file"], table)
        for p in plan[1:]:
            shutil.copyfile(out / plan[0]["file"], out / p["file"])
            writer.finished(p["file"])
    return out


@in_fresh_process
def loader_rate(cache_dir, device, *, batch_size=LOADER["batch_size"], epochs=LOADER["epochs"], random_rows=LOADER["random_rows"],
                shuffle_groups=None, seed=0) -> dict:
    """Tokens/s of the reader alone on a cache's training split, in a fresh process on one CPU core.

    ``loader_tokens_per_s``: ``epochs`` epochs in the training loop's order (block-shuffled,
    ``read_in_order`` in a ``Prefetch`` thread), micro-batches of ``batch_size`` rows moved to
    ``device``. ``loader_tokens_per_s_random_rows``: ``random_rows`` rows of a full random
    permutation, each micro-batch through ``CachedSplit.batch`` (the order training read
    before), with the decoded-group cache held to one group: the old 256 MiB cache holds about
    30 of these groups, a vanishing share of a real training split, but all of this small one.
    Tokens are rows × T. The rates divide by the CPU time of the pinned process (all its
    threads), i.e. what one core of its own delivers, so other jobs on a shared machine do not
    count; ``loader_tokens_per_wall_s*`` divide by wall time, which equals it on an idle core
    and on a GPU machine includes waiting for the device. Returns both kinds of rate, the ratio
    of the CPU-time rates, and the row groups each order decoded.
    """
    import numpy as np
    import torch

    from mft_pipeline.cache.reader import Cache
    from mft_pipeline.config import TRAIN_DEFAULTS

    pin_to_one_core()
    device, shuffle_groups = torch.device(device), shuffle_groups or TRAIN_DEFAULTS["shuffle_groups"]
    split, before = Cache(cache_dir).split("train"), Cache(cache_dir, cache_bytes=1).split("train")
    n, T = len(split), split.input_ids.shape[1]
    split.batch(np.arange(batch_size), device)  # warm-up: pyarrow's, numpy's and torch's first calls
    order = np.concatenate([split.epoch_order(seed, e, shuffle_groups) for e in range(epochs)])
    rows = np.random.default_rng(seed).permutation(n)[:random_rows]
    before.batch(rows[:1], device)
    block_seconds, block_cpu, block_decoded = timed_read(split, device, training_order(split, order, batch_size, device))
    random_seconds, random_cpu, random_decoded = timed_read(before, device, random_order(before, rows, batch_size, device))
    block, random_rate = len(order) * T / block_cpu, len(rows) * T / random_cpu
    return {
        "loader_tokens_per_s": block, "loader_tokens_per_s_random_rows": random_rate, "speedup": block / random_rate,
        "loader_tokens_per_wall_s": len(order) * T / block_seconds, "loader_tokens_per_wall_s_random_rows": len(rows) * T / random_seconds,
        "block_rows": len(order), "block_seconds": block_seconds, "block_cpu_seconds": block_cpu, "block_groups_decoded": block_decoded,
        "random_rows": len(rows), "random_seconds": random_seconds, "random_cpu_seconds": random_cpu, "random_groups_decoded": random_decoded,
        "row_groups": len(split._groups), "rows": n, "seq_len": T, "shuffle_groups": shuffle_groups, "batch_size": batch_size,
    }  # fmt: skip


def pin_to_one_core() -> None:
    """This process (the prefetch thread included) on one CPU only, with one thread per pool."""
    import pyarrow as pa
    import torch

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def training_order(split, order, batch_size: int, device):
    """``read()``: the rows of ``order`` (epochs of ``split``'s rows, one after the other) as
    training reads them, ``read_in_order`` in a ``Prefetch`` thread, each micro-batch moved to ``device``."""
    import numpy as np

    from mft_pipeline.cache.reader import Prefetch

    n = len(split)
    parts = [(order[b : b + batch_size], np.arange(b, min(b + batch_size, len(order))) // n) for b in range(0, len(order), batch_size)]

    def read() -> None:
        with Prefetch(split.read_in_order(parts)) as stream:
            for batch in stream:
                {k: v.to(device) for k, v in batch.items()}

    return read


def random_order(split, rows, batch_size: int, device):
    """``read()``: ``rows`` as training read them before: each micro-batch decodes the groups its rows fall in."""

    def read() -> None:
        for b in range(0, len(rows), batch_size):
            split.batch(rows[b : b + batch_size], device)

    return read


def timed_read(split, device, read) -> tuple[float, float, int]:
    """Wall and CPU seconds of ``read()``, the device's queue drained at both ends, and the row groups ``split`` decoded."""
    sync = synchronizer(device)
    split.decoded_groups = 0
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    read()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, split.decoded_groups


def measure_loader(device, *, seq_len=LOADER["seq_len"], top_k=LOADER["top_k"], vocab=LOADER["vocab"], shards=LOADER["shards"],
                   rows_per_shard=LOADER["rows_per_shard"], seed=0, **rate_kw) -> dict:
    """Write the synthetic cache (``write_synthetic_cache``) in a temporary folder and measure ``loader_rate`` on it."""
    with tempfile.TemporaryDirectory(prefix="mft-bench-loader-") as tmp:
        t0 = time.perf_counter()
        cache = write_synthetic_cache(Path(tmp) / "cache", seq_len, top_k, vocab, shards, rows_per_shard, seed)
        written = time.perf_counter() - t0
        say(f"loader: cache of {shards} x {rows_per_shard} rows at T={seq_len}, k={top_k}, V={vocab} written in {written:.0f} s")
        result = loader_rate(cache, device, seed=seed, **rate_kw)
        result["cache_bytes"] = sum(f.stat().st_size for f in cache.glob("*.parquet"))
    result.update(vocab=vocab, top_k=top_k, shards=shards, rows_per_shard=rows_per_shard, write_seconds=written)
    say(f"loader: {result['loader_tokens_per_s']:,.0f} tokens/s in training order, {result['loader_tokens_per_s_random_rows']:,.0f} "
        f"in a full random order ({result['speedup']:.1f}x)")
    return result


@in_fresh_process
def eval_peak_memory(spec, device, seq_len, batch_size, fused: bool, *, seed=0) -> dict:
    """Peak memory growth of ``model_nll`` on ``batch_size`` × ``seq_len`` random tokens, in a fresh process.

    ``fused``: through the output head in chunks (the default evaluation path) or through the
    model's full logits. Returns {"growth", "before", "peak"} in bytes and the summed "nll".
    """
    import numpy as np
    import torch

    from mft_pipeline.eval.metrics import model_nll

    device = torch.device(device)
    model = build_model(spec, device, seed).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch_size, seq_len))
    num = np.full(batch_size, seq_len)
    model_nll(model, ids[:1, :8], num[:1] * 0 + 8, fused=fused)  # warm-up: first calls, the head's probe
    memory, (nll, count) = peak_growth(device, lambda: model_nll(model, ids, num, batch_size, fused=fused))
    return {**memory, "nll": nll, "count": count, "vocab": vocab}


def measure_eval(spec, device, seq_len, batch_size, *, seed=0) -> dict:
    """``eval_peak_memory`` of the chunked and the full-logits path, their ratio, and their NLLs' relative gap."""
    paths = {name: eval_peak_memory(spec, device, seq_len, batch_size, fused, seed=seed)
             for name, fused in (("chunked", True), ("naive", False))}  # fmt: skip
    chunked, naive = paths["chunked"], paths["naive"]
    result = {**paths, "ratio": chunked["growth"] / naive["growth"], "nll_rel_gap": abs(chunked["nll"] - naive["nll"]) / abs(naive["nll"]),
              "spec": spec, "seq_len": seq_len, "batch_size": batch_size}  # fmt: skip
    say(f"eval: peak growth {fmt_mib(chunked['growth'])} chunked vs {fmt_mib(naive['growth'])} full logits ({result['ratio']:.3f})")
    return result


# ---------------------------------------------------------------------------------------------
# The run


def run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {k: None for k, *_ in TARGETS}
    if "models" in args.only:
        per_model = {}
        for spec in args.models:
            r = per_model[spec] = measure_model(
                spec, device, args.seq_len, args.batch_size, n_batches=args.batches, repeats=args.repeats,
                top_k=args.top_k, seed=args.seed, loss_tokens=args.loss_tokens,
            )
            say(f"{spec}: offline/FT speed {r['offline_vs_ft_speed']:.3f}, peak {r['offline_vs_ft_peak_memory']:.3f}, "
                f"loss peak vs FT-naive {r['loss_peak_memory_vs_ft_naive']:.3f} ({r['seconds']:.0f} s)")
        out.update(worst_case(list(per_model.values())), per_model=per_model)
    if "loader" in args.only:
        loader = out["loader"] = measure_loader(device, seed=args.seed)
        out.update(loader_tokens_per_s=loader["loader_tokens_per_s"], loader_speedup_vs_random_rows=loader["speedup"],
                   loader_tokens_per_s_random_rows=loader["loader_tokens_per_s_random_rows"])  # fmt: skip
    if "eval" in args.only:
        ev = out["eval"] = measure_eval(args.eval_model, device, args.eval_seq_len, args.eval_batch_size, seed=args.seed)
        out["eval_peak_memory_vs_naive_128k"] = ev["ratio"] if ev["chunked"]["vocab"] >= 128000 else None
    return out


def worst_case(models: list[dict]) -> dict:
    """The figures the model targets are checked against: the worst over ``measure_model``'s results (None for none)."""
    at_128k = [r["loss_peak_memory_vs_ft_naive"] for r in models if r["vocab"] >= 128000]
    worst = lambda f, xs: f(xs) if xs else None  # noqa: E731
    return {
        "offline_vs_ft_speed": worst(min, [r["offline_vs_ft_speed"] for r in models]),
        "offline_vs_ft_peak_memory": worst(max, [r["offline_vs_ft_peak_memory"] for r in models]),
        "loss_peak_memory_vs_ft_naive_128k": worst(max, at_128k),
    }


TARGETS = (
    ("offline_vs_ft_speed", ">=", 0.97, "offline MFT tokens/s vs FT"),
    ("offline_vs_ft_peak_memory", "<=", 1.0, "offline MFT peak memory vs FT"),
    ("loss_peak_memory_vs_ft_naive_128k", "<=", 0.15, "loss + backward peak vs FT's naive float32 cross-entropy at V = 128k"),
    ("loader_tokens_per_s", ">=", 500_000, "reader alone, training order, tokens/s on one CPU core (T = 2048, k = 20, V = 128k)"),
    ("loader_speedup_vs_random_rows", ">=", 10, "reader: training order vs a full random order, same run"),
    ("eval_peak_memory_vs_naive_128k", "<=", 0.25, "evaluation peak vs the full-logits evaluation at V = 128k"),
)


def shown(value) -> str:
    return "not run" if value is None else f"{value:,.0f}" if value >= 1000 else f"{value:.3f}"


def render(r: dict) -> str:
    m, a, ratios = r["machine"], r["args"], r["ratios"]
    lines = [
        f"# Stage two benchmark ({m['device']})", "", f"Command: `{r['command']}`", "",
        f"Date: {r['date']}. {machine_line(m)} Load average at start / end: {r['loadavg_start']} / {r['loadavg_end']}.", "",
        f"Parts run: {', '.join(a['only'])}. Sizes: {a['batches']} batches of {a['batch_size']} × {a['seq_len']} random tokens per timed pass, "
        f"top-k {a['top_k']}, τ = {TAU}, seed {a['seed']}, {a['repeats']} paired repeats; "
        + ("bf16 autocast, float32 weights." if m["device"].startswith("cuda") else "float32."), "",
        "## Targets", "",
        *table(["target", "measured (worst model)", "goal", "met"],
               [[what, shown(ratios[key]), f"{op} {goal:,}", "-" if ratios[key] is None else "yes" if met(ratios[key], op, goal) else "NO"]
                for key, op, goal, what in TARGETS]),
    ]  # fmt: skip
    for spec, p in (ratios.get("per_model") or {}).items():
        lines += render_model(spec, p, a["top_k"])
    if ratios.get("loader"):
        lines += render_loader(ratios["loader"], m["device"])
    if ratios.get("eval"):
        lines += render_eval(ratios["eval"])
    return "\n".join(lines) + "\n"


def met(value, op: str, goal: float) -> bool:
    return value >= goal if op == ">=" else value <= goal


def render_model(spec: str, p: dict, top_k: int) -> list[str]:
    s, peak, loss = p["speed"], p["peak"], p["loss"]
    return [
        "", f"## {spec} (V = {p['vocab']:,}, H = {p['hidden_size']})", "",
        f"Offline path: {'fused hidden-state loss' if s['fused'] else 'logits path: ' + str(s['fallback_reason'])}. "
        f"Measured in {p['seconds']:.0f} s.", "",
        *table(["method", "tokens/s (median)", "per-repeat seconds", "paired ratio vs FT", "peak memory of a step", "vs FT"],
               [[meth, f"{s['tokens_per_s'][meth]:,.3g}", ", ".join(f"{x:.2f}" for x in s["seconds"][meth]),
                 f"{1.0 if meth == 'ft' else s['paired_ratio_vs_ft'][meth]:.3f}", fmt_mib(peak[meth]["peak"]),
                 f"{peak[meth]['peak'] / peak['ft']['peak']:.3f}"] for meth in METHODS]),
        "", f"Loss + backward alone, {p['loss_positions']:,} positions, top-k {top_k}: peak growth over its inputs "
        "(hidden states, head weight, targets), the (V, H) weight gradient included:", "",
        *table(["loss", "peak growth", "vs FT-naive"],
               [[name, fmt_mib(lp["growth"]), f"{lp['growth'] / loss['ft-naive']['growth']:.3f}"] for name, lp in loss.items()]),
    ]  # fmt: skip


def render_loader(ld: dict, device: str) -> list[str]:
    orders = (("training: block-shuffled ({} groups), prefetched".format(ld["shuffle_groups"]), "block", ""),
              ("before: full random permutation, read per micro-batch", "random", "_random_rows"))
    return [
        "", f"## Reader alone (T = {ld['seq_len']:,}, k = {ld['top_k']}, V = {ld['vocab']:,}; one CPU core)", "",
        f"Synthetic cache: {ld['shards']} shards × {ld['rows_per_shard']} rows ({ld['row_groups']} row groups, "
        f"{fmt_mib(ld['cache_bytes'])} on disk), written with the real writer in {ld['write_seconds']:.0f} s. "
        f"Micro-batches of {ld['batch_size']} rows moved to {device}.", "",
        *table(["order", "rows read", "CPU seconds", "wall seconds", "row groups decoded", "tokens per CPU second", "tokens per wall second"],
               [[label, ld[f"{o}_rows"], f"{ld[f'{o}_cpu_seconds']:.2f}", f"{ld[f'{o}_seconds']:.2f}", ld[f"{o}_groups_decoded"],
                 f"{ld['loader_tokens_per_s' + tail]:,.0f}", f"{ld['loader_tokens_per_wall_s' + tail]:,.0f}"] for label, o, tail in orders]),
    ]  # fmt: skip


def render_eval(ev: dict) -> list[str]:
    return [
        "", f"## Evaluation ({ev['spec']}, V = {ev['chunked']['vocab']:,}, {ev['batch_size']} × {ev['seq_len']:,} tokens)", "",
        *table(["path", "peak growth", "vs full logits", "summed NLL"],
               [["through the head in chunks", fmt_mib(ev["chunked"]["growth"]), f"{ev['ratio']:.3f}", f"{ev['chunked']['nll']:.6g}"],
                ["full logits", fmt_mib(ev["naive"]["growth"]), "1.000", f"{ev['naive']['nll']:.6g}"]]),
        "", f"Relative gap between the two NLLs: {ev['nll_rel_gap']:.2g}.",
    ]  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    loadavg_start = loadavg()
    t0 = time.perf_counter()
    ratios = run(args)
    result = {
        "command": command_line("python -m benchmarks.stage_two", argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(args.device),
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "wall_seconds": time.perf_counter() - t0,
        "ratios": ratios,
    }
    text = render(result)
    print(text)
    if args.json:
        path = Path(args.json)
        headline = {k: ratios.get(k) for k in (*(k for k, *_ in TARGETS), "loader_tokens_per_s_random_rows")}
        out = {**headline, "run": result}
        if set(args.only) != set(PARTS) and path.exists():
            # A run of some parts keeps an earlier file's figures of the others, and that run under earlier_runs.
            old = json.loads(path.read_text())
            out = {**{k: v for k, v in old.items() if k in headline and v is not None}, **{k: v for k, v in headline.items() if v is not None}}
            out.update(run=result, earlier_runs=[old["run"], *old.get("earlier_runs", [])])
        path.write_text(json.dumps(out, indent=2) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    say(f"done in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()

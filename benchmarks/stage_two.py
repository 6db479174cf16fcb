"""Stage-two benchmark: offline sparse MFT (fused) against plain finetuning and online dense MFT.

    python -m benchmarks.stage_two [--quick] [--only models,loader,eval] [--device cpu|cuda]
        [--models smollm2-135m,llama-128k-cpu] [--seq-len 256] [--batch-size 2] [--batches 2] [--repeats 5]
        [--top-k 20] [--seed 0] [--threads N] [--json PATH] [--out docs/results/stage-two-<device>.md]

One training step (forward, backward, AdamW step) of each method on the same batches, under the
training loop's bf16 autocast on CUDA: ``offline``, sparse MFT from cached top-k targets through the
loop's ``micro_batch_loss`` (the method under test); ``ft``, Hugging Face's
``model(input_ids, labels=input_ids).loss`` (full logits, float32 cross-entropy); ``online``, dense
MFT with a live frozen teacher. Speed: paired, in one process (``time_methods``). Peak memory: a
fresh process per method (``peak_memory``), and per loss alone (``measure_loss``: the fused loss
against FT's naive cross-entropy from the same hidden states). The reader alone (``loader_rate``)
and evaluation's peak memory (``eval_peak_memory``) are measured apart. Targets are cached
synthetically: the model, as its own teacher, scores random token batches the stage-one way
(``TransformersTeacher.score``) before anything is timed; speed and memory do not depend on the
text. The measurements take the device and sizes as arguments, so that the GPU check calls them
at its own. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from benchmarks.measure import in_fresh_process, peak_growth, random_token_batches, run_parts, say, synchronizer, timed_rounds
from benchmarks.results import comma_list, command_line, failures, fmt_mib, header, loadavg, started, table
from mft_pipeline.cache.format import SCHEMA_VERSION, shard_name
from mft_pipeline.cache.reader import Cache, Prefetch
from mft_pipeline.cache.shard import arrow_schema, encode_shard
from mft_pipeline.cache.writer import CacheWriter
from mft_pipeline.config import TRAIN_DEFAULTS, TrainConfig
from mft_pipeline.distill import fused_sparse_mft_loss
from mft_pipeline.distill.fused_loss import default_chunk_size
from mft_pipeline.eval.metrics import model_nll
from mft_pipeline.labels import IGNORE_INDEX
from mft_pipeline.models import load_model, model_vocab_size
from mft_pipeline.teacher.transformers_backend import TransformersTeacher
from mft_pipeline.train.loop import micro_batch_loss
from mft_pipeline.train.student_loss import head_or_reason

TAU = 0.25
METHODS = ("offline", "ft", "online")

# Random-weight Llama shapes. "llama-128k-cpu" is small enough for a CPU and has Llama 3's vocabulary;
# "llama-360m" and "llama-1.2b" are about 360M (SmolLM2-360M's shape) and 1.2B (Llama-3.2-1B's) for a GPU;
# "llama-tiny" is the GPU check's CPU rehearsal's.
SHAPES = {
    "llama-tiny": dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
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
    if args.seq_len < 2 or min(args.batch_size, args.batches, args.repeats, args.top_k) < 1:
        p.error("--seq-len must be >= 2 and --batch-size, --batches, --repeats, --top-k >= 1")
    args.models, args.only = comma_list(args.models), comma_list(args.only)
    if not args.only or not set(args.only) <= set(PARTS):
        p.error(f"--only takes parts from {', '.join(PARTS)}")
    return args


# ---------------------------------------------------------------------------------------------
# Building blocks, callable from a GPU check


def build_model(spec: str, device, seed: int = 0):
    """A float32 causal LM in training mode: a named random Llama shape, or any ``load_model`` spec."""
    device = torch.device(device)
    if spec in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(**SHAPES[spec], max_position_embeddings=8192)
        with device:  # initialised where it runs: a 1.2B model's CPU init alone would take minutes
            model = LlamaForCausalLM(config)
    else:
        model = load_model(spec, device, dtype=torch.float32)
    return model.train()


def make_batches(model, n_batches: int, batch_size: int, seq_len: int, top_k: int, seed: int) -> list[dict]:
    """Random token batches with the model's own top-k targets, laid out as ``CachedSplit.batch`` gives them.

    Returns a list of dicts on the model's device: input_ids (B, T); labels (B, T), the next
    token with one ignored position at the end; topk_ids and topk_logprobs (B, T, k);
    label_logprobs (B, T).
    """
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
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_step(method: str, model, optimizer=None):
    """One training step function ``step(batch)`` for a method: forward, backward, AdamW step.

    ``optimizer``: an AdamW over the model's trainable parameters to share with other
    methods' steps (its cost per step is the same for all); a new one by default.
    """
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
    """Paired timing of the methods' training steps on one model and the same batches: they share the
    model and take turns (the order rotates each repeat); the weights drift a little between steps,
    which changes no step's cost. The paired ratios are the medians of the per-repeat ratios."""
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
    """Everything the benchmark reports for one model (``build_model``'s ``spec``): paired speed, each
    method's step peak in a fresh process, and ``measure_loss`` at 1 × ``loss_tokens`` positions (default B × T)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    model = build_model(spec, device, seed)
    vocab, hidden_size = model_vocab_size(model), model.get_output_embeddings().weight.shape[1]
    batches = make_batches(model, n_batches, batch_size, seq_len, top_k, seed)
    say(f"{spec}: timing {', '.join(METHODS)} ({repeats} paired repeats of {n_batches} x {batch_size} x {seq_len} tokens)")
    speed = time_methods(model, batches, repeats=repeats)
    with tempfile.TemporaryDirectory(prefix="mft-bench-stage-two-") as tmp:
        batch_file = str(Path(tmp) / "batch.pt")
        torch.save({k: v.cpu() for k, v in batches[0].items()}, batch_file)
        del model, batches  # the fresh processes' model needs the room on a GPU
        torch.cuda.empty_cache()
        say(f"{spec}: peak memory of a step, one fresh process per method")
        peaks = {m: peak_memory(spec, batch_file, m, device, seed=seed) for m in METHODS}
    loss = measure_loss(vocab, hidden_size, device, *((loss_tokens, 1) if loss_tokens else (seq_len, batch_size)), top_k=top_k, seed=seed)
    say(f"{spec}: offline/FT speed {speed['paired_ratio_vs_ft']['offline']:.3f}, peak {peaks['offline']['peak'] / peaks['ft']['peak']:.3f}, "
        f"loss peak vs FT-naive {loss['fused'][0]['vs_ft_naive']:.3f} ({time.perf_counter() - t0:.0f} s)")
    return {
        "vocab": vocab, "hidden_size": hidden_size, "speed": speed, "peak": peaks, "loss": loss,
        "offline_vs_ft_speed": speed["paired_ratio_vs_ft"]["offline"],
        "online_vs_ft_speed": speed["paired_ratio_vs_ft"]["online"],
        "offline_vs_ft_peak_memory": peaks["offline"]["peak"] / peaks["ft"]["peak"],
        "online_vs_ft_peak_memory": peaks["online"]["peak"] / peaks["ft"]["peak"],
        "loss_peak_memory_vs_ft_naive": loss["fused"][0]["vs_ft_naive"],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


@in_fresh_process
def peak_memory(spec, batch_file, method, device, *, seed=0) -> dict:
    """Peak memory of one training step of ``method`` after a warm-up step, in a fresh process.

    ``spec``: as ``build_model`` takes it; ``batch_file``: a ``torch.save``d batch dict.
    Returns {"peak", "before"} in bytes (``before``: held just before the measured step).
    """
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


def measure_loss(vocab, hidden_size, device, seq_len, batch_size, *, chunks=(), top_k=20, seed=0, repeats=0,
                 progress=lambda result: None) -> dict:
    """FT-naive, then the fused loss at its default chunk and at each of ``chunks``: ``loss_peak_memory``
    each, the fused points beside ``fused_loss_bytes``'s prediction. ``progress`` gets the result so far
    after each point, so that a long sweep stopped early keeps what it measured."""
    device, n = torch.device(device), seq_len * batch_size
    point = functools.partial(loss_peak_memory, vocab=vocab, hidden_size=hidden_size, device=device, seq_len=seq_len,
                              batch_size=batch_size, top_k=top_k, seed=seed, repeats=repeats)  # fmt: skip
    say(f"loss + backward alone at V={vocab}, H={hidden_size}, {batch_size} x {seq_len} positions, one fresh process per point")
    naive, default = point("ft-naive"), default_chunk_size(n, vocab, hidden_size)
    result = {"shape": {"B": batch_size, "T": seq_len, "V": vocab, "H": hidden_size}, "top_k": top_k, "repeats": repeats, "ft_naive": naive, "fused": []}
    for chunk in dict.fromkeys((default, *chunks)):  # the default first, then in the order asked
        r = point("fused", chunk_size=chunk)
        predicted = fused_loss_bytes(n, vocab, hidden_size, chunk, 2 if device.type == "cuda" else 4)
        result["fused"].append({"chunk": chunk, "default": chunk == default, **r, "vs_ft_naive": r["growth"] / naive["growth"],
                                "predicted": predicted})  # fmt: skip
        say(f"fused, chunk {chunk}: {fmt_mib(r['growth'])} (predicted {fmt_mib(predicted)}) vs FT-naive {fmt_mib(naive['growth'])}")
        progress(result)
    return result


def fused_loss_bytes(positions: int, vocab: int, hidden: int, chunk: int, matmul_bytes: int = 4) -> int:
    """Predicted peak growth of ``fused_sparse_mft_loss`` + backward, in bytes, from how it allocates.

    Always: the float32 (V, H) weight gradient and the (n, H) hidden-state gradient, gather and
    head-path copies. A bf16 matmul (autocast) adds the head's bf16 copy. Then the larger of two
    moments of a chunk of ``c`` positions: its loss, three float32 (c, V) tensors (logits,
    log-softmax, tail log-softmax); its weight-gradient update, the float32 and matmul-dtype
    (c, V) gradients and, in bf16, the (V, H) product before its cast to float32.
    """
    bf16 = matmul_bytes != 4
    c = min(chunk, positions)
    fixed = vocab * hidden * (4 + (matmul_bytes if bf16 else 0)) + positions * hidden * (2 * matmul_bytes + 4)
    loss = 3 * c * vocab * 4
    update = c * vocab * (4 + (matmul_bytes if bf16 else 0)) + (vocab * hidden * (matmul_bytes + 4) if bf16 else 0)
    return fixed + max(loss, update)


def write_synthetic_cache(out, seq_len: int, top_k: int, vocab: int, shards: int, rows_per_shard: int, seed: int = 0) -> Path:
    """A finished training cache of random, well-formed teacher scores, written with ``CacheWriter``.

    Only the first shard is encoded; the others are byte copies of it under their own names
    (Parquet at zstd level 9 takes a while per shard). Decoding does not depend on the values.
    """
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
    pin_to_one_core()
    device, shuffle_groups = torch.device(device), shuffle_groups or TRAIN_DEFAULTS["shuffle_groups"]
    split, before = Cache(cache_dir).split("train"), Cache(cache_dir, cache_bytes=1).split("train")
    n, T = len(split), split.input_ids.shape[1]
    split.batch(np.arange(batch_size), device)  # warm-up: pyarrow's, numpy's and torch's first calls
    order = np.concatenate([split.epoch_order(seed, e, shuffle_groups) for e in range(epochs)])
    rows = np.random.default_rng(seed).permutation(n)[:random_rows]
    before.batch(rows[:1], device)
    block_seconds, block_cpu, block_decoded = timed_read(split, device, training_order(split, order, batch_size))
    # As training read them before: each micro-batch decodes the groups its rows fall in.
    in_random_order = (before.batch(rows[b : b + batch_size], device) for b in range(0, len(rows), batch_size))
    random_seconds, random_cpu, random_decoded = timed_read(before, device, in_random_order)
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
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def training_order(split, order, batch_size: int):
    """The micro-batches of ``order`` (epochs of ``split``'s rows, one after the other) as training
    reads them: ``read_in_order`` in a ``Prefetch`` thread, started on the first batch asked for."""
    n = len(split)
    with Prefetch(split.read_in_order([(order[b : b + batch_size], np.arange(b, min(b + batch_size, len(order))) // n)
                                       for b in range(0, len(order), batch_size)])) as stream:  # fmt: skip
        yield from stream


def timed_read(split, device, batches) -> tuple[float, float, int]:
    """Wall and CPU seconds of moving each of ``batches`` (an iterator) to ``device``, its queue
    drained at both ends, and the row groups ``split`` decoded."""
    sync = synchronizer(device)
    split.decoded_groups = 0
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in batches:
        {k: v.to(device) for k, v in batch.items()}
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


def parts(args) -> list:
    """(name, measure) of each part ``--only`` names, in order: "stage_two/SPEC" per model, "loader", "eval"."""
    partial = functools.partial
    measures = {
        "models": [(f"stage_two/{spec}", partial(measure_model, spec, args.device, args.seq_len, args.batch_size, n_batches=args.batches,
                                                 repeats=args.repeats, top_k=args.top_k, seed=args.seed, loss_tokens=args.loss_tokens))
                   for spec in args.models],
        "loader": [("loader", partial(measure_loader, args.device, seed=args.seed))],
        "eval": [("eval", partial(measure_eval, args.eval_model, args.device, args.eval_seq_len, args.eval_batch_size, seed=args.seed))],
    }  # fmt: skip
    return [part for name in PARTS if name in args.only for part in measures[name]]


def headline(parts: dict) -> dict:
    """The figures ``TARGETS`` are checked against, from the parts measured: the worst model's; None where not measured."""
    models, loader, ev = [p for name, p in parts.items() if name.startswith("stage_two/")], parts.get("loader") or {}, parts.get("eval")
    return {
        "offline_vs_ft_speed": min((r["offline_vs_ft_speed"] for r in models), default=None),
        "offline_vs_ft_peak_memory": max((r["offline_vs_ft_peak_memory"] for r in models), default=None),
        "loss_peak_memory_vs_ft_naive_128k": max((r["loss_peak_memory_vs_ft_naive"] for r in models if r["vocab"] >= 128000), default=None),
        "loader_tokens_per_s": loader.get("loader_tokens_per_s"),
        "loader_speedup_vs_random_rows": loader.get("speedup"),
        "loader_tokens_per_s_random_rows": loader.get("loader_tokens_per_s_random_rows"),
        "eval_peak_memory_vs_naive_128k": ev["ratio"] if ev and ev["chunked"]["vocab"] >= 128000 else None,
    }  # fmt: skip


TARGETS = (
    ("offline_vs_ft_speed", ">=", 0.97, "offline MFT tokens/s vs FT"),
    ("offline_vs_ft_peak_memory", "<=", 1.0, "offline MFT peak memory vs FT"),
    ("loss_peak_memory_vs_ft_naive_128k", "<=", 0.15, "loss + backward peak vs FT's naive float32 cross-entropy at V = 128k"),
    ("loader_tokens_per_s", ">=", 500_000, "reader alone, training order, tokens/s on one CPU core (T = 2048, k = 20, V = 128k)"),
    ("loader_speedup_vs_random_rows", ">=", 10, "reader: training order vs a full random order, same run"),
    ("eval_peak_memory_vs_naive_128k", "<=", 0.25, "evaluation peak vs the full-logits evaluation at V = 128k"),
)


def render(r: dict) -> str:
    m, a = r["machine"], r["args"]
    lines = header(f"Stage two benchmark ({m['device']})", r) + [
        f"Parts run: {', '.join(a['only'])}. Sizes: {a['batches']} batches of {a['batch_size']} × {a['seq_len']} random tokens per timed pass, "
        f"top-k {a['top_k']}, τ = {TAU}, seed {a['seed']}, {a['repeats']} paired repeats; "
        + ("bf16 autocast, float32 weights." if m["device"].startswith("cuda") else "float32."), "",
        "## Targets", "", *render_targets(r["ratios"], TARGETS),
    ]  # fmt: skip
    lines += [line for name, p in r["parts"].items() for line in render_part(name, p, m["device"])]
    return "\n".join(lines + failures(r["errors"])) + "\n"


def render_targets(figures: dict, targets) -> list[str]:
    """Each target's figure beside its goal, and by how much a missed one is off."""
    return table(["target", "measured (worst model)", "goal", "met"],
                 [[what, shown(figures.get(key)), f"{op} {goal:,}", met(figures.get(key), op, goal)] for key, op, goal, what in targets])  # fmt: skip


def shown(value) -> str:
    return "not run" if value is None else f"{value:,.0f}" if value >= 1000 else f"{value:.3f}"


def met(value, op: str, goal: float) -> str:
    if value is None:
        return "-"
    return "yes" if (value >= goal if op == ">=" else value <= goal) else f"NO (off by {shown(abs(value - goal))})"


def render_part(name: str, p: dict, device: str) -> list[str]:
    """A part's section: a model's ("stage_two/SPEC"), the reader's, evaluation's, or the loss by chunk size ("chunks")."""
    if name.startswith("stage_two/"):
        return render_model(name.split("/", 1)[1], p)
    return {"loader": lambda: render_loader(p, device), "eval": lambda: render_eval(p), "chunks": lambda: render_loss(p)}[name]()


def render_model(spec: str, p: dict) -> list[str]:
    s, peak = p["speed"], p["peak"]
    return [
        "", f"## Stage two: {spec} (V = {p['vocab']:,}, H = {p['hidden_size']})", "",
        f"Offline path: {'fused hidden-state loss' if s['fused'] else 'logits path: ' + str(s['fallback_reason'])}. "
        f"Measured in {p['seconds']:.0f} s.", "",
        *table(["method", "tokens/s (median)", "per-repeat seconds", "paired ratio vs FT", "peak memory of a step", "vs FT"],
               [[meth, f"{s['tokens_per_s'][meth]:,.3g}", ", ".join(f"{x:.2f}" for x in s["seconds"][meth]),
                 f"{1.0 if meth == 'ft' else s['paired_ratio_vs_ft'][meth]:.3f}", fmt_mib(peak[meth]["peak"]),
                 f"{peak[meth]['peak'] / peak['ft']['peak']:.3f}"] for meth in METHODS]),
        *render_loss(p["loss"]),
    ]  # fmt: skip


def render_loss(c: dict) -> list[str]:
    """``measure_loss``'s table, a row per chunk size."""
    s, naive = c["shape"], c["ft_naive"]
    timed = f"the median of {c['repeats']} calls after the measured one" if c["repeats"] else "the measured call's, first touch of its memory included"
    rows = [[f"{row['chunk']} (default)" if row["default"] else row["chunk"], fmt_mib(row["growth"]), fmt_mib(row["predicted"]),
             f"{row['vs_ft_naive']:.3f}", f"{row['seconds']:.3f}", f"{row['seconds'] / naive['seconds']:.2f}"]
            for row in sorted(c["fused"], key=lambda row: row["chunk"])]  # fmt: skip
    return ["", f"Fused loss + backward alone by chunk size, {s['B']} × {s['T']} positions, V = {s['V']:,}, H = {s['H']}, top-k {c['top_k']}: "
            "peak growth over its inputs (hidden states, head weight, targets), the (V, H) weight gradient included; "
            f"`fused_loss_bytes`'s prediction; seconds ({timed}). FT-naive's float32 cross-entropy: {fmt_mib(naive['growth'])}, "
            f"{naive['seconds']:.3f} s.", "", *table(["chunk", "peak growth", "predicted", "vs FT-naive", "seconds", "vs FT-naive's time"], rows)]  # fmt: skip


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
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {**started(command_line("python -m benchmarks.stage_two", argv), args.device),
              "args": {k: v for k, v in vars(args).items() if k not in ("json", "out")}, "parts": {}, "errors": {}}  # fmt: skip
    run_parts(parts(args), result)
    result.update(ratios=headline(result["parts"]), loadavg_end=loadavg(), wall_seconds=time.perf_counter() - t0)
    text = render(result)
    print(text)
    if args.json:
        path = Path(args.json)
        figures = result["ratios"]
        out = {**figures, "run": result}
        if set(args.only) != set(PARTS) and path.exists():
            # A run of some parts keeps an earlier file's figures of the others, and that run under earlier_runs.
            old = json.loads(path.read_text())
            out = {**{k: v for k, v in old.items() if k in figures and v is not None}, **{k: v for k, v in figures.items() if v is not None}}
            out.update(run=result, earlier_runs=[old["run"], *old.get("earlier_runs", [])])
        path.write_text(json.dumps(out, indent=2) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    say(f"done in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()

"""Stage-two benchmark: offline sparse MFT (fused) against plain finetuning and online dense MFT.

    python -m benchmarks.stage_two [--quick] [--device cpu|cuda] [--models smollm2-135m,llama-128k-cpu]
        [--seq-len 256] [--batch-size 2] [--batches 2] [--repeats 5] [--top-k 20] [--seed 0]
        [--threads N] [--json PATH] [--out docs/results/stage-two-<device>.md]

On the same batches, one training step (forward, backward, AdamW step) each of:

- ``offline``: sparse MFT from cached top-k targets through ``student_loss`` (the fused
  hidden-state loss wherever the head allows it), the method under test;
- ``ft``: plain finetuning through the standard Hugging Face loss,
  ``model(input_ids, labels=input_ids).loss`` (full logits, float32 cross-entropy);
- ``online``: dense MFT with a live frozen teacher (second forward + ``dense_mft_loss``).

Speed: one process, one student and one AdamW, the methods alternate (the order rotates each
repeat) over the same batches, after one warm-up step each; tokens/s is B × T input tokens per
second, the median over repeats, and each paired ratio is the median of the per-repeat
ratios. Peak memory: a fresh process per method (same model, same batches) takes one warm-up
step, so AdamW's state exists, then measures one step: torch.cuda.max_memory_allocated on
CUDA, the peak resident set on CPU (VmHWM reset through /proc/self/clear_refs, with glibc
told to return large blocks to the OS so the figure counts live memory). The loss alone:
a fresh process per loss takes random hidden states and the head weight of the model's
shape and measures the peak growth of loss + backward, for the fused loss, for
``sparse_mft_loss`` on full logits, and for FT's naive cross-entropy on full float32 logits.

Targets are cached synthetically: the model itself, as its own teacher, scores the batches
the stage-one way (``TransformersTeacher.score``), once, before anything is timed. The
token ids are random: speed and memory do not depend on the text.

The core functions take (model spec, device, dtype, seq_len, batch) so that a GPU check
can call ``time_methods``, ``peak_memory`` and ``loss_peak_memory`` directly at other sizes.
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.stage_one import fmt_mib, machine_info

REPO = Path(__file__).resolve().parents[1]
TAU = 0.25
METHODS = ("offline", "ft", "online")
LOSSES = ("fused", "sparse-logits", "ft-naive")

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

# --quick: small steps, and the loss alone only for the fused loss and the FT-naive reference the target needs.
# One torch thread: on a shared machine, small ops with two OpenMP threads wait on each other's
# descheduled thread at every barrier (a 64-token SmolLM2 step took 50-100 s at load 10).
QUICK = dict(seq_len=64, batch_size=1, batches=1, repeats=3, losses="fused,ft-naive", threads=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage_two", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,llama-128k-cpu", help=f"comma-separated model specs or shapes ({', '.join(SHAPES)})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="bfloat16", help="autocast dtype on CUDA (weights stay float32, as in the training loop)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per method (median reported)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-tokens", type=int, default=2048, help="positions (1 x N) for the loss-alone memory measurement")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"losses measured alone, from {', '.join(LOSSES)} (fused and ft-naive are needed)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help=f"small sizes ({QUICK}), under 3 minutes on 2 CPU cores")
    p.add_argument("--json", default=None, help="write the ratios (and all numbers) as JSON here")
    p.add_argument("--out", default=None, help="markdown results file (default: none)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in (argv if argv is not None else sys.argv[1:]):
                setattr(args, key, value)
    for name in ("seq_len", "batch_size", "batches", "repeats", "top_k"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    if not {"fused", "ft-naive"} <= set(args.losses) or not set(args.losses) <= set(LOSSES):
        p.error(f"--losses must include fused and ft-naive, from {', '.join(LOSSES)}")
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
    rng = np.random.default_rng(seed)
    teacher = TransformersTeacher(model)
    vocab = model_vocab_size(model)
    batches = []
    for _ in range(n_batches):
        ids = rng.integers(0, vocab, size=(batch_size, seq_len), dtype=np.int64)
        scores = teacher.score(ids, np.full(batch_size, seq_len), top_k)
        pad = lambda a, value=0: np.concatenate([a, np.full_like(a[:, :1], value)], axis=1)  # noqa: E731
        topk_lp = scores.topk_logprobs.copy()
        part = {
            "input_ids": ids,
            "labels": pad(ids[:, 1:], IGNORE_INDEX),
            "topk_ids": pad(scores.topk_ids),
            "topk_logprobs": pad(topk_lp),
            "label_logprobs": pad(scores.label_logprobs),
        }
        batches.append({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in part.items()})
    model.train()
    return batches


def make_step(method: str, model, device, dtype, optimizer=None):
    """One training step function ``step(batch)`` for a method: forward, backward, AdamW step.

    ``optimizer``: an AdamW over the model's trainable parameters to share with other
    methods' steps (its cost per step is the same for all); a new one by default.
    """
    import torch

    from mft_pipeline.distill.online import dense_mft_loss
    from mft_pipeline.train.student_loss import student_loss

    device = torch.device(device)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=device.type == "cuda")
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    teacher = None
    if method == "online":
        # As the training loop's online mode: a frozen copy, bf16 on GPU where it runs under autocast anyway.
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if device.type == "cuda":
            teacher = teacher.to(dtype)

    def step(batch: dict) -> None:
        if method == "offline":
            with torch.autocast(**autocast):
                loss, n_tokens = student_loss(model, [batch], tau=TAU)
        elif method == "ft":
            with torch.autocast(**autocast):
                out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
            loss, n_tokens = out.loss, 1
        elif method == "online":
            with torch.autocast(**autocast):
                logits = model(input_ids=batch["input_ids"]).logits
            with torch.no_grad(), torch.autocast(**autocast):
                teacher_logits = teacher(input_ids=batch["input_ids"]).logits
            loss, n_tokens = dense_mft_loss(logits, teacher_logits, batch["labels"], tau=TAU)
        else:
            raise ValueError(f"unknown method {method!r}")
        (loss / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_methods(model, batches, device, dtype, *, repeats=5, methods=METHODS, say=None) -> dict:
    """Paired timing of the methods' training steps on one model and the same batches.

    The methods share the model and take turns (the order rotates each repeat); the weights
    drift a little between steps, which changes no step's cost.

    Returns {"tokens_per_s": {method: median}, "seconds": {method: [per repeat]},
    "paired_ratio_vs_ft": {method: median of per-repeat tokens/s ratios}, "fused": bool,
    "fallback_reason", "tokens_per_pass"}.
    """
    import torch

    from mft_pipeline.train.student_loss import head_or_reason

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    head = head_or_reason(model)
    # One AdamW for all: three copies of its state would only crowd the memory.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    steps = {m: make_step(m, model, device, dtype, optimizer) for m in methods}
    for m in methods:  # warm-up: kernels, allocator, AdamW state
        steps[m](batches[0])
    sync()
    seconds = {m: [] for m in methods}
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            sync()
            t0 = time.perf_counter()
            for batch in batches:
                steps[m](batch)
            sync()
            seconds[m].append(time.perf_counter() - t0)
        if say:
            say(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in methods))
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    result = {
        "tokens_per_s": {m: tokens / statistics.median(s) for m, s in seconds.items()},
        "seconds": seconds,
        "fused": not isinstance(head, str),
        "fallback_reason": head if isinstance(head, str) else None,
        "tokens_per_pass": tokens,
    }
    if "ft" in methods:
        result["paired_ratio_vs_ft"] = {
            m: statistics.median(f / s for f, s in zip(seconds["ft"], seconds[m])) for m in methods if m != "ft"
        }
    return result


def measure_model(spec, device, dtype, seq_len, batch_size, *, n_batches=2, repeats=5, top_k=20, seed=0, threads=None,
                  loss_tokens=None, losses=LOSSES, say=None) -> dict:
    """Everything the benchmark reports for one model: paired speed, each method's step peak, the loss alone.

    ``spec``: a name in ``SHAPES`` (random weights) or any ``load_model`` spec. ``dtype``: the
    autocast dtype on CUDA (weights stay float32). The peak memories are measured in fresh
    processes; a loaded (not random) model is handed to them as a saved folder. The loss
    alone is measured on ``loss_tokens`` positions (1 × loss_tokens; default batch × seq_len).
    """
    import torch

    from mft_pipeline.models import model_vocab_size

    say = say or (lambda *x: None)
    device = torch.device(device)
    t0 = time.perf_counter()
    model = build_model(spec, device, seed)
    vocab, hidden_size = model_vocab_size(model), model.get_output_embeddings().weight.shape[1]
    batches = make_batches(model, n_batches, batch_size, seq_len, top_k, seed)
    say(f"{spec}: timing {', '.join(METHODS)} ({repeats} paired repeats of {n_batches} x {batch_size} x {seq_len} tokens)")
    speed = time_methods(model, batches, device, dtype, repeats=repeats, say=say)
    with tempfile.TemporaryDirectory(prefix="mft-bench-stage-two-") as tmp:
        model_spec = spec
        if spec not in SHAPES:
            model_spec = str(Path(tmp) / "model")
            model.save_pretrained(model_spec)
        batch_file = str(Path(tmp) / "batch.pt")
        torch.save({k: v.cpu() for k, v in batches[0].items()}, batch_file)
        del model, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say(f"{spec}: peak memory of a step, one fresh process per method")
        peaks = {m: peak_memory(model_spec, batch_file, m, device, dtype, seed=seed, threads=threads) for m in METHODS}
    loss_shape = (loss_tokens, 1) if loss_tokens else (seq_len, batch_size)
    say(f"{spec}: loss + backward alone at V={vocab}, H={hidden_size}, {loss_shape[1]} x {loss_shape[0]} positions, one fresh process per loss")
    losses = {
        name: loss_peak_memory(name, vocab, hidden_size, device, dtype, *loss_shape, top_k=top_k, seed=seed, threads=threads)
        for name in losses
    }
    return {
        "vocab": vocab, "hidden_size": hidden_size, "speed": speed, "peak": peaks, "loss": losses,
        "offline_vs_ft_speed": speed["paired_ratio_vs_ft"]["offline"],
        "online_vs_ft_speed": speed["paired_ratio_vs_ft"]["online"],
        "offline_vs_ft_peak_memory": peaks["offline"]["peak"] / peaks["ft"]["peak"],
        "online_vs_ft_peak_memory": peaks["online"]["peak"] / peaks["ft"]["peak"],
        "loss_peak_memory_vs_ft_naive": losses["fused"]["growth"] / losses["ft-naive"]["growth"],
        "loss_positions": loss_shape[0] * loss_shape[1],
        "seconds": time.perf_counter() - t0,
    }


def _child(kind: str, **kw) -> dict:
    """Run one measurement in a fresh Python process and return its JSON answer."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Large blocks from mmap, so memory freed by earlier phases leaves the resident set.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("TQDM_DISABLE", "1")
    code = f"import json, benchmarks.stage_two as b; print(json.dumps(b._{kind}_in_child(**json.loads({json.dumps(json.dumps(kw))}))))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Peak:
    """Peak memory since ``reset``: the CUDA allocator's, or the process's resident set on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def reset(self) -> int:
        """Reset the peak; return the memory held now."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return int(self.torch.cuda.memory_allocated())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return int(self.torch.cuda.max_memory_allocated())
        return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory(spec, batch_file, method, device, dtype, *, seed=0, threads=None) -> dict:
    """Peak memory of one training step of ``method`` after a warm-up step, in a fresh process.

    ``spec``: a ``SHAPES`` name or a model folder; ``batch_file``: a ``torch.save``d batch dict.
    Returns {"peak", "before"} in bytes (``before``: held just before the measured step).
    """
    return _child("peak", spec=spec, batch_file=batch_file, method=method, device=str(device),
                  dtype=str(dtype).removeprefix("torch."), seed=seed, threads=threads)


def _peak_in_child(spec, batch_file, method, device, dtype, seed, threads) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    model = build_model(spec, device, seed)
    batch = {k: v.to(device) for k, v in torch.load(batch_file, weights_only=True).items()}
    step = make_step(method, model, device, getattr(torch, dtype))
    step(batch)  # warm-up: AdamW's state now exists, as in every step after the first
    peak = _Peak(device)
    before = peak.reset()
    step(batch)
    return {"peak": peak.peak(), "before": before}


def loss_peak_memory(loss, vocab, hidden_size, device, dtype, seq_len, batch_size, *, top_k=20, seed=0, threads=None,
                     chunk_size=None, repeats=0) -> dict:
    """Peak memory growth of one loss + backward from (B, T, H) hidden states and a (V, H) head, in a fresh process.

    ``loss``: "fused" (``fused_sparse_mft_loss``, ``chunk_size`` positions per chunk; None: its
    default), "sparse-logits" (full logits, then ``sparse_mft_loss``) or "ft-naive" (full logits,
    float32 cross-entropy, as Hugging Face's loss). Returns {"growth", "before", "peak"} in bytes
    and "seconds": the measured call's, or with ``repeats`` the median of that many more calls
    (the first call on a device pays its start-up).
    """
    return _child("loss", loss=loss, vocab=vocab, hidden_size=hidden_size, device=str(device),
                  dtype=str(dtype).removeprefix("torch."), seq_len=seq_len, batch_size=batch_size, top_k=top_k,
                  seed=seed, threads=threads, chunk_size=chunk_size, repeats=repeats)


def _loss_in_child(loss, vocab, hidden_size, device, dtype, seq_len, batch_size, top_k, seed, threads, chunk_size=None, repeats=0) -> dict:
    import torch
    import torch.nn.functional as F

    from mft_pipeline.distill import fused_sparse_mft_loss, sparse_mft_loss
    from mft_pipeline.labels import IGNORE_INDEX

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    cuda = device.type == "cuda"
    autocast = dict(device_type=device.type, dtype=getattr(torch, dtype), enabled=cuda)
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, H, V = batch_size, seq_len, hidden_size, vocab
    # As the model hands them over: hidden states in the autocast dtype on GPU, float32 master weights.
    hidden = torch.randn(B, T, H, device=device, generator=gen, dtype=autocast["dtype"] if cuda else torch.float32)
    hidden.requires_grad_(True)
    weight = (torch.randn(V, H, device=device, generator=gen) * H**-0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device=device, generator=gen)
    labels[:, -1] = IGNORE_INDEX
    topk_ids = torch.randint(0, V, (B, T, top_k), device=device, generator=gen)
    topk_logprobs = -(torch.rand(B, T, top_k, device=device, generator=gen).sort(-1).values * 6 + 1)
    label_logprobs = -(torch.rand(B, T, device=device, generator=gen) * 10 + 1)

    def loss_and_backward() -> float:
        t0 = time.perf_counter()
        with torch.autocast(**autocast):
            if loss == "fused":
                value, n = fused_sparse_mft_loss(hidden, weight, labels, topk_ids, topk_logprobs, label_logprobs, TAU, chunk_size=chunk_size)
            else:
                logits = hidden @ weight.T
                if loss == "ft-naive":
                    value = F.cross_entropy(logits.float().view(-1, V), labels.view(-1), reduction="sum")
                elif loss == "sparse-logits":
                    value, n = sparse_mft_loss(logits, labels, topk_ids, topk_logprobs, label_logprobs, TAU)
                else:
                    raise ValueError(f"unknown loss {loss!r}")
                del logits
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    peak = _Peak(device)
    before = peak.reset()
    seconds = loss_and_backward()
    result = {"peak": peak.peak(), "before": before, "growth": peak.peak() - before}
    if repeats:
        times = []
        for _ in range(repeats):
            hidden.grad = weight.grad = None
            times.append(loss_and_backward())
        seconds = statistics.median(times)
    return {**result, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# The run


def run(args, say) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    per_model = {}
    for spec in args.models:
        r = per_model[spec] = measure_model(
            spec, device, dtype, args.seq_len, args.batch_size, n_batches=args.batches, repeats=args.repeats,
            top_k=args.top_k, seed=args.seed, threads=args.threads, loss_tokens=args.loss_tokens, losses=args.losses, say=say,
        )
        say(f"{spec}: offline/FT speed {r['offline_vs_ft_speed']:.3f}, peak {r['offline_vs_ft_peak_memory']:.3f}, "
            f"loss peak vs FT-naive {r['loss_peak_memory_vs_ft_naive']:.3f} ({r['seconds']:.0f} s)")
    at_128k = [r["loss_peak_memory_vs_ft_naive"] for r in per_model.values() if r["vocab"] >= 128000]
    return {
        # Worst case over the models: the figure a target is checked against.
        "offline_vs_ft_speed": min(r["offline_vs_ft_speed"] for r in per_model.values()),
        "offline_vs_ft_peak_memory": max(r["offline_vs_ft_peak_memory"] for r in per_model.values()),
        "loss_peak_memory_vs_ft_naive_128k": max(at_128k) if at_128k else None,
        "per_model": per_model,
    }


TARGETS = (
    ("offline_vs_ft_speed", ">=", 0.97, "offline MFT tokens/s vs FT"),
    ("offline_vs_ft_peak_memory", "<=", 1.0, "offline MFT peak memory vs FT"),
    ("loss_peak_memory_vs_ft_naive_128k", "<=", 0.15, "loss + backward peak vs FT's naive float32 cross-entropy at V = 128k"),
)


def render(r: dict) -> str:
    m, a = r["machine"], r["args"]
    lines = [
        f"# Stage two benchmark ({m['device']})",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Date: {r['date']}. Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; {m['platform']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. "
        + f"Load average at start / end: {r['loadavg_start']} / {r['loadavg_end']}.",
        "",
        f"Sizes: {a['batches']} batches of {a['batch_size']} × {a['seq_len']} random tokens per timed pass, "
        f"top-k {a['top_k']}, τ = {TAU}, seed {a['seed']}, {a['repeats']} paired repeats; "
        + ("bf16 autocast, float32 weights." if m["device"].startswith("cuda") else "float32."),
        "",
        "## Targets",
        "",
        "| target | measured (worst model) | goal | met |",
        "|---|---|---|---|",
    ]
    for key, op, goal, what in TARGETS:
        value = r["ratios"][key]
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        lines.append(f"| {what} | {'n/a' if value is None else f'{value:.3f}'} | {op} {goal} | {'yes' if met else 'NO'} |")
    for spec, p in r["ratios"]["per_model"].items():
        s = p["speed"]
        lines += [
            "",
            f"## {spec} (V = {p['vocab']:,}, H = {p['hidden_size']})",
            "",
            f"Offline path: {'fused hidden-state loss' if s['fused'] else 'logits path: ' + str(s['fallback_reason'])}. "
            f"Measured in {p['seconds']:.0f} s.",
            "",
            "| method | tokens/s (median) | per-repeat seconds | paired ratio vs FT | peak memory of a step | vs FT |",
            "|---|---|---|---|---|---|",
        ]
        for meth in METHODS:
            ratio = 1.0 if meth == "ft" else s["paired_ratio_vs_ft"][meth]
            peak = p["peak"][meth]["peak"]
            lines.append(
                f"| {meth} | {s['tokens_per_s'][meth]:,.3g} | {', '.join(f'{x:.2f}' for x in s['seconds'][meth])} | "
                f"{ratio:.3f} | {fmt_mib(peak)} | {peak / p['peak']['ft']['peak']:.3f} |"
            )
        lines += [
            "",
            f"Loss + backward alone, {p['loss_positions']:,} positions, top-k {a['top_k']}: peak growth over its inputs "
            "(hidden states, head weight, targets), the (V, H) weight gradient included:",
            "",
            "| loss | peak growth | vs FT-naive |",
            "|---|---|---|",
        ]
        for name, lp in p["loss"].items():
            lines.append(f"| {name} | {fmt_mib(lp['growth'])} | {lp['growth'] / p['loss']['ft-naive']['growth']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    say = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    loadavg_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    ratios = run(args, say)
    result = {
        "command": "python -m benchmarks.stage_two " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(torch.device(args.device), torch),
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "loadavg_start": loadavg_start,
        "loadavg_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "wall_seconds": time.perf_counter() - t0,
        "ratios": ratios,
    }
    text = render(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({**{k: ratios[k] for k, *_ in TARGETS}, "run": result}, indent=2) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    say(f"done in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()

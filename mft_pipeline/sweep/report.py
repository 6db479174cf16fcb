"""`mft report`: S, DG and DG/S of finished runs, as the paper's Table 2 and a trade-off plot.

Reads only the run folders (run-config.yaml, metrics.jsonl, summary.json), so it works on any
set of runs, from a sweep or not. Each run is represented by its best checkpoint's evaluation
row in metrics.jsonl: the lowest specialized-domain perplexity within the degeneralization
budget, the same row the training loop kept.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mft_pipeline.errors import ConfigError
from mft_pipeline.run_folder import RUN_CONFIG, SUMMARY, RunFolder

PEFT_NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}
OBJECTIVE_NAMES = {"ft": "FT", "mft": "MFT", "distill+ft": "distill+ft", "single-correction": "single-correction", "dft": "DFT", "talr": "TALR"}
# distill.correction.TAU_VARIANTS, repeated because this reader must not import torch (a test keeps them equal).
TAU_VARIANTS = ("mft", "single-correction")
GENERAL_DATA_NOTE = "uses general-domain data"
GENERAL_DATA_HEADING = "**Below: methods that use general-domain data.**"
CSV_COLUMNS = (
    "method", "domain", "S_pct", "DG_pct", "DG_over_S", "uses_general_data", "family", "variant", "tau", "peft", "peft_rank",
    "replay_fraction", "online", "step", "ppl_spec_before", "ppl_spec", "ppl_gen_before", "ppl_gen", "run",
)


@dataclass
class RunResult:
    run: Path
    config: dict
    before: dict
    best: dict | None
    method: str = ""
    family: str = ""
    domain: str = ""
    uses_general_data: bool = False
    sort_key: tuple = field(default_factory=tuple)

    def value(self, key: str) -> float | None:
        return None if self.best is None or key not in self.best else self.best[key]


def describe(config: dict) -> tuple[str, str, tuple]:
    """(method label, family, sort key) of a run, in the paper's words: "LoRA r8 + MFT τ=0.25".

    The family is the label without its swept numbers (τ, ν): one trade-off curve each.
    """
    variant, peft = config["variant"], config.get("peft", "none")
    replay = bool(config.get("replay"))
    l2, ewc = config.get("l2_init"), config.get("ewc_lambda") if config.get("ewc") else None
    pieces: list[tuple[str, str]] = []  # (family part, label part)
    if peft != "none":
        name = PEFT_NAMES[peft] + (f" r{config.get('peft_rank')}" if peft in ("lora", "dora") else "")
        pieces.append((name, name))
    if variant != "ft" or not (peft != "none" or replay or l2 is not None or ewc is not None):
        # Like the paper, "LoRA r8", "Replay", "L2-init" and "EWC" alone mean the plain FT objective.
        name = OBJECTIVE_NAMES[variant]
        pieces.append((name, f"{name} τ={config['tau']:g}" if variant in TAU_VARIANTS else name))
    if replay:
        pieces.append(("Replay", f"Replay ν={config['replay_fraction']:g}"))
    if l2 is not None:
        pieces.append(("L2-init", f"L2-init λ={l2:g}"))
    if ewc is not None:
        pieces.append(("EWC", f"EWC λ={ewc:g}"))
    family = " + ".join(p[0] for p in pieces)
    label = " + ".join(p[1] for p in pieces)
    if config.get("online"):
        family, label = family + " (online)", label + " (online)"
    order = (
        replay,
        bool(config.get("online")),
        ("none", "lora", "dora", "ia3").index(peft),
        tuple(OBJECTIVE_NAMES).index(variant),
        l2 or 0.0,
        ewc or 0.0,
        config.get("peft_rank") or 0,
        config["tau"] if variant in TAU_VARIANTS else 0.0,
        config.get("replay_fraction") or 0.0,
    )
    return label, family, order


def find_runs(paths) -> list[Path]:
    """Run folders among ``paths``; a folder that is not a run (a sweep folder) is searched one level down."""
    runs = []
    for p in map(Path, paths):
        if RunFolder(p).is_run():
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(c for c in p.iterdir() if RunFolder(c).is_run()))
    return list(dict.fromkeys(runs))


def load_run(run: Path) -> RunResult | None:
    """One finished run's results; None (with a warning) for an unfinished one."""
    folder = RunFolder(run)
    summary = folder.summary()
    if summary is None:
        print(f"warning: {run}: unfinished (no {SUMMARY}); left out of the report", file=sys.stderr)
        return None
    config = summary.get("config") or folder.read_settings()
    rows = folder.metrics()
    before = next((r for r in rows if r.get("kind") == "before"), summary.get("before") or {})
    result = RunResult(run=run, config=config, before=before, best=folder.best_row())
    result.method, result.family, result.sort_key = describe(config)
    result.domain = Path(config["cache"]).name
    result.uses_general_data = bool(summary.get("uses_general_data", config.get("replay") or config.get("ewc")))
    return result


def write_report(paths, out: Path) -> list[Path]:
    """Write report.md, report.csv and tradeoff.png into ``out``; returns their paths."""
    runs = find_runs(paths)
    if not runs:
        raise ConfigError(f"no run folders (with {RUN_CONFIG}) among the given paths")
    results = [r for r in map(load_run, runs) if r is not None]
    unfinished = [run for run in runs if not RunFolder(run).is_finished()]
    _disambiguate(results)
    results.sort(key=lambda r: (r.sort_key, r.domain, r.method))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.csv", out / "tradeoff.png"]
    # Runs are named relative to the report, so a committed report holds no path of the machine it was made on.
    for r in results:
        r.run = relative_to(r.run, out)
    paths[0].write_text(markdown(results, [relative_to(u, out) for u in unfinished]))
    write_csv(results, paths[1])
    plot(results, paths[2])
    return paths


def relative_to(path: Path, folder: Path) -> Path:
    """``path`` as seen from ``folder`` (both resolved first, so symlinks cannot make ``..`` point elsewhere)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve()))


def _disambiguate(results: list[RunResult]) -> None:
    """Two runs with the same label in the same domain (other lr, seed, ...) get their folder name added."""
    seen: dict[tuple, int] = {}
    for r in results:
        seen[(r.method, r.domain)] = seen.get((r.method, r.domain), 0) + 1
    for r in results:
        if seen[(r.method, r.domain)] > 1:
            r.method = f"{r.method} [{r.run.name}]"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def ratio(x: float | None) -> str:
    return "–" if x is None else ("n/a" if math.isnan(x) else f"{x:.3f}")


def markdown(results: list[RunResult], unfinished: list[Path] = ()) -> str:
    """Table 2 of the paper: one row per method, S % / DG % / DG/S per domain; replay fenced off below."""
    domains = list(dict.fromkeys(r.domain for r in results))
    header = "| method | " + " | ".join(f"{d}: S % | DG % | DG/S" for d in domains) + " |"
    rule = "|---|" + "---:|---:|---:|" * len(domains)

    def table(rows: list[RunResult]) -> list[str]:
        cells: dict[str, dict[str, RunResult]] = {}
        for r in rows:
            cells.setdefault(r.method, {})[r.domain] = r
        lines = [header, rule]
        for method, by_domain in cells.items():
            values = []
            for d in domains:
                r = by_domain.get(d)
                values += ["", "", ""] if r is None else [pct(r.value("S")), pct(r.value("DG")), ratio(r.value("DG_over_S"))]
            lines.append(f"| {method} | " + " | ".join(values) + " |")
        return lines

    lines = [
        "# MFT comparison",
        "",
        "S = specialization (higher is better), DG = degeneralization (lower is better), both in % of the",
        "unfinetuned model's perplexity on the specialized validation split and the general-domain",
        "evaluation corpus; DG/S lower is better. Each run is shown at its best checkpoint (lowest",
        "specialized validation perplexity within the degeneralization budget).",
        "",
    ]
    own = [r for r in results if not r.uses_general_data]
    general = [r for r in results if r.uses_general_data]
    if own:
        lines += table(own) + [""]
    if general:
        lines += [
            f"{GENERAL_DATA_HEADING} Replay trains on general-domain",
            "sequences and EWC weighs its penalty by a Fisher computed on general-domain text, so these runs",
            "are not comparable on equal terms with the methods above, which see only the specialized corpus.",
            "",
        ] + table(general) + [""]
    lines += ["## Runs", ""]
    for r in results:
        step = "no checkpoint within budget" if r.best is None else f"step {r.best['step']}"
        tag = f" ({GENERAL_DATA_NOTE})" if r.uses_general_data else ""
        lines.append(f"- {r.method} [{r.domain}]{tag}: `{r.run}`, {step}")
    if unfinished:
        lines += ["", "Left out (unfinished): " + ", ".join(f"`{u}`" for u in unfinished)]
    return "\n".join(lines) + "\n"


def write_csv(results: list[RunResult], path: Path) -> None:
    """One row per run, full precision; S and DG in % as in the markdown table."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            c = r.config
            scale = lambda x: "" if x is None else 100 * x  # noqa: E731
            none = lambda x: "" if x is None else x  # noqa: E731
            writer.writerow([
                r.method, r.domain, scale(r.value("S")), scale(r.value("DG")), none(r.value("DG_over_S")), r.uses_general_data,
                r.family, c["variant"], c["tau"], c.get("peft", "none"), c.get("peft_rank"), none(c.get("replay_fraction")),
                bool(c.get("online")), none(r.value("step")), none(r.before.get("ppl_spec")), none(r.value("ppl_spec")),
                none(r.before.get("ppl_gen")), none(r.value("ppl_gen")), str(r.run),
            ])


def plot(results: list[RunResult], path: Path) -> None:
    """DG against S, one line per method family (over τ or ν), FT as a star; replay dashed (Agg, PNG)."""
    fig, ax = new_axes(figsize=(10, 5.5))
    import matplotlib

    colors = iter(matplotlib.colormaps["tab20"].colors * 4)
    points = [r for r in results if r.value("S") is not None and r.value("DG") is not None]
    families: dict[tuple, list[RunResult]] = {}
    for r in points:
        families.setdefault((r.family, r.domain), []).append(r)
    many_domains = len({r.domain for r in points}) > 1
    for (family, domain), rs in families.items():
        rs.sort(key=lambda r: r.sort_key)
        xs, ys = [100 * r.value("S") for r in rs], [100 * r.value("DG") for r in rs]
        label = family + (f" [{domain}]" if many_domains else "") + (f" ({GENERAL_DATA_NOTE})" if rs[0].uses_general_data else "")
        if family == "FT":
            ax.plot(xs, ys, linestyle="none", marker="*", markersize=16, color="black", label=label, zorder=3)
            continue
        ax.plot(xs, ys, linestyle="--" if rs[0].uses_general_data else "-", marker="o", color=next(colors), label=label)
        if len(rs) > 1:
            for r, x, y in zip(rs, xs, ys):
                swept = " ".join(word for word in r.method.split() if "=" in word)
                ax.annotate(swept, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not points:
        ax.text(0.5, 0.5, "no run has both S and DG\n(train with --general-eval and a validation split)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("specialization S (%)  → better")
    ax.set_ylabel("degeneralization DG (%)  ↓ better")
    ax.set_title("Specialization vs. forgetting")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, format="png")


def new_axes(figsize: tuple[float, float]):
    """``(figure, axes)``: a bare Figure on the Agg canvas, so no pyplot state, no display needed, the caller's backend untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install 'mft-pipeline[plot]'") from None
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()

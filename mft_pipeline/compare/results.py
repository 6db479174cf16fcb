"""What `mft compare` writes: runs.csv, the results file (tables, intervals, verdicts, what its size can tell) and plots.

Everything in the results file is generated. A hand-written reading of it lives beside it in
NAME.reading.md, which the results file links to when it exists and never rewrites.
"""

from __future__ import annotations

import csv
import math
import platform
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from mft_pipeline.compare.protocol import FAMILIES, FRONTIER_TAUS, LINES, METHODS, Profile, estimate_minutes, frontier_eval_every
from mft_pipeline.compare.stats import (
    FrontierGap, Interval, frontier_gap, mean_interval, paired_difference, paired_verdict, t_critical, upper_envelope,
)  # fmt: skip

METRICS = ("S", "DG", "DG_over_S")


@dataclass
class Row:
    """One finished run, as runs.csv has it (its columns in this order). S, DG in fractions (the tables print %)."""

    seed: int
    domain: str
    method: str
    tau: float | None
    k: int | str  # cached top-k, or "dense" for the online reference
    tail_samples: int
    S: float | None
    DG: float | None
    DG_over_S: float | None
    general_eval_tokens: int
    spec_eval_tokens: int
    lr: float | None = None
    lam: float | None = None  # the penalty's strength (L2-init, EWC), the "lambda" column
    alpha: float | None = None  # WiSE-FT's weight of the tuned model
    rank: int | None = None  # LoRA
    step: int | None = None  # the evaluation's optimizer step (the best checkpoint's for the per-domain tables)
    tasks: dict[str, float] = field(default_factory=dict)  # task name -> accuracy, a "<task>_acc" column each


def write_csv(rows: list[Row], path: Path) -> None:
    """One row each; the columns are Row's fields in order, then one ``<task>_acc`` per task any row has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Row) if f.name != "tasks"]
    tasks = sorted({t for r in rows for t in r.tasks})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([CSV_NAMES.get(n, n) for n in names] + [f"{t}_acc" for t in tasks])
        for r in rows:
            writer.writerow([cell(name, getattr(r, name)) for name in names] + [cell("acc", r.tasks.get(t)) for t in tasks])


CSV_NAMES = {"lam": "lambda"}


def cell(name: str, value) -> str:
    if name in METRICS or name == "acc":
        return f"{value:.6f}" if defined(value) else ""
    if isinstance(value, float) and name in ("lr", "lam", "alpha"):
        return f"{value:g}"
    return "" if value is None else str(value)


def defined(value: float | None) -> bool:
    """DG/S is NaN where S <= 0 (no specialization to divide by); such runs drop out of its mean."""
    return value is not None and math.isfinite(value)


def by_method(rows: list[Row], domain: str) -> dict[str, dict[int, Row]]:
    out: dict[str, dict[int, Row]] = {}
    for r in rows:
        if r.domain == domain:
            out.setdefault(r.method, {})[r.seed] = r
    return out


def interval_of(runs: dict[int, Row], name: str, scale: float = 1.0) -> Interval | None:
    values = [scale * getattr(r, name) for r in runs.values() if defined(getattr(r, name))]
    return mean_interval(values) if values else None


def paired_mft_ft(rows: list[Row], domain: str) -> Interval | None:
    """Per seed, MFT's DG/S minus FT's, over the seeds where both are defined; None without such a pair."""
    methods = by_method(rows, domain)
    if "FT" not in methods or "MFT" not in methods:
        return None
    ratios = {m: {s: r.DG_over_S for s, r in methods[m].items() if defined(r.DG_over_S)} for m in ("MFT", "FT")}
    if not set(ratios["MFT"]) & set(ratios["FT"]):
        return None
    return paired_difference(ratios["MFT"], ratios["FT"])


# ----------------------------------------------------------------------------- the frontier


def frontier_points(frontier: dict[float, dict[int, Row]]) -> list[tuple[Interval, Interval]]:
    """(S %, DG %) intervals over seeds at each tau, in increasing tau."""
    return [(interval_of(runs, "S", 100), interval_of(runs, "DG", 100)) for _, runs in sorted(frontier.items())]


def frontier_comparison(frontier: dict[str, dict[float, dict[int, Row]]], line: str) -> tuple[FrontierGap, Interval | None]:
    """The dense-minus-``line`` S gap at equal DG on the mean frontiers, and the interval of each seed's mean gap."""
    means = {t: [(s.mean, d.mean) for s, d in frontier_points(frontier[t])] for t in (line, "online")}
    gap = frontier_gap(means[line], means["online"])
    pair = {t: frontier[t] for t in (line, "online")}
    seeds = sorted(set.intersection(*(set(runs) for f in pair.values() for runs in f.values())))
    per_seed = []
    for seed in seeds:
        curve = {t: [(100 * f[tau][seed].S, 100 * f[tau][seed].DG) for tau in sorted(f)] for t, f in pair.items()}
        g = frontier_gap(curve[line], curve["online"])
        if g.rows:
            per_seed.append(g.mean_gap)
    return gap, (mean_interval(per_seed) if per_seed else None)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(frontier: dict[str, dict[float, dict[int, Row]]], path: Path, domain: str) -> None:
    plt = _pyplot()

    def err(iv: Interval) -> float:
        return 0.0 if iv.n < 2 else iv.half_width

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {"cached": "tab:blue", "sampled": "tab:green", "online": "tab:orange"}
    for line, (label, *_) in LINES.items():
        if line not in frontier:
            continue
        color = colors[line]
        points = frontier_points(frontier[line])
        ax.errorbar(
            [s.mean for s, _ in points], [d.mean for _, d in points], xerr=[err(s) for s, _ in points],
            yerr=[err(d) for _, d in points], marker="o", capsize=3, label=label, color=color,
        )  # fmt: skip
        for tau, (s, d) in zip(sorted(frontier[line]), points):
            ax.annotate(f"τ={tau:g}", (s.mean, d.mean), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
    n = max(len(r) for f in frontier.values() for r in f.values())
    ax.set(xlabel="S, specialization (%)", ylabel="DG, degeneralization (%)", title=f"MFT frontier, {domain}: mean and 95% t interval of {n} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_low_data(low: dict[str, list[dict]], path: Path) -> None:
    plt = _pyplot()
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


# ----------------------------------------------------------------------------- the results file


@dataclass
class Report:
    """Everything the results file says, gathered while the comparison runs."""

    name: str  # the results file is NAME.md; runs.csv and the plots are in NAME/ beside it
    command: str
    model: str  # the model spec as given
    model_folder: str  # where it was loaded from
    profile: Profile
    domains: list[str]
    general: str  # how the general-domain corpus is named
    skip: set[str]
    counts: dict[str, int]  # planned work, as planned_runs counts it
    rows: list[Row] = field(default_factory=list)
    reference: dict | None = None
    frontier_domain: str = ""
    frontier: dict[str, dict[float, dict[int, Row]]] = field(default_factory=dict)  # line -> tau -> seed -> Row
    cache_bytes: dict[str, float] = field(default_factory=dict)  # line -> bytes per training token
    fidelity: dict[str, dict[int, Row]] = field(default_factory=dict)
    low: dict[str, list[dict]] = field(default_factory=dict)  # method -> evaluation rows
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    task_reference: dict[str, dict] = field(default_factory=dict)  # --tasks: the reference's scores, task -> {acc, stderr, n, ...}
    task_limit: int | None = None
    task_seed: int = 0
    task_continuations: int = 0  # scored per checkpoint


def fmt(iv: Interval | None, digits: int = 2) -> str:
    """mean [low, high]; the mean alone for one seed."""
    if iv is None:
        return "—"
    if iv.n < 2:
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def method_cells(runs: dict[int, Row]) -> str:
    cells = [fmt(interval_of(runs, "S", 100)), fmt(interval_of(runs, "DG", 100)), fmt(interval_of(runs, "DG_over_S"), 3)]
    return f"| {len(runs)} | " + " | ".join(cells) + " |"


def write_results(path: Path, r: Report) -> None:
    """NAME.md; its links point into NAME/, the figures folder beside it."""
    sections = (header_lines, sizing_lines, table_lines, paired_lines, task_lines, limits_lines, frontier_lines, fidelity_lines, low_data_lines)
    lines = [line for section in sections for line in section(r, path)]
    path.write_text("\n".join(lines) + "\n")


def header_lines(r: Report, path: Path) -> list[str]:
    p = r.profile
    spec_tokens = {row.domain: row.spec_eval_tokens for row in r.rows}
    lines = provenance_lines(r, path)
    lines += [
        "Protocol, the same for every method: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p.protocol.items())
        + f". Each run trains on {p.train_tokens:,} tokens ({p.steps} steps × {p.batch_size} × {p.seq_len}), drawn from the "
        "domain's first `train sequences` packed sequences in a seeded order. Validation and the general evaluation are "
        "held-out documents"
        + (f" (predicted tokens evaluated: general {r.rows[0].general_eval_tokens:,}; specialized "
           + ", ".join(f"{d} {n:,}" for d, n in spec_tokens.items()) + ")" if r.rows else "")
        + ". S and DG are in %, of the checkpoint with the lowest specialized validation perplexity. Replay mixes general "
        "training sequences into each batch and so **uses general-domain data**; the other methods do not.",
        "",
        "Intervals: mean over seeds and its 95% Student t interval, mean ± t(0.975, n−1) · sd / √n with the sample sd "
        "(the t quantile from scipy.stats). A seed sets the data order and the initialization of new parameters (LoRA); "
        "the caches and the reference checkpoint are the same for every seed. DG/S is averaged per run, not taken of "
        "the means. One seed shows the value alone.",
        "",
    ]
    lines += warning_lines(r)
    if r.reference:
        ref = r.reference
        tuned = ref["model"] != r.model_folder
        lines += [
            f"Reference checkpoint (the paper's section 3.1): FT on {r.general} training sequences for {ref['steps']} "
            f"steps, keeping the checkpoint with the lowest general validation perplexity: {ref['ppl_before']:.3f} → "
            f"{ref['ppl_after']:.3f}"
            + (f" (step {ref['best_step']}). " if tuned else " (no checkpoint beat the untuned model, which is used). ")
            + "Every method starts from it, its caches are built from it, and S and DG are measured against it.",
            "",
        ]
    return lines


def warning_lines(r: Report) -> list[str]:
    return [f"Warning: {note}.  " for note in r.notes] + ([""] if r.notes else [])


def provenance_lines(r: Report, path: Path) -> list[str]:
    """The title, the command, the machine and the model, and a link to the hand-written reading when there is one."""
    import torch
    import transformers

    reading = path.with_suffix(".reading.md")
    lines = [
        f"# mft compare: {r.name}",
        "",
        f"Command: `{r.command}`  ",
        f"Ran {datetime.now(timezone.utc):%Y-%m-%d} on {platform.machine()} with {torch.get_num_threads()} threads"
        f"{' and ' + torch.cuda.get_device_name() if r.profile.device == 'cuda' else ''}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {r.seconds / 60:.1f} minutes in all (finished runs reused).  ",
        f"Model: `{r.model}` ({describe_model(r.model_folder)}). General domain: {r.general}. Domains: {', '.join(r.domains)}.",
        "",
    ]
    if reading.exists():
        lines += [f"A reading of these numbers, written by hand: [{reading.name}]({reading.name}).", ""]
    return lines


def describe_model(folder: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return f"{config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}, vocabulary {config.vocab_size}"


def sizing_lines(r: Report, path: Path | None = None) -> list[str]:
    """The arithmetic the profile was sized by, next to the time the run really took."""
    p, counts, tp = r.profile, r.counts, r.profile.throughput
    lines = ["## Sizing", ""]
    if tp is None:
        work = ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in counts.items())
        return lines + [f"Planned work: {work}. This profile has no measured throughput to size it by.", ""]
    eval_tokens = (p.general_sequences + p.val_sequences) * p.seq_len
    evals = 1 + math.ceil(p.steps / p.eval_every)
    minutes = estimate_minutes(p, counts, tp, r.task_continuations)
    if "tasks" in counts:
        lines += [
            f"Tasks: {r.task_continuations:,} scored continuations per checkpoint (one per answer choice) at {tp.tasks:g} per "
            f"second = {r.task_continuations / tp.tasks / 60:.1f} min, for the reference and each run's best checkpoint.",
            "",
        ]
    return lines + [
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
        f"| total | | {sum(minutes.values()):.0f} (this run: {r.seconds / 60:.0f}, finished runs reused) |",
        "",
    ]


def table_lines(r: Report, path: Path) -> list[str]:
    lines = ["## S / DG / DG/S per domain", ""]
    for domain in r.domains:
        lines += [f"### {domain}", "", "| method | seeds | S % | DG % | DG/S |", "|---|---|---|---|---|"]
        for method, runs in by_method(r.rows, domain).items():
            spec = METHODS.get(method)
            label = f"{method} (uses general data)" if spec and spec.uses_general_data else method
            lines.append(f"| {label} " + method_cells(runs))
        lines.append("")
    return lines


def paired_lines(r: Report, path: Path) -> list[str]:
    lines = [
        "## MFT against FT, paired by seed",
        "",
        "Per seed, MFT's DG/S minus FT's (the same data order and start); mean and 95% t interval of the differences.",
        "",
        "| domain | pairs | MFT − FT, DG/S | verdict |",
        "|---|---|---|---|",
    ]
    for domain in r.domains:
        methods = by_method(r.rows, domain)
        if "FT" not in methods or "MFT" not in methods:
            continue
        diff = paired_mft_ft(r.rows, domain)
        if diff is None:
            lines.append(f"| {domain} | 0 | — | DG/S is undefined (S <= 0) in every pair. |")
        else:
            lines.append(f"| {domain} | {diff.n} | {fmt(diff, 3)} | {paired_verdict(diff, 'MFT', 'FT')} |")
    return lines + ["", f"Every run, one row each: [runs.csv]({r.name}/runs.csv).", ""]


def task_lines(r: Report, path: Path) -> list[str]:
    """--tasks: the reference's accuracy and, per domain and method, each task's change from it over seeds."""
    if not r.task_reference:
        return []
    names = list(r.task_reference)
    questions = f"a fixed subsample of {r.task_limit} questions per task (seed {r.task_seed})" if r.task_limit else "every question"
    lines = [
        "## Forgetting on standard tasks",
        "",
        f"Zero-shot accuracy (`acc`, lm-evaluation-harness; docs/tasks.md) of the reference checkpoint and of each run's best "
        f"checkpoint, all on {questions}. Change: a run's accuracy minus the reference's, in points of %; mean over seeds "
        "and its 95% t interval (one seed: the value alone, no interval). The interval is over seeds only: every checkpoint "
        "answers the same questions, so the questions' own sampling error is not in it; the reference's standard error "
        "below gives its size.",
        "",
        "| task | reference acc % | standard error (points) | questions |",
        "|---|---|---|---|",
        *(f"| {n} | {100 * s['acc']:.1f} | {100 * s['stderr']:.1f} | {s['n']} |" for n, s in r.task_reference.items()),
        "",
    ]
    seeds = 0
    for domain in r.domains:
        methods = {m: runs for m, runs in by_method(r.rows, domain).items() if any(row.tasks for row in runs.values())}
        if not methods:
            continue
        lines += [f"### {domain}", "", "| method | seeds | " + " | ".join(f"{n} change" for n in names) + " |", "|---|---|" + "---|" * len(names)]
        for method, runs in methods.items():
            deltas = [task_change(runs, n, r.task_reference[n]["acc"]) for n in names]
            n = max((iv.n for iv in deltas if iv), default=0)
            seeds = max(seeds, n)
            lines.append(f"| {method} | {n} | " + " | ".join(fmt(iv, 1) for iv in deltas) + " |")
        lines.append("")
    if seeds < 2:
        lines += ["One seed per method: no intervals. Run with --seeds 3 or more.", ""]
    return lines


def task_change(runs: dict[int, Row], task: str, reference: float) -> Interval | None:
    """Mean and t interval over seeds of the run's accuracy on ``task`` minus the reference's, in points of %."""
    values = [100 * (row.tasks[task] - reference) for row in runs.values() if row.tasks.get(task) is not None]
    return mean_interval(values) if values else None


def limits_lines(r: Report, path: Path) -> list[str]:
    """What a comparison of this size can and cannot tell, from its own numbers."""
    p = r.profile
    lines = ["## What this size can and cannot tell", ""]
    if "frontier" in r.skip:
        lines.append(
            f"- **One operating point, not a frontier.** Every method trains {p.steps} steps of {p.batch_size} × {p.seq_len} "
            f"tokens at one learning rate ({p.lr:g}), MFT at τ = 0.25. A smaller learning rate or an earlier stop also "
            "makes FT forget less, so this says which method forgets less per unit of specialization here, not at every "
            "learning rate or training length."
        )
    else:
        lines.append(
            f"- **One learning rate.** The frontier below varies τ for MFT; every method trains {p.steps} steps at one "
            f"learning rate ({p.lr:g}). A smaller learning rate or an earlier stop also makes FT forget less."
        )
    diffs = {d: paired_mft_ft(r.rows, d) for d in r.domains}
    widths = {d: iv.half_width for d, iv in diffs.items() if iv is not None and iv.n >= 2}
    n = max((iv.n for iv in diffs.values() if iv is not None), default=0)
    if widths:
        lines.append(
            f"- **{n} seeds.** A 95% interval is the mean ± {t_critical(n):.2f} · sd / √{n} (with 2 seeds the factor would "
            f"be {t_critical(2):.1f}). The paired MFT − FT intervals of DG/S reach ± "
            + ", ".join(f"{w:.3f} ({d})" for d, w in widths.items())
            + ": a true difference smaller than about that is not told apart from none."
        )
    elif n:
        lines.append(f"- **{n} paired seed(s): no interval, so no verdict.** Run with --seeds 3 or more.")
    lines.append(
        "- **What the intervals cover.** A seed changes the data order (and the initialization of new parameters) only. "
        "The evaluation texts, the caches and the reference checkpoint are the same for every seed, so the intervals "
        "say nothing about another sample of text or another reference."
    )
    if r.rows:
        spec = {row.domain: row.spec_eval_tokens for row in r.rows}
        lines.append(
            f"- **Evaluation size.** S is measured on held-out specialized text ({', '.join(f'{d} {n:,}' for d, n in spec.items())} "
            f"predicted tokens) and DG on {r.rows[0].general_eval_tokens:,} predicted tokens of held-out general text, the "
            "same texts for every run."
        )
    lines += [f"- **One model** (`{r.model}`); another model may forget differently.", ""]
    return lines


def frontier_lines(r: Report, path: Path) -> list[str]:
    """The frontier section: a table of each line's points, the plot, and each sparse line's S gap to the dense one."""
    frontier = r.frontier
    if not frontier:
        return []
    present = [t for t in LINES if t in frontier]
    points = {t: frontier_points(frontier[t]) for t in present}
    label = {t: LINES[t][0] for t in present}
    lines = [
        f"## Sparse against dense: the MFT frontier ({r.frontier_domain}, tau = {', '.join(f'{t:g}' for t in FRONTIER_TAUS)})",
        "",
        "Bytes per training token: " + "; ".join(f"{LINES[t][0]} {b:.1f}" for t, b in r.cache_bytes.items()) + ".",
        "",
        "| tau | " + " | ".join(f"{label[t]} S % | DG %" for t in present) + " |",
        "|---|" + "---|---|" * len(present),
    ]
    for i, tau in enumerate(sorted(frontier["online"])):
        lines.append(f"| {tau:g} | " + " | ".join(f"{fmt(points[t][i][0])} | {fmt(points[t][i][1])}" for t in present) + " |")
    lines += ["", f"![frontier]({r.name}/frontier.png)", ""]
    for line in (t for t in present if t != "online"):
        lines += gap_lines(label[line], *frontier_comparison(frontier, line))
    return lines


def gap_lines(name: str, gap: FrontierGap, per_seed: Interval | None) -> list[str]:
    if not gap.rows:
        return [f"The {name} and online dense frontiers cover no common DG range, so S cannot be compared at equal DG.", ""]
    return [
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


def fidelity_lines(r: Report, path: Path) -> list[str]:
    if not r.fidelity:
        return []
    lines = [f"## Sparse-cache fidelity ({r.frontier_domain}, MFT tau=0.25)", "", "| targets | seeds | S % | DG % | DG/S |", "|---|---|---|---|---|"]
    lines += [f"| {label} " + method_cells(runs) for label, runs in r.fidelity.items()]
    return lines + [""]


def low_data_lines(r: Report, path: Path) -> list[str]:
    if not r.low:
        return []
    p = r.profile
    lines = [f"## Low data ({r.frontier_domain}, {p.low_data_sequences} training sequences of {p.seq_len} tokens, {p.low_data_steps} steps, seed 0)", ""]
    lines += ["| step | " + " | ".join(f"{n} spec ppl | {n} gen ppl" for n in r.low) + " |", "|---|" + "---|---|" * len(r.low)]
    for i, row in enumerate(next(iter(r.low.values()))):
        cells = []
        for curve in r.low.values():
            point = curve[i] if i < len(curve) else {}
            cells += [f"{point.get('ppl_spec', float('nan')):.3f}", f"{point.get('ppl_gen', float('nan')):.3f}"]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return lines + ["", f"![low data]({r.name}/low-data.png)", ""]


# ----------------------------------------------------------------------------- the fair frontier

KNOBS = ("lr", "tau", "rank", "lam", "alpha", "step")  # what tells one point of a family from another


@dataclass(frozen=True)
class FamilyPoint:
    """One point of a family's curve: its knobs and step, and S and DG in % over its seeds."""

    knobs: tuple  # the values of KNOBS
    S: Interval
    DG: Interval

    @property
    def label(self) -> str:
        names = {"lam": "λ", "tau": "τ", "alpha": "α"}
        return " ".join(f"{names.get(k, k)}={v:g}" for k, v in zip(KNOBS, self.knobs) if v is not None)


def family_rows(rows: list[Row], domain: str, family: str) -> dict[tuple, dict[int, Row]]:
    """knobs -> seed -> Row, for the rows of ``family`` in ``domain`` where S and DG are measured."""
    out: dict[tuple, dict[int, Row]] = {}
    for r in rows:
        if r.domain == domain and r.method == family and defined(r.S) and defined(r.DG):
            out.setdefault(tuple(getattr(r, k) for k in KNOBS), {})[r.seed] = r
    return out


def family_points(rows: list[Row], domain: str, family: str) -> list[FamilyPoint]:
    return [FamilyPoint(k, interval_of(runs, "S", 100), interval_of(runs, "DG", 100)) for k, runs in family_rows(rows, domain, family).items()]


def envelope_points(points: list[FamilyPoint]) -> list[FamilyPoint]:
    """The points on the upper envelope of the mean (S, DG), in increasing DG."""
    kept = set(upper_envelope([(p.S.mean, p.DG.mean) for p in points]))
    return sorted((p for p in points if (p.S.mean, p.DG.mean) in kept), key=lambda p: p.DG.mean)


@dataclass(frozen=True)
class FamilyVerdict:
    """``ours``'s envelope (MFT's) against a family's at equal DG: ``gap`` on the mean envelopes (S of ours − S of the
    family, in points of %), ``per_seed`` the interval of each seed's mean gap (that seed's own envelopes)."""

    family: str
    gap: FrontierGap
    per_seed: Interval | None
    ours: str = "MFT"


def family_verdict(rows: list[Row], domain: str, family: str, points: int = 9, ours: str = "MFT") -> FamilyVerdict:
    def envelope(runs: dict[tuple, dict[int, Row]], seed: int | None = None) -> list[tuple[float, float]]:
        if seed is None:
            cloud = [(interval_of(by_seed, "S", 100).mean, interval_of(by_seed, "DG", 100).mean) for by_seed in runs.values()]
        else:
            cloud = [(100 * by_seed[seed].S, 100 * by_seed[seed].DG) for by_seed in runs.values() if seed in by_seed]
        return upper_envelope(cloud)

    theirs, mine = family_rows(rows, domain, family), family_rows(rows, domain, ours)
    if not theirs or not mine:
        return FamilyVerdict(family, FrontierGap([]), None, ours)
    gap = frontier_gap(envelope(theirs), envelope(mine), points)
    seeds = sorted({s for runs in (theirs, mine) for by_seed in runs.values() for s in by_seed})
    per_seed = []
    for seed in seeds:
        a, b = envelope(theirs, seed), envelope(mine, seed)
        if a and b:
            g = frontier_gap(a, b, points)
            if g.rows:
                per_seed.append(g.mean_gap)
    return FamilyVerdict(family, gap, mean_interval(per_seed) if per_seed else None, ours)


def verdict_text(v: FamilyVerdict) -> str:
    """One plain sentence: is MFT (``v.ours``) ahead of the family at equal DG, and where is it not?"""
    if not v.gap.rows:
        return "no common DG range: S cannot be compared at equal DG."
    behind = [d for d, _, _, g in v.gap.rows if g <= 0]
    noise = v.per_seed is None or v.per_seed.n < 2
    if not behind:
        if noise:
            return f"{v.ours} has more S at every common DG on the mean envelopes; too few seeds for an interval."
        if v.per_seed.low > 0:
            return f"**{v.ours} is ahead** at every common DG, beyond the per-seed interval."
        return f"{v.ours} has more S at every common DG on the mean envelopes, but the per-seed interval contains 0: within seed noise."
    where = f"{min(behind):.2f}" if len(behind) == 1 else f"{min(behind):.2f}–{max(behind):.2f}"
    return f"**{v.ours} is not ahead** at DG {where} %: {v.family} has as much S there or more."


def plot_fair_frontier(rows: list[Row], domain: str, path: Path) -> None:
    """Every family's points (faint) and its upper envelope (mean and 95% interval over seeds), DG against S."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = dict(zip(FAMILIES, plt.get_cmap("tab10").colors))
    envelopes = []
    for family in FAMILIES:
        points = family_points(rows, domain, family)
        if not points:
            continue
        color = colors[family]
        ax.scatter([p.S.mean for p in points], [p.DG.mean for p in points], s=10, alpha=0.35, color=color)
        env = envelope_points(points)
        envelopes += env
        ax.errorbar(
            [p.S.mean for p in env], [p.DG.mean for p in env], xerr=[0 if p.S.n < 2 else p.S.half_width for p in env],
            yerr=[0 if p.DG.n < 2 else p.DG.half_width for p in env], marker="o", markersize=4, capsize=2,
            linewidth=2.2 if family == "MFT" else 1.2, label=family, color=color,
        )  # fmt: skip
    n = max((len(runs) for f in FAMILIES for runs in family_rows(rows, domain, f).values()), default=0)
    ax.set(
        xlabel="S, specialization (%)", ylabel="DG, degeneralization (%)",
        title=f"Fair frontier, {domain}: envelopes (lines), evaluations (dots), {n} seeds",
    )  # fmt: skip
    # The axes fit the envelopes: a family that diverges (DFT's S fell below -150%) would otherwise squeeze every
    # curve that matters into a corner. Dots beyond them are cut, and the tables list every point.
    if envelopes:
        for lim, values in ((ax.set_xlim, [p.S.mean for p in envelopes]), (ax.set_ylim, [p.DG.mean for p in envelopes])):
            margin = 0.08 * (max(values) - min(values)) + 0.5
            lim(min(values) - margin, max(values) + margin)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_frontier_results(path: Path, r: Report) -> None:
    """NAME.md of the fair frontier: the protocol and grids, its sizing, and per domain the plot, the verdicts and
    each family's envelope points."""
    p = r.profile
    families = [f for f in FAMILIES if any(row.method == f for row in r.rows)]
    lines = provenance_lines(r, path) + warning_lines(r) + [
        "Protocol, the same for every family unless its knobs say otherwise: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p.protocol.items() if k != "eval_every")
        + f". Every run evaluates every {frontier_eval_every(p)} steps and **every evaluation is a point** (stopping there). "
        "WiSE-FT averages an FT run's best checkpoint (lowest specialized validation perplexity) with the start at α, "
        "without training; WiSE-MFT does the same to an MFT run's. EWC's Fisher is computed on general-domain training text, so **EWC uses general-domain data**; "
        "the other families do not. EWC's λ column is the λ given to training (the grid divided by the Fisher's mean). "
        + mft_cache_text(r.rows),
        "",
        "Grids (the command's --lrs, --taus, --lambdas and --ranks keep those at its learning rates, MFT margins, penalties "
        "and LoRA ranks): " + "; ".join(f"{f}: " + ", ".join(pt.label for pt in FAMILIES[f]) for f in families) + ".",
        "",
        "Each point is the mean over seeds of S and DG in %, with its 95% Student t interval. A family's best curve is "
        "the upper envelope of its points (the points no other point of the family beats: more S at no more DG), read "
        "piecewise-linearly. MFT − family is S of MFT's envelope minus S of the family's at 9 evenly spaced DG values "
        "of the range both envelopes reach; the per-seed interval is over each seed's mean gap, each seed's envelopes "
        "built from its own runs.",
        "",
        *frontier_sizing_lines(r),
    ]
    for domain in r.domains:
        lines += [f"## {domain}", "", f"![fair frontier, {domain}]({r.name}/frontier-{domain}.png)", ""]
        others = [f for f in families if f != "MFT" and family_rows(r.rows, domain, f)]
        if not family_rows(r.rows, domain, "MFT"):
            others = []
            lines += ["No MFT points in this domain (MFT is not among --families), so no verdicts.", ""]
        verdicts = [family_verdict(r.rows, domain, family) for family in others]
        if "WiSE-MFT" in others and "WiSE-FT" in others:
            # Both averaged: does MFT still help once FT's over-training is pulled back the same way?
            verdicts.append(family_verdict(r.rows, domain, "WiSE-FT", ours="WiSE-MFT"))
        if verdicts:
            lines += ["| ours − family | common DG % | S at equal DG (points) | mean | per seed | verdict |", "|---|---|---|---|---|---|"]
        for v in verdicts:
            name = f"{v.ours} − {v.family}"
            if not v.gap.rows:
                lines.append(f"| {name} | — | — | — | — | {verdict_text(v)} |")
                continue
            lows, highs = v.gap.rows[0][0], v.gap.rows[-1][0]
            gaps = ", ".join(f"{g:+.2f}" for g in v.gap.gaps)
            lines.append(f"| {name} | {lows:.2f} – {highs:.2f} | {gaps} | {v.gap.mean_gap:+.2f} | {fmt(v.per_seed)} | {verdict_text(v)} |")
        lines += ([""] if verdicts else []) + ["Envelope points (the knobs and step of each):", "", "| family | point | seeds | S % | DG % |", "|---|---|---|---|---|"]
        for family in families:
            for pt in envelope_points(family_points(r.rows, domain, family)):
                lines.append(f"| {family} | {pt.label} | {pt.S.n} | {fmt(pt.S)} | {fmt(pt.DG)} |")
        lines.append("")
    lines += [f"Every point of every seed, one row each: [runs.csv]({r.name}/runs.csv).", ""]
    path.write_text("\n".join(lines) + "\n")


def mft_cache_text(rows: list[Row]) -> str:
    """Which stage-one cache MFT's points trained from (runs.csv's k and tail_samples columns)."""
    caches = sorted({(row.k, row.tail_samples) for row in rows if row.method == "MFT"})
    if not caches:
        return ""
    names = [f"top-{k} cache plus {n} ids sampled from the teacher's tail (--tail-samples {n})" if n else f"top-{k} cache" for k, n in caches]
    return f"MFT trains from the {' and the '.join(names)}; FT and the other families read only the labels."


def frontier_sizing_lines(r: Report) -> list[str]:
    p, tp, counts = r.profile, r.profile.throughput, r.counts
    if tp is None:
        return [f"Planned work: {', '.join(f'{k} {n}' for k, n in counts.items())}. This profile has no measured throughput to size it by.", ""]
    minutes = estimate_minutes(p, counts, tp)
    return [
        "| work | count | estimated minutes |",
        "|---|---|---|",
        *(f"| {kind} | {counts[kind]} | {minutes[kind]:.0f} |" for kind in counts),
        f"| total | | {sum(minutes.values()):.0f} (this run: {r.seconds / 60:.0f}, finished runs reused) |",
        "",
        f"Sized from {tp.measured}: training {tp.train:.0f} tokens/s, evaluation {tp.eval:.0f} tokens/s, {tp.overhead_s:.0f} s "
        "per run of loading and checkpoints.",
        "",
    ]

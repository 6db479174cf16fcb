"""`mft tune`: the most specialized MFT model that forgets at most X%, searched over tau and the learning rate.

The search (``plan``, ``refine``, ``choose``) is pure: it reads a table of finished candidates
and says what to train next, or which candidate wins. ``tune`` runs it: every candidate is an
ordinary `mft train` run folder under ``--out``, trained with ``--max-degeneralization X`` so
that it stops at its first evaluation over the budget and keeps its best checkpoint within it
(``run_folder.best_row``). A finished candidate is read back, never retrained; a half-finished
one is resumed. See docs/tune.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from mft_pipeline.config import TUNE_FIELDS, TrainConfig, TuneConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.files import atomic_write, atomic_write_text
from mft_pipeline.run_folder import BEST, RunFolder
from mft_pipeline.sweep.grid import run_name, train_unless_finished

REPORT = "tune.md"
PLOT = "tune.png"
SUMMARY = "tune.json"
# Midpoints are rounded to this many decimals, so folder names stay short and reruns find the same ones.
TAU_DECIMALS = 4


@dataclass(frozen=True, order=True)
class Candidate:
    tau: float
    lr: float


@dataclass(frozen=True)
class Outcome:
    """A finished candidate: its best evaluation row within the budget, and the row that stopped it.

    ``best``: the row ``run_folder.best_row`` picks (the checkpoint in the run's ``best/``), None
    when no evaluation was within the budget. ``stop``: the first evaluation over the budget,
    where training stopped, None when the run went to its last step. Rows are metrics.jsonl's
    "eval" rows: ``step``, ``S`` and ``DG`` (fractions), ``DG_over_S``, perplexities.
    """

    best: dict | None = None
    stop: dict | None = None

    @property
    def feasible(self) -> bool:
        return self.best is not None and "S" in self.best and "DG" in self.best

    def rank(self) -> tuple:
        """Higher is better among feasible candidates: the most S, then the least DG."""
        return (self.best["S"], -self.best["DG"])


def coarse_grid(search: TuneConfig) -> list[Candidate]:
    return [Candidate(tau, lr) for lr in search.lr_list for tau in search.tau_list]


def best_feasible(results: Mapping[Candidate, Outcome]) -> Candidate | None:
    """The feasible candidate with the most S (least DG on a tie, then the lowest tau and lr); None if none is feasible."""
    feasible = [c for c, o in results.items() if o.feasible]
    if not feasible:
        return None
    return max(sorted(feasible), key=lambda c: results[c].rank())


def refine(results: Mapping[Candidate, Outcome]) -> list[Candidate]:
    """One refinement round: at the best candidate's learning rate, the taus halfway between its tau and each
    neighbouring tau tried at that rate (feasible or not). Those not tried yet; none when nothing is feasible.

    DG grows with tau, so the best tau's upper neighbour is either over the budget (the midpoint
    bisects towards the budget's edge) or within it with less S (a run cut short by the budget).
    Where S rises and then falls with tau, its maximum lies between the two neighbours.
    """
    best = best_feasible(results)
    if best is None:
        return []
    taus = sorted(c.tau for c in results if c.lr == best.lr)
    i = taus.index(best.tau)
    midpoints = [round((best.tau + t) / 2, TAU_DECIMALS) for t in taus[max(0, i - 1) : i] + taus[i + 1 : i + 2]]
    return [Candidate(t, best.lr) for t in midpoints if t not in taus]


def plan(search: TuneConfig, results: Mapping[Candidate, Outcome]) -> list[list[Candidate]]:
    """The rounds of the search that ``results`` settle: the coarse grid, then each refinement round whose
    inputs are all finished. Candidates of the last round that are not in ``results`` are the ones to train next.

    A pure function of the finished results, so a rerun proposes exactly what an uninterrupted
    search would have; results that no round proposes are ignored.
    """
    rounds = [coarse_grid(search)]
    for _ in range(search.refine_rounds):
        if any(c not in results for c in rounds[-1]):
            break
        known = {c: results[c] for r in rounds for c in r}
        new = refine(known)
        if not new:
            break
        rounds.append(new)
    return rounds


def round_name(index: int) -> str:
    """How reports name round ``index`` of ``plan``: "grid", then "refine 1", "refine 2", ..."""
    return "grid" if index == 0 else f"refine {index}"


def next_candidates(search: TuneConfig, results: Mapping[Candidate, Outcome]) -> list[Candidate]:
    """What to train next; empty once the search is done."""
    return [c for c in plan(search, results)[-1] if c not in results]


@dataclass(frozen=True)
class Choice:
    """The search's answer: a candidate, or None (keep the start) with the reason."""

    candidate: Candidate | None
    reason: str | None


def choose(results: Mapping[Candidate, Outcome], max_degeneralization: float) -> Choice:
    """The most specialized candidate whose best checkpoint has DG <= ``max_degeneralization`` percent and S > 0.

    Without one the answer is the start (the teacher, untuned), with the reason.
    """
    within = {c: o for c, o in results.items() if o.feasible and 100 * o.best["DG"] <= max_degeneralization}
    best = best_feasible(within)
    if best is None:
        stopped = [(c, o.stop) for c, o in results.items() if o.stop is not None and "DG" in o.stop]
        if not stopped:
            return Choice(None, f"No candidate has both S and DG within DG ≤ {max_degeneralization:g}%")
        c, row = min(stopped, key=lambda item: (item[1]["DG"], item[0]))
        return Choice(
            None,
            f"Every candidate exceeded DG ≤ {max_degeneralization:g}% at its first evaluation: the lowest was "
            f"{100 * row['DG']:.2f}% at τ={c.tau:g}, lr={c.lr:g} (step {row['step']}). A lower learning rate, an earlier "
            "first evaluation (--eval-every) or a larger budget may find one.",
        )
    if results[best].best["S"] <= 0:
        return Choice(
            None,
            f"No candidate within DG ≤ {max_degeneralization:g}% improved on the start: the most specialized had "
            f"S = {100 * results[best].best['S']:.2f}% at τ={best.tau:g}, lr={best.lr:g}.",
        )
    return Choice(best, None)


# Running the search.


def candidate_config(search: TuneConfig, base: dict, candidate: Candidate) -> TrainConfig:
    """The `mft train` settings of one candidate: ``base`` (the pass-through settings) with its tau and lr, under ``--out``."""
    passed = {f.name for f in dataclasses.fields(TrainConfig)} - set(TUNE_FIELDS)
    settings = {k: v for k, v in base.items() if k in passed}
    config = TrainConfig(
        **settings, cache=search.cache, out="", tau=candidate.tau, lr=candidate.lr, variant="mft",
        max_degeneralization=search.max_degeneralization,
    )  # fmt: skip
    return dataclasses.replace(config, out=str(Path(search.out) / f"{run_name(config)}-lr{candidate.lr:g}"))


def read_outcome(run: Path) -> Outcome:
    """A finished candidate's outcome, from its metrics.jsonl, by the training loop's own best-row rule."""
    folder = RunFolder(run)
    stop = next((r for r in folder.metrics("eval") if not r.get("within_budget", True)), None)
    return Outcome(best=folder.best_row(), stop=stop)


def tune(search: TuneConfig, base: dict, log: Callable[[str], None] = print, train=None) -> dict:
    """Train the search's candidates (finished ones are read back, never retrained), put the winner's
    checkpoint in ``--out/best`` and write tune.md, tune.png and tune.json. Returns tune.json's content.

    ``base`` holds the pass-through TrainConfig settings (steps, eval_every, general_eval, ...);
    ``train`` trains one TrainConfig (default: ``mft_pipeline.train.loop.train``).
    """
    from mft_pipeline.cache.reader import Cache

    if train is None:
        from mft_pipeline.train.loop import train
    from mft_pipeline.train.loop import replay_rows_per_step

    # Every setting is checked before the first candidate trains.
    for candidate in coarse_grid(search):
        replay_rows_per_step(candidate_config(search, base, candidate))
    cache = Cache(search.cache)
    if not cache.has("validation"):
        raise ConfigError(f"{search.cache}: the cache has no validation split, so S cannot be measured; rebuild it with --val-fraction above 0")
    out = Path(search.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[Candidate, Outcome] = {}
    runs: dict[Candidate, Path] = {}
    while todo := next_candidates(search, results):
        stage = round_name(len(plan(search, results)) - 1)
        for i, candidate in enumerate(todo, 1):
            config = candidate_config(search, base, candidate)
            runs[candidate] = Path(config.out)
            train_unless_finished(config, train, lambda status: log(f"[{stage} {i}/{len(todo)}] {runs[candidate].name}: {status}"))
            results[candidate] = read_outcome(runs[candidate])
    choice = choose(results, search.max_degeneralization)
    publish_best(out, None if choice.candidate is None else runs[choice.candidate])
    summary = tune_summary(search, plan(search, results), results, runs, choice, start=base.get("student") or cache.manifest["model"]["id"])
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / REPORT, markdown(summary))
    plot(summary, out / PLOT)
    return summary


def publish_best(out: Path, run: Path | None) -> None:
    """Make ``out/best`` the chosen run's checkpoint (its merged model when it trained an adapter with --merge-adapter),
    as hard links where the file system allows them (no second copy on disk); with no chosen run, remove it.

    The new folder is made beside ``out/best`` and swapped in whole (``files.atomic_write``).
    """
    target = out / BEST
    if run is None:
        shutil.rmtree(target, ignore_errors=True)
        return
    folder = RunFolder(run)
    source = folder.merged if folder.merged.is_dir() else folder.best
    # A fixed temp name: a later search clears the one a killed search left.
    atomic_write(target, lambda tmp: shutil.copytree(source, tmp, copy_function=_link_or_copy), temp_name=f".{BEST}.tmp")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def tune_summary(search, rounds, results, runs, choice: Choice, start: str) -> dict:
    """tune.json: the budget, the answer, and every candidate in the order the search proposed it."""
    candidates = []
    for i, round_ in enumerate(rounds):
        for c in round_:
            o = results[c]
            candidates.append({
                "run": runs[c].name, "round": round_name(i), "tau": c.tau, "lr": c.lr,
                "feasible": o.feasible, "best": o.best, "stop": o.stop,
            })  # fmt: skip
    chosen = None
    if choice.candidate is not None:
        c = choice.candidate
        chosen = {"run": runs[c].name, "tau": c.tau, "lr": c.lr, "checkpoint": BEST, **{k: results[c].best[k] for k in ("step", "S", "DG")}}
    return {
        "max_degeneralization": search.max_degeneralization,
        "chosen": chosen,
        "start": start,
        "reason": choice.reason,
        "search": dataclasses.asdict(search),
        "candidates": candidates,
    }


def answer(summary: dict) -> str:
    """The search's answer in one or two sentences (the CLI's output and the report's first line)."""
    budget = f"DG ≤ {summary['max_degeneralization']:g}%"
    c = summary["chosen"]
    if c is None:
        return f"No candidate fits {budget}: keep the start ({summary['start']}), untuned; best/ is not written. {summary['reason']}"
    return (
        f"Chosen: {c['run']} (τ={c['tau']:g}, lr={c['lr']:g}) at step {c['step']}: S = {100 * c['S']:.2f}%, "
        f"DG = {100 * c['DG']:.2f}% ({budget}); its checkpoint is in best/."
    )


def markdown(summary: dict) -> str:
    """tune.md: the answer, then one row per candidate at its best checkpoint within the budget."""
    from mft_pipeline.sweep.report import pct, ratio

    chosen = (summary["chosen"] or {}).get("run")
    lines = [
        f"# mft tune: the most specialized checkpoint with DG ≤ {summary['max_degeneralization']:g}%",
        "",
        answer(summary),
        "",
        "S = specialization, DG = degeneralization, in % of the start's perplexity on the specialized validation",
        "split and the general-domain corpus. Each candidate is shown at its best checkpoint within the budget",
        "(lowest specialized perplexity); \"stopped\" is the evaluation over the budget where its training ended.",
        "",
        "| round | τ | lr | S % | DG % | DG/S | step | stopped | run |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in summary["candidates"]:
        best, stop = c["best"] or {}, c["stop"]
        stopped = "" if stop is None else f"step {stop['step']}, DG {pct(stop.get('DG'))} %"
        run = f"**{c['run']}** (chosen)" if c["run"] == chosen else c["run"]
        lines.append(
            f"| {c['round']} | {c['tau']:g} | {c['lr']:g} | {pct(best.get('S'))} | {pct(best.get('DG'))} | "
            f"{ratio(best.get('DG_over_S'))} | {best.get('step', '–')} | {stopped} | {run} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """DG against S: each candidate's best checkpoint within the budget (one colour per learning rate, labelled with τ),
    the evaluations that stopped candidates (crosses), the budget's feasible region shaded, the start and the choice."""
    from mft_pipeline.sweep.report import new_axes

    fig, ax = new_axes(figsize=(8, 5.5))
    import matplotlib

    budget = summary["max_degeneralization"]
    lrs = sorted({c["lr"] for c in summary["candidates"]})
    colors = dict(zip(lrs, itertools.cycle(matplotlib.colormaps["tab10"].colors)))
    for lr in lrs:
        rows = [c for c in summary["candidates"] if c["lr"] == lr]
        kept = [c for c in rows if c["feasible"]]
        ax.scatter([100 * c["best"]["S"] for c in kept], [100 * c["best"]["DG"] for c in kept], color=colors[lr], label=f"lr {lr:g}", zorder=3)
        for c in kept:
            ax.annotate(f"τ={c['tau']:g}", (100 * c["best"]["S"], 100 * c["best"]["DG"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        over = [c["stop"] for c in rows if c["stop"] is not None and "S" in c["stop"] and "DG" in c["stop"]]
        ax.scatter([100 * r["S"] for r in over], [100 * r["DG"] for r in over], color=colors[lr], marker="x", zorder=3)
    ax.axhline(budget, color="tab:green", linestyle="--", linewidth=1)
    low, high = ax.get_ylim()
    ax.axhspan(low, budget, color="tab:green", alpha=0.12, label=f"DG ≤ {budget:g}% (within the budget)")
    ax.set_ylim(low, high)
    ax.scatter([0], [0], color="black", marker="s", label="start", zorder=4)
    chosen = summary["chosen"]
    if chosen is not None:
        ax.scatter([100 * chosen["S"]], [100 * chosen["DG"]], s=250, marker="*", facecolor="none", edgecolor="red", linewidth=1.5, label="chosen", zorder=5)
    ax.set_xlabel("specialization S (%)  → better")
    ax.set_ylabel("degeneralization DG (%)  ↓ better")
    ax.set_title("mft tune: candidates at their best checkpoint within the budget (x: where one stopped)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, format="png")

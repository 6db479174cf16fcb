"""`mft tune`: the search on hand-built result tables, the budget, the start as the answer, and reuse on rerun."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import metric_rows, stop_after_checkpoint
from mft_pipeline.config import TRAIN_DEFAULTS, TuneConfig, run_settings
from mft_pipeline.run_folder import RunFolder, improves
from mft_pipeline.sweep.tune import Candidate, Outcome, choose, next_candidates, plan, refine, tune
from mft_pipeline.train import loop

from .conftest import base_settings


def ok(S: float, DG: float, step: int = 4) -> Outcome:
    """A candidate whose best checkpoint within the budget has S and DG (fractions)."""
    return Outcome(best={"step": step, "S": S, "DG": DG})


def over(DG: float, S: float = 0.5, step: int = 1) -> Outcome:
    """A candidate whose first evaluation was already over the budget."""
    return Outcome(stop={"step": step, "S": S, "DG": DG})


def search(**kw) -> TuneConfig:
    return TuneConfig(**{"cache": "c", "out": "o", "max_degeneralization": 1.0, "taus": "0,0.25,0.5,1", "lrs": "1e-5,1e-4", **kw})


# The search, on hand-built tables.


def test_the_search_starts_with_the_whole_coarse_grid():
    grid = [Candidate(t, lr) for lr in (1e-5, 1e-4) for t in (0, 0.25, 0.5, 1)]
    assert next_candidates(search(), {}) == grid
    # Unsorted, repeated or spaced entries make the same grid.
    assert next_candidates(search(taus="1, 0.5,0,0.25,0.5", lrs="1e-4,1e-5"), {}) == grid
    half = {c: ok(0.1, 0.001) for c in grid[:4]}
    assert next_candidates(search(), half) == grid[4:], "a round is finished before the next one is planned"


def test_refinement_halves_the_tau_intervals_around_the_best_at_its_learning_rate():
    table = {
        Candidate(0, 1e-5): ok(0.05, 0.001), Candidate(0.25, 1e-5): ok(0.10, 0.003),
        Candidate(0.5, 1e-5): ok(0.12, 0.006), Candidate(1, 1e-5): over(0.03),
        Candidate(0, 1e-4): ok(0.08, 0.002), Candidate(0.25, 1e-4): ok(0.20, 0.008),
        Candidate(0.5, 1e-4): ok(0.15, 0.009), Candidate(1, 1e-4): over(0.05),
    }  # fmt: skip
    # Best: tau 0.25 at 1e-4, an interior maximum: both intervals next to it are halved.
    assert refine(table) == [Candidate(0.125, 1e-4), Candidate(0.375, 1e-4)]
    # Best at its rate's largest feasible tau, the next one over the budget: the midpoint bisects towards it.
    table[Candidate(0.5, 1e-4)] = ok(0.25, 0.009)
    assert refine(table) == [Candidate(0.375, 1e-4), Candidate(0.75, 1e-4)]
    # Best at the top of the grid: one interval only.
    table[Candidate(1, 1e-4)] = ok(0.30, 0.01)
    assert refine(table) == [Candidate(0.75, 1e-4)]
    # Nothing feasible: nothing to refine around.
    assert refine({c: over(0.02) for c in table}) == []


def test_refinement_rounds_build_on_each_other_and_stop_when_done():
    config = search(taus="0,0.5,1", lrs="1e-4", refine_rounds=2)
    table = {Candidate(0, 1e-4): ok(0.05, 0.001), Candidate(0.5, 1e-4): ok(0.10, 0.004), Candidate(1, 1e-4): over(0.02)}
    assert next_candidates(config, table) == [Candidate(0.25, 1e-4), Candidate(0.75, 1e-4)]
    table |= {Candidate(0.25, 1e-4): ok(0.07, 0.002), Candidate(0.75, 1e-4): ok(0.12, 0.009)}
    # Round two refines around the new best, 0.75, between 0.5 and 1.
    assert next_candidates(config, table) == [Candidate(0.625, 1e-4), Candidate(0.875, 1e-4)]
    table |= {Candidate(0.625, 1e-4): ok(0.11, 0.006), Candidate(0.875, 1e-4): over(0.011)}
    assert next_candidates(config, table) == []
    assert [len(r) for r in plan(config, table)] == [3, 2, 2]
    assert next_candidates(dataclasses.replace(config, refine_rounds=0), {}) == plan(config, {})[0]
    # Results no round asks for (another grid's) are not used.
    assert next_candidates(config, {Candidate(0.3, 1e-4): ok(0.5, 0.0)}) == plan(config, {})[0]


def test_choose_takes_the_most_specialized_checkpoint_within_the_budget():
    table = {
        Candidate(0, 1e-5): ok(0.05, 0.001), Candidate(0.5, 1e-5): ok(0.11, 0.0099),
        Candidate(1, 1e-5): ok(0.30, 0.0101),  # over 1%: a table made with another budget
        Candidate(0.25, 1e-4): ok(0.11, 0.004), Candidate(1, 1e-4): over(0.02),
    }  # fmt: skip
    choice = choose(table, max_degeneralization=1.0)
    # Equal S: the one that forgets less.
    assert choice.candidate == Candidate(0.25, 1e-4) and choice.reason is None
    assert choose(table, max_degeneralization=1.02).candidate == Candidate(1, 1e-5)


def test_an_impossible_budget_answers_the_start_with_the_reason():
    table = {Candidate(0, 1e-5): over(0.031, step=2), Candidate(0.5, 1e-5): over(0.025, step=1), Candidate(1, 1e-4): over(0.2)}
    choice = choose(table, max_degeneralization=1.0)
    assert choice.candidate is None
    assert choice.reason.startswith("Every candidate exceeded DG ≤ 1% at its first evaluation: the lowest was 2.50% at τ=0.5, lr=1e-05 (step 1)")
    # Within the budget but no better than the start on the specialized domain: the start is still the answer.
    choice = choose({Candidate(0, 1e-5): ok(-0.01, 0.001), Candidate(1, 1e-5): over(0.02)}, max_degeneralization=1.0)
    assert choice.candidate is None and "improved on the start" in choice.reason and "S = -1.00% at τ=0, lr=1e-05" in choice.reason


# The search run, with a trainer that writes run folders from a known curve (no model).


def curve(tau: float, lr: float, step: int) -> tuple[float, float]:
    """S and DG after ``step`` steps: both grow with tau, the learning rate and the steps."""
    return 200 * lr * (1 + tau) * step, 100 * lr * (0.1 + tau * tau) * step


class CurveTrainer:
    """A ``train`` that writes what the loop would (metrics rows by its ``eval_row``, stopping over the
    budget, summary.json last), with ``curve``'s numbers; it records every call."""

    def __init__(self):
        self.calls: list[tuple[float, float, bool]] = []

    def __call__(self, config):
        self.calls.append((config.tau, config.lr, config.resume))
        folder = RunFolder(config.out)
        folder.start(run_settings(config), config.resume, TRAIN_DEFAULTS)
        before, best = {"ppl_spec": 10.0, "ppl_gen": 20.0}, None
        folder.append_metrics({"step": 0, "kind": "before", **before})
        for step in range(1, config.steps + 1):
            S, DG = curve(config.tau, config.lr, step)
            row = loop.eval_row(step, {"ppl_spec": 10.0 * (1 - S), "ppl_gen": 20.0 * (1 + DG)}, before, config.max_degeneralization)
            folder.append_metrics(row)
            if improves(row, best):
                best = row
                folder.best.mkdir(exist_ok=True)
                (folder.best / "weights.txt").write_text(f"{config.tau:g} {config.lr:g} {step}")
            if not row["within_budget"]:
                break
        folder.write_summary({"before": before, "best": best, "config": dataclasses.asdict(config)})


def brute_force_best(candidates, budget: float, steps: int) -> tuple[float, tuple]:
    """Max S over every step of every candidate up to its first step over the budget, straight from ``curve``."""
    best = (float("-inf"), None)
    for tau, lr in candidates:
        for step in range(1, steps + 1):
            S, DG = curve(tau, lr, step)
            if 100 * DG > budget:
                break
            best = max(best, (S, (tau, lr)), key=lambda b: b[0])
    return best


@pytest.mark.parametrize("budget", [0.45, 1.0, 3.0])
def test_tune_keeps_the_most_specialized_candidate_within_the_budget(stage_two, tmp_path, budget):
    config = TuneConfig(cache=str(stage_two / "cache"), out=str(tmp_path), max_degeneralization=budget, lrs="1e-5,3e-5,1e-4")
    trainer = CurveTrainer()
    summary = tune(config, base_settings(stage_two, steps=6, eval_every=1), log=lambda line: None, train=trainer)
    chosen = summary["chosen"]
    S, where = brute_force_best([(t, lr) for t, lr, _ in trainer.calls], budget, steps=6)
    assert 100 * chosen["DG"] <= budget
    assert chosen["S"] == pytest.approx(S) and (chosen["tau"], chosen["lr"]) == where
    assert len(set(trainer.calls)) == len(trainer.calls) == len(summary["candidates"]), "each candidate trained once"
    assert [c["round"] for c in summary["candidates"][:15]] == ["grid"] * 15
    # best/ holds the chosen run's best checkpoint (here the curve trainer's stand-in for weights).
    assert (tmp_path / "best" / "weights.txt").read_text() == f"{chosen['tau']:g} {chosen['lr']:g} {chosen['step']}"
    assert json.loads((tmp_path / "tune.json").read_text()) == summary
    assert f"**{chosen['run']}** (chosen)" in (tmp_path / "tune.md").read_text()
    assert (tmp_path / "tune.png").read_bytes().startswith(b"\x89PNG")


def test_tune_never_retrains_a_finished_candidate(stage_two, tmp_path):
    config = TuneConfig(cache=str(stage_two / "cache"), out=str(tmp_path), max_degeneralization=1.0, taus="0,0.5,1", lrs="1e-4")
    base = base_settings(stage_two, steps=6, eval_every=1)
    first = CurveTrainer()
    summary = tune(config, base, log=lambda line: None, train=first)
    assert len(first.calls) > 3, "refinement rounds ran"
    again, log = CurveTrainer(), []
    assert tune(config, base, log=log.append, train=again) == summary
    assert again.calls == [] and len(log) == len(first.calls) and all(line.endswith("finished, skipped") for line in log)
    # One more round reuses every earlier candidate and trains only the new ones.
    more = CurveTrainer()
    chosen = tune(dataclasses.replace(config, refine_rounds=3), base, log=lambda line: None, train=more)["chosen"]
    assert len(more.calls) == 2 and not set(more.calls) & set(first.calls)
    assert (tmp_path / "best" / "weights.txt").read_text() == f"{chosen['tau']:g} {chosen['lr']:g} {chosen['step']}"


def test_an_impossible_budget_writes_no_best_and_says_why(stage_two, tmp_path):
    config = TuneConfig(cache=str(stage_two / "cache"), out=str(tmp_path), max_degeneralization=0.0, taus="0,1", lrs="1e-5,1e-4")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "weights.txt").write_text("left by an earlier search")
    summary = tune(config, base_settings(stage_two, steps=4, eval_every=1), log=lambda line: None, train=CurveTrainer())
    assert summary["chosen"] is None and summary["start"] == str(stage_two / "teacher")
    # The lowest DG of any first evaluation: tau 0 at the lower rate, step 1.
    assert f"the lowest was {100 * curve(0, 1e-5, 1)[1]:.2f}% at τ=0, lr=1e-05 (step 1)" in summary["reason"]
    assert not (tmp_path / "best").exists() and "keep the start" in (tmp_path / "tune.md").read_text()
    assert len(summary["candidates"]) == 4, "nothing feasible: no refinement"


def test_bad_settings_fail_before_anything_is_written(stage_two, tmp_path):
    for kw, match in [(dict(taus="0,1.5"), "tau"), (dict(lrs="1e-4,-1"), "lrs"), (dict(lrs="fast"), "not a number"),
                      (dict(max_degeneralization=-1.0), "percentage"), (dict(refine_rounds=-1), "refine_rounds")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TuneConfig(**{"cache": "c", "out": "o", "max_degeneralization": 1.0, **kw})
    config = TuneConfig(cache=str(stage_two / "cache"), out=str(tmp_path / "t"), max_degeneralization=1.0)
    with pytest.raises(ValueError, match="needs --general-eval"):
        tune(config, base_settings(stage_two, general_eval=None), train=CurveTrainer())
    assert not (tmp_path / "t").exists()


# Real training: a killed search resumes its half-finished candidate and retrains nothing finished.


def test_a_killed_search_resumes_the_half_finished_candidate_only(stage_two, tmp_path):
    config = TuneConfig(cache=str(stage_two / "cache"), out=str(tmp_path), max_degeneralization=100.0, taus="0,1", lrs="1e-3", refine_rounds=0)
    base = base_settings(stage_two, steps=2, eval_every=1, general_max_sequences=4)

    def killing(train_config):
        return loop.train(train_config, on_checkpoint=stop_after_checkpoint(1) if train_config.tau == 1 else None)

    with pytest.raises(KeyboardInterrupt):
        tune(config, base, log=lambda line: None, train=killing)
    calls = []
    summary = tune(config, base, log=lambda line: None, train=lambda c: calls.append((c.tau, c.resume)) or loop.train(c))
    assert calls == [(1.0, True)]
    assert [r["step"] for r in metric_rows(tmp_path / "mft-tau1-lr0.001", "train")] == [1, 2]
    assert summary["chosen"] is not None and (tmp_path / "best" / "model.safetensors").exists()

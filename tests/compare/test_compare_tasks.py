"""`mft compare --tasks`: the reference and every per-domain run's best checkpoint scored on standard tasks, on a tiny model
and tiny local task data; the changes from the reference against an independent computation; resumed without rescoring."""

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from cli.main import mft
from mft_pipeline.compare.protocol import PROFILES, Throughput, estimate_minutes, planned_task_scores
from mft_pipeline.compare.results import Report, sizing_lines
from mft_pipeline.compare.runs import plan_line, run_compare
from mft_pipeline.config import CompareConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.eval.tasks import continuations
from test_compare import user_corpora

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the tasks extra (lm-eval)")
TASKS, LIMIT = ("arc_easy", "piqa"), 8


def test_task_settings_are_checked():
    assert CompareConfig(tasks="piqa, arc_easy", task_limit=5).task_list == ("piqa", "arc_easy")
    with pytest.raises(ConfigError, match="mmlu"):
        CompareConfig(tasks="piqa,mmlu")
    with pytest.raises(ConfigError, match="give --tasks too"):
        CompareConfig(task_limit=5)
    with pytest.raises(ConfigError, match="task_limit"):
        CompareConfig(tasks="piqa", task_limit=0)


def test_tasks_are_refused_with_the_fair_frontier(tmp_path):
    result = CliRunner().invoke(mft, ["compare", "--families", "FT", "--tasks", "piqa", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "the fair frontier's points are not scored" in result.output
    assert not (tmp_path / "out").exists()


def test_task_scoring_is_in_the_estimate():
    assert continuations(["hellaswag", "winogrande"], 50) == 4 * 50 + 2 * 50
    assert continuations(["arc_challenge"], None) == continuations(["arc_challenge"], 10_000) == 4 * 299
    p = PROFILES["quick"]
    # The reference and FT, MFT x 3 seeds x 1 domain; LoRA r8 has 1 seed, distill+ft runs in the frontier domain alone.
    assert planned_task_scores(p, ["FT", "MFT"], 1) == 7
    assert planned_task_scores(p, ["FT", "LoRA r8", "distill+ft"], 3) == 1 + 9 + 3 + 1
    tp = Throughput(train=100.0, eval=300.0, online=50.0, overhead_s=4.0, measured="by hand", tasks=2.0)
    assert estimate_minutes(p, {"tasks": 7}, tp, 800)["tasks"] == pytest.approx(7 * 400 / 60)
    counts = {"reference": 1, "cached": 6, "online": 0, "caches": 2, "low_data": 0}
    without = sum(estimate_minutes(p, counts, p.throughput).values())
    line = plan_line("quick", p, {**counts, "tasks": 7}, 800)
    assert "7 checkpoints scored on tasks (800 continuations each)" in line
    assert f"about {without + 7 * 800 / p.throughput.tasks / 60:.0f} minutes" in line
    report = Report(name="x", command="", model="", model_folder="", profile=p, domains=[], general="", skip=set(),
                    counts={**counts, "tasks": 7}, task_continuations=800)  # fmt: skip
    text = "\n".join(sizing_lines(report))
    assert f"800 scored continuations per checkpoint (one per answer choice) at {p.throughput.tasks:g} per second" in text
    assert f"| tasks | 7 | {7 * 800 / p.throughput.tasks / 60:.0f} |" in text


def loading_scorer(root, calls: list):
    """The injected scorer: loads the checkpoint and scores it on the tiny task data under ``root``, counting calls."""

    def score(checkpoint, tasks, limit, seed):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mft_pipeline.eval.tasks import task_accuracy

        calls.append(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        return task_accuracy(model, AutoTokenizer.from_pretrained(checkpoint), tasks, limit, seed, batch_size=4, root=root)

    return score


def expected_change(accuracies: list[float], reference: float) -> str:
    """The results file's cell, computed here: mean of 100 (acc - reference) over seeds ± t(0.975, n-1) sd / sqrt(n)."""
    d = 100 * (np.array(accuracies, dtype=np.float64) - reference)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():.1f} [{d.mean() - half:.1f}, {d.mean() + half:.1f}]"


@needs_lm_eval
def test_compare_scores_reference_and_best_checkpoints(tmp_path, tiny_model_dir, task_root):
    data = user_corpora(tmp_path)
    work = tmp_path / "work"
    config = CompareConfig(
        profile="smoke", model=str(tiny_model_dir), domain=(f"legal={data['legal']}",), general=str(data["general"]),
        out=str(tmp_path / "results"), work=str(work), methods="FT", skip="frontier,fidelity,low-data", tasks=",".join(TASKS),
        task_limit=LIMIT, task_seed=1, lr=0.05,  # a learning rate that moves the tiny model's answers
    )  # fmt: skip
    calls: list[str] = []
    results = run_compare(config, log=lambda line: None, score_tasks=loading_scorer(task_root, calls))
    text = results.read_text()
    assert len(calls) == 1 + 2  # the reference, FT x 2 seeds

    (reference_file,) = work.rglob("reference/tasks.json")
    reference = json.loads(reference_file.read_text())
    assert (reference["limit"], reference["seed"]) == (LIMIT, 1)
    for name in TASKS:
        score = reference["tasks"][name]
        assert score["n"] == LIMIT
        assert f"| {name} | {100 * score['acc']:.1f} | {100 * score['stderr']:.1f} | {LIMIT} |" in text

    (runs,) = work.rglob("from-reference/runs/legal-*")
    assert not list(runs.rglob("best")), "scored checkpoints are deleted without --keep-checkpoints"
    rows = list(csv.DictReader(open(results.with_suffix("") / "runs.csv")))
    accuracies = {}
    for row in rows:
        stored = json.loads((runs / row["method"] / f"seed{row['seed']}" / "tasks.json").read_text())["tasks"]
        for name in TASKS:
            assert row[f"{name}_acc"] == f"{stored[name]['acc']:.6f}"
            accuracies.setdefault(row["method"], {}).setdefault(name, []).append(stored[name]["acc"])
    assert "## Forgetting on standard tasks" in text and "a fixed subsample of 8 questions per task (seed 1)" in text
    for method, by_task in accuracies.items():
        cells = " | ".join(expected_change(by_task[n], reference["tasks"][n]["acc"]) for n in TASKS)
        assert f"| {method} | 2 | {cells} |" in text, method
    # The tiny model's runs differ from the reference on some task: the changes are not all zero.
    assert any(a != reference["tasks"][n]["acc"] for by_task in accuracies.values() for n in TASKS for a in by_task[n])

    # Run again: every score is read back, nothing is rescored or retrained.
    records = sorted(work.rglob("tasks.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    assert run_compare(config, log=lambda line: None, score_tasks=loading_scorer(task_root, calls)) == results
    assert len(calls) == 3 and [p.stat().st_mtime_ns for p in records] == stamps
    assert results.read_text().split("## Forgetting")[1] == text.split("## Forgetting")[1]

    # A finished run without scores whose checkpoint is gone (it ran before --tasks was given) is trained again and scored.
    again = runs / "FT" / "seed0"
    (again / "tasks.json").unlink()
    run_compare(config, log=lambda line: None, score_tasks=loading_scorer(task_root, calls))
    assert calls[3:] == [str(again / "best")] and not (again / "best").exists()
    assert json.loads((again / "tasks.json").read_text())["tasks"]["piqa"]["acc"] == accuracies["FT"]["piqa"][0]

"""`mft tune` end to end on the tiny stage-two cache: real training, best/ loadable, a rerun trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import mft
from conftest import metric_rows


def _tune(d, out, *extra):
    return ["tune", "--cache", str(d / "cache"), "--out", str(out), "--general-eval", str(d / "general.jsonl"),
            "--general-max-sequences", "4", "--steps", "2", "--eval-every", "1", "--lrs", "1e-3", *extra]  # fmt: skip


def test_tune_keeps_the_most_specialized_run_within_the_budget_and_reuses_it(stage_two, tmp_path):
    from transformers import AutoModelForCausalLM

    args = _tune(stage_two, tmp_path, "--max-degeneralization", "2", "--taus", "0.5,1", "--refine-rounds", "1")
    first = CliRunner().invoke(mft, args)
    assert first.exit_code == 0, first.output
    summary = json.loads((tmp_path / "tune.json").read_text())
    runs = [c["run"] for c in summary["candidates"]]
    assert runs[:2] == ["mft-tau0.5-lr0.001", "mft-tau1-lr0.001"] and len(runs) >= 3, "a refinement round ran"
    # The choice, recomputed from every candidate's metrics.jsonl: the lowest specialized perplexity within the budget.
    within = [(row["ppl_spec"], run, row) for run in runs for row in metric_rows(tmp_path / run, "eval") if 100 * row["DG"] <= 2]
    _, run, row = min(within, key=lambda w: w[0])
    chosen = summary["chosen"]
    assert (chosen["run"], chosen["step"], chosen["S"]) == (run, row["step"], row["S"]) and 100 * chosen["DG"] <= 2
    assert f"Chosen: {run}" in first.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    kept = load_file(tmp_path / run / "best" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, kept[name], rtol=0, atol=0)

    again = CliRunner().invoke(mft, args)
    assert again.exit_code == 0 and again.output.count("finished, skipped") == len(runs) and ": new" not in again.output
    assert json.loads((tmp_path / "tune.json").read_text()) == summary


def test_an_impossible_budget_answers_the_start(stage_two, tmp_path):
    result = CliRunner().invoke(mft, _tune(stage_two, tmp_path, "--max-degeneralization", "0", "--taus", "1", "--lrs", "1e-2"))
    assert result.exit_code == 0, result.output
    assert f"keep the start ({stage_two / 'teacher'})" in result.output and "Every candidate exceeded DG ≤ 0%" in result.output
    assert not (tmp_path / "best").exists()
    missing = CliRunner().invoke(mft, ["tune", "--cache", str(stage_two / "cache"), "--out", str(tmp_path / "x"), "--max-degeneralization", "1"])
    assert missing.exit_code == 2 and "needs --general-eval" in missing.output


def test_a_config_file_sets_the_search_and_every_candidate_s_training(tmp_path):
    import yaml

    from cli.options import build
    from mft_pipeline.config import TuneConfig
    from mft_pipeline.sweep.tune import Candidate, candidate_config

    f = tmp_path / "tune.yaml"
    f.write_text(yaml.safe_dump({"cache": "c", "out": "t", "max-degeneralization": 1.5, "lrs": "1e-5,1e-4", "steps": 4, "peft": "lora", "general-eval": "g.jsonl"}))
    with mft.commands["tune"].make_context("tune", ["--config", str(f), "--taus", "0.5"]) as ctx:
        params = dict(ctx.params)
    search = build(TuneConfig, params)
    assert (search.tau_list, search.lr_list, search.max_degeneralization, search.refine_rounds) == ([0.5], [1e-5, 1e-4], 1.5, 2)
    config = candidate_config(search, params, Candidate(0.5, 1e-5))
    assert (config.tau, config.lr, config.variant, config.max_degeneralization, config.steps, config.peft) == (0.5, 1e-5, "mft", 1.5, 4, "lora")
    assert Path(config.out) == Path("t", "mft-tau0.5-lora-r8-lr1e-05")
    # tau, lr and variant are the search's: not options of `mft tune`.
    f.write_text(yaml.safe_dump({"cache": "c", "out": "t", "max-degeneralization": 1.5, "lr": 1e-3}))
    refused = CliRunner().invoke(mft, ["tune", "--config", str(f)])
    assert refused.exit_code == 2 and "lr" in refused.output and "unknown key" in refused.output

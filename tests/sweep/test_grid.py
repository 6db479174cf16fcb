"""`mft sweep`: the grid, one folder per run, skipping finished runs and resuming killed ones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import metric_rows, stop_after_checkpoint
from mft_pipeline.sweep import grid as grid_module
from mft_pipeline.sweep.grid import SweepConfig, grid, run_sweep
from mft_pipeline.config import run_settings
from mft_pipeline.run_folder import RunFolder
from mft_pipeline.train import loop

from .conftest import base_settings

SWEEP_RUNS = {
    "ft", "mft-tau0.25", "mft-tau1",
    "ft-lora-r8", "mft-tau0.25-lora-r8", "mft-tau1-lora-r8",
    "ft-replay0.5", "mft-tau0.25-replay0.5", "mft-tau1-replay0.5",
    "ft-lora-r8-replay0.5", "mft-tau0.25-lora-r8-replay0.5", "mft-tau1-lora-r8-replay0.5",
}  # fmt: skip


def test_grid_runs_tau_free_objectives_once_and_checks_everything_first(stage_two, tmp_path):
    sweep = SweepConfig(cache="c", out=str(tmp_path), taus="0,0.1,0.25,0.5,1", variants="mft,ft,distill+ft,single-correction", peft="none,ia3")
    names = [f"{c.peft}:{Path(c.out).name}" for c in grid(sweep, base_settings(stage_two))]
    assert len(names) == 2 * (5 + 1 + 1 + 5) and "none:ft" in names and "ia3:distill-ft-ia3" in names
    assert "none:single-correction-tau0.1" in names and "ia3:mft-tau0.5-ia3" in names
    for bad, match in [(dict(taus="0.2,1.5"), "tau"), (dict(variants="mft,sft"), "variant"), (dict(peft="lora,prefix"), "peft")]:
        with pytest.raises(ValueError, match=match):
            SweepConfig(cache="c", out="o", **bad)
    with pytest.raises(ValueError, match="need --replay"):
        grid(SweepConfig(cache="c", out="o", replay_fractions="0,0.5"), base_settings(stage_two))
    with pytest.raises(ValueError, match="larger --batch-size"):
        # A replay share a batch of 4 cannot hold fails before the first run trains.
        run_sweep(SweepConfig(cache=str(stage_two / "cache"), out=str(tmp_path / "s"), replay_fractions="0,0.1"), base_settings(stage_two, replay=str(stage_two / "general-cache")))
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_sweep_gives_every_grid_point_its_own_finished_run(comparison):
    sweep = comparison / "sweep"
    runs = {p.name for p in sweep.iterdir() if p.is_dir()}
    assert runs == SWEEP_RUNS
    for name in runs:
        summary = json.loads((sweep / name / "summary.json").read_text())
        assert summary["uses_general_data"] == ("replay" in name)
        assert summary["adapter"] == ("lora" in name)
        assert summary["best"]["step"] == 3
    assert {"report.md", "report.csv", "tradeoff.png", "sweep.json"} <= {p.name for p in sweep.iterdir()}


def test_restarted_sweep_redoes_nothing(comparison, stage_two):
    calls = []
    sweep_dir = comparison / "sweep"
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")}
    log = []
    sweep = SweepConfig(cache=str(stage_two / "cache"), out=str(sweep_dir), taus="0.25,1", variants="ft,mft", peft="none,lora")
    run_sweep(sweep, base_settings(stage_two, replay=str(stage_two / "general-cache")), log=log.append, train=calls.append)
    assert calls == []
    assert sum("finished, skipped" in line for line in log) == 12
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")} == before


@pytest.mark.parametrize("suffix", ["", "-lora-r8", "-replay0.5"])
def test_mft_at_tau_one_reproduces_ft(comparison, suffix):
    sweep = comparison / "sweep"
    weights = "adapter_model.safetensors" if "lora" in suffix else "model.safetensors"
    ft, mft1 = load_file(sweep / f"ft{suffix}" / "last" / weights), load_file(sweep / f"mft-tau1{suffix}" / "last" / weights)
    for name in ft:
        torch.testing.assert_close(ft[name], mft1[name], rtol=1e-5, atol=1e-7)
    mft_quarter = load_file(sweep / f"mft-tau0.25{suffix}" / "last" / weights)
    assert any(not torch.allclose(ft[n], mft_quarter[n]) for n in ft)


def test_killed_sweep_resumes_the_half_finished_run_only(stage_two, tmp_path):
    sweep = SweepConfig(cache=str(stage_two / "cache"), out=str(tmp_path / "s"), taus="0.25", variants="ft,mft")
    base = base_settings(stage_two, steps=4, eval_every=2)

    def killing_mft(config):
        return loop.train(config, on_checkpoint=stop_after_checkpoint(2) if config.variant == "mft" else None)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, base, log=lambda line: None, train=killing_mft)

    calls = []
    run_sweep(sweep, base, log=lambda line: None, train=lambda config: calls.append(config) or loop.train(config))
    assert [(c.variant, c.resume) for c in calls] == [("mft", True)]
    assert [r["step"] for r in metric_rows(tmp_path / "s" / "mft-tau0.25", "train")] == [1, 2, 3, 4]

    with pytest.raises(ValueError, match="other settings"):
        run_sweep(sweep, base_settings(stage_two, steps=5, eval_every=2), log=lambda line: None)


def test_a_run_killed_before_its_first_checkpoint_starts_over(stage_two, tmp_path, monkeypatch):
    sweep = SweepConfig(cache=str(stage_two / "cache"), out=str(tmp_path / "s"), taus="0.25", variants="mft")
    run = tmp_path / "s" / "mft-tau0.25"
    run.mkdir(parents=True)
    config = grid(sweep, base_settings(stage_two))[0]
    RunFolder(run).start(run_settings(config), resume=False)
    assert grid_module.prepare(config) == "new" and not run.exists()

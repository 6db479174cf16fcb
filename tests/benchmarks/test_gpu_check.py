"""The GPU check: its rehearsal runs every part on CPU, a failed part costs none of the others, and
the fused loss's memory is what fused_loss_bytes predicts."""

import json
from dataclasses import replace

import pytest

from benchmarks.gpu_check import REHEARSAL, main, run


def test_rehearsal_measures_every_part(tmp_path):
    assert main(["--rehearse", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu-rehearsal.json").read_text())
    assert r["errors"] == {}
    assert set(r["parts"]) == {"stage_one/llama-tiny", "stage_two/llama-tiny", "chunks", "loader", "eval"}

    one, two = r["parts"]["stage_one/llama-tiny"], r["parts"]["stage_two/llama-tiny"]
    per_repeat = sorted(f / s for f, s in zip(one["timings"]["forward"]["runs_s"], one["timings"]["score"]["runs_s"]))
    assert per_repeat[0] <= one["score_vs_forward"] <= per_repeat[-1]
    assert set(two["speed"]["tokens_per_s"]) == {"offline", "ft", "online"} and two["speed"]["fused"] is True
    assert r["ratios"]["stage_one_score_vs_forward"] == one["score_vs_forward"]
    assert r["ratios"]["offline_vs_ft_speed"] == two["offline_vs_ft_speed"]
    assert r["ratios"]["loss_peak_memory_vs_ft_naive_128k"] is None  # the tiny model's vocabulary is not 128k
    assert r["ratios"]["loader_tokens_per_s"] == r["parts"]["loader"]["loader_tokens_per_s"]

    sweep = r["parts"]["chunks"]
    rows = {row["chunk"]: row for row in sweep["fused"]}
    assert sorted(rows) == [32, 512] and rows[32]["default"] and not rows[512]["default"]
    naive = sweep["ft_naive"]["growth"]
    # FT-naive holds three float32 (n, V) tensors at its peak (log-softmax, its incoming and outgoing gradient).
    assert naive == pytest.approx(3 * 1024 * 32000 * 4, rel=0.1)
    # Each chunk position costs three float32 rows of V: measured between two chunk sizes, as predicted.
    measured = rows[512]["growth"] - rows[32]["growth"]
    assert measured == pytest.approx(rows[512]["predicted"] - rows[32]["predicted"], rel=0.15)
    assert rows[32]["vs_ft_naive"] == rows[32]["growth"] / naive

    md = (tmp_path / "gpu-rehearsal.md").read_text()
    assert "| stage one (score) tokens/s vs the plain forward |" in md and "| 32 (default) |" in md and "NO (off by" in md
    # Each part in its own benchmark's section: stage one's timing rows, stage two's per model, reader, evaluation.
    assert "| `TransformersTeacher.score` k=20, brought to the host |" in md
    assert "## Stage two: llama-tiny (V = 640, H = 32)" in md and "| offline |" in md and "| online |" in md
    assert "## Reader alone" in md and "## Evaluation (llama-tiny" in md


def test_a_failed_part_is_recorded_and_the_next_one_runs(tmp_path):
    (tmp_path / "empty").mkdir()  # no model in it: stage one's part fails on load
    r = run(replace(REHEARSAL, models=((str(tmp_path / "empty"), 1, 1),)), tmp_path / "check", "cmd", only=("stage_one", "loader"))
    assert set(r["errors"]) == {"stage_one/empty"} and set(r["parts"]) == {"loader"}
    assert json.loads((tmp_path / "check.json").read_text())["errors"] == r["errors"]
    md = (tmp_path / "check.md").read_text()
    assert "**stage_one/empty failed:**" in md and "## Reader alone" in md


def test_speed_without_a_gpu_says_so_and_writes_nothing(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["speed", "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()

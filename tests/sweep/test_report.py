"""`mft report`: the Table-2 style markdown and CSV, and the trade-off plot, straight from the run folders."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from conftest import metric_rows
from mft_pipeline.sweep.report import GENERAL_DATA_HEADING, describe, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OWN_DATA_METHODS = {
    "FT", "MFT τ=0.25", "MFT τ=1", "LoRA r8", "LoRA r8 + MFT τ=0.25", "LoRA r8 + MFT τ=1",
    "distill+ft", "single-correction τ=0.25", "DoRA r8 + MFT τ=0.25", "IA3 + MFT τ=0.25", "MFT τ=0.25 (online)",
}  # fmt: skip
GENERAL_DATA_METHODS = {
    "Replay ν=0.5", "MFT τ=0.25 + Replay ν=0.5", "MFT τ=1 + Replay ν=0.5",
    "LoRA r8 + Replay ν=0.5", "LoRA r8 + MFT τ=0.25 + Replay ν=0.5", "LoRA r8 + MFT τ=1 + Replay ν=0.5",
}  # fmt: skip


@pytest.fixture(scope="module")
def report(comparison, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report([comparison / "sweep", comparison / "extra"], out)
    with open(out / "report.csv", newline="") as f:
        return out, list(csv.DictReader(f))


def test_every_method_and_composition_is_reported(report):
    out, rows = report
    assert {r["method"] for r in rows} == OWN_DATA_METHODS | GENERAL_DATA_METHODS
    assert {r["method"] for r in rows if r["uses_general_data"] == "True"} == GENERAL_DATA_METHODS
    text = (out / "report.md").read_text()
    for method in OWN_DATA_METHODS | GENERAL_DATA_METHODS:
        assert f"| {method} |" in text


def test_replay_is_fenced_off_as_using_general_data(report):
    text = (report[0] / "report.md").read_text()
    fence = text.index(GENERAL_DATA_HEADING)
    tables = text[: text.index("## Runs")]
    for method in GENERAL_DATA_METHODS:
        assert tables.index(f"| {method} |") > fence
    for method in OWN_DATA_METHODS:
        assert tables.index(f"| {method} |") < fence
    assert text.index("| FT |") < text.index("| MFT τ=0.25 |")  # the paper's order: FT first
    assert "S % | DG % | DG/S" in text


def test_reported_numbers_are_the_best_rows_of_metrics_jsonl(report):
    from pathlib import Path

    out, rows = report
    for row in rows:
        # Named relative to the report, never by an absolute path of this machine.
        assert not Path(row["run"]).is_absolute() and not row["run"].startswith("/")
        run = out / row["run"]
        evals = [r for r in metric_rows(run, "eval") if r["within_budget"]]
        best = min(evals, key=lambda r: r["ppl_spec"])
        assert float(row["S_pct"]) == 100 * best["S"]
        assert float(row["DG_pct"]) == 100 * best["DG"]
        assert float(row["DG_over_S"]) == best["DG_over_S"]
        assert int(row["step"]) == best["step"]
        assert float(row["ppl_spec_before"]) == metric_rows(run, "before")[0]["ppl_spec"]
        assert json.loads((run / "summary.json").read_text())["best"] == best
    md = (report[0] / "report.md").read_text()
    ft = next(r for r in rows if r["method"] == "FT")
    assert f"| FT | {float(ft['S_pct']):.2f} | {float(ft['DG_pct']):.2f} | {float(ft['DG_over_S']):.3f} |" in md


def test_tradeoff_plot_is_a_valid_png(report):
    import matplotlib.image

    path = report[0] / "tradeoff.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_unfinished_runs_are_left_out_and_named(comparison, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(comparison / "sweep" / "ft", runs / "ft")
    shutil.copytree(comparison / "sweep" / "mft-tau0.25", runs / "half")
    (runs / "half" / "summary.json").unlink()
    write_report([runs / "ft", runs / "half"], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| FT |" in text and "| MFT" not in text
    assert "unfinished" in text and "half" in text
    assert "unfinished" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no run folders"):
        write_report([tmp_path / "out"], tmp_path / "out2")


def test_labels_follow_the_paper():
    base = dict(variant="mft", tau=0.25, peft="none", peft_rank=8, replay=None, replay_fraction=None, online=False)
    assert describe(base)[:2] == ("MFT τ=0.25", "MFT")
    assert describe({**base, "variant": "ft", "tau": 1.0})[:2] == ("FT", "FT")
    assert describe({**base, "variant": "ft", "peft": "lora"})[:2] == ("LoRA r8", "LoRA r8")
    assert describe({**base, "peft": "dora", "peft_rank": 4})[:2] == ("DoRA r4 + MFT τ=0.25", "DoRA r4 + MFT")
    assert describe({**base, "variant": "ft", "replay": "g", "replay_fraction": 0.5})[:2] == ("Replay ν=0.5", "Replay")


def test_baselines_are_labelled_by_what_they_use():
    base = dict(variant="ft", tau=0.25, peft="none", peft_rank=8, replay=None, replay_fraction=None, online=False)
    assert describe({**base, "variant": "dft"})[:2] == ("DFT", "DFT")
    assert describe({**base, "variant": "talr", "peft": "lora"})[:2] == ("LoRA r8 + TALR", "LoRA r8 + TALR")
    assert describe({**base, "l2_init": 0.01})[:2] == ("L2-init λ=0.01", "L2-init")
    assert describe({**base, "ewc": "f.safetensors", "ewc_lambda": 100.0})[:2] == ("EWC λ=100", "EWC")
    assert describe({**base, "variant": "dft", "l2_init": 1.0})[:2] == ("DFT + L2-init λ=1", "DFT + L2-init")
    # Settings of older run folders, without the new keys, read as before.
    assert describe({**base, "variant": "mft"})[:2] == ("MFT τ=0.25", "MFT")


def test_the_report_reads_run_folders_without_importing_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = "import sys, mft_pipeline.sweep.report, mft_pipeline.run_folder; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_reports_tau_variants_are_the_corrections():
    from mft_pipeline.distill import correction
    from mft_pipeline.sweep import report

    assert report.TAU_VARIANTS == correction.TAU_VARIANTS

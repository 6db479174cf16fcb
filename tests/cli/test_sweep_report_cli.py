"""The `train`, `sweep` and `report` commands: flags reach the library, errors are one clear line."""

from __future__ import annotations

from click.testing import CliRunner

from cli.main import mft


def _common(d):
    return ["--cache", str(d / "cache"), "--steps", "2", "--eval-every", "2", "--lr", "0.002",
            "--general-eval", str(d / "general.jsonl"), "--general-max-sequences", "4"]  # fmt: skip


def test_sweep_then_report_on_its_own(stage_two, tmp_path):
    args = ["sweep", *_common(stage_two), "--out", str(tmp_path / "s"), "--taus", "0.25,1", "--variants", "ft,mft",
            "--peft", "none,ia3", "--replay", str(stage_two / "general-cache"), "--replay-fractions", "0,0.5"]  # fmt: skip
    first = CliRunner().invoke(mft, args)
    assert first.exit_code == 0, first.output
    assert first.output.count(": new") == 12 and "report.md" in first.output
    again = CliRunner().invoke(mft, args)
    assert again.exit_code == 0 and again.output.count("finished, skipped") == 12

    runs = [str(tmp_path / "s" / name) for name in ("ft", "mft-tau0.25-ia3", "ft-replay0.5")]
    report = CliRunner().invoke(mft, ["report", *runs, "--out", str(tmp_path / "r")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| FT |" in text and "| IA3 + MFT τ=0.25 |" in text and "| Replay ν=0.5 |" in text
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "report.csv", "tradeoff.png"}


def test_train_with_lora_merges_and_says_so(stage_two, tmp_path):
    result = CliRunner().invoke(mft, ["train", *_common(stage_two), "--out", str(tmp_path / "run"), "--peft", "lora", "--peft-rank", "4", "--merge-adapter"])
    assert result.exit_code == 0, result.output
    assert "adapter" in result.output and "best-merged" in result.output
    assert (tmp_path / "run" / "best-merged" / "model.safetensors").exists()


def test_bad_settings_are_one_line_errors(stage_two, tmp_path):
    cases = [
        (["sweep", *_common(stage_two), "--out", str(tmp_path / "a"), "--taus", "0.5,2"], "tau"),
        (["sweep", *_common(stage_two), "--out", str(tmp_path / "b"), "--peft", "lora,adapter"], "peft"),
        (["sweep", *_common(stage_two), "--out", str(tmp_path / "e"), "--taus", "0.1,abc"], "taus: 'abc' is not a number"),
        (["sweep", *_common(stage_two), "--out", str(tmp_path / "f"), "--replay", str(stage_two / "general-cache"), "--replay-fractions", "0,x"],
         "replay_fractions: 'x' is not a number"),
        (["train", *_common(stage_two), "--out", str(tmp_path / "c"), "--peft", "lora", "--peft-targets", "nope"], "no such Linear layer"),
        (["train", *_common(stage_two), "--out", str(tmp_path / "d"), "--replay-fraction", "0.5"], "needs --replay"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(mft, args)
        assert result.exit_code == 2 and message in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
    missing = CliRunner().invoke(mft, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "no run folders" in missing.output

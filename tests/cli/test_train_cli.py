"""`mft train`'s options reach the run, and bad values are one-line errors (exit 2), never tracebacks."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import mft


def test_gpu_options_reach_the_run(stage_two, tmp_path):
    args = ["train", "--cache", str(stage_two / "cache"), "--out", str(tmp_path / "run"), "--steps", "1", "--eval-every", "1",
            "--gradient-checkpointing", "--attn-implementation", "eager"]  # fmt: skip
    result = CliRunner().invoke(mft, args)
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "run" / "run-config.json").read_text())
    assert settings["gradient_checkpointing"] is True and settings["attn_implementation"] == "eager" and settings["compile"] is False
    bad = CliRunner().invoke(mft, ["train", "--cache", "c", "--out", str(tmp_path / "x"), "--attn-implementation", "flash"])
    assert bad.exit_code == 2 and "attn_implementation must be one of" in bad.output

"""`mft eval` scores a checkpoint with training's own evaluation: it reproduces what `mft train` recorded."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import mft
from conftest import train_config
from mft_pipeline.train.loop import train


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_eval_reproduces_the_best_checkpoint(stage_two, tmp_path, peft):
    run = tmp_path / "run"
    summary = train(train_config(stage_two, run, steps=4, eval_every=2, peft=peft, lr=2e-3 if peft == "none" else 2e-2))
    best, before = summary["best"], summary["before"]
    assert best["step"] > 0 and best["S"] != 0, "nothing to reproduce: the run did not move"
    args = ["eval", "--model", str(run / "best"), "--spec-eval", str(stage_two / "cache"),
            "--general-eval", str(stage_two / "general.jsonl"), "--max-sequences", "8", "--json"]  # fmt: skip
    result = CliRunner().invoke(mft, args)
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["base"] == str(stage_two / "teacher")  # found through the run folder
    for key in ("ppl_spec", "ppl_gen"):
        assert scored["before"][key] == pytest.approx(before[key], rel=1e-6)
        assert scored["after"][key] == pytest.approx(best[key], rel=1e-6)
    for key in ("S", "DG", "DG_over_S"):
        assert scored[key] == pytest.approx(best[key], rel=1e-5, abs=1e-9)
    assert scored["tokens"]["ppl_spec"] > 0 and scored["tokens"]["ppl_gen"] > 0


def test_eval_errors_are_one_line(stage_two, tmp_path):
    nothing = CliRunner().invoke(mft, ["eval", "--model", str(stage_two / "teacher")])
    assert nothing.exit_code == 2 and "nothing to evaluate" in nothing.output
    no_base = CliRunner().invoke(mft, ["eval", "--model", str(stage_two / "teacher"), "--general-eval", str(stage_two / "general.jsonl")])
    assert no_base.exit_code == 2 and "--base" in no_base.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = CliRunner().invoke(mft, ["eval", "--model", str(stage_two / "teacher"), "--base", str(stage_two / "teacher"), "--general-eval", str(empty)])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output


def test_plain_table(stage_two):
    teacher = str(stage_two / "teacher")
    result = CliRunner().invoke(mft, ["eval", "--model", teacher, "--base", teacher, "--spec-eval", str(stage_two / "cache")])
    assert result.exit_code == 0, result.output
    assert "S  = 0.00%" in result.output  # a model against itself


def test_eval_refuses_a_model_whose_tokenizer_is_not_the_caches(stage_two, tmp_path):
    """The cache's token ids mean other tokens to another tokenizer: its perplexity would be silently wrong."""
    from transformers import AutoModelForCausalLM

    from conftest import other_tokenizer

    other = tmp_path / "retokenized"
    AutoModelForCausalLM.from_pretrained(stage_two / "teacher").save_pretrained(other)
    other_tokenizer().save_pretrained(other)
    teacher = str(stage_two / "teacher")
    result = CliRunner().invoke(mft, ["eval", "--model", str(other), "--base", teacher, "--spec-eval", str(stage_two / "cache")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines() == [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "tokenizer differs" in result.output
    # The same model scored on a corpus is packed with its own tokenizer: nothing to refuse.
    corpus = CliRunner().invoke(mft, ["eval", "--model", str(other), "--base", str(other), "--general-eval", str(stage_two / "general.jsonl"), "--max-sequences", "2"])
    assert corpus.exit_code == 0, corpus.output

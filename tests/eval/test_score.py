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


def test_eval_scores_a_chat_corpus_on_its_answers_as_the_cache_does(tmp_path, tiny_model_dir, other_model_dir, tiny_tokenizer):
    """--chat-template renders a messages corpus as `mft cache-teacher` does; only the answers' tokens are scored."""
    import numpy as np

    from mft_pipeline.cache.reader import Cache
    from mft_pipeline.config import CacheConfig, EvalConfig
    from mft_pipeline.data.corpus import load_corpus
    from mft_pipeline.eval.score import eval_sets
    from mft_pipeline.stage_one import build_cache
    from test_stage_one_chat import TEMPLATE, answer_positions, chat_rows

    corpus, template, cache = tmp_path / "chat.jsonl", tmp_path / "template.jinja", tmp_path / "cache"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(30)))
    template.write_text(TEMPLATE)
    build_cache(CacheConfig(corpus=str(corpus), out=str(cache), model=str(tiny_model_dir), chat_template=str(template), seq_len=48, top_k=4, val_fraction=0.2))
    # The cache's validation records, in order, as a corpus of their own.
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps({"messages": list(r.completion)}) + "\n" for r in load_corpus(corpus, val_fraction=0.2).validation))

    def score(*args):
        result = CliRunner().invoke(mft, ["eval", "--model", str(other_model_dir), "--base", str(tiny_model_dir), "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    from_cache = score("--spec-eval", str(cache), "--chat-template", str(template))
    from_corpus = score("--spec-eval", str(validation), "--chat-template", str(template), "--seq-len", "48")
    split = Cache(cache).split("validation")
    assert from_cache["tokens"]["ppl_spec"] == from_corpus["tokens"]["ppl_spec"] == split.target_tokens < split.num_tokens.sum() - len(split)
    for when in ("before", "after"):
        assert from_corpus[when]["ppl_spec"] == pytest.approx(from_cache[when]["ppl_spec"], rel=1e-6)
    # Independent of the renderer: the scored positions are those whose next token is in an answer of the decoded row.
    seqs = eval_sets(EvalConfig(model=str(other_model_dir), spec_eval=str(validation), chat_template=str(template), seq_len=48), tiny_tokenizer)["ppl_spec"]
    expected = np.stack([answer_positions(tiny_tokenizer, row, n) for row, n in zip(seqs.input_ids, seqs.num_tokens)])
    assert expected.any() and np.array_equal(seqs.target, expected)

    # A chat cache is refused with another rendering than its own; the tiny tokenizer has no template to fall back on.
    for args in (["--spec-eval", str(cache)], ["--spec-eval", str(cache), "--chat-template", str(template), "--all-turns"], ["--spec-eval", str(validation)]):
        refused = CliRunner().invoke(mft, ["eval", "--model", str(other_model_dir), "--base", str(tiny_model_dir), *args])
        assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
        assert refused.output.startswith("error:") and len(refused.output.strip().splitlines()) == 1

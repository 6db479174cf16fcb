"""Stage two end to end on a tiny model: learning, resume, refusals, batching and the budget."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.main import mft
from conftest import metric_rows, train_config
from mft_pipeline.cache.reader import Cache
from mft_pipeline.train.loop import MismatchError, train


def test_specialized_loss_falls_and_checkpoint_loads(stage_two, tmp_path):
    summary = train(train_config(stage_two, tmp_path / "run", steps=12))
    before, best = summary["before"], summary["best"]
    assert best["ppl_spec"] < before["ppl_spec"] and best["S"] > 0.05
    # The student starts as the teacher: its before-perplexity is the cached teacher's.
    assert before["ppl_spec"] == pytest.approx(before["teacher_ppl_spec"], rel=1e-4)
    evals = metric_rows(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert best["ppl_spec"] == min(r["ppl_spec"] for r in evals)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best")
    AutoTokenizer.from_pretrained(tmp_path / "run" / "best")
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    from mft_pipeline.eval.metrics import model_perplexity

    val = Cache(stage_two / "cache").split("validation")
    assert model_perplexity(model, val.input_ids, val.num_tokens) == pytest.approx(best["ppl_spec"], rel=1e-4)


def test_mft_forgets_less_than_ft(stage_two, tmp_path):
    ft = train(train_config(stage_two, tmp_path / "ft", variant="ft", steps=12))["best"]
    mft_ = train(train_config(stage_two, tmp_path / "mft", variant="mft", tau=0.25, steps=12))["best"]
    assert ft["DG"] > 0, "finetuning on the special words must cost general perplexity here"
    assert mft_["DG"] < ft["DG"]
    assert ft["S"] > mft_["S"] > 0


def test_tau_one_is_plain_finetuning(stage_two, tmp_path):
    a = train(train_config(stage_two, tmp_path / "a", variant="ft", steps=3, eval_every=3))
    b = train(train_config(stage_two, tmp_path / "b", variant="mft", tau=1.0, steps=3, eval_every=3))
    assert [r["loss"] for r in metric_rows(tmp_path / "a", "train")] == pytest.approx([r["loss"] for r in metric_rows(tmp_path / "b", "train")], rel=1e-6)
    assert a["best"]["ppl_spec"] == pytest.approx(b["best"]["ppl_spec"], rel=1e-5)


def test_micro_batch_accumulation_matches_one_big_batch(stage_two, tmp_path):
    train(train_config(stage_two, tmp_path / "big", steps=2, batch_size=4, grad_accum=1, eval_every=2))
    train(train_config(stage_two, tmp_path / "small", steps=2, batch_size=1, grad_accum=4, eval_every=2))
    big = AutoModelForCausalLM.from_pretrained(tmp_path / "big" / "best").state_dict()
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small" / "best").state_dict()
    for name in big:
        torch.testing.assert_close(big[name], small[name], rtol=1e-4, atol=1e-6)


def test_resume_continues_the_same_trajectory(stage_two, tmp_path, kill_and_resume):
    import shutil

    from mft_pipeline.run_folder import TRAINER_STATE
    from mft_pipeline.train.checkpoint import CheckpointError, load_state, plain

    # Blocks of one row group: the order is block-shuffled, and the kill falls inside an epoch.
    kw = dict(steps=8, eval_every=2, schedule="cosine", warmup_steps=2, shuffle_groups=1)
    train(train_config(stage_two, tmp_path / "whole", **kw))
    killed = train_config(stage_two, tmp_path / "killed", **kw)
    kill_and_resume.kill(killed, at=4)
    state = load_state(tmp_path / "killed" / "last")
    n_rows = len(Cache(stage_two / "cache").split("train"))
    assert state["data"]["train"]["epoch"] == 16 // n_rows and state["data"]["train"]["row_in_epoch"] == 16 % n_rows > 0
    with pytest.raises(Exception, match="not empty"):
        train(killed)
    with pytest.raises(ValueError, match="same settings"):
        train(train_config(stage_two, tmp_path / "killed", **{**kw, "steps": 9}, resume=True))
    # A checkpoint whose order is not the one the seed gives now (as after the cache's rows changed) is refused.
    shutil.copytree(tmp_path / "killed", tmp_path / "moved")
    state["data"]["train"]["next_rows"] = state["data"]["train"]["next_rows"][::-1]
    torch.save(plain(state), tmp_path / "moved" / "last" / TRAINER_STATE)
    with pytest.raises(CheckpointError, match="training order"):
        train(train_config(stage_two, tmp_path / "moved", **kw, resume=True))
    train(train_config(stage_two, tmp_path / "killed", **kw, resume=True))

    whole, resumed = metric_rows(tmp_path / "whole", "train"), metric_rows(tmp_path / "killed", "train")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "last").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "last").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_refuses_a_student_of_another_teacher(stage_two, tmp_path, other_model_dir):
    with pytest.raises(MismatchError, match="allow-different-student"):
        train(train_config(stage_two, tmp_path / "r", student=str(other_model_dir)))
    assert not (tmp_path / "r").exists()
    summary = train(train_config(stage_two, tmp_path / "ok", student=str(other_model_dir), allow_different_student=True, steps=2, eval_every=2))
    assert summary["best"]["step"] == 2


def test_refuses_another_tokenizer_even_when_allowed(stage_two, tmp_path):
    from conftest import other_tokenizer

    other = tmp_path / "retok"
    tok = other_tokenizer()
    AutoModelForCausalLM.from_pretrained(stage_two / "teacher").save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(MismatchError, match="tokenizer"):
        train(train_config(stage_two, tmp_path / "r", student=str(other), allow_different_student=True))


def test_degeneralization_budget_stops_and_keeps_best_within(stage_two, tmp_path):
    from mft_pipeline.run_folder import best_row

    kw = dict(variant="ft", lr=5e-3, steps=12, eval_every=2)
    train(train_config(stage_two, tmp_path / "free", **kw))
    free = metric_rows(tmp_path / "free", "eval")
    dg = [100 * r["DG"] for r in free]
    # A budget the first evaluation keeps and a later one breaks, read off the same run without a budget.
    assert max(dg) > max(dg[0], 0), f"finetuning never degeneralized beyond its first evaluation: {dg}"
    budget = (max(dg[0], 0) + max(dg)) / 2
    stop = next(i for i, d in enumerate(dg) if d > budget)
    summary = train(train_config(stage_two, tmp_path / "run", **kw, max_degeneralization=budget))
    evals = metric_rows(tmp_path / "run", "eval")
    assert summary["stopped_early"] and [r["step"] for r in evals] == [r["step"] for r in free[: stop + 1]]
    assert [r["within_budget"] for r in evals] == [True] * stop + [False]
    assert summary["best"]["step"] == best_row(free[:stop])["step"] and 100 * summary["best"]["DG"] <= budget
    assert summary["best"]["ppl_spec"] == pytest.approx(best_row(free[:stop])["ppl_spec"], rel=1e-6)
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def test_nothing_within_the_degeneralization_budget_keeps_no_checkpoint(stage_two, tmp_path):
    summary = train(train_config(stage_two, tmp_path / "run", variant="ft", lr=5e-3, steps=12, eval_every=2, max_degeneralization=0.0))
    evals = metric_rows(tmp_path / "run", "eval")
    assert 100 * evals[0]["DG"] > 0.0, "the first evaluation must already be over a zero budget"
    # The run stops at its first evaluation, and no checkpoint is called best.
    assert summary["stopped_early"] and summary["best"] is None
    assert [(r["step"], r["within_budget"]) for r in evals] == [(2, False)]
    assert not (tmp_path / "run" / "best").exists()
    from cli.main import format_summary

    assert format_summary(summary).splitlines()[0] == "no checkpoint: no evaluation was within --max-degeneralization 0.0%"


def test_cli_train_prints_s_and_dg(stage_two, tmp_path):
    result = CliRunner().invoke(mft, ["train", "--cache", str(stage_two / "cache"), "--out", str(tmp_path / "cli"), "--steps", "2", "--eval-every", "2", "--general-eval", str(stage_two / "general.jsonl")])
    assert result.exit_code == 0, result.output
    assert "S  =" in result.output and "DG =" in result.output
    bad = CliRunner().invoke(mft, ["train", "--cache", str(stage_two / "cache"), "--out", str(tmp_path / "x"), "--tau", "1.5"])
    assert bad.exit_code == 2 and "tau" in bad.output
    missing = CliRunner().invoke(mft, ["train", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "not a finished cache" in missing.output


def test_run_records_curves_and_a_config_that_replays(stage_two, tmp_path):
    """TensorBoard gets the loop's scalars, and `--config RUN/run-config.yaml` rebuilds the same run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cli.options import build
    from mft_pipeline.config import TrainConfig

    config = train_config(stage_two, tmp_path / "run", steps=4, eval_every=2, report_to="tensorboard")
    train(config)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/ppl_spec", "eval/ppl_gen", "eval/S", "eval/DG"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in metric_rows(tmp_path / "run", "train")])
    assert [e.step for e in events.Scalars("eval/S")] == [2, 4]

    command = mft.commands["train"]
    with command.make_context("train", ["--config", str(tmp_path / "run" / "run-config.yaml")]) as ctx:
        assert build(TrainConfig, ctx.params) == config


@pytest.mark.parametrize(
    "variant, peft, expected",
    [("mft", "none", "mft, tau=0.25"), ("single-correction", "none", "single-correction, tau=0.25"),
     ("ft", "lora", "ft, lora"), ("distill+ft", "none", "distill+ft"), ("dft", "none", "dft"), ("talr", "none", "talr")],
)
def test_method_label_names_tau_only_where_the_variant_uses_it(variant, peft, expected, tmp_path):
    from mft_pipeline.config import TrainConfig
    from mft_pipeline.train.loop import describe_method

    # Progress bars and summary.json show this label; a tau on FT or LoRA would suggest a margin that was never applied.
    assert describe_method(TrainConfig(cache=str(tmp_path), out=str(tmp_path / "run"), variant=variant, peft=peft)) == expected

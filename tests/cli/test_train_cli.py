"""`mft train`'s options reach the run, and bad values are one-line errors (exit 2), never tracebacks."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from cli.main import mft


def test_gpu_options_reach_the_run(stage_two, tmp_path):
    args = ["train", "--cache", str(stage_two / "cache"), "--out", str(tmp_path / "run"), "--steps", "1", "--eval-every", "1",
            "--gradient-checkpointing", "--attn-implementation", "eager"]  # fmt: skip
    result = CliRunner().invoke(mft, args)
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load((tmp_path / "run" / "run-config.yaml").read_text())
    assert settings["gradient_checkpointing"] is True and settings["attn_implementation"] == "eager" and settings["compile"] is False
    bad = CliRunner().invoke(mft, ["train", "--cache", "c", "--out", str(tmp_path / "x"), "--attn-implementation", "flash"])
    assert bad.exit_code == 2 and "attn_implementation must be one of" in bad.output


def test_a_typo_in_general_eval_leaves_no_folder_and_the_corrected_rerun_trains(stage_two, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--cache", str(stage_two / "cache"), "--out", str(out), "--steps", "1", "--eval-every", "1", "--general-eval"]
    typo = CliRunner().invoke(mft, [*args, str(stage_two / "genreal.jsonl")])
    assert typo.exit_code == 2 and "Traceback" not in typo.output, typo.output
    assert [line for line in typo.output.splitlines() if line.startswith("error:")] == typo.output.strip().splitlines()[-1:]
    assert "genreal.jsonl" in typo.output
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    fixed = CliRunner().invoke(mft, [*args, str(stage_two / "general.jsonl")])
    assert fixed.exit_code == 0, fixed.output
    assert yaml.safe_load((out / "run-config.yaml").read_text())["general_eval"] == str(stage_two / "general.jsonl")


# Machine-found bad input: random values for every `mft train` option that takes one.

import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cli.options import build  # noqa: E402
from mft_pipeline.config import TrainConfig  # noqa: E402
from mft_pipeline.errors import MFTError  # noqa: E402

HINTS = typing.get_type_hints(TrainConfig)
VALUE_OPTIONS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("cache", "out") and HINTS[f.name] is not bool]
VALUES = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-0", "-1", "1", "nan", "-nan", "inf", "-inf", "1e400", "1e-400", "", " ", "abc", "1,2", "None", "true", "cuda:x", "2**64", str(2**64), "0x10"]),
    st.text(max_size=12),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _assert_sane(config: TrainConfig) -> None:
    """What every accepted config holds: numbers finite and not negative, so training cannot start on garbage."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value) and value >= 0, (f.name, value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(VALUE_OPTIONS), value=VALUES)
def test_any_option_value_is_a_valid_config_or_a_one_line_error_naming_it(tmp_path, name, value):
    missing = tmp_path / "no-such-cache"
    result = CliRunner().invoke(mft, ["train", "--cache", str(missing), "--out", str(tmp_path / "out"), f"{_flag(name)}={value}"])
    # Exit 2 and no exception but the exit: a refused value, or (when the value is fine) the missing cache.
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (name, value, result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    if "not a finished cache" in errors[0]:
        # Accepted: the same value must build a config every other check in training can rely on.
        params = {"cache": str(missing), "out": str(tmp_path / "out")}
        ctx = mft.commands["train"].make_context("train", ["--cache", params["cache"], "--out", params["out"], f"{_flag(name)}={value}"])
        _assert_sane(build(TrainConfig, ctx.params))
        assert not (tmp_path / "out").exists()
    else:
        assert _flag(name) in errors[0] or name in errors[0], (name, value, errors[0])


def test_config_errors_are_user_errors():
    import pytest

    with pytest.raises(MFTError):
        TrainConfig(cache="c", out="o", seed=-1)


def test_cache_teacher_with_tail_samples_then_train(stage_two, tmp_path):
    """`mft cache-teacher --tail-samples 3` makes a cache `mft train` uses, saying so in one line."""
    from mft_pipeline.cache.reader import Cache

    runner = CliRunner()
    cache = tmp_path / "sampled-cache"
    made = runner.invoke(mft, ["cache-teacher", "--corpus", str(stage_two / "special.jsonl"), "--out", str(cache), "--model", str(stage_two / "teacher"),
                               "--seq-len", "32", "--top-k", "4", "--tail-samples", "3", "--val-fraction", "0.2", "--device", "cpu"])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert Cache(cache).tail_samples == 3
    info = runner.invoke(mft, ["cache-info", str(cache)])
    assert info.exit_code == 0 and "tail_samples=3" in info.output
    run = runner.invoke(mft, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--steps", "2", "--eval-every", "2", "--batch-size", "2"])
    assert run.exit_code == 0, run.output
    assert [line for line in run.output.splitlines() if line.startswith("tail: 3 sampled ids per position")]
    # A cache without samples trains with the bucket and says nothing about samples.
    old = runner.invoke(mft, ["train", "--cache", str(stage_two / "cache"), "--out", str(tmp_path / "old"), "--steps", "1", "--eval-every", "1"])
    assert old.exit_code == 0, old.output
    assert "sampled ids" not in old.output

"""`--config FILE`: YAML/JSON option values under command-line flags, clear errors, and run configs that replay."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from cli.config_file import dump_run_config, load_config_file
from cli.main import mft
from cli.options import build
from mft_pipeline.config import CacheConfig, TrainConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.sweep.grid import SweepConfig


def parsed(command: str, args: list[str]) -> dict:
    """The parameters click hands the command's function, without running it."""
    cmd = mft.commands[command]
    with cmd.make_context(command, list(args)) as ctx:
        return dict(ctx.params)


def write(path, data):
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return str(path)


def test_yaml_keys_with_dashes_or_underscores(tmp_path):
    f = write(tmp_path / "run.yaml", {"cache": "c", "out": "o", "eval-every": 7, "grad_accum": 3, "peft": "lora", "merge-adapter": True, "max_degeneralization": 2, "general-eval": "g.jsonl"})
    config = build(TrainConfig, parsed("train", ["--config", f]))
    assert (config.cache, config.out, config.eval_every, config.grad_accum, config.peft, config.merge_adapter) == ("c", "o", 7, 3, "lora", True)
    assert config.max_degeneralization == 2.0 and isinstance(config.max_degeneralization, float)
    assert config.tau == TrainConfig.__dataclass_fields__["tau"].default


def test_json_file(tmp_path):
    f = write(tmp_path / "cache.json", {"corpus": "docs.jsonl", "out": "cache", "top-k": 50, "seq_len": 512, "max_train_sequences": None})
    config = build(CacheConfig, parsed("cache-teacher", ["--config", f]))
    assert (config.corpus, config.out, config.top_k, config.seq_len, config.max_train_sequences) == ("docs.jsonl", "cache", 50, 512, None)


def test_command_line_wins_even_when_it_gives_the_default(tmp_path):
    f = write(tmp_path / "run.yaml", {"cache": "c", "out": "o", "steps": 3, "tau": 0.5, "seed": 9})
    # --tau 0.25 is also the option's default: it must still beat the file's 0.5.
    config = build(TrainConfig, parsed("train", ["--steps", "7", "--config", f, "--tau", "0.25", "--out", "elsewhere"]))
    assert (config.steps, config.tau, config.out, config.seed, config.cache) == (7, 0.25, "elsewhere", 9, "c")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("cache: c\nout: o\nlr: 1e-5\n")  # YAML 1.1 reads 1e-5 as a string
    assert build(TrainConfig, parsed("train", ["--config", str(f)])).lr == 1e-5


def test_sweep_takes_a_config_for_grid_and_training_options(tmp_path):
    f = write(tmp_path / "sweep.yaml", {"cache": "c", "out": "s", "taus": 0.5, "variants": "mft,ft", "steps": 4, "lr": 1e-3})
    params = parsed("sweep", ["--config", f])
    sweep = build(SweepConfig, params)
    assert sweep.tau_list == [0.5] and sweep.variant_list == ["mft", "ft"]
    assert params["steps"] == 4 and params["lr"] == 1e-3


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"cache": "c", "out": "o", "eval_evry": 5}, "eval_evry", "did you mean 'eval-every'"),
        ({"cache": "c", "out": "o", "bogus": 1}, "bogus", "unknown key"),
        ({"cache": "c", "out": "o", "steps": "ten"}, "steps", "must be an integer"),
        ({"cache": "c", "out": "o", "steps": 2.5}, "steps", "must be an integer"),
        ({"cache": "c", "out": "o", "tau": "high"}, "tau", "must be a number"),
        ({"cache": "c", "out": "o", "resume": "yes"}, "resume", "true or false"),
        ({"cache": "c", "out": "o", "batch_size": None}, "batch_size", "cannot be empty"),
        ({"cache": "c", "out": "o", "student": ["a", "b"]}, "student", "must be a string"),
        ({"cache": "c", "out": "o", "steps": 2, "Steps": 3}, "Steps", "unknown key"),
        ({"cache": "c", "out": "o", "eval-every": 2, "eval_every": 3}, "eval_every", "given twice"),
    ],
)
def test_bad_keys_and_types_exit_2_naming_the_key(tmp_path, data, key, words):
    f = write(tmp_path / "bad.yaml", data)
    result = CliRunner().invoke(mft, ["train", "--config", f])
    assert result.exit_code == 2, result.output
    assert repr(key) in result.output and words in result.output
    assert "Traceback" not in result.output


def test_unreadable_and_non_mapping_files(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    broken = tmp_path / "broken.json"
    broken.write_text("{cache: ")
    for f, words in ((bad, "must map option names"), (broken, "not valid JSON")):
        result = CliRunner().invoke(mft, ["train", "--config", str(f)])
        assert result.exit_code == 2 and words in result.output
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml", mft.commands["train"])
    missing = CliRunner().invoke(mft, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_invalid_combination_in_the_file_is_a_usage_error(tmp_path):
    f = write(tmp_path / "run.yaml", {"cache": "c", "out": "o", "steps": 3, "epochs": 1})
    result = CliRunner().invoke(mft, ["train", "--config", f])
    assert result.exit_code == 2 and "not both" in result.output


def test_file_values_reach_the_command(tmp_path):
    """A full CLI run: the cache path from the file is what training then fails to open."""
    f = write(tmp_path / "run.yaml", {"cache": str(tmp_path / "no-such-cache"), "out": str(tmp_path / "run"), "steps": 1})
    result = CliRunner().invoke(mft, ["train", "--config", f])
    assert result.exit_code == 2 and "no-such-cache" in result.output


def test_dumped_train_config_replays_through_the_cli(tmp_path):
    config = TrainConfig(
        cache="data/cache",
        out="runs/a",
        student="some/model",
        tau=0.1,
        variant="single-correction",
        steps=12,
        batch_size=3,
        grad_accum=2,
        lr=3.5e-5,
        warmup_steps=2,
        schedule="cosine",
        seed=4,
        general_eval="general.jsonl",
        max_degeneralization=1.5,
        allow_different_student=True,
        peft="lora",
        peft_targets="q_proj,v_proj",
        merge_adapter=True,
        replay="general-cache",
        resume=True,
    )
    assert config.replay_fraction == 0.5  # filled in by the config itself
    path = dump_run_config(config, tmp_path / "run-config.yaml")
    assert path.read_text().startswith("#") and not (tmp_path / "run-config.yaml.tmp").exists()
    assert build(TrainConfig, parsed("train", ["--config", str(path)])) == config
    # A flag on top of the replayed file changes only that value.
    assert build(TrainConfig, parsed("train", ["--config", str(path), "--seed", "5"])) == TrainConfig(**{**config.__dict__, "seed": 5})


def test_dumped_cache_config_replays_through_the_cli(tmp_path):
    config = CacheConfig(corpus="c.jsonl", out="cache", tokenizer="tok", seq_len=128, top_k=8, val_fraction=0.1, max_val_sequences=3, backend="transformers", overwrite=True)
    path = dump_run_config(config, tmp_path / "cache-config.yaml")
    assert build(CacheConfig, parsed("cache-teacher", ["--config", str(path)])) == config


def test_other_click_types_convert_through_click(tmp_path):
    import click

    @click.command("demo")
    @click.option("--mode", type=click.Choice(["a", "b"]))
    def demo(mode):
        pass

    good = write(tmp_path / "good.yaml", {"mode": "b"})
    bad = write(tmp_path / "bad.yaml", {"mode": "c"})
    assert load_config_file(good, demo) == {"mode": "b"}
    with pytest.raises(ConfigError, match="'mode'"):
        load_config_file(bad, demo)

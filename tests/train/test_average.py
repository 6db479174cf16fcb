"""`mft average` (WiSE-FT): exact end points, the interpolation against float64, adapters merged first."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli.main import mft
from mft_pipeline.config import AverageConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.train.average import write_average


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_alpha_0_and_1_give_the_start_and_the_tuned_weights_bit_for_bit(tiny_model_dir, other_model_dir, tmp_path):
    start, tuned = weights(tiny_model_dir), weights(other_model_dir)
    for alpha, want in ((0.0, start), (1.0, tuned)):
        got = weights(write_average(AverageConfig(start=str(tiny_model_dir), tuned=str(other_model_dir), alpha=alpha, out=str(tmp_path / f"a{alpha}"))))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
    mid = weights(write_average(AverageConfig(start=str(tiny_model_dir), tuned=str(other_model_dir), alpha=0.3, out=str(tmp_path / "mid"))))
    for n in start:
        torch.testing.assert_close(mid[n].double(), 0.7 * start[n].double() + 0.3 * tuned[n].double(), rtol=0, atol=1e-6)
    assert (tmp_path / "mid" / "tokenizer.json").exists()
    with pytest.raises(ConfigError, match="not empty"):
        write_average(AverageConfig(start=str(tiny_model_dir), tuned=str(other_model_dir), alpha=0.5, out=str(tmp_path / "mid")))
    with pytest.raises(ConfigError, match="alpha"):
        AverageConfig(start="a", tuned="b", alpha=1.5, out="c")


def test_an_adapter_is_merged_into_the_start_first(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at 0; give the adapter a change to merge
    adapted.save_pretrained(tmp_path / "adapter")
    start = weights(tiny_model_dir)
    # Reference: W + B A * alpha / r on every q_proj, in float64.
    merged = {n: t.double() for n, t in start.items()}
    for name, module in adapted.get_base_model().named_modules():
        if name.endswith("q_proj"):
            delta = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double() * 2.0
            merged[f"{name}.weight"] = merged[f"{name}.weight"] + delta
    got = weights(write_average(AverageConfig(start=str(tiny_model_dir), tuned=str(tmp_path / "adapter"), alpha=0.5, out=str(tmp_path / "half"))))
    assert any(not torch.equal(got[n], start[n]) for n in start)
    for n in start:
        torch.testing.assert_close(got[n].double(), 0.5 * start[n].double() + 0.5 * merged[n], rtol=0, atol=1e-6)


def test_average_command_writes_the_folder(tiny_model_dir, other_model_dir, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(mft, ["average", "--start", str(tiny_model_dir), "--tuned", str(other_model_dir), "--alpha", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    start = weights(tiny_model_dir)
    assert all(torch.equal(weights(out)[n], start[n]) for n in start)

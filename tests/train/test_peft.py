"""LoRA, DoRA and IA3 in the one training loop: adapters train, save, load, merge and resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, metric_rows, train_config
from mft_pipeline.cache.reader import Cache
from mft_pipeline.eval.metrics import model_perplexity
from mft_pipeline.train.loop import train
from mft_pipeline.train.peft import projection_names


def test_default_targets_are_every_attention_and_mlp_projection():
    names = projection_names(make_model(50))
    assert names == {
        "q_proj": False, "k_proj": False, "v_proj": False, "o_proj": False,
        "gate_proj": True, "up_proj": True, "down_proj": True,
    }  # fmt: skip


def _val_ppl(model, d):
    val = Cache(d / "cache").split("validation")
    return model_perplexity(model, val.input_ids, val.num_tokens)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_trains_saves_loads_and_merges(stage_two, tmp_path, method):
    from peft import AutoPeftModelForCausalLM

    lr = 2e-2 if method == "ia3" else 2e-3  # IA3 has far fewer, multiplicative parameters
    run = tmp_path / method
    summary = train(train_config(stage_two, run, steps=4, eval_every=4, peft=method, lr=lr, merge_adapter=True))
    best = summary["best"]
    assert summary["adapter"] and best["S"] > 0
    files = {p.name for p in (run / "best").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    adapter_config = json.loads((run / "best" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(projection_names(make_model(50)))
    if method != "ia3":
        assert adapter_config["r"] == 8 and adapter_config["use_dora"] == (method == "dora")

    adapted = AutoPeftModelForCausalLM.from_pretrained(run / "best")
    assert _val_ppl(adapted, stage_two) == pytest.approx(best["ppl_spec"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(run / "best-merged")
    assert _val_ppl(merged, stage_two) == pytest.approx(best["ppl_spec"], rel=1e-4)
    assert summary["merged"] == str(run / "best-merged")


def test_lora_rank_and_targets_are_configurable(stage_two, tmp_path):
    run = tmp_path / "run"
    train(train_config(stage_two, run, steps=1, eval_every=1, peft="lora", peft_rank=2, peft_targets="q_proj,v_proj"))
    adapter_config = json.loads((run / "best" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 2 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="no such Linear layer"):
        train(train_config(stage_two, tmp_path / "bad", peft="lora", peft_targets="qkv"))
    with pytest.raises(ValueError, match="need --peft"):
        train_config(stage_two, tmp_path / "bad", merge_adapter=True)


def test_adapter_run_resumes_on_the_same_trajectory(stage_two, tmp_path, kill_and_resume):
    kw = dict(steps=4, eval_every=2, peft="lora")
    train(train_config(stage_two, tmp_path / "whole", **kw))
    kill_and_resume(train_config(stage_two, tmp_path / "killed", **kw), at=2)
    whole, resumed = metric_rows(tmp_path / "whole", "train"), metric_rows(tmp_path / "killed", "train")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], rel=1e-5)


def test_tau_one_reproduces_ft_under_lora(stage_two, tmp_path):
    from safetensors.torch import load_file

    train(train_config(stage_two, tmp_path / "ft", steps=2, eval_every=2, peft="lora", variant="ft"))
    train(train_config(stage_two, tmp_path / "mft", steps=2, eval_every=2, peft="lora", variant="mft", tau=1.0))
    a = load_file(tmp_path / "ft" / "last" / "adapter_model.safetensors")
    b = load_file(tmp_path / "mft" / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)

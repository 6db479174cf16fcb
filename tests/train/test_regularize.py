"""L2 to the start and EWC: the penalty and its gradient against float64 references, and in the training loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, metric_rows, train_config
from mft_pipeline.config import FisherConfig, TrainConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.train import peft as adapters
from mft_pipeline.train.fisher import write_fisher
from mft_pipeline.train.loop import train
from mft_pipeline.train.regularize import FisherError, load_fisher, make_regularizer, penalty

LAM = 0.7


def config(**kw) -> TrainConfig:
    return TrainConfig(cache="unused", out="unused", **kw)


def moved(model, seed):
    """Move every trained tensor by a random step, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_penalty_is_half_lambda_times_weighted_squares():
    gen = torch.Generator().manual_seed(0)
    d = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    f = [torch.rand(3, 4, generator=gen, dtype=torch.float64), torch.rand(5, generator=gen, dtype=torch.float64)]
    plain = sum(float(x) ** 2 for t in d for x in t.reshape(-1))
    weighted = sum(float(w) * float(x) ** 2 for t, ft in zip(d, f) for x, w in zip(t.reshape(-1), ft.reshape(-1)))
    assert float(penalty(d, LAM)) == pytest.approx(LAM / 2 * plain)
    assert float(penalty(d, LAM, f)) == pytest.approx(LAM / 2 * weighted)


def test_l2_init_gradient_is_lambda_times_the_distance_to_the_start():
    model = make_model(40, seed=1)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    reg = make_regularizer(model, config(l2_init=LAM))
    moved(model, seed=2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # the data loss's gradient, already there
    value = reg.add_gradient()
    want = sum(float(((p.detach().double() - start[n]) ** 2).sum()) for n, p in model.named_parameters()) * LAM / 2
    assert value == pytest.approx(want, rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), 1 + LAM * (p.detach().double() - start[n]), rtol=1e-6, atol=1e-7)


def test_ewc_gradient_weighs_each_weight_by_its_fisher():
    model = make_model(40, seed=3)
    gen = torch.Generator().manual_seed(4)
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    reg = make_regularizer(model, config(ewc="f.safetensors", ewc_lambda=LAM), fisher)
    moved(model, seed=5)
    reg.add_gradient()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), LAM * fisher[n].double() * (p.detach().double() - start[n]), rtol=1e-6, atol=1e-8)


def test_ewc_with_lora_weighs_the_change_b_a_of_each_adapted_weight():
    base = make_model(40, seed=6)
    gen = torch.Generator().manual_seed(7)
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in base.named_parameters()}
    cfg = config(peft="lora", peft_rank=4, peft_alpha=8.0, peft_targets="q_proj,down_proj", ewc="f.safetensors", ewc_lambda=LAM)
    model = adapters.wrap(base, cfg)
    reg = make_regularizer(model, cfg, fisher)
    assert reg.add_gradient() == 0.0  # B = 0 at the start: no change, no penalty
    moved(model, seed=8)
    for p in model.parameters():
        p.grad = None
    value = reg.add_gradient()
    # Reference: the change of each adapted weight written out, B A * alpha / r, in float64.
    leaves, total = {}, 0.0
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().double().requires_grad_(True)
            b = module.lora_B["default"].weight.detach().double().requires_grad_(True)
            term = LAM / 2 * (fisher[f"{name}.weight"].double() * (b @ a * (8.0 / 4)) ** 2).sum()
            ga, gb = torch.autograd.grad(term, (a, b))
            leaves[name] = (module, ga, gb)
            total += float(term.detach())
    assert len(leaves) == 4  # q_proj and down_proj of 2 layers
    assert value == pytest.approx(total, rel=1e-5)
    for module, ga, gb in leaves.values():
        torch.testing.assert_close(module.lora_A["default"].weight.grad.double(), ga, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(module.lora_B["default"].weight.grad.double(), gb, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_regularizer_options_are_checked():
    with pytest.raises(ConfigError, match="go together"):
        config(ewc="f.safetensors")
    with pytest.raises(ConfigError, match="not both"):
        config(ewc="f.safetensors", ewc_lambda=1.0, l2_init=1.0)
    with pytest.raises(ConfigError, match="lora"):
        config(ewc="f.safetensors", ewc_lambda=1.0, peft="ia3")
    with pytest.raises(ConfigError, match=">= 0"):
        config(l2_init=-1.0)
    with pytest.raises(ConfigError, match="no teacher"):
        config(variant="dft", online=True)


def distance_to_start(run, d):
    tuned = AutoModelForCausalLM.from_pretrained(run / "last").state_dict()
    start = AutoModelForCausalLM.from_pretrained(d / "teacher").state_dict()
    return sum(float((tuned[n] - start[n]).square().sum()) for n in start) ** 0.5


def test_l2_init_in_training_zero_changes_nothing_and_a_large_lambda_holds_the_start(stage_two, tmp_path):
    train(train_config(stage_two, tmp_path / "ft", variant="ft", steps=2, eval_every=2))
    train(train_config(stage_two, tmp_path / "zero", variant="ft", steps=2, eval_every=2, l2_init=0.0))
    summary = train(train_config(stage_two, tmp_path / "strong", variant="ft", steps=2, eval_every=2, l2_init=1e4))
    ft = AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "last").state_dict()
    zero = AutoModelForCausalLM.from_pretrained(tmp_path / "zero" / "last").state_dict()
    assert all(torch.equal(ft[n], zero[n]) for n in ft)
    assert distance_to_start(tmp_path / "strong", stage_two) < 0.5 * distance_to_start(tmp_path / "ft", stage_two)
    assert summary["method"] == "ft, l2-init 10000" and not summary["uses_general_data"]
    assert all("penalty" in row for row in metric_rows(tmp_path / "strong", "train"))


def test_ewc_from_a_fisher_file_trains_and_is_labelled_as_using_general_data(stage_two, tmp_path):
    fisher = tmp_path / "fisher.safetensors"
    meta = write_fisher(FisherConfig(model=str(stage_two / "teacher"), corpus=str(stage_two / "general.jsonl"), out=str(fisher), seq_len=32, max_tokens=200))
    assert meta["estimator"] == "per-sequence" and int(meta["tokens"]) >= 200
    cfg = train_config(stage_two, tmp_path / "ewc", variant="talr", steps=2, eval_every=2, peft="lora", ewc=str(fisher), ewc_lambda=10.0)
    summary = train(cfg)
    assert summary["uses_general_data"] and metric_rows(tmp_path / "ewc", "before")[0]["uses_general_data"]
    assert summary["method"] == "talr, lora, ewc 10"
    rows = metric_rows(tmp_path / "ewc", "train")
    assert rows[0]["penalty"] == 0.0 and rows[1]["penalty"] > 0.0  # LoRA's B starts at 0


def test_a_resumed_run_keeps_theta0_at_the_start(stage_two, tmp_path, kill_and_resume):
    cfg = train_config(stage_two, tmp_path / "straight", variant="dft", steps=4, eval_every=2, l2_init=30.0)
    train(cfg)
    kill_and_resume(dataclasses.replace(cfg, out=str(tmp_path / "resumed")), at=2)
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "last").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "last").state_dict()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-7)
    penalties = [r["penalty"] for r in metric_rows(tmp_path / "resumed", "train")]
    assert penalties == pytest.approx([r["penalty"] for r in metric_rows(tmp_path / "straight", "train")], rel=1e-4)


def test_a_fisher_of_other_weights_is_refused(stage_two, other_model_dir, tmp_path):
    fisher = tmp_path / "other.safetensors"
    write_fisher(FisherConfig(model=str(other_model_dir), corpus=str(stage_two / "general.jsonl"), out=str(fisher), seq_len=32, max_tokens=40))
    with pytest.raises(FisherError, match="other weights"):
        train(train_config(stage_two, tmp_path / "run", ewc=str(fisher), ewc_lambda=1.0))
    with pytest.raises(FisherError, match="not a Fisher file|cannot read"):
        load_fisher(str(stage_two / "teacher" / "model.safetensors"), make_model(40))

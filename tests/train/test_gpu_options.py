"""The GPU training options, checked on CPU: --gradient-checkpointing, --attn-implementation, --compile."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from conftest import metric_rows, train_config
from mft_pipeline.errors import ConfigError
from mft_pipeline.train import distributed
from mft_pipeline.train.loop import micro_batch_loss, setup, train

CPU = distributed.Ranks("none", 0, 1, torch.device("cpu"))


def _loss_and_grads(run):
    """One micro-batch's summed loss, every trainable parameter's gradient, and how many tensors
    the forward pass kept for the backward (counted by a saved-tensors hook), in training mode."""
    run.model.train()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
        loss, n = micro_batch_loss(run.model, [run.train_split.batch(run.order[:4], "cpu")], run.config, run.teacher)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in run.model.named_parameters() if p.requires_grad}, len(kept)


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients(stage_two, tmp_path):
    plain = setup(train_config(stage_two, tmp_path / "plain"), CPU)
    checkpointed = setup(train_config(stage_two, tmp_path / "ckpt", gradient_checkpointing=True), CPU)
    loss_a, grads_a, kept_a = _loss_and_grads(plain)
    loss_b, grads_b, kept_b = _loss_and_grads(checkpointed)
    # Each layer keeps only its input; the backward pass recomputes the rest.
    assert kept_b < kept_a / 2
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_composes_with_an_adapter(stage_two, tmp_path):
    plain = setup(train_config(stage_two, tmp_path / "plain", peft="lora"), CPU)
    checkpointed = setup(train_config(stage_two, tmp_path / "ckpt", peft="lora", gradient_checkpointing=True), CPU)
    loss_a, grads_a, kept_a = _loss_and_grads(plain)
    loss_b, grads_b, kept_b = _loss_and_grads(checkpointed)
    assert kept_b < kept_a / 2
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_eager_and_sdpa_attention_give_the_same_loss(stage_two, tmp_path):
    runs = {impl: setup(train_config(stage_two, tmp_path / impl, attn_implementation=impl), CPU) for impl in ("eager", "sdpa")}
    for impl, run in runs.items():
        assert run.hf_model.config._attn_implementation == impl
    (loss_e, grads_e, _), (loss_s, grads_s, _) = _loss_and_grads(runs["eager"]), _loss_and_grads(runs["sdpa"])
    torch.testing.assert_close(loss_s, loss_e, rtol=1e-5, atol=0)
    # The kernels sum in other orders: compare each gradient as a whole, relative to its size.
    for name in grads_e:
        assert float((grads_s[name] - grads_e[name]).norm()) <= 1e-4 * float(grads_e[name].norm()), name


def test_the_online_teacher_gets_the_same_attention(stage_two, tmp_path):
    run = setup(train_config(stage_two, tmp_path / "online", online=True, attn_implementation="eager"), CPU)
    assert run.teacher.config._attn_implementation == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_a_clear_config_error(stage_two, tmp_path):
    with pytest.raises(ConfigError, match="flash-attn package"):
        train_config(stage_two, tmp_path / "r", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="attn_implementation must be one of"):
        train_config(stage_two, tmp_path / "r", attn_implementation="flash")


@pytest.mark.parametrize("backend", [
    # Dynamo's tracing and AOTAutograd's backward graph, without generating code: seconds.
    "aot_eager",
    # The default backend, with C++ code generated and built by the C compiler: minutes on a 2-core CPU.
    pytest.param("inductor", marks=pytest.mark.slow),
])  # fmt: skip
def test_compiled_training_matches_eager(stage_two, tmp_path, backend):
    from torch._dynamo.utils import counters

    from mft_pipeline.train.loop import compile_in_place

    called = []
    eager = train(train_config(stage_two, tmp_path / "eager", steps=2, eval_every=2), compile_model=called.append)
    assert called == []  # without --compile nothing is compiled
    torch._dynamo.reset()
    counters.clear()
    config = train_config(stage_two, tmp_path / "compiled", steps=2, eval_every=2, compile=True)
    compiled = train(config, compile_model=lambda model: compile_in_place(model, backend=backend))
    # Graphs were really captured and compiled: the body the fused loss trains through (forward and
    # backward) and the whole model that evaluation calls.
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert counters["aot_autograd"]["total"] >= 2, dict(counters["aot_autograd"])
    assert yaml.safe_load((tmp_path / "compiled" / "run-config.yaml").read_text())["compile"]
    losses = [r["loss"] for r in metric_rows(tmp_path / "compiled", "train")]
    assert losses == pytest.approx([r["loss"] for r in metric_rows(tmp_path / "eager", "train")], rel=1e-4)
    for key in ("ppl_spec", "ppl_gen"):
        assert compiled["before"][key] == pytest.approx(eager["before"][key], rel=1e-4)
        assert compiled["best"][key] == pytest.approx(eager["best"][key], rel=1e-4)
    torch._dynamo.reset()


def test_memory_and_speed_options_may_change_on_resume(stage_two, tmp_path, kill_and_resume):
    import dataclasses

    config = train_config(stage_two, tmp_path / "run", steps=4, eval_every=2)
    kill_and_resume.kill(config, at=2)
    train(dataclasses.replace(config, resume=True, gradient_checkpointing=True, compile=True), compile_model=lambda model: None)
    assert [r["step"] for r in metric_rows(tmp_path / "run", "train")] == [1, 2, 3, 4]


def test_compile_in_place_also_compiles_the_body_the_fused_loss_calls(tiny_model_dir):
    from mft_pipeline.models import load_model
    from mft_pipeline.train.loop import compile_in_place
    from mft_pipeline.train.student_loss import output_head

    model = load_model(str(tiny_model_dir), torch.device("cpu"), dtype=torch.float32)
    compile_in_place(model)  # torch.compile is lazy: nothing is compiled until the first call
    assert model._compiled_call_impl is not None
    assert output_head(model).body._compiled_call_impl is not None

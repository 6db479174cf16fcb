"""The student's loss: the fused hidden-state path equals the logits path on tiny real models."""

from __future__ import annotations

import pytest
import torch

from mft_pipeline.distill import IGNORE_INDEX
from mft_pipeline.train.student_loss import Head, head_or_reason, output_head, student_loss

VOCAB, HIDDEN, SEQ = 61, 32, 9
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=2 * HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=1.5, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


def cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.3))


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=4.0))


MODELS = {
    "llama-untied": lambda: llama(tied=False),
    "llama-tied": lambda: llama(tied=True),
    "gemma2-softcap": gemma2,
    "cohere-logit-scale": cohere,
    "granite-logits-scaling": granite,
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name]()
    with torch.no_grad():  # a sharper head, so the soft-cap and both correction branches matter
        model.get_output_embeddings().weight.mul_(8)
    return model.train()


def batch_part(rows: int, k: int, seed: int, teacher_model=None) -> dict[str, torch.Tensor]:
    """A part laid out as ``CachedSplit.batch`` gives it: targets padded by one ignored position."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    teacher = (torch.randn(rows, SEQ, VOCAB, generator=gen) * 3).log_softmax(-1)
    labels = torch.cat([input_ids[:, 1:], torch.full((rows, 1), IGNORE_INDEX)], dim=1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    label_logprobs = teacher.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return dict(input_ids=input_ids, labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, label_logprobs=label_logprobs)


def loss_and_grads(model, parts, fused: bool, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, n_tokens = student_loss(model, parts, tau=0.25, fused=fused, **kwargs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), n_tokens, grads


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_logits_path(name):
    # float64, so the tolerance can be tight: the two paths sum in different orders, and in float32 that alone
    # moved single gradient entries by 2e-4 relative when transformers changed Gemma 2's kernels (5.25).
    model = build(name).double()
    head = output_head(model)
    assert isinstance(head, Head), head_or_reason(model)
    # Each transform is found where the model has it, so the comparison covers it.
    assert (head.softcap is not None) == (name == "gemma2-softcap")
    assert (head.logit_scale is not None) == (name in ("cohere-logit-scale", "granite-logits-scaling"))
    if name == "granite-logits-scaling":
        assert head.logit_scale == pytest.approx(0.25)
    # Two parts with different top-k sizes, as specialized rows then replay rows.
    parts = [batch_part(2, k=5, seed=1), batch_part(1, k=3, seed=2)]
    fused_loss, fused_n, fused_grads = loss_and_grads(model, parts, fused=True)
    plain_loss, plain_n, plain_grads = loss_and_grads(model, parts, fused=False)
    assert fused_n == plain_n == 3 * (SEQ - 1)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-10, atol=1e-10)
    assert fused_grads.keys() == plain_grads.keys()
    assert len(fused_grads) == len(list(model.parameters()))
    for key in plain_grads:
        torch.testing.assert_close(fused_grads[key], plain_grads[key], rtol=1e-8, atol=1e-10, msg=key)


@pytest.mark.parametrize("tail", ("bucket", "renormalize"))
@pytest.mark.parametrize("variant", ("ft", "single-correction"))
def test_variants_and_tails_reach_the_loss(variant, tail):
    model = build("llama-untied", seed=3)
    parts = [batch_part(2, k=4, seed=4)]
    fused_loss, _, _ = loss_and_grads(model, parts, fused=True, variant=variant, tail=tail, chunk_size=5)
    plain_loss, _, _ = loss_and_grads(model, parts, fused=False, variant=variant, tail=tail)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ("dft", "talr"))
@pytest.mark.parametrize("name", ("llama-tied", "gemma2-softcap", "granite-logits-scaling"))
def test_label_only_objectives_fused_equal_logits_path_and_ignore_the_teacher(name, variant):
    model = build(name, seed=14)
    parts = [batch_part(2, k=5, seed=15), batch_part(1, k=3, seed=16)]
    fused_loss, fused_n, fused_grads = loss_and_grads(model, parts, fused=True, variant=variant, chunk_size=4)
    plain_loss, plain_n, plain_grads = loss_and_grads(model, parts, fused=False, variant=variant)
    assert fused_n == plain_n == 3 * (SEQ - 1)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert len(fused_grads) == len(list(model.parameters()))
    for key in plain_grads:
        # TALR's weights reach ~n on easy tokens, so its gradients are tens: float32 rounding is ~1e-5 absolute.
        torch.testing.assert_close(fused_grads[key], plain_grads[key], rtol=1e-4, atol=5e-5, msg=key)
    # Another teacher's columns, garbage included, change nothing: only input_ids and labels are read.
    garbage = [dict(part, topk_ids=part["topk_ids"] * 0 - 5, topk_logprobs=torch.rand_like(part["topk_logprobs"]), label_logprobs=part["label_logprobs"] * float("nan")) for part in parts]
    again, _, _ = loss_and_grads(model, garbage, fused=True, variant=variant, chunk_size=4)
    assert torch.equal(again, fused_loss)


def test_tail_samples_of_a_part_reach_both_loss_paths():
    """A part from a cache with tail samples uses them, the other part keeps the bucket, on both paths."""
    from mft_pipeline.distill import sparse_mft_loss

    model = build("llama-untied", seed=5)
    sampled, plain = batch_part(2, k=4, seed=6), batch_part(1, k=3, seed=7)
    sampled["tail_ids"] = torch.randint(0, VOCAB, (2, SEQ, 3), generator=torch.Generator().manual_seed(8))
    fused_loss, _, fused_grads = loss_and_grads(model, [sampled, plain], fused=True)
    plain_loss, _, plain_grads = loss_and_grads(model, [sampled, plain], fused=False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for key in plain_grads:
        torch.testing.assert_close(fused_grads[key], plain_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([sampled["input_ids"], plain["input_ids"]])).logits
        targets = lambda part: [part[k] for k in ("labels", "topk_ids", "topk_logprobs", "label_logprobs")]  # noqa: E731
        want = sparse_mft_loss(logits[:2], *targets(sampled), 0.25, tail_ids=sampled["tail_ids"])[0] + sparse_mft_loss(logits[2:], *targets(plain), 0.25)[0]
        bucket = sparse_mft_loss(logits[:2], *targets(sampled), 0.25)[0] + sparse_mft_loss(logits[2:], *targets(plain), 0.25)[0]
    torch.testing.assert_close(plain_loss, want, rtol=1e-6, atol=1e-6)
    assert abs(plain_loss - bucket) > 1e-3


def test_lora_on_the_body_is_fused_lora_on_the_head_is_not(capsys):
    from peft import LoraConfig, get_peft_model

    body_only = get_peft_model(build("llama-untied", seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert output_head(body_only) is not None
    parts = [batch_part(2, k=4, seed=6)]
    fused_loss, _, fused_grads = loss_and_grads(body_only, parts, fused=True)
    plain_loss, _, plain_grads = loss_and_grads(body_only, parts, fused=False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads and fused_grads.keys() == plain_grads.keys()
    for key in plain_grads:
        torch.testing.assert_close(fused_grads[key], plain_grads[key], rtol=1e-4, atol=1e-6, msg=key)

    with_head = get_peft_model(build("llama-untied", seed=5), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert output_head(with_head) is None
    assert "not a plain nn.Linear" in head_or_reason(with_head)
    capsys.readouterr()
    student_loss(with_head, parts, tau=0.25)
    student_loss(with_head, parts, tau=0.25)
    err = capsys.readouterr().err
    assert err.count("full logits path") == 1 and "LoRA" in err


def test_unknown_logits_transform_falls_back():
    """A model class that changes its logits after the head in a way we do not know is caught by the probe."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Shifted(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(7)
    model = Shifted(LlamaConfig(**SMALL))
    assert output_head(model) is None
    assert "unknown transform" in head_or_reason(model)
    # The fallback still trains on the model's real logits.
    parts = [batch_part(1, k=4, seed=8)]
    loss, n_tokens = student_loss(model, parts, tau=0.25)
    assert n_tokens == SEQ - 1 and torch.isfinite(loss)


def test_plain_modules_are_refused():
    assert output_head(torch.nn.Linear(4, 4)) is None
    assert "not a Hugging Face model" in head_or_reason(torch.nn.Linear(4, 4))


def test_probe_leaves_training_mode_and_gradients_alone():
    model = build("llama-untied", seed=9)
    assert output_head(model) is not None
    assert model.training and all(p.grad is None for p in model.parameters())


def test_bf16_autocast_on_cpu_runs_and_stays_close():
    model = build("gemma2-softcap", seed=10)
    parts = [batch_part(2, k=4, seed=11)]
    plain_loss, _, _ = loss_and_grads(model, parts, fused=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = student_loss(model, parts, tau=0.25)
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss.item() == pytest.approx(plain_loss.item(), rel=3e-2)


DDP_SCRIPT = """
import json, os, sys, torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, os.path.join(os.getcwd(), "tests", "train"))
from test_student_loss import batch_part, build, loss_and_grads
from mft_pipeline.train.student_loss import head_or_reason

dist.init_process_group("gloo", rank=0, world_size=1)
parts = [batch_part(2, k=4, seed=12)]
plain_loss, _, plain_grads = loss_and_grads(build("llama-tied", seed=13), parts, fused=False)
wrapped = DistributedDataParallel(build("llama-tied", seed=13))
reason = head_or_reason(wrapped)
fused_loss, _, grads = loss_and_grads(wrapped, parts, fused=True)
worst = max((grads["module." + k] - g).abs().max().item() for k, g in plain_grads.items())
from torch.distributed.fsdp import fully_shard
sharded = build("llama-tied", seed=13)
fully_shard(sharded)
print(json.dumps({"reason": None if not isinstance(reason, str) else reason, "loss_gap": abs(fused_loss - plain_loss).item(),
                  "grad_gap": worst, "fsdp": head_or_reason(sharded)}))
dist.destroy_process_group()
"""


def test_ddp_is_fused_through_the_wrapper_and_fsdp_falls_back(tmp_path):
    """In a 1-process gloo group: DDP's forward runs (so its gradient hooks would), FSDP's sharded head is refused."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import socket

    with socket.socket() as s:  # a free port: other test runs may share this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DDP_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["reason"] is None
    assert found["loss_gap"] < 1e-4 and found["grad_gap"] < 1e-5
    assert "FSDP" in found["fsdp"]

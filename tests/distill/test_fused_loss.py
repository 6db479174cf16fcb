"""The fused hidden-state loss: the same loss as ``sparse_mft_loss`` without ever building B × T × V.

Checked two ways: against ``sparse_mft_loss`` on the very logits the head would produce
(same targets, same semantics, gradients flowing to hidden states, weight and bias), and
against a float64 reference written out from the spec that shares no code with the library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mft_pipeline import IGNORE_INDEX, VARIANTS, fused_sparse_mft_loss, sparse_mft_loss

from mft_reference import bucketed_ce

B, T, H, V, K = 2, 7, 12, 29, 5
ROOT = Path(__file__).resolve().parents[2]


def make_case(seed, *, vocab=V, k=K, dtype=torch.float64, with_bias=True, ignored=((0, 3), (1, 6))):
    """Hidden states, head weight and bias (leaves), and a cache made from a sharp random teacher.

    Labels alternate between the teacher's argmax (right branch) and a random token; the
    ``ignored`` positions carry the ignore label and garbage cache entries.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = torch.randn(vocab, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True) if with_bias else None
    teacher = (torch.randn(B, T, vocab, generator=gen, dtype=torch.float64) * 2.5).log_softmax(-1)
    right = (torch.arange(T) % 2 == 0).expand(B, T)
    labels = torch.where(right, teacher.argmax(-1), torch.randint(0, vocab, (B, T), generator=gen))
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    label_logprobs = teacher.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    for b, t in ignored:
        labels[b, t] = IGNORE_INDEX
        topk_ids[b, t] = -7  # garbage: must not be gathered
        label_logprobs[b, t] = float("nan")
    cache = (labels, topk_ids, topk_logprobs.float(), label_logprobs.float())
    return hidden, weight, bias, teacher, cache


def head_logits(hidden, weight, bias, logit_scale=None, softcap=None):
    """The logits a model's output head would give, whole, for the unfused comparison."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def grads(loss, tensors):
    return [g for g in torch.autograd.grad(loss, [t for t in tensors if t is not None])]


def reference_loss(hidden, weight, bias, teacher, cache, tau, variant, tail, logit_scale=None, softcap=None):
    """Float64, position by position, from the spec: corrected target on S = topk ∪ {l} plus the tail bucket."""
    labels, topk_ids, _, _ = cache
    z = hidden.detach().double() @ weight.detach().double().T
    if bias is not None:
        z = z + bias.detach().double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return float(bucketed_ce(z, teacher, labels, topk_ids, tau, variant, tail))


@pytest.mark.parametrize("tail", ("bucket", "renormalize"))
@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_sparse_loss_on_the_head_logits(variant, tail):
    hidden, weight, bias, _, cache = make_case(seed=1)
    tensors = (hidden, weight, bias)
    want, want_n = sparse_mft_loss(head_logits(*tensors), *cache, 0.25, variant=variant, tail=tail)
    got, got_n = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, variant=variant, tail=tail, bias=bias)
    assert got_n == want_n == B * T - 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, tensors), grads(want, tensors)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", (1, 3, 4, 1000, None))
def test_chunking_does_not_change_loss_or_gradients(chunk_size):
    """12 counted positions in chunks of 1, of 3, of 4 (an odd count: 3 chunks), one chunk, the default."""
    hidden, weight, bias, _, cache = make_case(seed=2)
    tensors = (hidden, weight, bias)
    want, _ = sparse_mft_loss(head_logits(*tensors), *cache, 0.4)
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.4, chunk_size=chunk_size, bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, tensors), grads(want, tensors)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_odd_chunk_count_with_a_short_last_chunk():
    """12 counted positions in chunks of 5: three chunks, the last one of 2."""
    hidden, weight, _, _, cache = make_case(seed=3, with_bias=False)
    want, _ = sparse_mft_loss(head_logits(hidden, weight, None), *cache, 0.25)
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, (hidden, weight)), grads(want, (hidden, weight))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", ("bucket", "renormalize"))
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_float64_reference(variant, tail):
    hidden, weight, bias, teacher, cache = make_case(seed=4)
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, variant=variant, tail=tail, bias=bias, chunk_size=3)
    want = reference_loss(hidden, weight, bias, teacher, cache, 0.25, variant, tail)
    # The cache holds float32 log-probs, the reference float64 teacher probabilities.
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(("logit_scale", "softcap"), ((0.25, None), (None, 2.0), (3.0, 1.5)))
def test_scale_and_softcap_match_reference_and_logits_path(logit_scale, softcap):
    hidden, weight, bias, teacher, cache = make_case(seed=5)
    tensors = (hidden, weight, bias)
    transform = dict(logit_scale=logit_scale, softcap=softcap)
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, chunk_size=4, **transform)
    assert got.item() == pytest.approx(reference_loss(hidden, weight, bias, teacher, cache, 0.25, "mft", "bucket", **transform), rel=1e-6)
    want, _ = sparse_mft_loss(head_logits(*tensors, **transform), *cache, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, tensors), grads(want, tensors)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # The transform really changes the loss, so the two checks above could fail.
    plain, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias)
    assert abs(plain.item() - got.item()) > 1e-3


def test_tau_one_is_cross_entropy_of_the_head():
    hidden, weight, bias, _, cache = make_case(seed=6)
    labels = cache[0]
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 1.0, bias=bias, chunk_size=2)
    z = head_logits(hidden.detach(), weight.detach(), bias.detach())
    want = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


def test_all_ignored_is_zero_with_zero_gradients():
    ignored = [(b, t) for b in range(B) for t in range(T)]
    hidden, weight, bias, _, cache = make_case(seed=7, ignored=ignored)
    loss, n_tokens = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, chunk_size=1)
    assert n_tokens == 0 and loss.item() == 0.0
    loss.backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and not t.grad.any()


def test_ignored_positions_get_zero_gradient():
    hidden, weight, bias, _, cache = make_case(seed=8)
    loss, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    assert not grad_hidden[0, 3].any() and not grad_hidden[1, 6].any()
    assert grad_hidden[0, 2].abs().sum() > 0


def test_no_grad_gives_the_same_value():
    hidden, weight, bias, _, cache = make_case(seed=9)
    with_grad, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, chunk_size=5)
    with torch.no_grad():
        without, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, chunk_size=5)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_only_hidden_trainable():
    """A frozen head (LoRA on the body): only the hidden states get a gradient."""
    hidden, weight, _, _, cache = make_case(seed=10, with_bias=False)
    frozen = weight.detach()
    got, _ = fused_sparse_mft_loss(hidden, frozen, *cache, 0.25)
    want, _ = sparse_mft_loss(head_logits(hidden, frozen, None), *cache, 0.25)
    torch.testing.assert_close(*grads(got, (hidden,)), *grads(want, (hidden,)), rtol=1e-10, atol=1e-12)


def test_bf16_runs_on_cpu_and_stays_close():
    hidden, weight, bias, teacher, cache = make_case(seed=11, dtype=torch.bfloat16)
    loss, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, chunk_size=4)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad.float()).all() for t in (hidden, weight, bias))
    want = reference_loss(hidden, weight, bias, teacher, cache, 0.25, "mft", "bucket")
    assert loss.item() == pytest.approx(want, rel=2e-2)


def test_autocast_keeps_float32_master_gradients():
    hidden, weight, bias, teacher, cache = make_case(seed=12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    want = reference_loss(hidden, weight, bias, teacher, cache, 0.25, "mft", "bucket")
    assert loss.item() == pytest.approx(want, rel=2e-2)


def test_micro_batches_sum_to_the_whole():
    hidden, weight, bias, _, cache = make_case(seed=13)
    whole, n_whole = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias)
    parts = [fused_sparse_mft_loss(hidden[i : i + 1], weight, *(c[i : i + 1] for c in cache), 0.25, bias=bias) for i in range(B)]
    torch.testing.assert_close(sum(p[0] for p in parts), whole, rtol=1e-12, atol=1e-12)
    assert sum(p[1] for p in parts) == n_whole


def test_rejects_bad_arguments():
    hidden, weight, bias, _, cache = make_case(seed=14)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_sparse_mft_loss(hidden, weight, *cache, 0.25, chunk_size=0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_sparse_mft_loss(hidden, weight[:, :-1], *cache, 0.25)
    with pytest.raises(ValueError, match="bias"):
        fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias[:-1])
    with pytest.raises(ValueError, match="softcap"):
        fused_sparse_mft_loss(hidden, weight, *cache, 0.25, softcap=0.0)
    with pytest.raises(ValueError, match="tail"):
        fused_sparse_mft_loss(hidden, weight, *cache, 0.25, tail="drop")
    labels, ids, lp, llp = cache
    bad = ids.clone()
    bad[0, 0, 1] = V
    with pytest.raises(ValueError, match=r"in \[0, 29\)"):
        fused_sparse_mft_loss(hidden, weight, labels, bad, lp, llp, 0.25)
    with pytest.raises(ValueError, match="topk_logprobs"):
        fused_sparse_mft_loss(hidden, weight, labels, ids, lp[..., :-1], llp, 0.25)


PEAK_SCRIPT = """
import json, sys, torch
from mft_pipeline import IGNORE_INDEX, fused_sparse_mft_loss, sparse_mft_loss

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

batch, seq, width, vocab, k = 2, 1024, 32, 65536, 8
torch.manual_seed(0)
hidden = torch.randn(batch, seq, width, requires_grad=True)
weight = (torch.randn(vocab, width) * 0.05).requires_grad_(True)
labels = torch.randint(0, vocab, (batch, seq))
labels[:, -64:] = IGNORE_INDEX
topk_ids = torch.randint(0, vocab, (batch, seq, k))
topk_logprobs = -torch.rand(batch, seq, k).sort(-1).values * 5 - 1
label_logprobs = -torch.rand(batch, seq) * 8 - 1
before = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
loss, n = fused_sparse_mft_loss(hidden, weight, labels, topk_ids, topk_logprobs, label_logprobs, 0.25)
loss.backward()
print(json.dumps({"growth": rss("VmHWM") - before, "btv4": batch * seq * vocab * 4, "grad_weight": vocab * width * 4}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS high-water mark")
def test_peak_memory_stays_far_below_the_full_logits():
    """In a fresh process: loss + backward at 2 × 1024 × 65,536 (512 MiB of float32 logits) grows RSS by a fraction of that."""
    # Large blocks straight from mmap, so freed chunks leave RSS and the peak counts live memory,
    # not glibc's heap fragmentation.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    # The weight gradient (8 MiB) must exist; everything else the loss holds is a few chunks
    # (the logits path's peak is about 3 × btv4: logits, their log-softmax, their gradient).
    assert measured["growth"] < measured["btv4"] / 4, measured


def test_second_backward_is_refused_not_silently_wrong():
    hidden, weight, bias, _, cache = make_case(seed=15)
    loss, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_upstream_gradient_scales_the_result():
    hidden, weight, bias, _, cache = make_case(seed=16)
    tensors = (hidden, weight, bias)
    got, n = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias)
    want, _ = sparse_mft_loss(head_logits(*tensors), *cache, 0.25)
    for g, w in zip(grads(got / n * 3.0, tensors), grads(want / n * 3.0, tensors)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", ("bucket", "renormalize"))
def test_full_vocabulary_top_k(tail):
    """k = V: the tail is empty and must not be used, whatever rounding leaves in c_tail."""
    hidden, weight, bias, teacher, cache = make_case(seed=17, k=V)
    tensors = (hidden, weight, bias)
    got, _ = fused_sparse_mft_loss(hidden, weight, *cache, 0.25, bias=bias, tail=tail, chunk_size=3)
    want, _ = sparse_mft_loss(head_logits(*tensors), *cache, 0.25, tail=tail)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, tensors), grads(want, tensors)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got.item() == pytest.approx(reference_loss(hidden, weight, bias, teacher, cache, 0.25, "mft", tail), rel=1e-6)

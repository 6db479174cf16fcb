"""The sparse MFT loss of spec section 3, checked against dense float64 references.

The references below loop over positions and build the full-vocabulary target from the
teacher's dense distribution with the spec's formulas; they share no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mft_pipeline.distill import IGNORE_INDEX, VARIANTS, sparse_mft_loss

from mft_reference import bucketed_ce, dense_mft_ce

B, T, V = 2, 5, 13


def make_case(seed, vocab=V, batch=B, seq=T, dtype=torch.float64):
    """Random student logits (leaf, requires grad), teacher log-probs and labels.

    Labels alternate between the teacher's argmax (right branch) and a random token.
    """
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64).to(dtype)
    student.requires_grad_(True)
    teacher_logits = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 2.5
    teacher_logprobs = teacher_logits.log_softmax(-1)
    random_labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    right = (torch.arange(seq) % 2 == 0).expand(batch, seq)
    labels = torch.where(right, teacher_logprobs.argmax(-1), random_labels)
    return student, teacher_logprobs, labels


def cache_for(teacher_logprobs, labels, k):
    """What stage one would cache: top-k ids and log-probs, and the label's log-prob."""
    topk_logprobs, topk_ids = teacher_logprobs.topk(k, dim=-1)
    label_logprobs = teacher_logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return topk_ids, topk_logprobs, label_logprobs


def loss_and_grad(loss_fn, student):
    student.grad = None
    loss = loss_fn(student)
    loss.backward()
    return loss.detach(), student.grad.clone()


def sparse_loss_fn(teacher_logprobs, labels, k, tau, **kwargs):
    topk_ids, topk_logprobs, label_logprobs = cache_for(teacher_logprobs, labels, k)
    cache = (topk_ids, topk_logprobs, label_logprobs)
    return lambda z: sparse_mft_loss(z, labels, *cache, tau, **kwargs)[0]


def cross_entropy_fn(labels):
    def loss_fn(z):
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum")

    return loss_fn


# 1. k = V: the sparse loss is the dense MFT cross-entropy.


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", (0.0, 0.25, 0.8))
def test_full_vocab_equals_dense_mft(variant, tau):
    student, teacher, labels = make_case(seed=1)
    got, got_grad = loss_and_grad(sparse_loss_fn(teacher, labels, V, tau, variant=variant), student)
    want, want_grad = loss_and_grad(
        lambda z: dense_mft_ce(z, teacher, labels, tau, variant), student
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-9)
    assert torch.isfinite(got_grad).all()


def test_return_types():
    student, teacher, labels = make_case(seed=2)
    loss, n_tokens = sparse_mft_loss(student, labels, *cache_for(teacher, labels, 4), 0.25)
    assert loss.shape == () and loss.dtype == torch.float64 and loss.requires_grad
    assert n_tokens.shape == () and n_tokens.dtype == torch.int64 and n_tokens.item() == B * T


# 2. tau = 1 (and variant "ft"): exactly F.cross_entropy, whatever k.


@pytest.mark.parametrize("k", (1, 3, V))
@pytest.mark.parametrize("tau, variant", [(1.0, "mft"), (0.0, "ft"), (0.3, "ft")])
def test_plain_finetuning_is_cross_entropy(k, tau, variant):
    student, teacher, labels = make_case(seed=3)
    got, got_grad = loss_and_grad(sparse_loss_fn(teacher, labels, k, tau, variant=variant), student)
    want, want_grad = loss_and_grad(cross_entropy_fn(labels), student)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


# 3. The tail bucket.


@pytest.mark.parametrize("k", (1, 3, 7))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", (0.0, 0.25))
def test_bucket_matches_reference(k, variant, tau):
    student, teacher, labels = make_case(seed=4)
    topk_ids = teacher.topk(k, dim=-1).indices
    got, got_grad = loss_and_grad(sparse_loss_fn(teacher, labels, k, tau, variant=variant), student)
    want, want_grad = loss_and_grad(
        lambda z: bucketed_ce(z, teacher, labels, topk_ids, tau, variant), student
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", (1, 4))
def test_renormalize_matches_its_reference(k):
    student, teacher, labels = make_case(seed=5)
    topk_ids = teacher.topk(k, dim=-1).indices
    loss_fn = sparse_loss_fn(teacher, labels, k, 0.25, tail="renormalize")
    got, got_grad = loss_and_grad(loss_fn, student)
    want, want_grad = loss_and_grad(
        lambda z: bucketed_ce(z, teacher, labels, topk_ids, 0.25, tail="renormalize"), student
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-9)


def test_bucket_is_default():
    student, teacher, labels = make_case(seed=6)
    cache = cache_for(teacher, labels, 3)
    default, _ = sparse_mft_loss(student, labels, *cache, 0.25)
    bucket, _ = sparse_mft_loss(student, labels, *cache, 0.25, tail="bucket")
    renormalized, _ = sparse_mft_loss(student, labels, *cache, 0.25, tail="renormalize")
    assert torch.equal(default, bucket)
    assert not torch.allclose(default, renormalized)


def test_renormalize_is_over_confident_bucket_is_not():
    # Student == teacher, label == teacher argmax, tau = 0: the corrected target is the
    # teacher itself, so an unbiased loss has zero gradient. For a loss whose weights sum
    # to 1, the gradient w.r.t. logit i in S is q_i - target_i, which recovers the target
    # that the loss implicitly puts on S.
    _, teacher, _ = make_case(seed=7)
    labels = teacher.argmax(-1)
    k = 3
    topk_ids = teacher.topk(k, dim=-1).indices
    support = torch.zeros_like(teacher, dtype=torch.bool).scatter(-1, topk_ids, True)
    teacher_mass_on_s = (teacher.exp() * support).sum(-1)
    assert (teacher_mass_on_s < 0.999).all()

    implied_mass = {}
    for tail in ("bucket", "renormalize"):
        student = teacher.clone().requires_grad_(True)
        _, grad = loss_and_grad(sparse_loss_fn(teacher, labels, k, 0.0, tail=tail), student)
        implied_mass[tail] = ((student.detach().softmax(-1) - grad) * support).sum(-1)
        if tail == "bucket":
            torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)

    torch.testing.assert_close(implied_mass["bucket"], teacher_mass_on_s, rtol=0, atol=1e-12)
    ones = torch.ones_like(teacher_mass_on_s)
    torch.testing.assert_close(implied_mass["renormalize"], ones, rtol=0, atol=1e-12)


def test_label_outside_topk():
    student, teacher, _ = make_case(seed=8)
    labels = teacher.argmin(-1)  # the least likely token: never in a top-3
    k = 3
    topk_ids = teacher.topk(k, dim=-1).indices
    assert not (topk_ids == labels.unsqueeze(-1)).any()
    for variant in VARIANTS:
        loss_fn = sparse_loss_fn(teacher, labels, k, 0.25, variant=variant)
        got, got_grad = loss_and_grad(loss_fn, student)
        want, want_grad = loss_and_grad(
            lambda z: bucketed_ce(z, teacher, labels, topk_ids, 0.25, variant), student
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-9)


def test_label_inside_topk_counted_once():
    student, teacher, _ = make_case(seed=9)
    k = 4
    topk_ids = teacher.topk(k, dim=-1).indices
    labels = topk_ids[..., 2]  # in the top-k, not the argmax
    got, got_grad = loss_and_grad(sparse_loss_fn(teacher, labels, k, 0.25), student)
    want, want_grad = loss_and_grad(
        lambda z: bucketed_ce(z, teacher, labels, topk_ids, 0.25), student
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-9)


def test_certain_teacher_has_no_nan():
    # A one-hot teacher: p_l == 1 (a = 1 by definition) and -inf log-probs in the cache.
    student, _, _ = make_case(seed=10)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    teacher = torch.full((B, T, V), -math.inf, dtype=torch.float64)
    teacher.scatter_(-1, labels.unsqueeze(-1), 0.0)
    for k in (1, 3, V):
        got, got_grad = loss_and_grad(sparse_loss_fn(teacher, labels, k, 0.25), student)
        want, want_grad = loss_and_grad(cross_entropy_fn(labels), student)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


# 4. Ignored positions.


def test_ignored_positions_contribute_nothing_even_with_garbage_cache():
    student, teacher, labels = make_case(seed=11)
    topk_ids, topk_logprobs, label_logprobs = cache_for(teacher, labels, 3)
    ignored = torch.zeros(B, T, dtype=torch.bool)
    ignored[0, 1] = ignored[1, 3] = ignored[1, 4] = True
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    topk_ids = topk_ids.masked_fill(ignored.unsqueeze(-1), 10**6)
    topk_ids[0, 1, 0] = -7
    topk_logprobs = topk_logprobs.masked_fill(ignored.unsqueeze(-1), math.nan)
    label_logprobs = label_logprobs.masked_fill(ignored, math.inf)

    loss, n_tokens = sparse_mft_loss(student, labels, topk_ids, topk_logprobs, label_logprobs, 0.25)
    loss.backward()
    assert n_tokens.item() == B * T - 3
    reference_ids = teacher.topk(3, dim=-1).indices
    want, want_grad = loss_and_grad(
        lambda z: bucketed_ce(z, teacher, labels, reference_ids, 0.25),
        student.detach().clone().requires_grad_(True),
    )
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=1e-9)
    torch.testing.assert_close(student.grad, want_grad, rtol=0, atol=1e-9)
    assert torch.equal(student.grad[ignored], torch.zeros_like(student.grad[ignored]))


def test_all_ignored_batch_is_zero_not_nan():
    student, teacher, labels = make_case(seed=12)
    topk_ids, topk_logprobs, label_logprobs = cache_for(teacher, labels, 3)
    labels = torch.full_like(labels, IGNORE_INDEX)
    garbage = (topk_ids.zero_(), topk_logprobs.zero_(), label_logprobs)
    loss, n_tokens = sparse_mft_loss(student, labels, *garbage, 0.25)
    loss.backward()
    assert loss.item() == 0.0 and n_tokens.item() == 0
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


def test_empty_batch():
    student = torch.zeros(2, 0, V, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(2, 0, dtype=torch.int64)
    loss, n_tokens = sparse_mft_loss(
        student, empty, torch.zeros(2, 0, 3, dtype=torch.int64),
        torch.zeros(2, 0, 3), torch.zeros(2, 0), 0.25,
    )
    loss.backward()
    assert loss.item() == 0.0 and n_tokens.item() == 0


def test_custom_ignore_index():
    student, teacher, labels = make_case(seed=13)
    cache = cache_for(teacher, labels, 3)
    labels_minus1 = labels.clone()
    labels_minus1[0, 0] = -1
    labels_default = labels.clone()
    labels_default[0, 0] = IGNORE_INDEX
    got, n = sparse_mft_loss(student, labels_minus1, *cache, 0.25, ignore_index=-1)
    want, n_want = sparse_mft_loss(student, labels_default, *cache, 0.25)
    assert torch.equal(got, want) and n.item() == n_want.item() == B * T - 1


# 5. Chunking and micro-batch accumulation.


def test_chunk_size_does_not_change_loss_or_gradient():
    student, teacher, labels = make_case(seed=14)
    labels[1, 2] = IGNORE_INDEX
    results = [
        loss_and_grad(sparse_loss_fn(teacher, labels, 4, 0.25, chunk_size=chunk), student)
        for chunk in (1, 3, 10**6)
    ]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-12)


def test_no_grad_gives_same_value():
    student, teacher, labels = make_case(seed=15)
    cache = cache_for(teacher, labels, 4)
    with_grad, _ = sparse_mft_loss(student, labels, *cache, 0.25, chunk_size=3)
    with torch.no_grad():
        without_grad, _ = sparse_mft_loss(student, labels, *cache, 0.25, chunk_size=3)
    assert not without_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), without_grad, rtol=0, atol=1e-12)


def test_vocab_sized_intermediates_are_not_kept_for_backward():
    # Tensors autograd keeps for backward pass through these hooks. Views of the inputs
    # cost no memory; anything else would be a per-chunk intermediate that checkpointing
    # should have dropped (without it, each chunk keeps several (chunk, V) tensors).
    student, teacher, labels = make_case(seed=16, batch=4, seq=8, vocab=50)
    cache = cache_for(teacher, labels, 5)
    inputs = {t.untyped_storage().data_ptr() for t in (student, labels, *cache)}
    new_elements = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            new_elements.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = sparse_mft_loss(student, labels, *cache, 0.25, chunk_size=4)
    assert sum(new_elements) < 50
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_micro_batch_accumulation_equals_one_big_batch():
    student, teacher, labels = make_case(seed=17, batch=8, seq=6)
    # Different token counts per row: averaging per micro-batch would get this wrong.
    for row in range(8):
        labels[row, : row % 4] = IGNORE_INDEX
    cache = cache_for(teacher, labels, 3)

    student.grad = None
    loss, n_tokens = sparse_mft_loss(student, labels, *cache, 0.25)
    (loss / n_tokens).backward()
    big_loss, big_grad = (loss / n_tokens).detach(), student.grad.clone()

    student.grad = None
    loss_total, n_total = 0.0, 0
    for row in range(8):
        rows = slice(row, row + 1)
        micro = [t[rows] for t in cache]
        loss, n_tokens = sparse_mft_loss(student[rows], labels[rows], *micro, 0.25)
        loss_total, n_total = loss_total + loss, n_total + n_tokens
    (loss_total / n_total).backward()

    torch.testing.assert_close((loss_total / n_total).detach(), big_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(student.grad, big_grad, rtol=0, atol=1e-12)


# Validation.


def test_rejects_bad_arguments():
    student, teacher, labels = make_case(seed=18)
    ids, logprobs, label_logprobs = cache_for(teacher, labels, 3)
    for tau in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="tau"):
            sparse_mft_loss(student, labels, ids, logprobs, label_logprobs, tau)
    with pytest.raises(ValueError, match="variant"):
        sparse_mft_loss(student, labels, ids, logprobs, label_logprobs, 0.25, variant="kd")
    with pytest.raises(ValueError, match="tail"):
        sparse_mft_loss(student, labels, ids, logprobs, label_logprobs, 0.25, tail="drop")
    with pytest.raises(ValueError, match="chunk_size"):
        sparse_mft_loss(student, labels, ids, logprobs, label_logprobs, 0.25, chunk_size=0)


@pytest.mark.parametrize(
    "which, bad",
    [
        ("logits", lambda x: x[0]),
        ("labels", lambda x: x[:, :-1]),
        ("labels", lambda x: x.double()),
        ("topk_ids", lambda x: x[:1]),
        ("topk_ids", lambda x: x.float()),
        ("topk_logprobs", lambda x: x[..., :2]),
        ("label_logprobs", lambda x: x[:, :-1]),
        ("label_logprobs", lambda x: x.long()),
    ],
)
def test_rejects_mismatched_shapes_and_dtypes(which, bad):
    student, teacher, labels = make_case(seed=19)
    ids, logprobs, label_logprobs = cache_for(teacher, labels, 3)
    args = {
        "logits": student,
        "labels": labels,
        "topk_ids": ids,
        "topk_logprobs": logprobs,
        "label_logprobs": label_logprobs,
    }
    args[which] = bad(args[which])
    with pytest.raises(ValueError):
        sparse_mft_loss(**args, tau=0.25)


def test_rejects_out_of_range_ids_at_counted_positions():
    student, teacher, labels = make_case(seed=20)
    ids, logprobs, label_logprobs = cache_for(teacher, labels, 3)
    bad_labels = labels.clone()
    bad_labels[0, 0] = V
    with pytest.raises(ValueError, match="range|\\["):
        sparse_mft_loss(student, bad_labels, ids, logprobs, label_logprobs, 0.25)
    bad_ids = ids.clone()
    bad_ids[1, 1, 2] = -3
    with pytest.raises(ValueError):
        sparse_mft_loss(student, labels, bad_ids, logprobs, label_logprobs, 0.25)


# Dtypes.


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-4)])
def test_low_precision_logits(dtype, atol):
    student, teacher, labels = make_case(seed=21, vocab=40, dtype=dtype)
    # The cache stores float32 log-probs.
    ids, logprobs, label_logprobs = cache_for(teacher, labels, 5)
    logprobs, label_logprobs = logprobs.float(), label_logprobs.float()
    loss, _ = sparse_mft_loss(student, labels, ids, logprobs, label_logprobs, 0.25)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()

    # Against float64 on the same (already rounded) logits: only compute precision differs.
    exact_student = student.detach().double().requires_grad_(True)
    exact, exact_grad = loss_and_grad(sparse_loss_fn(teacher, labels, 5, 0.25), exact_student)
    torch.testing.assert_close(loss.detach().double(), exact, rtol=1e-5, atol=atol)
    torch.testing.assert_close(student.grad.double(), exact_grad, rtol=0.02, atol=0.01)

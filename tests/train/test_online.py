"""Online reference mode (live teacher, dense target) and the sparse cache's fidelity to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import metric_rows, train_config
from mft_pipeline.stage_one import build_cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.distill.online import dense_mft_loss
from mft_pipeline.labels import IGNORE_INDEX


def test_dense_loss_at_tau_one_is_cross_entropy_and_chunks_agree():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    loss, n = dense_mft_loss(logits, teacher, labels, tau=1.0)
    ce = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(n) == 8 and loss.item() == pytest.approx(ce.item(), rel=1e-6)
    whole, _ = dense_mft_loss(logits, teacher, labels, tau=0.25)
    chunked, _ = dense_mft_loss(logits, teacher, labels, tau=0.25, chunk_size=3)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    chunked.backward()
    assert torch.isfinite(logits.grad).all()
    empty, n = dense_mft_loss(logits, teacher, torch.full_like(labels, IGNORE_INDEX), tau=0.25)
    assert empty.item() == 0 and int(n) == 0


@pytest.fixture(scope="module")
def full_vocab_cache(stage_two, tmp_path_factory, tiny_tokenizer):
    """The special corpus cached with k = vocabulary size: nothing is left out of the target."""
    out = tmp_path_factory.mktemp("full-k") / "cache"
    build_cache(CacheConfig(corpus=str(stage_two / "special.jsonl"), out=str(out), model=str(stage_two / "teacher"), seq_len=32, top_k=len(tiny_tokenizer), val_fraction=0.2))
    return out


@pytest.mark.parametrize("variant", ["mft", "single-correction"])
def test_sparse_cache_at_full_k_matches_the_online_dense_reference(stage_two, full_vocab_cache, tmp_path, variant):
    kw = dict(cache=str(full_vocab_cache), steps=3, eval_every=3, tau=0.25, variant=variant)
    sparse = train_config(stage_two, tmp_path / "sparse", **kw)
    online = train_config(stage_two, tmp_path / "online", online=True, **kw)
    from mft_pipeline.train.loop import train

    a, b = train(sparse), train(online)
    # The cache stores the non-argmax log-probs in float16: agreement to that precision.
    losses = [r["loss"] for r in metric_rows(tmp_path / "sparse", "train")]
    assert losses == pytest.approx([r["loss"] for r in metric_rows(tmp_path / "online", "train")], rel=5e-4)
    assert a["best"]["S"] == pytest.approx(b["best"]["S"], abs=2e-3)
    assert a["best"]["DG"] == pytest.approx(b["best"]["DG"], abs=2e-3)


def test_online_mode_composes_with_lora_and_replay(stage_two, tmp_path):
    from mft_pipeline.train.loop import train

    summary = train(train_config(stage_two, tmp_path / "run", steps=2, eval_every=2, online=True, peft="lora", replay=str(stage_two / "general-cache")))
    assert summary["best"]["S"] > 0 and summary["uses_general_data"]
    with pytest.raises(ValueError, match="online"):
        train_config(stage_two, tmp_path / "x", online=True, tail="renormalize")

"""Replay: general-domain sequences from their own cache mixed into every optimizer step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_documents, metric_rows, train_config, write_jsonl, GENERAL
from mft_pipeline.cache.build import build_cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.train import loop
from mft_pipeline.train.loop import MismatchError, micro_batches, train


def test_micro_batches_cut_one_step_without_losing_rows():
    special, replay = torch.arange(3).numpy(), torch.arange(10, 15).numpy()
    cut = list(micro_batches(special, replay, 3))
    assert [(list(s), list(r)) for s, r in cut] == [([0, 1, 2], []), ([], [10, 11, 12]), ([], [13, 14])]
    assert [(list(s), list(r)) for s, r in micro_batches(special, replay, 8)] == [([0, 1, 2], [10, 11, 12, 13, 14])]


@pytest.mark.parametrize("variant", ["ft", "mft"])
def test_each_step_holds_the_replay_share_of_general_sequences(stage_two, tmp_path, monkeypatch, variant):
    calls = []
    real_loss = loop.sparse_mft_loss

    def recording_loss(logits, labels, topk_ids, *args, **kw):
        calls.append((logits.shape[0], topk_ids.shape[-1], kw["variant"]))
        return real_loss(logits, labels, topk_ids, *args, **kw)

    monkeypatch.setattr(loop, "sparse_mft_loss", recording_loss)
    config = train_config(stage_two, tmp_path / "run", steps=3, eval_every=3, batch_size=4, variant=variant, replay=str(stage_two / "general-cache"))
    assert config.replay_fraction == 0.5  # the paper's default
    summary = train(config)
    # The special cache keeps k=6 candidates, the general one k=4: 2 rows of each per step.
    assert calls == [(2, 6, variant), (2, 4, variant)] * 3
    assert summary["uses_general_data"] and metric_rows(tmp_path / "run", "before")[0]["uses_general_data"]
    assert summary["best"]["S"] > 0


def test_replay_share_is_per_optimizer_step_so_accumulation_still_matches(stage_two, tmp_path):
    replay = dict(replay=str(stage_two / "general-cache"), replay_fraction=0.25, steps=2, eval_every=2)
    train(train_config(stage_two, tmp_path / "big", batch_size=4, grad_accum=1, **replay))
    train(train_config(stage_two, tmp_path / "small", batch_size=1, grad_accum=4, **replay))
    big = AutoModelForCausalLM.from_pretrained(tmp_path / "big" / "last").state_dict()
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small" / "last").state_dict()
    for name in big:
        torch.testing.assert_close(big[name], small[name], rtol=1e-4, atol=1e-6)


def test_replay_refuses_a_cache_of_another_teacher(stage_two, tmp_path, other_model_dir):
    corpus = write_jsonl(tmp_path / "g.jsonl", make_documents(10, seed=9, words=GENERAL))
    build_cache(CacheConfig(corpus=str(corpus), out=str(tmp_path / "other"), model=str(other_model_dir), seq_len=32, top_k=4, val_fraction=0.0))
    with pytest.raises(MismatchError, match="same teacher"):
        train(train_config(stage_two, tmp_path / "r", replay=str(tmp_path / "other")))
    assert not (tmp_path / "r").exists()


def test_replay_settings_are_checked(stage_two, tmp_path):
    with pytest.raises(ValueError, match="needs --replay"):
        train_config(stage_two, tmp_path / "r", replay_fraction=0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        train_config(stage_two, tmp_path / "r", replay=str(stage_two / "general-cache"), replay_fraction=1.0)
    with pytest.raises(ValueError, match="larger --batch-size"):
        train(train_config(stage_two, tmp_path / "r", replay=str(stage_two / "general-cache"), replay_fraction=0.1, batch_size=2))

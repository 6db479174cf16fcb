"""Replay: general-domain sequences from their own cache mixed into every optimizer step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_documents, metric_rows, train_config, write_jsonl, GENERAL
from mft_pipeline.stage_one import build_cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.distill.sparse_loss import sparse_mft_loss
from mft_pipeline.train import distributed, loop
from mft_pipeline.train.loop import MismatchError, micro_batches, train


def test_micro_batches_cut_one_step_without_losing_rows():
    special, replay = torch.arange(3).numpy(), torch.arange(10, 15).numpy()
    cut = list(micro_batches(special, replay, 3))
    assert [(list(s), list(r)) for s, r in cut] == [([0, 1, 2], []), ([], [10, 11, 12]), ([], [13, 14])]
    assert [(list(s), list(r)) for s, r in micro_batches(special, replay, 8)] == [([0, 1, 2], [10, 11, 12, 13, 14])]


@pytest.mark.parametrize("variant", ["ft", "mft"])
def test_each_step_holds_the_replay_share_of_general_sequences(stage_two, tmp_path, variant):
    config = train_config(stage_two, tmp_path / "run", steps=3, eval_every=3, batch_size=4, variant=variant, replay=str(stage_two / "general-cache"))
    assert config.replay_fraction == 0.5  # the paper's default
    with distributed.process_group(config) as ranks:
        run = loop.setup(dataclasses.replace(config, out=str(tmp_path / "setup-only")), ranks)
        for step in range(3):
            special = run.order[step * run.special_per_step : (step + 1) * run.special_per_step]
            general = run.replay_order[step * run.replay_per_step : (step + 1) * run.replay_per_step]
            # The special cache keeps k=6 candidates, the general one k=4: 2 rows of each per step.
            assert [(len(s), len(g)) for s, g in micro_batches(special, general, config.batch_size)] == [(2, 2)]
        parts = [run.train_split.batch(special, "cpu"), run.replay_split.batch(general, "cpu")]
        assert [p["topk_ids"].shape[-1] for p in parts] == [6, 4]
        # One micro-batch of both sources: each part scored against its own cache's targets.
        loss_sum, n_tokens = loop.micro_batch_loss(run.model, parts, config)
        with torch.no_grad():
            logits = run.model(input_ids=torch.cat([p["input_ids"] for p in parts])).logits
        want = [sparse_mft_loss(logits[2 * i : 2 * i + 2], p["labels"], p["topk_ids"], p["topk_logprobs"], p["label_logprobs"],
                                tau=config.tau, variant=variant) for i, p in enumerate(parts)]  # fmt: skip
        assert float(loss_sum) == pytest.approx(sum(float(w[0]) for w in want), rel=1e-5)
        assert int(n_tokens) == sum(int(w[1]) for w in want)
        run.tracker.close()
    summary = train(config)
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

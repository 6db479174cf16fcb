"""`mft cache-info`'s teacher statistics against a dense float64 teacher, and the streaming against the whole split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli.main import mft
from conftest import make_documents, write_jsonl
from mft_pipeline.stage_one import build_cache
from mft_pipeline.cache.info import TAIL_BINS, cache_info, teacher_stats
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.labels import IGNORE_INDEX

K = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("info-cache")
    corpus = write_jsonl(d / "corpus.jsonl", make_documents(40, seed=21))
    build_cache(CacheConfig(corpus=str(corpus), out=str(d / "cache"), model=str(tiny_model_dir), seq_len=24, top_k=K, val_fraction=0.25, rows_per_shard=4))
    return d / "cache"


def dense_stats(model, input_ids: np.ndarray, num_tokens: np.ndarray) -> dict:
    """The same numbers from the full float64 teacher distribution, one position at a time in numpy."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.as_tensor(input_ids, dtype=torch.long)).logits.double(), -1).numpy()
    tails, outside, right = [], 0, 0
    for r in range(len(input_ids)):
        for t in range(num_tokens[r] - 1):
            label = input_ids[r, t + 1]
            order = np.argsort(-logp[r, t], kind="stable")
            top = order[:K]
            tails.append(1.0 - np.exp(logp[r, t, top]).sum())
            outside += label not in top
            right += label == order[0]
    tails = np.array(tails)
    return {
        "n": len(tails),
        "tails": tails,
        "label_outside_top_k": outside / len(tails),
        "teacher_argmax_accuracy": right / len(tails),
    }


def test_coverage_equals_the_dense_teacher(cache_dir, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    cache = Cache(cache_dir)
    for name in ("train", "validation"):
        split = cache.split(name)
        # The reader's own arrays only to learn each row's length and tokens; the targets come from the model.
        rows = split.batch(list(range(len(split))))
        input_ids = rows["input_ids"].numpy()
        num_tokens = (rows["labels"].numpy() != IGNORE_INDEX).sum(1) + 1
        want = dense_stats(model, input_ids, num_tokens)
        got = teacher_stats(split, chunk_rows=3)
        assert 0 < want["label_outside_top_k"] < 1, "the test model must put some labels outside the top-k"
        assert got["label_outside_top_k"] == pytest.approx(want["label_outside_top_k"], abs=1e-12)
        assert got["teacher_argmax_accuracy"] == pytest.approx(want["teacher_argmax_accuracy"], abs=1e-12)
        # Stored top-k log-probs are float16 (k - 1 of them), so the tail mass carries their rounding.
        assert got["tail_mass_mean"] == pytest.approx(want["tails"].mean(), abs=2e-3)
        for q in (50, 90, 99):
            exact = np.percentile(want["tails"], q, method="inverted_cdf")
            assert got[f"tail_mass_p{q}"] == pytest.approx(exact, abs=2e-3 + 1 / TAIL_BINS)


def test_streaming_is_exact_for_the_stored_values(cache_dir):
    split = Cache(cache_dir).split("train")
    whole = split.batch(list(range(len(split))))
    valid = whole["labels"].numpy() != IGNORE_INDEX
    tails = np.clip(1.0 - np.exp(whole["topk_logprobs"].numpy().astype(np.float64)).sum(-1), 0, 1)[valid]
    assert len(split) > 5
    for chunk_rows in (1, 4, len(split) + 1):
        got = teacher_stats(split, chunk_rows=chunk_rows)
        assert got["tail_mass_mean"] == pytest.approx(tails.mean(), rel=1e-12)
        for q in (50, 90, 99):
            exact = np.percentile(tails, q, method="inverted_cdf")
            assert 0 <= got[f"tail_mass_p{q}"] - exact <= 1 / TAIL_BINS + 1e-12


def test_empty_split_gives_none():
    class Empty:
        def __len__(self):
            return 0

    assert set(teacher_stats(Empty()).values()) == {None}


def test_cache_info_reports_coverage_per_split(cache_dir):
    info = cache_info(cache_dir)
    for name in ("train", "validation"):
        row = info["splits"][name]
        assert row == {**row, **teacher_stats(Cache(cache_dir).split(name))}
    out = CliRunner().invoke(mft, ["cache-info", str(cache_dir)])
    assert out.exit_code == 0 and out.output.count("labels outside top-k") == 2
    data = json.loads(CliRunner().invoke(mft, ["cache-info", str(cache_dir), "--json"]).output)
    assert {"label_outside_top_k", "tail_mass_mean", "tail_mass_p50", "tail_mass_p90", "tail_mass_p99"} <= data["splits"]["train"].keys()

"""Stage one on a chat corpus: the cache records which positions are the answers' tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import make_documents
from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.cache.info import cache_info, verify_cache
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.labels import IGNORE_INDEX
from mft_pipeline.stage_one import build_cache

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
ANSWERS = "1 2 3 4 5 6 7 8 9 0".split()


def chat_rows(n: int) -> list[dict]:
    questions = make_documents(n, seed=3, length=(3, 10))
    answers = make_documents(n, seed=4, words=ANSWERS, length=(2, 6))
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in zip(questions, answers)]


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("chat")
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(30)))
    (d / "template.jinja").write_text(TEMPLATE)
    config = CacheConfig(
        corpus=str(d / "corpus.jsonl"), out=str(d / "cache"), model=str(tiny_model_dir), chat_template=str(d / "template.jinja"),
        seq_len=48, top_k=4, rows_per_shard=4, batch_size=3, val_fraction=0.2,
    )  # fmt: skip
    build_cache(config)
    return d / "cache"


def test_only_answer_tokens_are_targets(chat_cache, tiny_tokenizer):
    cache = Cache(chat_cache)
    assert cache.manifest["targets"] is True and cache.manifest["corpus"]["all_turns"] is False
    for name in ("train", "validation"):
        split = cache.split(name)
        labels = split.labels()
        assert split.target is not None and 0 < split.target_tokens < cache.manifest["splits"][name]["num_labels"]
        assert ((labels >= 0) == split.target).all()
        # Target labels spell only answers: digits, spaces, full stops, the line end and EOS.
        text = tiny_tokenizer.decode(labels[labels >= 0].tolist())
        assert set(text.replace("<eos>", "")) <= set("0123456789 .\n") and text.count("<eos>") > 0
        # Every answer's tokens, and no question's, are targets.
        rows = split.input_ids
        assert text.count("\n") == sum(tiny_tokenizer.decode(r[: n].tolist()).count("assistant:") for r, n in zip(rows, split.num_tokens))


def test_info_counts_target_tokens_and_verify_accepts_the_column(chat_cache):
    info = cache_info(chat_cache)
    cache = Cache(chat_cache)
    for name, row in info["splits"].items():
        assert row["target_tokens"] == int(cache.split(name).target.sum()) < row["tokens"]
    assert verify_cache(chat_cache) == []


def test_version_two_cache_reads_every_position_as_target(chat_cache, tmp_path):
    # A plain-text cache of schema version 2: no target column, no "targets" setting.
    old = tmp_path / "old"
    shutil.copytree(chat_cache, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["schema_version"] = 2
    del manifest["targets"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    split = Cache(old).split("train")
    assert split.target is None
    assert split.target_tokens == manifest["splits"]["train"]["num_labels"] == int((split.labels() != IGNORE_INDEX).sum())
    assert np.array_equal(split.labels() >= 0, np.arange(split.input_ids.shape[1] - 1)[None] < split.num_tokens[:, None] - 1)


def answer_positions(tokenizer, row: np.ndarray, num: int) -> np.ndarray:
    """(T - 1,) bool: positions whose next token overlaps an answer, found by searching the decoded row.

    An answer runs from after "assistant: " through the EOS that ends its record.
    """
    pieces = [tokenizer.decode([int(t)]) for t in row[:num]]
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.array([len(p) for p in pieces])
    text = "".join(pieces)
    inside = np.zeros(len(text) + 1, dtype=bool)
    at = text.find("assistant: ")
    while at >= 0:
        stop = text.find("<eos>", at) + len("<eos>")
        inside[at + len("assistant: ") : stop] = True
        at = text.find("assistant: ", stop)
    token_is_answer = np.array([inside[s:e].any() for s, e in zip(starts, ends)])
    out = np.zeros(len(row) - 1, dtype=bool)
    out[: num - 1] = token_is_answer[1:]
    return out


def test_tau_one_mft_equals_answer_only_cross_entropy(chat_cache, tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from mft_pipeline.distill.sparse_loss import sparse_mft_loss
    from mft_pipeline.eval.metrics import model_perplexity

    split = Cache(chat_cache).split("train")
    rows = list(range(min(6, len(split))))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    ids = split.input_ids[rows]
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)).logits
    # Independent reference: float64 NLL of the next token at the answer positions found in the text.
    mask = np.stack([answer_positions(tiny_tokenizer, split.input_ids[r], split.num_tokens[r]) for r in rows])
    assert mask.any() and not mask.all()
    logp = torch.log_softmax(logits[:, :-1], -1).numpy()
    nll = -np.take_along_axis(logp, ids[:, 1:, None].astype(np.int64), -1)[..., 0]
    reference = nll[mask].sum()
    batch = split.batch(rows)
    for variant in ("mft", "ft"):
        loss, n = sparse_mft_loss(
            logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], batch["label_logprobs"], tau=1.0, variant=variant
        )
        assert int(n) == int(mask.sum())
        assert float(loss) == pytest.approx(reference, rel=1e-6)
    # The specialized perplexity counts the same positions.
    ppl = model_perplexity(model, ids, split.num_tokens[rows], target=split.target[rows])
    assert ppl == pytest.approx(float(np.exp(reference / mask.sum())), rel=1e-6)

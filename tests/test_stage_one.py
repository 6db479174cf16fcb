"""Stage one against a direct dense computation, plus crash/resume, refusal and worker behaviour."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from cli.main import mft
from conftest import make_documents, write_jsonl
from mft_pipeline.stage_one import build_cache, make_teacher
from mft_pipeline.cache.format import MANIFEST, CacheError, temp_name
from mft_pipeline.cache.info import cache_info, merge_cache, verify_cache
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.data.corpus import CorpusError


def config(corpus, out, model, **kw):
    base = dict(corpus=str(corpus), out=str(out), model=str(model), seq_len=24, top_k=4, rows_per_shard=5, batch_size=3, val_fraction=0.2)
    return CacheConfig(**{**base, **kw})


def shard_digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.parquet"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("built")
    corpus = write_jsonl(d / "corpus.jsonl", make_documents(40))
    build_cache(config(corpus, d / "cache", tiny_model_dir))
    return d / "cache", corpus


def test_cached_targets_equal_dense_teacher(built, tiny_model_dir):
    cache_dir, _ = built
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    cache = Cache(cache_dir)
    for name in ("train", "validation"):
        split = cache.split(name)
        assert len(split) > 1
        with torch.no_grad():
            dense = torch.log_softmax(model(torch.as_tensor(split.input_ids, dtype=torch.long)).logits[:, :-1], -1)
        labels = split.labels()
        valid = labels >= 0
        top = dense.topk(cache.top_k, dim=-1)
        ids = split.topk_ids.astype(np.int64)
        assert (ids[valid] == top.indices.numpy()[valid]).all()
        np.testing.assert_allclose(split.argmax_logprob[valid], top.values[..., 0].numpy()[valid], atol=2e-5)
        np.testing.assert_allclose(split.topk_logprobs[valid].astype(np.float64), top.values.numpy()[valid], rtol=2e-3, atol=2e-3)
        label_dense = dense.gather(-1, torch.as_tensor(np.where(valid, labels, 0))[..., None]).squeeze(-1).numpy()
        np.testing.assert_allclose(split.label_logprobs[valid], label_dense[valid], atol=2e-5)
        assert (split.label_logprobs[~valid] == 0).all() and (ids[~valid] == 0).all()


def test_label_outside_top_k_is_stored(built, tiny_model_dir):
    split = Cache(built[0]).split("train")
    labels = split.labels()
    valid = labels >= 0
    outside = valid & ~(split.topk_ids.astype(np.int64) == labels[..., None]).any(-1)
    assert outside.sum() > 10, "the test model must put labels outside the top-k"
    # Outside the top-k, a label is less likely than the k-th candidate.
    assert (split.label_logprobs[outside] <= split.topk_logprobs[outside][:, -1].astype(np.float32) + 1e-2).all()


def test_every_label_cached_once(built, tiny_tokenizer):
    cache_dir, corpus = built
    cache = Cache(cache_dir)
    manifest = cache.manifest
    total_docs = manifest["corpus"]["num_documents"]
    assert total_docs == 40 and 0 < manifest["corpus"]["validation_documents"] < 40
    for name in ("train", "validation"):
        split = cache.split(name)
        assert manifest["splits"][name]["num_labels"] == int((split.labels() >= 0).sum())


def test_info_reports_teacher_perplexity(built):
    cache_dir, _ = built
    info = cache_info(cache_dir)
    split = Cache(cache_dir).split("validation")
    valid = split.labels() >= 0
    expected = float(np.exp(-split.label_logprobs[valid].astype(np.float64).mean()))
    row = info["splits"]["validation"]
    assert row["teacher_perplexity"] == pytest.approx(expected, rel=1e-9)
    assert row["bytes_per_candidate"] == pytest.approx(row["bytes"] / (row["tokens"] * 4))
    argmax_acc = ((split.topk_ids[..., 0].astype(np.int64) == split.labels()) & valid).sum() / valid.sum()
    assert row["teacher_argmax_accuracy"] == pytest.approx(argmax_acc)


class DyingTeacher:
    """A real teacher that is killed (KeyboardInterrupt) at its ``die_at``-th batch."""

    def __init__(self, inner, die_at):
        self.inner, self.die_at, self.calls = inner, die_at, 0
        self.name, self.max_top_k, self.vocab_size = inner.name, inner.max_top_k, inner.vocab_size
        self.samples_tail = inner.samples_tail

    def score(self, input_ids, num_tokens, top_k, **kwargs):
        if self.calls == self.die_at:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        return self.inner.score(input_ids, num_tokens, top_k, **kwargs)

    def library_versions(self):
        return self.inner.library_versions()


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    build_cache(config(corpus, tmp_path / "whole", tiny_model_dir))

    cfg = config(corpus, tmp_path / "crashed", tiny_model_dir)
    teacher, fingerprint = make_teacher(cfg)
    # Two batches of 3 per 5-row shard: dying at the 7th batch leaves 3 finished shards.
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, DyingTeacher(teacher, die_at=6), teacher_fingerprint=fingerprint)
    crashed = tmp_path / "crashed"
    assert not (crashed / MANIFEST).exists()
    assert len(list(crashed.glob("*.parquet"))) == 3
    assert verify_cache(crashed)  # not a finished cache
    # What a crash in the middle of writing the next shard leaves behind.
    (crashed / temp_name("train-00003.parquet", 0)).write_bytes(b"partial")
    with pytest.raises(CacheError, match="resume"):
        build_cache(cfg, teacher, teacher_fingerprint=fingerprint)

    build_cache(config(corpus, crashed, tiny_model_dir, resume=True), teacher, teacher_fingerprint=fingerprint)
    assert not list(crashed.glob(".*.tmp"))
    assert shard_digests(crashed) == shard_digests(tmp_path / "whole")
    assert verify_cache(crashed) == []


def test_two_workers_merge_to_single_worker_cache(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    build_cache(config(corpus, tmp_path / "one", tiny_model_dir))
    build_cache(config(corpus, tmp_path / "two", tiny_model_dir, num_workers=2, worker_index=1))
    assert not (tmp_path / "two" / MANIFEST).exists()
    with pytest.raises(CacheError, match="not finished|have not finished"):
        merge_cache(tmp_path / "two")
    build_cache(config(corpus, tmp_path / "two", tiny_model_dir, num_workers=2, worker_index=0))
    assert (tmp_path / "two" / MANIFEST).exists()  # the worker that completes the set writes it
    assert shard_digests(tmp_path / "two") == shard_digests(tmp_path / "one")
    assert verify_cache(tmp_path / "two") == []
    merged = merge_cache(tmp_path / "two")
    assert merged["splits"] == Cache(tmp_path / "one").manifest["splits"]


def test_verify_catches_corruption(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    runner = CliRunner()
    assert runner.invoke(mft, ["cache-verify", str(copy)]).exit_code == 0
    shard = sorted(copy.glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = runner.invoke(mft, ["cache-verify", str(copy)])
    assert result.exit_code == 1 and "checksum" in result.output
    (copy / "validation-00000.parquet").unlink()
    assert any("missing" in p for p in verify_cache(copy))


# --- refusals: each leaves the output folder untouched -------------------------------------


def assert_refused(cfg, exc, match):
    out = cfg.out
    before = sorted(os.listdir(out)) if os.path.exists(out) else None
    with pytest.raises(exc, match=match):
        build_cache(cfg)
    after = sorted(os.listdir(out)) if os.path.exists(out) else None
    assert before == after


def test_refuses_empty_corpus(tmp_path, tiny_model_dir):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    assert_refused(config(tmp_path / "empty.jsonl", tmp_path / "out", tiny_model_dir), CorpusError, "empty")


def test_refuses_missing_text_field(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5), field="body")
    assert_refused(config(corpus, tmp_path / "out", tiny_model_dir), CorpusError, "no text field 'text'.*body")


def test_refuses_non_utf8(tmp_path, tiny_model_dir):
    (tmp_path / "bad.txt").write_bytes(b"fine text\n\nbad \xff\xfe bytes\n")
    assert_refused(config(tmp_path / "bad.txt", tmp_path / "out", tiny_model_dir), CorpusError, "UTF-8")


def test_refuses_k_above_vocab(tmp_path, tiny_model_dir, tiny_tokenizer):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5))
    assert_refused(config(corpus, tmp_path / "out", tiny_model_dir, top_k=len(tiny_tokenizer) + 1), ValueError, "vocabulary")


def test_refuses_k_above_vllm_cap_before_loading(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5))
    cfg = config(corpus, tmp_path / "out", "no/such-model-needed", top_k=257, backend="vllm", tokenizer=str(tiny_model_dir))
    assert_refused(cfg, ValueError, "vllm backend's limit")


@pytest.mark.parametrize("what", ["model", "tokenizer"])
def test_refuses_cache_from_other_model_or_tokenizer(tmp_path, tiny_model_dir, other_model_dir, what):
    from conftest import other_tokenizer

    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    out = tmp_path / "cache"
    build_cache(config(corpus, out, tiny_model_dir))
    if what == "model":
        other = other_model_dir
    else:
        other = tmp_path / "retok"
        tok = other_tokenizer()
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
        tok.save_pretrained(other)
    assert_refused(config(corpus, out, other, resume=True), CacheError, f"other settings(.|\n)*{what}.fingerprint")


def test_refuses_non_empty_folder_and_overwrites_on_request(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_refused(config(corpus, out, tiny_model_dir), CacheError, "not a cache")
    assert_refused(config(corpus, out, tiny_model_dir, overwrite=True), CacheError, "refusing to delete")
    (out / "notes.txt").unlink()
    build_cache(config(corpus, out, tiny_model_dir))
    assert_refused(config(corpus, out, tiny_model_dir), CacheError, "finished cache")
    build_cache(config(corpus, out, tiny_model_dir, overwrite=True, top_k=3))
    assert Cache(out).top_k == 3 and verify_cache(out) == []


def test_cli_reports_bad_input_without_traceback(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5), field="body")
    result = CliRunner().invoke(mft, ["cache-teacher", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "error: " in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(mft, ["cache-teacher", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--top-k", "0"])
    assert result.exit_code == 2 and "top_k" in result.output
    assert not (tmp_path / "o").exists()


def test_workers_in_separate_folders_merge_into_one_cache(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    build_cache(config(corpus, tmp_path / "one", tiny_model_dir))
    for i in range(2):
        build_cache(config(corpus, tmp_path / f"node{i}", tiny_model_dir, num_workers=2, worker_index=i))
    result = CliRunner().invoke(mft, ["cache-merge", str(tmp_path / "merged"), str(tmp_path / "node0"), str(tmp_path / "node1")])
    assert result.exit_code == 0, result.output
    assert shard_digests(tmp_path / "merged") == shard_digests(tmp_path / "one")
    assert verify_cache(tmp_path / "merged") == []
    one, merged = Cache(tmp_path / "one"), Cache(tmp_path / "merged")
    for split in ("train", "validation"):
        np.testing.assert_array_equal(one.split(split).topk_ids, merged.split(split).topk_ids)


def test_merge_refuses_gaps_overlaps_and_mixed_settings(tmp_path, tiny_model_dir):
    import shutil

    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    for i in range(2):
        build_cache(config(corpus, tmp_path / f"node{i}", tiny_model_dir, num_workers=2, worker_index=i))
    with pytest.raises(CacheError, match=r"workers \[1\] of 2 have not finished"):
        merge_cache(tmp_path / "gap", (tmp_path / "node0",))
    shutil.copytree(tmp_path / "node0", tmp_path / "node0-again")
    with pytest.raises(CacheError, match="overlapping"):
        merge_cache(tmp_path / "overlap", (tmp_path / "node0", tmp_path / "node0-again", tmp_path / "node1"))
    build_cache(config(corpus, tmp_path / "k3", tiny_model_dir, num_workers=2, worker_index=1, top_k=3))
    with pytest.raises(CacheError, match="other settings(.|\n)*top_k"):
        merge_cache(tmp_path / "mixed", (tmp_path / "node0", tmp_path / "k3"))
    # A worker that claims a shard the plan gives to another worker is an overlap too.
    part = tmp_path / "node1" / "worker-00001-of-00002.json"
    import json

    data = json.loads(part.read_text())
    stolen = json.loads((tmp_path / "node0" / "worker-00000-of-00002.json").read_text())["shards"]
    name, record = next(iter(stolen.items()))
    data["shards"][name] = record
    part.write_text(json.dumps(data))
    shutil.copy(tmp_path / "node0" / name, tmp_path / "node1" / name)
    with pytest.raises(CacheError, match="plan gives to worker 0|two workers"):
        merge_cache(tmp_path / "stolen", (tmp_path / "node0", tmp_path / "node1"))
    for bad in ("gap", "overlap", "mixed"):
        assert not (tmp_path / bad).exists()
    assert not (tmp_path / "stolen" / MANIFEST).exists()


def test_shards_use_zstd_and_byte_stream_split(built):
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(sorted(built[0].glob("train-*.parquet"))[0]).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert all(c.compression == "ZSTD" for c in columns.values())
    for path in ("topk_ids.list.element.list.element", "topk_logprob_deltas.list.element.list.element", "label_logprobs.list.element"):
        assert "BYTE_STREAM_SPLIT" in columns[path].encodings, (path, columns[path].encodings)


def test_cli_says_clearly_when_vllm_is_missing(tmp_path, tiny_model_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5))
    result = CliRunner().invoke(
        mft, ["cache-teacher", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir), "--backend", "vllm", "--seq-len", "16"]
    )
    assert result.exit_code == 2 and "mft-pipeline[vllm]" in result.output and "--backend transformers" in result.output
    assert not (tmp_path / "o").exists()


def test_rows_start_with_bos_for_a_bos_tokenizer(tmp_path, tiny_tokenizer):
    from conftest import bos_adding, make_model
    from mft_pipeline.data.packing import tokenize

    tokenizer = bos_adding(tiny_tokenizer)
    model_dir = tmp_path / "model"
    make_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    docs = make_documents(12)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    cache = Cache(build_cache(config(corpus, tmp_path / "cache", model_dir, val_fraction=0.0)))
    assert cache.manifest["tokenizer"]["rows_start_with_bos"] is True
    split = cache.split("train")
    assert (split.input_ids[:, 0] == tokenizer.bos_token_id).all()
    labels = split.labels()
    assert [int(t) for t in labels[labels >= 0]] == list(tokenize(docs, tokenizer))


def test_refuses_seq_len_beyond_the_teachers_context(tmp_path, tiny_model_dir):
    # The test model takes 512 positions; a longer row would fail (or exhaust memory) mid-forward.
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5))
    for seq_len in (513, 10**20):
        assert_refused(config(corpus, tmp_path / "out", tiny_model_dir, seq_len=seq_len), ValueError, "context of 512")


def test_gpu_memory_utilization_is_checked():
    from mft_pipeline.config import CacheConfig
    from mft_pipeline.errors import ConfigError

    assert CacheConfig(corpus="c", out="o", gpu_memory_utilization=0.2).gpu_memory_utilization == 0.2
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            CacheConfig(corpus="c", out="o", gpu_memory_utilization=bad)


# --- tail samples (--tail-samples N) ----------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("sampled")
    corpus = write_jsonl(d / "corpus.jsonl", make_documents(40))
    build_cache(config(corpus, d / "cache", tiny_model_dir, tail_samples=5, tail_seed=3))
    return d / "cache", corpus


def reference_tail_ids(dense_logprobs, topk_ids, labels, uniforms):
    """Inverse-CDF draws in float64 numpy from the teacher's distribution outside topk ∪ {label}."""
    out = np.zeros(uniforms.shape, dtype=np.int64)
    for idx in np.ndindex(*labels.shape):
        if labels[idx] < 0:
            continue
        p = np.exp(dense_logprobs[idx])
        p[topk_ids[idx]] = 0.0
        p[labels[idx]] = 0.0
        cdf = np.cumsum(p / p.sum())
        out[idx] = np.minimum(np.searchsorted(cdf, uniforms[idx], side="right"), len(p) - 1)
    return out


def test_tail_samples_are_the_teachers_draws_outside_the_top_k_and_label(sampled, tiny_model_dir):
    from mft_pipeline.teacher.tail_samples import tail_uniforms

    cache_dir, _ = sampled
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    cache = Cache(cache_dir)
    assert cache.tail_samples == 5 and cache.manifest["tail_seed"] == 3
    assert verify_cache(cache_dir) == []
    for name in ("train", "validation"):
        split = cache.split(name)
        tail = split.tail_ids.astype(np.int64)
        topk = split.topk_ids.astype(np.int64)
        labels = split.labels()
        valid = labels >= 0
        assert tail.shape == (len(split), cache.seq_len - 1, 5)
        assert (tail[~valid] == 0).all()
        assert not (tail[valid][:, :, None] == topk[valid][:, None, :]).any()
        assert not (tail[valid] == labels[valid][:, None]).any()
        # The same uniforms through an independent float64 inverse CDF of the dense teacher give the
        # same ids, but where a uniform falls within float32 rounding of a boundary between two ids.
        with torch.no_grad():
            dense = torch.log_softmax(model(torch.as_tensor(split.input_ids, dtype=torch.long)).logits[:, :-1], -1).numpy()
        uniforms = tail_uniforms(3, name, 0, len(split), cache.seq_len - 1, 5)
        want = reference_tail_ids(dense, topk, labels, uniforms)
        assert (tail[valid] == want[valid]).mean() > 0.99
    batch = cache.split("train").batch([0, 1])
    assert batch["tail_ids"].shape == (2, cache.seq_len, 5) and batch["tail_ids"].dtype == torch.int64
    assert (batch["tail_ids"][:, -1] == 0).all()  # the padded last position


def test_cache_without_tail_samples_reads_as_before(built):
    cache = Cache(built[0])
    assert cache.tail_samples == 0 and "tail_samples" not in cache.manifest
    assert "tail_ids" not in cache.split("train").batch([0])
    assert cache.split("train").tail_ids is None


def test_resume_with_tail_samples_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    build_cache(config(corpus, tmp_path / "whole", tiny_model_dir, tail_samples=3))
    cfg = config(corpus, tmp_path / "crashed", tiny_model_dir, tail_samples=3)
    teacher, fingerprint = make_teacher(cfg)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, DyingTeacher(teacher, die_at=4), teacher_fingerprint=fingerprint)
    build_cache(config(corpus, tmp_path / "crashed", tiny_model_dir, tail_samples=3, resume=True), teacher, teacher_fingerprint=fingerprint)
    assert shard_digests(tmp_path / "crashed") == shard_digests(tmp_path / "whole")
    # Another seed draws other ids; resuming with it is refused as other settings.
    with pytest.raises(CacheError, match="tail_seed"):
        build_cache(config(corpus, tmp_path / "crashed", tiny_model_dir, tail_samples=3, tail_seed=1, resume=True), teacher, teacher_fingerprint=fingerprint)


def test_vllm_with_tail_samples_is_refused_before_any_engine(tmp_path, tiny_model_dir):
    from mft_pipeline.errors import ConfigError

    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(5))
    with pytest.raises(ConfigError, match="vllm backend returns only the top-k"):
        config(corpus, tmp_path / "out", "no/such-model-needed", backend="vllm", tail_samples=2)
    result = CliRunner().invoke(
        mft, ["cache-teacher", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--model", "no/such-model-needed", "--backend", "vllm", "--tail-samples", "2"]
    )
    assert result.exit_code == 2 and "--backend transformers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    # A handed-in teacher that cannot sample (the vLLM kind) is refused before the folder is touched.
    teacher, fingerprint = make_teacher(config(corpus, tmp_path / "x", tiny_model_dir))
    teacher.samples_tail = False
    with pytest.raises(ConfigError, match="returns only the top-k"):
        build_cache(config(corpus, tmp_path / "out", tiny_model_dir, tail_samples=2), teacher, teacher_fingerprint=fingerprint)
    assert not (tmp_path / "out").exists()

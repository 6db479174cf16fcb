"""`mft fisher`: the per-sequence diagonal Fisher against a float64 reference, its budget and its file."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from conftest import make_documents, make_model, write_jsonl
from mft_pipeline.config import FisherConfig
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.errors import ConfigError
from mft_pipeline.models import load_model, weights_fingerprint
from mft_pipeline.train.fisher import diagonal_fisher, write_fisher


def reference_fisher(model, rows):
    """Float64: for each row, the gradient of its mean token NLL written out, squared, averaged over rows."""
    double = copy.deepcopy(model).double()
    params = dict(double.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids in rows:
        logp = double(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)
        nll = -sum(logp[t, int(ids[t + 1])] for t in range(len(ids) - 1)) / (len(ids) - 1)
        for (n, _), g in zip(params.items(), torch.autograd.grad(nll, list(params.values()))):
            sums[n] += g**2
    return {n: s / len(rows) for n, s in sums.items()}


def test_per_sequence_fisher_matches_the_float64_reference_within_the_token_budget(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), seed=1)
    packed = pack_documents(make_documents(40, seed=2), tiny_tokenizer, seq_len=12)
    assert len(packed) >= 4 and (packed.num_tokens[:3] == 12).all()
    # 11 predicted tokens per row: a budget of 25 takes 3 rows (33 tokens), the third crossing it.
    fisher, sequences, tokens = diagonal_fisher(model, packed.input_ids, packed.num_tokens, max_tokens=25, progress=False)
    assert (sequences, tokens) == (3, 33)
    want = reference_fisher(model, [torch.as_tensor(r, dtype=torch.long) for r in packed.input_ids[:3]])
    assert fisher.keys() == want.keys() == dict(model.named_parameters()).keys()
    for name in want:
        # float32 gradients: entries far below the tensor's largest carry its rounding error.
        torch.testing.assert_close(fisher[name].double(), want[name], rtol=1e-4, atol=1e-6 * float(want[name].abs().max()))
    assert all(float(f.min()) >= 0 for f in fisher.values()) and any(float(f.max()) > 0 for f in fisher.values())


def test_fisher_file_records_the_model_and_is_never_overwritten(tiny_model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "general.jsonl", make_documents(20, seed=3))
    out = tmp_path / "f.safetensors"
    config = FisherConfig(model=str(tiny_model_dir), corpus=str(corpus), out=str(out), seq_len=16, max_tokens=30)
    meta = write_fisher(config)
    with safe_open(out, framework="pt") as f:
        stored = f.metadata()
        names = set(f.keys())
    model = load_model(str(tiny_model_dir), torch.device("cpu"), dtype=torch.float32)
    assert stored == meta and stored["model_fingerprint"] == weights_fingerprint(model)
    assert (stored["estimator"], stored["sequences"], stored["tokens"]) == ("per-sequence", "2", "30")
    assert names == {n for n, _ in model.named_parameters()}
    with pytest.raises(ConfigError, match="exists"):
        write_fisher(config)
    with pytest.raises(ConfigError, match=".safetensors"):
        FisherConfig(model="m", corpus="c", out=str(tmp_path / "f.pt"))

import pytest
import torch
from transformers import AutoModelForCausalLM

from mft_pipeline.models import ModelLoadError, load_model, resolve, tokenizer_fingerprint, weights_fingerprint


def test_fingerprint_ignores_load_dtype_but_not_training(tiny_model_dir):
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert weights_fingerprint(fp32) == weights_fingerprint(bf16)
    opt = torch.optim.AdamW(fp32.parameters(), lr=2e-5)
    ids = torch.arange(10)[None]
    fp32(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert weights_fingerprint(fp32) != weights_fingerprint(bf16)


def test_tokenizer_fingerprint_is_stable_across_save_and_load(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_fingerprint(tiny_tokenizer)


def test_model_specs_resolve_and_fail_clearly(tmp_path):
    assert resolve("org/name") == ("org/name", {})
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(tmp_path / "no-model-here"), torch.device("cpu"))

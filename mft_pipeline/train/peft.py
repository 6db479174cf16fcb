"""Parameter-efficient finetuning (LoRA, DoRA, IA3 from the `peft` library) for the training loop.

Only wrapping, resuming and merging live here; the loop trains a wrapped model exactly like a
plain one (the frozen base weights simply get no gradient).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from mft_pipeline.config import TrainConfig
from mft_pipeline.errors import ConfigError


def _projection_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style models use it instead of nn.Linear

    return (torch.nn.Linear, Conv1D)


def projection_names(model: torch.nn.Module) -> dict[str, bool]:
    """Short names of every Linear layer but the output head -> whether it is an MLP (not attention) one.

    For decoder-only LMs these are the attention and MLP projections, e.g. for Llama
    ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``. A name counts as
    attention if any of its modules sits inside a module whose name mentions attention.
    """
    head = model.get_output_embeddings()
    found: dict[str, bool] = {}
    for qualified, module in model.named_modules():
        if module is head or not isinstance(module, _projection_types()):
            continue
        parent, _, short = qualified.rpartition(".")
        in_attention = "attn" in parent.lower() or "attention" in parent.lower()
        found[short] = found.get(short, True) and not in_attention
    return found


def wrap(model: torch.nn.Module, config: TrainConfig):
    """The model wrapped with the adapter ``config.peft`` asks for; only the adapter trains."""
    try:
        from peft import IA3Config, LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--peft needs the peft package: pip install 'mft-pipeline[peft]'") from None

    available = projection_names(model)
    if config.peft_targets:
        targets = [t.strip() for t in config.peft_targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ConfigError(f"--peft-targets {', '.join(unknown)}: no such Linear layer; this model has {', '.join(available)}")
    else:
        targets = list(available)
    if not targets:
        raise ConfigError("the model has no Linear layer besides its output head to put an adapter on")
    if config.peft == "ia3":
        # IA3 scales the input of feed-forward layers and the output of the others.
        feedforward = [t for t in targets if available[t]]
        peft_config = IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
    else:
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.peft_rank,
            lora_alpha=config.peft_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            use_dora=config.peft == "dora",
        )
    with _quiet():
        return get_peft_model(model, peft_config)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        # peft asks transformers for a deprecated attribute; the warning means nothing to our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter_weights(model, checkpoint: Path) -> None:
    """Put a saved adapter's weights (``save_pretrained`` of a PeftModel) into an already wrapped model."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, load_peft_weights(str(checkpoint), device=str(device)))
    # Missing keys always include the frozen base weights; only adapter keys matter here.
    missing = [k for k in result.missing_keys if any(tag in k for tag in ("lora_", "ia3_"))]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{checkpoint}: the adapter does not fit this run (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def merged_model(base_spec: str, adapter_dir: Path) -> torch.nn.Module:
    """The base model (float32, on the CPU) with the adapter from ``adapter_dir`` merged into its weights."""
    from peft import PeftModel

    from mft_pipeline.models import load_model

    # On the CPU, so merging never competes with training for accelerator memory.
    base = load_model(base_spec, torch.device("cpu"), dtype=torch.float32)
    with _quiet():
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge(base_spec: str, adapter_dir: Path, tokenizer, out: Path) -> None:
    """Write ``out``: the base model with the adapter from ``adapter_dir`` merged in, a plain from_pretrained folder."""
    from mft_pipeline.train.checkpoint import save_pretrained

    save_pretrained(merged_model(base_spec, adapter_dir), tokenizer, out)

"""`mft average`: weight averaging of the starting model and a model tuned from it (WiSE-FT, Wortsman et al. 2022).

``theta = (1 - alpha) theta_start + alpha theta_tuned`` for every weight. alpha = 0 writes the
start's weights and alpha = 1 the tuned ones bit for bit (the end points are copied, not
interpolated, since ``a + 1 * (b - a)`` need not round to ``b``). A PEFT adapter is first merged
into a copy of the start. The result is a `from_pretrained` folder that `mft eval` scores like
any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mft_pipeline.config import AverageConfig
from mft_pipeline.errors import ConfigError


def interpolate(start: torch.Tensor, tuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * start + alpha * tuned`` elementwise, in float32 or wider; exactly ``start`` at 0 and ``tuned`` at 1."""
    if alpha == 0:
        return start.clone()
    if alpha == 1:
        return tuned.clone()
    dtype = torch.promote_types(start.dtype, torch.float32)
    return torch.lerp(start.to(dtype), tuned.to(dtype), alpha).to(start.dtype)


def average_into(start: torch.nn.Module, tuned: torch.nn.Module, alpha: float) -> None:
    """Overwrite ``start``'s weights with their average with ``tuned``'s (same architecture); tied weights once."""
    mine, theirs = start.state_dict(), tuned.state_dict()
    if mine.keys() != theirs.keys():
        different = sorted(mine.keys() ^ theirs.keys())
        raise ConfigError(f"the start and the tuned model have different weights ({', '.join(different[:3])}, ...)")
    done = set()
    with torch.no_grad():
        for name, tensor in mine.items():
            if theirs[name].shape != tensor.shape:
                raise ConfigError(f"{name}: shaped {tuple(tensor.shape)} in the start, {tuple(theirs[name].shape)} in the tuned model")
            if tensor.data_ptr() in done:  # a tied alias: its tensor is averaged already
                continue
            done.add(tensor.data_ptr())
            tensor.copy_(interpolate(tensor, theirs[name], alpha))


def write_average(config: AverageConfig) -> Path:
    """Write ``config.out``, the average of ``config.start`` and ``config.tuned``; returns it."""
    from mft_pipeline.eval.score import is_adapter
    from mft_pipeline.models import load_model, load_tokenizer, tokenizer_fingerprint
    from mft_pipeline.train.checkpoint import save_pretrained

    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose another --out")
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(config.start)
    start = load_model(config.start, cpu, dtype=torch.float32)
    if is_adapter(config.tuned):
        from mft_pipeline.train.peft import merged_model

        tuned = merged_model(config.start, Path(config.tuned))
    else:
        if tokenizer_fingerprint(load_tokenizer(config.tuned)) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"{config.tuned} has another tokenizer than {config.start}: its weights do not average with the start's")
        tuned = load_model(config.tuned, cpu, dtype=torch.float32)
    average_into(start, tuned, float(config.alpha))
    save_pretrained(start, tokenizer, out)
    return out

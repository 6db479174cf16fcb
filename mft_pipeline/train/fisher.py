"""`mft fisher`: the diagonal empirical Fisher of the starting model on general-domain text, for EWC.

Per-sequence estimator: for each packed sequence ``x_n``, the gradient ``g_n`` of its mean token
NLL under the starting model, and ``F = (1/N) sum_n g_n^2`` elementwise. One forward and backward
per sequence; per-token squared gradients would need one backward per token. The sequences are
the corpus packed as `mft train --general-eval` packs it, taken in order until their predicted
tokens reach the token budget.

The file is a safetensors file of float32 tensors named like the model's parameters. Its metadata
records the model's weights fingerprint, so `mft train --ewc` refuses any other starting model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mft_pipeline.config import FisherConfig
from mft_pipeline.data.corpus import load_documents
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.errors import ConfigError
from mft_pipeline.files import atomic_write
from mft_pipeline.train.regularize import FISHER_FORMAT

ESTIMATOR = "per-sequence"


def diagonal_fisher(model: torch.nn.Module, input_ids: np.ndarray, num_tokens: np.ndarray, max_tokens: int, progress: bool = True) -> tuple[dict[str, torch.Tensor], int, int]:
    """Per-sequence diagonal empirical Fisher of ``model`` over packed rows, within a token budget.

    Args:
        input_ids: (N, T) packed rows; row n predicts its tokens 1 .. ``num_tokens[n] - 1``.
        num_tokens: (N,) real tokens per row.
        max_tokens: rows are taken in order until their predicted tokens reach this.

    Returns:
        ``(fisher, sequences, tokens)``: parameter name -> float32 F shaped like the parameter
        (trainable parameters, tied ones once), and how many sequences and predicted tokens it used.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(model.parameters()).device
    model.eval()  # no dropout: the Fisher of the model as it predicts
    sequences = tokens = 0
    bar = tqdm(total=max_tokens, desc="fisher", unit="tok", disable=not progress)
    for ids, num in zip(input_ids, num_tokens):
        if tokens >= max_tokens:
            break
        if num < 2:
            continue
        row = torch.as_tensor(ids[:num], dtype=torch.long, device=device)[None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=row).logits[0, :-1]
        loss = F.cross_entropy(logits.float(), row[0, 1:])  # the row holds only real tokens
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            sums[name] += g.float().square()
        sequences += 1
        tokens += int(num) - 1
        bar.update(int(num) - 1)
    bar.close()
    if sequences == 0:
        raise ConfigError("the corpus yields no sequence with a token to predict")
    return {name: s / sequences for name, s in sums.items()}, sequences, tokens


def write_fisher(config: FisherConfig) -> dict:
    """Compute the Fisher of ``config.model`` on ``config.corpus`` and write ``config.out``; returns its metadata."""
    from safetensors.torch import save_file

    from mft_pipeline.models import load_model, load_tokenizer, pick_device, weights_fingerprint

    out = Path(config.out)
    if out.exists():
        raise ConfigError(f"{out} exists; remove it or choose another --out")
    tokenizer = load_tokenizer(config.model)
    # float32, as `mft train` loads the student, so the fingerprint is the one training checks.
    model = load_model(config.model, pick_device(config.device), dtype=torch.float32)
    docs = load_documents(config.corpus, config.text_field)
    rows = math.ceil(config.max_tokens / (config.seq_len - 1)) + 1
    packed = pack_documents(docs, tokenizer, config.seq_len, rows, desc="tokenize general")
    fisher, sequences, tokens = diagonal_fisher(model, packed.input_ids, packed.num_tokens, config.max_tokens)
    metadata = {
        "format": FISHER_FORMAT,
        "estimator": ESTIMATOR,
        "model": config.model,
        "model_fingerprint": weights_fingerprint(model),
        "corpus": str(config.corpus),
        "seq_len": str(config.seq_len),
        "sequences": str(sequences),
        "tokens": str(tokens),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in fisher.items()}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return metadata

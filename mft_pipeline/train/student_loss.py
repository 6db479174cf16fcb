"""The student's loss on one micro-batch, from its hidden states when the output head allows it.

Most Hugging Face causal LMs compute ``logits = transform(lm_head(body(input_ids)))`` with a
plain ``nn.Linear`` head and at most a scale or a soft-cap as the transform. For those the
loss takes the body's hidden states and the head's weight (``fused_sparse_mft_loss``), so the
B × T × V logits are never built. Anything else (a LoRA or quantized head, FSDP-sharded
weights, an unknown logits transform) takes the logits path with ``sparse_mft_loss``, and a
single line on stderr says why.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch

from mft_pipeline.distill.fused_loss import fused_label_logprobs, fused_sparse_mft_loss
from mft_pipeline.distill.label_loss import LABEL_VARIANTS, label_only_loss, logits_label_logprobs
from mft_pipeline.distill.sparse_loss import sparse_mft_loss
from mft_pipeline.train import distributed


@dataclass(frozen=True)
class Head:
    """What the fused loss needs from a causal LM.

    Attributes:
        body: the module whose output's ``last_hidden_state`` is what the head is applied to
            (Llama's ``model.model``).
        weight: (V, H) head weight; tied to the input embeddings or not.
        bias: (V,) head bias or None.
        logit_scale: factor on the logits, or None (Cohere's ``logit_scale``; Granite's
            ``1 / logits_scaling``, as Granite divides).
        softcap: final-logit soft-capping value, or None (Gemma 2 and 3).
    """

    body: torch.nn.Module
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    logit_scale: float | None
    softcap: float | None

    def hidden_states(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, H) final hidden states for ``input_ids`` (B, T).

        ``model`` is what the loop trains. Inside DDP the model is called as a whole, so DDP's
        forward (which prepares its gradient synchronisation) runs, with ``logits_to_keep=1``
        so its head computes one position instead of all of them, and the body's output is
        captured with a hook. Otherwise the body is called directly.
        """
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            return _last_hidden_state(self.body(input_ids=input_ids))
        captured = []
        handle = self.body.register_forward_hook(lambda module, args, output: captured.append(_last_hidden_state(output)))
        try:
            model(input_ids=input_ids, logits_to_keep=1)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the model's body ran {len(captured)} times in one forward; expected once")
        return captured[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``hidden`` (..., H), built whole: for checks on small inputs."""
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.logit_scale is not None:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def output_head(model: torch.nn.Module) -> Head | None:
    """The fusable output head of a Hugging Face causal LM (plain, PEFT- or DDP-wrapped), or None.

    None means the fused loss cannot reproduce this model's logits; ``head_or_reason`` says why.
    """
    found = head_or_reason(model)
    return found if isinstance(found, Head) else None


def head_or_reason(model: torch.nn.Module) -> Head | str:
    """``output_head``'s answer, or a one-line reason why the model's head cannot be fused.

    Beyond the structural checks, a 4-token probe forward (no gradient, eval mode) checks
    that the head reproduces the model's own logits, so a model class whose forward does
    something unforeseen after the head falls back instead of training on wrong logits.
    """
    inner = distributed.unwrap(model)
    if distributed.is_sharded(inner):
        return "FSDP shards the head weight outside the forward pass"
    if hasattr(inner, "get_base_model"):  # PEFT: the adapters live inside the base model's modules
        inner = inner.get_base_model()
    if not hasattr(inner, "get_output_embeddings") or not hasattr(inner, "base_model"):
        return f"{type(inner).__name__} is not a Hugging Face model with an output head"
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        # LoRA, quantized or custom heads subclass or wrap Linear with extra computation.
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear (a LoRA on the head cannot be fused)"
    if not isinstance(head.weight, torch.nn.Parameter) or type(head.weight.data) is not torch.Tensor:
        return f"the head weight is a {type(head.weight.data).__name__}, not a plain tensor"
    body = inner.base_model
    if body is inner:
        return f"{type(inner).__name__} has no separate body module to take hidden states from"

    config = inner.config
    scale = None
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):  # Granite divides by it
        scale = 1.0 / float(config.logits_scaling)
    model_scale = getattr(inner, "logit_scale", getattr(config, "logit_scale", None))  # Cohere multiplies
    if isinstance(model_scale, (int, float)) and not isinstance(model_scale, bool) and model_scale != 1:
        scale = float(model_scale) if scale is None else scale * float(model_scale)
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if softcap else None
    found = Head(body=body, weight=head.weight, bias=head.bias, logit_scale=scale, softcap=softcap)
    return _probe(inner, found) or found


def _probe(model: torch.nn.Module, head: Head) -> str | None:
    """None if ``head`` reproduces ``model``'s logits on a 4-token input, else the reason."""
    vocab = head.weight.shape[0]
    ids = (torch.arange(4, device=head.weight.device) % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = head.logits(head.hidden_states(model, ids)).float()
    except Exception as e:  # any failure here only means "do not fuse"; the logits path will show a real error
        return f"probing the head failed: {type(e).__name__}: {e}"
    finally:
        model.train(was_training)
    if got.shape != want.shape:
        return f"head logits have shape {tuple(got.shape)}, the model's {tuple(want.shape)}"
    error = (got - want).abs().max().item()
    if not error <= 1e-3 * (1.0 + want.abs().max().item()):
        return f"the model's logits differ from its head's output by {error:.3g}: an unknown transform after the head"
    return None


# One inspection (and at most one fallback line) per model object for the process's lifetime.
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def student_loss(
    model: torch.nn.Module,
    batch_parts: list[dict[str, torch.Tensor]],
    *,
    tau: float,
    variant: str = "mft",
    tail: str = "bucket",
    fused: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed MFT loss and token count of one micro-batch: one forward, one loss call per part.

    Call it inside the training loop's autocast context; the loss itself runs in float32.

    Args:
        model: the student as the loop trains it (Hugging Face causal LM, maybe PEFT- or
            DDP-wrapped).
        batch_parts: dicts from ``CachedSplit.batch(rows, device)``, e.g. rows of the
            specialized cache then of the replay cache: input_ids (B_i, T), labels (B_i, T),
            topk_ids and topk_logprobs (B_i, T, k_i), label_logprobs (B_i, T), and tail_ids
            (B_i, T, N_i) where that cache has tail samples (then they replace the tail
            bucket). All share T; k and N may differ between parts.
        tau, variant, tail: as for ``sparse_mft_loss``; a label-only ``variant`` (``dft``,
            ``talr``, see ``label_only_loss``) reads only the parts' input_ids and labels, and the
            whole micro-batch is its one batch.
        fused: False forces the logits path.
        chunk_size: positions per chunk of the fused loss (default: its own choice, see
            ``fused_sparse_mft_loss``); fewer, larger chunks trade memory for speed on a GPU.

    Returns:
        ``(loss_sum, n_tokens)``: 0-dim float loss summed over the counted positions of all
        parts and 0-dim int64 count; sum over micro-batches and divide once per step.
    """
    if not batch_parts:
        raise ValueError("batch_parts is empty")
    input_ids = torch.cat([part["input_ids"] for part in batch_parts])
    head = _head(model) if fused else None
    if variant in LABEL_VARIANTS:
        labels = torch.cat([part["labels"] for part in batch_parts])
        if head is not None:
            label_logprobs = fused_label_logprobs(
                head.hidden_states(model, input_ids), head.weight, labels, chunk_size=chunk_size,
                bias=head.bias, logit_scale=head.logit_scale, softcap=head.softcap,
            )
        else:
            label_logprobs = logits_label_logprobs(model(input_ids=input_ids).logits, labels)
        return label_only_loss(label_logprobs, labels, variant)
    if head is not None:
        hidden = head.hidden_states(model, input_ids)
        loss = lambda rows, part: fused_sparse_mft_loss(  # noqa: E731
            hidden[rows], head.weight, part["labels"], part["topk_ids"], part["topk_logprobs"], part["label_logprobs"],
            tau, variant, chunk_size=chunk_size, tail=tail, bias=head.bias, logit_scale=head.logit_scale, softcap=head.softcap,
            tail_ids=part.get("tail_ids"),
        )
    else:
        logits = model(input_ids=input_ids).logits
        loss = lambda rows, part: sparse_mft_loss(  # noqa: E731
            logits[rows], part["labels"], part["topk_ids"], part["topk_logprobs"], part["label_logprobs"],
            tau, variant, tail=tail, tail_ids=part.get("tail_ids"),
        )
    loss_sum, n_tokens, first = None, None, 0
    for part in batch_parts:
        n_rows = len(part["input_ids"])
        part_loss, part_tokens = loss(slice(first, first + n_rows), part)
        loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
        n_tokens = part_tokens if n_tokens is None else n_tokens + part_tokens
        first += n_rows
    return loss_sum, n_tokens


def _head(model: torch.nn.Module) -> Head | None:
    """``head_or_reason`` once per model; the first fallback prints its reason."""
    if model not in _HEADS:
        found = head_or_reason(model)
        if isinstance(found, str):
            print(f"note: the loss takes the full logits path: {found}", file=sys.stderr)
            found = None
        _HEADS[model] = found
    return _HEADS[model]

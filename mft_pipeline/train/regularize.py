"""Penalties that pull the trained weights back to where they started: L2 to the start and EWC.

Both are ``lambda/2 * sum_i F_i (theta_i - theta0_i)^2`` over the regularized tensors: ``F = 1`` for
L2 to the start (``--l2-init``), the starting model's diagonal Fisher on general-domain text for
EWC (``--ewc``, Kirkpatrick et al. 2017; the file comes from ``mft fisher``). The training loop adds
the penalty's gradient once per optimizer step, after the data loss's gradient has been divided by
the step's token count, so lambda does not depend on the batch size.

What is regularized: without ``--peft``, every trained parameter against its starting value. With
an adapter, L2 is over the adapter's own parameters against their initialization; EWC (LoRA only)
is over each adapted weight's change ``B A * scaling``, the adapter's whole difference from the
start, weighed by that weight's Fisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mft_pipeline.config import TrainConfig
from mft_pipeline.errors import MFTError

FISHER_FORMAT = "mft-fisher"


class FisherError(MFTError):
    """A Fisher file that does not belong to the model being trained."""


def penalty(displacements: list[torch.Tensor], lam: float, fisher: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``lam/2 * sum_i sum F_i * d_i^2`` (``F_i = 1`` without ``fisher``): a 0-dim float32 (or float64) tensor.

    Args:
        displacements: tensors ``d_i = theta_i - theta0_i`` of any shapes, differentiable.
        lam: the strength lambda >= 0.
        fisher: tensors ``F_i``, each shaped like its ``d_i``.
    """
    total = torch.zeros((), dtype=torch.float32, device=displacements[0].device if displacements else "cpu")
    for i, d in enumerate(displacements):
        squares = d.float().square() if d.dtype in (torch.float16, torch.bfloat16) else d.square()
        total = total + (squares if fisher is None else fisher[i] * squares).sum()
    return 0.5 * lam * total


@dataclass
class Regularizer:
    """The penalty of one run: what it regularizes, against what, and how strongly."""

    name: str  # "l2-init" or "ewc"
    lam: float
    params: list[torch.nn.Parameter]  # the leaves that receive its gradient
    displacements: Callable[[], list[torch.Tensor]]  # theta - theta0 per regularized tensor, differentiable in params
    fisher: list[torch.Tensor] | None

    def add_gradient(self) -> float:
        """Add the penalty's gradient to the parameters' ``.grad``; returns its value.

        ``autograd.grad`` instead of ``backward``, so a DDP wrapper's gradient hooks do not fire for it:
        every process adds the same term to gradients already averaged over processes.
        """
        value = penalty(self.displacements(), self.lam, self.fisher)
        grads = torch.autograd.grad(value, self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            if g is not None:
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g)
        return float(value.detach())


def load_fisher(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Fisher tensors of ``path`` (parameter name -> F), refused unless ``model`` holds the weights it was computed for.

    Call it on the starting model as loaded, before any adapter or resumed weights are put on it.
    """
    from safetensors import safe_open

    from mft_pipeline.models import weights_fingerprint

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, RuntimeError, ValueError) as e:  # missing file, not safetensors
        raise FisherError(f"--ewc {path}: cannot read it as a safetensors file ({e})") from None
    if meta.get("format") != FISHER_FORMAT:
        raise FisherError(f"--ewc {path}: not a Fisher file of `mft fisher` (no format={FISHER_FORMAT} in its metadata)")
    if meta.get("model_fingerprint") != weights_fingerprint(model):
        raise FisherError(
            f"--ewc {path}: computed for other weights ({meta.get('model')}) than the model being trained; "
            "run `mft fisher` on the starting model"
        )
    return tensors


def make_regularizer(model: torch.nn.Module, config: TrainConfig, fisher: dict[str, torch.Tensor] | None = None) -> Regularizer | None:
    """The run's regularizer, or None. ``model`` is the model as trained (plain or PEFT-wrapped, not yet in
    DDP), holding its starting weights: theta0 is copied from it here."""
    if config.l2_init is None and config.ewc is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if config.l2_init is not None:
        starts = [p.detach().clone() for p in params]
        return Regularizer("l2-init", config.l2_init, params, lambda: [p - s for p, s in zip(params, starts)], None)
    if fisher is None:
        raise ValueError("--ewc needs the Fisher tensors from load_fisher")
    if config.peft == "none":
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        starts = [p.detach().clone() for _, p in named]
        weights = _fisher_for(fisher, [(name, p.shape) for name, p in named], config.ewc, params[0].device)
        return Regularizer("ewc", config.ewc_lambda, params, lambda: [p - s for p, s in zip(params, starts)], weights)
    return _lora_ewc(model, fisher, config, params)


def _lora_ewc(model, fisher, config: TrainConfig, params) -> Regularizer:
    """EWC over each LoRA-adapted weight's change ``B A * scaling`` (the base weights stay frozen)."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    layers = [(name, m) for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    weights = _fisher_for(fisher, [(f"{name}.weight", m.get_base_layer().weight.shape) for name, m in layers], config.ewc, params[0].device)
    return Regularizer("ewc", config.ewc_lambda, params, lambda: [m.get_delta_weight(adapter) for _, m in layers], weights)


def _fisher_for(fisher: dict[str, torch.Tensor], wanted: list[tuple[str, torch.Size]], path: str, device) -> list[torch.Tensor]:
    out = []
    for name, shape in wanted:
        if name not in fisher or fisher[name].shape != shape:
            found = "missing" if name not in fisher else f"shaped {tuple(fisher[name].shape)}"
            raise FisherError(f"--ewc {path}: no Fisher for parameter {name} {tuple(shape)} ({found})")
        out.append(fisher[name].to(device, torch.float32))
    return out

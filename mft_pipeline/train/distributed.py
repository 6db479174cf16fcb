"""Several processes training one model under ``torchrun``: DDP, or FSDP2 for models too big for one device.

The training loop stays the same loop; it calls the few helpers here. With one process (no
``torchrun``) every helper is a no-op and nothing here touches ``torch.distributed``.

The rules that keep N processes equivalent to one (docs/distributed.md):

- every rank computes the same global, seeded row order; each micro-batch of ``batch_size`` rows
  is cut into ``world`` contiguous parts and rank r trains on part r;
- loss sums and token counts are all-reduced before the one division per optimizer step;
- evaluation NLL sums and counts are all-reduced the same way (``eval.metrics.model_perplexity``);
- rank 0 alone writes files; a sharded (FSDP) model is gathered into one full state dict first;
- optimizer state is saved gathered and keyed by parameter name, so ``--resume`` works at any world size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mft_pipeline.config import TrainConfig
from mft_pipeline.models import pick_device
from mft_pipeline.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: mode (none, ddp, fsdp), rank, world size, and its device."""

    mode: str
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def load_device(self) -> torch.device:
        # FSDP shards a CPU copy: fully_shard moves each rank's shards to the device, so the whole
        # model never has to fit on one accelerator.
        return torch.device("cpu") if self.mode == "fsdp" else self.device


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def process_group(config: TrainConfig):
    """Join the ``torchrun`` process group (if any) for the run; yields ``Ranks``.

    The group is set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL on CUDA, gloo on CPU; each rank uses cuda:LOCAL_RANK. A group the caller
    already started is used and left running.
    """
    started = not (dist.is_available() and dist.is_initialized())
    world = int(os.environ.get("WORLD_SIZE", "1")) if started else dist.get_world_size()
    mode = config.distributed
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        if world > 1:
            raise ConfigError(f"--distributed none with {world} processes would train {world} separate copies; use ddp or fsdp")
        yield Ranks("none", 0, 1, pick_device(config.device))
        return
    if started and "RANK" not in os.environ:
        raise ConfigError(f"--distributed {mode} runs under torchrun: torchrun --nproc-per-node N -m cli.main train ...")
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} does not split evenly over {world} processes; use a multiple of {world}")
    device = pick_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield Ranks(mode, dist.get_rank(), dist.get_world_size(), device)
    finally:
        if started:
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """The model as the mode trains it: unchanged, in DDP, or sharded with FSDP2's ``fully_shard``."""
    if ranks.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # No buffer changes during training (rotary tables only), so nothing to broadcast each forward.
        device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if ranks.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ConfigError(f"--distributed fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from None

        mesh = init_device_mesh(ranks.device.type, (ranks.world,))
        # One FSDP unit per decoder layer (Hugging Face lists their classes in _no_split_modules), then
        # the rest (embeddings, final norm, head, tied or not) in the root unit.
        layer_types = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP; an FSDP model is its own (sharded) Hugging Face model."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6: no FSDP2 under this name, so nothing is sharded by it
        return False
    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, last_micro_batch: bool):
    """Context for one micro-batch's forward and backward: DDP all-reduces gradients on the last one only.

    FSDP reduce-scatters after every micro-batch, so each rank keeps only its shard of the gradients.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (the tensor itself with one process)."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_main(fn):
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises its error."""
    result = error = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:  # handed to every rank, so none waits forever for rank 0
            error = e
    if world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def from_main(obj):
    """Rank 0's ``obj`` on every rank, so decisions taken on it (best checkpoint, stopping) agree."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over the whole model; FSDP's sharded gradients give a replicated DTensor norm."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered to rank 0's CPU memory; the other ranks get an empty dict.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """An FSDP model's full weights on rank 0 (every rank must call this); None for an unsharded model."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(model, options=_full_options())
    # Tied weights (the input embedding reused as the output head) are gathered as two copies; make
    # them one tensor again, so save_pretrained stores it once, as for an unsharded model.
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name and name in weights:
            weights[name] = weights[first]
    return weights


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name, on rank 0 (every rank must call this).

    Names, not positions or shards: a run saved by any number of ranks, with or without FSDP,
    resumes at any other number.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=_full_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``optimizer_state``'s dict into this run's optimizer; FSDP ranks keep their shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if state["state"] and all(isinstance(k, int) for k in state["state"]):
        optimizer.load_state_dict(state)  # a checkpoint from before states were keyed by name
        return
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))

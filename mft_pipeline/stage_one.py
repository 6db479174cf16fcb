"""Stage one: corpus -> packed sequences -> teacher scores -> cache shards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from mft_pipeline.cache.format import SCHEMA_VERSION, SPLITS, CacheError, shard_name
from mft_pipeline.cache.shard import arrow_schema, encode_shard
from mft_pipeline.cache.writer import CacheWriter
from mft_pipeline.config import CacheConfig
from mft_pipeline.data.chat import ChatRecord, read_template, template_digest
from mft_pipeline.data.corpus import load_corpus
from mft_pipeline.data.packing import Packed, pack_documents, row_prefix
from mft_pipeline.models import load_model, load_tokenizer, pick_device, tokenizer_fingerprint, weights_fingerprint
from mft_pipeline.errors import ConfigError
from mft_pipeline.teacher.base import TeacherBackend
from mft_pipeline.teacher.tail_samples import tail_uniforms

# vLLM returns every prompt candidate through its Python output path; past a few hundred
# per token that costs more than the forward pass, and the transformers backend is the
# better tool. (vLLM's own default cap is 20; the backend raises max_logprobs to k.)
VLLM_MAX_TOP_K = 256


def _vllm_usable() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def backend_name(config: CacheConfig) -> str:
    if config.backend == "auto":
        # Tail samples need the full logits, which only the transformers backend has.
        return "vllm" if _vllm_usable() and not config.tail_samples else "transformers"
    return config.backend


def make_teacher(config: CacheConfig):
    """The chosen backend and the teacher's weights fingerprint."""
    backend = backend_name(config)
    if backend == "vllm":
        from mft_pipeline.models import resolve, weights_fingerprint_from_files
        from mft_pipeline.teacher.vllm_backend import VLLMTeacher

        name, kwargs = resolve(config.model)
        model_path = str(Path(name) / kwargs["gguf_file"]) if "gguf_file" in kwargs else name
        teacher = VLLMTeacher(
            model_path,
            tokenizer=config.tokenizer or (name if "gguf_file" in kwargs else None),
            max_top_k=config.top_k,
            tensor_parallel_size=config.tensor_parallel_size,
            # None: $MFT_VLLM_GPU_MEMORY_UTILIZATION, else the backend's per-device default.
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.seq_len,
        )
        # After the engine, which refuses a model or setting it cannot serve within seconds.
        # Read from the checkpoint files, never a loaded copy (a vLLM teacher may be larger than
        # RAM); it equals the loaded model's fingerprint, so stage two's student still matches.
        return teacher, weights_fingerprint_from_files(config.model)
    from mft_pipeline.teacher.transformers_backend import TransformersTeacher

    model = load_model(config.model, pick_device(config.device))
    return TransformersTeacher(model), weights_fingerprint(model)


def context_length(teacher) -> int | None:
    """The longest sequence the teacher's model takes, where its backend exposes the model's config."""
    config = getattr(getattr(teacher, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _plan(packed: dict[str, Packed], rows_per_shard: int, num_workers: int) -> list[dict]:
    plan, n = [], 0
    for split in SPLITS:
        total = len(packed[split])
        for j, start in enumerate(range(0, total, rows_per_shard)):
            stop = min(start + rows_per_shard, total)
            labels = int((packed[split].num_tokens[start:stop] - 1).sum())
            plan.append(
                {"file": shard_name(split, j), "split": split, "start": start, "rows": stop - start, "labels": labels, "worker": n % num_workers}
            )
            n += 1
    return plan


def _shard_table(schema, split: str, packed: Packed, start: int, stop: int, teacher, config: CacheConfig, bar) -> pa.Table:
    parts = []
    positions = packed.input_ids.shape[1] - 1
    # An engine that schedules rows itself gets the whole shard, so it is never starved of rows.
    rows_per_call = stop - start if getattr(teacher, "schedules_rows", False) else config.batch_size
    for b in range(start, stop, rows_per_call):
        e = min(b + rows_per_call, stop)
        if config.tail_samples:
            uniforms = tail_uniforms(config.tail_seed, split, b, e - b, positions, config.tail_samples)
            parts.append(teacher.score(packed.input_ids[b:e], packed.num_tokens[b:e], config.top_k, tail_uniforms=uniforms))
        else:
            parts.append(teacher.score(packed.input_ids[b:e], packed.num_tokens[b:e], config.top_k))
        bar.update(e - b)
    return encode_shard(
        schema,
        start,
        packed.input_ids[start:stop],
        packed.num_tokens[start:stop],
        np.concatenate([p.topk_ids for p in parts]),
        np.concatenate([p.topk_logprobs for p in parts]),
        np.concatenate([p.label_logprobs for p in parts]),
        tail_ids=np.concatenate([p.tail_ids for p in parts]) if config.tail_samples else None,
        target=None if packed.target is None else packed.target[start:stop],
    )


def build_cache(
    config: CacheConfig,
    teacher: TeacherBackend | None = None,
    tokenizer=None,
    teacher_fingerprint: str | None = None,
) -> Path:
    """Run stage one. Everything that can be checked is checked before the folder is touched.

    Args:
        config: the run's settings.
        teacher: a loaded teacher (``TeacherBackend``) to use instead of loading
            ``config.model`` with :func:`make_teacher`; then ``teacher_fingerprint`` must be
            its weights' fingerprint (``models.weights_fingerprint``), which the cache records.
        tokenizer: a loaded tokenizer to use instead of loading ``config.tokenizer or config.model``.
    """
    if teacher is not None and teacher_fingerprint is None:
        raise TypeError("build_cache: a handed-in teacher needs its teacher_fingerprint")
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer or config.model)
    corpus = load_corpus(config.corpus, config.text_field, config.sample_by, config.val_fraction)
    vocab_size = len(tokenizer)
    if config.top_k > vocab_size:
        raise ConfigError(f"--top-k {config.top_k} exceeds the tokenizer's vocabulary of {vocab_size}")
    if config.tail_samples > vocab_size:  # more draws than ids says nothing more, and a huge count overflows the arrays
        raise ConfigError(f"--tail-samples {config.tail_samples} exceeds the tokenizer's vocabulary of {vocab_size}")
    if teacher is not None:
        return _write_cache(config, teacher, teacher_fingerprint, tokenizer, corpus, vocab_size)
    if backend_name(config) == "vllm" and config.top_k > VLLM_MAX_TOP_K:
        raise ConfigError(f"--top-k {config.top_k} exceeds the vllm backend's limit of {VLLM_MAX_TOP_K}; use --backend transformers")
    teacher, fingerprint = make_teacher(config)
    try:
        return _write_cache(config, teacher, fingerprint, tokenizer, corpus, vocab_size)
    finally:
        # A teacher made here is stopped here: a vLLM engine left running until interpreter exit
        # can abort the process (SIGABRT) after the cache is already complete.
        teacher.close()


def _write_cache(config: CacheConfig, teacher, fingerprint: str, tokenizer, corpus, vocab_size: int) -> Path:
    """Score the corpus with ``teacher`` into ``config.out``: build_cache's work once the teacher exists."""
    if config.tail_samples and not getattr(teacher, "samples_tail", False):
        raise ConfigError(f"--tail-samples needs the teacher's full distribution; the {teacher.name} backend returns only the top-k")
    if config.top_k > teacher.max_top_k:
        raise ConfigError(f"--top-k {config.top_k} exceeds the {teacher.name} backend's limit of {teacher.max_top_k}")
    if vocab_size > teacher.vocab_size:
        raise CacheError(
            f"tokenizer has {vocab_size} tokens but the model's output layer has {teacher.vocab_size}: they don't belong together"
        )
    # Checked before packing: a row longer than the model's context would fail (or exhaust
    # memory) only deep inside the forward pass.
    context = context_length(teacher)
    if context is not None and config.seq_len > context:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds the teacher's context of {context} tokens")
    caps = {"train": config.max_train_sequences, "validation": config.max_val_sequences}
    template = read_template(config.chat_template)
    packed = {
        split: pack_documents(
            getattr(corpus, split), tokenizer, config.seq_len, caps[split], f"tokenize {split}", template, config.all_turns
        )
        for split in SPLITS
    }
    chat = isinstance(corpus.train[0], ChatRecord)
    if len(packed["train"]) == 0:
        raise CacheError("the corpus yields no training sequence (fewer than two tokens)")
    if len(packed["validation"]) == 0:
        print("warning: no validation documents; raise --val-fraction to measure specialization", file=sys.stderr)
    settings = {
        "schema_version": SCHEMA_VERSION,
        "model": {"id": config.model, "fingerprint": fingerprint, "vocab_size": teacher.vocab_size},
        "tokenizer": {
            "id": config.tokenizer or config.model,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "rows_start_with_bos": row_prefix(tokenizer) is not None,
        },
        "top_k": config.top_k,
        "seq_len": config.seq_len,
        "corpus": {
            "path": str(config.corpus),
            "fingerprint": corpus.fingerprint,
            "text_field": config.text_field,
            "sample_by": config.sample_by,
            "num_documents": corpus.num_documents,
            "val_fraction": config.val_fraction,
            "validation_documents": len(corpus.validation),
            "max_train_sequences": config.max_train_sequences,
            "max_val_sequences": config.max_val_sequences,
        },
        "rows_per_shard": config.rows_per_shard,
        "num_workers": config.num_workers,
        "backend": {"name": teacher.name, "versions": teacher.library_versions()},
        "plan": _plan(packed, config.rows_per_shard, config.num_workers),
    }
    if config.tail_samples:
        # Only when used, so caches without samples keep the settings (and resume) they always had.
        settings["tail_samples"] = config.tail_samples
        settings["tail_seed"] = config.tail_seed
    if chat:
        # Likewise only for instruction and chat corpora: the shards' target column.
        settings["targets"] = True
        settings["corpus"]["chat_template"] = template_digest(template)
        settings["corpus"]["all_turns"] = config.all_turns
    schema = arrow_schema(config.seq_len, config.top_k, teacher.vocab_size, config.tail_samples, targets=chat)
    mine = [s for s in settings["plan"] if s["worker"] == config.worker_index]
    with CacheWriter(
        config.out, settings, worker_index=config.worker_index, num_workers=config.num_workers, resume=config.resume, overwrite=config.overwrite
    ) as writer:
        todo = [s for s in mine if not writer.finished(s["file"])]
        with tqdm(total=sum(s["rows"] for s in todo), desc=f"teacher ({teacher.name})", unit="seq") as bar:
            for s in todo:
                table = _shard_table(schema, s["split"], packed[s["split"]], s["start"], s["start"] + s["rows"], teacher, config, bar)
                writer.write_shard(s["file"], table)
    return Path(config.out)

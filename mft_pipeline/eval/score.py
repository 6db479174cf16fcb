"""`mft eval`: score any checkpoint (a full model or a PEFT adapter) against its base model.

The perplexities come from the same code as training's evaluations (``model_perplexity`` on
the same packed sequences), so a run's ``best/`` scored here gives the numbers `mft train`
recorded for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import EvalConfig
from mft_pipeline.data.chat import read_template, template_digest
from mft_pipeline.data.corpus import load_documents
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.errors import ConfigError
from mft_pipeline.eval.metrics import compare, model_perplexity
from mft_pipeline.models import load_model, load_tokenizer, pick_device
from mft_pipeline.run_folder import RunFolder
from mft_pipeline.train.loop import check_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_SEQ_LEN = 2048


def is_adapter(path: str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_of(checkpoint: str) -> str | None:
    """The model a checkpoint started from: its run folder's student (or the cache's teacher), else an adapter's base."""
    run = RunFolder(Path(checkpoint).parent)
    if run.is_run():
        settings = run.read_settings()
        if settings.get("student"):
            return settings["student"]
        if (Path(settings["cache"]) / MANIFEST).exists():
            return Cache(settings["cache"]).manifest["model"]["id"]
    if is_adapter(checkpoint):
        return json.loads((Path(checkpoint) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return None


def check_rendering(cache: Cache, template: str | None, config: EvalConfig) -> None:
    """Refuse --chat-template / --all-turns other than those a chat cache was written with: its targets would differ."""
    corpus = cache.manifest["corpus"]
    if not cache.manifest.get("targets"):
        return  # a plain-text cache: nothing was rendered
    if template_digest(template) != corpus["chat_template"] or config.all_turns != corpus["all_turns"]:
        raise ConfigError(
            f"--spec-eval {config.spec_eval}: the cache was rendered with "
            + ("the tokenizer's chat template" if corpus["chat_template"] is None else "another --chat-template")
            + (", all turns as targets" if corpus["all_turns"] else ", assistant turns as targets")
            + "; pass the same --chat-template and --all-turns as `mft cache-teacher` got, or score the corpus itself"
        )


def eval_sets(config: EvalConfig, tokenizer) -> dict:
    """Metric name -> packed sequences (``input_ids`` (N, T), ``num_tokens`` (N,), ``target``), built as `mft train` builds them.

    Chat corpora are rendered with ``config.chat_template`` (None: the tokenizer's) as stage one
    renders them, and only their target positions are scored.
    """
    sets, seq_len = {}, config.seq_len
    template = read_template(config.chat_template)
    if config.spec_eval is not None:
        if (Path(config.spec_eval) / MANIFEST).exists():
            cache = Cache(config.spec_eval)
            if not cache.has("validation"):
                raise ConfigError(f"--spec-eval {config.spec_eval}: the cache has no validation split")
            # The model scores the cache's token ids: with another tokenizer they would mean other tokens.
            check_tokenizer(cache, tokenizer, f"--model {config.model}:")
            check_rendering(cache, template, config)
            if seq_len is not None and seq_len != cache.seq_len:
                raise ConfigError(f"--seq-len {seq_len} differs from the --spec-eval cache's {cache.seq_len}")
            sets["ppl_spec"], seq_len = cache.split("validation"), cache.seq_len
        else:
            docs = load_documents(config.spec_eval, config.text_field)
            sets["ppl_spec"] = pack_documents(
                docs, tokenizer, seq_len or DEFAULT_SEQ_LEN, config.max_sequences, "tokenize specialized", template, config.all_turns
            )
    if config.general_eval is not None:
        docs = load_documents(config.general_eval, config.text_field)
        sets["ppl_gen"] = pack_documents(
            docs, tokenizer, seq_len or DEFAULT_SEQ_LEN, config.max_sequences, "tokenize general", template, config.all_turns
        )
    for name, seqs in sets.items():
        if len(seqs) == 0:
            raise ConfigError(f"the {'specialized' if name == 'ppl_spec' else 'general'} evaluation corpus yields no sequence")
    return sets


def score_checkpoint(config: EvalConfig) -> dict:
    """Perplexities of the base model and the checkpoint on each evaluation set, S, DG, DG/S, and the checkpoint's task accuracy.

    Returns ``{"model", "base", "before": {ppl_...}, "after": {ppl_...}, "S"?, "DG"?, "DG_over_S"?, "tokens": {...},
    "tasks"?: {name: {acc, acc_norm, stderr, acc_norm_stderr, n}}}``; the perplexity keys only with
    --spec-eval or --general-eval, ``tasks`` only with --tasks.
    """
    adapter = is_adapter(config.model)
    perplexity = config.spec_eval is not None or config.general_eval is not None
    base = config.base or base_of(config.model)
    if base is None and (perplexity or adapter):
        raise ConfigError(f"{config.model}: cannot tell which model it started from; pass --base")
    device = pick_device(config.device)
    tokenizer = load_tokenizer(base if adapter else config.model)
    sets = eval_sets(config, tokenizer) if perplexity else {}

    def perplexities(model) -> dict:
        return {name: model_perplexity(model, seqs.input_ids, seqs.num_tokens, config.batch_size, seqs.target) for name, seqs in sets.items()}

    result = {"model": config.model, "base": base}
    # fp32 weights, bf16 autocast on GPU: as training evaluates.
    model = load_model(base, device, dtype=torch.float32).eval() if perplexity or adapter else None
    before = perplexities(model) if perplexity else None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.model).eval()  # the base is evaluated already; wrap it in place
    else:
        del model
        model = load_model(config.model, device, dtype=torch.float32).eval()
    if perplexity:
        after = perplexities(model)
        tokens = {name: seqs.target_tokens for name, seqs in sets.items()}
        result.update(before=before, after=after, **compare(before, after), tokens=tokens)
    if config.tasks is not None:
        from mft_pipeline.eval.tasks import task_accuracy

        # lm-evaluation-harness wraps a transformers model; an adapter is merged into its base for it.
        scored = model.merge_and_unload() if adapter else model
        result["tasks"] = task_accuracy(scored, tokenizer, config.task_list, config.limit, config.seed, config.batch_size)
    return result

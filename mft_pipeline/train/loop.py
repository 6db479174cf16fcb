"""Stage two: train the student from cached teacher targets. One loop, top to bottom."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mft_pipeline.cache.format import CacheError
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import TrainConfig
from mft_pipeline.data.corpus import load_documents
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.distill.sparse_loss import sparse_mft_loss
from mft_pipeline.eval.metrics import degeneralization, dg_over_s, model_perplexity, specialization
from mft_pipeline.models import load_model, load_tokenizer, pick_device, tokenizer_fingerprint, weights_fingerprint
from mft_pipeline.train.checkpoint import find_resumable, load_state, save_pretrained

RUN_CONFIG = "run-config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class MismatchError(CacheError):
    """The student does not belong to the cache's teacher."""


def check_student(cache: Cache, tokenizer, model, allow_different_student: bool) -> None:
    """Refuse a student the cached targets were not made for."""
    want = cache.manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint(tokenizer) != want:
        raise MismatchError(
            "the student's tokenizer differs from the one the cache was made with; cached token ids would "
            "mean other tokens. Use the teacher's tokenizer or rebuild the cache."
        )
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


def batch_order(n_rows: int, rows_needed: int, seed: int) -> np.ndarray:
    """Row indices for the whole run: one fresh seeded permutation per epoch, concatenated."""
    epochs = -(-rows_needed // n_rows)
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n_rows) for e in range(epochs)])[:rows_needed]


def _prepare_run_dir(config: TrainConfig) -> Path | None:
    out = Path(config.out)
    saved = {k: v for k, v in dataclasses.asdict(config).items() if k != "resume"}
    if config.resume:
        resume_from = find_resumable(out)
        if resume_from is None:
            raise CacheError(f"{out}: nothing to resume (no last/ checkpoint); run without --resume")
        before = json.loads((out / RUN_CONFIG).read_text())
        diffs = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in saved.items() if before.get(k) != v]
        if diffs:
            raise ValueError("--resume needs the same settings as the interrupted run; changed: " + "; ".join(diffs))
        return resume_from
    if out.exists() and any(out.iterdir()):
        raise CacheError(f"{out}: run folder is not empty; use --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(saved, indent=2) + "\n")
    return None


def train(config: TrainConfig) -> dict:
    """Train, evaluate every ``eval_every`` steps, keep the best checkpoint. Returns the summary."""
    cache = Cache(config.cache)
    student_spec = config.student or cache.manifest["model"]["id"]
    device = pick_device(config.device)
    tokenizer = load_tokenizer(student_spec)
    torch.manual_seed(config.seed)
    # fp32 master weights everywhere; bf16 only inside autocast on GPU.
    model = load_model(student_spec, device, dtype=torch.float32)
    check_student(cache, tokenizer, model, config.allow_different_student)
    resume_from = _prepare_run_dir(config)
    out = Path(config.out)

    train_split = cache.split("train")
    val_split = cache.split("validation") if cache.has("validation") else None
    general = None
    if config.general_eval:
        docs = load_documents(config.general_eval, config.general_text_field)
        general = pack_documents(docs, tokenizer, cache.seq_len, config.general_max_sequences, desc="tokenize general")
    if val_split is None:
        print("warning: the cache has no validation split; S cannot be measured and the last step is kept", file=sys.stderr)

    rows_per_step = config.batch_size * config.grad_accum
    total_steps = config.steps or max(1, math.ceil((config.epochs or 1.0) * len(train_split) / rows_per_step))
    order = batch_order(len(train_split), total_steps * rows_per_step, config.seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate() -> dict:
        row = {}
        if val_split is not None:
            row["ppl_spec"] = model_perplexity(model, val_split.input_ids, val_split.num_tokens, config.eval_batch_size)
        if general is not None:
            row["ppl_gen"] = model_perplexity(model, general.input_ids, general.num_tokens, config.eval_batch_size)
        return row

    if resume_from is not None:
        state = load_state(resume_from)
        model.load_state_dict(load_model(str(resume_from), device, dtype=torch.float32).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_step, before, best = state["step"], state["before"], state["best"]
        # Drop metric rows written after the checkpoint, so the log matches the resumed trajectory.
        rows = [json.loads(l) for l in (out / METRICS).read_text().splitlines() if l.strip()]
        (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= start_step))
    else:
        start_step, best = 0, None
        before = evaluate()
        if val_split is not None:
            before["teacher_ppl_spec"] = val_split.teacher_perplexity()
        _log(out, {"step": 0, "kind": "before", **before})

    def metrics_row(step: int, current: dict) -> dict:
        row = {"step": step, "kind": "eval", **current}
        if "ppl_spec" in current:
            row["S"] = specialization(before["ppl_spec"], current["ppl_spec"])
        if "ppl_gen" in current:
            row["DG"] = degeneralization(before["ppl_gen"], current["ppl_gen"])
        if "S" in row and "DG" in row:
            row["DG_over_S"] = dg_over_s(row["DG"], row["S"])
        return row

    stopped_early = False
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train ({config.variant}, tau={config.tau})", unit="step")
    for step in range(start_step, total_steps):
        model.train()
        loss_total, tokens_total = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        for micro in range(config.grad_accum):
            first = (step * config.grad_accum + micro) * config.batch_size
            batch = train_split.batch(order[first : first + config.batch_size], device)
            with torch.autocast(**autocast):
                logits = model(input_ids=batch["input_ids"]).logits
            loss_sum, n_tokens = sparse_mft_loss(
                logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], batch["label_logprobs"],
                tau=config.tau, variant=config.variant, tail=config.tail,
            )
            loss_sum.backward()
            loss_total += loss_sum.detach()
            tokens_total += n_tokens
        # Sum over micro-batches, divide once: every token weighs the same however it is batched.
        n = max(1, int(tokens_total))
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(n)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = float(loss_total) / n
        _log(out, {"step": step + 1, "kind": "train", "loss": train_loss, "tokens": int(tokens_total), "lr": lr, "grad_norm": float(grad_norm)})
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}")

        done = step + 1 == total_steps
        if (step + 1) % config.eval_every and not done:
            continue
        row = metrics_row(step + 1, evaluate())
        over_budget = config.max_degeneralization is not None and "DG" in row and 100 * row["DG"] > config.max_degeneralization
        row["within_budget"] = not over_budget
        _log(out, row)
        bar.set_postfix(loss=f"{train_loss:.4f}", **{k: f"{row[k]:.4f}" for k in ("S", "DG") if k in row})
        if not over_budget and (best is None or val_split is None or row["ppl_spec"] < best["ppl_spec"]):
            best = row
            save_pretrained(model, tokenizer, out / "best")
        if over_budget:
            stopped_early = True
            print(f"stopping at step {step + 1}: degeneralization {100 * row['DG']:.2f}% exceeds {config.max_degeneralization}%", file=sys.stderr)
            break
        state = {
            "step": step + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "before": before,
            "best": best,
        }
        save_pretrained(model, tokenizer, out / "last", state=state)
    bar.close()

    summary = {"before": before, "best": best, "steps": total_steps, "stopped_early": stopped_early, "config": dataclasses.asdict(config)}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _log(out: Path, row: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")

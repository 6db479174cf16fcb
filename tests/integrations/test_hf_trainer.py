"""MFT inside a Hugging Face Trainer: the dataset, the loss normalization under gradient accumulation, and tau=1 == plain CE."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from conftest import label_only_reference, make_documents, write_jsonl
from mft_pipeline import IGNORE_INDEX, sparse_mft_loss
from mft_pipeline.stage_one import build_cache
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.integrations.hf_trainer import CacheDataset, MFTTrainer, collate

DOC = Path(__file__).resolve().parents[2] / "docs" / "hf-trainer.md"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("hf-cache")
    corpus = write_jsonl(d / "corpus.jsonl", make_documents(30, seed=11))
    build_cache(CacheConfig(corpus=str(corpus), out=str(d / "cache"), model=str(tiny_model_dir), seq_len=24, top_k=4, val_fraction=0.2))
    return d / "cache"


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def test_dataset_items_are_reader_rows(cache_dir):
    split = Cache(cache_dir).split("train")
    ds = CacheDataset(cache_dir)
    assert len(ds) == len(split) > 4
    batch = collate([ds[i] for i in (3, 1)])
    want = split.batch([3, 1])
    assert batch.keys() == want.keys()
    for k in want:
        assert batch[k].dtype == want[k].dtype
        torch.testing.assert_close(batch[k], want[k], rtol=0, atol=0)
    assert (ds[-1]["input_ids"] == ds[len(ds) - 1]["input_ids"]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


class PlainLM(Dataset):
    """The same rows as plain causal-LM examples: unshifted labels, the model's own cross-entropy."""

    def __init__(self, ds: CacheDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        # Cache labels are shifted (labels[t] follows input_ids[t]); the model shifts its own.
        labels = torch.cat([torch.tensor([IGNORE_INDEX]), item["labels"][:-1]])
        return {"input_ids": item["input_ids"], "labels": labels}


def test_tau_one_trains_like_plain_cross_entropy(cache_dir, tiny_model_dir, tmp_path):
    ds = CacheDataset(cache_dir)
    n = len(ds)
    rows_per_step = 4
    # The last step must mix the short last row with full ones, so a per-micro-batch mean
    # would weigh tokens differently from the per-token mean of the whole step.
    assert (ds[n - 1]["labels"] == IGNORE_INDEX).sum() > 1 and n % rows_per_step != 1
    steps = -(-n // rows_per_step)

    def run(trainer_cls, dataset, **kw):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trainer = trainer_cls(model=model, args=args(tmp_path, max_steps=steps), train_dataset=dataset, **kw)
        trainer.train()
        return model, [r["loss"] for r in trainer.state.log_history if "loss" in r]

    mft_model, mft_losses = run(MFTTrainer, ds, tau=1.0)
    ce_model, ce_losses = run(Trainer, PlainLM(ds))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert len(mft_losses) == len(ce_losses) == steps
    assert mft_losses == pytest.approx(ce_losses, rel=1e-5)
    moved = 0.0
    for (name, a), b, s in zip(mft_model.named_parameters(), ce_model.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (a - s).abs().max().item())
    assert moved > 1e-2, "the comparison is meaningless if training did not change the weights"


def test_trainer_loss_is_sparse_mft_loss_over_the_step(cache_dir, tiny_model_dir, tmp_path):
    ds = CacheDataset(cache_dir)
    n = len(ds)
    split = Cache(cache_dir).split("train")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # The reference: summed loss over both micro-batches of the last (short-row) step, divided once.
    last = list(range(n - 1 - (n - 1) % 4, n))
    assert len(last) >= 3
    sums, counts = [], []
    with torch.no_grad():
        for rows in (last[:2], last[2:]):
            b = split.batch(rows)
            s, c = sparse_mft_loss(model(input_ids=b["input_ids"]).logits, b["labels"], b["topk_ids"], b["topk_logprobs"], b["label_logprobs"], tau=0.25)
            sums.append(s.item())
            counts.append(c.item())
    # Unequal counts: a mean of micro-batch means would be another number.
    assert counts[0] != counts[1]
    expected = sum(sums) / sum(counts)
    # The loss of that step, as the Trainer logs it (computed before the step's update).
    subset = torch.utils.data.Subset(ds, last)
    trainer = MFTTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=subset, tau=0.25)
    trainer.train()
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged == [pytest.approx(expected, rel=1e-5)]


def test_eval_loss_is_per_token_mean(cache_dir, tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    val = CacheDataset(cache_dir, split="validation")
    trainer = MFTTrainer(model=model, args=args(tmp_path, per_device_eval_batch_size=len(val)), eval_dataset=val, tau=0.25)
    got = trainer.evaluate()["eval_loss"]
    b = Cache(cache_dir).split("validation").batch(list(range(len(val))))
    with torch.no_grad():
        s, c = sparse_mft_loss(model(input_ids=b["input_ids"]).logits, b["labels"], b["topk_ids"], b["topk_logprobs"], b["label_logprobs"], tau=0.25)
    assert got == pytest.approx((s / c).item(), rel=1e-5)


@pytest.mark.parametrize("variant", ("dft", "talr"))
def test_label_only_variants_match_the_float64_reference(cache_dir, tiny_model_dir, tmp_path, variant):
    """One step over two rows (the short last one included): the logged loss is the DFT or TALR loss of those rows."""
    ds = CacheDataset(cache_dir)
    rows = [len(ds) - 2, len(ds) - 1]
    b = Cache(cache_dir).split("train").batch(rows)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    with torch.no_grad():
        logits = dense(input_ids=b["input_ids"]).logits
    logp, where = [], []
    for i, t in (b["labels"] != IGNORE_INDEX).nonzero().tolist():
        logp.append(torch.log_softmax(logits[i, t], 0)[int(b["labels"][i, t])])
        where.append(i)
    expected = float(label_only_reference(logp, where, variant)) / len(logp)
    ce = -sum(float(x) for x in logp) / len(logp)
    assert abs(expected - ce) > 1e-3 * ce, "the reweighting must change the loss for this test to see it"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = MFTTrainer(model=model, args=args(tmp_path, max_steps=1, gradient_accumulation_steps=1), train_dataset=torch.utils.data.Subset(ds, rows), variant=variant)
    trainer.train()
    assert [r["loss"] for r in trainer.state.log_history if "loss" in r] == [pytest.approx(expected, rel=1e-5)]


def test_bad_settings_raise_config_error(tmp_path):
    from mft_pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        MFTTrainer(model=None, args=args(tmp_path), tau=1.5)
    with pytest.raises(ConfigError):
        MFTTrainer(model=None, args=args(tmp_path), tail="drop")
    with pytest.raises(ConfigError):
        MFTTrainer(model=None, args=args(tmp_path), variant="sft")


def test_docs_example_runs(cache_dir, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/hf-trainer.md must hold a python example"
    code = blocks[0]
    assert 'cache_dir = "' in code and 'output_dir = "' in code
    code = re.sub(r'cache_dir = ".*?"', f"cache_dir = {str(cache_dir)!r}", code, count=1)
    code = re.sub(r'output_dir = ".*?"', f"output_dir = {str(tmp_path / 'run')!r}", code, count=1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_peft_adapter_trains_under_mft_trainer(cache_dir, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MFTTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=CacheDataset(cache_dir), tau=0.25)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


def test_eval_loss_uses_the_tail_samples_of_a_cache_that_has_them(tmp_path, tiny_model_dir):
    """Items carry tail_ids; the Trainer hands them to the loss, not to the model's forward."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(30, seed=11))
    build_cache(CacheConfig(corpus=str(corpus), out=str(tmp_path / "cache"), model=str(tiny_model_dir), seq_len=24, top_k=4, val_fraction=0.2, tail_samples=2))
    val = CacheDataset(tmp_path / "cache", split="validation")
    assert val[0]["tail_ids"].shape == (24, 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = MFTTrainer(model=model, args=args(tmp_path, per_device_eval_batch_size=len(val)), eval_dataset=val, tau=0.25)
    got = trainer.evaluate()["eval_loss"]
    b = Cache(tmp_path / "cache").split("validation").batch(list(range(len(val))))
    targets = (b["labels"], b["topk_ids"], b["topk_logprobs"], b["label_logprobs"])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits
        s, c = sparse_mft_loss(logits, *targets, tau=0.25, tail_ids=b["tail_ids"])
        bucket, _ = sparse_mft_loss(logits, *targets, tau=0.25)
    assert got == pytest.approx((s / c).item(), rel=1e-5)
    assert got != pytest.approx((bucket / c).item(), rel=1e-5)


def test_training_order_is_the_block_shuffled_one_read_by_a_worker(cache_dir, tiny_model_dir, tmp_path):
    """Random sampling over a CacheDataset is mft train's block-shuffled order (a new one each epoch), read in a background worker."""
    ds = CacheDataset(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = MFTTrainer(model=model, args=args(tmp_path, train_sampling_strategy="random", seed=3), train_dataset=ds, tau=0.25, shuffle_groups=1)
    assert trainer.args.dataloader_num_workers == 1
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        got = torch.cat([batch["input_ids"] for batch in loader])
        order = ds.split.epoch_order(3, epoch, 1)
        assert sorted(order) == list(range(len(ds)))
        torch.testing.assert_close(got, torch.from_numpy(ds.split.input_ids[order].astype("int64")), rtol=0, atol=0)
        orders.append(order)
    assert list(orders[0]) != list(orders[1])
    with pytest.raises(IndexError):
        ds.__getitems__([0, -len(ds) - 1])

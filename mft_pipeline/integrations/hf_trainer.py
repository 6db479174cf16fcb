"""Stage two inside a Hugging Face ``transformers.Trainer``: a dataset over a cache split and a Trainer with the MFT loss.

Why a Trainer subclass and not ``compute_loss_func``: the Trainer calls
``compute_loss_func(outputs, labels, num_items_in_batch)``, so the teacher's top-k ids and
log-probs never reach it; and before that it calls ``model(**inputs)``, which would hand
those target columns to the model's forward. ``MFTTrainer.compute_loss`` instead runs the
model on the inputs alone and computes ``sparse_mft_loss`` from the target columns.

Reading: the Trainer's training sampler is replaced by ``BlockShuffleSampler`` (the training
loop's block-shuffled order, so each row group is decoded about once per epoch instead of once
per row), batches are read with one ``CachedSplit.batch`` call each (``__getitems__``), and one
DataLoader worker decodes the next batches in the background while a step runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainingArguments, default_data_collator

from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import TRAIN_DEFAULTS, check_objective
from mft_pipeline.distill.correction import check_tau
from mft_pipeline.distill.label_loss import LABEL_VARIANTS, label_only_loss, logits_label_logprobs
from mft_pipeline.distill.sparse_loss import TAILS, sparse_mft_loss
from mft_pipeline.labels import IGNORE_INDEX
from mft_pipeline.errors import ConfigError

# Columns of a cache item that are training targets, not arguments of the model's forward
# (``tail_ids`` only in caches made with tail samples).
TARGET_COLUMNS = ("labels", "topk_ids", "topk_logprobs", "label_logprobs", "tail_ids")


class CacheDataset(Dataset):
    """One split of a stage-one cache as a map-style torch dataset.

    Item ``i`` is row ``i`` of the split, as ``Cache.split(name).batch([i])`` gives it without the
    batch dimension: input_ids (T,) int64; labels (T,) int64, already shifted
    (``labels[t]`` is the token after ``input_ids[t]``, ``IGNORE_INDEX`` where there is none);
    topk_ids (T, k) int64; topk_logprobs (T, k) float32; label_logprobs (T,) float32; and
    tail_ids (T, N) int64 where the cache has tail samples (the loss then uses them).
    Rows are packed to the cache's ``seq_len``, so items stack without padding. A DataLoader
    fetches a whole batch with one read (``__getitems__``).
    """

    def __init__(self, cache: str | Path | Cache, split: str = "train"):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.split_name = split
        self.split = self.cache.split(split)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        rows = np.asarray(indices, dtype=np.int64)
        bad = (rows < -len(self)) | (rows >= len(self))
        if bad.any():
            raise IndexError(f"row {rows[bad][0]} out of range for the {self.split_name} split ({len(self)} rows)")
        batch = self.split.batch(rows % len(self))
        return [{k: v[i] for k, v in batch.items()} for i in range(len(rows))]


class BlockShuffleSampler(Sampler[int]):
    """A ``CacheDataset``'s rows in ``mft train``'s block-shuffled order (``CachedSplit.epoch_order``), a new order each epoch.

    The Trainer calls ``set_epoch`` before each epoch; the order depends only on the seed and
    the epoch, so a resumed Trainer skipping the batches it already trained on continues the
    same order. Under several processes Accelerate hands each one its own batches of it.
    """

    def __init__(self, dataset: CacheDataset, seed: int, shuffle_groups: int = TRAIN_DEFAULTS["shuffle_groups"]):
        self.dataset, self.seed, self.shuffle_groups, self.epoch = dataset, seed, shuffle_groups, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return iter(self.dataset.split.epoch_order(self.seed, self.epoch, self.shuffle_groups).tolist())


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``CacheDataset`` items into a batch: every tensor gains a leading (B,) dimension.

    The transformers default collator does exactly this for fixed-length tensors; it is named
    here so a Trainer given a tokenizer (whose default collator would try to pad) still stacks.
    """
    return default_data_collator(items)


class MFTTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the MFT loss against cached sparse teacher targets.

    Give it a ``CacheDataset`` (or any dataset with the same columns). The loss of an optimizer
    step is the summed ``sparse_mft_loss`` of all its micro-batches divided by the number of
    labelled tokens in all of them, so gradient accumulation gives the same step as one big
    batch (as ``mft train`` does). ``tau=1`` is plain cross-entropy finetuning.

    Args:
        tau: MFT margin in [0, 1].
        variant: one of ``mft_pipeline.VARIANTS``, or a label-only objective (``dft``, ``talr``:
            see ``label_only_loss``; they read only the labels and ignore ``tau``; TALR's batch
            is one micro-batch, as in ``mft train``).
        tail: "bucket" or "renormalize" (see ``sparse_mft_loss``).
        shuffle_groups: row groups whose rows are shuffled together, as ``mft train
            --shuffle-groups`` (used when ``train_dataset`` is a ``CacheDataset`` and the
            sampling strategy is the default random one).
        *args, **kwargs: those of ``transformers.Trainer``. ``remove_unused_columns`` is
            turned off, since the target columns are not arguments of the model's forward
            and the Trainer would drop them; ``dataloader_num_workers`` 0 becomes 1, so
            batches are decoded in the background; ``data_collator`` defaults to ``collate``.
    """

    # compute_loss already divides by the token count of the whole accumulated step.
    loss_is_scaled_for_ga = True

    def __init__(
        self, model=None, args: TrainingArguments | None = None, *, tau: float = 0.25, variant: str = "mft", tail: str = "bucket",
        shuffle_groups: int = TRAIN_DEFAULTS["shuffle_groups"], **kwargs,
    ):  # fmt: skip
        self.tau = check_tau(tau)
        self.variant = check_objective(variant)
        if tail not in TAILS:
            raise ConfigError(f"tail must be one of {', '.join(TAILS)}; got {tail!r}")
        self.tail = tail
        if not (isinstance(shuffle_groups, int) and shuffle_groups >= 1):
            raise ConfigError(f"shuffle_groups must be a positive integer, got {shuffle_groups!r}")
        self.shuffle_groups = shuffle_groups
        if args is None:
            args = TrainingArguments(output_dir="trainer_output", remove_unused_columns=False)
        elif args.remove_unused_columns:
            args = dataclasses.replace(args, remove_unused_columns=False)
        if args.dataloader_num_workers == 0:
            # One worker reads the batches in order, so it decodes each row group about once per epoch; more
            # workers would each decode the groups their batches share.
            args = dataclasses.replace(args, dataloader_num_workers=1)
        kwargs.setdefault("data_collator", collate)
        super().__init__(model, args, **kwargs)
        # Older transformers versions decide from this flag (not loss_is_scaled_for_ga) whether
        # to divide the loss by the accumulation steps again; our loss is already per step.
        self.model_accepts_loss_kwargs = True

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, CacheDataset) and getattr(self.args, "train_sampling_strategy", "random") == "random":
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return BlockShuffleSampler(dataset, seed, self.shuffle_groups)
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their labelled-token count.

        The Trainer's own count assumes unshifted labels (it skips each row's first label);
        cache labels are already shifted, so every non-ignored label counts.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = torch.zeros((), dtype=torch.long, device=device)
        for batch in batch_samples:
            count += (batch["labels"] != IGNORE_INDEX).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``sparse_mft_loss`` (or ``label_only_loss``) of one micro-batch over the labelled tokens of its optimizer step.

        In training, ``num_items_in_batch`` is the count from ``get_batch_samples``; in
        evaluation, or when it is missing, the batch's own count is used (a per-batch mean).
        """
        targets = {k: inputs[k] for k in TARGET_COLUMNS if k in inputs}
        model_inputs = {k: v for k, v in inputs.items() if k not in TARGET_COLUMNS}
        outputs = model(**model_inputs)
        if self.variant in LABEL_VARIANTS:
            labels = targets["labels"]
            loss_sum, n_tokens = label_only_loss(logits_label_logprobs(outputs.logits, labels), labels, self.variant)
        else:
            loss_sum, n_tokens = sparse_mft_loss(outputs.logits, tau=self.tau, variant=self.variant, tail=self.tail, **targets)
        if model.training and num_items_in_batch is not None:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp_min(1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # Each process divided by the global count; the gradient all-reduce averages
                # over processes, so scale back up to a sum over them.
                loss = loss * self.args.world_size
        else:
            loss = loss_sum / n_tokens.clamp_min(1)
        return (loss, outputs) if return_outputs else loss

"""Tokenizing documents and packing them into fixed-length sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from mft_pipeline.data.chat import ChatRecord, tokenize_records


@dataclass(frozen=True)
class Packed:
    """Fixed-length sequences of one split.

    Consecutive sequences overlap by one token, so every token after the first is the
    label of exactly one position and no target is lost at a sequence boundary. For a
    tokenizer that starts its encodings with BOS (Gemma, Llama 3), every row instead starts
    with BOS followed by the next ``T - 1`` stream tokens, without overlap: such models
    predict far worse from a row that does not begin with BOS, and BOS takes the place of
    the overlapping token, so every stream token is again the label of exactly one position.

    Attributes:
        input_ids: (N, T) int32; the last row is padded with EOS past ``num_tokens``.
        num_tokens: (N,) int32 real tokens per row; row n has ``num_tokens[n] - 1`` labels.
        target: (N, T - 1) bool, whether position t's label (token t + 1) is a training
            target, as the cache's ``target`` column; None when every label is (plain text).
            False on padding.
    """

    input_ids: np.ndarray
    num_tokens: np.ndarray
    target: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.num_tokens)

    @property
    def num_labels(self) -> int:
        return int((self.num_tokens - 1).sum())

    @property
    def target_tokens(self) -> int:
        """Labelled positions that are training targets (all of them without a target mask), as ``CachedSplit.target_tokens``."""
        return self.num_labels if self.target is None else int(self.target.sum())


def tokenize(docs: list[str], tokenizer, desc: str = "tokenize", batch: int = 256) -> np.ndarray:
    """Token stream of all documents, each followed by EOS. Returns (L,) int32."""
    eos = tokenizer.eos_token_id
    parts = []
    for i in tqdm(range(0, len(docs), batch), desc=desc, unit="batch", leave=False, disable=len(docs) <= batch):
        for ids in tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def pack(
    stream: np.ndarray, seq_len: int, pad_id: int, max_sequences: int | None = None, bos: int | None = None, target: np.ndarray | None = None
) -> Packed:
    """Cut a token stream into rows of ``seq_len`` tokens with a stride of ``seq_len - 1``.

    With ``bos``, each row is ``bos`` followed by the next ``seq_len - 1`` stream tokens.
    ``target`` ((L,) bool, which stream tokens are targets) is cut along with the tokens.
    """
    stride = seq_len - 1
    prefix = np.asarray([] if bos is None else [bos], dtype=np.int32)
    covered = len(stream) - (1 if bos is None else 0)  # stream tokens that must be labels
    n = max(0, -(-covered // stride))
    if max_sequences is not None:
        n = min(n, max_sequences)
    ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    num = np.zeros(n, dtype=np.int32)
    slots = None if target is None else np.zeros((n, seq_len), dtype=bool)  # per token, not per position
    for r in range(n):
        piece = slice(r * stride, r * stride + seq_len - len(prefix))
        chunk = np.concatenate([prefix, stream[piece]])
        ids[r, : len(chunk)] = chunk
        num[r] = len(chunk)
        if slots is not None:
            slots[r, len(prefix) : len(chunk)] = target[piece]
    return Packed(ids, num, None if slots is None else slots[:, 1:])


def pack_records(records: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, max_sequences: int | None = None, bos: int | None = None) -> Packed:
    """Pack whole records into rows, each record into the current row when it fits, else into a new one.

    A record longer than a row is cut into rows of its own as :func:`pack` cuts a stream, so
    its answer is predicted from the ``seq_len`` tokens before each position; rows of it
    that hold no target (a long prompt's start) are dropped, as they would train nothing.

    Args:
        records: per record, (L,) int32 token ids and (L,) bool targets.
    """
    room = seq_len - (0 if bos is None else 1)
    rows: list[Packed] = []
    ids, mask = [], []

    def flush():
        if ids:
            rows.append(pack(np.concatenate(ids), seq_len, pad_id, 1, bos, np.concatenate(mask)))
            ids.clear(), mask.clear()

    for r_ids, r_mask in records:
        if len(r_ids) > room:
            flush()
            long = pack(r_ids, seq_len, pad_id, None, bos, r_mask)
            rows.append(Packed(long.input_ids[long.target.any(1)], long.num_tokens[long.target.any(1)], long.target[long.target.any(1)]))
            continue
        if sum(map(len, ids)) + len(r_ids) > room:
            flush()
        ids.append(r_ids), mask.append(r_mask)
    flush()
    if not rows:
        return Packed(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), np.zeros((0, seq_len - 1), bool))
    out = Packed(*(np.concatenate([getattr(p, f) for p in rows]) for f in ("input_ids", "num_tokens", "target")))
    if max_sequences is not None:
        out = Packed(out.input_ids[:max_sequences], out.num_tokens[:max_sequences], out.target[:max_sequences])
    return out


def row_prefix(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts its encodings with BOS, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def pack_documents(
    docs: list, tokenizer, seq_len: int, max_sequences: int | None = None, desc: str = "tokenize", chat_template: str | None = None, all_turns: bool = False
) -> Packed:
    """Tokenize and pack in one go; pads with EOS, and starts rows with BOS where the tokenizer does.

    ``docs`` are texts, or :class:`~mft_pipeline.data.chat.ChatRecord` s, which are rendered
    with ``chat_template`` (None: the tokenizer's) and packed whole with their target mask.
    """
    if docs and isinstance(docs[0], ChatRecord):
        bos = row_prefix(tokenizer)
        records = tokenize_records(docs, tokenizer, chat_template, all_turns, bos)
        return pack_records(records, seq_len, tokenizer.eos_token_id, max_sequences, bos)
    return pack(tokenize(docs, tokenizer, desc=desc), seq_len, tokenizer.eos_token_id, max_sequences, bos=row_prefix(tokenizer))

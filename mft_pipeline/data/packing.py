"""Tokenizing documents and packing them into fixed-length sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm


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
    """

    input_ids: np.ndarray
    num_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.num_tokens)

    @property
    def num_labels(self) -> int:
        return int((self.num_tokens - 1).sum())


def tokenize(docs: list[str], tokenizer, desc: str = "tokenize", batch: int = 256) -> np.ndarray:
    """Token stream of all documents, each followed by EOS. Returns (L,) int32."""
    eos = tokenizer.eos_token_id
    parts = []
    for i in tqdm(range(0, len(docs), batch), desc=desc, unit="batch", leave=False, disable=len(docs) <= batch):
        for ids in tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def pack(stream: np.ndarray, seq_len: int, pad_id: int, max_sequences: int | None = None, bos: int | None = None) -> Packed:
    """Cut a token stream into rows of ``seq_len`` tokens with a stride of ``seq_len - 1``.

    With ``bos``, each row is ``bos`` followed by the next ``seq_len - 1`` stream tokens.
    """
    stride = seq_len - 1
    prefix = np.asarray([] if bos is None else [bos], dtype=np.int32)
    covered = len(stream) - (1 if bos is None else 0)  # stream tokens that must be labels
    n = max(0, -(-covered // stride))
    if max_sequences is not None:
        n = min(n, max_sequences)
    ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    num = np.zeros(n, dtype=np.int32)
    for r in range(n):
        chunk = np.concatenate([prefix, stream[r * stride : r * stride + seq_len - len(prefix)]])
        ids[r, : len(chunk)] = chunk
        num[r] = len(chunk)
    return Packed(ids, num)


def row_prefix(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts its encodings with BOS, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def pack_documents(docs: list[str], tokenizer, seq_len: int, max_sequences: int | None = None, desc: str = "tokenize") -> Packed:
    """Tokenize and pack in one go; pads with EOS, and starts rows with BOS where the tokenizer does."""
    return pack(tokenize(docs, tokenizer, desc=desc), seq_len, tokenizer.eos_token_id, max_sequences, bos=row_prefix(tokenizer))

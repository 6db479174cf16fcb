import numpy as np
import pytest

from conftest import bos_adding
from mft_pipeline.data.packing import pack, pack_documents, row_prefix, tokenize


@pytest.mark.parametrize("length,seq_len", [(1, 4), (2, 4), (10, 4), (11, 4), (12, 4), (100, 7)])
def test_every_label_covered_exactly_once(length, seq_len):
    stream = np.arange(100, 100 + length, dtype=np.int32)
    packed = pack(stream, seq_len, pad_id=0)
    labels = [int(t) for row, n in zip(packed.input_ids, packed.num_tokens) for t in row[1:n]]
    assert labels == list(stream[1:])
    assert packed.num_labels == length - 1
    assert (packed.num_tokens >= 2).all()
    for row, n in zip(packed.input_ids, packed.num_tokens):
        assert (row[n:] == 0).all()


def test_max_sequences_and_stable_ids():
    stream = np.arange(50, dtype=np.int32)
    full, capped = pack(stream, 8, 0), pack(stream, 8, 0, max_sequences=3)
    assert len(capped) == 3 and (capped.input_ids == full.input_ids[:3]).all()


def test_tokenize_puts_eos_after_each_document(tiny_tokenizer):
    stream = tokenize(["a river", "bread"], tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert (stream == eos).sum() == 2 and stream[-1] == eos
    first = tiny_tokenizer("a river", add_special_tokens=False)["input_ids"]
    assert list(stream[: len(first) + 1]) == first + [eos]


@pytest.mark.parametrize("length,seq_len", [(1, 4), (3, 4), (4, 4), (10, 4), (100, 7)])
def test_bos_rows_cover_every_stream_token_once(length, seq_len):
    bos = 7
    stream = np.arange(100, 100 + length, dtype=np.int32)
    packed = pack(stream, seq_len, pad_id=0, bos=bos)
    assert packed.input_ids.dtype == np.int32
    assert (packed.input_ids[:, 0] == bos).all()
    labels = [int(t) for row, n in zip(packed.input_ids, packed.num_tokens) for t in row[1:n]]
    assert labels == list(stream)
    assert packed.num_labels == length
    for row, n in zip(packed.input_ids, packed.num_tokens):
        assert (row[n:] == 0).all()


def test_rows_start_with_bos_only_for_tokenizers_that_add_it(tiny_tokenizer):
    docs = ["a river runs to the sea " * 6, "bread and salt " * 5]
    assert row_prefix(tiny_tokenizer) is None
    plain = pack_documents(docs, tiny_tokenizer, 16)
    assert plain.num_labels == len(tokenize(docs, tiny_tokenizer)) - 1

    with_bos = bos_adding(tiny_tokenizer)
    bos = with_bos.bos_token_id
    assert row_prefix(with_bos) == bos
    packed = pack_documents(docs, with_bos, 16)
    stream = tokenize(docs, with_bos)
    assert bos not in stream  # documents are joined by EOS alone; BOS only opens rows
    assert (packed.input_ids[:, 0] == bos).all()
    assert [int(t) for row, n in zip(packed.input_ids, packed.num_tokens) for t in row[1:n]] == list(stream)

import numpy as np
import pytest

from mft_pipeline.data.packing import pack, tokenize


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

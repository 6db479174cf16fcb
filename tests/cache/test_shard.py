"""One shard's encoding: the top-k log-prob deltas, and encode_shard / decode_shard as a pair."""

import numpy as np
import pytest

from mft_pipeline.cache.shard import delta_decode_float16, delta_encode_float16


def test_round_trip_is_bit_exact_for_any_float16():
    rng = np.random.default_rng(0)
    # All 65,536 patterns (NaN, inf, -0.0, subnormals), shuffled so neighbours are arbitrary.
    bits = rng.permutation(np.arange(2**16, dtype=np.uint16)).reshape(64, 32, 32)
    values = bits.view(np.float16)
    deltas = delta_encode_float16(values)
    assert deltas.dtype == np.uint16 and deltas.shape == values.shape
    assert (delta_decode_float16(deltas).view(np.uint16) == bits).all()


@pytest.mark.parametrize("k", [1, 5, 20])
def test_sorted_log_probs_give_small_deltas(k):
    rng = np.random.default_rng(k)
    logits = rng.normal(0, 3, size=(200, 1000))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = -np.sort(-logprobs, axis=-1)[:, :k]
    deltas = delta_encode_float16(top)
    # The first entry is the argmax's own bit pattern; after it, float16 patterns of negative
    # numbers grow with magnitude, so the deltas are the (non-negative) ulp steps between ranks.
    assert (deltas[:, 0] == top[:, 0].astype(np.float16).view(np.uint16)).all()
    steps = np.diff(top.astype(np.float16).view(np.uint16).astype(np.int64), axis=-1)
    assert (steps >= 0).all() and (deltas[:, 1:] == steps).all()  # no wrapping: plain ulp counts
    if k > 1:
        assert np.median(deltas[:, 1:]) < np.median(deltas[:, 0]) / 10
    np.testing.assert_array_equal(delta_decode_float16(deltas), top.astype(np.float16))


def random_scores(rng, n, T, k, vocab):
    num_tokens = rng.integers(2, T + 1, size=n).astype(np.int32)
    input_ids = rng.integers(0, vocab, size=(n, T)).astype(np.int32)
    topk_ids = rng.integers(0, vocab, size=(n, T - 1, k))
    topk_lp = -np.sort(rng.exponential(3, size=(n, T - 1, k)), axis=-1).astype(np.float32)
    label_lp = -rng.exponential(5, size=(n, T - 1)).astype(np.float32)
    return input_ids, num_tokens, topk_ids, topk_lp, label_lp


@pytest.mark.parametrize("vocab", [300, 70000])
def test_encode_then_decode_gives_the_arrays_back(tmp_path, vocab):
    import pyarrow.parquet as pq

    from mft_pipeline.cache.shard import ROWS_PER_ROW_GROUP, arrow_schema, decode_shard, encode_shard, write_shard_file

    rng = np.random.default_rng(vocab)
    n, T, k = 2 * ROWS_PER_ROW_GROUP + 5, 7, 3
    input_ids, num_tokens, topk_ids, topk_lp, label_lp = random_scores(rng, n, T, k, vocab)
    table = encode_shard(arrow_schema(T, k, vocab), 100, input_ids, num_tokens, topk_ids, topk_lp, label_lp)
    write_shard_file(table, tmp_path / "s.parquet")
    assert pq.ParquetFile(tmp_path / "s.parquet").metadata.num_row_groups == 3
    # The stored columns, read with plain pyarrow (Python lists): an independent view of the file.
    plain = pq.read_table(tmp_path / "s.parquet").to_pydict()
    assert plain["seq_id"] == list(range(100, 100 + n))
    assert np.array_equal(np.array(plain["topk_ids"]), topk_ids)
    for source in (table, tmp_path / "s.parquet"):
        got = decode_shard(source)
        assert got["topk_ids"].dtype == (np.uint16 if vocab <= 2**16 else np.uint32)
        np.testing.assert_array_equal(got["seq_id"], np.arange(100, 100 + n))
        np.testing.assert_array_equal(got["num_tokens"], num_tokens)
        np.testing.assert_array_equal(got["input_ids"], input_ids)
        np.testing.assert_array_equal(got["topk_ids"], topk_ids)
        np.testing.assert_array_equal(got["topk_logprobs"], topk_lp.astype(np.float16))
        np.testing.assert_array_equal(got["argmax_logprob"], topk_lp[..., 0])
        np.testing.assert_array_equal(got["label_logprobs"], label_lp)
    part = decode_shard(tmp_path / "s.parquet", columns=("label_logprobs",), row_groups=[2, 0])
    assert list(part) == ["label_logprobs"]
    G = ROWS_PER_ROW_GROUP
    np.testing.assert_array_equal(part["label_logprobs"], np.concatenate([label_lp[2 * G :], label_lp[:G]]))


@pytest.mark.parametrize("vocab", [300, 70000])
def test_tail_ids_round_trip_and_are_optional(tmp_path, vocab):
    """``tail_ids`` is stored (narrow ids, byte-stream split) only in a schema made with tail samples."""
    import pyarrow.parquet as pq

    from mft_pipeline.cache.shard import arrow_schema, decode_shard, encode_shard, write_shard_file

    rng = np.random.default_rng(vocab + 1)
    n, T, k, N = 9, 6, 3, 4
    scores = random_scores(rng, n, T, k, vocab)
    tail_ids = rng.integers(0, vocab, size=(n, T - 1, N))
    schema = arrow_schema(T, k, vocab, tail_samples=N)
    assert "tail_ids" in schema.names and "tail_ids" not in arrow_schema(T, k, vocab).names
    write_shard_file(encode_shard(schema, 0, *scores, tail_ids=tail_ids), tmp_path / "s.parquet")
    got = decode_shard(tmp_path / "s.parquet")
    assert got["tail_ids"].dtype == (np.uint16 if vocab <= 2**16 else np.uint32)
    np.testing.assert_array_equal(got["tail_ids"], tail_ids)
    np.testing.assert_array_equal(np.array(pq.read_table(tmp_path / "s.parquet").to_pydict()["tail_ids"]), tail_ids)
    meta = pq.ParquetFile(tmp_path / "s.parquet").metadata
    leaf = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in leaf["tail_ids.list.element.list.element"].encodings
    # Without samples there is no such column, and decoding everything does not ask for one.
    write_shard_file(encode_shard(arrow_schema(T, k, vocab), 0, *scores), tmp_path / "old.parquet")
    assert "tail_ids" not in decode_shard(tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="exactly when"):
        encode_shard(arrow_schema(T, k, vocab), 0, *scores, tail_ids=tail_ids)
    with pytest.raises(ValueError, match="exactly when"):
        encode_shard(schema, 0, *scores)

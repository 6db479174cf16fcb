"""The stored encoding of the top-k log-probs: exact round trip, and small numbers when sorted."""

import numpy as np
import pytest

from mft_pipeline.cache.format import delta_decode_float16, delta_encode_float16


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

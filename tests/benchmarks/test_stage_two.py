"""The stage-two benchmark's reader and evaluation measurements, at tiny sizes: what a GPU check calls with device="cuda"."""

import pytest

from benchmarks.stage_two import measure_eval, measure_loader


def test_loader_rate_reads_each_group_once_per_epoch_in_training_order():
    # 3 shards of 40 rows: 6 row groups (32 + 8 rows each); 2 epochs.
    r = measure_loader("cpu", seq_len=16, top_k=3, vocab=300, shards=3, rows_per_shard=40, batch_size=4, epochs=2, random_rows=8)
    assert r["row_groups"] == 6 and r["block_rows"] == 240
    assert r["block_groups_decoded"] == 2 * 6
    assert 1 <= r["random_groups_decoded"] <= 8
    assert r["loader_tokens_per_s"] > 0 and r["loader_tokens_per_s_random_rows"] > 0
    assert r["speedup"] == pytest.approx(r["loader_tokens_per_s"] / r["loader_tokens_per_s_random_rows"])


def test_eval_peak_memory_compares_both_paths_on_the_same_tokens(tiny_model_dir):
    r = measure_eval(str(tiny_model_dir), "cpu", seq_len=32, batch_size=2)
    assert r["chunked"]["count"] == r["naive"]["count"] == 2 * 31
    assert r["nll_rel_gap"] < 1e-5
    assert r["chunked"]["growth"] >= 0 and r["naive"]["growth"] > 0
    assert r["ratio"] == pytest.approx(r["chunked"]["growth"] / r["naive"]["growth"])

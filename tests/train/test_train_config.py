"""TrainConfig refuses settings that would be silently ignored or would train wrongly."""

from __future__ import annotations

import pytest

from mft_pipeline.config import TrainConfig
from mft_pipeline.errors import ConfigError


def test_a_degeneralization_budget_needs_the_general_corpus_it_is_measured_on():
    with pytest.raises(ConfigError, match="--max-degeneralization needs --general-eval"):
        TrainConfig(cache="c", out="o", max_degeneralization=1.0)
    assert TrainConfig(cache="c", out="o", max_degeneralization=1.0, general_eval="g.jsonl").max_degeneralization == 1.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="max_degeneralization"):
            TrainConfig(cache="c", out="o", max_degeneralization=bad, general_eval="g.jsonl")


@pytest.mark.parametrize("norm", [-1.0, -1e-9, float("nan"), float("-inf"), float("inf")])
def test_a_negative_or_undefined_clipping_norm_is_refused(norm):
    with pytest.raises(ConfigError, match="max_grad_norm"):
        TrainConfig(cache="c", out="o", max_grad_norm=norm)


def test_zero_still_disables_clipping():
    assert TrainConfig(cache="c", out="o", max_grad_norm=0.0).max_grad_norm == 0.0

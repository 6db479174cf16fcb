"""One small comparison shared by the sweep and report tests: a sweep grid plus the runs a grid does not cover."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import train_config


def base_settings(d, **kw) -> dict:
    """Pass-through training settings for a sweep on the ``stage_two`` folder ``d``."""
    return dataclasses.asdict(train_config(d, "", **{"steps": 3, "eval_every": 3, **kw}))


@pytest.fixture(scope="session")
def comparison(stage_two, tmp_path_factory):
    """sweep/: FT, MFT tau 0.25 and 1, each plain and with LoRA, each with and without replay (12 runs).
    extra/: distill+ft, single-correction, DoRA+MFT, IA3+MFT and online MFT, trained directly."""
    from mft_pipeline.sweep.grid import SweepConfig, run_sweep
    from mft_pipeline.train.loop import train

    root = tmp_path_factory.mktemp("comparison")
    sweep = SweepConfig(cache=str(stage_two / "cache"), out=str(root / "sweep"), taus="0.25,1", variants="ft,mft", peft="none,lora")
    run_sweep(sweep, base_settings(stage_two, replay=str(stage_two / "general-cache")), log=lambda line: None)
    for name, kw in {
        "distill-ft": dict(variant="distill+ft"),
        "single-correction": dict(variant="single-correction"),
        "dora-mft": dict(peft="dora"),
        "ia3-mft": dict(peft="ia3", lr=2e-2),
        "online-mft": dict(online=True),
    }.items():
        train(train_config(stage_two, root / "extra" / name, steps=3, eval_every=3, **kw))
    return root

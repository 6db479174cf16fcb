"""Trackers write what they are given where the README says, readable by the trackers' own tools."""

from __future__ import annotations

import json
import math
import struct

import pytest

from mft_pipeline.errors import ConfigError
from mft_pipeline.train.tracking import NullTracker, check_report_to, default_report_to, make_tracker, require

CONFIG = {"tau": 0.25, "variant": "mft", "steps": 3, "cache": "cache/", "replay": None}
ROWS = [
    (1, {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.75, "train/tokens_per_s": 1200.0}),
    (2, {"train/loss": 2.25, "train/lr": 5e-4, "train/grad_norm": 0.5, "train/tokens_per_s": 1300.0}),
    (2, {"eval/ppl_spec": 11.5, "eval/ppl_gen": 20.25, "eval/S": 0.125, "eval/DG": 0.0625, "eval/missing": None}),
]


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with make_tracker("tensorboard", tmp_path / "run", CONFIG) as tracker:
        for step, scalars in ROWS:
            tracker.log(step, scalars)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    expected = {}
    for step, scalars in ROWS:
        for name, value in scalars.items():
            if value is not None:
                expected.setdefault(name, []).append((step, value))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for name, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == CONFIG


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    # No account, no network: the run must still complete and keep everything on disk.
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    tracker = make_tracker("wandb", tmp_path / "run", CONFIG)
    for step, scalars in ROWS:
        tracker.log(step, scalars)
    tracker.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")
    records = wandb_records(log)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(rec.history.step.num, {}).update(row)
    for step, scalars in ROWS:
        for name, value in scalars.items():
            if value is None:
                assert name not in history[step]
            else:
                assert history[step][name] == pytest.approx(value)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update if i.key in CONFIG}
    assert config == CONFIG


def wandb_records(path):
    """The protobuf records of a W&B run file.

    wandb 0.31 writes runs from its Go core and no longer ships a Python reader; the file is
    a 7-byte header, then LevelDB's log framing: 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block trailer padding
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    assert records and not pending
    return records


def test_none_and_defaults():
    assert isinstance(make_tracker("none", "unused", CONFIG), NullTracker)
    assert default_report_to() == "tensorboard"  # installed with the test extra
    assert check_report_to(None) == "tensorboard"
    with pytest.raises(ConfigError, match="report_to must be one of"):
        make_tracker("mlflow", "unused", CONFIG)
    with pytest.raises(ConfigError, match=r"pip install 'mft-pipeline\[tracking\]'"):
        require("no_such_tracker_module", "tracking")


def test_non_numbers_are_a_bug_but_nan_is_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tracker in (NullTracker(), make_tracker("tensorboard", tmp_path, CONFIG)):
        with pytest.raises(TypeError, match="train/loss"):
            tracker.log(1, {"train/loss": "2.5"})
        tracker.log(1, {"train/loss": math.nan})
        tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert math.isnan(acc.Scalars("train/loss")[0].value)

"""The run folder's one owner: names, settings, start and resume, metrics, summary and the best-row rule."""

from __future__ import annotations

import pytest
import yaml

from mft_pipeline.errors import ConfigError, MFTError
from mft_pipeline.run_folder import TRAINER_STATE, RunFolder, best_row, improves, settings_diff


def test_a_new_run_records_its_settings_and_refuses_a_used_folder(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert not folder.is_run() and folder.is_empty()
    assert folder.start({"lr": 0.1, "out": "x"}, resume=False) is None
    assert folder.is_run() and yaml.safe_load((tmp_path / "run" / "run-config.yaml").read_text()) == {"lr": 0.1, "out": "x"}
    with pytest.raises(MFTError, match="not empty"):
        RunFolder(tmp_path / "run").start({"lr": 0.1}, resume=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run-config.yaml"]


def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path):
    folder = RunFolder(tmp_path)
    folder.start({"lr": 0.1, "out": "a", "distributed": "auto"}, resume=False)
    with pytest.raises(MFTError, match="nothing to resume"):
        folder.start({"lr": 0.1}, resume=True)
    (tmp_path / "last.old").mkdir()
    (tmp_path / "last.old" / TRAINER_STATE).write_bytes(b"")
    assert folder.resumable() == tmp_path / "last.old"  # a crash between a save's two renames
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / TRAINER_STATE).write_bytes(b"")
    # Another folder location and process layout are the same run; a new setting at its default too.
    same = {"lr": 0.1, "out": "b", "distributed": "fsdp", "compile": True, "new_option": None}
    assert folder.start(same, resume=True, defaults={"new_option": None}) == tmp_path / "last"
    with pytest.raises(ConfigError, match=r"same settings.*lr: 0.1 -> 0.2"):
        folder.start({**same, "lr": 0.2}, resume=True)
    with pytest.raises(ConfigError, match="new_option: None -> 3"):
        folder.start({**same, "new_option": 3}, resume=True, defaults={"new_option": None})


def test_prepare_decides_new_resumed_skipped_or_refused(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.prepare({"lr": 0.1}) == "new"
    folder.start({"lr": 0.1}, resume=False)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        folder.prepare({"lr": 0.2})
    (folder.last).mkdir()
    (folder.last / TRAINER_STATE).write_bytes(b"")
    assert folder.prepare({"lr": 0.1}) == "resumed"
    folder.write_summary({"steps": 1})
    assert folder.prepare({"lr": 0.1}) == "finished, skipped"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a run folder"):
        RunFolder(tmp_path / "other").prepare({"lr": 0.1})
    assert (tmp_path / "other" / "notes.txt").exists()
    # Killed before its first checkpoint: nothing worth keeping, so it starts over.
    killed = RunFolder(tmp_path / "killed")
    killed.start({"lr": 0.1}, resume=False)
    assert killed.prepare({"lr": 0.1}) == "new" and not killed.path.exists()


def test_settings_diff_names_each_change():
    assert settings_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}, {"c": 4}) == ["b: 2 -> 3"]
    assert settings_diff({"a": 1}, {"a": 2}, ignore=("a",)) == []


def test_metrics_append_read_and_truncate(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.metrics() == []
    rows = [{"step": 0, "kind": "before"}, {"step": 1, "kind": "train"}, {"step": 2, "kind": "train"}, {"step": 2, "kind": "eval"}]
    for row in rows:
        folder.append_metrics(row)
    assert folder.metrics() == rows and folder.metrics("train") == rows[1:3]
    folder.truncate_metrics(1)
    assert folder.metrics() == rows[:2]
    # A kill in the middle of an append leaves a torn last line: it is not a row.
    with open(folder.metrics_file, "a") as f:
        f.write('{"step": 2, "ki')
    assert folder.metrics() == rows[:2]
    folder.truncate_metrics(5)
    assert folder.metrics_file.read_text().endswith("}\n")
    folder.metrics_file.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(MFTError, match="line 2"):
        folder.metrics()


def test_summary_marks_a_finished_run(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.summary() is None and not folder.is_finished()
    folder.write_summary({"best": None})
    assert folder.is_finished() and folder.summary() == {"best": None}
    assert not list(tmp_path.glob("*.tmp"))


def _rows(spec):
    return [dict(kind="eval", step=i + 1, ppl_spec=p, within_budget=w) for i, (p, w) in enumerate(spec)]


def test_best_row_is_the_first_lowest_perplexity_within_budget():
    rows = _rows([(5.0, True), (3.0, True), (2.0, False), (3.0, True), (4.0, True)])
    assert best_row([{"kind": "before", "step": 0, "ppl_spec": 1.0}, *rows]) is rows[1]
    assert best_row(_rows([(5.0, False)])) is None
    # Without a validation split every evaluation improves, so the last one within budget is kept.
    no_val = [dict(kind="eval", step=s, within_budget=True) for s in (2, 4)]
    assert best_row(no_val) is no_val[-1]
    assert not improves({"kind": "train", "ppl_spec": 0.1}, None)


def test_best_row_matches_a_plain_minimum_over_random_logs():
    import random

    rng = random.Random(0)
    for _ in range(200):
        rows = _rows([(rng.choice([1.0, 2.0, 3.0]), rng.random() < 0.7) for _ in range(rng.randint(0, 8))])
        within = [r for r in rows if r["within_budget"]]
        expected = min(within, key=lambda r: (r["ppl_spec"], r["step"])) if within else None
        assert best_row(rows) is expected

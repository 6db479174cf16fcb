"""Atomic writing: the old content or the new, never half, and no temp left behind."""

from __future__ import annotations

import pytest

from mft_pipeline.files import atomic_write, atomic_write_text


class Killed(Exception):
    pass


def test_file_is_replaced_and_a_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def half(tmp):
        tmp.write_text("ne")
        raise Killed

    with pytest.raises(Killed):
        atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_folder_is_swapped_whole_and_a_stale_temp_is_cleared(tmp_path):
    path = tmp_path / "last"

    def folder(text):
        def write(tmp):
            tmp.mkdir()
            (tmp / "weights").write_text(text)

        return write

    atomic_write(path, folder("one"), temp_name="last.tmp")
    (tmp_path / "last.tmp").mkdir()  # a save killed midway
    (tmp_path / "last.tmp" / "partial").write_text("x")
    atomic_write(path, folder("two"), temp_name="last.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert [p.name for p in path.iterdir()] == ["weights"] and (path / "weights").read_text() == "two"

    def half(tmp):
        tmp.mkdir()
        raise Killed

    with pytest.raises(Killed):
        atomic_write(path, half, temp_name="last.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and (path / "weights").read_text() == "two"

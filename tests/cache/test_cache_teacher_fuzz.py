"""Malformed corpora, made by a machine: `mft cache-teacher` either builds a sound cache or says why in one line.

Every case must end in exactly one of two ways: exit 0 with a cache that `mft cache-verify`
accepts, or exit 2 with one line ``error: ...`` (or click's usage error) and no cache folder
left behind (absent or empty). A traceback, any other exit code or a half-written folder fails.
"""

from __future__ import annotations

import shutil
import uuid

import pytest
from click.testing import CliRunner
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from cli.main import mft
from conftest import make_documents, write_jsonl
from corpus_strategies import EXAMPLES, SETTINGS, corpora
from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.cache.info import verify_cache


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def check_outcome(result, out, workers: int = 1):
    """Exit 0 with a sound cache (or, for one of several workers, its part), or exit 2 with one
    error line and no cache folder left behind."""
    if result.exit_code == 0:
        if workers > 1:
            assert len(list(out.glob("worker-*-of-*.json"))) == 1, sorted(p.name for p in out.iterdir())
            return
        assert verify_cache(out) == []
        return
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error: ", "Error: "))]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@settings(SETTINGS, max_examples=EXAMPLES)
@given(corpus=corpora())
def test_cache_teacher_builds_a_sound_cache_or_exits_2_leaving_nothing(tmp_path, tiny_model_dir, runner, corpus):
    suffix, data = corpus
    case = tmp_path / uuid.uuid4().hex
    case.mkdir()
    path = case / f"corpus{suffix}"
    path.write_bytes(data)
    out = case / "cache"
    args = ["cache-teacher", "--corpus", str(path), "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu",
            "--seq-len", "16", "--top-k", "3", "--val-fraction", "0.2", "--max-train-sequences", "6", "--max-val-sequences", "3"]
    result = runner.invoke(mft, args)
    event(f"exit {result.exit_code}")
    try:
        check_outcome(result, out)
    finally:
        shutil.rmtree(case, ignore_errors=True)


def number_text(low: int, high: int):
    """An option value as typed: an integer in range, or something else a user might type."""
    return st.one_of(
        st.integers(low, high).map(str),
        st.sampled_from(["0", "-1", "1.5", "nan", "inf", "-inf", "1e3", "", "abc", " 3", "99999999999999999999"]),
    )


OPTIONS = {
    "--seq-len": number_text(-2, 600),
    "--top-k": number_text(-2, 500),
    "--val-fraction": st.one_of(st.floats(-1, 2).map(str), st.sampled_from(["nan", "inf", "0", "0.999", "x"])),
    "--rows-per-shard": number_text(-1, 20),
    "--batch-size": number_text(-1, 20),
    "--num-workers": number_text(-1, 3),
    "--worker-index": number_text(-2, 3),
    "--max-train-sequences": number_text(-1, 20),
    "--max-val-sequences": number_text(-1, 20),
    "--sample-by": st.sampled_from(["paragraph", "line", "document", "sentence", ""]),
    "--backend": st.sampled_from(["transformers", "auto", "tensorflow", ""]),
    "--tail-samples": number_text(-1, 4),
    "--tail-seed": number_text(-2, 5),
}


def typed_int(value: str) -> int:
    """The integer click reads from ``value`` (it strips spaces, as ``int`` does), or 1 where it reads none."""
    try:
        return int(value)
    except ValueError:
        return 1


@settings(SETTINGS, max_examples=EXAMPLES)
@given(chosen=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})))
@example(chosen={"--tail-seed": "0", "--tail-samples": "99999999999999999999"})  # found by this test: once an OverflowError
@example(chosen={"--batch-size": "1", "--num-workers": " 3"})  # found by this test: click reads " 3" as 3 workers, the check read 1
def test_cache_teacher_option_values_give_a_cache_or_exit_2(tmp_path, tiny_model_dir, runner, chosen):
    case = tmp_path / uuid.uuid4().hex
    case.mkdir()
    corpus = write_jsonl(case / "corpus.jsonl", make_documents(12))
    out = case / "cache"
    base = {"--seq-len": "16", "--top-k": "3", "--max-train-sequences": "6", "--max-val-sequences": "3", "--device": "cpu", "--val-fraction": "0.2"}
    args = ["cache-teacher", "--corpus", str(corpus), "--out", str(out), "--model", str(tiny_model_dir)]
    for flag, value in {**base, **chosen}.items():
        args += [flag, value]
    result = runner.invoke(mft, args)
    event(f"exit {result.exit_code}")
    try:
        check_outcome(result, out, workers=typed_int(chosen.get("--num-workers", "1")))
    finally:
        shutil.rmtree(case, ignore_errors=True)

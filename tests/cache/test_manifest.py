"""Damaged manifest, settings and worker files: one clear line per bad field, never a traceback.

`mft cache-verify` exists for exactly these inputs: it reports each bad field as a failure (exit 1),
`mft cache-info` and the readers refuse the cache in one line (exit 2), and `mft cache-merge`
refuses bad settings or worker files in one line (exit 2).
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
from click.testing import CliRunner
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cli.main import mft
from conftest import make_documents, write_jsonl
from corpus_strategies import EXAMPLES, SETTINGS
from mft_pipeline.cache.format import MANIFEST, CacheError
from mft_pipeline.cache.info import merge_cache, verify_cache
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig
from mft_pipeline.stage_one import build_cache


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_model_dir):
    """A finished cache, and the two folders of a two-worker build of the same corpus."""
    d = tmp_path_factory.mktemp("manifest")
    corpus = write_jsonl(d / "c.jsonl", make_documents(30))
    cfg = dict(corpus=str(corpus), model=str(tiny_model_dir), device="cpu", seq_len=16, top_k=3, rows_per_shard=4, val_fraction=0.2)
    build_cache(CacheConfig(out=str(d / "cache"), **cfg))
    for i in range(2):
        build_cache(CacheConfig(out=str(d / f"part{i}"), num_workers=2, worker_index=i, **cfg))
    return d


def _copy(src, dst, edit=None, name=MANIFEST):
    """A copy of the folder ``src`` whose JSON file ``name`` went through ``edit`` (which changes it in place)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    edit(data)
    (dst / name).write_text(json.dumps(data))
    return dst


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    "edit, fields",
    [
        (lambda m: m.pop("seq_len"), ["seq_len: missing"]),
        (lambda m: m.update(seq_len="16"), ["seq_len: '16' is not an integer"]),
        (lambda m: [m.pop("seq_len"), m.pop("top_k")], ["top_k: missing", "seq_len: missing"]),
        (lambda m: m["model"].pop("vocab_size"), ["model.vocab_size: missing"]),
        (lambda m: m.update(tail_samples=-1), ["tail_samples: -1 is not an integer"]),
        (lambda m: m["splits"]["train"]["shards"][0].update(rows=None), ["splits.train.shards[0].rows: None is not an integer"]),
        (lambda m: m["splits"]["train"].pop("num_labels"), ["splits.train.num_labels: missing"]),
        (lambda m: m.update(splits=[]), ["splits: not an object"]),
    ],
)
def test_a_bad_manifest_field_is_a_verification_failure_and_a_one_line_error(parts, tmp_path, edit, fields):
    cache = _copy(parts / "cache", tmp_path / "cache", edit)
    problems = verify_cache(cache)
    assert len(problems) == len(fields)
    for problem, field in zip(problems, fields):
        assert problem.startswith(f"{cache / MANIFEST}: {field}"), problems
    verify = CliRunner().invoke(mft, ["cache-verify", str(cache)])
    assert verify.exit_code == 1 and "Traceback" not in verify.output
    assert [line for line in verify.output.splitlines() if line.strip()] == [f"FAIL {p}" for p in problems]
    info = CliRunner().invoke(mft, ["cache-info", str(cache)])
    assert info.exit_code == 2 and all(field in _one_error_line(info) for field in fields)
    with pytest.raises(CacheError, match=re.escape(fields[0])):
        Cache(cache)


@pytest.mark.parametrize("num_workers", ["2", 2.0, None, 0, True])
def test_merge_refuses_a_non_integer_num_workers_in_one_line(parts, tmp_path, num_workers):
    shared = tmp_path / "shared"
    shutil.copytree(parts / "part0", shared)
    shutil.copytree(parts / "part1", shared, dirs_exist_ok=True)
    (shared / MANIFEST).unlink(missing_ok=True)
    settings_file = shared / "cache-settings.json"
    data = json.loads(settings_file.read_text())
    data["num_workers"] = num_workers
    settings_file.write_text(json.dumps(data))
    in_place = CliRunner().invoke(mft, ["cache-merge", str(shared)])
    assert in_place.exit_code == 2 and "num_workers" in _one_error_line(in_place)
    assert not (shared / MANIFEST).exists()
    # The same settings in a folder of its own, joined with the other worker's folder.
    bad = _copy(parts / "part0", tmp_path / "bad-part0", lambda s: s.update(num_workers=num_workers), name="cache-settings.json")
    joined = CliRunner().invoke(mft, ["cache-merge", str(tmp_path / "merged"), str(bad), str(parts / "part1")])
    assert joined.exit_code == 2 and "num_workers" in _one_error_line(joined)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_damaged_worker_file_in_one_line(parts, tmp_path):
    def drop_sha256(part):
        next(iter(part["shards"].values())).pop("sha256")

    bad = _copy(parts / "part1", tmp_path / "bad-part1", drop_sha256, name="worker-00001-of-00002.json")
    result = CliRunner().invoke(mft, ["cache-merge", str(tmp_path / "merged"), str(parts / "part0"), str(bad)])
    assert result.exit_code == 2 and "sha256: missing" in _one_error_line(result)
    merged = merge_cache(tmp_path / "good", (parts / "part0", parts / "part1"))
    assert merged["splits"] == Cache(parts / "cache").manifest["splits"]


# Machine-made damage: any field of the manifest deleted or replaced by any JSON value.

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.sampled_from([-1, 0, 1, 2, 3, 16, 2**31, 10**30, "16", "", "train-00000.parquet", "../x.parquet"])),  # fmt: skip
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _paths(value, path=()):
    """Every path (a tuple of keys and indices) into a JSON value, the root's children and below."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield path + (key,)
        yield from _paths(child, path + (key,))


@settings(SETTINGS, max_examples=EXAMPLES)
@given(data=st.data())
def test_any_damaged_manifest_is_verified_or_refused_in_one_line(parts, tmp_path_factory, data):
    original = json.loads((parts / "cache" / MANIFEST).read_text())
    manifest = copy.deepcopy(original)
    path = data.draw(st.sampled_from(sorted(_paths(manifest), key=repr)))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[path[-1]]
        event("deleted")
    else:
        parent[path[-1]] = data.draw(json_values)
    cache = tmp_path_factory.mktemp("damaged")
    shutil.copytree(parts / "cache", cache, dirs_exist_ok=True)
    (cache / MANIFEST).write_text(json.dumps(manifest))

    problems = verify_cache(cache)
    assert all(isinstance(p, str) and len(p.splitlines()) == 1 for p in problems)
    verify = CliRunner().invoke(mft, ["cache-verify", str(cache)])
    assert verify.exit_code == (1 if problems else 0) and "Traceback" not in verify.output, (path, verify.output, verify.exception)
    info = CliRunner().invoke(mft, ["cache-info", str(cache)])
    event(f"cache-info exit {info.exit_code}, cache-verify exit {verify.exit_code}")
    if info.exit_code != 0:
        assert info.exit_code == 2, (path, info.output, info.exception)
        _one_error_line(info)
    shutil.rmtree(cache)

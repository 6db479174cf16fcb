"""Several real worker processes sharing one cache folder, and the manifest's trust boundary."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import mft
from conftest import make_documents, write_jsonl
from mft_pipeline.stage_one import build_cache
from mft_pipeline.cache.format import MANIFEST, CacheError, temp_name, write_json_once
from mft_pipeline.cache.info import merge_cache, verify_cache
from mft_pipeline.cache.reader import Cache
from mft_pipeline.config import CacheConfig

ROOT = Path(__file__).resolve().parents[2]
WORKER_FLAGS = os.environ.get("MFT_TEST_WORKER_FLAGS", "--num-workers,--worker-index").split(",")
SETTINGS = dict(seq_len=16, top_k=3, rows_per_shard=1, batch_size=1, val_fraction=0.1)


def shard_digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.parquet"))}


def start_worker(corpus, out, model, index, count):
    args = [sys.executable, "-m", "cli.main", "cache-teacher", "--corpus", str(corpus), "--out", str(out), "--model", str(model)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    args += [f"{WORKER_FLAGS[0]}={count}", f"{WORKER_FLAGS[1]}={index}", "--device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_three_workers_sharing_a_folder_build_the_one_worker_cache(tmp_path, tiny_model_dir):
    # Many one-row shards keep every worker writing temp files most of the time, and the
    # staggered starts make later workers join while earlier ones are mid-write: the moments
    # at which a worker that cleans up other workers' files, or that mistakes a folder being
    # set up for a broken one, would fail.
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(80, seed=11))
    one = build_cache(CacheConfig(corpus=str(corpus), out=str(tmp_path / "one"), model=str(tiny_model_dir), device="cpu", **SETTINGS))
    expected = shard_digests(one)
    assert len(expected) > 100
    # One round exposes the races nearly always; more rounds while the time allows.
    deadline = time.monotonic() + 20
    rounds = 0
    while rounds < 1 or (rounds < 3 and time.monotonic() < deadline):
        out = tmp_path / f"shared-{rounds}"
        workers = []
        for i in range(3):
            workers.append(start_worker(corpus, out, tiny_model_dir, i, 3))
            time.sleep(0.15 * (rounds + 1))
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        for i, (w, text) in enumerate(zip(workers, outputs)):
            assert w.returncode == 0, f"round {rounds}, worker {i} failed:\n{text[-2000:]}"
        result = CliRunner().invoke(mft, ["cache-verify", str(out)])
        assert result.exit_code == 0, result.output
        assert shard_digests(out) == expected
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        rounds += 1


def test_worker_joining_while_another_sets_up_the_folder(tmp_path, tiny_model_dir):
    """A folder that holds only another worker's files in progress is a cache being made, not a broken one."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    out = tmp_path / "shared"
    out.mkdir()
    # What worker 0 has on disk while it writes its settings and first shard.
    in_progress = [temp_name("cache-settings.json", 0), temp_name("train-00000.parquet", 0)]
    for name in in_progress:
        (out / name).write_bytes(b"being written")
    cfg = dict(corpus=str(corpus), model=str(tiny_model_dir), device="cpu", **SETTINGS)
    build_cache(CacheConfig(out=str(out), num_workers=2, worker_index=1, **cfg))
    assert all((out / name).exists() for name in in_progress), "a worker deleted another worker's temp files"
    # Worker 0's own leftovers are its to clean up, once it runs.
    build_cache(CacheConfig(out=str(out), num_workers=2, worker_index=0, **cfg))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert verify_cache(out) == []


def test_settings_are_created_once_and_compared_after(tmp_path):
    path = tmp_path / "cache-settings.json"
    assert write_json_once(path, {"k": 1}, worker=0) is None
    assert write_json_once(path, {"k": 2}, worker=1) == {"k": 1}
    assert json.loads(path.read_text()) == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["cache-settings.json"]


def test_json_written_by_many_processes_at_once_stays_whole(tmp_path):
    """Two workers that finish together both write the manifest; neither may fail or leave a torn file."""
    path = tmp_path / "manifest.json"
    code = (
        "import sys; from pathlib import Path; from mft_pipeline.cache.format import write_json_atomic\n"
        "for n in range(100): write_json_atomic(Path(sys.argv[1]), {'writer': int(sys.argv[2]), 'n': n, 'pad': 'x' * 5000}, int(sys.argv[2]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(i)], env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert json.loads(path.read_text())["n"] == 99
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


@pytest.mark.parametrize("bad", ["../outside.parquet", "/etc/hostname", "sub/train-00000.parquet", "train-00000.parquet/..", "notes.txt", 7])
def test_manifest_shard_names_outside_the_folder_are_refused(tmp_path, tiny_model_dir, bad):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    cache = tmp_path / "cache"
    build_cache(CacheConfig(corpus=str(corpus), out=str(cache), model=str(tiny_model_dir), device="cpu", seq_len=16, top_k=3))
    # A real shard outside the cache, so a reader that followed the name would find a valid file.
    (tmp_path / "outside.parquet").write_bytes((cache / "train-00000.parquet").read_bytes())
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = bad
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="not a shard file name"):
        Cache(cache)
    problems = verify_cache(cache)
    assert problems and "not a shard file name" in problems[0]
    result = CliRunner().invoke(mft, ["cache-verify", str(cache)])
    assert result.exit_code == 1 and "not a shard file name" in result.output


def test_worker_file_shard_names_are_refused_by_merge(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    part = tmp_path / "part"
    build_cache(CacheConfig(corpus=str(corpus), out=str(part), model=str(tiny_model_dir), device="cpu", seq_len=16, top_k=3))
    worker_file = part / "worker-00000-of-00001.json"
    record = json.loads(worker_file.read_text())
    record["shards"]["../outside.parquet"] = next(iter(record["shards"].values()))
    worker_file.write_text(json.dumps(record))
    with pytest.raises(CacheError, match="not a shard file name"):
        merge_cache(tmp_path / "merged", (part,))
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.merging").exists()


def test_old_worker_flag_names_still_work(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    base = ["cache-teacher", "--corpus", str(corpus), "--model", str(tiny_model_dir), "--device", "cpu", "--seq-len", "16", "--top-k", "3"]
    for flags, out in ((["--num-shards", "2", "--shard-index", "1"], "old"), (["--num-workers", "2", "--worker-index", "1"], "new")):
        result = CliRunner().invoke(mft, base + flags + ["--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        assert [p.name for p in (tmp_path / out).glob("worker-*.json")] == ["worker-00001-of-00002.json"]
    assert shard_digests(tmp_path / "old") == shard_digests(tmp_path / "new")
    assert json.loads((tmp_path / "old" / "cache-settings.json").read_text())["num_workers"] == 2


def test_overwrite_by_one_of_two_workers_replaces_only_its_own_part(tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    cfg = dict(corpus=str(corpus), model=str(tiny_model_dir), device="cpu", seq_len=16, top_k=3, rows_per_shard=4)
    expected = shard_digests(build_cache(CacheConfig(out=str(tmp_path / "one"), **cfg)))
    out = tmp_path / "shared"
    for i in range(2):
        build_cache(CacheConfig(out=str(out), num_workers=2, worker_index=i, **cfg))
    plan = json.loads((out / "cache-settings.json").read_text())["plan"]
    names = [s["file"] for s in plan if s["worker"] == 0] + ["worker-00000-of-00002.json"]
    assert len(names) > 2
    worker_0 = {name: (out / name).stat().st_mtime_ns for name in names}
    build_cache(CacheConfig(out=str(out), num_workers=2, worker_index=1, overwrite=True, **cfg))
    # Worker 0's shards and worker file are the very files it wrote; worker 1 rewrote its part and, last, the manifest.
    assert {name: (out / name).stat().st_mtime_ns for name in names if (out / name).exists()} == worker_0
    assert verify_cache(out) == [] and shard_digests(out) == expected
    # Another cache's settings would leave worker 0's part stale: refused, nothing deleted.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CacheError, match="(?s)other settings.*top_k.*only this worker's part"):
        build_cache(CacheConfig(out=str(out), num_workers=2, worker_index=1, overwrite=True, **{**cfg, "top_k": 2}))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_workers_reading_the_corpus_and_model_from_other_paths_share_a_cache(tmp_path, tiny_model_dir):
    """Workers on two machines: the same corpus and model at other paths; their fingerprints are what must agree."""
    import shutil

    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    cfg = dict(device="cpu", seq_len=16, top_k=3, rows_per_shard=4)
    expected = shard_digests(build_cache(CacheConfig(corpus=str(corpus), out=str(tmp_path / "one"), model=str(tiny_model_dir), **cfg)))
    (tmp_path / "machine-b").mkdir()
    other_corpus = shutil.copy(corpus, tmp_path / "machine-b" / "docs.jsonl")
    other_model = shutil.copytree(tiny_model_dir, tmp_path / "machine-b" / "model")
    paths = [(corpus, tiny_model_dir), (other_corpus, other_model)]
    # One shared folder, and one folder per machine joined by cache-merge.
    for i, (c, m) in enumerate(paths):
        build_cache(CacheConfig(corpus=str(c), model=str(m), out=str(tmp_path / "shared"), num_workers=2, worker_index=i, **cfg))
        build_cache(CacheConfig(corpus=str(c), model=str(m), out=str(tmp_path / f"part{i}"), num_workers=2, worker_index=i, **cfg))
    result = CliRunner().invoke(mft, ["cache-merge", str(tmp_path / "merged"), str(tmp_path / "part0"), str(tmp_path / "part1")])
    assert result.exit_code == 0, result.output
    for cache in ("shared", "merged"):
        assert verify_cache(tmp_path / cache) == [] and shard_digests(tmp_path / cache) == expected
    # A different corpus is still refused, in a shared folder and in a merge.
    changed = write_jsonl(tmp_path / "machine-b" / "changed.jsonl", make_documents(30, seed=1))
    with pytest.raises(CacheError, match="other settings(.|\n)*corpus.fingerprint"):
        build_cache(CacheConfig(corpus=str(changed), model=str(other_model), out=str(tmp_path / "shared"), num_workers=2, worker_index=1, resume=True, **cfg))
    build_cache(CacheConfig(corpus=str(changed), model=str(other_model), out=str(tmp_path / "changed1"), num_workers=2, worker_index=1, **cfg))
    with pytest.raises(CacheError, match="other settings(.|\n)*corpus.fingerprint"):
        merge_cache(tmp_path / "mixed", (tmp_path / "part0", tmp_path / "changed1"))

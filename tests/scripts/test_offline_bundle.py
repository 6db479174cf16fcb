"""The offline bundle: parts of at most --max-mib join back to the very bytes bundled, or refuse to."""

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "offline_bundle.py"
spec = importlib.util.spec_from_file_location("offline_bundle", SCRIPT)
offline_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_bundle)


def fake_bundle_tar(path: Path) -> dict[str, bytes]:
    """A tar laid out as ``make`` lays it out, with small made-up files."""
    files = {
        "mft-pipeline/benchmarks/gpu_check.py": b"print('check')\n",
        "wheels/x-1.0-py3-none-any.whl": bytes(range(256)) * 40,
        "model/m.gguf": b"GGUF" + bytes(i % 251 for i in range(30_000)),
        "work/data/legal-docs20000.jsonl": "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(500)).encode(),
    }
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return files


def split_bundle(tmp_path, max_bytes=10_000):
    """The fake tar split into ``tmp_path/out``; returns (tar, its files, the parts' folder, the manifest)."""
    src = tmp_path / "bundle.tar"
    files = fake_bundle_tar(src)
    out = tmp_path / "out"
    out.mkdir()
    return src, files, out, offline_bundle.split_file(src, out, max_bytes)


def test_split_join_unpack_round_trip(tmp_path):
    max_bytes = 10_000
    src, files, out, manifest = split_bundle(tmp_path, max_bytes)
    parts = sorted(out.glob("bundle.tar.*"))
    assert [p.name for p in parts] == [p["name"] for p in manifest["parts"]] and len(parts) > 3
    assert all(p.stat().st_size <= max_bytes for p in parts)
    assert json.loads((out / "manifest.json").read_text()) == manifest

    joined = offline_bundle.join_parts(out, tmp_path / "joined")
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest() == manifest["sha256"]

    dest = tmp_path / "dest"
    repo = offline_bundle.unpack(out, dest, install=False)
    assert repo == dest / "mft-pipeline"
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert not (dest / "bundle.tar").exists()


def test_a_damaged_or_missing_part_is_refused(tmp_path):
    _, _, out, manifest = split_bundle(tmp_path)
    second = out / manifest["parts"][1]["name"]
    data = second.read_bytes()
    second.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(offline_bundle.BundleError, match="damaged"):
        offline_bundle.join_parts(out, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    second.unlink()
    with pytest.raises(offline_bundle.BundleError, match="missing"):
        offline_bundle.unpack(out, tmp_path / "dest2", install=False)
    assert not (tmp_path / "dest2").exists()


def test_a_joined_file_that_differs_from_the_bundled_one_is_removed(tmp_path):
    """Parts intact but the whole's sha256 differs (parts from another bundle): nothing joined is left behind."""
    _, _, out, manifest = split_bundle(tmp_path)
    (out / "manifest.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(offline_bundle.BundleError, match="does not match"):
        offline_bundle.join_parts(out, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_unpack_command_exits_2_on_a_damaged_bundle(tmp_path, capsys):
    _, _, out, _ = split_bundle(tmp_path)
    (out / "bundle.tar.000").write_bytes(b"x")
    assert offline_bundle.main(["unpack", str(out), "--dest", str(tmp_path / "d"), "--no-install"]) == 2
    assert "bundle.tar.000 is damaged" in capsys.readouterr().err

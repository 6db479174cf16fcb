"""The GPU check: its rehearsal runs every code path on CPU, and what it carries fits the device's limits."""

import csv
import hashlib
import json

import pytest

from benchmarks.gpu_check import (
    CARRY_LIMIT, MAX_OUT_FILES, MiB, CarryError, join_parts, plan_carry, prepare_carry, rehearse, split_file, unpack_corpora,
)  # fmt: skip


def test_rehearsal_writes_every_result_file(tmp_path):
    """Speed (stage one and two) and quality (joined model, carried corpora) at tiny sizes, as the device calls run them."""
    out = tmp_path / "out"
    out.mkdir()
    r = rehearse(out, n_models=1)
    names = sorted(f.name for f in out.iterdir())
    assert len(names) <= MAX_OUT_FILES
    assert {"speed.json", "speed.md", "quality.json", "quality.md", "runs.csv"} <= set(names)
    drafts = [n for n in names if n.startswith("gpu-") and n.endswith(".md")]
    assert len(drafts) == 1

    speed = json.loads((out / "speed.json").read_text())
    assert speed["errors"] == {}
    (model,) = speed["models"].values()
    one, two = model["stage_one"], model["stage_two"]
    assert one["tokens_per_s"]["forward"] > 0 and one["tokens_per_s"]["score"] > 0
    per_repeat = sorted(f / s for f, s in zip(one["seconds"]["forward"], one["seconds"]["score"]))
    assert per_repeat[0] <= one["score_vs_forward"] <= per_repeat[-1]
    assert set(two["speed"]["tokens_per_s"]) == {"offline", "ft", "online"}
    assert two["speed"]["fused"] is True
    assert two["peak"]["ft"]["peak"] > 0 and two["loss"]["fused"]["growth"] > 0
    assert speed["ratios"]["offline_vs_ft_speed"] == two["offline_vs_ft_speed"]
    assert speed["ratios"]["loss_peak_memory_vs_ft_naive_128k"] is None  # no tiny model has a 128k vocabulary

    rows = list(csv.DictReader(open(out / "runs.csv")))
    # FT and MFT x 3 domains x 2 seeds (the rehearsal's; the GPU runs 3).
    assert sorted((r["domain"], r["method"], r["seed"]) for r in rows) == sorted(
        (d, m, s) for d in ("legal", "math", "code") for m in ("FT", "MFT") for s in ("0", "1"))
    assert all(r["S"] != "" for r in rows)

    quality = json.loads((out / "quality.json").read_text())
    assert quality["model_sha256"] == r["quality"]["model_sha256"]
    text = (out / "quality.md").read_text()
    assert "<stash>" in text and str(tmp_path) not in text
    draft = (out / drafts[0]).read_text()
    assert "## Speed" in draft and "## Quality" in draft and "| legal | 2 |" in draft
    assert "stage one (score) tokens/s vs the plain forward" in draft and str(tmp_path) not in draft


REPO = 2 * MiB


@pytest.mark.parametrize("gguf, wheels, corpora", [
    (98 * MiB, 7 * MiB, 12 * MiB),  # about what SmolLM2-135M's GGUF, the five wheels and the xz'd corpora weigh
    (98 * MiB, 1 * MiB, 20 * MiB),
    (10 * MiB, 1 * MiB, 1 * MiB),
])  # fmt: skip
def test_plan_carry_keeps_each_call_under_the_limit(gguf, wheels, corpora):
    sizes = plan_carry(gguf, wheels, corpora, REPO)
    assert sizes["part1"] + sizes["part2"] == gguf and min(sizes["part1"], sizes["part2"]) >= 0
    assert sizes["call1"] == REPO + wheels + sizes["part1"] and sizes["call2"] == REPO + corpora + sizes["part2"]
    assert max(sizes["call1"], sizes["call2"]) <= CARRY_LIMIT - 2 * MiB
    if min(sizes["part1"], sizes["part2"]) > 0:  # the spare room is shared: equal margins under the limit
        assert abs(sizes["call1"] - sizes["call2"]) <= 1


def test_plan_carry_refuses_what_cannot_fit():
    with pytest.raises(CarryError, match="cannot carry a 98.0 MiB model"):
        plan_carry(98 * MiB, 7 * MiB, 30 * MiB, REPO)
    with pytest.raises(CarryError):
        plan_carry(1 * MiB, 70 * MiB, 0, REPO)


def test_join_parts_checks_the_sha256(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    a, b = tmp_path / "p1", tmp_path / "p2"
    split_file(src, 100_001, a, b)
    assert a.stat().st_size == 100_001 and a.stat().st_size + b.stat().st_size == src.stat().st_size
    joined = join_parts([a, b], tmp_path / "joined.gguf", digest)
    assert joined.read_bytes() == src.read_bytes()

    b.write_bytes(b.read_bytes()[:-1] + b"x")
    with pytest.raises(CarryError, match="sha256"):
        join_parts([a, b], tmp_path / "bad.gguf", digest)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.tmp").exists()
    with pytest.raises(CarryError, match="within ~30 s of call 1"):
        join_parts([tmp_path / "gone", b], tmp_path / "x.gguf", digest)


def test_prepare_carry_round_trip(tmp_path):
    """Both calls' folders hold what the device needs; the parts join back to the model, the corpora unpack as prepared."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(300_000))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    corpus = tmp_path / "legal-docs20000.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)))
    dest = tmp_path / "carry"
    manifest = prepare_carry(dest, wheels, model, {corpus.name: corpus}, repo=REPO)
    assert (dest / "call1" / "wheels" / "x-1.0-py3-none-any.whl").is_file()
    assert json.loads((dest / "call1" / "manifest.json").read_text()) == json.loads((dest / "call2" / "manifest.json").read_text())
    stash = tmp_path / "stash"
    stash.mkdir()
    for sub in ("call1", "call2"):  # what scripts/gpu-check.sh does on the device
        for f in (dest / sub).rglob("*"):
            if f.is_file():
                target = stash / f.relative_to(dest / sub)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
    joined = join_parts([stash / p for p in manifest["parts"]], tmp_path / "joined.gguf", manifest["sha256"])
    assert joined.read_bytes() == model.read_bytes()
    (unpacked,) = unpack_corpora(stash / "data", tmp_path / "data")
    assert unpacked.name == corpus.name and unpacked.read_text() == corpus.read_text()
    assert (dest / "call2" / "data" / f"{corpus.name}.xz").stat().st_size < corpus.stat().st_size / 5
    assert manifest["sizes"]["call1"] <= CARRY_LIMIT and manifest["sizes"]["call2"] <= CARRY_LIMIT

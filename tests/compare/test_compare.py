"""`mft compare`: its settings, user corpora checked before training, the plan, and the whole protocol on a tiny model."""

import csv
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import mft_pipeline
from cli.main import mft
from conftest import make_documents, write_jsonl
from mft_pipeline.compare.protocol import PROFILES, SAMPLED_K, SAMPLED_N, Throughput, estimate_minutes, make_plan, planned_runs
from mft_pipeline.compare.results import Report, Row, interval_of, sizing_lines, write_csv
from mft_pipeline.compare.runs import command_line, open_corpus, plan_line, size_warnings
from mft_pipeline.config import CompareConfig, parse_domains
from mft_pipeline.data.corpus import CorpusError
from mft_pipeline.errors import ConfigError

GENERAL_WORDS = "river mountain bread music travel garden weather friend morning letter window city song".split()


def compare(*args):
    return CliRunner().invoke(mft, ["compare", *map(str, args)])


def test_parse_domains():
    assert parse_domains(["a=x.jsonl", "b_2=dir/with=sign"]) == {"a": Path("x.jsonl"), "b_2": Path("dir/with=sign")}
    for bad in (["x.jsonl"], ["=x.jsonl"], ["a="], ["a b=x"], ["a/b=x"]):
        with pytest.raises(ConfigError, match="--domain"):
            parse_domains(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_domains(["a=x", "a=y"])


def test_settings_are_checked_before_anything_runs(tmp_path):
    for args, message in (
        (["--domain", "x.jsonl"], "expected NAME=PATH"),
        (["--quick", "--profile", "cpu"], "--quick is the quick profile"),
        (["--methods", "FT,XFT"], "--methods: unknown XFT"),
        (["--skip", "frontier,everything"], "--skip: unknown everything"),
        (["--profile", "huge"], "--profile huge: choose from quick, cpu, gpu, smoke"),
        (["--frontier-domain", "poetry"], "not one of the domains legal, sympy, code"),
        (["--seeds", "0"], "seeds must be an integer >= 1"),
    ):
        result = compare("--out", tmp_path / "out", *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


def test_quick_is_one_domain_ft_against_mft_in_under_30_minutes():
    plan = make_plan(CompareConfig(quick=True))
    p = plan.profile
    assert (plan.profile_name, plan.domains, plan.methods, p.seeds) == ("quick", ["legal"], ["FT", "MFT"], 3)
    assert plan.skip == {"frontier", "tail-samples", "fidelity", "low-data"}
    counts = planned_runs(p, plan.methods, 1, plan.skip)
    assert counts == dict(reference=1, cached=6, online=0, caches=2, low_data=0)
    minutes = sum(estimate_minutes(p, counts, p.throughput).values())
    # The estimate leaves room for preparing the model and corpora, and for a slower machine.
    assert 15 < minutes < 25
    assert f"about {minutes:.0f} minutes" in plan_line("quick", p, counts)
    # --quick with your own domain: that domain alone.
    assert make_plan(CompareConfig(quick=True, domain=("mine=docs.jsonl",))).domains == ["mine"]
    assert make_plan(CompareConfig(quick=True, skip="", lr=1e-5)).skip == set() and make_plan(CompareConfig(lr=1e-5)).profile.lr == 1e-5
    assert make_plan(CompareConfig(seeds=5)).profile.other_seeds == 5


def test_command_line_gives_back_the_settings():
    config = CompareConfig(domain=("a=my docs.jsonl", "b=x"), quick=True, lr=3e-5, out="res")
    assert command_line(config) == "mft compare --domain 'a=my docs.jsonl' --domain b=x --out res --quick --lr 3e-05"
    assert command_line(CompareConfig()) == "mft compare"


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
    result = compare("--profile", "smoke", "--model", tmp_path / "no-model", "--domain", f"mine={path}", "--out", tmp_path / "out")
    assert result.exit_code == 2 and result.output.startswith("error: --domain mine: ") and str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_general_corpus_is_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", make_documents(40))
    result = compare("--profile", "smoke", "--general", tmp_path / "gone", "--domain", f"mine={good}", "--out", tmp_path / "out")
    assert result.exit_code == 2 and result.output.startswith("error: --general: ") and "no such file" in result.output


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


def user_corpora(tmp_path) -> dict[str, Path]:
    legal = write_jsonl(tmp_path / "legal.jsonl", make_documents(60, seed=3))
    notes = tmp_path / "notes"
    notes.mkdir(exist_ok=True)
    for i, chunk in enumerate((make_documents(30, seed=4), make_documents(30, seed=5))):
        (notes / f"part{i}.txt").write_text("\n\n".join(chunk))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6, words=GENERAL_WORDS))
    return dict(legal=legal, notes=notes, general=general)


def test_smoke_profile_end_to_end_on_user_corpora(tmp_path, tiny_model_dir):
    """The whole protocol (reference, seeds, paired comparison, frontier, fidelity, low data) on a tiny model, then resumed."""
    data = user_corpora(tmp_path)
    out = tmp_path / "results"
    args = ["--profile", "smoke", "--model", tiny_model_dir, "--domain", f"legal={data['legal']}", "--domain", f"notes={data['notes']}",
            "--general", data["general"], "--out", out, "--work", tmp_path / "work"]  # fmt: skip
    started = time.time()
    result = compare(*args)
    first = time.time() - started
    assert result.exit_code == 0, result.output
    assert "plan (smoke profile): 32 runs (8 of them online dense) and 7 caches" in result.output
    (results,) = out.glob(f"quality-smoke-{tiny_model_dir.name}-general-general-legal-notes.md")
    assert f"wrote {results}" in result.output
    text = results.read_text()
    figures = results.with_suffix("")
    rows = list(csv.DictReader(open(figures / "runs.csv")))
    # FT and MFT x 2 domains x 2 seeds; frontier: 3 more cached tau, 4 sampled-tail tau and 4 online tau x 2 seeds;
    # fidelity k=5, 50 x 1 seed.
    assert len(rows) == 8 + 22 + 2
    counts = planned_runs(PROFILES["smoke"], ["FT", "MFT"], 2, set())
    assert counts["cached"] + counts["online"] == len(rows) and counts["online"] == 8
    assert {r["seed"] for r in rows} == {"0", "1"}
    ft = {r["seed"]: r for r in rows if r["method"] == "FT" and r["domain"] == "legal"}
    assert ft["0"]["S"] != ft["1"]["S"], "seeds must change the run (data order)"
    assert ft["0"]["lr"] == "0.001" and ft["0"]["step"] in ("1", "2") and ft["0"]["lambda"] == ""
    assert {r["k"] for r in rows if r["method"].endswith("online")} == {"dense"}
    assert all(int(r["general_eval_tokens"]) > 0 and int(r["spec_eval_tokens"]) > 0 for r in rows)
    sampled = [r for r in rows if r["tail_samples"] != "0"]
    assert len(sampled) == 8 and {(r["k"], r["tail_samples"]) for r in sampled} == {(str(SAMPLED_K), str(SAMPLED_N))}
    assert f"k = {SAMPLED_K} + {SAMPLED_N} tail samples against online dense" in text and "Bytes per training token: k = 20 cache" in text
    mft_rows = {r["seed"]: r for r in rows if r["method"] == "MFT" and r["domain"] == "legal"}
    assert mft_rows["0"]["tau"] == "0.25" and ft["0"]["tau"] == ""
    assert "## MFT against FT, paired by seed" in text and "| legal | 2 |" in text and "| notes | 2 |" in text
    assert "frontier" in text and (figures / "frontier.png").stat().st_size > 0 and (figures / "low-data.png").exists()
    assert "mean ± t(0.975, n−1)" in text and "Planned work: reference 1, cached 24, online 8" in text
    assert "## What this size can and cannot tell" in text and "- **2 seeds.** A 95% interval is the mean ± 12.71" in text
    assert f"Command: `mft compare --domain legal={data['legal']}" in text
    assert "reading" not in text

    # A hand-written reading beside the results is linked, never rewritten; every run is read back, nothing retrains.
    reading = results.with_suffix(".reading.md")
    reading.write_text("# What we make of it\n")
    summaries = sorted((tmp_path / "work").rglob("summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    started = time.time()
    assert compare(*args).exit_code == 0
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert time.time() - started < first
    assert json.loads(summaries[0].read_text())["best"] is not None
    assert reading.read_text() == "# What we make of it\n"
    assert f"[{reading.name}]({reading.name})" in results.read_text()


def test_out_defaults_to_a_folder_in_the_working_directory(tmp_path, tiny_model_dir, monkeypatch):
    data = user_corpora(tmp_path)
    monkeypatch.chdir(tmp_path)
    package = sorted(p for p in Path(mft_pipeline.__file__).parent.rglob("*") if "__pycache__" not in p.parts)
    result = compare("--profile", "smoke", "--model", tiny_model_dir, "--domain", f"legal={data['legal']}", "--general", data["general"],
                     "--seeds", "1", "--skip", "frontier,fidelity,low-data")  # fmt: skip
    assert result.exit_code == 0, result.output
    results = tmp_path / "mft-compare" / f"quality-smoke-{tiny_model_dir.name}-general-general-legal.md"
    assert results.is_file() and (results.with_suffix("") / "runs.csv").is_file() and (tmp_path / "mft-compare" / "work").is_dir()
    assert sorted(p for p in Path(mft_pipeline.__file__).parent.rglob("*") if "__pycache__" not in p.parts) == package
    text = results.read_text()
    assert "- **One operating point, not a frontier.** Every method trains 2 steps" in text
    assert "- **1 paired seed(s): no interval, so no verdict.**" in text


def test_estimate_minutes_by_hand():
    p = replace(PROFILES["smoke"], steps=10, batch_size=2, seq_len=50, eval_every=5, general_sequences=2, val_sequences=1)
    tp = Throughput(train=100.0, eval=300.0, online=50.0, overhead_s=4.0, measured="by hand")
    # 1,000 training tokens at 100/s = 10 s; 3 evaluations of 150 tokens at 300/s = 1.5 s; plus 4 s.
    minutes = estimate_minutes(p, {"cached": 6, "online": 2}, tp)
    assert minutes["cached"] == pytest.approx(6 * 15.5 / 60) and minutes["online"] == pytest.approx(2 * 25.5 / 60)


def test_planned_runs_counts_seeds_per_method():
    p = PROFILES["cpu"]  # 3 seeds for FT, MFT and the frontier, 1 for the rest
    counts = planned_runs(p, ["FT", "MFT", "LoRA r8", "distill+ft"], 3, {"low-data"})
    # table, distill+ft, frontier tau 0/0.1/0.5, its sampled-tail line, fidelity k=5/50
    assert counts["cached"] == 3 * (3 + 3 + 1) + 1 + 3 * 3 + 3 * 4 + 2
    assert counts["online"] == 3 * 4 and counts["low_data"] == 0
    assert planned_runs(replace(p, seeds=2, other_seeds=2), ["FT"], 1, {"frontier", "fidelity", "low-data"})["cached"] == 2
    without = planned_runs(p, ["FT", "MFT", "LoRA r8", "distill+ft"], 3, {"low-data", "tail-samples"})
    assert (counts["cached"] - without["cached"], counts["caches"] - without["caches"]) == (3 * 4, 1)
    assert planned_runs(p, ["FT", "Replay 0.5"], 1, set(PROFILES["quick"].skip))["caches"] == 1 + 1 + 1


def test_undefined_dg_over_s_drops_out_of_means_and_csv(tmp_path):
    rows = {seed: Row(seed, "d", "FT", None, 20, 0, s, 0.1, 0.1 / s if s > 0 else float("nan"), 100, 50) for seed, s in enumerate((0.2, 0.4, -0.1))}
    iv = interval_of(rows, "DG_over_S")
    assert iv.n == 2 and iv.mean == pytest.approx((0.5 + 0.25) / 2)
    assert interval_of(rows, "S").n == 3
    write_csv(list(rows.values()), tmp_path / "runs.csv")
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert lines[0] == "seed,domain,method,tau,k,tail_samples,S,DG,DG_over_S,general_eval_tokens,spec_eval_tokens,lr,lambda,alpha,rank,step"
    assert lines[-1] == "2,d,FT,,20,0,-0.100000,0.100000,,100,50,,,,,"
    assert not math.isnan(float(lines[1].split(",")[8]))


def test_sizing_section_shows_the_arithmetic():
    p = PROFILES["cpu"]
    tp = p.throughput
    # The protocol's floors, in predicted tokens (a packed row of seq_len tokens predicts seq_len - 1).
    assert p.train_tokens >= 40_000 and p.general_sequences * (p.seq_len - 1) >= 16_384 and p.val_sequences * (p.seq_len - 1) >= 8_192
    counts = planned_runs(p, list(p.methods), 3, set())
    report = Report(name="x", command="", model="", model_folder="", profile=p, domains=[], general="", skip=set(), counts=counts, seconds=60.0)
    text = "\n".join(sizing_lines(report))
    assert f"{p.train_tokens:,} training tokens / {tp.train:.0f} = {p.train_tokens / tp.train / 60:.1f} min" in text
    assert f"| online | {counts['online']} |" in text
    assert f"| total | | {sum(estimate_minutes(p, counts, tp).values()):.0f} (this run: 1" in text

"""The fair frontier of `mft compare --families`: its plan and sizing, the envelope and S-at-equal-DG math against
an independent float64 computation, and a smoke run on a tiny model, resumed."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from cli.main import mft
from conftest import make_documents, write_jsonl
from mft_pipeline.cache.info import cache_info
from mft_pipeline.compare.protocol import FAMILIES, PENALTY_LAMBDAS, estimate_minutes, frontier_points, make_plan, planned_frontier
from mft_pipeline.compare.results import Row, family_verdict, verdict_text, write_csv
from mft_pipeline.compare.runs import wise_ft_scores
from mft_pipeline.compare.stats import frontier_gap, s_at_dg, upper_envelope
from mft_pipeline.config import CompareConfig, EvalConfig
from mft_pipeline.errors import ConfigError
from mft_pipeline.eval.score import eval_sets
from mft_pipeline.models import load_tokenizer
from mft_pipeline.run_folder import RunFolder

GENERAL_WORDS = "river mountain bread music travel garden weather friend morning letter window city song".split()


def reference_envelope(cloud: np.ndarray) -> np.ndarray:
    """Brute force in float64: keep each (S, DG) no other point dominates (S >= and DG <= with one strict), by DG."""
    keep = [
        i for i, (s, d) in enumerate(cloud)
        if not any((s2 >= s and d2 <= d and (s2 > s or d2 < d)) for j, (s2, d2) in enumerate(cloud) if j != i)
    ]  # fmt: skip
    kept = np.unique(cloud[keep], axis=0)
    return kept[np.argsort(kept[:, 1])]


def test_envelope_and_s_at_equal_dg_against_brute_force():
    # By hand: (0.5, 0.5) is beaten by (2, 1)? No: by (1, 0), which has more S at less DG.
    cloud = [(1.0, 0.0), (0.5, 0.5), (3.0, 2.0), (2.0, 1.0), (4.0, 5.0), (2.5, 3.0)]
    assert upper_envelope(cloud) == [(1.0, 0.0), (2.0, 1.0), (3.0, 2.0), (4.0, 5.0)]
    assert s_at_dg(upper_envelope(cloud), 1.5) == pytest.approx(2.5) and s_at_dg(upper_envelope(cloud), 3.5) == pytest.approx(3.5)
    assert upper_envelope([(1.0, 2.0), (3.0, 2.0)]) == [(3.0, 2.0)]  # equal DG: the most S

    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.uniform(0, 10, size=(12, 2)), rng.uniform(0, 10, size=(8, 2))
        ea, eb = reference_envelope(a), reference_envelope(b)
        assert np.allclose(np.array(upper_envelope([tuple(p) for p in a])), ea)
        gap = frontier_gap(upper_envelope([tuple(p) for p in a]), upper_envelope([tuple(p) for p in b]), points=7)
        low, high = max(ea[0, 1], eb[0, 1]), min(ea[-1, 1], eb[-1, 1])
        if low > high:
            assert gap.rows == []
            continue
        grid = np.linspace(low, high, 7) if low < high else np.array([low])
        expected = np.interp(grid, eb[:, 1], eb[:, 0]) - np.interp(grid, ea[:, 1], ea[:, 0])
        assert np.allclose([r[0] for r in gap.rows], grid) and np.allclose(gap.gaps, expected)


def rows_of(family: str, points: dict[tuple, list[tuple[float, float]]]) -> list[Row]:
    """Rows of one family: (lr, step) -> [(S, DG) per seed], in fractions."""
    return [
        Row(seed, "legal", family, None, 20, 0, s, d, d / s, 100, 50, lr=lr, step=step)
        for (lr, step), per_seed in points.items()
        for seed, (s, d) in enumerate(per_seed)
    ]  # fmt: skip


def test_family_verdict_by_hand():
    # FT: two learning rates, two evaluations each, three seeds; MFT one run, two evaluations.
    ft = {(1e-4, 1): [(0.10, 0.05), (0.12, 0.06), (0.11, 0.05)], (1e-4, 2): [(0.20, 0.20), (0.22, 0.18), (0.21, 0.22)],
          (1e-5, 1): [(0.05, 0.04), (0.04, 0.05), (0.06, 0.03)], (1e-5, 2): [(0.08, 0.10), (0.09, 0.09), (0.07, 0.11)]}  # fmt: skip
    mft = {(1e-4, 1): [(0.15, 0.04), (0.16, 0.05), (0.14, 0.05)], (1e-4, 2): [(0.25, 0.12), (0.24, 0.10), (0.26, 0.14)]}
    rows = rows_of("FT", ft) + rows_of("MFT", mft)
    v = family_verdict(rows, "legal", "FT", points=5)

    def envelope(family, seed=None):
        cloud = np.array([np.mean(p, axis=0) if seed is None else p[seed] for p in family.values()]) * 100
        return reference_envelope(cloud)

    def gaps(seed=None):
        a, b = envelope(ft, seed), envelope(mft, seed)
        grid = np.linspace(max(a[0, 1], b[0, 1]), min(a[-1, 1], b[-1, 1]), 5)
        return grid, np.interp(grid, b[:, 1], b[:, 0]) - np.interp(grid, a[:, 1], a[:, 0])

    grid, expected = gaps()
    assert np.allclose([r[0] for r in v.gap.rows], grid) and np.allclose(v.gap.gaps, expected)
    per_seed = np.array([gaps(seed)[1].mean() for seed in range(3)])
    half = stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / math.sqrt(3)
    assert v.per_seed.n == 3 and v.per_seed.mean == pytest.approx(per_seed.mean()) and v.per_seed.high == pytest.approx(per_seed.mean() + half)
    assert "MFT is ahead" in verdict_text(v)
    # A family with MFT's own numbers: MFT is nowhere ahead, and the verdict says so.
    assert "MFT is not ahead" in verdict_text(family_verdict(rows + rows_of("DFT", mft), "legal", "DFT"))


def test_plan_and_cpu_sizing():
    legal = make_plan(CompareConfig(families="FT,MFT,WiSE-FT"))
    assert legal.domains == ["legal"] and legal.methods == []
    counts = planned_frontier(legal)
    # FT 3 learning rates and MFT 9 points, 3 seeds; WiSE-FT 3 alphas on each FT run.
    assert counts == dict(reference=1, caches=2, frontier=3 * (3 + 9), wise=3 * 9, fisher=0)
    minutes = lambda plan: sum(estimate_minutes(plan.profile, planned_frontier(plan), plan.profile.throughput).values())  # noqa: E731
    # At the cpu profile's size this alone is over 7 hours on 2 cores (docs/frontier.md: a GPU's job) ...
    assert 400 < minutes(legal) < 480
    # ... while at the quick size FT and MFT at tau 0.25 take under 45 minutes per learning rate.
    for lr in ("1e-4", "3e-5", "1e-5"):
        assert minutes(make_plan(CompareConfig(quick=True, families="FT,MFT", taus="0.25", lrs=lr))) < 45
    every = make_plan(CompareConfig(families="all", frontier_domains="sympy,code"))
    assert every.domains == ["legal", "sympy", "code"] and planned_frontier(every)["fisher"] == 1
    # LoRA (3 ranks at 3 learning rates), L2-init, EWC, DFT and TALR in legal only; FT and MFT in all three. The
    # weight averages train nothing of their own: WiSE-FT 3 alphas on each FT run, WiSE-MFT on each MFT run.
    assert planned_frontier(every)["frontier"] == 3 * (3 * 12 + 9 + 2 * len(PENALTY_LAMBDAS) + 2)
    assert planned_frontier(every)["wise"] == 3 * 3 * (3 + 9)
    assert [pt.label for pt in FAMILIES["MFT"]][-1] == "lr=1e-05 tau=0.25"
    # The quick profile's per-domain protocol has legal alone; its frontier may add the other built-in domains.
    quick = make_plan(CompareConfig(quick=True, families="FT,MFT", frontier_domains="sympy,code"))
    assert quick.domains == ["legal", "sympy", "code"] and planned_frontier(quick)["caches"] == 4
    # --tail-samples: MFT's points from a top-12 cache with sampled tail ids, one more cache per domain; FT unchanged.
    sampled = make_plan(CompareConfig(families="FT,MFT", tail_samples=11))
    assert planned_frontier(sampled)["caches"] == 3 and planned_frontier(sampled)["frontier"] == counts["frontier"]
    assert {sampled.cache_of(pt) for _, pt in frontier_points(sampled)} == {(20, 0), (12, 11)}
    assert {legal.cache_of(pt) for _, pt in frontier_points(legal)} == {(20, 0)}
    # --taus narrows MFT's grid alone: FT at 3 learning rates, MFT at tau 0.25 at each of them.
    narrow = make_plan(CompareConfig(families="FT,MFT", taus="0.25"))
    assert sorted((pt.family, pt.lr, pt.tau) for _, pt in frontier_points(narrow)) == sorted(
        [("FT", lr, None) for lr in (1e-5, 3e-5, 1e-4)] + [("MFT", lr, 0.25) for lr in (1e-5, 3e-5, 1e-4)]
    )
    # --lambdas narrows the penalty families alone, so two invocations can take a family's grid from either end.
    ends = make_plan(CompareConfig(families="FT,L2-init,EWC", lambdas="10,100"))
    assert sorted((pt.family, pt.lam) for _, pt in frontier_points(ends)) == sorted(
        [("FT", None)] * 3 + [(f, lam) for f in ("L2-init", "EWC") for lam in (10.0, 100.0)]
    )
    # --ranks narrows LoRA alone; its points at lr 3e-4 and 1e-3 are reached with --lrs, which FT's grid lacks.
    lora = make_plan(CompareConfig(families="FT,LoRA", ranks="4,16", lrs="1e-3"))
    assert sorted((pt.family, pt.lr, pt.rank) for _, pt in frontier_points(lora)) == [("LoRA", 1e-3, 4), ("LoRA", 1e-3, 16)]
    folders = [pt.folder for _, pt in frontier_points(make_plan(CompareConfig(families="LoRA", ranks="64")))]
    assert folders == ["rank64", "lr0.0003-rank64", "lr0.001-rank64"]
    for config, message in (
        (CompareConfig(families="FT,XFT"), "--families: unknown XFT"),
        (CompareConfig(families="LoRA", ranks="8"), "--ranks picks LoRA's ranks"),
        (CompareConfig(families="FT", ranks="4"), "--ranks picks LoRA's ranks"),
        (CompareConfig(ranks="4"), "give --families too"),
        (CompareConfig(lambdas="10"), "give --families too"),
        (CompareConfig(families="L2-init", lambdas="3"), "--lambdas picks L2-init's and EWC's penalties"),
        (CompareConfig(families="FT,MFT", lambdas="10"), "--lambdas picks L2-init's and EWC's penalties"),
        (CompareConfig(families="FT", lrs="2e-4"), "--lrs: 0.0002 not in the chosen families' grid"),
        (CompareConfig(lrs="1e-4"), "give --families too"),
        (CompareConfig(taus="0.25"), "give --families too"),
        (CompareConfig(families="MFT", taus="0.3"), "--taus picks MFT's margins"),
        (CompareConfig(families="FT", taus="0.25"), "--taus picks MFT's margins"),
        (CompareConfig(families="FT", methods="FT"), "--families runs the fair frontier instead"),
        (CompareConfig(families="FT", frontier_domains="poetry"), "--frontier-domains: poetry not among"),
        (CompareConfig(families="FT", domain=("legal=a.jsonl",), frontier_domains="sympy"), "sympy not among the domains legal$"),
        (CompareConfig(tail_samples=11), "give --families too"),
        (CompareConfig(families="FT", tail_samples=11), "--tail-samples sets the cache of MFT's points"),
        (CompareConfig(families="WiSE-FT", taus="0.5"), "--taus picks MFT's margins"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_plan(config)


def test_csv_has_the_knob_columns_and_a_column_per_task(tmp_path):
    rows = [Row(0, "legal", "EWC", None, 20, 0, 0.2, 0.1, 0.5, 100, 50, lr=1e-4, lam=3e5, step=8, tasks={"arc_easy": 0.5}),
            Row(0, "legal", "WiSE-FT", None, 20, 0, 0.1, 0.05, 0.5, 100, 50, lr=3e-5, alpha=0.25, step=40)]  # fmt: skip
    write_csv(rows, tmp_path / "runs.csv")
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert lines[0].endswith("spec_eval_tokens,lr,lambda,alpha,rank,step,arc_easy_acc")
    assert lines[1].endswith(",0.0001,300000,,,8,0.500000") and lines[2].endswith(",3e-05,,0.25,,40,")


def compare(*args):
    return CliRunner().invoke(mft, ["compare", *map(str, args)])


def test_smoke_frontier_two_domains_then_wise_ft_then_resumed(tmp_path, tiny_model_dir):
    legal = write_jsonl(tmp_path / "legal.jsonl", make_documents(60, seed=3))
    notes = write_jsonl(tmp_path / "notes.jsonl", make_documents(60, seed=4))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6, words=GENERAL_WORDS))
    work = tmp_path / "work"
    args = ["--profile", "smoke", "--model", tiny_model_dir, "--domain", f"legal={legal}", "--domain", f"notes={notes}", "--general", general,
            "--out", tmp_path / "out", "--work", work, "--seeds", "1", "--frontier-domains", "notes", "--lrs", "1e-5"]  # fmt: skip
    result = compare(*args, "--families", "FT,MFT")
    assert result.exit_code == 0, result.output
    assert "plan (smoke profile, fair frontier): 4 runs, 0 weight-average evaluations and 3 caches" in result.output
    (results,) = (tmp_path / "out").glob("frontier-smoke-*-legal-notes.md")
    figures = results.with_suffix("")
    assert sorted(p.name for p in figures.glob("*.png")) == ["frontier-legal.png", "frontier-notes.png"]
    rows = list(csv.DictReader(open(figures / "runs.csv")))
    # Each run evaluates at every step (the smoke profile's 2): one row per evaluation.
    assert [(r["domain"], r["method"], r["step"]) for r in rows] == [(d, m, s) for d in ("legal", "notes") for m in ("FT", "MFT") for s in "12"]
    assert {r["lr"] for r in rows} == {"1e-05"} and {r["tau"] for r in rows if r["method"] == "MFT"} == {"0.25"}
    assert "| FT |" in results.read_text() and "## notes" in results.read_text()

    # WiSE-FT needs the FT run's best checkpoint, deleted after the first invocation: FT is trained again, MFT reused.
    frontier = next(work.rglob("frontier"))
    # domain-HASH/FAMILY/POINT/seed0 -> its summary
    summary = {p.parent.relative_to(frontier).parts[:2]: p for p in frontier.rglob("summary.json")}
    assert len(summary) == 4
    stamps = {k: p.stat().st_mtime_ns for k, p in summary.items()}
    result = compare(*args, "--families", "FT,MFT,WiSE-FT", "--keep-checkpoints")
    assert result.exit_code == 0, result.output
    assert "training again for its best checkpoint" in result.output
    changed = [k for k, p in summary.items() if p.stat().st_mtime_ns != stamps[k]]
    assert len(changed) == 1 and changed[0][0].startswith("legal-") and changed[0][1] == "FT"
    rows = list(csv.DictReader(open(figures / "runs.csv")))
    wise = [r for r in rows if r["method"] == "WiSE-FT"]
    assert [r["alpha"] for r in wise] == ["0.25", "0.5", "0.75"] and {r["domain"] for r in wise} == {"legal"}

    # The averages are read against the run's own evaluations: alpha 1 is the best checkpoint, alpha 0 the start.
    ft = RunFolder(summary[changed[0]].parent)
    start = next(work.rglob("reference")) / "best"
    cache = next(work.rglob("cache-legal-*"))
    sets = eval_sets(EvalConfig(model=str(start), spec_eval=str(cache), general_eval=str(next(work.rglob("general-eval.jsonl"))), max_sequences=2), load_tokenizer(str(start)))
    scores = wise_ft_scores(str(start), ft.best, [0.0, 1.0], ft.metrics("before")[0], sets, 8, "cpu")
    best = ft.summary()["best"]
    assert scores[1.0]["S"] == pytest.approx(best["S"], abs=1e-6) and scores[1.0]["DG"] == pytest.approx(best["DG"], abs=1e-6)
    assert scores[0.0]["S"] == pytest.approx(0, abs=1e-6) and scores[0.0]["DG"] == pytest.approx(0, abs=1e-6)
    assert float(wise[-1]["S"]) != pytest.approx(best["S"])

    # WiSE-MFT averages the MFT run the same way: MFT is trained again for its checkpoint; FT and its averages are reused.
    wise_ft_files = sorted(work.rglob("WiSE-FT/*/seed0.json"))
    stamps = {k: p.stat().st_mtime_ns for k, p in summary.items()}
    wise_stamps = [p.stat().st_mtime_ns for p in wise_ft_files]
    result = compare(*args, "--families", "FT,MFT,WiSE-FT,WiSE-MFT", "--keep-checkpoints")
    assert result.exit_code == 0, result.output
    changed = [k for k, p in summary.items() if p.stat().st_mtime_ns != stamps[k]]
    assert len(changed) == 1 and changed[0][0].startswith("legal-") and changed[0][1] == "MFT"
    assert [p.stat().st_mtime_ns for p in wise_ft_files] == wise_stamps
    rows = list(csv.DictReader(open(figures / "runs.csv")))
    wise_mft = [r for r in rows if r["method"] == "WiSE-MFT"]
    assert [(r["alpha"], r["tau"], r["lr"]) for r in wise_mft] == [(a, "0.25", "1e-05") for a in ("0.25", "0.5", "0.75")]
    mft = RunFolder(summary[changed[0]].parent)
    scores = wise_ft_scores(str(start), mft.best, [1.0], mft.metrics("before")[0], sets, 8, "cpu")
    assert scores[1.0]["S"] == pytest.approx(mft.summary()["best"]["S"], abs=1e-6)
    assert "| WiSE-MFT − WiSE-FT |" in results.read_text() and "| MFT − WiSE-MFT |" in results.read_text()

    # Run again: nothing trains and no average is evaluated again.
    wise_files = sorted(work.rglob("WiSE-*/*/seed0.json"))
    stamps = [p.stat().st_mtime_ns for p in [*summary.values(), *wise_files]]
    result = compare(*args, "--families", "FT,MFT,WiSE-FT,WiSE-MFT")
    assert result.exit_code == 0, result.output
    assert [p.stat().st_mtime_ns for p in [*summary.values(), *wise_files]] == stamps
    assert json.loads(wise_files[0].read_text())["step"] in (1, 2)
    assert len(list(csv.DictReader(open(figures / "runs.csv")))) == 8 + 3 + 3


def test_smoke_frontier_mft_from_a_sampled_tail_cache(tmp_path, tiny_model_dir):
    legal = write_jsonl(tmp_path / "legal.jsonl", make_documents(60, seed=3))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6, words=GENERAL_WORDS))
    work = tmp_path / "work"
    result = compare("--profile", "smoke", "--model", tiny_model_dir, "--domain", f"legal={legal}", "--general", general,
                     "--out", tmp_path / "out", "--work", work, "--seeds", "1", "--lrs", "1e-5", "--families", "FT,MFT", "--tail-samples", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 caches" in result.output
    (results,) = (tmp_path / "out").glob("frontier-smoke-*-k12tail3-legal.md")
    assert "MFT trains from the top-12 cache plus 3 ids sampled from the teacher's tail" in results.read_text()
    rows = list(csv.DictReader(open(results.with_suffix("") / "runs.csv")))
    assert {(r["method"], r["k"], r["tail_samples"]) for r in rows} == {("FT", "20", "0"), ("MFT", "12", "3")}
    # Each run read the cache its row names: MFT the sampled one, which holds 3 tail ids per position; FT the k = 20 one.
    folders = [p.parent for p in next(work.rglob("frontier")).rglob("summary.json")]
    caches = {f.parts[-3]: cache_info(RunFolder(f).read_settings()["cache"]) for f in folders}
    assert [f.parts[-2] for f in folders if f.parts[-3] == "MFT"] == ["lr1e-05-tau0.25-k12tail3"]
    assert (caches["FT"]["top_k"], caches["FT"]["tail_samples"]) == (20, 0)
    assert (caches["MFT"]["top_k"], caches["MFT"]["tail_samples"]) == (12, 3)


def test_smoke_frontier_penalty_families_share_one_fisher(tmp_path, tiny_model_dir):
    legal = write_jsonl(tmp_path / "legal.jsonl", make_documents(60, seed=3))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6, words=GENERAL_WORDS))
    work = tmp_path / "work"
    args = ["--profile", "smoke", "--model", tiny_model_dir, "--domain", f"legal={legal}", "--general", general,
            "--out", tmp_path / "out", "--work", work, "--seeds", "1"]  # fmt: skip
    result = compare(*args, "--families", "L2-init,EWC", "--lambdas", "0.01")
    assert result.exit_code == 0, result.output
    assert "plan (smoke profile, fair frontier): 2 runs" in result.output and "computing the Fisher" in result.output
    (fisher,) = work.rglob("fisher-general.safetensors")
    # EWC's lambda is the grid's rung over the Fisher's mean over all weights, so a uniform Fisher would be L2-init.
    from safetensors.numpy import load_file

    weights = load_file(str(fisher))
    mean = sum(float(w.astype(np.float64).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    folders = {p.parts[-4]: RunFolder(p.parent) for p in next(work.rglob("frontier")).rglob("summary.json")}  # FAMILY/POINT/seed0
    assert folders["L2-init"].read_settings()["l2_init"] == 0.01
    assert folders["EWC"].read_settings()["ewc"] == str(fisher)
    assert folders["EWC"].read_settings()["ewc_lambda"] == pytest.approx(0.01 / mean, rel=1e-9)
    rows = list(csv.DictReader(open(next((tmp_path / "out").glob("frontier-smoke-*.md")).with_suffix("") / "runs.csv")))
    assert {r["method"]: float(r["lambda"]) for r in rows} == pytest.approx({"L2-init": 0.01, "EWC": 0.01 / mean}, rel=1e-5)

    # The other rungs reuse the Fisher file instead of computing it again.
    stamp = fisher.stat().st_mtime_ns
    result = compare(*args, "--families", "EWC", "--lambdas", "100")
    assert result.exit_code == 0, result.output
    assert "computing the Fisher" not in result.output and fisher.stat().st_mtime_ns == stamp


def test_report_only_reads_what_finished_and_trains_nothing(tmp_path, tiny_model_dir):
    legal = write_jsonl(tmp_path / "legal.jsonl", make_documents(60, seed=3))
    general = write_jsonl(tmp_path / "general.jsonl", make_documents(60, seed=6, words=GENERAL_WORDS))
    work = tmp_path / "work"
    args = ["--profile", "smoke", "--model", tiny_model_dir, "--domain", f"legal={legal}", "--general", general,
            "--out", tmp_path / "out", "--work", work, "--seeds", "1", "--lrs", "1e-5"]  # fmt: skip
    result = compare(*args, "--families", "FT,MFT", "--report-only")
    assert result.exit_code != 0 and "no frontier runs" in result.output and not work.exists()
    assert compare(*args, "--families", "FT").exit_code == 0
    frontier = next(work.rglob("frontier"))
    (ft,) = frontier.rglob("summary.json")
    stamp = ft.stat().st_mtime_ns
    result = compare(*args, "--families", "FT,MFT,WiSE-FT", "--report-only")
    assert result.exit_code == 0, result.output
    assert "3 weight-average evaluations and 2 caches; --report-only reads back those finished and trains nothing" in result.output
    assert list(frontier.rglob("summary.json")) == [ft] and ft.stat().st_mtime_ns == stamp and not list(work.rglob("WiSE-FT"))
    (results,) = (tmp_path / "out").glob("frontier-smoke-*.md")
    text = results.read_text()
    assert "4 points have not finished and are left out" in text
    assert "legal MFT lr=1e-05 tau=0.25 (seed 0)" in text and "legal WiSE-FT lr=1e-05 alpha=0.75 (seed 0)" in text
    rows = list(csv.DictReader(open(results.with_suffix("") / "runs.csv")))
    assert {(r["method"], r["lr"]) for r in rows} == {("FT", "1e-05")}

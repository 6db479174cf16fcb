"""The `mft` command. Each command builds a config and calls one library function."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from cli.options import build, config_file_option, options_from
from mft_pipeline.config import TUNE_FIELDS, AverageConfig, CacheConfig, CompareConfig, EvalConfig, FisherConfig, TrainConfig, TuneConfig
from mft_pipeline.sweep.grid import GRID_FIELDS, SweepConfig


class _Group(click.Group):
    """Shows a user error (``MFTError``) as one clear line, exit 2; any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx):
        from mft_pipeline.errors import MFTError

        try:
            return super().invoke(ctx)
        except MFTError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def mft():
    """Minifinetuning: adapt a language model to a small corpus while keeping what it knew."""


def _field_help(cls, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


@mft.command("cache-teacher")
@config_file_option
@options_from(CacheConfig, exclude=("num_workers", "worker_index"))
# Spelled out for their old names (--num-shards, --shard-index), which stay as aliases: one option, two names.
@click.option("--num-workers", "--num-shards", "num_workers", type=int, default=1, show_default=True, help=_field_help(CacheConfig, "num_workers"))
@click.option("--worker-index", "--shard-index", "worker_index", type=int, default=0, show_default=True, help=_field_help(CacheConfig, "worker_index"))
def cache_teacher(**params):
    """Stage one: run the frozen teacher once and cache its top-k targets."""
    from mft_pipeline.stage_one import build_cache

    out = build_cache(build(CacheConfig, params))
    click.echo(f"cache written to {out}")


@mft.command("cache-info")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_info(cache_dir, as_json):
    """Per split: tokens, bytes per token and candidate, teacher accuracy and perplexity, and what the top-k keeps.

    The second line per split helps choose --top-k: the share of labels outside the top-k, the
    teacher's probability mass outside it (mean and percentiles) and how often its argmax is
    right. See docs/choosing-k.md.
    """
    from mft_pipeline.cache.info import cache_info as info

    result = info(cache_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    samples = f"  tail_samples={result['tail_samples']}" if result["tail_samples"] else ""
    click.echo(f"model {result['model']}  k={result['top_k']}{samples}  seq_len={result['seq_len']}")
    for split, row in result["splits"].items():
        line = f"{split:>10}: {row['sequences']} sequences, {row['tokens']} tokens, {row['bytes']} bytes"
        if row["tokens"]:
            line += (
                f", {row['bytes_per_token']:.2f} B/token, {row['bytes_per_candidate']:.2f} B/candidate,"
                f" teacher argmax accuracy {row['teacher_argmax_accuracy']:.3f}, perplexity {row['teacher_perplexity']:.3f}"
            )
        click.echo(line)
        if row.get("tail_mass_mean") is not None:
            click.echo(f"{'':>10}  {_coverage_line(row)}")


def _coverage_line(row: dict) -> str:
    """How much the top-k keeps of the teacher: the numbers to read when choosing --top-k (docs/choosing-k.md)."""
    return (
        f"labels outside top-k {100 * row['label_outside_top_k']:.2f}%, teacher tail mass mean {row['tail_mass_mean']:.4f}"
        f" (p50 {row['tail_mass_p50']:.4f}, p90 {row['tail_mass_p90']:.4f}, p99 {row['tail_mass_p99']:.4f})"
    )


@mft.command("cache-verify")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
def cache_verify(cache_dir):
    """Check schema, counts and checksums; exit 1 on any mismatch."""
    from mft_pipeline.cache.info import verify_cache

    problems = verify_cache(cache_dir)
    for p in problems:
        click.echo(f"FAIL {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo("ok")


@mft.command("cache-merge")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.argument("parts", nargs=-1, type=click.Path(exists=True, file_okay=False))
def cache_merge(cache_dir, parts):
    """Join the parts of --num-workers workers into one cache.

    With only CACHE_DIR, the workers shared that folder. With PARTS, each worker wrote its own
    folder and CACHE_DIR is the new, merged cache.
    """
    from mft_pipeline.cache.info import merge_cache

    manifest = merge_cache(cache_dir, tuple(parts))
    counts = ", ".join(f"{s}: {v['num_sequences']} sequences" for s, v in manifest["splits"].items())
    click.echo(f"merged {cache_dir} ({counts})")


@mft.command("quickstart")
@click.option("--workdir", default=".mft-quickstart", show_default=True, help="Where the model, corpora, caches and runs go; finished parts are reused.")
@click.option("--steps", type=int, help="Optimizer steps per method (default 16), evaluated every 4.")
def quickstart(workdir, steps):
    """FT and MFT on a few license texts from SmolLM2-135M, on CPU; print how much each forgot."""
    from mft_pipeline.demo.quickstart import Sizes, report, run_quickstart

    sizes = Sizes() if steps is None else Sizes(steps=steps)
    click.echo(report(run_quickstart(workdir, sizes=sizes)))


@mft.command("train")
@config_file_option
@options_from(TrainConfig)
def train(**params):
    """Stage two: train the student on the cached, MFT-corrected teacher targets."""
    from mft_pipeline.train.loop import train as run

    summary = run(build(TrainConfig, params))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for all
        click.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    best, before = summary["best"] or {}, summary["before"]
    if best:
        lines = [f"best checkpoint: step {best['step']} -> {summary['config']['out']}/best"]
    else:  # the best-row rule keeps only evaluations within the budget
        lines = [f"no checkpoint: no evaluation was within --max-degeneralization {summary['config']['max_degeneralization']}%"]
    if "ppl_spec" in best:
        lines.append(f"specialized perplexity {before['ppl_spec']:.3f} -> {best['ppl_spec']:.3f}   S  = {100 * best['S']:.2f}%")
    if "ppl_gen" in best:
        lines.append(f"general perplexity     {before['ppl_gen']:.3f} -> {best['ppl_gen']:.3f}   DG = {100 * best['DG']:.2f}%")
    if "DG_over_S" in best:
        lines.append(f"DG/S = {best['DG_over_S']:.3f}")
    if summary.get("adapter"):
        lines.append("checkpoints are PEFT adapters (adapter_model.safetensors + adapter_config.json)")
    if summary.get("merged"):
        lines.append(f"merged model: {summary['merged']}")
    if summary.get("uses_general_data"):
        lines.append("note: this run used general-domain data (" + ("replay" if summary["config"].get("replay") else "EWC's Fisher") + ")")
    return "\n".join(lines)


@mft.command("fisher")
@options_from(FisherConfig)
def fisher(**params):
    """For EWC: the starting model's diagonal empirical Fisher on general-domain text (per-sequence squared gradients).

    F is the mean over sequences of the squared gradient of each sequence's mean token NLL. The
    file records the model's weights fingerprint; `mft train --ewc FILE --ewc-lambda L` refuses
    any other starting model, and reports mark such runs as using general-domain data.
    """
    from mft_pipeline.train.fisher import write_fisher

    config = build(FisherConfig, params)
    info = write_fisher(config)
    click.echo(f"wrote {config.out}: {info['sequences']} sequences, {info['tokens']} tokens ({info['estimator']} Fisher of {info['model']})")


@mft.command("average")
@options_from(AverageConfig)
def average(**params):
    """Weight averaging (WiSE-FT): (1 - alpha) * start + alpha * tuned, written as a from_pretrained folder.

    A PEFT adapter is merged into the start first. alpha 0 and 1 give the start and the tuned
    weights exactly. Score the result with `mft eval --model OUT --base START`.
    """
    from mft_pipeline.train.average import write_average

    click.echo(f"wrote {write_average(build(AverageConfig, params))}")


@mft.command("eval")
@options_from(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(as_json, **params):
    """Perplexities, S, DG and DG/S of any checkpoint (full model or PEFT adapter) against its base; accuracy on standard tasks."""
    from mft_pipeline.eval.score import score_checkpoint

    result = score_checkpoint(build(EvalConfig, params))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if "after" in result:
        click.echo(f"{result['model']} against {result['base']}")
    names = {"ppl_spec": "specialized perplexity", "ppl_gen": "general perplexity    "}
    metric = {"ppl_spec": "S", "ppl_gen": "DG"}
    for key, name in names.items():
        if key in result.get("after", {}):
            click.echo(f"{name} {result['before'][key]:.3f} -> {result['after'][key]:.3f}   "
                       f"{metric[key]:<2} = {100 * result[metric[key]]:.2f}%   ({result['tokens'][key]} tokens)")  # fmt: skip
    if "DG_over_S" in result:
        click.echo(f"DG/S = {result['DG_over_S']:.3f}")
    if "tasks" in result:
        click.echo(f"{result['model']}, zero-shot (± one standard error)")
    for name, score in result.get("tasks", {}).items():
        norm = "" if score["acc_norm"] is None else f"   acc_norm {score['acc_norm']:.3f} ± {score['acc_norm_stderr']:.3f}"
        click.echo(f"{name:<13} acc {score['acc']:.3f} ± {score['stderr']:.3f}{norm}   ({score['n']} questions)")


@mft.command("sweep")
@config_file_option
@options_from(SweepConfig)
@options_from(TrainConfig, exclude=GRID_FIELDS)
def sweep(**params):
    """Train a grid of methods from one cache (one run folder each; finished runs are skipped), then report.

    Every run gets the same data, steps and seed; only the method changes. The other options
    are those of `mft train` and apply to every run.
    """
    from mft_pipeline.sweep.grid import run_sweep

    run_sweep(build(SweepConfig, params), params, log=click.echo)


@mft.command("tune")
@config_file_option
@options_from(TuneConfig)
@options_from(TrainConfig, exclude=TUNE_FIELDS)
def tune(**params):
    """The most specialized model that forgets at most --max-degeneralization percent: search tau and the learning rate.

    Trains MFT candidates from one cache (a coarse tau x learning-rate grid, then refinement
    rounds; finished candidates are reused), puts the most specialized checkpoint within the
    budget in OUT/best and writes tune.md, tune.png and tune.json. When no candidate fits, the
    answer is the start (the teacher, untuned) and why. See docs/tune.md. The other options are
    those of `mft train` and apply to every candidate.
    """
    from mft_pipeline.sweep.tune import REPORT, PLOT, SUMMARY, answer, tune as run

    summary = run(build(TuneConfig, params), params, log=click.echo)
    click.echo(answer(summary))
    click.echo("report: " + ", ".join(os.path.join(params["out"], name) for name in (REPORT, PLOT, SUMMARY)))


@mft.command("compare")
@options_from(CompareConfig)
def compare(**params):
    """Does MFT help on my data? FT against MFT from a reference checkpoint, over seeds, with intervals and a verdict.

    Writes OUT/NAME.md (S, DG and DG/S per method with 95% intervals, MFT against FT paired by
    seed, and what the comparison's size can and cannot tell) and OUT/NAME/runs.csv. Finished
    runs are reused, so a killed comparison continues when the same command runs again.
    """
    from mft_pipeline.compare.runs import run_compare

    return run_compare(build(CompareConfig, params), log=lambda line: click.echo(line, err=True))


@mft.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.md, report.csv and tradeoff.png.")
def report(run_dirs, out):
    """Table (markdown, CSV) of S, DG and DG/S per run, like the paper's Table 2, and a DG-vs-S plot.

    RUN_DIRS are run folders of `mft train`, or folders holding them (a sweep folder).
    """
    from mft_pipeline.sweep.report import write_report

    for path in write_report(run_dirs, out):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    mft()

"""`mft compare` end to end: check the inputs, plan, prepare the model and corpora, train every run, write the results.

``run_compare`` composes named steps:

- ``open_corpus`` / ``size_warnings``: every user corpus is read and split before a model is loaded;
- ``Comparison.prepare``: the model, the corpora, the general evaluation set and the reference checkpoint;
- ``Comparison.tables``: every chosen method, domain and seed (the per-domain tables and the paired verdict), and
  with --tasks each run's best checkpoint and the reference scored on standard tasks (``TaskScoring``);
- ``Comparison.frontier``, ``.fidelity``, ``.low_data``: the optional parts (PARTS);
- ``Comparison.fair_frontier``: with --families, instead of the tables and parts, every family's grid
  (each evaluation along each run a row), the weight averages of FT and MFT runs (WiSE-FT, WiSE-MFT) and one plot per domain;
- ``write_csv`` and ``write_results`` (results.py).

Every run goes through ``train`` (train/loop.py); a finished run is read back instead, so a killed
comparison continues where it stopped when the same command runs again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable

from mft_pipeline.cache.format import MANIFEST
from mft_pipeline.cache.info import cache_info
from mft_pipeline.cache.reader import Cache
from mft_pipeline.compare.protocol import (
    FRONTIER_TAUS, GENERAL, GENERAL_LABEL, LINES, METHODS, SAMPLED_K, SAMPLED_N, TOP_K, Method, Plan, Point, Profile,
    estimate_minutes, fidelity_method, frontier_eval_every, frontier_method, frontier_points, frontier_trained, make_plan,
    planned_frontier, planned_runs, planned_task_scores, seeds_for,
)  # fmt: skip
from mft_pipeline.compare.results import (
    Report, Row, plot_fair_frontier, plot_frontier, plot_low_data, write_csv, write_frontier_results, write_results,
)  # fmt: skip
from mft_pipeline.config import DEFAULT_MODEL, TRAIN_DEFAULTS, CacheConfig, CompareConfig, EvalConfig, FisherConfig, TrainConfig, run_settings
from mft_pipeline.data.chat import ChatRecord, tokenize_records
from mft_pipeline.data.corpus import Corpus, CorpusError, load_corpus
from mft_pipeline.data.packing import pack_documents
from mft_pipeline.demo.corpora import prepare_corpus
from mft_pipeline.demo.local_model import local_model
from mft_pipeline.errors import ConfigError
from mft_pipeline.eval.metrics import compare, model_perplexity
from mft_pipeline.eval.score import eval_sets, score_checkpoint
from mft_pipeline.eval.tasks import INSTALL_HINT, continuations, data_root
from mft_pipeline.files import atomic_write_text
from mft_pipeline.models import load_tokenizer
from mft_pipeline.run_folder import RunFolder
from mft_pipeline.stage_one import build_cache
from mft_pipeline.train.average import average_into
from mft_pipeline.train.fisher import write_fisher
from mft_pipeline.train.loop import train


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_compare(config: CompareConfig, log: Callable[[str], None] = _stderr, score_tasks: TaskScorer | None = None) -> Path:
    """Run the comparison ``config`` describes and return the results file's path (OUT/NAME.md).

    ``score_tasks`` scores a checkpoint on --tasks; the default is `mft eval --tasks`'s (lm-evaluation-harness on the
    installed task data).
    """
    import torch

    plan = make_plan(config)
    p = plan.profile
    tasks = None
    if config.tasks:
        if plan.families:
            raise ConfigError("--tasks scores the per-domain protocol's runs; the fair frontier's points are not scored (docs/frontier.md)")
        if score_tasks is None:
            if importlib.util.find_spec("lm_eval") is None:
                raise ConfigError(f"--tasks needs lm-evaluation-harness: {INSTALL_HINT}")
            data_root()  # the task data's package, checked before anything is trained
            score_tasks = partial(checkpoint_tasks, device=p.device)
        tasks = TaskScoring(config.task_list, config.task_limit, config.task_seed, score_tasks)
    if p.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"the {plan.profile_name} profile needs a CUDA GPU")
    if ({"frontier", "low-data"} - plan.skip or plan.families) and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("the frontier and low-data plots need matplotlib: pip install 'mft-pipeline[plot]', or --skip them")
    # Every user corpus is read and split now, so a bad path or an empty corpus stops the comparison
    # before a model is loaded or anything is trained.
    corpora = {f"--domain {n}": open_corpus(f"--domain {n}", path, p.val_fraction) for n, path in config.domains.items()}
    if config.general:
        corpora["--general"] = open_corpus("--general", Path(config.general), p.val_fraction)

    counts = planned_frontier(plan) if plan.families else planned_runs(p, plan.methods, len(plan.domains), plan.skip)
    task_continuations = 0
    if tasks:
        counts["tasks"] = planned_task_scores(p, plan.methods, len(plan.domains))
        task_continuations = continuations(tasks.names, tasks.limit)
    log(plan_line(plan.profile_name, p, counts, task_continuations, config.report_only))
    started = time.time()
    name = result_name(config, plan)
    c = Comparison(config, plan, name, tasks)
    if config.report_only and not (c.runs_root / "frontier").is_dir():
        raise ConfigError(f"--report-only: no frontier runs under {c.runs_root}; run the command without it first")
    report = Report(
        name=name, command=command_line(config), model=config.model, model_folder="", profile=p, domains=plan.domains,
        general="the --general corpus" if config.general else GENERAL_LABEL, skip=plan.skip, counts=counts,
        frontier_domain=plan.frontier_domain, task_limit=config.task_limit, task_seed=config.task_seed,
        task_continuations=task_continuations,
    )  # fmt: skip
    c.prepare(corpora, report, log)
    if plan.families:
        report.rows, unfinished = c.fair_frontier(log)
        if unfinished:
            report.notes.append(f"--report-only: {len(unfinished)} points have not finished and are left out: " + "; ".join(unfinished))
    else:
        c.tables(report)
        if "frontier" not in plan.skip:
            c.frontier(report)
        if "fidelity" not in plan.skip:
            c.fidelity(report)
        if "low-data" not in plan.skip:
            c.low_data(report)
        report.rows = list(c.runner.rows.values())

    report.seconds = time.time() - started
    write_csv(report.rows, c.figures / "runs.csv")
    path = Path(config.out) / f"{name}.md"
    (write_frontier_results if plan.families else write_results)(path, report)
    log(f"wrote {path}")
    return path


def plan_line(profile: str, p: Profile, counts: dict[str, int], task_continuations: int = 0, report_only: bool = False) -> str:
    if "frontier" in counts:
        plan = f"plan ({profile} profile, fair frontier): {counts['frontier']} runs, {counts['wise']} weight-average evaluations and {counts['caches']} caches"
    else:
        plan = f"plan ({profile} profile): {counts['cached'] + counts['online']} runs ({counts['online']} of them online dense) and {counts['caches']} caches"
    if "tasks" in counts:
        plan += f", {counts['tasks']} checkpoints scored on tasks ({task_continuations:,} continuations each)"
    if report_only:
        return plan + "; --report-only reads back those finished and trains nothing"
    if p.throughput:
        minutes = sum(estimate_minutes(p, counts, p.throughput, task_continuations).values())
        plan += (
            f", about {minutes:.0f} minutes at the throughput the profile was sized from ({p.throughput.measured}), plus "
            "preparing the model and corpora"
        )
    return plan + "; finished runs are reused"


def command_line(config: CompareConfig) -> str:
    """The `mft compare` command that gives ``config``: every setting that is not the default."""
    parts = ["mft compare"]
    for f in fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value == f.default:
            continue
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, tuple):
            parts += [f"{flag} {shlex.quote(v)}" for v in value]
        else:
            parts.append(f"{flag} {shlex.quote(f'{value:g}' if isinstance(value, float) else str(value))}")
    return " ".join(parts)


def model_slug(spec: str) -> str:
    return spec if spec == DEFAULT_MODEL else Path(spec.rstrip("/")).name.removesuffix(".gguf")


def path_key(name: str, path: Path) -> str:
    """A folder name for a user corpus: its name plus a hash of where it is, so two corpora never share caches."""
    return f"{name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def result_name(config: CompareConfig, plan: Plan | None = None) -> str:
    """quality-PROFILE[-MODEL][-lrLR][-general-NAME][-DOMAINS]: one name per distinct comparison.

    The fair frontier's is frontier-PROFILE...[-k12tailN]-DOMAINS with the domains it traces, whichever families and
    learning rates an invocation chose, so the invocations that split it rewrite one results file; MFT from a
    sampled-tail cache (--tail-samples N) is a results file of its own.
    """
    kind = "frontier" if plan and plan.families else "quality"
    name = f"{kind}-{config.profile_name}" + ("" if config.model == DEFAULT_MODEL else f"-{model_slug(config.model)}")
    if config.lr is not None:
        name += f"-lr{config.lr:g}"
    if config.general:
        name += f"-general-{Path(config.general).stem.split('.')[0]}"
    if kind == "frontier" and plan.tail_samples:
        name += f"-k{SAMPLED_K}tail{plan.tail_samples}"
    return name + "".join(f"-{d}" for d in (plan.domains if kind == "frontier" else config.domains))


# ----------------------------------------------------------------------------- corpora, checked before training


def open_corpus(role: str, path: Path, val_fraction: float) -> Corpus:
    """Read and split a corpus, or raise CorpusError naming its role, before anything is trained.

    ``role`` is how the user named it (``--domain mydocs``, ``--general``).
    """
    try:
        corpus = load_corpus(path, val_fraction=val_fraction)
    except CorpusError as e:
        raise CorpusError(f"{role}: {e}") from None
    if not corpus.validation:
        raise CorpusError(
            f"{role}: {path}: none of its {corpus.num_documents} documents fell into validation (a hash picks "
            f"{val_fraction:.0%} of them); add documents, or split long ones, so S and DG can be measured"
        )
    return corpus


def count_tokens(docs: list[str] | list[ChatRecord], tokenizer) -> int:
    """Tokens of the documents; of a chat record, its conversation rendered with the tokenizer's template."""
    if docs and isinstance(docs[0], ChatRecord):
        return sum(len(ids) for ids, _ in tokenize_records(docs, tokenizer))
    return sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])


def size_warnings(role: str, corpus: Corpus, tokenizer, need_val_tokens: int, need_train_tokens: int) -> list[str]:
    """What the corpus lacks for the profile, in tokens; empty when it supplies enough.

    Too few validation tokens make S or DG noisy; too few training tokens make every run repeat sequences.
    """
    notes = []
    val = count_tokens(corpus.validation, tokenizer)
    if val < need_val_tokens:
        notes.append(
            f"{role}: its {len(corpus.validation)} validation documents hold {val:,} tokens, fewer than the "
            f"{need_val_tokens:,} the profile evaluates on; the evaluation is smaller and noisier"
        )
    if need_train_tokens:
        train_tokens = count_tokens(corpus.train, tokenizer)
        if train_tokens < need_train_tokens:
            notes.append(
                f"{role}: its {len(corpus.train)} training documents hold {train_tokens:,} tokens, fewer than the "
                f"{need_train_tokens:,} each run trains on; runs repeat sequences"
            )
    return notes


# ----------------------------------------------------------------------------- runs


TaskScorer = Callable[[str, list[str], "int | None", int], dict]  # (checkpoint folder, tasks, limit, seed) -> {task: scores}
TASKS_FILE = "tasks.json"


def checkpoint_tasks(checkpoint: str, tasks: list[str], limit: int | None, seed: int, device: str) -> dict:
    """`mft eval --tasks` on one checkpoint: ``{task: {acc, acc_norm, stderr, acc_norm_stderr, n}}``."""
    return score_checkpoint(EvalConfig(model=checkpoint, tasks=",".join(tasks), limit=limit, seed=seed, device=device))["tasks"]


@dataclass(frozen=True)
class TaskScoring:
    """--tasks: the tasks, the questions (limit and seed) and the scorer; each checkpoint's scores in its folder's tasks.json."""

    names: tuple[str, ...]
    limit: int | None
    seed: int
    score: TaskScorer

    def stored(self, folder: Path) -> dict:
        """Every score in ``folder``'s tasks.json on these questions; none when it was scored on others (another limit or seed)."""
        path = folder / TASKS_FILE
        record = json.loads(path.read_text()) if path.exists() else None
        return record["tasks"] if record and (record["limit"], record["seed"]) == (self.limit, self.seed) else {}

    def missing(self, folder: Path) -> list[str]:
        return [n for n in self.names if n not in self.stored(folder)]

    def score_into(self, folder: Path, checkpoint: str | Path) -> dict:
        """Score ``checkpoint`` on the tasks ``folder`` lacks, write them beside the others there, return this scoring's."""
        scores, missing = self.stored(folder), self.missing(folder)
        if missing:
            scores.update(self.score(str(checkpoint), missing, self.limit, self.seed))
            folder.mkdir(parents=True, exist_ok=True)
            record = {"checkpoint": Path(checkpoint).name, "limit": self.limit, "seed": self.seed, "tasks": scores}
            atomic_write_text(folder / TASKS_FILE, json.dumps(record, indent=2) + "\n")
        return {n: scores[n] for n in self.names}


def train_once(out: Path, settings: dict, keep_best: bool, tasks: TaskScoring | None = None) -> dict:
    """Train once; a finished run is read back instead of retrained, a killed one resumed (``RunFolder.prepare``).

    Only the metrics are needed afterwards, and a run's checkpoints take gigabytes (the last
    one holds the optimizer state), so they are deleted unless ``keep_best``. With ``tasks`` the best
    checkpoint is scored first (into OUT/tasks.json, read back on the next invocation); a finished run
    without those scores whose checkpoint is gone (it ran before --tasks was given) is trained again
    with the same settings and seed.
    """
    folder, config = RunFolder(out), TrainConfig(out=str(out), **settings)
    status = folder.prepare(run_settings(config), TRAIN_DEFAULTS)
    if status == "finished, skipped":
        summary = folder.summary()
        if tasks is None or summary["best"] is None or not tasks.missing(out):
            return summary
        if not folder.best.exists():
            shutil.rmtree(out)
            status = folder.prepare(run_settings(config), TRAIN_DEFAULTS)
    if status != "finished, skipped":
        summary = train(replace(config, resume=status == "resumed"))
        shutil.rmtree(folder.last, ignore_errors=True)
    if tasks and summary["best"] is not None:
        tasks.score_into(out, folder.best)
    if not keep_best:
        shutil.rmtree(folder.best, ignore_errors=True)
    return summary


def write_documents(path: Path, docs: list[str]) -> Path:
    """A JSONL corpus of ``docs``, written once (atomically) and reused."""
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tmp.rename(path)
    return path


def wise_ft_scores(start: str, tuned: Path, alphas: list[float], before: dict, sets: dict, batch_size: int, device: str) -> dict[float, dict]:
    """Perplexities, S, DG and DG/S of the average ``(1 - alpha) start + alpha tuned`` at each alpha (WiSE-FT).

    ``before`` holds the start's perplexities as the tuned run measured them on the same ``sets`` (metric name ->
    packed sequences), so each average is read against the same numbers as the run's own evaluations.
    """
    import copy

    import torch

    from mft_pipeline.models import load_model, pick_device

    dev = pick_device(device)
    start_model = load_model(start, dev, dtype=torch.float32).eval()
    tuned_model = load_model(str(tuned), dev, dtype=torch.float32).eval()
    out = {}
    for alpha in alphas:
        model = copy.deepcopy(start_model)
        average_into(model, tuned_model, alpha)
        after = {name: model_perplexity(model, seqs.input_ids, seqs.num_tokens, batch_size, seqs.target) for name, seqs in sets.items()}
        out[alpha] = {**after, **compare(before, after)}
        del model
    return out


@dataclass
class Runner:
    """Trains each (domain, method, seed) once and keeps its row: a run shared by two parts is one row."""

    runs: Path
    common: dict  # TrainConfig settings every run shares
    keep_checkpoints: bool
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # domain -> (general, specialized) evaluated tokens
    rows: dict[tuple[str, str, int], Row] = field(default_factory=dict)
    tasks: TaskScoring | None = None  # scores the best checkpoints of the runs recorded with ``scored``

    def record(self, domain: str, key: str, method: Method, seed: int, cache: str, k=TOP_K, tail_samples: int = 0, scored: bool = False, **extra) -> Row:
        """``key`` names the domain's folder; ``extra`` adds TrainConfig settings (the replay cache)."""
        if (domain, method.name, seed) not in self.rows:
            settings = {**self.common, **method.train_settings(), **extra, "cache": cache, "seed": seed}
            folder, tasks = self.runs / key / method.folder / f"seed{seed}", self.tasks if scored else None
            summary = train_once(folder, settings, self.keep_checkpoints, tasks)
            best = summary.get("best") or {}
            accuracy = {n: s["acc"] for n, s in tasks.stored(folder).items() if n in tasks.names} if tasks else {}
            self.rows[domain, method.name, seed] = Row(
                seed, domain, method.name, method.tau, k, tail_samples, best.get("S"), best.get("DG"), best.get("DG_over_S"),
                *self.tokens[domain], lr=settings["lr"], rank=settings.get("peft_rank"), step=best.get("step"), tasks=accuracy,
            )  # fmt: skip
        return self.rows[domain, method.name, seed]


class Comparison:
    """One comparison's folders, model, corpora and caches, and the steps that train its runs."""

    def __init__(self, config: CompareConfig, plan: Plan, name: str, tasks: TaskScoring | None = None):
        self.config, self.plan, self.p, self.name, self.tasks = config, plan, plan.profile, name, tasks
        self.user = config.domains
        work = Path(config.work or Path(config.out) / "work")
        self.data = work / "data"
        self.model_folder = work / model_slug(config.model)
        # The reference checkpoint, its caches and every run depend on the profile, model, lr and general corpus.
        self.work = work / config.profile_name / ("" if config.model == DEFAULT_MODEL else model_slug(config.model))
        if config.lr is not None:
            self.work = self.work / f"lr{config.lr:g}"
        if config.general:
            self.work = self.work / path_key("general", Path(config.general))
        self.figures = Path(config.out) / name
        # Where the runs go once prepare() has made the reference checkpoint they start from.
        self.runs_root = self.work / "from-reference" if plan.profile.reference_steps else self.work
        self.keys = {d: (path_key(d, self.user[d]) if self.user else d) for d in plan.domains}
        self.caches: dict[str, str] = {}
        self.sampled_caches: dict[str, str] = {}  # with --tail-samples

    def seeds(self, method: Method) -> range:
        return seeds_for(self.p, method)

    def cache(self, corpus: Path, name: str, top_k: int = TOP_K, train_sequences: int | None = None, tail_samples: int = 0) -> str:
        out = self.work / name
        if not (out / MANIFEST).exists():
            p = self.p
            build_cache(
                CacheConfig(
                    corpus=str(corpus), out=str(out), model=self.model, seq_len=p.seq_len, top_k=top_k, val_fraction=p.val_fraction,
                    max_train_sequences=train_sequences or p.train_sequences, max_val_sequences=p.val_sequences,
                    batch_size=8, device=p.device, resume=out.exists(), tail_samples=tail_samples,
                )
            )  # fmt: skip
        return str(out)

    def sampled_cache(self, domain: str, n: int) -> str:
        """The domain's cache of the top SAMPLED_K ids plus ``n`` sampled tail ids, shared by every part that asks for it."""
        return self.cache(self.sources[domain], f"cache-{self.keys[domain]}-k{SAMPLED_K}-tail{n}", top_k=SAMPLED_K, tail_samples=n)

    def prepare(self, corpora: dict[str, Corpus], report: Report, log: Callable[[str], None]) -> None:
        """The model, the corpora (with size warnings), the general evaluation set, the reference checkpoint, the runner."""
        p, config = self.p, self.config
        self.figures.mkdir(parents=True, exist_ok=True)
        self.model = report.model_folder = local_model(self.model_folder, config.model)
        tokenizer = load_tokenizer(self.model)
        names = self.plan.domains
        self.sources = {d: (self.user[d] if self.user else prepare_corpus(d, self.data, max_documents=p.max_documents)) for d in names}
        self.general = Path(config.general) if config.general else prepare_corpus(GENERAL, self.data, max_documents=p.max_documents)
        for d in names:
            corpus = corpora.get(f"--domain {d}") or open_corpus(d, self.sources[d], p.val_fraction)
            report.notes += size_warnings(f"domain {d}", corpus, tokenizer, p.val_sequences * p.seq_len, p.train_sequences * p.seq_len)
        general = corpora.get("--general") or open_corpus(f"general ({GENERAL_LABEL})", self.general, p.val_fraction)
        report.notes += size_warnings("general domain", general, tokenizer, p.general_sequences * p.seq_len, 0)
        for note in report.notes:
            log(f"warning: {note}")

        # General domain: its hash-split validation documents are the evaluation set; its training
        # documents are the replay source, so replay never sees the evaluation text.
        self.work.mkdir(parents=True, exist_ok=True)
        general_eval = self.general_eval = write_documents(self.work / "general-eval.jsonl", general.validation)
        self.general_corpus = general
        general_tokens = pack_documents(general.validation, tokenizer, p.seq_len, p.general_sequences, desc="tokenize general").num_labels
        common = dict(
            batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps, general_eval=str(general_eval),
            general_max_sequences=p.general_sequences, device=p.device, steps=p.steps, eval_every=p.eval_every,
        )  # fmt: skip
        if p.reference_steps:
            report.reference = self.reference_checkpoint(common)
            self.model = report.reference["model"]
        if self.tasks:
            log(f"scoring the reference checkpoint ({self.model}) on {', '.join(self.tasks.names)}")
            report.task_reference = self.tasks.score_into(self.work / "reference", self.model)
        self.work = self.runs_root
        self.runner = Runner(self.work / "runs", common, config.keep_checkpoints, tasks=self.tasks)
        for d in names:
            self.caches[d] = self.cache(self.sources[d], f"cache-{self.keys[d]}")
            # S counts only target positions (a chat corpus's answers), so the table's token count does too.
            self.runner.tokens[d] = (general_tokens, Cache(self.caches[d]).split("validation").target_tokens)
            if self.plan.tail_samples:  # MFT's points on the fair frontier; the same documents and split
                self.sampled_caches[d] = self.sampled_cache(d, self.plan.tail_samples)

    def reference_checkpoint(self, common: dict) -> dict:
        """The paper's section 3.1 starts every method from a reference checkpoint lightly tuned on the
        general domain, the one with the lowest general validation perplexity. That absorbs what
        any training on packed raw text teaches (the packing's conventions, plain text for a chat
        model) before DG is measured, so DG measures forgetting. The untuned model is kept when no
        checkpoint beats it."""
        folder = self.work / "reference"
        cache = self.cache(self.general, "cache-general-untuned")
        settings = {**common, "steps": self.p.reference_steps, "seed": 0, "variant": "ft", "cache": cache}
        summary = train_once(folder, settings, keep_best=True)
        before, best = summary["before"], summary["best"]
        tuned = best is not None and best["ppl_spec"] < before["ppl_spec"]
        return {
            "model": str(folder / "best") if tuned else self.model,
            "steps": self.p.reference_steps,
            "best_step": best["step"] if tuned else 0,
            "ppl_before": before["ppl_spec"],
            "ppl_after": best["ppl_spec"] if tuned else before["ppl_spec"],
        }

    def tables(self, report: Report) -> None:
        """Every chosen method in every domain (frontier-domain-only methods there alone), each over its seeds."""
        chosen = [METHODS[m] for m in self.plan.methods]
        # Replay draws from a pool several times the reference's own general sequences, as general
        # data is plentiful in the paper's setting; a pool the size of the reference's is fit
        # within a few steps, and replaying it then raises general validation perplexity.
        replay = {}
        if any(m.uses_general_data for m in chosen):
            replay["replay"] = self.cache(self.general, "cache-general", train_sequences=self.p.replay_sequences)
        for domain in report.domains:
            for method in chosen:
                if method.frontier_domain_only and domain != report.frontier_domain:
                    continue
                extra = replay if method.uses_general_data else {}
                for seed in self.seeds(method):
                    self.runner.record(domain, self.keys[domain], method, seed, self.caches[domain], scored=True, **extra)

    def frontier(self, report: Report) -> None:
        """MFT at each tau from the k = 20 cache, from the online dense reference (teacher next to the student,
        full-vocabulary correction) and, unless skipped, from a cache of about the same bytes holding fewer top-k
        ids plus sampled tail ids; the same seeds. In this order, so a comparison cut short has the two lines every
        comparison needs first."""
        fd = report.frontier_domain
        caches = {"cached": self.caches[fd], "online": self.caches[fd]}
        if "tail-samples" not in report.skip:
            caches["sampled"] = self.sampled_cache(fd, SAMPLED_N)
        for line, cache in caches.items():
            _, k, n, _ = LINES[line]
            if line != "online":
                report.cache_bytes[line] = cache_info(cache)["splits"]["train"]["bytes_per_token"]
            report.frontier[line] = {}
            for tau in FRONTIER_TAUS:
                m = frontier_method(line, tau)
                report.frontier[line][tau] = {s: self.runner.record(fd, self.keys[fd], m, s, cache, k, n) for s in self.seeds(m)}
        plot_frontier(report.frontier, self.figures / "frontier.png", fd)

    def fidelity(self, report: Report) -> None:
        """The same MFT run from caches with k = 5 and 50, next to k = 20, the sampled tail and online dense."""
        fd, frontier = report.frontier_domain, report.frontier
        for k in (5, 20, 50):
            if k == TOP_K:  # the frontier's tau = 0.25 point, when it ran
                if frontier:
                    report.fidelity[f"cached k={k}"] = frontier["cached"][0.25]
                continue
            cache, m = self.cache(self.sources[fd], f"cache-{self.keys[fd]}-k{k}", top_k=k), fidelity_method(k)
            report.fidelity[f"cached k={k}"] = {s: self.runner.record(fd, self.keys[fd], m, s, cache, k) for s in self.seeds(m)}
        if "sampled" in frontier:
            report.fidelity[f"cached k={SAMPLED_K} + {SAMPLED_N} tail samples"] = frontier["sampled"][0.25]
        if frontier:
            report.fidelity["online (dense)"] = frontier["online"][0.25]

    def low_data(self, report: Report) -> None:
        """A handful of sequences, many passes, frequent evaluations (seed 0)."""
        p, fd = self.p, report.frontier_domain
        cache = self.cache(self.sources[fd], f"cache-{self.keys[fd]}-low", train_sequences=p.low_data_sequences)
        for method in (METHODS["FT"], METHODS["MFT"]):
            folder = self.runner.runs / "low-data" / self.keys[fd] / method.name
            settings = {**self.runner.common, **method.train_settings(), "cache": cache, "seed": 0}
            train_once(folder, {**settings, "steps": p.low_data_steps, "eval_every": p.low_data_eval_every}, self.config.keep_checkpoints)
            report.low[method.name] = [r for r in RunFolder(folder).metrics() if r["kind"] in ("before", "eval")]
        plot_low_data(report.low, self.figures / "low-data.png")

    # ------------------------------------------------------------------------- the fair frontier

    def fair_frontier(self, log: Callable[[str], None]) -> tuple[list[Row], list[str]]:
        """Every point of the plan's families over the profile's seeds, one row per evaluation along each run (early
        stopping) and one per weight average (WiSE-FT, WiSE-MFT); then one plot per domain. Finished runs and averages
        are read back. Returns the rows and, with --report-only, the points left out because they have not finished,
        with their seeds."""
        points = frontier_points(self.plan)
        needs_fisher = any(pt.family == "EWC" for _, pt in points) and not self.config.report_only
        ewc = self.fisher(log) if needs_fisher else None
        wise: dict[tuple[str, Point], list[Point]] = {}
        for domain, pt in points:
            if pt.averaged is not None:
                wise.setdefault((domain, pt.averaged), []).append(pt)
        rows, unfinished = [], {}
        for domain, pt in frontier_trained(points):
            averages = wise.get((domain, pt), [])
            for seed in range(self.p.seeds):
                traced = self.trace(domain, pt, seed, ewc, averages, log)
                rows += traced
                for q in [pt, *averages]:  # a point without rows has not finished (only with --report-only)
                    if not any(r.method == q.family and r.alpha == q.alpha for r in traced):
                        unfinished.setdefault(f"{domain} {q.family} {q.label}", []).append(seed)
        for domain in self.plan.domains:
            plot_fair_frontier(rows, domain, self.figures / f"frontier-{domain}.png")
        return rows, [f"{point} (seed {', '.join(map(str, seeds))})" for point, seeds in unfinished.items()]

    def trace(self, domain: str, point: Point, seed: int, ewc: tuple[str, float] | None, averages: list[Point], log) -> list[Row]:
        """One run's rows, every evaluation after the start, and the rows of the weight ``averages`` of its best checkpoint.

        The best checkpoint is kept until every average is evaluated; a finished run whose checkpoint is gone while
        an average is missing (it ran before WiSE-FT was asked for) is trained again with the same settings and seed.
        With --report-only nothing is trained or evaluated: what has finished is read back, the rest left out.
        """
        domain_folder = self.work / "frontier" / self.keys[domain]
        k, n = self.plan.cache_of(point)
        cache = self.sampled_caches[domain] if n else self.caches[domain]
        suffix = f"-k{k}tail{n}" if n else ""
        folder = domain_folder / point.family / (point.folder + suffix) / f"seed{seed}"
        results = {w: domain_folder / w.family / (w.folder + suffix) / f"seed{seed}.json" for w in averages}
        missing = [w for w, path in results.items() if not path.exists()]
        run = RunFolder(folder)
        if self.config.report_only:
            if not run.is_finished():
                return []
        else:
            if missing and run.is_finished() and run.summary()["best"] is not None and not run.best.exists():
                log(f"{folder}: training again for its best checkpoint, which a weight average needs")
                shutil.rmtree(folder)
            settings = {
                **self.runner.common, "eval_every": frontier_eval_every(self.p), **point.train_settings(ewc),
                "cache": cache, "seed": seed,
            }  # fmt: skip
            train_once(folder, settings, keep_best=bool(missing) or self.config.keep_checkpoints)
            if missing and run.best.exists():
                sets = self.evaluation_sets(domain)
                before = run.metrics("before")[0]
                scores = wise_ft_scores(self.model, run.best, [w.alpha for w in missing], before, sets, 8, self.p.device)
                best_step = run.summary()["best"]["step"]
                for w in missing:
                    results[w].parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(results[w], json.dumps({**scores[w.alpha], "step": best_step}, indent=2) + "\n")
            if missing and not self.config.keep_checkpoints:
                shutil.rmtree(run.best, ignore_errors=True)
        tokens = self.runner.tokens[domain]
        used = run.read_settings()  # what the run trained with, read back the same way whether or not it ran now
        lam = used["l2_init"] if used.get("l2_init") is not None else used.get("ewc_lambda")
        rows = [self.frontier_row(domain, point, seed, r, tokens, (k, n), lr=used["lr"], lam=lam) for r in run.metrics("eval")]
        for w, path in results.items():
            if path.exists():
                rows.append(self.frontier_row(domain, w, seed, json.loads(path.read_text()), tokens, self.plan.cache_of(w), lr=w.lr))
        return rows

    @staticmethod
    def frontier_row(domain: str, point: Point, seed: int, row: dict, tokens: tuple[int, int], cache: tuple[int | None, int], lr: float, lam: float | None = None) -> Row:
        """A runs.csv row of one evaluation (a metrics.jsonl "eval" row, or a WiSE-FT result); ``cache`` is the
        (top-k, sampled tail ids) of the cache it trained from."""
        return Row(
            seed, domain, point.family, point.tau, *cache, row.get("S"), row.get("DG"), row.get("DG_over_S"), *tokens,
            lr=lr, lam=lam, alpha=point.alpha, rank=point.rank, step=row["step"],
        )  # fmt: skip

    def evaluation_sets(self, domain: str) -> dict:
        """The domain's evaluation sets packed as its runs pack them: the cache's validation split and the general texts."""
        config = EvalConfig(
            model=self.model, spec_eval=self.caches[domain], general_eval=str(self.general_eval),
            max_sequences=self.p.general_sequences, device=self.p.device,
        )  # fmt: skip
        return eval_sets(config, load_tokenizer(self.model))

    def fisher(self, log) -> tuple[str, float]:
        """The start's diagonal Fisher on the general domain's training documents (never its evaluation texts), computed
        once per start and reused, on as many tokens as a run trains on; returns (its file, its mean over all weights)."""
        from safetensors import safe_open

        path = self.work / "fisher-general.safetensors"
        if not path.exists():
            corpus = write_documents(self.work / "general-train.jsonl", self.general_corpus.train)
            log(f"computing the Fisher of {self.model} on the general training documents for EWC")
            write_fisher(FisherConfig(model=self.model, corpus=str(corpus), out=str(path), seq_len=self.p.seq_len, max_tokens=self.p.train_tokens, device=self.p.device))
        total = count = 0.0
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).double()
                total, count = total + float(t.sum()), count + t.numel()
        return str(path), total / count

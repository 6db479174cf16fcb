"""The run folder of `mft train`: the one owner of its file names and of every read and write of them.

A run folder holds:

- ``run-config.yaml``: the settings it was started with (all TrainConfig fields but ``resume``);
  `mft train --config RUN/run-config.yaml --out NEW` runs it again;
- ``metrics.jsonl``: one JSON row per line, ``kind`` "before" (step 0), "train" or "eval";
- ``summary.json``: written last, so its presence means the run finished;
- ``best/``: the checkpoint of the best evaluation row (``best_row``), ``best-merged/`` with --merge-adapter;
- ``last/``: the newest checkpoint plus ``trainer_state.pt``, what --resume continues from.

Training, the sweep, the report and the benchmarks all go through this module. It imports no
torch and no training code, so reading results stays cheap.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mft_pipeline.errors import ConfigError, MFTError
from mft_pipeline.files import OLD, atomic_write_text

RUN_CONFIG = "run-config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BEST = "best"
LAST = "last"
MERGED = "best-merged"
TRAINER_STATE = "trainer_state.pt"

# Settings that may change between a run and its --resume, because they do not change what it computes:
# where the folder lies, how many processes train and how (DDP, FSDP), and recomputation or compilation.
RESUME_FREE = ("resume", "out", "distributed", "gradient_checkpointing", "compile")


class RunFolderError(MFTError):
    """A run folder that cannot be started or continued as asked."""


def improves(row: dict, best: dict | None) -> bool:
    """The best-row rule: an evaluation row within the degeneralization budget with a lower
    specialized perplexity than ``best`` (the first such row wins ties). Without a validation
    split (no ``ppl_spec``) each later evaluation wins, so the last one is kept."""
    if row.get("kind") != "eval" or not row.get("within_budget", True):
        return False
    return best is None or "ppl_spec" not in row or row["ppl_spec"] < best["ppl_spec"]


def best_row(rows: list[dict]) -> dict | None:
    """The row ``improves`` picks among ``rows``, in order: the row the training loop kept as best/."""
    best = None
    for row in rows:
        if improves(row, best):
            best = row
    return best


def settings_diff(before: dict, now: dict, defaults: dict | None = None, ignore: tuple[str, ...] = RESUME_FREE) -> list[str]:
    """"name: old -> new" for every setting that differs, except ``ignore``d ones.

    A setting missing from ``before`` (a folder made before the setting existed) counts as its
    value in ``defaults``.
    """
    defaults = defaults or {}
    diffs = []
    for key, value in now.items():
        old = before.get(key, defaults.get(key))
        if key not in ignore and old != value:
            diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


@dataclass(frozen=True)
class RunFolder:
    """One run folder at ``path``; nothing is read or written until a method is called."""

    path: Path

    def __init__(self, path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config_file(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def merged(self) -> Path:
        return self.path / MERGED

    # Settings.

    def is_run(self) -> bool:
        return self.config_file.exists()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def read_settings(self) -> dict:
        return yaml.safe_load(self.config_file.read_text())

    def start(self, settings: dict, resume: bool, defaults: dict | None = None) -> Path | None:
        """Make a new run folder holding ``settings``, or check one to resume; returns the checkpoint to resume from.

        A new run needs an empty (or absent) folder; a resumed one needs a checkpoint and the
        same settings (``settings_diff``).
        """
        if resume:
            resume_from = self.resumable()
            if resume_from is None:
                raise RunFolderError(f"{self.path}: nothing to resume (no {LAST}/ checkpoint); run without --resume")
            diffs = settings_diff(self.read_settings(), settings, defaults)
            if diffs:
                raise ConfigError("--resume needs the same settings as the interrupted run; changed: " + "; ".join(diffs))
            return resume_from
        if not self.is_empty():
            raise RunFolderError(f"{self.path}: run folder is not empty; use --resume to continue it, or another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        write_settings(settings, self.config_file, header="Resolved settings of this run")
        return None

    def prepare(self, settings: dict, defaults: dict | None = None) -> str:
        """How running ``settings`` again here goes, for callers that rerun a set of runs (the sweep).

        Returns "new" (absent or empty folder), "resumed" (the same settings and a checkpoint:
        train with resume) or "finished, skipped". A run killed before its first checkpoint has
        nothing worth keeping: its folder is cleared and it is "new". A folder that is not a run,
        or holds a run made with other settings (``settings_diff``), is refused rather than reused.
        """
        if not self.is_run():
            if not self.is_empty():
                raise ConfigError(f"{self.path}: not a run folder; move it away or use another --out")
            return "new"
        diffs = settings_diff(self.read_settings(), settings, defaults)
        if diffs:
            raise ConfigError(f"{self.path}: made with other settings ({'; '.join(diffs)}); use another --out")
        if self.is_finished():
            return "finished, skipped"
        if self.resumable() is not None:
            return "resumed"
        print(f"warning: {self.path} has no checkpoint yet; starting it again", file=sys.stderr)
        shutil.rmtree(self.path)
        return "new"

    def resumable(self) -> Path | None:
        """The newest complete resume checkpoint: ``last/``, or ``last.old/`` after a crash between the two renames of a save."""
        for name in (LAST, LAST + OLD):
            if (self.path / name / TRAINER_STATE).exists():
                return self.path / name
        return None

    # Metrics.

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self, kind: str | None = None) -> list[dict]:
        """The rows of ``metrics.jsonl`` (of one ``kind`` if given); none before the first is written.

        A last line cut short by a kill mid-write is skipped.
        """
        if not self.metrics_file.exists():
            return []
        lines = self.metrics_file.read_text().split("\n")
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # no newline after it: the write was interrupted
                    continue
                raise RunFolderError(f"{self.metrics_file}: line {i + 1} is not JSON") from None
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop the rows written after step ``after_step``, so the log matches a run resumed from that step."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def best_row(self) -> dict | None:
        return best_row(self.metrics())

    # Summary.

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict | None:
        """The finished run's summary; None while it is unfinished."""
        return json.loads(self.summary_file.read_text()) if self.summary_file.exists() else None

    def is_finished(self) -> bool:
        return self.summary_file.exists()


def write_settings(settings: dict, path: Path, header: str) -> Path:
    """``settings`` as YAML (keys in the given order) that ``--config`` reads back, after a ``# header`` line."""
    text = f"# {header}; run it again with --config {Path(path).name}\n"
    atomic_write_text(Path(path), text + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
    return Path(path)


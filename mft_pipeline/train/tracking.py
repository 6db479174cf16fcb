"""Experiment tracking: training curves in TensorBoard or Weights & Biases, through their own libraries.

The training loop makes one tracker per run with ``make_tracker`` and calls
``tracker.log(step, {...})`` with whatever scalars it has at that step (loss, learning rate,
gradient norm, tokens/s, perplexities, S, DG), then ``tracker.close()``. Where the logs go:

- tensorboard: ``RUN/tensorboard/`` (view with ``tensorboard --logdir RUN/tensorboard``);
- wandb: ``RUN/wandb/``, offline unless ``WANDB_MODE=online`` is set (upload an offline run
  later with ``wandb sync RUN/wandb/offline-run-*``);
- none: nothing beyond the run's own metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
from pathlib import Path
from typing import Protocol

from mft_pipeline.config import REPORT_TO
from mft_pipeline.errors import ConfigError

# Which pip extra installs each tracker's library.
_PACKAGES = {"tensorboard": ("tensorboard", "tracking"), "wandb": ("wandb", "wandb")}


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float | None]) -> None: ...

    def close(self) -> None: ...


def default_report_to() -> str:
    """``tensorboard`` when its library is installed, else ``none``."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


def check_report_to(report_to: str | None) -> str:
    """The tracker name ``report_to`` stands for (None: the default), or ConfigError."""
    if report_to is None:
        return default_report_to()
    if report_to not in REPORT_TO:
        raise ConfigError(f"report_to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
    return report_to


def require(module: str, extra: str) -> None:
    """ConfigError saying what to install unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--report-to needs the {module} package: pip install 'mft-pipeline[{extra}]'")


def check_tracker(report_to: str | None) -> str:
    """The tracker ``report_to`` stands for (``check_report_to``), or ConfigError unless its library is installed."""
    report_to = check_report_to(report_to)
    if report_to != "none":
        require(*_PACKAGES[report_to])
    return report_to


def make_tracker(report_to: str | None, run_dir: str | Path, config_dict: dict) -> Tracker:
    """A tracker writing under ``run_dir``; ``config_dict`` (the run's settings) is recorded with it.

    Args:
        report_to: "tensorboard", "wandb", "none", or None for ``default_report_to()``.
        run_dir: the run folder; TensorBoard writes ``run_dir/tensorboard/``, W&B ``run_dir/wandb/``.
        config_dict: JSON-serialisable run settings (e.g. ``dataclasses.asdict(config)``).

    Under several processes, make it on the main process only and a ``NullTracker`` elsewhere.
    """
    report_to = check_tracker(report_to)
    if report_to == "none":
        return NullTracker()
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / "tensorboard", config_dict)
    return WandbTracker(Path(run_dir), config_dict)


def _numeric_scalars(scalars: dict) -> dict[str, float]:
    """The numeric entries as floats; None (a metric this step lacks) is left out, NaN is kept (it shows a divergence)."""
    out = {}
    for name, value in scalars.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"tracked value {name!r} must be a number, got {value!r}")
        out[name] = float(value)
    return out


class NullTracker:
    """Logs nothing (``--report-to none``, and processes other than the main one)."""

    def log(self, step: int, scalars: dict) -> None:
        _numeric_scalars(scalars)  # the same check, so a bad value fails whichever tracker is on

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorBoardTracker(NullTracker):
    """Scalars as TensorBoard event files in ``log_dir``; the run config as a text entry."""

    def __init__(self, log_dir: Path, config_dict: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
        # Markdown code block, so TensorBoard's text tab keeps the indentation.
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log(self, step: int, scalars: dict) -> None:
        for name, value in _numeric_scalars(scalars).items():
            self.writer.add_scalar(name, value, step)
        # Evaluations are minutes apart on CPU; flushing now lets a watching TensorBoard see them.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(NullTracker):
    """A W&B run under ``run_dir/wandb``, offline (no account, no network) unless ``WANDB_MODE`` says otherwise."""

    def __init__(self, run_dir: Path, config_dict: dict):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mft"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config_dict,
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, step: int, scalars: dict) -> None:
        values = _numeric_scalars(scalars)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before wandb's service process has written the run file;
        # teardown waits for it (a later make_tracker starts a new service).
        wandb.teardown()

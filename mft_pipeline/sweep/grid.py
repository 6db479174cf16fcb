"""`mft sweep`: one cache, a grid of methods, one run folder per grid point, then the report.

Every grid point calls the same ``train()`` with the same data, steps and seed; only the
method changes. A finished run (its summary.json exists) is skipped and a half-finished one
resumed, so a killed sweep is restarted by running the same command again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from mft_pipeline.config import (
    PEFT_METHODS, TRAIN_DEFAULTS, TrainConfig, check_objective, doc, run_settings, split_list, split_numbers,
)
from mft_pipeline.distill.correction import check_tau
from mft_pipeline.errors import ConfigError
from mft_pipeline.run_folder import RunFolder

# Objectives whose target does not depend on tau: run once, not once per tau.
TAU_FREE = ("ft", "distill+ft", "dft", "talr")
# TrainConfig fields the grid sets per run; the sweep passes every other one through unchanged.
GRID_FIELDS = ("cache", "out", "tau", "variant", "peft", "replay_fraction", "resume")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of training runs from one stage-one cache."""

    cache: str = doc("Stage-one cache folder every run trains from.")
    out: str = doc("Sweep folder: one run folder per grid point, plus report.md, report.csv and tradeoff.png.")
    taus: str = doc("Comma-separated MFT margins, e.g. 0,0.1,0.25,0.5,1 (ft and distill+ft ignore tau and run once).", default="0.25")
    variants: str = doc("Comma-separated objectives: mft, ft, distill+ft, single-correction, dft, talr.", default="mft,ft")
    peft: str = doc("Comma-separated PEFT settings: none, lora, dora, ia3 (rank from --peft-rank).", default="none")
    replay_fractions: str | None = doc(
        "Comma-separated replay fractions (share of general-domain sequences per step); 0 = no replay. "
        "Default: 0, or 0,0.5 when --replay is given.",
        default=None,
    )

    def __post_init__(self):
        for name in ("tau_list", "variant_list", "peft_list"):
            getattr(self, name)  # parse now, so a typo fails before any training

    @property
    def tau_list(self) -> list[float]:
        return [check_tau(t) for t in split_numbers(self.taus, "taus")]

    @property
    def variant_list(self) -> list[str]:
        return [check_objective(v) for v in split_list(self.variants, "variants")]

    @property
    def peft_list(self) -> list[str]:
        pefts = split_list(self.peft, "peft")
        bad = [p for p in pefts if p not in PEFT_METHODS]
        if bad:
            raise ConfigError(f"peft must be among {', '.join(PEFT_METHODS)}; got {', '.join(bad)}")
        return pefts

    def replay_list(self, replay: str | None) -> list[float]:
        if self.replay_fractions is None:
            return [0.0, 0.5] if replay else [0.0]
        fractions = split_numbers(self.replay_fractions, "replay_fractions")
        if any(not 0 <= f < 1 for f in fractions):
            raise ConfigError(f"replay fractions must be in [0, 1), got {self.replay_fractions}")
        if any(fractions) and not replay:
            raise ConfigError("--replay-fractions above 0 need --replay (a general-domain cache)")
        return fractions


def run_name(config: TrainConfig) -> str:
    """Folder name of a grid point, e.g. ``mft-tau0.25-lora-r8-replay0.5``."""
    parts = [config.variant.replace("+", "-")]
    if config.variant not in TAU_FREE:
        parts.append(f"tau{config.tau:g}")
    if config.peft in ("lora", "dora"):
        parts.append(f"{config.peft}-r{config.peft_rank}")
    elif config.peft != "none":
        parts.append(config.peft)
    if config.replay:
        parts.append(f"replay{config.replay_fraction:g}")
    if config.online:
        parts.append("online")
    return "-".join(parts)


def grid(sweep: SweepConfig, base: dict) -> list[TrainConfig]:
    """Every run of the sweep, all validated before the first one trains.

    ``base`` holds the pass-through TrainConfig settings (steps, lr, seed, --replay, ...).
    """
    from mft_pipeline.train.loop import replay_rows_per_step

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(GRID_FIELDS)
    base = {k: v for k, v in base.items() if k in train_fields}
    runs: dict[str, TrainConfig] = {}
    for variant in sweep.variant_list:
        for peft in sweep.peft_list:
            for fraction in sweep.replay_list(base.get("replay")):
                taus = [1.0] if variant in TAU_FREE else sweep.tau_list
                for tau in taus:
                    settings = dict(base, cache=sweep.cache, out="", tau=tau, variant=variant, peft=peft)
                    if fraction:
                        settings["replay_fraction"] = fraction
                    else:
                        settings["replay"] = None
                    if peft == "none":
                        settings.update(merge_adapter=False, peft_targets=None)
                    config = TrainConfig(**settings)
                    replay_rows_per_step(config)
                    name = run_name(config)
                    runs[name] = dataclasses.replace(config, out=str(Path(sweep.out) / name))
    return list(runs.values())


def run_sweep(sweep: SweepConfig, base: dict, log=print, train=None) -> list[Path]:
    """Train every grid point not finished yet, then write the report. Returns the run folders.

    ``train`` trains one TrainConfig (default: ``mft_pipeline.train.loop.train``).
    """
    from mft_pipeline.sweep.report import write_report

    if train is None:
        from mft_pipeline.train.loop import train
    configs = grid(sweep, base)
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"sweep": dataclasses.asdict(sweep), "runs": [c.out for c in configs]}, indent=2) + "\n")
    for i, config in enumerate(configs, 1):
        train_unless_finished(config, train, lambda status: log(f"[{i}/{len(configs)}] {Path(config.out).name}: {status}"))
    paths = write_report([Path(c.out) for c in configs], out)
    log("report: " + ", ".join(str(p) for p in paths))
    return [Path(c.out) for c in configs]


def train_unless_finished(config: TrainConfig, train, log=print) -> str:
    """Train one run unless its folder holds it finished; a half-finished one is resumed. Returns ``prepare``'s status.

    ``log`` gets the status before any training starts.
    """
    status = prepare(config)
    log(status)
    if status != "finished, skipped":
        train(dataclasses.replace(config, resume=status == "resumed"))
    return status


def prepare(config: TrainConfig) -> str:
    """What to do with a grid point's folder: "new", "resumed" or "finished, skipped" (``RunFolder.prepare``)."""
    return RunFolder(config.out).prepare(run_settings(config), TRAIN_DEFAULTS)

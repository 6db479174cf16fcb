"""What `mft compare` runs: the methods, the profiles that size the protocol, and the plan with its time estimate.

The protocol is the paper's section 3.1, scaled: every method starts from a reference checkpoint
lightly tuned on the general domain, trains on a fixed token budget per domain with the same
steps, batch and learning rate, and is read at its checkpoint with the lowest specialized
validation perplexity; several seeds (data order and the initialization of new parameters) give
Student t intervals. Beyond the per-domain table the protocol has optional parts (PARTS): the
sparse-against-dense MFT frontier, a sampled-tail line on it, the sparse-cache fidelity check and
the low-data curves.

The fair frontier (``--families``) is a mode of its own: each method family's knob grid (FAMILIES),
every evaluation along every run a point (early stopping), so that each family is compared with MFT
at its best settings rather than at one operating point.

Methods, frontier families and profiles are data: a new method is a ``Method`` entry, a new knob
setting a ``Point`` in FAMILIES, a new size a ``Profile``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from mft_pipeline.config import CompareConfig, split_list, split_numbers
from mft_pipeline.demo import corpora as demo_corpora
from mft_pipeline.errors import ConfigError

# Built-in corpora (mft_pipeline.demo, all from PyPI), used without --domain and --general.
DOMAINS = demo_corpora.DOMAINS
GENERAL = demo_corpora.GENERAL
GENERAL_LABEL = "State of the Union addresses"
FRONTIER_TAUS = (0.0, 0.1, 0.25, 0.5)
TOP_K = 20  # the cache every method trains from
# The sampled-tail frontier's cache: top-12 plus 11 ids drawn from the teacher outside them (--tail-samples),
# about the bytes per token of the k = 20 cache (docs/choosing-k.md); the results file gives both measured.
SAMPLED_K, SAMPLED_N = 12, 11
PARTS = ("frontier", "tail-samples", "fidelity", "low-data")  # tail-samples is a third frontier line


@dataclass(frozen=True)
class Method:
    """One method: a label and the training settings that make it; everything else is the profile's."""

    name: str
    variant: str = "ft"
    tau: float | None = None  # the MFT margin, for the objectives that have one
    peft: str = "none"
    peft_rank: int = 8
    replay_fraction: float = 0.0  # > 0: mixes general-domain sequences into each step, so uses general data
    online: bool = False  # the dense teacher beside the student instead of the cached top-k
    lr: float | None = None  # None: the profile's
    core: bool = False  # seeded with Profile.seeds; the others with Profile.other_seeds
    frontier_domain_only: bool = False

    def train_settings(self) -> dict:
        """The TrainConfig fields this method sets (the replay cache is added by the caller)."""
        settings: dict = dict(variant=self.variant)
        if self.tau is not None:
            settings["tau"] = self.tau
        if self.peft != "none":
            settings.update(peft=self.peft, peft_rank=self.peft_rank)
        if self.replay_fraction:
            settings["replay_fraction"] = self.replay_fraction
        if self.online:
            settings["online"] = True
        if self.lr is not None:
            settings["lr"] = self.lr
        return settings

    @property
    def uses_general_data(self) -> bool:
        return self.replay_fraction > 0

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_").replace("=", "").replace("+", "plus")


METHODS = {
    m.name: m
    for m in (
        Method("FT", core=True),
        Method("MFT", "mft", tau=0.25, core=True),
        Method("LoRA r8", peft="lora"),
        Method("LoRA r8 + MFT", "mft", tau=0.25, peft="lora"),
        Method("Replay 0.5", replay_fraction=0.5),
        Method("distill+ft", "distill+ft", frontier_domain_only=True),
        Method("single-correction", "single-correction", tau=0.25, frontier_domain_only=True),
    )
}
# The frontier's lines: name -> (label, top-k of its cache or "dense", tail samples, method-name suffix).
LINES = {
    "cached": (f"k = {TOP_K} cache", TOP_K, 0, ""),
    "sampled": (f"k = {SAMPLED_K} + {SAMPLED_N} tail samples", SAMPLED_K, SAMPLED_N, f" k={SAMPLED_K}+{SAMPLED_N}"),
    "online": ("online dense", "dense", 0, " online"),
}


def frontier_method(line: str, tau: float) -> Method:
    """The MFT run at ``tau`` on a frontier line; the cached line's tau = 0.25 point is the table's MFT run."""
    name = f"MFT tau={tau:g}{LINES[line][3]}"
    return Method("MFT" if name == "MFT tau=0.25" else name, "mft", tau=tau, online=line == "online", core=True)


def fidelity_method(k: int) -> Method:
    return Method(f"MFT k={k}", "mft", tau=0.25)


# ----------------------------------------------------------------------------- the fair frontier

FRONTIER_LRS = (1e-5, 3e-5, 1e-4)
LORA_RANKS = (4, 16, 64)
# LoRA trains its adapters from zero, and is usually run at about ten times full finetuning's rate; at the quick
# profile's 1e-4 it stays within 1% of the start at every rank in 16 steps, at 1e-3 it over-trains within 6 steps
# (docs/results/frontier-quick-legal.md), so it is also traced at 1e-3 and at 3e-4 between them: at its best rate.
LORA_LRS = (3e-4, 1e-3)
WISE_ALPHAS = (0.25, 0.5, 0.75)
# Decades from "no effect" to "no learning" for a penalty lambda/2 * sum F (theta - theta0)^2 with F = 1 (L2-init).
# The data gradient is per token (mean loss), about 2e-4 per weight (a gradient norm of ~2 over 135M weights), and
# AdamW moves a weight about lr per step, so a run at 1e-4 moves weights by ~1e-3. The penalty's gradient lambda * 1e-3
# is then 5% of the data's at lambda = 1e-2 (no effect), equal near 0.2, and at lambda = 100 it holds a weight within
# 2e-4 / 100 = 2e-6 of its start, a hundredth of one step's move (no learning). EWC multiplies each weight's term by
# its Fisher F; its lambda is the same ladder divided by the Fisher's mean over all weights, so that with a uniform
# Fisher EWC is L2-init at the same rung. The results show both ends, so a grid that misses one is seen.
PENALTY_LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class Point:
    """One knob setting of a frontier family: a training run whose every evaluation is a point, or (WiSE-FT and WiSE-MFT,
    ``alpha`` set) the weight average of the FT or MFT run at ``lr`` (and ``tau``) with the start, evaluated once,
    without training."""

    family: str
    variant: str = "ft"
    lr: float | None = None  # None: the profile's
    tau: float | None = None
    rank: int | None = None  # LoRA
    lam: float | None = None  # L2-init's lambda; EWC's in units of 1 / (the Fisher's mean)
    alpha: float | None = None  # WiSE-FT, WiSE-MFT: weight of the tuned model

    @property
    def knobs(self) -> dict:
        """The settings that place this point in its family, as the results name them."""
        names = {"lr": self.lr, "tau": self.tau, "rank": self.rank, "lambda": self.lam, "alpha": self.alpha}
        return {k: v for k, v in names.items() if v is not None}

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v:g}" for k, v in self.knobs.items()) or "profile settings"

    @property
    def folder(self) -> str:
        return "-".join(f"{k}{v:g}" for k, v in self.knobs.items()) or "default"

    @property
    def averaged(self) -> Point | None:
        """The trained point whose best checkpoint this point averages with the start; None for a trained point."""
        if self.alpha is None:
            return None
        return Point("FT", lr=self.lr) if self.variant == "ft" else Point("MFT", "mft", lr=self.lr, tau=self.tau)

    def effective_lr(self, p: Profile) -> float:
        return p.lr if self.lr is None else self.lr

    def train_settings(self, ewc: tuple[str, float] | None = None) -> dict:
        """The TrainConfig fields this point sets over the profile's; ``ewc`` is (Fisher file, its mean) for EWC."""
        settings: dict = dict(variant=self.variant)
        if self.lr is not None:
            settings["lr"] = self.lr
        if self.tau is not None:
            settings["tau"] = self.tau
        if self.rank is not None:
            settings.update(peft="lora", peft_rank=self.rank)
        if self.family == "L2-init":
            settings["l2_init"] = self.lam
        if self.family == "EWC":
            path, mean = ewc
            settings.update(ewc=path, ewc_lambda=self.lam / mean)
        return settings


# The learning rate moves MFT's curve as much as FT's, so MFT is seen at its best rate too.
MFT_POINTS = tuple(Point("MFT", "mft", lr=lr, tau=t) for lr in (1e-4, 3e-5) for t in FRONTIER_TAUS) + (Point("MFT", "mft", lr=1e-5, tau=0.25),)
FAMILIES: dict[str, tuple[Point, ...]] = {
    "FT": tuple(Point("FT", lr=lr) for lr in FRONTIER_LRS),
    "MFT": MFT_POINTS,
    "LoRA": tuple(Point("LoRA", lr=lr, rank=r) for lr in (None, *LORA_LRS) for r in LORA_RANKS),
    "L2-init": tuple(Point("L2-init", lam=lam) for lam in PENALTY_LAMBDAS),
    "EWC": tuple(Point("EWC", lam=lam) for lam in PENALTY_LAMBDAS),
    "WiSE-FT": tuple(Point("WiSE-FT", lr=lr, alpha=a) for lr in FRONTIER_LRS for a in WISE_ALPHAS),
    # Averaging pulls an over-trained run back toward the start; this asks whether it helps MFT as much as FT.
    "WiSE-MFT": tuple(Point("WiSE-MFT", "mft", lr=m.lr, tau=m.tau, alpha=a) for m in MFT_POINTS for a in WISE_ALPHAS),
    "DFT": (Point("DFT", "dft"),),
    "TALR": (Point("TALR", "talr"),),
}
# Traced in every --frontier-domains domain; the other families in the frontier domain alone.
EVERY_DOMAIN_FAMILIES = ("FT", "MFT")


def frontier_eval_every(p: Profile) -> int:
    """Evaluations along a frontier run: at least five after the start, each an early-stopping point."""
    return max(1, p.steps // 5)


def frontier_points(plan: Plan) -> list[tuple[str, Point]]:
    """(domain, point) for every point the plan traces, WiSE-FT's included; in family order, then grid order."""
    out = []
    for domain in plan.domains:
        for family in plan.families:
            if domain != plan.frontier_domain and family not in EVERY_DOMAIN_FAMILIES:
                continue
            out += [(domain, pt) for pt in FAMILIES[family] if plan.chooses(pt)]
    return out


def frontier_trained(points: list[tuple[str, Point]]) -> list[tuple[str, Point]]:
    """The runs the points need: every trained point, plus the run each weight-average point averages."""
    runs = [(d, pt) for d, pt in points if pt.averaged is None]
    for d, pt in points:
        if pt.averaged is not None and (d, pt.averaged) not in runs:
            runs.append((d, pt.averaged))
    return runs


def planned_frontier(plan: Plan) -> dict[str, int]:
    """How many runs, weight-average (WiSE) evaluations, Fisher files and caches the fair frontier needs (the smoke test checks them)."""
    points = frontier_points(plan)
    trained = frontier_trained(points)
    seeds = plan.profile.seeds
    return dict(
        reference=1 if plan.profile.reference_steps else 0,
        caches=1 + len(plan.domains) * (2 if plan.tail_samples else 1),
        frontier=seeds * len(trained),
        wise=seeds * sum(pt.alpha is not None for _, pt in points),
        fisher=int(any(pt.family == "EWC" for _, pt in points)),
    )


@dataclass(frozen=True)
class Throughput:
    """What a profile was sized from, measured with ``train`` on the profile's seq_len and batch size."""

    train: float  # training tokens per second: forward, backward and optimizer step, cached targets
    eval: float  # evaluated (or cached) tokens per second: one forward without gradients
    online: float  # training tokens per second with the online dense teacher beside the student
    overhead_s: float  # per run: loading the model, tokenizing the general evaluation, writing checkpoints
    measured: str  # where and how
    tasks: float | None = None  # task continuations scored per second (--tasks), model loading included


CPU_THROUGHPUT = Throughput(
    # Measured 2026-12-06 on 2 AMD EPYC cores with 2 threads and nothing else running, SmolLM2-135M, seq_len 128,
    # batch 8, in `mft compare --quick` runs: training, the mean tokens_per_s of their metrics.jsonl (140-160);
    # evaluation, py-spy's time in `evaluate` over the tokens evaluated (385-400 tokens/s: the 135M body's forward and
    # the 49k-vocabulary head in float32); overhead, py-spy's time in loading and checkpoints, about 15 s a run.
    # Online dense was measured on a 2-core Xeon that trained cached runs at 235 tokens/s and online ones at 160
    # (146-173); it is scaled here by that ratio, not measured.
    train=150, eval=400, online=100, overhead_s=15,
    measured="measured on 2 AMD EPYC cores, 2 threads, no other load (online dense scaled, not measured)",
    # Tasks: `mft compare --quick --tasks` (five tasks, --task-limit 50) on the same machine, one thread while a
    # training job held the other core: 800 continuations per checkpoint in 122-125 s from the run's end to its
    # tasks.json, loading the checkpoint included (docs/tasks.md).
    tasks=6.4,
)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    seq_len: int
    max_documents: int  # per built-in corpus, before the split: keeps tokenization cheap
    train_sequences: int  # the fixed training budget per domain
    val_sequences: int
    general_sequences: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    low_data_sequences: int
    low_data_steps: int
    low_data_eval_every: int
    reference_steps: int  # light general-domain tuning before everything else; 0 skips it
    replay_sequences: int  # general-domain training sequences replay draws from
    device: str
    seeds: int  # core methods (FT, MFT) and every frontier point
    other_seeds: int  # every other method, the k = 5 / 50 fidelity runs and low data
    methods: tuple[str, ...]  # run when --methods is not given
    val_fraction: float = 0.1  # documents held out, by hash, for validation and the general evaluation
    domains: tuple[str, ...] = DOMAINS  # built-in domains, when no --domain is given
    skip: tuple[str, ...] = ()  # PARTS left out unless --skip says otherwise
    throughput: Throughput | None = None  # what the profile was sized from

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def protocol(self) -> dict:
        """The settings every method shares, as the results file lists them."""
        left_out = ("device", "methods", "domains", "skip", "throughput")
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("low_data") and k not in left_out}


PROFILES = {
    # Does MFT help on my data? One domain (legal unless --domain), FT against MFT tau 0.25, 3 seeds, nothing else.
    # Each run trains on 16 x 8 x 128 = 16,384 tokens (one pass over its 128 sequences) and evaluates 64 general and
    # 32 specialized sequences twice, before and after (with one pass over the data the last checkpoint is nearly
    # always the best: it was at every run of the 24-step version of this profile). The reference is 12 steps.
    # At CPU_THROUGHPUT a run takes about 3 minutes and the whole comparison (reference, 2 caches, 6 runs) about
    # 23 minutes, plus preparing the model and corpora; measured 2026-12-06 on 2 idle cores: 20.2 minutes in all. The
    # 24-step version (192 sequences, 96 and 48 evaluated three times) took 41.6; evaluation, at 400 tokens/s, was
    # half of each run's time besides training.
    "quick": Profile(
        seq_len=128, max_documents=400, train_sequences=128, val_sequences=32, general_sequences=64, steps=16,
        batch_size=8, lr=1e-4, warmup_steps=2, eval_every=16, low_data_sequences=8, low_data_steps=16,
        low_data_eval_every=4, reference_steps=12, replay_sequences=256, device="cpu", seeds=3, other_seeds=1,
        methods=("FT", "MFT"), domains=("legal",), skip=PARTS, throughput=CPU_THROUGHPUT,
    ),
    # Each run trains on 40 x 8 x 128 = 40,960 tokens (one pass over its 320 sequences) and evaluates 130 general
    # and 65 specialized sequences: 16,510 and 8,255 predicted tokens, three times (before, at step 20 and 40).
    # These are the floors of the protocol; at CPU_THROUGHPUT a run from the cache takes about 8 minutes, one with
    # the online dense teacher about 10, and the whole protocol (53 runs with the frontier's three lines) about 8 hours.
    # On a 2-core Xeon that trained at 235 tokens/s it took 4.9 (invocations of 99, 106 and 90 minutes), so it runs in
    # three resumable invocations (--skip frontier,fidelity,low-data; then --skip tail-samples,fidelity,low-data; then all).
    "cpu": Profile(
        seq_len=128, max_documents=400, train_sequences=320, val_sequences=65, general_sequences=130, steps=40,
        batch_size=8, lr=1e-4, warmup_steps=4, eval_every=20, low_data_sequences=8, low_data_steps=24,
        low_data_eval_every=4, reference_steps=20, replay_sequences=640, device="cpu", seeds=3, other_seeds=1,
        methods=("FT", "MFT"), throughput=CPU_THROUGHPUT,
    ),
    # Not yet run. Sized for about 10 minutes on one H100 for FT and MFT, 3 seeds, 3 domains with
    # --skip frontier,fidelity,low-data (18 runs, a reference and 4 caches; docs/gpu-check.md), from an H100's expected
    # rate (FT of a 213M model at ~100k tokens/s): each run trains on 40 x 8 x 1024 = 327,680 tokens (8x the CPU
    # profile's, ~5 s at 60k tokens/s) and evaluates 68 general and 36 specialized sequences, 69,632 and 36,864
    # tokens (4.2x and 4.4x the CPU profile's). Loading and checkpoints (~5-10 s a run) dominate; under 7 minutes.
    "gpu": Profile(
        seq_len=1024, max_documents=20000, train_sequences=320, val_sequences=36, general_sequences=68, steps=40,
        batch_size=8, lr=5e-5, warmup_steps=4, eval_every=20, low_data_sequences=16, low_data_steps=40,
        low_data_eval_every=5, reference_steps=20, replay_sequences=1280, device="cuda", seeds=3, other_seeds=3,
        methods=("FT", "MFT", "LoRA r8", "LoRA r8 + MFT", "Replay 0.5", "distill+ft", "single-correction"),
    ),
    # Seconds with a tiny model: the tests run the whole protocol end to end with it. Not a measurement.
    "smoke": Profile(
        seq_len=32, max_documents=60, train_sequences=8, val_sequences=2, general_sequences=2, steps=2, batch_size=2,
        lr=1e-3, warmup_steps=0, eval_every=1, low_data_sequences=2, low_data_steps=2, low_data_eval_every=1,
        reference_steps=1, replay_sequences=8, device="cpu", seeds=2, other_seeds=1, methods=("FT", "MFT"),
        val_fraction=0.3,
    ),
}


@dataclass(frozen=True)
class Plan:
    """What a CompareConfig runs, checked against the names this module owns."""

    profile_name: str
    profile: Profile  # with --lr applied
    domains: list[str]
    methods: list[str]
    skip: set[str]
    frontier_domain: str
    families: list[str] = field(default_factory=list)  # the fair frontier's; empty: the per-domain protocol
    lrs: set[float] = field(default_factory=set)  # the fair frontier's grid points at these learning rates; empty: all
    taus: set[float] = field(default_factory=set)  # MFT's grid points at these margins; empty: all
    lambdas: set[float] = field(default_factory=set)  # L2-init's and EWC's grid points at these penalties; empty: all
    ranks: set[int] = field(default_factory=set)  # LoRA's grid points at these ranks; empty: all
    tail_samples: int = 0  # MFT's points train from the top-SAMPLED_K cache plus this many sampled tail ids; 0: k = TOP_K

    def cache_of(self, pt: Point) -> tuple[int | None, int]:
        """(top-k, sampled tail ids) of the cache ``pt`` trains from; DFT and TALR read only the labels (None)."""
        if pt.variant == "mft" and self.tail_samples:
            return SAMPLED_K, self.tail_samples
        return (TOP_K if pt.variant in ("ft", "mft") else None), 0

    def chooses(self, pt: Point) -> bool:
        """Whether the fair frontier traces ``pt``: its learning rate is among --lrs, its margin among --taus, its
        penalty among --lambdas and its rank among --ranks."""
        lr_ok = not self.lrs or pt.effective_lr(self.profile) in self.lrs
        tau_ok = not self.taus or pt.tau is None or pt.tau in self.taus
        lam_ok = not self.lambdas or pt.lam is None or pt.lam in self.lambdas
        return lr_ok and tau_ok and lam_ok and (not self.ranks or pt.rank is None or pt.rank in self.ranks)


def make_plan(config: CompareConfig) -> Plan:
    """The profile, domains, methods and parts ``config`` asks for, or a ConfigError naming what is unknown."""
    name = config.profile_name
    if name not in PROFILES:
        raise ConfigError(f"--profile {name}: choose from {', '.join(PROFILES)}")
    p = PROFILES[name]
    if config.lr is not None:
        p = replace(p, lr=config.lr)
    if config.seeds is not None:
        p = replace(p, seeds=config.seeds, other_seeds=config.seeds)
    domains = list(config.domains) or list(p.domains)
    methods = split_list(config.methods, "methods") if config.methods is not None else list(p.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    skip = set(p.skip) if config.skip is None else {s.strip() for s in config.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        raise ConfigError(f"--skip: unknown {', '.join(sorted(skip - set(PARTS)))}; choose from {', '.join(PARTS)}")
    frontier_domain = config.frontier_domain or domains[0]
    if frontier_domain not in domains:
        raise ConfigError(f"--frontier-domain {frontier_domain}: not one of the domains {', '.join(domains)}")
    if config.families is None:
        narrowing = (config.frontier_domains, config.lrs, config.taus, config.lambdas, config.ranks)
        if any(x is not None for x in narrowing) or config.tail_samples or config.report_only:
            raise ConfigError(
                "--frontier-domains, --lrs, --taus, --lambdas, --ranks, --tail-samples and --report-only choose the fair "
                "frontier's runs; give --families too"
            )
        return Plan(name, p, domains, methods, skip, frontier_domain)
    if config.methods is not None or config.skip is not None:
        raise ConfigError("--methods and --skip choose the per-domain protocol's runs; --families runs the fair frontier instead")
    return fair_frontier_plan(config, p, domains, frontier_domain)


def fair_frontier_plan(config: CompareConfig, p: Profile, domains: list[str], frontier_domain: str) -> Plan:
    """The fair frontier's plan: its families, its domains (the frontier domain first) and learning rates."""
    families = list(FAMILIES) if config.families.strip() == "all" else split_list(config.families, "--families")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)} or all")
    chosen = [frontier_domain] + (split_list(config.frontier_domains, "--frontier-domains") if config.frontier_domains else [])
    # A profile's domains are its per-domain protocol's; the frontier may trace any built-in one (the quick profile
    # has legal alone, and FT against MFT is wanted in sympy and code too). With --domain, only those corpora exist.
    available = domains if config.domains else list(dict.fromkeys(domains + list(DOMAINS)))
    unknown = [d for d in chosen if d not in available]
    if unknown:
        raise ConfigError(f"--frontier-domains: {', '.join(unknown)} not among the domains {', '.join(available)}")
    lrs = set(split_numbers(config.lrs, "--lrs")) if config.lrs is not None else set()
    grid = {pt.effective_lr(p) for f in families for pt in FAMILIES[f]}
    if lrs - grid:
        missing = ", ".join(f"{x:g}" for x in sorted(lrs - grid))
        raise ConfigError(f"--lrs: {missing} not in the chosen families' grid ({', '.join(f'{x:g}' for x in sorted(grid))})")
    taus = set(split_numbers(config.taus, "--taus")) if config.taus is not None else set()
    if taus - set(FRONTIER_TAUS) or (taus and not {"MFT", "WiSE-MFT"} & set(families)):
        raise ConfigError(f"--taus picks MFT's margins: give --families MFT or WiSE-MFT and some of {', '.join(f'{t:g}' for t in FRONTIER_TAUS)}")
    lambdas = set(split_numbers(config.lambdas, "--lambdas")) if config.lambdas is not None else set()
    if lambdas - set(PENALTY_LAMBDAS) or (lambdas and not {"L2-init", "EWC"} & set(families)):
        grid = ", ".join(f"{x:g}" for x in PENALTY_LAMBDAS)
        raise ConfigError(f"--lambdas picks L2-init's and EWC's penalties: give --families L2-init or EWC and some of {grid}")
    ranks = set(split_numbers(config.ranks, "--ranks")) if config.ranks is not None else set()
    if ranks - set(LORA_RANKS) or (ranks and "LoRA" not in families):
        raise ConfigError(f"--ranks picks LoRA's ranks: give --families LoRA and some of {', '.join(map(str, LORA_RANKS))}")
    ranks = {int(r) for r in ranks}
    if config.tail_samples and not {"MFT", "WiSE-MFT"} & set(families):
        raise ConfigError("--tail-samples sets the cache of MFT's points: give --families MFT or WiSE-MFT too")
    return Plan(
        config.profile_name, p, list(dict.fromkeys(chosen)), [], set(PARTS), frontier_domain, families, lrs, taus, lambdas, ranks, config.tail_samples
    )


def seeds_for(p: Profile, method: Method) -> range:
    return range(p.seeds if method.core else p.other_seeds)


def planned_runs(p: Profile, chosen: list[str], n_domains: int, skip: set[str]) -> dict[str, int]:
    """How many runs of each kind `mft compare` trains (mirrors its steps; the smoke test checks the count).

    Kinds: "cached" (the profile's steps from a cache), "online" (the same with the dense teacher), "reference" and
    "low_data" (their own step counts), and "caches" (stage-one caches of train_sequences each).
    """
    n = lambda method: len(seeds_for(p, method))  # noqa: E731
    counts = dict(reference=1 if p.reference_steps else 0, cached=0, online=0, caches=1 + n_domains, low_data=0)
    for m in (METHODS[name] for name in chosen):
        counts["cached"] += n(m) * (1 if m.frontier_domain_only else n_domains)
        counts["caches"] += m.uses_general_data
    core = n(METHODS["MFT"])
    if "frontier" not in skip:
        counts["cached"] += core * (len(FRONTIER_TAUS) - ("MFT" in chosen))
        counts["online"] += core * len(FRONTIER_TAUS)
        if "tail-samples" not in skip:
            counts["cached"] += core * len(FRONTIER_TAUS)
            counts["caches"] += 1
    if "fidelity" not in skip:
        counts["cached"] += 2 * n(fidelity_method(5))
        counts["caches"] += 2
    if "low-data" not in skip:
        counts["low_data"] = 2
        counts["caches"] += 1
    return counts


def planned_task_scores(p: Profile, chosen: list[str], n_domains: int) -> int:
    """Checkpoints --tasks scores: the reference and the best checkpoint of every run of the per-domain tables."""
    return 1 + sum(len(seeds_for(p, m)) * (1 if m.frontier_domain_only else n_domains) for m in (METHODS[name] for name in chosen))


def estimate_minutes(p: Profile, counts: dict[str, int], tp: Throughput, task_continuations: int = 0) -> dict[str, float]:
    """Minutes per kind of work: training tokens over training throughput, evaluated tokens over evaluation throughput.

    Every run evaluates before training and every ``eval_every`` steps; each evaluation scores
    general_sequences + val_sequences sequences. Each checkpoint counts["tasks"] scores ``task_continuations``
    continuations at ``tp.tasks`` per second.
    """
    eval_tokens = (p.general_sequences + p.val_sequences) * p.seq_len
    evals = 1 + math.ceil(p.steps / p.eval_every)
    per_run = {
        "cached": p.train_tokens / tp.train + evals * eval_tokens / tp.eval + tp.overhead_s,
        "online": p.train_tokens / tp.online + evals * eval_tokens / tp.eval + tp.overhead_s,
        "reference": p.reference_steps * p.batch_size * p.seq_len / tp.train + evals * eval_tokens / tp.eval + tp.overhead_s,
        "low_data": p.low_data_steps * p.batch_size * p.seq_len / tp.train
        + (1 + math.ceil(p.low_data_steps / p.low_data_eval_every)) * eval_tokens / tp.eval + tp.overhead_s,
        "caches": (p.train_sequences + p.val_sequences) * p.seq_len / tp.eval,
        # The fair frontier: runs evaluated at every frontier_eval_every steps, WiSE-FT's evaluation of one average
        # (loading two models), and one Fisher file of as many general tokens as a run trains on (forward and backward).
        "frontier": p.train_tokens / tp.train + (1 + math.ceil(p.steps / frontier_eval_every(p))) * eval_tokens / tp.eval + tp.overhead_s,
        "wise": eval_tokens / tp.eval + tp.overhead_s,
        "fisher": p.train_tokens / tp.train,
        "tasks": task_continuations / tp.tasks if tp.tasks else 0.0,
    }
    return {kind: counts[kind] * per_run[kind] / 60 for kind in counts}

"""GPU check: the targets of docs/performance-targets.md, measured on one CUDA device; no network needed.

    python benchmarks/gpu_check.py speed [--models llama-360m:8:4,llama-1.2b:4:2] [--out docs/results]
    python benchmarks/gpu_check.py chunks [--device cpu] [--chunks 256,512,2048,4096] [--out docs/results]
    python benchmarks/gpu_check.py --rehearse [--out DIR]     # every part on CPU at tiny sizes

At GPU sizes, on random tokens and random-weight shapes in bf16, the benchmarks' own measurements
and sections: per model stage one's ``forward_vs_score`` and stage two's ``measure_model``, then
stage two's reader and evaluation parts and ``measure_loss`` by chunk size at V = 128k. The results
files are rewritten after each part; chunks runs the sweep alone into fused-chunk-<device>.md/json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ and mft_pipeline/ come from this checkout
    sys.path.insert(0, str(REPO))

from benchmarks import stage_one, stage_two  # noqa: E402
from benchmarks.measure import random_token_batches, run_parts, say  # noqa: E402
from benchmarks.results import comma_list, command_line, failures, header, loadavg, started  # noqa: E402
from mft_pipeline.models import model_vocab_size  # noqa: E402

TARGETS = (("stage_one_score_vs_forward", ">=", 0.9, "stage one (score) tokens/s vs the plain forward"), *stage_two.TARGETS)


@dataclass(frozen=True)
class Plan:
    """What ``speed`` measures. Batches are (stage one, stage two) rows per batch for each model."""

    models: tuple[tuple[str, int, int], ...] = (("llama-360m", 8, 4), ("llama-1.2b", 4, 2))
    device: str = "cuda"
    seq_len: int = 2048
    batches: int = 2
    repeats: int = 5
    top_k: int = 20
    loss_tokens: int = 8192  # B x T of the Liger-Kernel figure the loss target is set against
    sweep_shape: tuple[int, int, int, int] = (2, 2048, 128256, 2048)  # B, T, V, H: Llama-3.2-1B's head
    chunks: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    sweep_repeats: int = 3
    threads: int | None = None  # torch CPU threads, here and in the fresh processes
    loader: tuple[tuple[str, int], ...] = ()  # keyword arguments of stage_two.measure_loader; () for its sizes
    eval_model: tuple[str, int, int] = ("llama-1.2b", 2048, 8)  # spec, T, B: mft train evaluates 8 rows at once


# Every part on CPU at tiny sizes; the sweep's shape is large enough that its chunks' (c, V) tensors
# stand out of the process's other memory.
REHEARSAL = Plan(models=(("llama-tiny", 2, 2),), device="cpu", seq_len=32, batches=1, repeats=2, loss_tokens=64,
                 sweep_shape=(2, 512, 32000, 64), chunks=(512,), sweep_repeats=1, threads=1, eval_model=("llama-tiny", 32, 2),
                 loader=(("seq_len", 32), ("top_k", 4), ("vocab", 640), ("shards", 2), ("rows_per_shard", 8), ("epochs", 1)))  # fmt: skip


def stage_one_part(spec: str, batch: int, plan: Plan) -> dict:
    """The teacher's plain forward against stage one's scoring, in bf16 on a GPU as stage one loads it."""
    model = stage_two.build_model(spec, plan.device).eval()
    if plan.device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    batches = random_token_batches(model_vocab_size(model), plan.batches, batch, plan.seq_len)
    r = stage_one.forward_vs_score(model, batches, plan.top_k, repeats=plan.repeats)
    return {**r, "params": sum(p.numel() for p in model.parameters()), "batch": [batch, plan.seq_len]}


def parts_of(plan: Plan, chunks_so_far) -> list:
    """(name, measurement) in the order they run: all of stage one before stage two, so that a run
    stopped early still has every model's first target."""
    B, T, V, H = plan.sweep_shape
    spec, seq_len, batch = plan.eval_model
    return [*((f"stage_one/{Path(spec).name}", partial(stage_one_part, spec, one, plan)) for spec, one, _ in plan.models),
            *((f"stage_two/{Path(spec).name}", partial(stage_two.measure_model, spec, plan.device, plan.seq_len, two, n_batches=plan.batches,
                                                        repeats=plan.repeats, top_k=plan.top_k, loss_tokens=plan.loss_tokens))
              for spec, _, two in plan.models),
            ("loader", partial(stage_two.measure_loader, plan.device, **dict(plan.loader))),
            ("eval", partial(stage_two.measure_eval, spec, plan.device, seq_len, batch)),
            ("chunks", partial(stage_two.measure_loss, V, H, plan.device, T, B, chunks=plan.chunks, top_k=plan.top_k,
                               repeats=plan.sweep_repeats, progress=chunks_so_far))]  # fmt: skip


def run(plan: Plan, path: Path, command: str, only: tuple[str, ...] = ()) -> dict:
    """The parts ``only`` names (all by default) into ``path``'s .json and .md, rewritten after each part."""
    if plan.threads:
        torch.set_num_threads(plan.threads)  # the fresh processes take this process's
    result = {**started(command, plan.device), "plan": asdict(plan), "only": list(only), "parts": {}, "errors": {}}
    t0 = time.perf_counter()

    def save() -> None:
        ones = [p["score_vs_forward"] for name, p in result["parts"].items() if name.startswith("stage_one/")]
        result.update(ratios={"stage_one_score_vs_forward": min(ones, default=None), **stage_two.headline(result["parts"])},
                      wall_seconds=time.perf_counter() - t0, loadavg_end=loadavg())  # fmt: skip
        path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        path.with_suffix(".md").write_text(render(result))

    def chunks_so_far(sweep: dict) -> None:
        result["parts"]["chunks"] = sweep
        save()

    parts = [(name, measure) for name, measure in parts_of(plan, chunks_so_far) if not only or name.split("/")[0] in only]
    return run_parts(parts, result, save)


def render(r: dict) -> str:
    """The targets, then each part's section as its own benchmark lays it out, then the failures."""
    p, sweep_only = r["plan"], r["only"] == ["chunks"]
    lines = header(f"{'Fused loss by chunk size' if sweep_only else 'GPU check'}, {r['date'][:10]}", r)[:-1] + [f"Wall time {r['wall_seconds']:.0f} s.", ""]
    if not sweep_only:
        lines += [f"Random tokens and random-weight models; {p['seq_len']}-token sequences, top-k {p['top_k']}, {p['repeats']} paired "
                  f"repeats, medians; {'bf16' if p['device'].startswith('cuda') else 'float32 (no GPU)'}. Targets: "
                  "docs/performance-targets.md.", "", *stage_two.render_targets(r["ratios"], TARGETS)]  # fmt: skip
    for name, part in r["parts"].items():
        one = name.startswith("stage_one/")
        lines += stage_one.render_forward_vs_score(name[10:], part) if one else stage_two.render_part(name, part, r["machine"]["device"])
    return "\n".join(lines + failures(r["errors"])) + "\n"


def parse_args(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("what", nargs="?", choices=("speed", "chunks"))
    p.add_argument("--rehearse", action="store_true", help="every part on CPU at tiny sizes, into --out (default: a temp folder)")
    p.add_argument("--out", help="results folder (default docs/results)")
    p.add_argument("--device", help="speed: cuda (default); chunks: cuda if there is one, else cpu")
    p.add_argument("--models", help="speed: comma-separated NAME:STAGE_ONE_BATCH:STAGE_TWO_BATCH, e.g. llama-1.2b:4:2")
    p.add_argument("--chunks", help="comma-separated chunk sizes for the sweep")
    p.add_argument("--sweep-repeats", type=int, help="timed calls per chunk size after the measured one (default 3; 0: time the measured one)")
    p.add_argument("--threads", type=int, help="torch CPU threads, also in the fresh processes")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    command = command_line("python benchmarks/gpu_check.py", argv)
    if args.rehearse:
        out = Path(args.out or tempfile.mkdtemp(prefix="mft-gpu-check-"))
        out.mkdir(parents=True, exist_ok=True)
        r = run(REHEARSAL, out / "gpu-rehearsal", command)
        say(f"rehearsal done in {r['wall_seconds']:.0f} s: {out / 'gpu-rehearsal.md'}")
        return 0
    if args.what is None:
        p.error("say speed or chunks, or --rehearse")
    device = args.device or ("cuda" if args.what == "speed" or torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; --rehearse runs every part on CPU", file=sys.stderr)
        return 2
    given = {"threads": args.threads, "sweep_repeats": args.sweep_repeats, "device": device,
             "models": args.models and tuple((n, int(a), int(b)) for n, a, b in (m.split(":") for m in comma_list(args.models))),
             "chunks": args.chunks and tuple(comma_list(args.chunks, int))}  # fmt: skip
    plan = replace(Plan(), **{k: v for k, v in given.items() if v is not None})
    out = Path(args.out or REPO / "docs" / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{datetime.now(timezone.utc):%Y-%m-%d}" if args.what == "speed" else f"fused-chunk-{torch.device(device).type}"
    run(plan, out / name, command, only=("chunks",) if args.what == "chunks" else ())
    return 0


if __name__ == "__main__":
    sys.exit(main())

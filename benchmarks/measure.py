"""How the benchmarks measure: progress lines, peak memory, passes timed in rotating rounds,
measurements in a fresh process of their own, and parts run one after the other."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def say(*parts) -> None:
    """A progress line on stderr (the results go to stdout and files)."""
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}]", *parts, file=sys.stderr, flush=True)


def synchronizer(device):
    """``sync()``: waits for the work queued on ``device`` (a no-op on CPU), so a timer stops when the work does."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


class PeakMemory:
    """Peak memory since ``reset``: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device):
        self.torch, self.cuda = torch, torch.device(device).type == "cuda"
        resets = self.cuda or clear_peak_rss()
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM, reset per phase)" if resets else "peak RSS so far (ru_maxrss)"

    def reset(self) -> int:
        """Reset the peak; return the memory held now: allocated on CUDA, resident (VmRSS) on CPU."""
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return int(self.torch.cuda.memory_allocated())
        clear_peak_rss()
        return proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return int(self.torch.cuda.max_memory_allocated())
        found = proc_status_bytes("VmHWM")
        return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def clear_peak_rss() -> bool:
    """Reset the process's VmHWM to its VmRSS; False where the kernel does not allow it."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
        return True
    return False


def proc_status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status in bytes; None where the file or field is missing."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def peak_growth(device, fn) -> tuple[dict, object]:
    """The peak memory of one call ``fn()`` ({"peak", "before", "growth"} in bytes; ``before``: held
    when it started) and what it returned."""
    memory = PeakMemory(device)
    before = memory.reset()
    value = fn()
    peak = memory.peak()
    return {"peak": peak, "before": before, "growth": peak - before}, value


def timed_rounds(passes: dict, repeats: int, memory: PeakMemory | None = None) -> tuple[dict, dict]:
    """Every pass once per round, the order rotating by one each round (so a neighbour's load on a
    shared machine hits every pass alike): the seconds of each pass per round and, with
    ``memory``, each pass's peak memory."""
    names = list(passes)
    seconds, peaks = {n: [] for n in names}, dict.fromkeys(names, 0)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if memory:
                memory.reset()
            t0 = time.perf_counter()
            passes[name]()
            seconds[name].append(time.perf_counter() - t0)
            if memory:
                peaks[name] = max(peaks[name], memory.peak())
        say(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names))
    return seconds, peaks


def in_fresh_process(fn):
    """``fn`` run in a fresh Python process, so that its peak memory is its own; the arguments and the
    answer travel as JSON (a device, dtype or path as its text). The process gets this one's torch
    CPU threads."""

    @functools.wraps(fn)
    def fresh(*args, **kw):
        call = inspect.signature(fn).bind(*args, **kw)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # Large blocks from mmap, so memory freed by earlier phases leaves the resident set.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("TQDM_DISABLE", "1")
        kw_json = json.dumps(json.dumps(call.arguments, default=str))
        # Under `python -m benchmarks.x` the module is __main__ here; the fresh process imports it by its name.
        module = sys.modules["__main__"].__spec__.name if fn.__module__ == "__main__" else fn.__module__
        code = (f"import json, torch, {module} as m; torch.set_num_threads({torch.get_num_threads()}); "
                f"print(json.dumps(m.{fn.__name__}.__wrapped__(**json.loads({kw_json}))))")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{fn.__name__} in a fresh process failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    return fresh


def random_token_batches(vocab: int, n_batches: int, batch_size: int, seq_len: int, seed: int = 0) -> list:
    """``n_batches`` int64 arrays (batch_size, seq_len) of uniform random token ids: speed does not depend on the text."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(batch_size, seq_len), dtype=np.int64) for _ in range(n_batches)]


def run_parts(parts, result: dict, save=lambda: None) -> dict:
    """Each (name, measure) of ``parts`` in turn into ``result["parts"][name]``, then ``save()``: a run
    stopped early keeps what finished. A part that fails leaves its traceback in ``result["errors"]``
    and the next one runs."""
    for name, measure in parts:
        say(f"{name} ...")
        try:
            result["parts"][name] = measure()
        except Exception as e:  # noqa: BLE001 - one failed part must not cost the others' results
            result["errors"][name] = traceback.format_exc()[-3000:]
            say(f"{name} FAILED: {e!r}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what this process keeps cached, the next part's fresh processes cannot use
        save()
    return result

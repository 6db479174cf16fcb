"""What every results file says besides its figures: the command, the machine, and markdown tables."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone

import pyarrow
import torch
import transformers


def machine_info(device) -> dict:
    """The machine and library versions a results file names; on CUDA also the GPU, CUDA and driver versions."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__, "device": str(device),
    }  # fmt: skip
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    return info


def started(command: str, device) -> dict:
    """What a results file says of its run before it measures: the command, the date, the machine and its load."""
    date = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}"
    return {"command": command, "date": date, "machine": machine_info(device), "loadavg_start": loadavg()}


def header(title: str, r: dict) -> list[str]:
    """A results file's first lines: its title, the command, the date, the machine (``machine_info``) and the load at start and end."""
    m = r["machine"]
    gpu = f", GPU {m['gpu']} (driver {m['driver']}, CUDA {m['cuda']})" if "gpu" in m else ""
    return [f"# {title}", "", f"Command: `{r['command']}`", "", f"Date: {r['date']}. Machine: {m['cpu']}, {m['cpu_count']} CPUs "
            f"({m['cpus_usable']} usable, torch threads {m['torch_threads']}){gpu}; {m['platform']}; Python {m['python']}, torch "
            f"{m['torch']}, transformers {m['transformers']}, pyarrow {m['pyarrow']}; device {m['device']}. Load average at "
            f"start / end: {r['loadavg_start']} / {r['loadavg_end']}.", ""]  # fmt: skip


def failures(errors: dict) -> list[str]:
    """The traceback of each part that failed."""
    return [line for where, tb in errors.items() for line in ("", f"**{where} failed:**", "", "```", tb.strip()[-1500:], "```")]


def loadavg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line(prog: str, argv) -> str:
    """The command that wrote a results file, as typed (``argv`` None: this process's)."""
    return (prog + " " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()


def comma_list(text: str, kind=str) -> list:
    """A comma-separated option's items, blanks left out."""
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def fmt_mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f} MiB"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]

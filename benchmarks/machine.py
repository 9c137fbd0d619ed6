"""The machine a benchmark ran on: CPU, memory, GPUs, library versions and the git commit, as one dict."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "deepspeed", "webdataset", "timm")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def describe() -> dict:
    """CPU model, cores, memory, load, GPUs, Python and library versions, git commit (with a dirty flag)."""
    import torch

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")  # read-only
    gpus = _gpus()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "gpu": gpus[0] if gpus else None,
        "gpu_count": len(gpus),
        "cuda": torch.version.cuda if gpus else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        **{lib: _version(lib) for lib in LIBRARIES},
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


def one_line(m: dict) -> str:
    """A short human description, e.g. "Intel Xeon, 2 cores, 23.4 GiB, no GPU; torch 2.14.1, ..."."""
    gpu = f"{m['gpu_count']}x {m['gpu']}" if m["gpu_count"] else "no GPU"
    libs = ", ".join(f"{lib} {m[lib]}" for lib in LIBRARIES if m.get(lib))
    commit = (m["git_commit"] or "unknown")[:10] + (" (uncommitted changes)" if m["git_dirty"] else "")
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load {m['load_average_1min']}; {gpu}; "
        f"Python {m['python']}, {libs}; commit {commit}"
    )


def print_ratio(result: dict) -> None:
    """The closing lines of a single-ratio benchmark run on its own: its figures as JSON, then the ratio."""
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "ratio", "units")}))
    print(f"ratio: {result['ratio']:.2f}x")

"""Live metrics on rank 0: one console line, a JSONL file and TensorBoard events per logging step."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

# Peak dense bf16 tensor-core FLOP/s (no sparsity) of the GPUs users run, from NVIDIA's data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None where unknown (CPU, other GPUs): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def memory_gib(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident memory of this process (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes metrics on rank 0; a no-op on other ranks."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        print(format_line(kind, step, values), flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def format_line(kind: str, step: int, v: dict[str, Any]) -> str:
    """`train step 120 | loss 1.234 | lr 1.0e-03 | ...`: the fields present, in a fixed order."""
    parts = [f"{kind} step {step}"]
    fmt = {
        "loss": "loss {:.4f}",
        "top1": "top1 {:.2%}",
        "top5": "top5 {:.2%}",
        "lr": "lr {:.2e}",
        "grad_norm": "grad_norm {:.3f}",
        "images_per_s": "{:.1f} img/s",
        "images_per_s_per_device": "{:.1f} img/s/dev",
        "mfu": "MFU {:.1%}",
        "data_wait": "data wait {:.1%}",
        "memory_gib": "mem {:.2f} GiB",
        "skipped_steps": "skipped {}",
        "eta_s": "ETA {}",
    }
    for key, f in fmt.items():
        if key not in v:
            continue
        val = v[key]
        if key == "mfu" and val is None:
            parts.append("MFU n/a")
        elif key == "eta_s":
            parts.append(f.format(_hms(val)))
        elif val is not None:
            parts.append(f.format(val))
    return " | ".join(parts)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

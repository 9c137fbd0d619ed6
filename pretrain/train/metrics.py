"""Live metrics on rank 0: one console line, a JSONL file, TensorBoard events and (optionally) W&B per logging step."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from data_tools.extras import MissingExtra, require
from pretrain.config import BatchPlan, ConfigError, LogConfig
from pretrain.train.wandb_log import WandbLogger

if TYPE_CHECKING:
    from pretrain.data import TrainLoader
    from pretrain.train.engine import Engine

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


def check_loggers(log: LogConfig) -> None:
    """Raise ConfigError (on every rank alike) when a logger that is on lacks its package."""
    for on, module, key in ((log.tensorboard, "tensorboard", "log.tensorboard"), (log.wandb, "wandb", "log.wandb")):
        if on:
            try:
                require(module)
            except MissingExtra as e:
                raise ConfigError(f"{key}=true but {e} or set {key}=false") from None


class Metrics:
    """The running training loss and step timers; one console line, a JSONL row and TensorBoard scalars per
    logging step, written on rank 0 (a no-op writer elsewhere).

    Args:
        output_dir: the run folder (metrics.jsonl, tb/).
        log: the `log` config section.
        plan: the run's batch split (global batch, ranks, micro-batches per step).
        total_steps: `train.steps`.
        rank, device: this rank.
        flops_per_image: training FLOPs of one image (`train_flops_per_image`), for MFU.
        run_name: `run.name`, the W&B run name unless `log.wandb_name` is set.
    """

    def __init__(
        self,
        output_dir: str | Path,
        log: LogConfig,
        plan: BatchPlan,
        *,
        total_steps: int,
        rank: int,
        device: torch.device,
        flops_per_image: float,
        run_name: str = "vit",
    ) -> None:
        self.every, self.total_steps, self.plan = log.every_steps, total_steps, plan
        self.device, self.flops_per_image, self.peak_flops = device, flops_per_image, device_peak_flops(device)
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync between log steps
        self.t_log, self.steps_since_log = time.perf_counter(), 0
        self.jsonl, self.tb, self.wandb = None, None, None
        check_loggers(log)  # on every rank, so that all stop alike
        if rank != 0:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        if log.wandb:
            self.wandb = WandbLogger(log, out, run_name)

    def start(self) -> None:
        """Start the step timer (at the first step of this process)."""
        self.t_log, self.steps_since_log = time.perf_counter(), 0

    def add(self, losses: list[torch.Tensor]) -> None:
        """Count one optimizer step and its micro-batch losses."""
        for loss in losses:
            self.loss_sum += loss
        self.steps_since_log += 1

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def log_train(self, step: int, engine: Engine, loader: TrainLoader, skipped_steps: int) -> dict[str, Any]:
        """Log the steps since the last log line: mean loss over ranks and micro-batches, throughput, and more."""
        dist.all_reduce(self.loss_sum)  # host sync here: the logged loss is the mean over ranks and micro-steps
        dt = time.perf_counter() - self.t_log
        ips = self.steps_since_log * self.plan.global_batch / dt
        grad_norm = engine.grad_norm()
        stats = loader.stats()
        values = {
            "loss": self.loss_sum.item() / (self.plan.world_size * self.plan.accum_steps * self.steps_since_log),
            "lr": engine.lr(),
            "grad_norm": grad_norm,
            "images_per_s": ips,
            "images_per_s_per_device": ips / self.plan.world_size,
            "mfu": ips / self.plan.world_size * self.flops_per_image / self.peak_flops if self.peak_flops else None,
            "data_wait": stats["data_wait_fraction"],
            "memory_gib": memory_gib(self.device),
            "workers_memory_gib": stats["workers_gib"],  # host memory of the loader's workers (PSS)
            "skipped_steps": skipped_steps,
            "bad_samples": stats["bad_samples"],
            "storage_mb_per_s": stats["storage_bytes_per_s"] / 1e6,
            "io_retries": stats["io_retries"],
            "region_decodes": stats["region_decodes"],
            "decode_fallbacks": sum(stats["decode_fallbacks"].values()),
            **{f"decode_fallback_{k}": n for k, n in stats["decode_fallbacks"].items()},  # named: jsonl, TB, W&B
            "eta_s": (self.total_steps - step) * dt / self.steps_since_log,
            "epoch": loader.epoch,
        }
        self.write(step, values)
        self.loss_sum.zero_()
        self.t_log, self.steps_since_log = time.perf_counter(), 0
        return values

    def log_eval(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Log held-out results (none without a held-out split); returns them."""
        if values:
            self.write(step, values, kind="eval")
        return values

    def log_fewshot(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Log few-shot accuracies (`fewshot/<set>/<k>shot`; none when few-shot evaluation is off); returns them."""
        if values:
            self.write(step, values, kind="fewshot")
        return values

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if self.jsonl is None:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(kind, step, values)
        print(format_line(kind, step, values), flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


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
        "workers_memory_gib": "+ loader workers {:.2f} GiB",
        "skipped_steps": "skipped {}",
        "storage_mb_per_s": "storage {:.1f} MB/s",
        "io_retries": "io retries {}",
        "decode_fallbacks": "decode fallbacks {}",
        "eta_s": "ETA {}",
    }
    parts += [f"{key} {val:.1%}" for key, val in v.items() if key.endswith("shot")]  # few-shot: `<set>/<k>shot`
    if "time_s" in v:
        parts.append(f"{v['time_s']:.1f} s")
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

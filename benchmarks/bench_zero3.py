"""ZeRO-3 host memory per rank of a shipped recipe on 2 CPU ranks: before / after the ZeRO-3 memory work.

Runs the real `pretrain.train` (the recipe's config, digits shards made here, `model.num_classes=10`, micro-batch 1,
2 steps, the final checkpoint included) under `deepspeed --num_gpus 2` and reads each rank's peak resident memory
(VmHWM). The accounting it is compared with is ZeRO's 16 bytes per parameter / ranks.

- before: the model built whole on every rank, DeepSpeed's defaults (`deepspeed.zero_init=false`, `sub_group_size`,
  `stage3_max_live_parameters` and `stage3_max_reuse_distance` at 1e9) and glibc's adaptive mmap threshold;
- after: this project's defaults (partitioned build, sub-groups of 2e7 elements, 5e7 live gathered elements, host
  allocations >= 1 MiB mapped on their own: `pretrain.train.lifecycle.return_freed_memory`).

    python -m benchmarks.bench_zero3 [--config configs/vit_h14_i21k.yaml] [--variants before,after] [KEY=VALUE ...]

RAM: ViT-H/14 takes 10-20 GB on 2 ranks; run it only with that much memory free (never from a test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from pretrain.config import load_config
from pretrain.models.vit import create_vit
from pretrain.ports import free_port
from pretrain.train.lifecycle import MMAP_THRESHOLD_ENV

ROOT = Path(__file__).resolve().parent.parent
# The "before" launch also sets PRETRAIN_MMAP_THRESHOLD=0 (glibc's default allocator behaviour).
VARIANTS = {
    "before": [
        "deepspeed.zero_init=false",
        "deepspeed.sub_group_size=1000000000",
        "deepspeed.stage3_max_live_parameters=1000000000",
        "deepspeed.stage3_max_reuse_distance=1000000000",
    ],
    "after": [],
}


def param_count(config: str) -> int:
    """Parameters of the recipe's model with a 10-class head (built on the meta device: no memory)."""
    import torch

    cfg = load_config(config)
    with torch.device("meta"):
        model = create_vit(cfg.model.name, num_classes=10, representation_size=cfg.model.representation_size)
    return sum(p.numel() for p in model.parameters())


def peak_per_rank(config: str, shards: Path, out: Path, extra: list[str], env: dict[str, str]) -> list[float]:
    """Launch 2 CPU ranks of the recipe for 2 steps; each rank's peak RSS in MiB."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "benchmarks" / "_peak_rss.py")]
    cmd += ["--config", config, f"data.train_shards={shards}", "data.val_shards=", "data.num_workers=1"]
    cmd += ["model.num_classes=10", "train.micro_batch_size=1", "train.global_batch_size=2", "train.steps=2"]
    cmd += [f"run.output_dir={out}", "log.every_steps=1", "log.tensorboard=false", "train.resume=none", *extra]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}
    )
    found = [json.loads(m) for m in re.findall(r"PEAKRSS (\{[^{}]*\})", proc.stdout)]
    if proc.returncode or len(found) != 2:
        raise RuntimeError(f"run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [f["peak_mib"] for f in sorted(found, key=lambda f: f["rank"])]


def run(config: str, variants: list[str], overrides: list[str]) -> dict:
    from data_tools.digits import write_digits
    from data_tools.shard import shard

    n = param_count(config)
    res: dict = {
        "config": config,
        "overrides": overrides,
        "params": n,
        "accounting_mib": 16 * n / 2 / 2**20,
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_zero3-") as tmp:
        shards = Path(tmp) / "shards"
        shard(write_digits(Path(tmp) / "digits"), shards, workers=1, progress=False)
        for v in variants:
            env = {MMAP_THRESHOLD_ENV: "0"} if v == "before" else {}
            peaks = peak_per_rank(config, shards, Path(tmp) / f"run_{v}", [*overrides, *VARIANTS[v]], env)
            res["variants"][v] = {"peak_mib": peaks, "ratio": max(peaks) / res["accounting_mib"]}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_zero3", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/vit_h14_i21k.yaml")
    p.add_argument("--variants", default="before,after", help="comma-separated: before, after")
    p.add_argument("overrides", nargs="*", help="config overrides for both, e.g. deepspeed.zero_stage=3")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        print(f"bench_zero3: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    res = run(args.config, variants, args.overrides)
    print(json.dumps(res, indent=2))
    for v, r in res["variants"].items():
        peaks = ", ".join(f"{m:,.0f}" for m in r["peak_mib"])
        print(
            f"{v}: peak RSS per rank {peaks} MiB; accounting 16 B x {res['params'] / 1e6:.0f}M params / 2 ranks = "
            f"{res['accounting_mib']:,.0f} MiB; ratio {r['ratio']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Capacity planner: what a pretraining run needs before a cluster is booked.

    python -m pretrain.plan --model vit_large_patch16 --samples 14.2M --epochs 90 --gpus 64 --gpu h100 \\
        [--img-size 224 --batch 4096 --micro-batch 64 --mfu 0.35 --days 7 --shards DIR --sample-kb 110]

Prints one table. Every figure says where it comes from: `derived` (arithmetic on the model's FLOP and parameter
count, `pretrain.models.vit`, and on the inputs), `measured` (which benchmark, which machine, docs/BENCHMARKS.md), or
`given` / `assumed` (an input of this command, with its default). Until `benchmarks/bench_gpu.py` has run on a GPU,
the GPU throughput is an assumed MFU, not a measurement.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.fewshot.ridge import fit_flops
from pretrain.models.specs import UnknownModelError, ViTArgs, resolve_args
from pretrain.models.vit import param_shapes, train_flops_per_image
from pretrain.train.metrics import PEAK_BF16_FLOPS

GPUS = {"a100": "A100", "h100": "H100", "h200": "H200"}
GPU_MEMORY_GIB = {"A100": 80, "H100": 80, "H200": 141}
# Decode + crop + flip on one CPU core, 500x375 JPEGs -> 224 px (docs/BENCHMARKS.md, "Input stream").
DECODE_IMG_S_PER_CORE = 422.5
DECODE_SOURCE = "measured: bench_loader --full, images/CPU-s, 2-core Xeon test machine"
CHECKPOINT_BYTES_PER_PARAM = 14  # bf16 weights (2) + fp32 master, Adam momentum and variance (12)
# Few-shot evaluation as the i21k recipes' commented example: (classes, test images) of ImageNet-1k, CIFAR-100, Pets
# at 1, 5, 10, 25 shots; the fit runs in float64 on rank 0's GPU (dense FP64 tensor-core peaks, NVIDIA data sheets).
FEWSHOT_SETS = ((1000, 10_000), (100, 10_000), (37, 3_669))
FEWSHOT_SHOTS = (1, 5, 10, 25)
PEAK_FP64_FLOPS = {"A100": 19.5e12, "H100": 67e12, "H200": 67e12}
FP64_EFFICIENCY = 0.25  # assumed: eigendecompositions of ~1k x 1k matrices run far below peak
DECODE_THREADS = 10  # the recipes' data.num_workers: the decoding threads of a rank during few-shot evaluation


class PlanError(ValueError):
    """A bad planner input; the message names it and the fix."""


@dataclass
class Row:
    what: str
    value: str
    source: str


def count(text: str) -> float:
    """'14.2M' -> 14.2e6 (suffixes k, M, B; plain numbers as is)."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise PlanError(f"{text!r} is not a count; write e.g. 14.2M or 1281167") from None


def param_count(args: ViTArgs) -> int:
    """Parameters of the ViT of `args`, from the model's own parameter shapes."""
    return sum(math.prod(s) for s in param_shapes(args).values())


def activation_bytes(args: ViTArgs, micro_batch: int, checkpointing: bool) -> float:
    """Activation memory of one micro-batch in bf16 (Korthikanti et al. 2022, eq. 2 with flash attention: 34 s b h
    bytes per block; with full checkpointing each block keeps only its input, 2 s b h, plus one block recomputed)."""
    s = (args.img_size // args.patch_size) ** 2 + 1
    per_block = 34 * s * micro_batch * args.embed_dim * args.mlp_ratio / 4
    if not checkpointing:
        return args.depth * per_block
    return args.depth * 2 * s * micro_batch * args.embed_dim + per_block


def model_state_bytes(n: int, stage: int, gpus: int) -> float:
    """bf16 weights + grads and fp32 master/Adam states per GPU under ZeRO `stage` (ZeRO paper, sec. 5)."""
    return {0: 16.0, 1: 4 + 12 / gpus, 2: 2 + 14 / gpus, 3: 16 / gpus}[stage] * n


def mean_sample_kb(shards: Path) -> float:
    """Mean bytes per sample of a shard folder: the tar files' total size over the samples `_info.json` counts."""
    from data_tools.format import read_info

    info = read_info(shards)
    samples = sum(s["num_samples"] for s in info["splits"].values())
    size = sum(p.stat().st_size for p in shards.glob("*.tar"))
    if not samples or not size:
        raise PlanError(f"{shards} holds no samples or no .tar files; pass --sample-kb instead")
    return size / samples / 1e3


def format_hours(hours: float) -> str:
    """A run's length in hours, the unit GPU jobs are booked in; days beside them past 48 h."""
    text = f"{hours:,.1f} h"
    return f"{text} ({hours / 24:,.1f} days)" if hours > 48 else text


def plan(a: argparse.Namespace) -> list[Row]:
    """The table's rows for the parsed arguments."""
    args = resolve_args(a.model, img_size=a.img_size, num_classes=a.num_classes)
    gpu = GPUS[a.gpu]
    n, flops = param_count(args), train_flops_per_image(args)
    images = count(a.samples) * a.epochs
    peak = PEAK_BF16_FLOPS[gpu]
    img_s_gpu = a.mfu * peak / flops
    mfu_src = f"derived: assumed MFU {a.mfu:.0%} x {gpu} peak {peak / 1e12:.0f} TFLOP/s / FLOPs per image"
    rows = [
        Row("parameters", f"{n / 1e6:,.1f} M", "derived: the model's parameter shapes (pretrain.models.vit)"),
        Row("training FLOPs per image", f"{flops / 1e9:,.1f} GFLOP", "derived: train_flops_per_image (fwd + bwd)"),
        Row("images to process", f"{images / 1e9:,.3f} B", f"given: {a.samples} samples x {a.epochs} epochs"),
        Row(f"images/s per {gpu}", f"{img_s_gpu:,.0f}", mfu_src + " (bench_gpu has not run yet)"),
        Row(f"time on {a.gpus} x {gpu}", format_hours(images / (img_s_gpu * a.gpus) / 3600), "derived"),
    ]
    if a.days:
        need = images / (a.days * 86400) / a.gpus
        rows.append(Row(f"images/s per GPU for {a.days:g} days", f"{need:,.0f}", "derived: images / time / GPUs"))
        rows.append(Row(f"MFU needed for {a.days:g} days", f"{need * flops / peak:.1%}", "derived"))
    node_img_s = img_s_gpu * a.gpus_per_node
    rows.append(
        Row(
            "decode CPU cores per GPU",
            f"{img_s_gpu / DECODE_IMG_S_PER_CORE:,.1f}",
            f"derived from {DECODE_IMG_S_PER_CORE:g} img/s per core ({DECODE_SOURCE})",
        )
    )
    kb, kb_src = (
        (mean_sample_kb(a.shards), f"measured: mean sample of {a.shards}")
        if a.shards
        else (
            a.sample_kb,
            f"given: --sample-kb {a.sample_kb:g}",
        )
    )
    rows.append(Row(f"read bandwidth per node ({a.gpus_per_node} GPUs)", f"{node_img_s * kb / 1e3:,.0f} MB/s", kb_src))
    rows.append(Row("read bandwidth in total", f"{img_s_gpu * a.gpus * kb / 1e6:,.2f} GB/s", "derived"))
    micro = a.micro_batch or max(1, a.batch // a.gpus)
    for ckpt in (False, True):
        act = activation_bytes(args, micro, ckpt)
        for stage in (0, 1, 2, 3):
            total = (model_state_bytes(n, stage, a.gpus) + act) / 2**30
            fits = "fits" if total <= GPU_MEMORY_GIB[gpu] else "does NOT fit"
            rows.append(
                Row(
                    f"memory per GPU, ZeRO-{stage}, grad ckpt {'on' if ckpt else 'off'}, micro-batch {micro}",
                    f"{total:,.1f} GiB ({fits} in {GPU_MEMORY_GIB[gpu]})",
                    "derived: 16 B/param ZeRO accounting + bf16 activations (flash attention), "
                    "both checked on CPU (BENCHMARKS.md)",
                )
            )
    rows.append(fewshot_row(a, args, gpu, img_s_gpu))
    ckpt_gb = CHECKPOINT_BYTES_PER_PARAM * n / 1e9
    rows.append(Row("checkpoint size", f"{ckpt_gb:,.1f} GB", "derived: 14 B/param (bf16 weights + fp32 Adam)"))
    rows.append(
        Row(
            f"checkpoint save at {a.write_gb_s:g} GB/s",
            f"{ckpt_gb / a.write_gb_s:,.1f} s",
            f"given: --write-gb-s {a.write_gb_s:g} (aggregate)",
        )
    )
    return rows


def fewshot_row(a: argparse.Namespace, args: ViTArgs, gpu: str, img_s_gpu: float) -> Row:
    """Share of training time one few-shot evaluation every `--fewshot-every` steps takes (pretrain.fewshot)."""
    images = sum(c * max(FEWSHOT_SHOTS) + t for c, t in FEWSHOT_SETS)
    forward = images / (3 * img_s_gpu * a.gpus)  # forward only: a third of a training image's FLOPs
    decode = images / (DECODE_IMG_S_PER_CORE * DECODE_THREADS * a.gpus)
    width = args.representation_size or args.embed_dim
    flops = sum(fit_flops(c, FEWSHOT_SHOTS, width, t) for c, t in FEWSHOT_SETS)
    fit = flops / (PEAK_FP64_FLOPS[gpu] * FP64_EFFICIENCY)
    each = forward + decode + fit
    share = each / (a.fewshot_every * a.batch / (img_s_gpu * a.gpus))
    return Row(
        f"few-shot evaluation every {a.fewshot_every:,} steps ({images:,} images)",
        f"{each:,.1f} s each, {share:.2%} of training time",
        f"derived: forward at the MFU above + decode on {DECODE_THREADS} threads per GPU at {DECODE_IMG_S_PER_CORE:g} "
        f"img/s + {flops / 1e9:,.0f} GFLOP fp64 fit at an assumed {FP64_EFFICIENCY:.0%} of {gpu} FP64 peak "
        "(ImageNet-1k, CIFAR-100, Pets at 1-25 shots; BENCHMARKS.md)",
    )


def format_table(rows: list[Row]) -> str:
    lines = ["| quantity | value | source |", "|---|---|---|"]
    lines += [f"| {r.what} | {r.value} | {r.source} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a registered variant, e.g. vit_large_patch16")
    p.add_argument("--samples", required=True, help="samples per epoch, e.g. 14.2M")
    p.add_argument("--epochs", type=float, required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=21843)
    p.add_argument("--batch", type=int, default=4096, help="global batch")
    p.add_argument("--micro-batch", type=int, default=0, help="per GPU; default: batch / gpus")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed MFU until bench_gpu measures it (default 0.35)")
    p.add_argument("--days", type=float, default=0.0, help="target time: the throughput it needs")
    p.add_argument("--shards", type=Path, help="shard folder: its mean sample size")
    p.add_argument("--sample-kb", type=float, default=110.0, help="mean sample size without --shards (kB)")
    p.add_argument("--write-gb-s", type=float, default=2.0, help="checkpoint write bandwidth, GB/s")
    p.add_argument("--fewshot-every", type=int, default=5000, help="few-shot evaluation interval in steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.gpus < 1 or not 0 < a.mfu <= 1 or a.epochs <= 0:
            raise PlanError("--gpus must be >= 1, --epochs > 0 and --mfu in (0, 1]")
        rows = plan(a)
    except (PlanError, UnknownModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

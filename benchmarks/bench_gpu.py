"""GPU benchmark (CUDA only): training throughput and MFU of ViT-B/16, ViT-L/16, ViT-H/14 against timm.

NOT YET RUN ON A GPU. This file was written and its pure functions (MFU arithmetic, the largest-batch search, the
reference targets, the rows) were unit-tested on a CPU-only machine; the CUDA path itself has never executed.
The first GPU run must check it before any figure from it goes into docs/BENCHMARKS.md.

What it measures, all in bf16 at 224 px (ViT-H/14: 224 px, 16x16 patches of 14 px), in one process:

1. Throughput on synthetic on-device data: this project's ViT (`pretrain.models.vit.create_vit`) against timm's
   `VisionTransformer` of the same shape, in the same plain loop (forward, cross-entropy, backward, fused AdamW),
   interleaved rounds, best window kept. Weights in bf16 (`--precision bf16`, like DeepSpeed's bf16 mode, whose
   fp32 master copy is not part of this loop) or fp32 weights under bf16 autocast (`--precision autocast`).
   MFU = images/s x `train_flops_per_image` / peak dense bf16 FLOP/s (`pretrain.train.metrics.PEAK_BF16_FLOPS`: A100
   312, H100 989, H200 989 TFLOP/s). Targets: NVIDIA NeMo's ViT at about 45% MFU on A100 and 29% on H100 (derived
   from its published throughput, not measured here), and at least 50% on H100 for ViT-L/16.
2. The largest micro-batch that fits, with and without gradient checkpointing (doubling, then bisection on
   out-of-memory, `torch.cuda.empty_cache()` between tries).
3. The same step fed by the real input stream (`pretrain.data.build_train_loader` on JPEG shards made here by
   `data_tools`): images/s against the synthetic figure and the loader's data-wait fraction, with the JPEGs decoded
   in the workers and with `data.decode=gpu` (nvJPEG in the training process).

TF32 matmuls are allowed, attention is `F.scaled_dot_product_attention` (flash kernels) on both sides; the SDPA
kernels usable for each model's shapes are listed. Without `--compile` every model is also measured with regional
compilation of our blocks (`train.compile`, `pretrain.train.compile`) against its eager figure; `--compile` runs
everything compiled (ours regionally, timm's whole model).

    python -m benchmarks.bench_gpu [--full] [--models vit_large_patch16] [--precision bf16|autocast] [--compile]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.models.specs import TIMM_NAMES
from pretrain.models.vit import create_vit, resolve_args, train_flops_per_image
from pretrain.train.compile import compile_blocks
from pretrain.train.metrics import PEAK_BF16_FLOPS, device_peak_flops

MODELS = ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14")
SHORT = {"vit_base_patch16": "ViT-B/16", "vit_large_patch16": "ViT-L/16", "vit_huge_patch14": "ViT-H/14"}
# Micro-batch of the throughput runs; comfortably inside 40 GiB (A100-40GB) without checkpointing.
BATCH = {"vit_base_patch16": 256, "vit_large_patch16": 128, "vit_huge_patch14": 64}
NEMO_MFU = {"A100": 0.45, "H100": 0.29}  # NVIDIA NeMo ViT, derived from its published throughput
GOAL_MFU = {("H100", "vit_large_patch16"): 0.50}
SKIPPED = "no CUDA device: skipped"
NUM_CLASSES = 1000


# ------------------------------------------------------------------------------------------------ pure functions


def mfu(images_per_s: float, flops_per_image: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak; None where the peak is unknown."""
    if not peak_flops:
        return None
    return images_per_s * flops_per_image / peak_flops


def device_family(name: str) -> str | None:
    """ "A100" / "H100" / "H200" from a CUDA device name such as "NVIDIA H100 80GB HBM3"; None for others."""
    return next((k for k in PEAK_BF16_FLOPS if k in name), None)


def mfu_target(family: str | None, model: str) -> tuple[float | None, str]:
    """The MFU to beat on this device family for this model, and where it comes from."""
    if (family, model) in GOAL_MFU:
        goal = GOAL_MFU[(family, model)]
        return goal, f">= {goal:.0%} (goal; NeMo ~{NEMO_MFU[family]:.0%})"
    if family in NEMO_MFU:
        return NEMO_MFU[family], f">= {NEMO_MFU[family]:.0%} (NeMo, published)"
    return None, "NeMo: ~45% A100, ~29% H100"


def largest_fitting(fits: Callable[[int], bool], start: int = 8, step: int = 8, cap: int = 16384) -> int:
    """Largest multiple of `step` in [step, cap] for which `fits(batch)` is True (0 if none), assuming that fitting
    is monotone (a smaller batch fits whenever a larger one does).

    Doubles from `start` until a batch fails (or `cap`), then bisects between the last fit and the first failure:
    about 2 log2(answer / step) calls to `fits`, each of which costs a real training step on the GPU.
    """
    cap = cap // step * step
    if start % step or not step <= start <= cap:
        raise ValueError(f"start ({start}) must be a multiple of step ({step}) in [step, cap ({cap})]")
    lo, hi = 0, cap + step  # invariant: `lo` fits (0: nothing known to fit), `hi` does not (cap + step: beyond reach)
    b = start
    while b <= cap:
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    while hi - lo > step:  # both multiples of step, so lo < mid < hi
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------------ CUDA path


def _models(name: str, precision: str, device: torch.device, compile_: bool):
    """Ours and timm's of the same shape, same weights, on the device (bf16 weights or fp32 for autocast)."""
    import timm

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ours = create_vit(name, num_classes=NUM_CLASSES)
    theirs = timm.create_model(TIMM_NAMES[name], num_classes=NUM_CLASSES, pretrained=False)
    theirs.load_state_dict(ours.state_dict())
    out = []
    for m in (ours, theirs):
        m = m.to(device=device, dtype=dtype).train()
        # fused: one kernel for the whole update; bf16 params keep bf16 moments (DeepSpeed keeps fp32 ones)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        step_model = m
        if compile_ and m is ours:
            compile_blocks(m, zero_stage=0)  # regional, as `train.compile` does in training
        elif compile_:
            step_model = torch.compile(m)  # timm: the whole model
        out.append((m, step_model, opt))
    return out


def _train_step(model, opt, x: torch.Tensor, y: torch.Tensor, precision: str) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "autocast"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _synthetic(batch: int, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    return x, torch.randint(0, NUM_CLASSES, (batch,), device=device)


def _images_per_s(step: Callable[[], None], batch: int, steps: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def throughput(name: str, precision: str, compile_: bool, steps: int, rounds: int) -> dict:
    """Synthetic-data images/s of ours and timm's, interleaved rounds of `steps` steps, best round of each."""
    device = torch.device("cuda")
    batch = BATCH[name]
    torch.cuda.reset_peak_memory_stats(device)
    (_, ours_run, ours_opt), (_, timm_run, timm_opt) = _models(name, precision, device, compile_)
    while True:  # a smaller GPU than planned: halve until it fits
        try:
            x, y = _synthetic(batch, device, precision)
            for run_, opt in ((ours_run, ours_opt), (timm_run, timm_opt)):
                for _ in range(3):  # warm-up: kernel selection, allocator, compile
                    _train_step(run_, opt, x, y, precision)
            break
        except torch.cuda.OutOfMemoryError:
            x = y = None
            _free()
            if batch == 1:
                raise
            batch //= 2
    best = {"ours": 0.0, "timm": 0.0}
    for _ in range(rounds):
        best["ours"] = max(
            best["ours"], _images_per_s(lambda: _train_step(ours_run, ours_opt, x, y, precision), batch, steps)
        )
        best["timm"] = max(
            best["timm"], _images_per_s(lambda: _train_step(timm_run, timm_opt, x, y, precision), batch, steps)
        )
    flops = train_flops_per_image(resolve_args(name, num_classes=NUM_CLASSES))
    peak = device_peak_flops(device)
    return {
        "batch": batch,
        "flops_per_image": flops,
        "ours_img_s": best["ours"],
        "timm_img_s": best["timm"],
        "ours_mfu": mfu(best["ours"], flops, peak),
        "timm_mfu": mfu(best["timm"], flops, peak),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def sdpa_backends(name: str, batch: int = 8) -> list[str]:
    """The SDPA kernels that accept this model's attention shapes in bf16 on this GPU (each tried alone); the default
    dispatcher takes the first usable one of its priority list, flash attention first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = resolve_args(name)
    tokens, heads = (args.img_size // args.patch_size) ** 2 + 1, args.num_heads
    q = torch.randn(batch, heads, tokens, args.embed_dim // heads, device="cuda", dtype=torch.bfloat16)
    usable = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            usable.append(backend.name.lower())
        except RuntimeError:
            pass
    return usable or ["math"]


def max_batch(name: str, precision: str, checkpointing: bool) -> int:
    """Largest micro-batch (multiple of 8) of our ViT (eager, also with --compile) that completes two training steps
    without running out of memory on this GPU."""
    device = torch.device("cuda")
    model = create_vit(name, num_classes=NUM_CLASSES).to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def fits(batch: int) -> bool:
        x = y = None
        try:
            x, y = _synthetic(batch, device, precision)
            for _ in range(2):  # the second step runs with the optimizer states already allocated
                _train_step(model, opt, x, y, precision)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del x, y
            opt.zero_grad(set_to_none=True)
            _free()

    try:
        return largest_fitting(fits)
    finally:
        model = opt = None  # the closure's cells: frees the weights and optimizer states before empty_cache
        _free()


def with_stream(
    name: str, precision: str, compile_: bool, steps: int, workers: int, synthetic_img_s: float, decode: str = "cpu"
) -> dict:
    """The same step fed by the real input stream from generated JPEG shards (500x375 photos, 224 px crops), the
    JPEGs decoded in the workers (`decode="cpu"`) or in batches on the GPU (`data.decode=gpu`)."""
    from data_tools.digits import write_photos
    from data_tools.shard import shard
    from pretrain.config import DataConfig
    from pretrain.data import build_train_loader, normalize

    device = torch.device("cuda")
    batch = BATCH[name]
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    try:
        photos = write_photos(tmp / "photos", classes=4, per_class=max(64, batch // 2), size=(500, 375))
        shard(photos, tmp / "shards", workers=min(8, os.cpu_count() or 1), samples_per_shard=64, progress=False)
        # resampled: one endless stream, so no epoch boundary (worker restart) falls inside the timed steps
        cfg = DataConfig(
            train_shards=str(tmp / "shards"), num_workers=workers, shuffle_buffer=512, mode="resampled", decode=decode
        )
        loader = build_train_loader(cfg, img_size=224, batch_size=batch, seed=0, pin_memory=True, device=device)
        (_, run_, opt), _ = _models(name, precision, device, compile_)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        it = iter(loader)

        def step() -> None:
            b = next(it)
            x = normalize(b["image"].to(device, non_blocking=True), cfg.mean, cfg.std, dtype)  # (B, 3, 224, 224)
            _train_step(run_, opt, x, b["label"].to(device, non_blocking=True), precision)

        for _ in range(5):  # warm-up: workers start, shuffle buffers fill
            step()
        loader.stats(reset=True)
        rate = _images_per_s(step, batch, steps)
        wait = loader.stats()["data_wait_fraction"]
        return {
            "batch": batch,
            "workers": workers,
            "img_s": rate,
            "synthetic_img_s": synthetic_img_s,
            "data_wait_fraction": wait,
            "decode": decode,
        }
    finally:
        _free()
        shutil.rmtree(tmp, ignore_errors=True)


def run(
    quick: bool = True,
    models: tuple[str, ...] | None = None,
    precision: str = "bf16",
    compile_: bool = False,
    workers: int | None = None,
) -> dict:
    """All GPU figures; {"skipped": reason} without CUDA. Quick: all three throughputs (fewer steps), the largest
    batch and the real-stream run for ViT-L/16 only. Full: everything for every model."""
    if not torch.cuda.is_available():
        return {"skipped": SKIPPED}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # the patch-embedding convolution
    models = tuple(models or MODELS)
    detail_models = models if not quick else tuple(m for m in models if m == "vit_large_patch16") or models[:1]
    steps, rounds = (10, 2) if quick else (30, 3)
    workers = workers or max(1, (os.cpu_count() or 2) - 2)
    name = torch.cuda.get_device_name(0)
    out: dict = {
        "device": name,
        "family": device_family(name),
        "precision": precision,
        "compile": compile_,
        "models": {},
    }
    for m in models:
        r = out["models"][m] = {"throughput": throughput(m, precision, compile_, steps, rounds)}
        r["sdpa"] = sdpa_backends(m)
        _free()
        if not compile_:  # eager vs regional compile of the same step
            r["compiled"] = throughput(m, precision, True, steps, rounds)
            _free()
        if m in detail_models:
            r["max_batch"] = {"off": max_batch(m, precision, False), "on": max_batch(m, precision, True)}
            r["stream"] = with_stream(m, precision, compile_, steps, workers, r["throughput"]["ours_img_s"])
            _free()
            r["stream_gpu"] = with_stream(m, precision, compile_, steps, workers, r["throughput"]["ours_img_s"], "gpu")
        _free()
    return out


def _fin(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def rows(result: dict) -> list[dict]:
    """The suite's rows {name, metric, ours, baseline, unit, ratio, target}; ratio = ours / baseline."""

    def row(metric, ours, baseline, unit, target=""):
        ratio = ours / baseline if ours is not None and baseline else None
        return {
            "name": "gpu",
            "metric": metric,
            "ours": _fin(ours),
            "baseline": _fin(baseline),
            "unit": unit,
            "ratio": _fin(ratio),
            "target": target,
        }

    if "skipped" in result:
        return [row(result["skipped"], None, None, "")]
    out, fam = [], result["family"]
    for m, r in result["models"].items():
        t, short = r["throughput"], SHORT.get(m, m)
        out.append(
            row(f"{short} train, batch {t['batch']}, vs timm", t["ours_img_s"], t["timm_img_s"], "images/s", ">= 1.0")
        )
        _, target = mfu_target(fam, m)
        if t["ours_mfu"] is None:
            out.append(row(f"{short} MFU: n/a (peak of {result['device']} unknown)", None, None, "MFU", target))
        else:
            out.append(row(f"{short} MFU vs timm", t["ours_mfu"], t["timm_mfu"], "MFU", target))
        if "compiled" in r:
            c = r["compiled"]
            out.append(
                row(
                    f"{short} regional compile vs eager (SDPA: {', '.join(r.get('sdpa', ['?']))})",
                    c["ours_img_s"],
                    t["ours_img_s"],
                    "images/s",
                    ">= 1.0",
                )
            )
        if "max_batch" in r:
            mb = r["max_batch"]
            out.append(row(f"{short} largest micro-batch, checkpointing on vs off", mb["on"], mb["off"], "images"))
        for key, how in (("stream", ""), ("stream_gpu", ", GPU decode")):
            if key not in r:
                continue
            s = r[key]
            out.append(
                row(
                    f"{short} real stream{how} vs synthetic ({s['workers']} workers, data-wait "
                    f"{s['data_wait_fraction']:.0%})",
                    s["img_s"],
                    s["synthetic_img_s"],
                    "images/s",
                    ">= 0.95",
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the figures as JSON, then one line per row, ratio last."""
    p = argparse.ArgumentParser(prog="benchmarks.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="more steps; largest batch and real stream for every model")
    p.add_argument("--models", nargs="+", choices=MODELS, help="subset of the models")
    p.add_argument("--precision", choices=("bf16", "autocast"), default="bf16", help="bf16 weights or fp32+autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--workers", type=int, help="loader workers for the real-stream run (default: cores - 2)")
    args = p.parse_args(argv)
    r = run(not args.full, tuple(args.models or ()), args.precision, args.compile, args.workers)
    print(json.dumps(r, indent=2))
    for x in rows(r):
        ratio = "n/a" if x["ratio"] is None else f"{x['ratio']:.2f}x"
        print(f"{x['metric']}: ours {x['ours']}, baseline {x['baseline']} {x['unit']} (target {x['target']}) {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

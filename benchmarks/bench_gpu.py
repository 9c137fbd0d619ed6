"""GPU benchmark: training throughput and MFU of ViT-B/16, ViT-L/16, ViT-H/14 against timm, in one command.

NOT YET RUN ON A GPU. Every stage runs on the CPU with a tiny model in the test suite (`--smoke`), so the code
path is checked; the CUDA-only lines (marked in `benchmarks.gpu_measure`) and every figure wait for a lent GPU.

What it measures, all in bf16 at each variant's size (224 px; ViT-H/14: 16x16 patches of 14 px), in one process,
stage by stage, headline figures first (`stages`):

1. `throughput`: images/s on synthetic on-device data, this project's ViT (`pretrain.models.vit.create_vit`)
   against timm's `VisionTransformer` of the same shape, in the same plain loop (forward, cross-entropy, backward,
   fused AdamW), interleaved rounds, best window kept. Weights in bf16 (`--precision bf16`, like DeepSpeed's bf16
   mode, whose fp32 master copy is not part of this loop) or fp32 weights under bf16 autocast (`autocast`).
   MFU = images/s x `train_flops_per_image` / peak dense bf16 FLOP/s (`pretrain.train.metrics.PEAK_BF16_FLOPS`).
   Targets: NVIDIA NeMo's ViT at about 45% MFU on A100 and 29% on H100 (derived from its published throughput,
   not measured here), and at least 50% on H100 for ViT-L/16.
2. `sdpa`: the SDPA kernels usable for each model's attention shapes.
3. `stream`, `stream_gpu`: the step fed by the real input stream (`pretrain.data.build_train_loader` on JPEG shards
   made here by `data_tools`), JPEGs decoded in the workers or with `data.decode=gpu` (nvJPEG in this process):
   images/s against the synthetic figure, and the loader's data-wait fraction.
4. `compiled`: our step with regional compilation of the blocks (`train.compile`) against its eager figure.
5. `max_batch`: the largest micro-batch that fits, with and without gradient checkpointing.

A stage that fails is reported and the next one runs; `--budget-s` (or $BENCH_GPU_BUDGET_S) skips the stages left
once that many seconds have passed, and `--partial` (or $BENCH_GPU_PARTIAL) is rewritten after every stage, so a
short GPU lease always ends with figures. `--compile` runs everything compiled (ours regionally, timm's whole model).

    python -m benchmarks.bench_gpu [--full] [--models vit_large_patch16] [--precision bf16|autocast] [--compile]
        [--budget-s 270] [--partial out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.gpu_measure import Setup, StreamRun, max_batch, sdpa_backends, throughput, with_stream
from data_tools.fsutil import atomic_write
from pretrain.train.metrics import PEAK_BF16_FLOPS

MODELS = ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14")
SHORT = {"vit_base_patch16": "ViT-B/16", "vit_large_patch16": "ViT-L/16", "vit_huge_patch14": "ViT-H/14"}
# Micro-batch of the throughput runs; comfortably inside 40 GiB (A100-40GB) without checkpointing.
BATCH = {"vit_base_patch16": 256, "vit_large_patch16": 128, "vit_huge_patch14": 64}
NEMO_MFU = {"A100": 0.45, "H100": 0.29}  # NVIDIA NeMo ViT, derived from its published throughput
GOAL_MFU = {("H100", "vit_large_patch16"): 0.50}
SKIPPED = "no CUDA device: skipped"
SMOKE_MODEL = "vit_test_patch4"  # --smoke: the tiny test variant, on the CPU


# ------------------------------------------------------------------------------------------------ pure functions


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


# ------------------------------------------------------------------------------------------------ the stages


@dataclass(frozen=True)
class Plan:
    """What one run measures: models, batches, step counts, the models that get the detail stages."""

    models: tuple[str, ...]
    detail_models: tuple[str, ...]  # largest micro-batch and the real-stream stages
    batch: dict[str, int]
    steps: int
    rounds: int
    workers: int
    max_batch_cap: int = 16384
    photo_size: tuple[int, int] = (500, 375)


def make_plan(quick: bool, models: tuple[str, ...], workers: int | None, smoke: bool = False) -> Plan:
    """Quick: all three throughputs (fewer steps), the detail stages for ViT-L/16 only. Full: everything for every
    model. Smoke (CPU): the tiny test variant, a few steps of each stage, to check the code, not the figures."""
    workers = workers or max(1, (os.cpu_count() or 2) - 2)
    if smoke:
        return Plan((SMOKE_MODEL,), (SMOKE_MODEL,), {SMOKE_MODEL: 8}, 2, 1, min(workers, 2), 32, (64, 48))
    models = models or MODELS
    detail = models if not quick else tuple(m for m in models if m == "vit_large_patch16") or models[:1]
    steps, rounds = (10, 2) if quick else (30, 3)
    return Plan(models, detail, {m: BATCH[m] for m in models}, steps, rounds, workers)


def stages(plan: Plan, compile_: bool) -> list[tuple[str, str]]:
    """(stage, model) in the order they run: the headline figures first, so that a spent time budget skips the
    least important ones."""
    out = [("throughput", m) for m in plan.models] + [("sdpa", m) for m in plan.models]
    out += [(s, m) for m in plan.detail_models for s in ("stream", "stream_gpu")]  # is the GPU fed?
    if not compile_:  # eager vs regional compile of the same step: a minute or more of compiling each
        out += [("compiled", m) for m in plan.models]
    return out + [("max_batch", m) for m in plan.detail_models]  # about 20 trial steps each


def _stage_runners(plan: Plan, setup: Setup, compile_: bool, models: dict) -> dict[str, Callable[[str], object]]:
    """stage name -> function of the model that measures it (`models`: the results so far, for the baselines)."""

    def steps(name: str, compiled: bool, timm_too: bool) -> dict:
        b = plan.batch[name]
        return throughput(name, setup, b, compile_=compiled, timm_too=timm_too, steps=plan.steps, rounds=plan.rounds)

    def stream(name: str, decode: str) -> dict:
        run_ = StreamRun(plan.batch[name], plan.workers, decode, plan.steps, plan.photo_size)
        synthetic_img_s = models[name].get("throughput", {}).get("ours_img_s")
        return {**with_stream(name, setup, run_, compile_=compile_), "synthetic_img_s": synthetic_img_s}

    def largest(name: str) -> dict:
        fit = partial(max_batch, name, setup, cap=plan.max_batch_cap, search=largest_fitting)
        return {"off": fit(checkpointing=False), "on": fit(checkpointing=True)}

    return {
        "throughput": lambda m: steps(m, compile_, True),
        "sdpa": lambda m: sdpa_backends(m, setup),
        "compiled": lambda m: steps(m, True, False),
        "stream": lambda m: stream(m, "cpu"),
        "stream_gpu": lambda m: stream(m, "gpu"),
        "max_batch": largest,
    }


def run(
    quick: bool = True,
    models: tuple[str, ...] | None = None,
    precision: str = "bf16",
    compile_: bool = False,
    workers: int | None = None,
    *,
    smoke: bool = False,
    budget_s: float | None = None,
    partial_json: str | None = None,
) -> dict:
    """All GPU figures; {"skipped": reason} without CUDA (unless `smoke`: a tiny model through every stage on CPU).

    Stages run in `stages` order. One that fails is recorded under "errors" and the next still runs; once
    `budget_s` seconds have passed (default: $BENCH_GPU_BUDGET_S, else none) the rest are listed under "skipped_stages"
    instead of run. After each stage the result so far is written to `partial_json` (default: $BENCH_GPU_PARTIAL),
    so a run killed at a lease's limit still leaves its figures.
    """
    if not smoke and not torch.cuda.is_available():
        return {"skipped": SKIPPED}
    budget_s = budget_s if budget_s is not None else _env_seconds("BENCH_GPU_BUDGET_S")
    partial_json = partial_json or os.environ.get("BENCH_GPU_PARTIAL") or None
    setup = Setup(torch.device("cuda" if not smoke else "cpu"), precision)
    if setup.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the patch-embedding convolution
    plan = make_plan(quick, tuple(models or ()), workers, smoke)
    name = torch.cuda.get_device_name(0) if setup.cuda else "cpu (smoke run)"
    out: dict = {"device": name, "family": device_family(name), "precision": precision, "compile": compile_}
    out.update({"budget_s": budget_s, "models": {m: {} for m in plan.models}, "errors": {}, "skipped_stages": []})
    out["seconds"] = {}
    runners = _stage_runners(plan, setup, compile_, out["models"])
    start = time.monotonic()
    for stage, m in stages(plan, compile_):
        key = f"{stage} {m}"
        if budget_s is not None and time.monotonic() - start >= budget_s:
            out["skipped_stages"].append(key)
            continue
        print(f"[gpu] {key} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            out["models"][m][stage] = runners[stage](m)
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' figures
            traceback.print_exc()
            out["errors"][key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out["seconds"][key] = round(time.perf_counter() - t, 1)
        setup.free()
        if partial_json:
            atomic_write(partial_json, json.dumps(out, indent=2))
    return out


def _env_seconds(var: str) -> float | None:
    value = os.environ.get(var)
    try:
        return float(value) if value else None
    except ValueError:
        raise SystemExit(f"{var}={value!r} is not a number of seconds") from None


def _fin(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _row(metric: str, ours, baseline, unit: str, target: str = "") -> dict:
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


def _model_rows(short: str, r: dict, family: str | None, model: str, device: str) -> list[dict]:
    out = []
    if "throughput" in r:
        t = r["throughput"]
        metric = f"{short} train, batch {t['batch']}, vs timm"
        out.append(_row(metric, t["ours_img_s"], t["timm_img_s"], "images/s", ">= 1.0"))
        _, target = mfu_target(family, model)
        if t["ours_mfu"] is None:
            out.append(_row(f"{short} MFU: n/a (peak of {device} unknown)", None, None, "MFU", target))
        else:
            out.append(_row(f"{short} MFU vs timm", t["ours_mfu"], t["timm_mfu"], "MFU", target))
    if "compiled" in r:
        eager = r.get("throughput", {}).get("ours_img_s")
        metric = f"{short} regional compile vs eager (SDPA: {', '.join(r.get('sdpa', ['?']))})"
        out.append(_row(metric, r["compiled"]["ours_img_s"], eager, "images/s", ">= 1.0"))
    if "max_batch" in r:
        mb = r["max_batch"]
        out.append(_row(f"{short} largest micro-batch, checkpointing on vs off", mb["on"], mb["off"], "images"))
    for key, how in (("stream", ""), ("stream_gpu", ", GPU decode")):
        if key in r:
            s = r[key]
            metric = (
                f"{short} real stream{how} vs synthetic ({s['workers']} workers, "
                f"data-wait {s['data_wait_fraction']:.0%})"
            )
            out.append(_row(metric, s["img_s"], s["synthetic_img_s"], "images/s", ">= 0.95"))
    return out


def rows(result: dict) -> list[dict]:
    """The suite's rows {name, metric, ours, baseline, unit, ratio, target}; ratio = ours / baseline. Failed and
    skipped stages get a row each, so a partial run says what it lacks."""
    if result.get("skipped") == SKIPPED:
        return [_row(SKIPPED, None, None, "")]
    out = []
    for m, r in result["models"].items():
        out += _model_rows(SHORT.get(m, m), r, result["family"], m, result["device"])
    for key, error in result.get("errors", {}).items():
        out.append(_row(f"{key}: error: {error}", None, None, ""))
    for key in result.get("skipped_stages", []):
        out.append(_row(f"{key}: skipped (time budget of {result['budget_s']:g} s spent)", None, None, ""))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the figures as JSON, then one line per row, ratio last."""
    p = argparse.ArgumentParser(prog="benchmarks.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="more steps; largest batch and real stream for every model")
    p.add_argument("--models", nargs="+", choices=MODELS, help="subset of the models")
    p.add_argument("--precision", choices=("bf16", "autocast"), default="bf16", help="bf16 weights or fp32+autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--workers", type=int, help="loader workers for the real-stream run (default: cores - 2)")
    p.add_argument("--budget-s", type=float, help="skip the stages left after this many seconds")
    p.add_argument("--partial", help="JSON file rewritten after every stage")
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU with a tiny model (checks the code)")
    args = p.parse_args(argv)
    r = run(
        not args.full,
        tuple(args.models or ()),
        args.precision,
        args.compile,
        args.workers,
        smoke=args.smoke,
        budget_s=args.budget_s,
        partial_json=args.partial,
    )
    print(json.dumps(r, indent=2))
    for x in rows(r):
        ratio = "n/a" if x["ratio"] is None else f"{x['ratio']:.2f}x"
        print(f"{x['metric']}: ours {x['ours']}, baseline {x['baseline']} {x['unit']} (target {x['target']}) {ratio}")
    return 1 if r.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark suite: every benchmark, each against a baseline measured in the same run, as one table.

    python -m benchmarks [--quick] [--only NAME[,NAME...]] [--images photo|i21k|large] [--json OUT]

Every row is {name, metric, ours, baseline, unit, ratio, target} with ratio = ours / baseline in the row's unit
(so for images/s higher is better, for seconds and MiB lower is better; `target` says which). The machine
description (CPU, cores, memory, GPUs, library versions, git commit) is printed above the table and stored beside
the rows in the JSON. A benchmark that fails gives an "error: ..." row, the others still run, and the exit code is
1; an unknown name for --only exits 2 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from collections.abc import Callable

from benchmarks.machine import describe, one_line
from data_tools.fsutil import atomic_write


def _row(name: str, metric: str, ours, baseline, unit: str, target: str = "") -> dict:
    ratio = ours / baseline if ours is not None and baseline else None
    return {
        "name": name,
        "metric": metric,
        "ours": ours,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio if ratio is not None and math.isfinite(ratio) else None,
        "target": target,
    }


def _shard_rows(r: dict) -> list[dict]:
    kb, cpu = r["keep_bytes"], r["cpu_ms_per_image"]
    return [
        _row(
            "shard",
            "resize 256 + JPEG q90: --workers 2 vs ShardWriter loop",
            r["ours"],
            r["baseline"],
            "images/s",
            "higher",
        ),
        _row("shard", "resize: CPU time per image, all processes", cpu["ours"], cpu["baseline"], "ms", "lower"),
        _row("shard", "keep bytes: full decode check vs plain copy", kb["ours"], kb["baseline"], "images/s", "higher"),
    ]


def _loader_rows(r: dict) -> list[dict]:
    rows = []
    for label, unit in (("per_worker", "images/s/worker"), ("per_cpu_s", "images/CPU-s")):
        stream = r[f"stream_img_{label}"]
        rows.append(
            _row(
                "loader",
                f"stream vs ImageFolder+DataLoader ({label})",
                stream,
                r[f"imagefolder_img_{label}"],
                unit,
                ">= 1.8",
            )
        )
        rows.append(
            _row(
                "loader",
                f"stream vs decode-only ceiling ({label})",
                stream,
                r[f"decode_only_img_{label}"],
                unit,
                ">= 0.6",
            )
        )
    rows.append(
        _row(
            "loader",
            "worker pipeline, data.decode=gpu vs cpu (per_cpu_s; the GPU decode not included)",
            r["worker_decode_gpu_img_per_cpu_s"],
            r["worker_decode_cpu_img_per_cpu_s"],
            "images/CPU-s",
            "higher",
        )
    )
    rows.append(
        _row(
            "loader",
            "loopback HTTP vs local disk (per_worker)",
            r["http_img_per_worker"],
            r["local_img_per_worker"],
            "images/s/worker",
            ">= 0.9",
        )
    )
    rows += _peer_rows(r)
    rows += _per_image_rows(r)
    res = r["resume_90"]
    for what, unit in (("mb", "MB"), ("s", "s")):
        metric = f"resume at 90% over HTTP: {unit} until the first batch, buffer refill vs replay"
        rows.append(_row("loader", metric, res[f"buffer_{what}"], res[f"replay_{what}"], unit, "lower"))
    return rows


# The loader's peer sides (benchmarks/peers.py): what the row compares the stream with, and the target (issue 24:
# >= 1.8x webdataset's pipeline; issue 27: >= 1.0x full decode-only, >= 2.5x webdataset with its fastest decoder).
PEER_ROWS = {
    "decode_only": ("full decode_jpeg only", ">= 1.0"),
    "webdataset": ("webdataset .decode('pil') + v2", ">= 1.8"),
    "webdataset_decode_jpeg": ("webdataset decode_jpeg handler + v2", ">= 2.5"),
    "mds": ("MosaicML Streaming (MDS) + v2", "higher"),
    "litdata": ("litdata + v2", "higher"),
}


def _peer_rows(r: dict) -> list[dict]:
    p = r["peers"]
    rates, where = p["img_per_cpu_s"], f"{r['image_set']} images, 1 worker, batch {p['batch_size']}"
    rows = []
    for side, (what, target) in PEER_ROWS.items():
        if side in p["skipped"]:
            rows.append(_row("loader", f"stream vs {what}: {p['skipped'][side]}", None, None, "images/CPU-s"))
        else:
            metric = f"stream vs {what} ({where}, per_cpu_s)"
            rows.append(_row("loader", metric, rates["stream"], rates[side], "images/CPU-s", target))
    return rows


def _per_image_rows(r: dict) -> list[dict]:
    """Issue 27's per-image figures (benchmarks/bench_decode.py): CPU ms per image, in-process, lower is better."""
    p, where = r["per_image"]["ms_per_image"], f"{r['image_set']} images, in-process, per image"
    rows = [
        _row(
            "loader",
            f"region decode of the crop vs the full decode before ({where})",
            p["decode_region"],
            p["decode_full_before"],
            "ms",
            "lower",
        ),
        _row(
            "loader",
            f"stream with vs without region decode ({where})",
            p["stream"],
            p["stream_full_decode"],
            "ms",
            "lower",
        ),
    ]
    if "torchcodec_decode_jpeg_full" in p:
        metric = f"TorchCodec decode_jpeg vs torchvision.io.decode_jpeg, full image ({where})"
        rows.append(_row("loader", metric, p["torchcodec_decode_jpeg_full"], p["torchvision_decode_jpeg_full"], "ms"))
    else:
        rows.append(_row("loader", f"TorchCodec decode_jpeg: {r['per_image']['torchcodec']}", None, None, "ms"))
    return rows


def _train_rows(r: dict) -> list[dict]:
    s, c = r["step"], r["checkpointing"]
    rows = [
        _row(
            "train",
            f"step vs timm VisionTransformer ({s['model']}, batch {s['batch']})",
            s["ours_s_per_step"],
            s["timm_s_per_step"],
            "s/step",
            "<= 1.0",
        ),
        _row(
            "train",
            f"regional torch.compile vs eager ({r['compile']['model']}, batch {r['compile']['batch']})",
            r["compile"]["compiled_s_per_step"],
            r["compile"]["eager_s_per_step"],
            "s/step",
            "<= 0.85",
        ),
        _row("train", "grad checkpointing on vs off: fwd+bwd time", c["s_on"], c["s_off"], "s", "~1.3 (recompute)"),
        _row(
            "train",
            "grad checkpointing on vs off: peak memory growth",
            c["peak_mib_on"],
            c["peak_mib_off"],
            "MiB",
            "< 1.0",
        ),
    ]
    for z in r["zero"]:
        rows.append(
            _row(
                "train",
                f"ZeRO-{z['stage']} per-rank model states vs 16 B/param accounting (2 ranks)",
                z["per_rank_mib"],
                z["accounting_mib"],
                "MiB",
                "~1.0",
            )
        )
    return rows


def _export_rows(r: dict) -> list[dict]:
    c = r["cases"][-1]
    o, d, idle = c["ours"], c["deepspeed"], c["idle"]["peak_mib"]
    what = f"{c['model']} ZeRO-{c['stage']}"
    return [
        _row(
            "export",
            f"{what}: peak memory vs get_fp32_state_dict_from_zero_checkpoint",
            o["peak_mib"],
            d["peak_mib"],
            "MiB",
            "< 1.0",
        ),
        _row(
            "export",
            f"{what}: memory above an idle process ({idle:.0f} MiB)",
            o["peak_mib"] - idle,
            d["peak_mib"] - idle,
            "MiB",
            "< 1.0",
        ),
        _row("export", f"{what}: time (ours also writes the file)", o["seconds"], d["seconds"], "s", "<= 1.0"),
        *(
            _row(
                "export", f"{what}: --format {f} peak memory vs DeepSpeed", m["peak_mib"], d["peak_mib"], "MiB", "< 1.0"
            )
            for f, m in c["formats"].items()
        ),
    ]


def _gpu_rows(r: dict) -> list[dict]:
    from benchmarks.bench_gpu import rows

    return rows(r)


# name -> (module with run(quick) -> dict, result -> rows). Order: the pipeline's order.
REGISTRY: dict[str, tuple[str, Callable[[dict], list[dict]]]] = {
    "shard": ("benchmarks.bench_shard", _shard_rows),
    "loader": ("benchmarks.bench_loader", _loader_rows),
    "train": ("benchmarks.bench_train", _train_rows),
    "export": ("benchmarks.bench_export", _export_rows),
    "gpu": ("benchmarks.bench_gpu", _gpu_rows),
}


def _num(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "MFU":
        return f"{v:.1%}"
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table, the ratio in the last column."""
    head = ["benchmark", "metric", "ours", "baseline", "unit", "target", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"**{r['ratio']:.2f}x**"
        cells = [
            r["name"],
            r["metric"],
            _num(r["ours"], r["unit"]),
            _num(r["baseline"], r["unit"]),
            r["unit"],
            r["target"] or "-",
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_suite(names: list[str], quick: bool, images: str = "photo") -> dict:
    """Run the named benchmarks in order; a failure becomes an error row and the next benchmark still runs.

    `images` is the loader benchmark's image set (`bench_loader.IMAGE_SETS`).
    """
    out: dict = {"quick": quick, "machine": describe(), "rows": [], "results": {}, "seconds": {}, "errors": {}}
    for name in names:
        module, to_rows = REGISTRY[name]
        options = {"quick": quick, **({"images": images} if name == "loader" else {})}
        print(f"[{name}] running {module}.run({options}) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            result = importlib.import_module(module).run(**options)
            rows = to_rows(result)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            result, rows = (
                None,
                [_row(name, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None, None, "")],
            )
            out["errors"][name] = traceback.format_exc()
        out["seconds"][name] = round(time.perf_counter() - t, 1)
        out["results"][name] = result
        out["rows"].extend(rows)
        print(f"[{name}] done in {out['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
    out["machine"]["load_average_1min_end"] = describe()["load_average_1min"]
    return out


def _parse_only(values: list[str] | None) -> list[str]:
    if not values:
        return list(REGISTRY)
    wanted = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [w for w in wanted if w not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r} for --only; choose from {', '.join(REGISTRY)}")
    return [n for n in REGISTRY if n in wanted]


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the machine and the table, write --json; exit 1 if a benchmark failed."""
    from benchmarks.bench_loader import IMAGE_SETS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small inputs: a few minutes on 2 CPU cores (CI smoke test)")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (comma-separated or repeated): {', '.join(REGISTRY)}",
    )
    p.add_argument(
        "--images",
        choices=list(IMAGE_SETS),
        default="photo",
        help="loader: its image set, " + "; ".join(f"{k} {w}x{h}" for k, (w, h) in IMAGE_SETS.items()),
    )
    p.add_argument("--json", metavar="OUT", help="also write machine, rows and raw results to this JSON file")
    args = p.parse_args(argv)
    try:
        names = _parse_only(args.only)
    except ValueError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    res = run_suite(names, quick=args.quick, images=args.images)
    print(f"\nmachine: {one_line(res['machine'])}")
    print(f"command: python -m benchmarks {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print("ratio = ours / baseline, both measured in this run; target says which way is better\n")
    print(format_table(res["rows"]))
    if args.json:
        atomic_write(args.json, json.dumps(res, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    for name in res["errors"]:
        print(f"benchmarks: {name} failed (traceback above and in --json)", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

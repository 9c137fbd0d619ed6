"""The benchmark suite (`python -m benchmarks`) and the pure parts of the GPU benchmark, on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import bench_gpu, bench_loader, gpu_measure, peers
from benchmarks.__main__ import PEER_ROWS, _peer_rows, format_table, main
from pretrain.models.vit import resolve_args, train_flops_per_image

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {
    "cpu",
    "cores",
    "memory_gib",
    "gpu",
    "gpu_count",
    "torch",
    "deepspeed",
    "webdataset",
    "timm",
    "git_commit",
}
ROW_KEYS = {"name", "metric", "ours", "baseline", "unit", "ratio", "target"}


# ------------------------------------------------------------------------------------------ bench_gpu, pure parts


def test_mfu_arithmetic():
    # 1,000 images/s of ViT-L/16 on an H100 (989 TFLOP/s dense bf16): 1000 x 3.69e11 training FLOPs -> 37.3 %
    flops = train_flops_per_image(resolve_args("vit_large_patch16"))
    assert gpu_measure.mfu(1000.0, flops, 989e12) == pytest.approx(0.3731, abs=1e-4)
    assert gpu_measure.mfu(2.0, 3.0, 12.0) == 0.5
    assert gpu_measure.mfu(1000.0, flops, None) is None  # unknown peak (CPU, other GPUs): n/a, not a wrong number


def test_device_family_and_targets():
    assert bench_gpu.device_family("NVIDIA H100 80GB HBM3") == "H100"
    assert bench_gpu.device_family("NVIDIA A100-SXM4-40GB") == "A100"
    assert bench_gpu.device_family("NVIDIA H200") == "H200"
    assert bench_gpu.device_family("NVIDIA GeForce RTX 4090") is None
    # the project's goal takes precedence over the published figure where there is one
    assert bench_gpu.mfu_target("H100", "vit_large_patch16") == (0.50, ">= 50% (goal; NeMo ~29%)")
    assert bench_gpu.mfu_target("H100", "vit_base_patch16") == (0.29, ">= 29% (NeMo, published)")
    assert bench_gpu.mfu_target("A100", "vit_huge_patch14")[0] == 0.45
    assert bench_gpu.mfu_target(None, "vit_base_patch16")[0] is None


@pytest.mark.parametrize("limit", [0, 7, 8, 9, 15, 16, 17, 100, 1000, 1024, 4095, 16384, 20000])
@pytest.mark.parametrize("start", [8, 64])
def test_largest_fitting_finds_the_largest_multiple_of_step(limit, start):
    calls = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= limit

    got = bench_gpu.largest_fitting(fits, start=start, step=8, cap=16384)
    assert got == min(limit, 16384) // 8 * 8
    assert all(b % 8 == 0 and 8 <= b <= 16384 for b in calls)
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(16384 / 8)) + 2  # each try is a real GPU step


def test_largest_fitting_rejects_bad_start():
    with pytest.raises(ValueError):
        bench_gpu.largest_fitting(lambda b: True, start=12, step=8)


def test_gpu_rows_skip_on_cpu_and_are_uniform_on_gpu():
    skipped = bench_gpu.rows({"skipped": bench_gpu.SKIPPED})
    assert len(skipped) == 1 and skipped[0]["metric"] == "no CUDA device: skipped" and skipped[0]["ratio"] is None
    if not __import__("torch").cuda.is_available():
        assert bench_gpu.run(quick=True) == {"skipped": bench_gpu.SKIPPED}
    # a made-up GPU result: the rows must be complete and their ratios finite
    t = {"batch": 128, "ours_img_s": 1100.0, "timm_img_s": 1000.0, "ours_mfu": 0.5, "timm_mfu": 0.45}
    fake = {
        "device": "NVIDIA H100 80GB HBM3",
        "family": "H100",
        "models": {
            "vit_large_patch16": {
                "throughput": t,
                "max_batch": {"on": 1024, "off": 256},
                "stream": {"workers": 14, "img_s": 900.0, "synthetic_img_s": 1100.0, "data_wait_fraction": 0.18},
            }
        },
    }
    rows = bench_gpu.rows(fake)
    assert len(rows) == 4 and all(set(r) == ROW_KEYS and math.isfinite(r["ratio"]) for r in rows)
    assert rows[1]["ratio"] == pytest.approx(0.5 / 0.45) and "50%" in rows[1]["target"]
    assert rows[2]["ratio"] == 4.0
    assert "data-wait 18%" in rows[3]["metric"]


def test_gpu_rows_show_the_stream_with_gpu_decode():
    t = {"batch": 256, "ours_img_s": 4000.0, "timm_img_s": 4000.0, "ours_mfu": 0.4, "timm_mfu": 0.4}
    s = {"workers": 14, "img_s": 2000.0, "synthetic_img_s": 4000.0, "data_wait_fraction": 0.5}
    fake = {"device": "NVIDIA H100", "family": "H100", "models": {"vit_base_patch16": {"throughput": t, "stream": s}}}
    fake["models"]["vit_base_patch16"]["stream_gpu"] = {**s, "img_s": 3800.0, "data_wait_fraction": 0.05}
    rows = bench_gpu.rows(fake)
    assert len(rows) == 4 and rows[2]["ratio"] == 0.5 and rows[3]["ratio"] == 0.95
    assert "GPU decode" not in rows[2]["metric"] and "GPU decode" in rows[3]["metric"] and "5%" in rows[3]["metric"]


def test_gpu_rows_compare_regional_compile_with_eager():
    t = {"batch": 128, "ours_img_s": 1000.0, "timm_img_s": 1000.0, "ours_mfu": 0.4, "timm_mfu": 0.4}
    c = {**t, "ours_img_s": 1200.0}
    fake = {"device": "NVIDIA H100", "family": "H100", "models": {"vit_base_patch16": {"throughput": t, "compiled": c}}}
    fake["models"]["vit_base_patch16"]["sdpa"] = ["flash_attention", "efficient_attention"]
    rows = bench_gpu.rows(fake)
    assert len(rows) == 3 and rows[2]["ratio"] == pytest.approx(1.2)
    assert "SDPA: flash_attention, efficient_attention" in rows[2]["metric"]


# ------------------------------------------------------------------------------------ bench_gpu, every stage on CPU

SMOKE_STAGES = ["throughput", "sdpa", "stream", "stream_gpu", "compiled", "max_batch"]


@pytest.mark.slow
def test_gpu_benchmark_runs_every_stage_on_cpu_and_a_failed_stage_loses_nothing(tmp_path, monkeypatch, capsys):
    # The CUDA path has never run; this runs all of its code but the CUDA-only lines, so the first GPU lease is not
    # spent on a typo. One stage is made to fail after doing its work: the others must still report.
    sdpa = bench_gpu.sdpa_backends

    def failing_sdpa(*a, **k):
        sdpa(*a, **k)
        raise RuntimeError("injected")

    monkeypatch.setattr(bench_gpu, "sdpa_backends", failing_sdpa)
    partial = tmp_path / "partial.json"
    assert bench_gpu.main(["--smoke", "--partial", str(partial)]) == 1  # 1: a stage failed
    printed = capsys.readouterr().out
    result = json.loads(printed[: printed.rindex("}") + 1])
    assert json.loads(partial.read_text()) == result  # the file after the last stage is the whole result
    assert list(result["seconds"]) == [f"{s} {bench_gpu.SMOKE_MODEL}" for s in SMOKE_STAGES]
    assert result["errors"] == {f"sdpa {bench_gpu.SMOKE_MODEL}": "RuntimeError: injected"}
    r = result["models"][bench_gpu.SMOKE_MODEL]
    assert sorted(r) == sorted(s for s in SMOKE_STAGES if s != "sdpa")
    assert r["stream"]["decode"] == "cpu" and r["stream_gpu"]["decode"] == "gpu"
    assert r["max_batch"] == {"off": 32, "on": 32}  # nothing runs out of memory on the CPU: the search's cap
    rows = bench_gpu.rows(result)
    ratios = [x["ratio"] for x in rows if x["unit"] == "images/s"]  # ours vs timm, compiled, two streams
    assert len(ratios) == 4 and all(x is not None and x > 0 for x in ratios)
    assert rows[-1]["metric"] == f"sdpa {bench_gpu.SMOKE_MODEL}: error: RuntimeError: injected"
    assert "(SDPA: ?)" in rows[2]["metric"]  # rows: throughput, MFU, compiled, max_batch, stream, stream_gpu, error


def test_gpu_benchmark_skips_the_stages_left_when_its_budget_is_spent(monkeypatch):
    monkeypatch.setenv("BENCH_GPU_BUDGET_S", "0")  # spent before the first stage: every stage is listed, none runs
    result = bench_gpu.run(smoke=True)
    expected = [f"{s} {bench_gpu.SMOKE_MODEL}" for s in SMOKE_STAGES]
    assert result["skipped_stages"] == expected and result["models"] == {bench_gpu.SMOKE_MODEL: {}}
    assert [x["metric"] for x in bench_gpu.rows(result)] == [
        f"{k}: skipped (time budget of 0 s spent)" for k in expected
    ]


def test_gpu_benchmark_stage_order_puts_the_headline_first():
    plan = bench_gpu.make_plan(True, (), workers=4)
    order = bench_gpu.stages(plan, compile_=False)
    assert order[:3] == [("throughput", m) for m in bench_gpu.MODELS]  # MFU of B, L, H before anything else
    assert {m for s, m in order if s in ("stream", "stream_gpu", "max_batch")} == {"vit_large_patch16"}  # quick
    assert order[-1] == ("max_batch", "vit_large_patch16")  # the slowest figure and the least needed, last
    assert not any(s == "compiled" for s, _ in bench_gpu.stages(plan, compile_=True))  # all compiled: no pair


# ------------------------------------------------------------------------------------------ the suite


def test_unknown_only_name_exits_2_with_one_line():
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "shard,nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "'nope'" in p.stderr
    assert all(name in p.stderr for name in ("shard", "loader", "train", "export", "gpu"))  # the choices, all of them
    assert p.stdout == ""


def test_only_filters_and_json_has_machine(tmp_path, capsys):
    # `gpu` alone is instant on a CPU machine (one skipped row), so this runs the real suite path end to end.
    out = tmp_path / "sub" / "b.json"
    assert main(["--quick", "--only", "gpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["results"]) == ["gpu"] and {r["name"] for r in res["rows"]} == {"gpu"}
    assert MACHINE_KEYS <= set(res["machine"]) and res["machine"]["cores"] == os.cpu_count()
    printed = capsys.readouterr().out
    assert "machine:" in printed and "| benchmark |" in printed and "| target | ratio |" in printed
    assert not list(out.parent.glob(".tmp-*"))  # atomic write left no temporary file


def test_table_puts_ratio_last():
    rows = [{"name": "x", "metric": "m", "ours": 2.0, "baseline": 4.0, "unit": "s", "ratio": 0.5, "target": "<= 1"}]
    header, _, line = format_table(rows).splitlines()
    assert header.strip("| ").split(" | ")[-1] == "ratio" and line.strip("| ").split(" | ")[-1] == "**0.50x**"


@pytest.mark.slow
def test_quick_suite_runs_and_ratios_are_numbers(tmp_path):
    """The quick suite as CI runs it, minus `train` and `export` (their DeepSpeed launches take several minutes on
    a loaded 2-core machine; `make bench` runs them). No thresholds on timing: only that every ratio is a number."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", "shard,loader,gpu", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert MACHINE_KEYS <= set(res["machine"])
    assert {r["name"] for r in res["rows"]} == {"shard", "loader", "gpu"} and not res["errors"]
    for r in res["rows"]:
        assert set(r) == ROW_KEYS
        if r["name"] == "gpu" and r["metric"] == bench_gpu.SKIPPED:
            continue
        if r["name"] == "loader" and ": skipped: " in r["metric"]:  # a peer whose package is not installed
            continue
        assert isinstance(r["ratio"], float) and math.isfinite(r["ratio"]) and r["ratio"] > 0, r


# ------------------------------------------------------------------------------------------ loader peers


def _burn_and_report(q, done) -> None:
    start = time.process_time()
    while time.process_time() - start < 0.2:
        pass
    q.put(time.process_time())
    done.wait()


def test_cpu_seconds_counts_live_and_reaped_workers():
    # A forked worker burns CPU and reports its own CPU time; the parent's figure must include it, while the worker
    # lives and after it was reaped (relations between two clocks, not a timing threshold).
    ctx = multiprocessing.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    before = peers.cpu_seconds()
    child = ctx.Process(target=_burn_and_report, args=(q, done))
    child.start()
    child_cpu = q.get(timeout=60)
    live = peers.cpu_seconds() - before
    done.set()
    child.join(timeout=60)
    reaped = peers.cpu_seconds() - before
    tick = 0.02  # two clock ticks of /proc's accounting
    assert live >= child_cpu - tick and reaped >= child_cpu - tick, (child_cpu, live, reaped)


def test_peer_side_without_its_package_is_skipped_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litdata" else real(name, *a))
    assert peers.missing("litdata") == "skipped: pip install '.[bench]'"
    assert peers.missing("webdataset") is None  # a core dependency
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zstd" else real(name, *a))
    assert peers.missing("mds") == f"skipped: {peers.MDS_INSTALL}"  # Streaming present or not, it cannot import


def test_peer_rows_give_the_stream_over_each_peer_and_say_why_one_is_skipped():
    rates = {"stream": 800.0, "decode_only": 1000.0, "webdataset": 400.0, "webdataset_decode_jpeg": 500.0}
    result = {
        "image_set": "i21k",
        "peers": {"batch_size": 64, "img_per_cpu_s": {**rates, "litdata": 320.0}, "skipped": {"mds": "skipped: X"}},
    }
    rows = dict(zip(PEER_ROWS, _peer_rows(result), strict=True))  # one row per side, in PEER_ROWS' order
    assert all(set(r) == ROW_KEYS and r["metric"].startswith(f"stream vs {PEER_ROWS[k][0]}") for k, r in rows.items())
    assert rows["mds"]["ratio"] is None and rows["mds"]["metric"].endswith(": skipped: X")
    for side in ("decode_only", "webdataset", "webdataset_decode_jpeg", "litdata"):
        r = rows[side]
        assert r["ours"] == 800.0 and r["ratio"] == pytest.approx(800.0 / result["peers"]["img_per_cpu_s"][side])
        assert "i21k images, 1 worker, batch 64" in r["metric"]


@pytest.mark.parametrize("kind", ["i21k", "large"])
def test_image_sets_have_their_size_and_are_deterministic(tmp_path, kind):
    a = bench_loader.write_images(kind, tmp_path / "a", classes=1, per_class=2)
    b = bench_loader.write_images(kind, tmp_path / "b", classes=1, per_class=2)
    files = sorted(a.rglob("*.jpg"))
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(b.rglob("*.jpg"))] and len(files) == 2
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and sorted(im.size) == sorted(bench_loader.IMAGE_SETS[kind])
    assert not (tmp_path / "a-tiles").exists()


def test_loader_peer_rows_run_on_a_handful_of_images():
    """Quick mode of the peer comparison: every side installed here gives a positive rate, the others a reason."""
    r = bench_loader.run_peers(images="photo", classes=2, per_class=32, n_batches=3, repeats=1)
    assert set(r["img_per_cpu_s"]) | set(r["skipped"]) == {"stream", "decode_only", *peers.PACKAGES}
    assert not set(r["img_per_cpu_s"]) & set(r["skipped"])
    for side in peers.PACKAGES:
        assert (side in r["skipped"]) == (peers.missing(side) is not None)
    assert {"stream", "decode_only", "webdataset", "webdataset_decode_jpeg"} <= set(r["img_per_cpu_s"])  # core deps
    assert all(v > 0 and math.isfinite(v) for v in r["img_per_cpu_s"].values())
    assert all(r["ratio_stream_vs"][k] > 0 for k in r["img_per_cpu_s"] if k != "stream")
    rows = _peer_rows({"image_set": r["image_set"], "peers": r})
    assert sum(x["ratio"] is not None for x in rows) == len(r["img_per_cpu_s"]) - 1


# ------------------------------------------------------------------------------------------ per-image breakdown


def test_per_image_breakdown_runs_and_gives_its_rows():
    """benchmarks/bench_decode.py on 64 photos: every part measured, the region decoder used, one row per figure."""
    from benchmarks import bench_decode
    from benchmarks.__main__ import _per_image_rows

    r = bench_decode.run(images="photo", per_class=16, repeats=1)
    ms = r["ms_per_image"]
    parts = {"stream", "stream_full_decode", "transform", "header", "decode_region", "decode_full_before", "resize"}
    assert parts <= set(ms) and all(v > 0 and math.isfinite(v) for v in ms.values())
    assert r["decode_outcomes"]["region"] > 0 and set(r["decode_outcomes"]) <= {"region", "unavailable"}
    rows = _per_image_rows({"image_set": "photo", "per_image": r})
    assert len(rows) == 3 and all(set(x) == ROW_KEYS for x in rows)
    assert rows[0]["ratio"] == pytest.approx(ms["decode_region"] / ms["decode_full_before"])
    if "torchcodec" in r:
        assert rows[2]["ratio"] is None and rows[2]["metric"].endswith(": skipped: pip install torchcodec")

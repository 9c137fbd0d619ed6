"""Export memory and time: `pretrain.export` against DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`.

Writes a real bf16 ZeRO checkpoint with 2 CPU ranks (tests/helpers/make_ds_checkpoint.py: one AdamW step, then a
save exactly as the training loop does), then runs each side in its own fresh process on the same tag folder and
reads the process's peak resident memory (VmHWM in /proc/self/status, which, unlike ru_maxrss, does not carry
over from the parent across exec) and wall time:

- ours: `export_checkpoint(..., format="timm")`: rebuild the fp32 weights and write model.safetensors + config;
  the same for the plain formats, `pth` (torch.save layout, written tensor by tensor) and `npz` (vit_jax layout);
- deepspeed: `get_fp32_state_dict_from_zero_checkpoint(...)`: rebuild the fp32 state dict in memory only
  (it writes nothing, so it does less work than ours);
- idle: a process that only imports torch and pretrain.export: the floor both sides start from.

The checkpoint files are read once before timing so both sides read from the page cache. Quick: vit_small_patch16
(22 M parameters) at ZeRO 3; full: vit_base_patch16 (86 M) at ZeRO 2 and 3.

    python -m benchmarks.bench_export [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import print_ratio
from pretrain.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"
PLAIN_FORMATS = ("pth", "npz")
"""Measured besides timm: the formats that are not written by the safetensors streamer."""


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _worker(side: str, run: str, out: str) -> None:
    """Run one side in this (fresh) process and print {"seconds", "peak_mib"} as the last line."""
    import torch  # noqa: F401  (imported before timing by every side)

    import pretrain.export as export

    t0 = time.perf_counter()
    if side in export.FORMATS:
        export.export_checkpoint(run, out, side, head="keep")
    elif side == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        t0 = time.perf_counter()  # DeepSpeed's import time is not counted against it
        sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(run) / "checkpoints"))
        assert sd
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mib": _peak_mib()}))


def _measure(side: str, run: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_export", "--worker", side, str(run), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _make_checkpoint(run: Path, model: str, stage: int) -> None:
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), str(HELPER), str(run)]
    cmd += ["--stage", str(stage), "--model", model, "--num-classes", "1000", "--steps", "1", "--micro-batch", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"checkpoint creation failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def run(quick: bool = True) -> dict:
    """Measure both sides on each checkpoint.

    Returns:
        {"ours", "baseline", "ratio", "units", "cases": [{model, stage, params_mib, ours, formats, deepspeed, idle}]}
        where `ours` is the timm export and `formats` maps pth / npz to their figures,
        and the headline figures are the peak memory (MiB) of the last (largest-stage) case and ratio is
        DeepSpeed's peak over ours.
    """
    model = "vit_small_patch16" if quick else "vit_base_patch16"
    stages = [3] if quick else [2, 3]
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            run_dir = Path(tmp) / f"run{stage}"
            _make_checkpoint(run_dir, model, stage)
            files = sorted((run_dir / "checkpoints").glob("step_*/*.pt"))
            for f in files:  # warm the page cache for both sides
                f.read_bytes()
            case = {"model": model, "stage": stage, "ckpt_mib": round(sum(f.stat().st_size for f in files) / 2**20)}
            case["idle"] = _measure("idle", run_dir, Path(tmp) / "idle")
            case["deepspeed"] = _measure("deepspeed", run_dir, Path(tmp) / "ds")
            case["ours"] = _measure("timm", run_dir, Path(tmp) / f"out{stage}")
            case["formats"] = {f: _measure(f, run_dir, Path(tmp) / f"{f}{stage}") for f in PLAIN_FORMATS}
            case["params_mib"] = round((Path(tmp) / f"out{stage}" / "model.safetensors").stat().st_size / 2**20)
            cases.append(case)
    last = cases[-1]
    return {
        "ours": round(last["ours"]["peak_mib"]),
        "baseline": round(last["deepspeed"]["peak_mib"]),
        "ratio": round(last["deepspeed"]["peak_mib"] / last["ours"]["peak_mib"], 2),
        "units": "peak MiB",
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    """Print one line per case, the figures as JSON, the ratio last."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="vit_base_patch16 at ZeRO 2 and 3 instead of vit_small at 3")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "RUN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    r = run(quick=not args.full)
    for c in r["cases"]:
        o, d, i = c["ours"], c["deepspeed"], c["idle"]
        print(
            f"{c['model']} ZeRO-{c['stage']} (2 ranks, checkpoint {c['ckpt_mib']} MiB, fp32 weights "
            f"{c['params_mib']} MiB): peak ours {o['peak_mib']:.0f} MiB / {o['seconds']:.2f} s, deepspeed "
            f"{d['peak_mib']:.0f} MiB / {d['seconds']:.2f} s, idle process {i['peak_mib']:.0f} MiB; "
            + ", ".join(f"{f} {m['peak_mib']:.0f} MiB / {m['seconds']:.2f} s" for f, m in c["formats"].items())
        )
    print_ratio(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

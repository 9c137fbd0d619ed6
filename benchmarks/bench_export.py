"""Export memory and time: `pretrain.export` against DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`, eager
and in its `lazy_mode=True`.

Writes a real bf16 ZeRO checkpoint with 2 CPU ranks (tests/helpers/make_ds_checkpoint.py: one AdamW step, then a
save exactly as the training loop does), then runs each side in its own fresh process on the same tag folder. Each
side first imports what it needs, then resets the process's peak resident memory (`5` into /proc/self/clear_refs),
runs, and reports its time, its peak (VmHWM), that peak above the resident memory it had after its imports, and the
peaks of the anonymous and the file-backed (memory-mapped) parts of it (`_Meter`):

- ours (`timm`): `export_checkpoint(..., format="timm")`: rebuild the fp32 weights one at a time from the shards and
  stream them into model.safetensors; the same for the plain formats `pth` and `npz`;
- `deepspeed-lazy`: `get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)`, then each tensor materialised
  (`.contiguous()`) one at a time and streamed into model.safetensors by the same writer as ours
  (`write_safetensors`): the like-for-like alternative to our reader (its file is compared with ours, tensor by
  tensor, for bit identity);
- `deepspeed`: the eager call: the whole fp32 state dict in memory (it writes nothing);
- idle: a process that only imports torch and pretrain.export.

The checkpoint files are read once before timing so every side reads from the page cache. Quick: vit_small_patch16
(22 M parameters) at ZeRO 3; `--full`: vit_base_patch16 (86 M) at ZeRO 2 and 3; `--model`, `--stage` pick one case,
`--run-dir` keeps (or reuses) the checkpoint there.

    python -m benchmarks.bench_export [--full | --model vit_base_patch16 --stage 3] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.machine import print_ratio
from pretrain.export.base import WEIGHTS
from pretrain.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"
PLAIN_FORMATS = ("pth", "npz")
"""Measured besides timm: the formats that are not written by the safetensors streamer."""


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


class _Meter:
    """The resident memory of the work done inside it, above what the process held when it began (after its
    imports): the peak (VmHWM, reset at the start by writing 5 to /proc/self/clear_refs) and, sampled every 5 ms by
    a thread, the peaks of its two parts: anonymous memory (RssAnon: tensors, heap) and file-backed pages
    (RssFile: memory-mapped files, such as shards opened with `torch.load(mmap=True)`)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __enter__(self) -> _Meter:
        self.base = {f: _status_mib(f) for f in self.FIELDS}
        self.max = dict(self.base)
        Path("/proc/self/clear_refs").write_text("5")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        for f in self.FIELDS[1:]:
            self.max[f] = max(self.max[f], _status_mib(f))

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict:
        """{"seconds", "peak_mib", "import_mib", "above_import_mib", "anon_above_import_mib",
        "file_above_import_mib"}."""
        peak = _status_mib("VmHWM")
        return {
            "seconds": self.seconds,
            "peak_mib": peak,
            "import_mib": self.base["VmRSS"],
            "above_import_mib": peak - self.base["VmRSS"],
            "anon_above_import_mib": self.max["RssAnon"] - self.base["RssAnon"],
            "file_above_import_mib": self.max["RssFile"] - self.base["RssFile"],
        }


def _lazy_deepspeed(get_state_dict: Callable, run: str, out: str) -> None:
    """DeepSpeed's lazy state dict streamed into model.safetensors one materialised tensor at a time, as ours."""
    from pretrain.export.safetensors_stream import write_safetensors

    sd = get_state_dict(str(Path(run) / "checkpoints"), lazy_mode=True)
    plan = {k: (torch.Size(v.shape), v.dtype) for k, v in sd.items()}

    def one_at_a_time() -> Iterator[tuple[str, torch.Tensor]]:
        for name in list(sd):
            yield name, sd.pop(name).contiguous()  # a ZeRO-3 GatheredTensor becomes a tensor here, and only here

    Path(out).mkdir(parents=True)
    write_safetensors(Path(out) / WEIGHTS, plan, one_at_a_time(), {"format": "pt"})


def _worker(side: str, run: str, out: str) -> None:
    """Run one side in this (fresh) process, its imports before the meter; print `_Meter.result()` as JSON last."""
    import pretrain.export as export

    if side.startswith("deepspeed"):  # DeepSpeed's import counts neither in time nor in memory
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with _Meter() as meter:
        if side == "deepspeed-lazy":
            _lazy_deepspeed(get_fp32_state_dict_from_zero_checkpoint, run, out)
        elif side == "deepspeed":
            assert get_fp32_state_dict_from_zero_checkpoint(str(Path(run) / "checkpoints"))
        elif side in export.FORMATS:
            export.export_checkpoint(run, out, side, head="keep")
        elif side != "idle":
            raise ValueError(f"unknown side {side!r}")
    print(json.dumps(meter.result()))


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same names and bit-identical tensors (read one tensor at a time)."""
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        names = list(fa.keys())
        if sorted(names) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in names)


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


def _case(tmp: Path, run_dir: Path, model: str, stage: int) -> dict:
    """Every side on one checkpoint (made in `run_dir` unless one is there already)."""
    if not (run_dir / "checkpoints" / "latest").is_file():
        _make_checkpoint(run_dir, model, stage)
    files = sorted((run_dir / "checkpoints").glob("step_*/*.pt"))
    for f in files:  # warm the page cache for every side
        f.read_bytes()
    case = {"model": model, "stage": stage, "ckpt_mib": round(sum(f.stat().st_size for f in files) / 2**20)}
    case["idle"] = _measure("idle", run_dir, tmp / "idle")
    case["deepspeed"] = _measure("deepspeed", run_dir, tmp / "ds")
    case["ours"] = _measure("timm", run_dir, tmp / f"out{stage}")
    case["deepspeed_lazy"] = _measure("deepspeed-lazy", run_dir, tmp / f"lazy{stage}")
    case["lazy_identical"] = _same_tensors(tmp / f"out{stage}" / WEIGHTS, tmp / f"lazy{stage}" / WEIGHTS)
    case["formats"] = {f: _measure(f, run_dir, tmp / f"{f}{stage}") for f in PLAIN_FORMATS}
    case["params_mib"] = round((tmp / f"out{stage}" / WEIGHTS).stat().st_size / 2**20)
    return case


def run(quick: bool = True, model: str | None = None, stage: int | None = None, run_dir: Path | None = None) -> dict:
    """Measure every side on each checkpoint.

    Args:
        quick: vit_small_patch16 at ZeRO 3; else vit_base_patch16 at ZeRO 2 and 3.
        model, stage: measure this one case instead.
        run_dir: keep the checkpoints there (`MODEL_zeroSTAGE/`), reusing any already made.

    Returns:
        {"ours", "baseline", "ratio", "units", "lazy_ratio", "cases": [{model, stage, ckpt_mib, params_mib, idle,
        ours, deepspeed, deepspeed_lazy, lazy_identical, formats}]}: `ours` is the timm export, `formats` maps pth /
        npz to theirs; the headline figures are the peak memory (MiB) of the last case, `ratio` is DeepSpeed's
        (eager) peak over ours, `lazy_ratio` its lazy mode's memory above its imports over ours.
    """
    model = model or ("vit_small_patch16" if quick else "vit_base_patch16")
    stages = [stage] if stage else [3] if quick else [2, 3]
    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(run_dir) if run_dir else Path(tmp)
        cases = [_case(Path(tmp), keep / f"{model}_zero{s}", model, s) for s in stages]
    last = cases[-1]
    return {
        "ours": round(last["ours"]["peak_mib"]),
        "baseline": round(last["deepspeed"]["peak_mib"]),
        "ratio": round(last["deepspeed"]["peak_mib"] / last["ours"]["peak_mib"], 2),
        "units": "peak MiB",
        "lazy_ratio": round(last["deepspeed_lazy"]["above_import_mib"] / last["ours"]["above_import_mib"], 1),
        "cases": cases,
    }


def _line(name: str, m: dict) -> str:
    return (
        f"{name} {m['peak_mib']:.0f} MiB ({m['above_import_mib']:.0f} above its imports: anonymous "
        f"{m['anon_above_import_mib']:.0f}, file-backed {m['file_above_import_mib']:.0f}) / {m['seconds']:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Print one line per case, the figures as JSON, the ratio last."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="vit_base_patch16 at ZeRO 2 and 3 instead of vit_small at 3")
    p.add_argument("--model", help="measure this model only (with --stage)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="measure this ZeRO stage only")
    p.add_argument("--run-dir", type=Path, help="keep the checkpoints here and reuse them on the next run")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "RUN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    r = run(quick=not args.full, model=args.model, stage=args.stage, run_dir=args.run_dir)
    for c in r["cases"]:
        sides = [("ours", c["ours"]), ("deepspeed-lazy", c["deepspeed_lazy"]), ("deepspeed", c["deepspeed"])]
        sides += [(f, m) for f, m in c["formats"].items()]
        print(
            f"{c['model']} ZeRO-{c['stage']} (2 ranks, checkpoint {c['ckpt_mib']} MiB, fp32 weights "
            f"{c['params_mib']} MiB; idle process {c['idle']['peak_mib']:.0f} MiB): "
            + ", ".join(_line(n, m) for n, m in sides)
            + f"; lazy file bit-identical to ours: {c['lazy_identical']}"
        )
    print(f"deepspeed lazy_mode memory above its imports / ours: {r['lazy_ratio']}x")
    print_ratio(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

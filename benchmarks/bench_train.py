"""Training-step benchmark.

1. This project's ViT against timm's `VisionTransformer` of the same shape, in the same plain PyTorch loop
   (AdamW, bf16 autocast, same data), interleaved in one process: seconds per step and the ratio ours / timm
   (target <= 1.0). With and without gradient checkpointing: time and peak-memory ratios. Regional torch.compile of
   the blocks (`train.compile`) against eager in the same loop: the step-time ratio compiled / eager.
2. Per-rank memory of the model states under ZeRO 1, 2 and 3 on 2 CPU ranks (DeepSpeed, bf16), measured as the
   bytes of every live tensor on the rank after a step, against the ZeRO paper's 16-bytes-per-parameter
   accounting (2 bf16 weights + 2 bf16 grads + 12 fp32 master/momentum/variance, divided by ZeRO's stage).

    python -m benchmarks.bench_train [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def _step_time(model, x, y, opt, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour


def ours_vs_timm(quick: bool) -> dict:
    import timm

    from pretrain.models.vit import create_vit

    depth, batch, rounds = (4, 16, 3) if quick else (12, 32, 5)
    torch.manual_seed(0)
    ours = create_vit("vit_small_patch16", num_classes=100, depth=depth)
    theirs = timm.create_model("vit_small_patch16_224", num_classes=100, depth=depth)
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)}
    for m in (ours, theirs):  # warm-up
        _step_time(m, x, y, opts[m], 1)
    a, b = _best_interleaved(ours, theirs, x, y, opts, rounds)
    return {
        "model": f"vit_small_patch16 depth {depth}",
        "batch": batch,
        "ours_s_per_step": a,
        "timm_s_per_step": b,
        "ratio": a / b,
    }


def _best_interleaved(m1, m2, x, y, opts, rounds: int) -> tuple[float, float]:
    """Best seconds per step of each model over `rounds` rounds, interleaved so that drift in machine load hits both
    alike."""
    t1, t2 = [], []
    for _ in range(rounds):
        t1.append(_step_time(m1, x, y, opts[m1], 2))
        t2.append(_step_time(m2, x, y, opts[m2], 2))
    return min(t1), min(t2)


def compiled_vs_eager(quick: bool) -> dict:
    """Regional torch.compile of the blocks (`train.compile`, `pretrain.train.compile.compile_blocks`) against eager:
    the same model weights, the same loop as `ours_vs_timm`, interleaved rounds, best of each."""
    from pretrain.models.vit import create_vit
    from pretrain.train.compile import compile_blocks

    depth, batch, rounds = (4, 16, 3) if quick else (12, 32, 5)
    torch.manual_seed(0)
    eager = create_vit("vit_small_patch16", num_classes=100, depth=depth)
    compiled = create_vit("vit_small_patch16", num_classes=100, depth=depth)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, zero_stage=0)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)}
    t = time.perf_counter()
    _step_time(compiled, x, y, opts[compiled], 2)  # compiles forward and backward graphs
    compile_s = time.perf_counter() - t
    _step_time(eager, x, y, opts[eager], 1)
    a, b = _best_interleaved(compiled, eager, x, y, opts, rounds)
    return {
        "model": f"vit_small_patch16 depth {depth}",
        "batch": batch,
        "compiled_s_per_step": a,
        "eager_s_per_step": b,
        "ratio": a / b,
        "compile_s": compile_s,
    }


_CKPT_SCRIPT = """
import re, sys, time, torch
from pretrain.models.vit import create_vit
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
torch.manual_seed(0)
m = create_vit("vit_small_patch16", num_classes=100, depth=int(sys.argv[2]))
m.set_grad_checkpointing(sys.argv[1] == "on")
x, y = torch.randn(int(sys.argv[3]), 3, 224, 224), torch.randint(0, 100, (int(sys.argv[3]),))
base = hwm()
t = time.perf_counter()
torch.nn.functional.cross_entropy(m(x), y).backward()
print(time.perf_counter() - t, hwm() - base)
"""


def checkpointing(quick: bool) -> dict:
    """Forward+backward with and without gradient checkpointing, each in a fresh process (peak RSS growth)."""
    depth, batch = (4, 16) if quick else (12, 32)
    res = {}
    for mode in ("off", "on"):
        out = subprocess.run(
            [sys.executable, "-c", _CKPT_SCRIPT, mode, str(depth), str(batch)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        secs, mib = map(float, out.stdout.split()[-2:])
        res[mode] = {"s": secs, "peak_mib": mib}
    return {
        "time_ratio": res["on"]["s"] / res["off"]["s"],
        "memory_ratio": res["on"]["peak_mib"] / res["off"]["peak_mib"],
        **{f"{k}_{m}": v for m, d in res.items() for k, v in d.items()},
    }


def zero_memory(quick: bool) -> list[dict]:
    """Launch benchmarks/_zero_memory.py on 2 CPU ranks per stage; it prints each rank's live tensor bytes."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    rows = []
    for stage in (1, 2, 3):
        port = free_port()
        cmd = [
            deepspeed,
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            str(ROOT / "benchmarks" / "_zero_memory.py"),
            "--stage",
            str(stage),
            "--depth",
            "2" if quick else "12",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        found = [json.loads(m) for m in re.findall(r"ZEROMEM (\{[^{}]*\})", proc.stdout)]
        if proc.returncode or len(found) != 2:
            raise RuntimeError(f"ZeRO-{stage} memory run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        measured = max(f["bytes"] for f in found)
        n, world = found[0]["params"], found[0]["world"]
        model_states = {1: 4 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage] * n  # ZeRO paper, eq. in sec. 5
        rows.append(
            {
                "stage": stage,
                "params": n,
                "per_rank_mib": measured / 2**20,
                "accounting_mib": model_states / 2**20,
                "no_zero_mib": 16 * n / 2**20,
                "ratio": measured / model_states,
            }
        )
    return rows


def run(quick: bool = True) -> dict:
    return {
        "step": ours_vs_timm(quick),
        "compile": compiled_vs_eager(quick),
        "checkpointing": checkpointing(quick),
        "zero": zero_memory(quick),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="full-depth ViT-S/16 and bigger batches (minutes)")
    args = p.parse_args(argv)
    res = run(quick=not args.full)
    for r in res["zero"]:
        print(
            f"ZeRO-{r['stage']}: {r['per_rank_mib']:.1f} MiB per rank measured, {r['accounting_mib']:.1f} MiB by the "
            f"16 B/param accounting (no ZeRO: {r['no_zero_mib']:.1f}), ratio {r['ratio']:.2f}"
        )
    c = res["checkpointing"]
    print(f"gradient checkpointing: time x{c['time_ratio']:.2f}, peak memory x{c['memory_ratio']:.2f}")
    s = res["step"]
    print(
        f"train step ({s['model']}, batch {s['batch']}): ours {s['ours_s_per_step'] * 1e3:.0f} ms, "
        f"timm {s['timm_s_per_step'] * 1e3:.0f} ms"
    )
    print(f"ratio ours/timm: {s['ratio']:.3f}")
    k = res["compile"]
    print(
        f"regional compile ({k['model']}, batch {k['batch']}): compiled {k['compiled_s_per_step'] * 1e3:.0f} ms, "
        f"eager {k['eager_s_per_step'] * 1e3:.0f} ms, ratio {k['ratio']:.3f} (compiling took {k['compile_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

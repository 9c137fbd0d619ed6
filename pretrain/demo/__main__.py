"""`make demo`: the whole pipeline on a real dataset that ships with scikit-learn, on this machine's CPU.

1. `data_tools digits` + `data_tools shard`: 1,797 handwritten digits -> WebDataset shards with a held-out split.
2. `python -m pretrain.launch --nproc-per-node 2` with configs/tiny_digits.yaml (ZeRO-2, bf16, gradient
   checkpointing), interrupted half-way on purpose (SIGTERM to the launcher), then resumed from its checkpoint.
3. Prints the held-out top-1 of the finished run (10 classes: chance is 10%).
4. Exports the run for timm, torchvision and transformers and checks their outputs equal ours.
5. Fine-tunes the exported backbone with accelerate, against the same model trained from scratch.
6. Few-shot linear accuracy of the pretrained backbone against the same architecture at initialisation.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_tools.digits import write_digits
from data_tools.extras import MissingExtra, require
from data_tools.shard import shard
from data_tools.summary import format_summary
from pretrain import exit_codes
from pretrain.checkpoint_format import newest_complete
from pretrain.demo.downstream import check_libraries, finetune_compare
from pretrain.demo.fewshot import fewshot_step
from pretrain.launch import wait_group_gone
from pretrain.train.plot import plot, read_metrics

CONFIG = "configs/tiny_digits.yaml"
DEMO_LIBRARIES = [
    ("sklearn", "scikit-learn"),
    ("deepspeed", None),
    ("matplotlib", None),
    ("timm", None),
    ("transformers", None),
    ("accelerate", None),
]
"""(module, its name on PyPI when not the module's) of every library the demo's stages use."""
TARGET_TOP1 = 0.80


def launch(out: Path, shards: Path, steps: int, stop_at: int | None = None) -> int:
    """Run training on 2 CPU ranks; with `stop_at`, interrupt the launcher once that step's checkpoint exists.

    `python -m pretrain.launch` takes a free rendezvous port of its own and returns only once its ranks have saved
    and exited; this then waits until every process of the launch (loader workers too) is gone, so the next launch
    never meets one still holding a port or a file.
    """
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", "2", "--", "--config", CONFIG]
    cmd += [f"run.output_dir={out}", f"data.train_shards={shards}", f"data.val_shards={shards}", f"train.steps={steps}"]
    cmd += [f"fewshot.sets=digits={shards}"]  # few-shot curves: shots from the train split, test on val
    with open(out.parent / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        interrupted = False
        for line in proc.stdout:
            if line.startswith(("train step", "eval step", "fewshot step", "resumed from", "preempted at", "error:")):
                print("   ", line.rstrip(), flush=True)
            if stop_at and not interrupted and (newest_complete(out / "checkpoints") or "") >= f"step_{stop_at:08d}":
                print(f"    -- interrupting the run after its step-{stop_at} checkpoint (SIGTERM) --", flush=True)
                proc.send_signal(signal.SIGTERM)  # the launcher passes it to every rank: they save and exit 75
                interrupted = True
        rc = proc.wait()
    if not wait_group_gone(proc.pid):
        print("    (processes of the launch outlived it by 2 minutes and were killed)", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pretrain.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=60)
    args = p.parse_args(argv)
    try:  # the `demo` extra: every stage's libraries, checked before the first stage
        for module, package in DEMO_LIBRARIES:
            require(module, package)
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    out = args.out
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    (out / "train.log").unlink(missing_ok=True)

    print("1. data_tools: digits -> image folder -> WebDataset shards", flush=True)
    digits = write_digits(out / "digits")
    shards = out / "digits-shards"
    summary = shard(digits, shards, workers=2, samples_per_shard=200, val_fraction=0.15, seed=0, progress=False)
    print("   " + format_summary(summary).replace("\n", "\n   "), flush=True)

    half = args.steps // 2
    print(f"2. pretrain on 2 CPU ranks (ZeRO-2, bf16, checkpointing), {args.steps} steps, interrupted at {half}")
    rc = launch(run, shards, args.steps, stop_at=half)
    if rc not in (exit_codes.OK, exit_codes.PREEMPTED):
        print(f"error: training failed (exit code {rc}); see {out / 'train.log'}", file=sys.stderr)
        return 1
    print("   resuming from the newest complete checkpoint (train.resume=auto)", flush=True)
    rc = launch(run, shards, args.steps)
    if rc != 0:
        print(f"error: training failed (exit code {rc}); see {out / 'train.log'}", file=sys.stderr)
        return 1

    _, evals = read_metrics(run)
    top1 = evals[-1]["top1"]
    png = plot(run, run / "curves.png")
    print(f"3. held-out top-1 after {args.steps} steps: {top1:.1%} on {evals[-1]['samples']} images (chance 10%)")
    print(f"   curves: {png}; metrics: {run / 'metrics.jsonl'}; checkpoints: {run / 'checkpoints'}")
    if top1 < TARGET_TOP1:
        print(f"error: top-1 {top1:.1%} is below the demo's target of {TARGET_TOP1:.0%}", file=sys.stderr)
        return 1

    print("4. export -> timm, torchvision, transformers: max |logit difference| against this project's model")
    diffs = check_libraries(run, out / "exports", digits)
    print("   " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
    if max(diffs.values()) > 1e-4:
        print("error: an exported model disagrees with ours by more than 1e-4", file=sys.stderr)
        return 1

    print(f"5. fine-tune with accelerate ({args.finetune_steps} steps): exported backbone vs the same model, scratch")
    res = finetune_compare(run, out / "exports", shards, args.finetune_steps)
    print(f"   held-out top-1: fine-tuned {res['finetuned']:.1%}, from scratch {res['scratch']:.1%}")
    if not fewshot_step(run, out / "exports", shards):  # 6. pretrained vs initialisation, few-shot
        return 1
    print(f"   demo took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

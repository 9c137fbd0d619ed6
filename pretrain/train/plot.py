"""Draw a run's loss, learning-rate and throughput curves to a PNG: `vit-plot RUN_DIR [--out F]` (or
`python -m pretrain.train.plot`; matplotlib comes with the `train` extra)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.extras import MissingExtra, require


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Train and eval rows of `metrics.jsonl`; a step logged twice (before a crash and after resume) keeps the last."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for r in rows:
        by_kind.setdefault(r["kind"], {})[r["step"]] = r
    return [by_kind["train"][s] for s in sorted(by_kind["train"])], [
        by_kind["eval"][s] for s in sorted(by_kind["eval"])
    ]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(steps, [r["images_per_s"] for r in train])
    axes[2].set(title="throughput (images/s, all ranks)", xlabel="step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        require("matplotlib")  # the `train` extra
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir} has no metrics.jsonl; pass the run.output_dir of a training run", file=sys.stderr)
        return 2
    out = plot(args.run_dir, args.out or args.run_dir / "curves.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

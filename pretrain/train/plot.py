"""Draw a run's loss, learning-rate, throughput and few-shot accuracy curves to a PNG: `vit-plot RUN_DIR [--out F]`
(or `python -m pretrain.train.plot`; matplotlib comes with the `train` extra)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.extras import MissingExtra, require


def read_rows(run_dir: Path, kind: str) -> list[dict]:
    """Rows of one kind (`train`, `eval`, `fewshot`) of `metrics.jsonl` by step; a step logged twice (before a crash
    and after resume) keeps the last."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if r["kind"] == kind}
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Train and eval rows of `metrics.jsonl` (`read_rows`)."""
    return read_rows(run_dir, "train"), read_rows(run_dir, "eval")


def plot_fewshot(ax, rows: list[dict]) -> None:
    """Few-shot accuracy curves: one line per `<set>/<k>shot`."""
    for key in sorted({k for r in rows for k in r if k.endswith("shot")}, key=lambda k: (k.split("/")[0], len(k), k)):
        have = [r for r in rows if key in r]
        ax.plot([r["step"] for r in have], [100 * r[key] for r in have], "o-", label=key)
    ax.set(title="few-shot linear accuracy (%)", xlabel="step")
    ax.legend(fontsize="small")


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    fewshot = read_rows(run_dir, "fewshot")
    fig, axes = plt.subplots(1, 4 if fewshot else 3, figsize=(20 if fewshot else 15, 4))
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
    if fewshot:
        plot_fewshot(axes[3], fewshot)
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

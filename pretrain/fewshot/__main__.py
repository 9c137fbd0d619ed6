"""Few-shot linear evaluation of any export (or a timm model with local weights) on downstream sets.

    python -m pretrain.fewshot --weights exports/b16 --data cifar100=/data/c100-wds --data pets=/data/pets-wds
    python -m pretrain.fewshot --timm vit_base_patch16_224.augreg_in21k --weights ~/w/model.safetensors --data ...

The same numbers as the training run's `fewshot/<set>/<k>shot` (`pretrain.fewshot.evaluate`): frozen features of
k drawn images per class, ridge regression to ±1 targets with the L2 weight chosen on held-out shots, accuracy on the
test split. Prints a table; `--json OUT` also writes every figure (chosen L2 weights, held-out accuracies).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data_tools.fsutil import atomic_write
from pretrain.config import ConfigError, FewshotConfig
from pretrain.downstream.backbone import BackboneError
from pretrain.fewshot.evaluate import FewShot, SetResult
from pretrain.fewshot.models import FeatureModel, load_feature_model, run_model
from pretrain.fewshot.spec import parse_set, parse_shots

DEFAULTS = FewshotConfig()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.fewshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="export folder, .pth / .npz file, or (with --timm) weights file")
    p.add_argument("--timm", metavar="NAME", help="a timm model name; --weights is then its local weights file")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SET",
        help="NAME=TRAIN[@SPLIT][|TEST[@SPLIT]] or a shard / image folder (repeat for several sets)",
    )
    p.add_argument("--shots", default=DEFAULTS.shots, help=f"shot counts (default {DEFAULTS.shots})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the k-shot draw")
    p.add_argument("--max-train-images", type=int, default=DEFAULTS.max_train_images, help="shot pool (0: all)")
    p.add_argument("--max-test-images", type=int, default=DEFAULTS.max_test_images, help="test images (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="decoding threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype of the forward")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def evaluate(fm: FeatureModel, setup: FewShot, a: argparse.Namespace) -> list[SetResult]:
    """Run `setup` on one model, with a progress bar per set unless `--no-progress`."""
    bars: dict[str, tqdm] = {}

    def progress(name: str, done: int, total: int) -> None:
        if a.no_progress:
            return
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=total, desc=f"few-shot {name}", unit="img"))
        bar.update(done - bar.n)

    try:
        return run_model(
            fm,
            setup,
            device=torch.device(a.device),
            batch_size=a.batch_size,
            workers=a.workers,
            bf16=a.precision == "bf16",
            progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()


def format_table(results: list[SetResult], shots: tuple[int, ...]) -> str:
    """Markdown table: one row per set, one column per shot count; then the chosen L2 weights."""
    lines = [
        "| set | classes | test images | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---|---|---|" + "---|" * len(shots),
    ]
    for r in results:
        cells = [f"{r.shots[k].accuracy:.1%}" + ("*" if r.short[k] else "") for k in shots]
        lines.append(f"| {r.name} | {r.num_classes} | {r.test_images} | " + " | ".join(cells) + " |")
    l2 = "; ".join(
        f"{r.name} " + ", ".join(f"{k}-shot 2^{math.log2(r.shots[k].alpha):g}" for k in shots) for r in results
    )
    lines.append(f"L2 weight (held-out shots; 1-shot fixed): {l2}")
    if any(any(r.short.values()) for r in results):
        lines.append("* some classes have fewer images than shots in the pool (--max-train-images)")
    return "\n".join(lines)


def as_json(results: list[SetResult], what: str) -> dict:
    return {
        "model": what,
        "sets": {
            r.name: {
                "classes": r.num_classes,
                "test_images": r.test_images,
                "train_images": r.train_images,
                "draw": r.draw_id,
                "shots": {
                    str(k): {
                        "accuracy": v.accuracy,
                        "l2": v.alpha,
                        "heldout": {str(a): x for a, x in v.heldout.items()},
                    }
                    for k, v in r.shots.items()
                },
            }
            for r in results
        },
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        shots = parse_shots(a.shots, "--shots")
        specs = [parse_set(d, "--data", default_name=Path(d.rstrip("/")).name or "set") for d in a.data]
        if a.batch_size < 1 or a.max_train_images < 0 or a.max_test_images < 0:
            raise ConfigError("--batch-size must be >= 1 and --max-train-images / --max-test-images >= 0")
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {a.device} but no GPU is visible; use --device cpu")
        fm = load_feature_model(a.weights, a.timm)
        setup = FewShot(
            specs, shots, seed=a.seed, max_train_images=a.max_train_images, max_test_images=a.max_test_images
        )
        results = evaluate(fm, setup, a)  # a multi-label set is refused here, on reading its labels
    except (ConfigError, BackboneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"few-shot linear accuracy of {a.weights}: {fm.what}")
    print(format_table(results, shots))
    if a.json:
        atomic_write(a.json, json.dumps(as_json(results, fm.what), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

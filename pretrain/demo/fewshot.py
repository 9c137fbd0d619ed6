"""The demo's few-shot step: the pretrained backbone against the same architecture at initialisation, by few-shot
linear accuracy on the digits' held-out split (`pretrain.fewshot`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain.downstream.backbone import load_backbone
from pretrain.export import export_checkpoint
from pretrain.fewshot.evaluate import FewShot
from pretrain.fewshot.models import from_vit, run_model
from pretrain.fewshot.spec import parse_set
from pretrain.models.vit import VisionTransformer

SHOTS = (1, 5, 10)
MIN_GAIN = 0.20
"""The pretrained backbone's 10-shot accuracy must beat initialisation by this much."""


def fewshot_compare(run: Path, exports: Path, shards: Path, seed: int = 0) -> dict[str, dict[int, float]]:
    """{"pretrained": {k: accuracy}, "init": {k: accuracy}} on the shards' train (shots) and val (test) splits."""
    export_checkpoint(run, exports / "fewshot", "timm", head="drop")
    bb = load_backbone(exports / "fewshot")
    torch.manual_seed(seed)  # the run's seed: its initial weights are drawn the same way
    init = VisionTransformer(bb.model.args)
    setup = FewShot([parse_set(f"digits={shards}")], SHOTS, seed=seed)
    out = {}
    for name, model in (("pretrained", bb.model), ("init", init)):
        fm = from_vit(model, bb.mean, bb.std, bb.crop_pct, bb.variant)
        (res,) = run_model(fm, setup, device=torch.device("cpu"), batch_size=64, workers=2)
        out[name] = {k: r.accuracy for k, r in res.shots.items()}
    return out


def fewshot_step(run: Path, exports: Path, shards: Path) -> bool:
    """The demo's step 6: print both models' few-shot accuracies; False (with an error line) when pretraining gains
    less than MIN_GAIN at 10 shots."""
    print("6. few-shot linear accuracy on the held-out digits (ridge on frozen features): pretrained vs initialisation")
    acc = fewshot_compare(run, exports, shards)
    for name, by_k in acc.items():
        print(f"   {name:>10}: " + ", ".join(f"{k}-shot {v:.1%}" for k, v in by_k.items()), flush=True)
    gain = acc["pretrained"][10] - acc["init"][10]
    if gain < MIN_GAIN:
        print(
            f"error: pretraining gains {gain:.1%} 10-shot accuracy over initialisation (< {MIN_GAIN:.0%})",
            file=sys.stderr,
        )
        return False
    return True

"""Top-5 classes of images under a fine-tuned (or exported with its head) model.

    vit-predict WEIGHTS_DIR IMAGE [IMAGE ...] [--top-k 5]          (or python -m pretrain.downstream.predict)

WEIGHTS_DIR is a folder in the timm layout (`vit-finetune --out`, or `vit-export --format timm` with its
head), a `pretrain.export --format pth|npz` folder, or a `.pth` / `.npz` file (`pretrain.downstream.backbone`).
Each image gets the evaluation transform of the input stream (shorter side resized to img_size / crop_pct, centre
crop, normalised with the weights' mean/std), and its top classes are printed with their probabilities:

    digit_7.png
      0.9731  7
      0.0102  1
      ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.data import EvalTransform, normalize
from pretrain.data.decode import BadSample
from pretrain.downstream.backbone import Backbone, BackboneError, load_backbone


class PredictError(ValueError):
    """Bad input; the message names the problem and the fix."""


def load_images(paths: list[str], img_size: int, crop_pct: float) -> torch.Tensor:
    """uint8 (N, 3, S, S) from image files, with the stream's evaluation transform. Raises PredictError."""
    transform = EvalTransform(img_size, crop_pct)
    out = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise PredictError(f"cannot read image {p} ({e.strerror or e}); check the path") from None
        try:
            out.append(transform(data))
        except (BadSample, RuntimeError, ValueError, OSError) as e:
            raise PredictError(
                f"{p} is not a readable image ({e}); pass JPEG, PNG, WebP, BMP, GIF or TIFF files"
            ) from None
    return torch.stack(out)  # (N, 3, S, S)


@torch.no_grad()
def predict(bb: Backbone, images: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image; `images` uint8 (N, 3, S, S)."""
    model = bb.model.eval()
    names = bb.class_names or [str(i) for i in range(model.args.num_classes)]
    probs = model(normalize(images, bb.mean, bb.std)).float().softmax(-1)  # (N, C)
    p, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (N, k) each
    return [
        [(names[j], float(q)) for q, j in zip(pi.tolist(), ji.tolist(), strict=True)]
        for pi, ji in zip(p, idx, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vit-predict", description="Top-5 classes of images.")
    ap.add_argument("weights", help="vit-finetune --out or vit-export folder, or a .pth / .npz file")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--top-k", type=int, default=5, help="classes printed per image")
    a = ap.parse_args(argv)
    try:
        if a.top_k < 1:
            raise PredictError("--top-k must be at least 1")
        bb = load_backbone(a.weights)
        if bb.model.args.num_classes <= 0:
            raise PredictError(f"{a.weights} is a backbone without a head; fine-tune it with `vit-finetune`")
        images = load_images(a.images, bb.model.args.img_size, bb.crop_pct)
    except (BackboneError, PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, top in zip(a.images, predict(bb, images, a.top_k), strict=True):
        print(path)
        for name, prob in top:
            print(f"  {prob:.4f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Small real datasets made offline from scikit-learn's bundled data, for the demo, tests and benchmarks.

- `write_digits`: the 1,797 handwritten digits (8x8 scans, 10 classes) as 32x32 RGB PNGs in class folders "0".."9".
- `write_photos`: realistic ImageNet-sized JPEGs (random crops of `load_sample_images`, re-encoded) in class folders.
Both write the folder atomically (temporary name, then rename), so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.errors import DataToolsError
from data_tools.extras import require
from data_tools.fsutil import atomic_path

DIGITS_COUNT = 1797
DIGITS_SIZE = 32


def _sklearn_datasets():
    require("sklearn", "scikit-learn")  # the `demo` extra; MissingExtra is a DataToolsError: one line, exit 2
    from sklearn import datasets

    return datasets


def _check_empty(out: Path, expected: int) -> bool:
    """True when `out` already holds `expected` files (a finished earlier run); error when it holds anything else."""
    if not out.exists():
        return False
    n = sum(len(files) for _, _, files in os.walk(out))
    if n == expected:
        return True
    if n or not out.is_dir():
        raise DataToolsError(f"OUT '{out}' exists and is not empty; pick a new folder")
    return False


def write_digits(out: str | os.PathLike) -> Path:
    """Write scikit-learn's handwritten digits as an image folder `out/<digit>/<index>.png` (32x32 RGB).

    Returns:
        `out` as a Path. An `out` already holding the 1,797 files is left as it is.
    """
    out = Path(out)
    if _check_empty(out, DIGITS_COUNT):
        return out
    digits = _sklearn_datasets().load_digits()
    # Scans hold 0..16 ink levels; scale to 0..255 and invert nothing: white strokes on black, as scanned.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    with atomic_path(out) as tmp:
        for label in range(10):
            (tmp / str(label)).mkdir(parents=True)
        for i, (img, label) in enumerate(zip(pixels, digits.target, strict=True)):
            im = Image.fromarray(img, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)
            im.convert("RGB").save(tmp / str(label) / f"{i:04d}.png", format="PNG")
    return out


def write_photos(
    out: str | os.PathLike,
    *,
    classes: int = 3,
    per_class: int = 10,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> Path:
    """Write realistic JPEG photos `out/class_<k>/<i>.jpg` cut from scikit-learn's two sample photographs.

    Each file is a random crop (random scale, position, mirror, landscape or portrait) resized to about `size`
    and re-encoded at a random JPEG quality, like ImageNet's typical 500x375 photos.

    Returns:
        `out` as a Path.
    """
    out = Path(out)
    if _check_empty(out, classes * per_class):
        return out
    photos = _sklearn_datasets().load_sample_images().images  # 2 x [427, 640, 3] uint8
    rng = np.random.default_rng(seed)
    with atomic_path(out) as tmp:
        for k in range(classes):
            folder = tmp / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                src = photos[(k + i) % len(photos)]
                h, w = src.shape[:2]
                ch = int(h * rng.uniform(0.5, 1.0))
                cw = min(w, int(ch * rng.choice([4 / 3, 3 / 4])))
                y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                im = Image.fromarray(src[y : y + ch, x : x + cw])
                if rng.random() < 0.5:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                target = size if cw >= ch else size[::-1]
                im = im.resize(target, Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
                (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    return out

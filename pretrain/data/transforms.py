"""Image transforms on uint8 tensors (in the loader workers) and batch helpers that run on the device.

Workers: decode -> Inception-style RandomResizedCrop (antialiased, on the uint8 tensor) -> horizontal flip ->
optional RandAugment; evaluation: resize the shorter side to img_size / crop_pct and centre crop, as one crop-resize.
All randomness comes from a `random.Random` the caller seeds per sample, so results do not depend on timing or on
which worker handles a sample. Device: `normalize`, `to_targets`, `mixup`.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torchvision.transforms import v2

from pretrain.data.decode import decode_crop, image_size, is_jpeg, scaled_size

RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of the Inception crop."""


def crop_params(w: int, h: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """Inception-style random crop box (top, left, height, width), as torchvision's RandomResizedCrop samples it."""
    area = w * h
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    # fallback: the largest centred box within the ratio range
    in_ratio = w / h
    if in_ratio < RATIO[0]:
        cw, ch = w, int(round(w / RATIO[0]))
    elif in_ratio > RATIO[1]:
        ch, cw = h, int(round(h * RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def draft_factor(crop_w: float, crop_h: float, out_size: int) -> int:
    """Largest JPEG draft reduction (8, 4, 2 or 1) that still leaves the crop at least `out_size` on each side."""
    for f in (8, 4, 2):
        if min(crop_w, crop_h) / f >= out_size:
            return f
    return 1


def resized_crop(img: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """Crop (3, H, W) uint8 and resize to (3, size, size) with antialiased bilinear, staying in uint8.

    Channels-last input takes torch's vectorised uint8 kernel: about 25% faster here than
    `torchvision.transforms.v2.functional.resized_crop` on the CHW tensor, with the same result.
    """
    crop = img[:, top : top + h, left : left + w].permute(1, 2, 0)[None].permute(0, 3, 1, 2)  # (1, 3, h, w)
    # Added on the HWC view, the batch dimension gets the stride of a whole image: a channels-last crop that is
    # already dense (the region decoder's) then passes as it is, and the kernel's output is channels-last too (a
    # plain img[None] gives that dimension a stride of 3: the output came out NCHW, and the batch copy transposed).
    crop = crop.contiguous(memory_format=torch.channels_last)
    if crop.is_cpu:
        return torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
    return _resize_rounded(crop, size)  # on the GPU (`data.decode=gpu`)


def _resize_rounded(crop: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (1, 3, h, w) -> (3, size, size) resized in float32 and rounded: CUDA has no uint8 antialiased kernel.

    Within 1 of the CPU's fixed-point uint8 kernel (tests/test_gpu_decode.py).
    """
    out = torch.nn.functional.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode_for_crop(data: bytes, w: int, h: int, box: tuple[float, float, float, float], size: int):
    """Decode the crop's pixels (reduced when the crop is much larger than `size`): the crop box mapped to decoded
    pixels, and only the part of the JPEG it needs (`decode_crop`); returns the image and the box within it."""
    top, left, ch, cw = box
    reduce = draft_factor(cw, ch, size) if is_jpeg(data) else 1
    if reduce > 1:  # draft mode: the box in the pixels of the 1/reduce image
        dw, dh = scaled_size(w, h, reduce)
        sy, sx = dh / h, dw / w
        top, left, ch, cw = top * sy, left * sx, max(1.0, ch * sy), max(1.0, cw * sx)
    return decode_crop(data, (int(top), int(left), max(1, int(round(ch))), max(1, int(round(cw)))), reduce)


class TrainTransform:
    """Raw image bytes -> augmented uint8 (3, S, S): random resized crop, flip, optional RandAugment (ra_ops > 0);
    the settings are `DataConfig`'s (crop_scale_min, hflip, randaugment_ops, randaugment_magnitude)."""

    def __init__(self, img_size: int, scale_min: float, hflip: bool, ra_ops: int = 0, ra_mag: int = 0):
        self.size, self.scale, self.hflip = img_size, (scale_min, 1.0), hflip
        self.randaugment = v2.RandAugment(num_ops=ra_ops, magnitude=ra_mag) if ra_ops > 0 else None

    def draw(self, w: int, h: int, rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box (top, left, height, width) of a w x h image and the flip, drawn from `rng` in this order.

        The one home of the draws: the CPU path and `data.decode=gpu` (`gpu_decode.DeferredTrainTransform`) both
        call it, so both pick the same crop and flip for a sample.
        """
        box = crop_params(w, h, self.scale, rng)
        return box, self.hflip and rng.random() < 0.5

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        w, h = image_size(data)
        box, flip = self.draw(w, h, rng)
        img, (top, left, ch, cw) = _decode_for_crop(data, w, h, box, self.size)
        out = resized_crop(img, top, left, ch, cw, self.size)
        if flip:
            out = out.flip(-1)
        if self.randaugment is not None:
            # RandAugment draws from torch's global RNG: fork it so the caller's RNG is untouched, seed per sample
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                out = self.randaugment(out)
        return out


class EvalTransform:
    """Raw image bytes -> uint8 (3, S, S): shorter side resized to S / crop_pct, centre crop S (one crop-resize);
    crop_pct is `DataConfig.eval_crop_pct`."""

    def __init__(self, img_size: int, crop_pct: float):
        self.size, self.crop_pct = img_size, crop_pct

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        w, h = image_size(data)
        resized_short = self.size / self.crop_pct
        side = min(w, h) * self.size / resized_short  # the centre crop's side in source pixels
        box = ((h - side) / 2, (w - side) / 2, side, side)
        img, (top, left, ch, cw) = _decode_for_crop(data, w, h, box, self.size)
        return resized_crop(img, top, left, ch, cw, self.size)


# ----------------------------------------------------------------------------------------------- on the device


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> `dtype` ((x / 255 - mean) / std), computed in float32 on its device."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return images.to(torch.float32).sub_(m).div_(s).to(dtype)


def to_targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Labels -> float targets (B, C) for the sigmoid loss (or mixup).

    Args:
        labels: int64 (B,) class indices -> one-hot; or int64 (B, K) padded with -1 -> multi-hot.
        num_classes: C.
        dtype: output dtype.
    """
    if labels.dim() == 1:
        labels = labels[:, None]
    out = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device, dtype=dtype)
    # padding (-1) goes to an extra column that is dropped afterwards
    out.scatter_(1, torch.where(labels < 0, num_classes, labels), 1.0)
    return out[:, :num_classes]


def mixup(
    images: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al.) with the batch reversed: x = lam * x + (1 - lam) * x.flip(0), same for the targets.

    Args:
        images: float (B, 3, H, W), already normalised.
        targets: float (B, C) targets (see `to_targets`).
        alpha: Beta(alpha, alpha) parameter; <= 0 returns the inputs unchanged with lam = 1.
        generator: a CPU torch.Generator (part of the training RNG state, so resume reproduces lam).

    Returns:
        (mixed images, mixed targets, lam).
    """
    if alpha <= 0:
        return images, targets, 1.0
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    mixed = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    mixed_t = targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
    return mixed, mixed_t, lam

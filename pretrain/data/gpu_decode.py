"""`data.decode=gpu`: the workers hand over JPEG bytes and crop parameters; the main process decodes on the GPU.

At ImageNet-21k rates (about 4.7k img/s per H100 for ViT-B/16) JPEG decoding needs 11-19 CPU cores per GPU; with
`data.decode=gpu` the workers only read each JPEG's header, draw its crop box and flip with the CPU path's own rule
(`TrainTransform.draw`, same RNG, same order), and pass on the bytes:

    worker (DeferredTrainTransform)   JPEG: header size -> crop box + flip -> `JpegCrop`; others: decoded and
                                      transformed as on the CPU path (finished uint8 images)
    worker (stream.TrainStream.part)  `pack_jpegs`: the part's JPEG bytes in one uint8 tensor + offsets, boxes, flips
    main process (DeviceBatches)      one batched `decode_jpeg(..., device="cuda")` (nvJPEG), then per image the
                                      crop + antialiased resize (`resized_crop`) + flip on the device; an image the
                                      GPU cannot decode is decoded on the CPU (`decode_rgb`) and moved there

The JPEGs are decoded at full size (nvJPEG has no draft mode), so for crops much larger than `img_size` the result
is the full-resolution resize, not the CPU path's 1/2-1/8 draft decode. The decoder is injectable: tests pass
`decode_jpeg(..., device="cpu")`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pretrain.config import ConfigError
from pretrain.data.decode import BadSample, decode_rgb, image_size, is_jpeg
from pretrain.data.transforms import TrainTransform, resized_crop

log = logging.getLogger("pretrain.data")

Decoder = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]
"""Encoded JPEGs (1-D uint8 CPU tensors) -> decoded uint8 (3, H, W) tensors on the device; raises on a bad one."""


def require_cuda(decode: str) -> None:
    """Refuse `data.decode=gpu` where no CUDA device is visible (ConfigError: one line, exit 2)."""
    if decode == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu needs a CUDA device and none is visible; use data.decode=cpu")


class JpegCrop(NamedTuple):
    """A training JPEG left undecoded by a worker, with the crop and flip the CPU path would have applied."""

    data: bytes
    top: int
    left: int
    height: int
    width: int
    flip: bool


class DeferredTrainTransform(TrainTransform):
    """The workers' transform under `data.decode=gpu`: `JpegCrop` for JPEGs, a finished uint8 image for others.

    RandAugment needs the decoded image, so it is not offered here (the config refuses it with `gpu`).
    """

    def __init__(self, img_size: int, scale_min: float, hflip: bool):
        super().__init__(img_size, scale_min, hflip)

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor | JpegCrop:
        if not is_jpeg(data):
            return super().__call__(data, rng)
        w, h = image_size(data)  # a bad header is a bad sample here, as on the CPU path
        (top, left, ch, cw), flip = self.draw(w, h, rng)
        return JpegCrop(data, top, left, ch, cw, flip)


def pack_jpegs(items: list[tuple[int, JpegCrop]]) -> dict[str, torch.Tensor]:
    """`(row in batch, JpegCrop)` pairs -> the batch's "jpeg" entry: one tensor of bytes, so a batch crosses from
    the worker in a few shared-memory blocks rather than one per image.

    Returns:
        {"index": int64 (J,) rows, "data": uint8 (N,) all bytes, "offsets": int64 (J + 1,), "box": int64 (J, 4)
        top/left/height/width, "flip": bool (J,)}.
    """
    sizes = [len(c.data) for _, c in items]
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return {
        "index": torch.tensor([i for i, _ in items], dtype=torch.int64),
        "data": torch.frombuffer(bytearray(b"".join(c.data for _, c in items)), dtype=torch.uint8),
        "offsets": offsets,
        "box": torch.tensor([[c.top, c.left, c.height, c.width] for _, c in items], dtype=torch.int64),
        "flip": torch.tensor([c.flip for _, c in items], dtype=torch.bool),
    }


class DeviceBatches:
    """Main process under `data.decode=gpu`: a worker's batch -> its uint8 (B, 3, S, S) images on the device.

    Args:
        device: where the images go (and where the default decoder decodes).
        decoder: batched JPEG decoder; default torchvision's nvJPEG `decode_jpeg(..., device=device)`.
    """

    def __init__(self, device: torch.device | str, decoder: Decoder | None = None):
        self.device = torch.device(device)
        # CUDA-only line: nvJPEG batched decode (torchvision >= 0.19); tests inject a CPU decoder instead
        self.decoder = decoder or partial(decode_jpeg, mode=ImageReadMode.RGB, device=self.device)

    def __call__(self, batch: dict) -> int:
        """Replace `batch["image"]` by the device tensor, in place; returns how many samples no decoder could read.

        An unreadable sample is replaced by a copy of the batch's first readable one (image, label and key), so the
        batch keeps its size; the caller counts it as a bad sample.
        """
        cpu_images, jpeg = batch["image"], batch.pop("jpeg", None)
        if jpeg is None:
            batch["image"] = cpu_images.to(self.device, non_blocking=True)
            return 0
        b, _, s, _ = cpu_images.shape
        rows = jpeg["index"].tolist()
        if len(rows) < b:  # non-JPEG samples, already transformed by the workers
            images = cpu_images.to(self.device, non_blocking=True)
        else:
            shape = (b, 3, s, s)
            images = torch.empty(shape, dtype=torch.uint8, device=self.device, memory_format=torch.channels_last)
        at = jpeg["offsets"].tolist()
        datas = [jpeg["data"][at[j] : at[j + 1]] for j in range(len(rows))]  # 1-D views, one per JPEG
        bad = []
        for row, img, (top, left, h, w), flip in zip(
            rows, self._decode(datas), jpeg["box"].tolist(), jpeg["flip"].tolist(), strict=True
        ):
            if img is None:
                bad.append(row)
                continue
            out = resized_crop(img, top, left, h, w, s)  # (3, S, S)
            images[row] = out.flip(-1) if flip else out
        batch["image"] = images
        if bad:
            _replace(batch, bad)
        return len(bad)

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded images on the device, None where neither the device decoder nor the CPU could read one."""
        try:
            return list(self.decoder(datas))
        except Exception:  # noqa: BLE001 - one bad image fails the whole batched call: try them one by one
            pass
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(self.decoder([data])[0])
            except Exception:  # noqa: BLE001 - whatever the device decoder raises, the CPU decoder judges the image
                out.append(_cpu_decode(data, self.device))
        return out


def _cpu_decode(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The fallback: the CPU path's decoder at full size, moved to the device; None when the JPEG is corrupt."""
    try:
        return decode_rgb(data.numpy().tobytes()).to(device)
    except BadSample as e:
        log.warning("skipping bad sample: %s (decoded on neither GPU nor CPU)", e)
        return None


def _replace(batch: dict, bad: list[int]) -> None:
    """Overwrite the unreadable rows of a batch with its first readable sample."""
    good = next((i for i in range(len(batch["key"])) if i not in bad), None)
    if good is None:
        raise RuntimeError(f"no image of a batch could be decoded (keys {batch['key'][:3]}...); check the shards")
    for i in bad:
        batch["image"][i] = batch["image"][good]
        batch["label"][i] = batch["label"][good]
        batch["key"][i] = batch["key"][good]

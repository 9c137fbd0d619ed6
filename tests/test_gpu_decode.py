"""`data.decode=gpu` on CPU: the workers' crop parameters, the main-process batch assembly with a CPU stand-in for
nvJPEG, the fallbacks, and the refusals (no CUDA; RandAugment)."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data_tools.digits import write_photos
from data_tools.shard import shard
from pretrain.config import DataConfig
from pretrain.data import TrainTransform, build_train_loader
from pretrain.data.gpu_decode import DeferredTrainTransform, DeviceBatches, JpegCrop, pack_jpegs
from pretrain.data.transforms import _resize_rounded, draft_factor, resized_crop
from pretrain.train.__main__ import main

SIZE = 48  # crops of the 96x72 photos stay under 2 x SIZE a side: draft_factor is 1, the CPU path decodes full size
BATCH = 8
cpu_decoder = partial(decode_jpeg, mode=ImageReadMode.RGB, device="cpu")  # the stand-in for nvJPEG


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """24 small photos in 3 classes: mostly JPEG (one of them grayscale), every fourth one re-encoded as PNG."""
    root = tmp_path_factory.mktemp("gpu_decode")
    photos = write_photos(root / "photos", classes=3, per_class=8, size=(96, 72))
    for i, path in enumerate(sorted(photos.rglob("*.jpg"))):
        if i % 4 == 3:
            Image.open(path).save(path.with_suffix(".png"))
            path.unlink()
        elif i == 1:
            Image.open(path).convert("L").save(path, quality=90)
    shard(photos, root / "shards", workers=1, samples_per_shard=10, seed=0, progress=False)
    return root / "shards"


def _loader(shards: Path, decode: str, decoder=None):
    cfg = DataConfig(train_shards=str(shards), num_workers=0, shuffle_buffer=6, decode=decode)
    return build_train_loader(cfg, img_size=SIZE, batch_size=BATCH, seed=3, device="cpu", decoder=decoder)


def test_workers_hand_over_the_crops_and_flips_the_cpu_path_draws(mixed_shards, monkeypatch):
    drawn = []  # (box, flip) of every sample the CPU path transforms, in order
    draw = TrainTransform.draw

    def spy(self, w, h, rng):
        out = draw(self, w, h, rng)
        drawn.append(out)
        return out

    with monkeypatch.context() as m:
        m.setattr(TrainTransform, "draw", spy)
        it = iter(_loader(mixed_shards, "cpu"))
        cpu_keys = [next(it)["key"] for _ in range(2)]
    assert len(drawn) == 2 * BATCH

    handed = []  # what the gpu-mode workers hand over: the raw batches before the main process assembles them
    gpu = _loader(mixed_shards, "gpu", cpu_decoder)
    assemble = gpu.on_device

    def record(batch):
        handed.append({k: v.clone() for k, v in batch["jpeg"].items()})
        return assemble(batch)

    gpu.on_device = record
    it = iter(gpu)
    assert [next(it)["key"] for _ in range(2)] == cpu_keys
    jpeg_rows = 0
    for b, jpeg in enumerate(handed):
        for row, box, flip in zip(jpeg["index"].tolist(), jpeg["box"].tolist(), jpeg["flip"].tolist(), strict=True):
            assert (tuple(box), flip) == drawn[b * BATCH + row], (b, row)
            jpeg_rows += 1
    assert 0 < jpeg_rows < 2 * BATCH  # both kinds of samples were met
    assert {f for _, f in drawn} == {True, False}  # and both flips


def test_assembled_batch_equals_the_cpu_path_exactly(mixed_shards):
    """JPEG rows: exactly equal, since the stand-in is the CPU path's own libjpeg-turbo decode at full size and the
    crop-resize is the same uint8 CPU kernel; non-JPEG rows are the workers' finished images, passed through."""
    cpu = iter(_loader(mixed_shards, "cpu"))
    seen = []
    gpu = iter(_loader(mixed_shards, "gpu", lambda datas: seen.extend(datas) or cpu_decoder(datas)))
    for _ in range(3):
        a, b = next(cpu), next(gpu)
        assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
        assert b["image"].shape == (BATCH, 3, SIZE, SIZE) and b["image"].dtype == torch.uint8
        assert torch.equal(a["image"], b["image"])
    assert 0 < len(seen) < 3 * BATCH  # JPEGs went through the decoder, PNGs did not
    assert draft_factor(96, 72, SIZE) == 1


def test_trainer_wiring_and_exact_resume_with_gpu_decode(mixed_shards):
    """The Trainer's loader build with `data.decode=gpu` on a CPU device: the default decoder (torchvision's, on that
    device) gives the CPU path's batches; a resumed loader continues with the uninterrupted run's next batch."""
    from pretrain.config import BatchPlan, TrainConfig
    from pretrain.train.trainer import build_loaders

    data = DataConfig(train_shards=str(mixed_shards), num_workers=0, shuffle_buffer=6, decode="gpu", val_shards="")
    train = TrainConfig(micro_batch_size=BATCH, global_batch_size=BATCH)
    plan = BatchPlan.of(train, world_size=1)
    make = partial(build_loaders, data, train, plan, SIZE, seed=3, rank=0, device=torch.device("cpu"))
    loader, _ = make()
    it, cpu = iter(loader), iter(_loader(mixed_shards, "cpu"))
    first = next(it)
    assert torch.equal(first["image"], next(cpu)["image"])
    state = loader.state_dict()
    assert state == _cpu_state_after(mixed_shards, 1)  # the stream state does not depend on where JPEGs decode
    resumed, _ = make()
    resumed.load_state_dict(state)
    again, expected = next(iter(resumed)), next(it)
    assert again["key"] == expected["key"] and torch.equal(again["image"], expected["image"])


def _cpu_state_after(shards: Path, batches: int) -> dict:
    loader = _loader(shards, "cpu")
    it = iter(loader)
    for _ in range(batches):
        next(it)
    return loader.state_dict()


def _png(img: torch.Tensor) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def test_fallback_to_cpu_decode_and_unreadable_samples(mixed_shards):
    """A JPEG the device decoder refuses is decoded on the CPU; one nobody can decode is replaced by the batch's
    first readable sample and counted."""
    photo = sorted((mixed_shards.parent / "photos").rglob("*.jpg"))[0].read_bytes()
    refused = photo + b"\0\0"  # bytes after the end marker: the same pixels, and the device decoder refuses it
    corrupt = photo[: photo.index(b"\xff\xda") + 20] + bytes(300)  # a valid header, a scan of zeros
    tf, deferred = TrainTransform(SIZE, 0.08, True), DeferredTrainTransform(SIZE, 0.08, True)
    expected = tf(photo, random.Random(5))
    crops = [deferred(x, random.Random(5)) for x in (photo, refused, corrupt)]
    assert all(isinstance(c, JpegCrop) for c in crops)
    png = _png(expected)
    png_row = deferred(png, random.Random(1))
    assert isinstance(png_row, torch.Tensor)

    def picky(datas):  # like nvJPEG: any image it cannot decode fails the whole batched call
        if any(d.numel() == len(refused) for d in datas):
            raise RuntimeError("unsupported by the device decoder")
        return cpu_decoder(datas)

    images = torch.zeros(4, 3, SIZE, SIZE, dtype=torch.uint8)
    images[3] = png_row
    batch = {
        "image": images,
        "label": torch.tensor([0, 1, 2, 3]),
        "key": ["a", "b", "c", "d"],
        "jpeg": pack_jpegs(list(enumerate(crops))),
    }
    assert DeviceBatches("cpu", picky)(batch) == 1
    assert torch.equal(batch["image"][0], expected) and torch.equal(batch["image"][1], expected)
    assert torch.equal(batch["image"][2], expected)  # the corrupt row: a copy of row 0
    assert batch["label"].tolist() == [0, 1, 0, 3] and batch["key"] == ["a", "b", "a", "d"]
    assert torch.equal(batch["image"][3], png_row) and "jpeg" not in batch


def test_device_resize_is_within_one_of_the_uint8_kernel(mixed_shards):
    """CUDA has no uint8 antialiased resize: the device path resizes in float32 and rounds; differences from the
    CPU's fixed-point uint8 kernel are rounding only (at most 1)."""
    photo = sorted((mixed_shards.parent / "photos").rglob("*.jpg"))[2].read_bytes()
    img = decode_jpeg(torch.frombuffer(bytearray(photo), dtype=torch.uint8), mode=ImageReadMode.RGB)
    for top, left, h, w in ((0, 0, img.shape[1], img.shape[2]), (5, 7, 40, 61), (10, 3, 17, 23)):
        exact = resized_crop(img, top, left, h, w, SIZE)
        crop = img[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        rounded = _resize_rounded(crop, SIZE)
        assert (exact.int() - rounded.int()).abs().max().item() <= 1


def test_gpu_decode_without_cuda_or_with_randaugment_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--config", "configs/tiny_digits.yaml", "data.decode=gpu", "data.train_shards=nowhere"]
    assert main(base) == 2
    assert main([*base, "data.randaugment_ops=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: data.decode=gpu ") for line in err), err
    assert "CUDA" in err[0] and "data.decode=cpu" in err[0]
    assert "randaugment_ops=0" in err[1]

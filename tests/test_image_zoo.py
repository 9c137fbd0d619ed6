"""Real-world image files (tests/helpers/image_zoo.py) through the writer (bytes kept / re-encoded), `verify`, and
the training stream (CPU and `data.decode=gpu` paths) and evaluation stream: every good file comes out as its
correct picture, every bad one is skipped with a reason that says what it is, a bomb is refused from its header."""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torchvision.io
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from webdataset.writer import TarWriter

import data_tools.decode as decode_mod
from data_tools import format as fmt
from data_tools.decode import BadImage, decode_rgb
from data_tools.images import ImageOptions, encode_image
from data_tools.shard import shard
from data_tools.verify import verify
from pretrain.config import DataConfig
from pretrain.data import EvalTransform, TrainTransform, build_eval_loader, build_train_loader
from pretrain.data.decode import read_shard
from tests.helpers.image_zoo import bad_files, bomb_png, encode, good_files, mean_error

SIZE = 32
TOLERANCE = 8.0  # mean colour error, in 1/255
GOOD, BAD = good_files(), bad_files()
CLASSES = sorted(name.replace(".", "_") for name in GOOD)  # one class per good file: a label names its file
cpu_decoder = partial(decode_jpeg, mode=ImageReadMode.RGB, device="cpu")  # the stand-in for nvJPEG


def file_of(label: int) -> str:
    return next(n for n in GOOD if n.replace(".", "_") == CLASSES[label])


def reference_png(name: str) -> bytes:
    return encode(Image.fromarray(GOOD[name][1]), "PNG")  # the correct picture, losslessly


def hwc(t) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """The zoo as an image folder (bad files beside a good one), sharded with bytes kept and re-encoded."""
    root = tmp_path_factory.mktemp("zoo")
    for name, (data, _) in GOOD.items():
        (root / "src" / name.replace(".", "_")).mkdir(parents=True)
        (root / "src" / name.replace(".", "_") / name).write_bytes(data)
    for name, (data, _) in BAD.items():
        (root / "src" / CLASSES[0] / name).write_bytes(data)
    out = {}
    for mode, quality in (("keep", None), ("reencode", 95)):
        out[mode] = root / mode
        shard(root / "src", out[mode], workers=1, quality=quality, samples_per_shard=8, progress=False)
    return out


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> Path:
    """Every zoo file, good and bad, stored as it is (as shards made elsewhere hold them): labels of good files
    name them, bad files have label 0. The text file is a `.jpg`, as crawls name such files."""
    out = tmp_path_factory.mktemp("zoo_raw")
    files = [(n, d, CLASSES.index(n.replace(".", "_"))) for n, (d, _) in GOOD.items()]
    files += [(n, d, 0) for n, (d, _) in BAD.items()]
    with TarWriter(str(out / fmt.shard_name("train", 0)), encoder=False) as tw:
        for i, (name, data, label) in enumerate(files):
            ext = name.rsplit(".", 1)[1].lower().replace("txt", "jpg")
            tw.write({"__key__": f"{i:09d}_{name.replace('.', '_')}", ext: data, "cls": fmt.cls_bytes(label)})
    fmt.write_info(out, fmt.make_info("zoo", CLASSES, {"train": [len(files)]}))
    return out


def test_the_writer_keeps_or_reencodes_every_good_file_and_names_every_bad_one(written):
    for mode, out in written.items():
        lines = (out / "_skipped.txt").read_text().splitlines()
        reasons = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in lines}
        assert sorted(reasons) == sorted(BAD), mode
        for name, reason in reasons.items():
            assert BAD[name][1] in reason and "<_io" not in reason, (mode, name, reason)
        stored = {}  # file -> member extension
        for shard_file in fmt.read_info(out).splits["train"].filenames:
            for _, raw in read_shard(str(out / shard_file)):
                name = Path(json.loads(raw.members["json"])["path"]).name
                ext = stored[name] = fmt.image_ext(raw.members)
                error = mean_error(hwc(decode_rgb(raw.members[ext])), GOOD[name][1])
                assert error <= TOLERANCE, (mode, name, ext, error)
        assert sorted(stored) == sorted(GOOD), mode
        # kept: what every reader decodes (16-bit PNGs included); re-encoded: all of it
        png_or_webp = {n for n, (data, _) in GOOD.items() if data[:4] in (b"\x89PNG", b"RIFF")}
        assert {n for n, e in stored.items() if e != "jpg"} == (set() if mode == "reencode" else png_or_webp)


def _train_images(shards: Path, batches: int | None = None, **cfg) -> list[tuple[str, np.ndarray]]:
    """(file, image) of the training stream's samples: whole images (crop scale 1, no flip), in-process."""
    data = DataConfig(train_shards=str(shards), num_workers=0, crop_scale_min=1.0, hflip=False, **cfg)
    decoder = cpu_decoder if data.decode == "gpu" else None
    bs = 4 if data.decode == "gpu" else 1
    loader = build_train_loader(data, img_size=SIZE, batch_size=bs, pin_memory=False, device="cpu", decoder=decoder)
    with loader:
        it = iter(loader)
        out = []
        for _ in range(batches or loader.batches_per_epoch):
            batch = next(it)
            out += [(file_of(int(y)), hwc(x)) for x, y in zip(batch["image"], batch["label"], strict=True)]
    return out


def _eval_images(shards: Path) -> tuple[list[tuple[str, np.ndarray]], dict]:
    cfg = DataConfig(val_shards=str(shards), val_split="train", num_workers=0)
    with build_eval_loader(cfg, img_size=SIZE, batch_size=4, pin_memory=False) as loader:
        out = []
        for batch in loader:
            for x, y, keep in zip(batch["image"], batch["label"], batch["mask"], strict=True):
                if keep:
                    out.append((file_of(int(y)), hwc(x)))
        return out, loader.last_bad_counts


def _assert_correct(images: list[tuple[str, np.ndarray]], transform, where: str) -> None:
    for name, image in images:
        expected = hwc(transform(reference_png(name), random.Random(0)))
        assert mean_error(image, expected) <= TOLERANCE, (where, name, mean_error(image, expected))


@pytest.mark.parametrize("mode", ["keep", "reencode"])
def test_train_and_eval_streams_read_every_image_the_writer_kept(written, mode):
    train = _train_images(written[mode])
    assert sorted(name for name, _ in train) == sorted(GOOD)
    _assert_correct(train, TrainTransform(SIZE, 1.0, False), f"train/{mode}")
    evaluated, bad = _eval_images(written[mode])
    assert sorted(name for name, _ in evaluated) == sorted(GOOD) and bad["bad_samples"] == 0
    _assert_correct(evaluated, EvalTransform(SIZE, DataConfig.eval_crop_pct), f"eval/{mode}")


def test_bad_files_in_shards_are_skipped_and_named_by_verify_and_both_streams(raw_shards, caplog):
    keys = {name: f"{i + len(GOOD):09d}_{name.replace('.', '_')}" for i, name in enumerate(BAD)}
    report = verify(raw_shards, workers=1, progress=False)
    problems = {p.split(": ")[1]: p for p in report["problems"]}
    assert sorted(problems) == sorted(keys.values()), report["problems"]
    for name, key in keys.items():
        assert BAD[name][1] in problems[key] and "<_io" not in problems[key], problems[key]
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        train = _train_images(raw_shards, batches=len(GOOD) + len(BAD))
    assert set(GOOD) <= {name for name, _ in train}
    _assert_correct(train, TrainTransform(SIZE, 1.0, False), "train/raw")
    for name, key in keys.items():
        assert f"skipping bad sample: {key}: {BAD[name][1]}" in caplog.text, name
    evaluated, bad = _eval_images(raw_shards)
    assert sorted(name for name, _ in evaluated) == sorted(GOOD) and bad["bad_samples"] == len(BAD)
    _assert_correct(evaluated, EvalTransform(SIZE, DataConfig.eval_crop_pct), "eval/raw")


def test_gpu_decode_workers_skip_bad_files_and_hand_over_the_rest(raw_shards):
    # Non-JPEGs are decoded in the workers (16-bit PNGs included); JPEGs in the main process, where the truncated
    # one is replaced by a good sample of its batch.
    images = _train_images(raw_shards, decode="gpu")  # one epoch: 5 batches of 4
    assert len(images) == 20 and len({name for name, _ in images}) > len(GOOD) // 2
    _assert_correct(images, TrainTransform(SIZE, 1.0, False), "gpu")


def test_a_bomb_is_refused_from_its_header_before_any_decoder_runs(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("a decoder ran on a bomb")

    for name in ("decode_image", "decode_jpeg"):
        monkeypatch.setattr(torchvision.io, name, spy)  # decode_rgb imports them from there when it runs
    monkeypatch.setattr(decode_mod.Image, "open", spy)
    jpeg = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width in the frame header
    attempts = (
        decode_rgb,
        partial(encode_image, opts=ImageOptions()),
        partial(encode_image, opts=ImageOptions(resize_shorter=64)),
        EvalTransform(SIZE, DataConfig.eval_crop_pct),
        lambda data: TrainTransform(SIZE, DataConfig.crop_scale_min, DataConfig.hflip)(data, random.Random(0)),
    )
    for bomb in (bomb_png(), bytes(jpeg)):
        for attempt in attempts:
            with pytest.raises(BadImage, match="image size 20000x20000 out of range"):
                attempt(bomb)
    assert calls == []


def test_an_eval_loader_that_meets_an_error_leaves_no_worker_behind(raw_shards, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / fmt.shard_name("val", 0)).write_bytes((raw_shards / fmt.shard_name("train", 0)).read_bytes())
    (folder / fmt.shard_name("val", 1)).write_bytes(b"not a tar file" * 100)
    fmt.write_info(folder, fmt.make_info("broken", CLASSES, {"val": [len(GOOD) + len(BAD), 8]}))
    cfg = DataConfig(val_shards=str(folder), num_workers=2, max_bad_shards=0)
    loader = build_eval_loader(cfg, img_size=SIZE, batch_size=4, pin_memory=False)
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="bad shards"):
        for _ in loader:
            pass
    assert set(multiprocessing.active_children()) <= before  # the workers are gone, not waiting for SIGTERM

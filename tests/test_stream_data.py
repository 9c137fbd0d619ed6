"""Shard lists, safe decoding, bad data, transforms and device helpers of the input stream."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pretrain.config import DataConfig
from pretrain.data import (
    EvalTransform,
    ShardError,
    TrainTransform,
    build_eval_loader,
    build_train_loader,
    mixup,
    normalize,
    resolve_shards,
    to_targets,
)
from pretrain.data.decode import BadSample, BadShard, decode_rgb, read_shard
from pretrain.data.transforms import draft_factor, resized_crop
from tests.helpers.servers import ShardServer


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.normal(0, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def touch_payload(marker: Path) -> bytes:
    """A pickle whose loading creates `marker` (what webdataset's default `.pyd` decoder would do)."""

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    return pickle.dumps(Evil())


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> tuple[Path, Path]:
    """3 shards x 20 samples; shard 0: 2 corrupt JPEGs, 1 sample without .cls, 1 live .pyd pickle; shard 1 truncated."""
    root = tmp_path_factory.mktemp("bad")
    marker = root / "pwned"
    names = [f"train-{i:06d}.tar" for i in range(3)]
    for s, name in enumerate(names):
        with wds.TarWriter(str(root / name)) as tw:
            for i in range(20):
                key = f"s{s}_{i:03d}"
                sample = {"__key__": key, "jpg": jpeg(40, 30, s * 100 + i), "cls": str(i % 4), "json": b"{}"}
                if s == 0 and i in (3, 11):
                    sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 3]  # truncated JPEG data
                if s == 0 and i == 5:
                    del sample["cls"]
                if s == 0 and i == 7:
                    sample["pyd"] = touch_payload(marker)
                tw.write(sample)
    data = (root / names[1]).read_bytes()
    (root / names[1]).write_bytes(data[: len(data) // 2 + 100])  # cut mid-member: a truncated tar
    train = {"name": "train", "num_samples": 60, "filenames": names, "shard_lengths": [20] * 3}
    info = {"name": "bad", "num_classes": 4, "class_names": list("abcd"), "splits": {"train": train}}
    (root / "_info.json").write_text(json.dumps(info))
    return root, marker


def test_corrupt_images_and_truncated_tar_are_skipped_and_counted(bad_shards):
    root, marker = bad_shards
    cfg = DataConfig(train_shards=str(root), shuffle_buffer=8, num_workers=1)
    loader = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch)]
    counts = loader.state_dict()
    it.close()
    assert loader.batches_per_epoch == 15
    keys = [k for b in batches for k in b["key"]]
    assert not {"s0_003", "s0_011", "s0_005"} & set(keys)  # corrupt and unlabeled samples never reach a batch
    assert "s0_007" in keys  # the sample with the .pyd member is fine: only the .pyd is ignored
    assert counts["bad_samples"] == 3 and counts["bad_shards"] == [1]  # the truncated shard, by its index
    assert loader.stats()["bad_shards"] == 1
    assert not marker.exists()


def test_pyd_payload_is_never_unpickled(bad_shards, tmp_path):
    root, marker = bad_shards
    probe = tmp_path / "probe"
    pickle.loads(touch_payload(probe))  # the payload is live: loading it does create the file
    assert probe.exists()
    for workers in (0, 2):
        cfg = DataConfig(train_shards=str(root), val_shards=str(root), val_split="train", num_workers=workers)
        loader = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
        it = iter(loader)
        for _ in range(loader.batches_per_epoch):
            next(it)
        it.close()
        list(build_eval_loader(cfg, img_size=16, batch_size=4))
    assert not marker.exists()


def test_too_many_bad_shards_stop_with_the_shard_name(bad_shards):
    root, _ = bad_shards
    cfg = DataConfig(train_shards=str(root), shuffle_buffer=8, num_workers=2, max_bad_shards=0)
    loader = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
    with pytest.raises(RuntimeError, match="train-000001.tar"):
        for _ in zip(range(100), loader, strict=False):
            pass


def test_resume_does_not_count_the_saved_runs_bad_shards_twice(bad_shards):
    """A resumed run meets the saved run's bad shard again; it must not count towards the limit twice."""
    root, _ = bad_shards
    cfg = DataConfig(train_shards=str(root), shuffle_buffer=8, num_workers=1, max_bad_shards=1)
    first = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
    it = iter(first)
    whole = [next(it) for _ in range(first.batches_per_epoch)]
    it.close()
    first = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
    it = iter(first)
    head = [next(it) for _ in range(12)]
    saved = first.state_dict()
    it.close()
    assert saved["bad_shards"] == [1]  # the truncated shard was met before the save
    resumed = build_train_loader(cfg, img_size=16, batch_size=4, seed=0)
    resumed.load_state_dict(saved)
    it = iter(resumed)
    tail = [next(it) for _ in range(first.batches_per_epoch - 12)]  # raised "2 bad shards" before the fix
    it.close()
    assert [b["key"] for b in head + tail] == [b["key"] for b in whole]
    assert resumed.state_dict()["bad_shards"] == [1]


def test_missing_shard_is_skipped_and_epochs_stay_equal(bad_shards, tmp_path):
    root, _ = bad_shards
    for f in root.glob("*"):
        if f.name != "train-000002.tar":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = DataConfig(train_shards=str(tmp_path), shuffle_buffer=8, num_workers=0)
    per_rank = []
    for r in range(2):
        loader = build_train_loader(cfg, img_size=16, batch_size=4, rank=r, world_size=2, seed=0)
        it = iter(loader)
        per_rank.append([next(it) for _ in range(loader.batches_per_epoch + 1)])
        assert loader.state_dict()["epoch"] == 1  # every rank had exactly batches_per_epoch in epoch 0
        it.close()
    assert len(per_rank[0]) == len(per_rank[1])


def test_eval_masks_bad_samples(bad_shards):
    root, _ = bad_shards
    cfg = DataConfig(val_shards=str(root), val_split="train", num_workers=0)
    loader = build_eval_loader(cfg, img_size=16, batch_size=8)
    masked = sum(int(b["mask"].sum()) for b in loader)
    assert loader.last_bad_counts == {"bad_samples": 3, "bad_shards": 1}
    readable = []
    with pytest.raises(BadShard, match="truncated"):
        readable += read_shard(str(root / "train-000001.tar"))
    assert 0 < len(readable) < 20
    assert masked == 60 - 3 - (
        20 - len(readable)
    )  # bad samples and the lost part of the truncated shard are masked out
    assert len(loader) * 8 >= 60


def test_resolve_shards_forms(bad_shards, tmp_path):
    root, _ = bad_shards
    sl = resolve_shards(str(root))
    assert [Path(u).name for u in sl.urls] == [f"train-{i:06d}.tar" for i in range(3)]
    assert sl.lengths == [20, 20, 20] and sl.num_classes == 4 and sl.class_names == list("abcd")
    braced = resolve_shards(str(root / "train-{000000..000002}.tar"))
    assert braced.urls == sl.urls and braced.lengths == [20, 20, 20]
    (tmp_path / "train-000000.tar").write_bytes((root / "train-000002.tar").read_bytes())
    assert resolve_shards(str(tmp_path)).lengths == [20]  # no _info.json: counted from the tar headers
    with pytest.raises(ShardError, match="no split 'val'"):
        resolve_shards(str(root), "val")
    with pytest.raises(ShardError, match="does not exist"):
        resolve_shards(str(root / "nope-{0..3}.tar"))
    (tmp_path / "empty").mkdir()
    with ShardServer(tmp_path / "empty") as srv:  # on 127.0.0.1, without an _info.json (404)
        remote = resolve_shards(srv.url + "/train-{000..003}.tar")
        assert len(remote.urls) == 4 and remote.lengths is None
        with pytest.raises(ShardError, match="resampled"):
            build_train_loader(DataConfig(train_shards=srv.url + "/a-{0..3}.tar"), img_size=8, batch_size=2)


def test_train_transform_is_seeded_and_uint8():
    data = jpeg(500, 375, 0)
    t = TrainTransform(64, scale_min=0.08, hflip=True, ra_ops=2, ra_mag=9)
    a, b = t(data, random.Random(1)), t(data, random.Random(1))
    c = t(data, random.Random(2))
    assert a.dtype == torch.uint8 and a.shape == (3, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(BadSample):
        t(data[:500], random.Random(0))


def test_uint8_crop_resize_equals_torchvision():
    x = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    ours = resized_crop(x, 10, 20, 300, 250, 224)
    ref = F.resized_crop(x, 10, 20, 300, 250, [224, 224], antialias=True)
    assert ours.dtype == torch.uint8 and torch.equal(ours, ref)


def test_draft_mode_for_large_jpegs_matches_full_decode():
    data = jpeg(1600, 1200, 3)
    assert draft_factor(1200, 1200, 128) == 8 and draft_factor(300, 300, 224) == 1
    assert decode_rgb(data, reduce=4).shape == (3, 300, 400)
    small = EvalTransform(128, 0.875)(data)  # decoded at 1/8 scale
    full = torch.nn.functional.interpolate(decode_rgb(data)[None].float(), size=(1200, 1600))[0]
    side = int(1200 * 0.875)
    top, left = (1200 - side) // 2, (1600 - side) // 2
    ref = torch.nn.functional.interpolate(full[None, :, top : top + side, left : left + side], size=128, mode="area")
    assert (small.float() - ref[0]).abs().mean() < 6  # same picture, within JPEG/resampling noise


def test_normalize_targets_mixup():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x, (0.5,) * 3, (0.5,) * 3, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y[0].eq(-1).all() and y[1].eq(1).all()
    one = to_targets(torch.tensor([2, 0]), 4)
    assert one.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    multi = to_targets(torch.tensor([[1, 3], [2, -1]]), 4)
    assert multi.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]
    imgs = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t4 = to_targets(torch.tensor([0, 1, 2, 3]), 4)
    m1, tm1, lam1 = mixup(imgs, t4, 0.8, torch.Generator().manual_seed(0))
    m2, _, lam2 = mixup(imgs, t4, 0.8, torch.Generator().manual_seed(0))
    assert lam1 == lam2 and torch.equal(m1, m2)
    assert torch.allclose(m1, lam1 * imgs + (1 - lam1) * imgs.flip(0), atol=1e-6)
    assert torch.allclose(tm1.sum(1), torch.ones(4))
    assert mixup(imgs, t4, 0.0)[2] == 1.0


def test_multilabel_targets_and_photos(photos_dir, tmp_path):
    from data_tools.shard import shard

    shard(photos_dir, tmp_path / "shards", workers=1, samples_per_shard=8, progress=False)  # 30 JPEGs, 3 classes
    cfg = DataConfig(train_shards=str(tmp_path / "shards"), num_workers=1, shuffle_buffer=4)
    loader = build_train_loader(cfg, img_size=64, batch_size=4, seed=0, multilabel=True)
    assert loader.num_classes == 3 and loader.batches_per_epoch == 7
    b = next(iter(loader))
    assert b["image"].shape == (4, 3, 64, 64) and b["image"].dtype == torch.uint8
    assert b["image"].is_contiguous(memory_format=torch.channels_last)
    assert b["label"].shape == (4, 1) and to_targets(b["label"], 3).sum(1).eq(1).all()
    assert b["image"].float().std() > 10  # real photo content, not blank


def test_tar_reader_plain_gzip_long_names_and_garbage(bad_shards, tmp_path):
    import gzip
    import tarfile

    root, _ = bad_shards
    plain = root / "train-000002.tar"
    expected = [(i, r.key, r.members) for i, r in read_shard(str(plain))]
    assert len(expected) == 20 and set(expected[0][2]) == {"jpg", "cls", "json"}
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert [(i, r.key, r.members) for i, r in read_shard(str(tmp_path / "a.tar.gz"))] == expected
    assert [i for i, _ in read_shard(str(plain), 5, 8)] == [5, 6, 7]
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"{'d' * 120}/ü_1.cls", b"3"), (f"{'d' * 120}/ü_1.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    [(_, raw)] = read_shard(str(tmp_path / "pax.tar"))
    assert raw.key == f"{'d' * 120}/ü_1" and raw.members == {"cls": b"3", "json": b"{}"}
    (tmp_path / "junk.tar").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(BadShard, match="not a tar"):
        list(read_shard(str(tmp_path / "junk.tar")))


def test_one_grouping_rule_for_the_stream_the_counter_the_index_and_verify(tmp_path):
    """Members without the KEY.EXT form and reserved `__` members belong to no sample, for every reader."""
    import tarfile

    from data_tools import format as fmt
    from pretrain.data import count_samples

    path = tmp_path / "train-000000.tar"
    members = ["a.jpg", "a.cls", "README", "__index__.json", "b.cls", "b.pyd", "sub/c.seg.png", "sub/c.cls", "d.cls"]
    with tarfile.open(path, "w") as tar:
        for name in members:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"3"))
    expected = ["a", "b", "sub/c", "d"]
    assert [raw.key for _, raw in read_shard(str(path))] == expected
    assert count_samples(str(path)) == len(expected)
    with open(path, "rb") as f:
        assert len(fmt.scan_index(f)) == len(expected) + 1
    grouping = fmt.Grouping()
    assert [grouping.place(m) for m in members] == [
        (0, "jpg"),
        (0, "cls"),
        None,
        None,
        (1, "cls"),
        (1, "pyd"),
        (2, "seg.png"),
        (2, "cls"),
        (3, "cls"),
    ]

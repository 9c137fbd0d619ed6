"""data_tools shard: round trip, formats, determinism, resume, bad inputs, and timm/webdataset reading the result."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

import data_tools.shard as shard_mod
from data_tools.digits import write_photos
from data_tools.errors import DataToolsError
from data_tools.shard import plan_shards, shard
from tests.conftest import DIGITS_SAMPLES_PER_SHARD, DIGITS_VAL_PER_CLASS

REPO = Path(__file__).resolve().parents[1]


def read_split(out: Path, split: str) -> list[dict]:
    """Every sample of a split, read with webdataset itself in shard order."""
    info = json.loads((out / "_info.json").read_text())
    urls = [str(out / f) for f in info["splits"][split]["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def input_files(src: Path) -> dict[str, str]:
    """relative path -> class name of every file in an image folder."""
    return {p.relative_to(src).as_posix(): p.parent.name for p in sorted(src.rglob("*")) if p.is_file()}


def test_digits_folder_holds_all_scans(digits_dir):
    files = input_files(digits_dir)
    assert len(files) == 1797
    assert sorted(set(files.values())) == [str(d) for d in range(10)]
    with Image.open(digits_dir / "0" / "0000.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB" and im.getextrema()[0][1] > 200  # real ink, not blank


def test_round_trip_every_digit_once_with_its_label(digits_dir, digits_shards):
    info = json.loads((digits_shards / "_info.json").read_text())
    assert info["class_names"] == [str(d) for d in range(10)] and info["num_classes"] == 10
    train, val = read_split(digits_shards, "train"), read_split(digits_shards, "val")
    seen = Counter()
    for s in train + val:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == int(meta["class"]) == int(Path(meta["path"]).parent.name)
        assert s["png"] == (digits_dir / meta["path"]).read_bytes()  # no resize asked: original bytes kept
        assert (meta["width"], meta["height"]) == (32, 32)
        seen[meta["path"]] += 1
    assert seen == Counter(input_files(digits_dir).keys())  # every input exactly once
    assert len({s["__key__"] for s in train + val}) == 1797
    assert Counter(int(s["cls"]) for s in val) == {c: DIGITS_VAL_PER_CLASS for c in range(10)}
    lengths = info["splits"]["train"]["shard_lengths"]
    assert lengths == [DIGITS_SAMPLES_PER_SHARD] * 8 + [1747 - 8 * DIGITS_SAMPLES_PER_SHARD]
    assert info["splits"]["train"]["filenames"][0] == "train-000000.tar"
    assert info["splits"]["val"] == {
        "name": "val",
        "num_samples": 50,
        "filenames": ["val-000000.tar"],
        "shard_lengths": [50],
    }
    # The global shuffle mixes classes inside every shard.
    first = read_split(digits_shards, "train")[:DIGITS_SAMPLES_PER_SHARD]
    assert len({int(s["cls"]) for s in first}) == 10


def test_timm_reader_opens_the_shards(digits_shards):
    from timm.data import create_dataset
    from timm.data.readers.reader_wds import ReaderWds

    ds = create_dataset("wds/digits", root=str(digits_shards), split="train", is_training=False)
    items = list(ds)
    assert len(items) == 1747
    img, target = items[0]
    assert img.size == (32, 32) and 0 <= target < 10
    assert Counter(t for _, t in items) == Counter(
        int(s["cls"]) for s in read_split(digits_shards, "train")
    )  # same labels as webdataset reads
    reader = ReaderWds(str(digits_shards), split="val")
    assert reader.num_samples == 50 and len(list(reader)) == 50


def test_tars_are_reproducible(digits_shards):
    with tarfile.open(digits_shards / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "bigdata", 0o444)}
    assert [m.name.split(".", 1)[1] for m in members[:3]] == ["cls", "json", "png"]


def test_same_bytes_whatever_the_worker_count(photos_dir, tmp_path):
    opts = dict(samples_per_shard=7, resize_shorter=160, val_fraction=0.2, seed=3, progress=False)
    one = shard(photos_dir, tmp_path / "w1", workers=1, **opts)
    two = shard(photos_dir, tmp_path / "w2", workers=2, **opts)
    assert one["splits"] == {**two["splits"]}
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")
    assert one["splits"]["train"]["shards"] == 4 and one["splits"]["val"]["samples"] == 6
    other_seed = shard(photos_dir, tmp_path / "s4", workers=2, **{**opts, "seed": 4})
    assert other_seed["splits"]["train"]["samples"] == 24
    assert folder_bytes(tmp_path / "s4")["train-000000.tar"] != folder_bytes(tmp_path / "w1")["train-000000.tar"]


def test_resize_shorter_downscales_and_never_upscales(photos_dir, tmp_path):
    shard(photos_dir, tmp_path / "small", resize_shorter=128, workers=1, progress=False)
    for s in read_split(tmp_path / "small", "train"):
        meta = json.loads(s["json"])
        im = Image.open(io.BytesIO(s["jpg"]))
        assert min(im.size) == 128 and {meta["width"], meta["height"]} == {500, 375}
        assert abs(im.size[0] / im.size[1] - meta["width"] / meta["height"]) < 0.01  # aspect kept
    shard(photos_dir, tmp_path / "big", resize_shorter=1000, workers=1, progress=False)
    for s in read_split(tmp_path / "big", "train"):
        assert s["jpg"] == (photos_dir / json.loads(s["json"])["path"]).read_bytes()  # untouched bytes
    shard(photos_dir, tmp_path / "q", quality=50, workers=1, progress=False)
    sizes_q = {json.loads(s["json"])["path"]: len(s["jpg"]) for s in read_split(tmp_path / "q", "train")}
    assert all(sizes_q[p] < (photos_dir / p).stat().st_size for p in sizes_q)  # re-encoded at quality 50


def greedy_plan(sizes: list[int], per_shard: int, max_bytes: int) -> list[int]:
    """The plain loop plan_shards must equal: fill a shard until the count or the byte cap would be passed."""
    bounds, count, nbytes = [0], 0, 0
    for i, size in enumerate(sizes):
        est = (size + 511) // 512 * 512 + shard_mod.SAMPLE_OVERHEAD
        if count and (count >= per_shard or nbytes + est > max_bytes - shard_mod.TAR_END):
            bounds.append(i)
            count, nbytes = 0, 0
        count += 1
        nbytes += est
    return bounds + [len(sizes)] if sizes else bounds


def test_plan_shards_is_the_greedy_plan():
    assert plan_shards([10, 10, 10, 10, 10], 2, 10**9) == [0, 2, 4, 5]
    assert plan_shards([], 2, 10**9) == [0]
    assert plan_shards([10**6, 5, 5], 10, 20_000) == [0, 1, 3]  # an oversized sample still gets its own shard
    rng = random.Random(0)
    for _ in range(500):
        sizes = [rng.randint(0, 20_000) for _ in range(rng.randint(0, 50))]
        per, cap = rng.randint(1, 8), rng.randint(1, 100_000)
        assert plan_shards(sizes, per, cap) == greedy_plan(sizes, per, cap)


def test_memory_stays_flat(tmp_path):
    # 200 photos (~10 MB of JPEG) pass through; Python-side peak stays near one sample, not the data set.
    src = write_photos(tmp_path / "photos", classes=2, per_class=100, seed=2)
    total = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    tracemalloc.start()
    shard(src, tmp_path / "out", samples_per_shard=50, workers=1, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total > 8e6 and peak < 2e6, (total, peak)


def test_max_shard_bytes_caps_shards(photos_dir, digits_dir, tmp_path):
    # Photos (40-80 kB each) and digits (tiny PNGs, where tar headers dominate): shards stay within the cap, because
    # the plan computes tar sizes from source sizes when bytes are kept.
    for src, cap in ((photos_dir, 200_000), (digits_dir, 300_000)):
        out = tmp_path / src.name
        shard(src, out, max_shard_bytes=cap, workers=1, progress=False)
        sizes = [
            (out / f).stat().st_size
            for f in json.loads((out / "_info.json").read_text())["splits"]["train"]["filenames"]
        ]
        assert len(sizes) >= 5 and max(sizes) <= cap, sizes
        if src == digits_dir:  # small samples: every shard but the last is filled to within a few kB
            assert min(sizes[:-1]) >= cap - 15_000, sizes


def test_resume_after_interruption_keeps_finished_shards(digits_dir, digits_shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    opts = dict(samples_per_shard=DIGITS_SAMPLES_PER_SHARD, val_per_class=DIGITS_VAL_PER_CLASS, seed=0, progress=False)
    real, calls = shard_mod._write_shard, []

    def dies_on_fourth(task):
        calls.append(task.index)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run
        return real(task)

    monkeypatch.setattr(shard_mod, "_write_shard", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        shard(digits_dir, out, workers=1, **opts)
    monkeypatch.setattr(shard_mod, "_write_shard", real)
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not (out / "_info.json").exists()
    (out / ".tmp-train-000003.tar.99999").write_bytes(b"half a tar")  # what a kill mid-write leaves
    stamps = {f: (out / f).stat().st_mtime_ns for f in finished}

    summary = shard(digits_dir, out, workers=2, **opts)
    assert summary["reused_shards"] == 3 and summary["written_shards"] == 7
    assert {f: (out / f).stat().st_mtime_ns for f in finished} == stamps  # not redone
    assert folder_bytes(out) == folder_bytes(digits_shards)  # same as an uninterrupted run
    assert not list(out.glob(".tmp-*")) and not (out / "_progress").exists()
    again = shard(digits_dir, out, workers=2, **opts)  # finished: nothing to do
    assert again["written_shards"] == 0 and again["splits"] == summary["splits"]


def test_resume_after_kill_of_the_process(tmp_path):
    src = write_photos(tmp_path / "photos", classes=2, per_class=60, seed=1)
    args = [str(src), "--samples-per-shard", "4", "--resize-shorter", "96", "--workers", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "data_tools", "shard"]
    proc = subprocess.Popen(cmd + [args[0], str(tmp_path / "out")] + args[1:], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # bounded, and far above what 5 shards take on a loaded machine
    done = 0
    while done < 5 and time.time() < deadline:
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.005)
        done = len(list((tmp_path / "out" / "_progress").glob("*.tar.json")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 5, "5 shards were not written in 300 s"
    assert not (tmp_path / "out" / "_info.json").exists()
    resumed = shard(src, tmp_path / "out", samples_per_shard=4, resize_shorter=96, workers=2, progress=False)
    assert resumed["reused_shards"] >= 5 and resumed["written_shards"] + resumed["reused_shards"] == 30
    shard(src, tmp_path / "ref", samples_per_shard=4, resize_shorter=96, workers=2, progress=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")
    assert len(read_split(tmp_path / "out", "train")) == 120


def make_bad_folder(digits_dir: Path, photos_dir: Path, root: Path) -> Path:
    """Two digit classes (40 files each) plus a truncated PNG, a truncated JPEG, a text file and an empty .jpg."""
    for c in ("3", "7"):
        (root / c).mkdir(parents=True)
        for p in sorted((digits_dir / c).iterdir())[:40]:
            shutil.copy(p, root / c / p.name)
    good = (digits_dir / "3" / sorted(os.listdir(digits_dir / "3"))[0]).read_bytes()
    (root / "3" / "truncated.png").write_bytes(good[: len(good) // 2])
    photo = (photos_dir / "class_0" / "00000.jpg").read_bytes()
    (root / "7" / "cut.jpg").write_bytes(photo[: len(photo) - 200])  # a download that stopped early
    (root / "7" / "notes.txt").write_text("not an image")
    (root / "7" / "empty.jpg").write_bytes(b"")
    return root


def test_bad_files_are_skipped_and_listed(digits_dir, photos_dir, tmp_path):
    src = make_bad_folder(digits_dir, photos_dir, tmp_path / "src")
    summary = shard(src, tmp_path / "out", samples_per_shard=16, workers=2, progress=False)
    assert summary["skipped"] == 4 and summary["splits"]["train"]["samples"] == 80
    lines = (tmp_path / "out" / "_skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == [
        "3/truncated.png",
        "7/cut.jpg",
        "7/empty.jpg",
        "7/notes.txt",
    ]
    assert all(line.split("\t")[1] for line in lines)  # each with its reason
    paths = {json.loads(s["json"])["path"] for s in read_split(tmp_path / "out", "train")}
    assert len(paths) == 80 and "7/notes.txt" not in paths
    with pytest.raises(DataToolsError, match="strict"):
        shard(src, tmp_path / "strict", strict=True, workers=1, progress=False)


def test_file_list_source(digits_dir, tmp_path):
    files = list(input_files(digits_dir).items())[::9]  # 200 files, all classes
    rows = [("path", "label")] + [(str(digits_dir / p), f"digit_{c}") for p, c in files]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    (tmp_path / "list.tsv").write_text("".join(f"{digits_dir / p}\t{c}\n" for p, c in files))
    a = shard(tmp_path / "list.csv", tmp_path / "a", samples_per_shard=64, workers=1, progress=False)
    b = shard(tmp_path / "list.tsv", tmp_path / "b", samples_per_shard=64, workers=1, progress=False)
    assert a["splits"]["train"]["samples"] == b["splits"]["train"]["samples"] == len(files)
    info = json.loads((tmp_path / "a" / "_info.json").read_text())
    assert info["class_names"] == [f"digit_{d}" for d in range(10)]
    for s in read_split(tmp_path / "a", "train"):
        meta = json.loads(s["json"])
        assert meta["class"] == info["class_names"][int(s["cls"])] == f"digit_{Path(meta['path']).parent.name}"


def test_per_class_tar_source_and_class_file(digits_dir, tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    for c in ("1", "2", "5"):
        with tarfile.open(src / f"n0000000{c}.tar", "w") as tf:
            for p in sorted((digits_dir / c).iterdir())[:30]:
                tf.add(p, arcname=f"n0000000{c}_{p.stem}.png")
    (tmp_path / "classes.txt").write_text("n00000005\nn00000001\n")  # fixed order, and a subset
    shard(src, tmp_path / "out", classes=tmp_path / "classes.txt", workers=1, progress=False)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["class_names"] == ["n00000005", "n00000001"]
    samples = read_split(tmp_path / "out", "train")
    assert len(samples) == 60
    for s in samples:
        meta = json.loads(s["json"])
        tar_name, member = meta["path"].split("/")
        assert tar_name == f"{info['class_names'][int(s['cls'])]}.tar"
        digit = member.split("_")[0][-1]
        assert s["png"] == (digits_dir / digit / f"{member.split('_')[1]}").read_bytes()

"""`verify` on shards written by webdataset's own `ShardWriter` the way timm's Hub ImageNet sets are: `jpg` / `cls` /
`json` members, splits `train` and `validation`, an `_info.json` with split sizes but no class list. The label rule
is the stream's (`data_tools.format`): without a class count any non-negative label (multi-label too) passes, and
the range seen is reported; `--num-classes` checks it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools.__main__ import main
from pretrain.config import DataConfig
from pretrain.data import build_train_loader

SPLITS = {"train": 60, "validation": 20}
PER_SHARD = 25


def write_timm_style(out: Path, digits_dir: Path, label_of=lambda i, label: label) -> None:
    """Shards as timm's Hub sets hold them: `{name}-{split}-%04d.tar` by `wds.ShardWriter` (its own encoders: an
    int `.cls`, a dict `.json`), JPEG bytes, and an `_info.json` holding what timm's `reader_wds._parse_split_info`
    reads for each split: name, num_samples, filenames, shard_lengths. No `num_classes`, no `class_names`."""
    out.mkdir()
    every = sorted(digits_dir.rglob("*.png"))
    files = every[:: len(every) // sum(SPLITS.values())]  # all ten digits
    info = {"name": "digits-wds", "splits": {}}
    i = 0
    for split, count in SPLITS.items():
        pattern = str(out / f"digits-{split}-%04d.tar")
        with wds.ShardWriter(pattern, maxcount=PER_SHARD, verbose=0) as sink:
            for path in files[i : i + count]:
                label = int(path.parent.name)
                buf = io.BytesIO()
                Image.open(path).convert("RGB").save(buf, format="JPEG", quality=90)
                cls = label_of(i, label)
                sink.write({"__key__": f"{split}_{i:08d}", "jpg": buf.getvalue(), "cls": cls, "json": {"label": cls}})
                i += 1
        lengths = [min(PER_SHARD, count - k) for k in range(0, count, PER_SHARD)]
        names = [f"digits-{split}-{k:04d}.tar" for k in range(len(lengths))]
        info["splits"][split] = {"name": split, "num_samples": count, "filenames": names, "shard_lengths": lengths}
    (out / "_info.json").write_text(json.dumps(info))


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def timm_style(tmp_path_factory, digits_dir) -> Path:
    out = tmp_path_factory.mktemp("timm_style") / "wds"
    write_timm_style(out, digits_dir)
    return out


def test_verify_accepts_them_and_reports_the_label_range(capsys, timm_style):
    code, text = run(capsys, "verify", timm_style, "--no-progress", "--workers", "1")
    assert code == 0, text
    assert "labels 0..9 seen; no class list in _info.json" in text
    assert "80 samples in 4 shards decoded; OK" in text


def test_num_classes_checks_the_range_and_names_the_sample(capsys, timm_style):
    code, text = run(capsys, "verify", timm_style, "--no-progress", "--workers", "1", "--num-classes", "10")
    assert code == 0 and "labels 0..9 seen; checked against 10 classes (--num-classes)" in text, text
    code, text = run(capsys, "verify", timm_style, "--no-progress", "--workers", "1", "--num-classes", "8")
    assert code == 1
    bad = [line for line in text.splitlines() if "not in [0, 8)" in line]
    assert bad and all(line.startswith("digits-") and ": .cls " in line for line in bad), text
    assert bad[0].split(": ")[1].split("_")[0] in SPLITS  # the sample's key
    assert f"FAILED: {len(bad)} problems" in text


def test_multi_label_without_a_class_list_passes_and_widens_the_range(capsys, tmp_path, digits_dir):
    out = tmp_path / "multi"
    write_timm_style(out, digits_dir, label_of=lambda i, label: f"{label},{label + 10}" if i % 3 == 0 else label)
    code, text = run(capsys, "verify", out, "--no-progress", "--workers", "1")
    assert code == 0 and "labels 0..19 seen; no class list in _info.json" in text, text


def test_the_stream_reads_what_verify_accepted(timm_style):
    cfg = DataConfig(train_shards=str(timm_style), num_workers=0)
    with build_train_loader(cfg, img_size=16, batch_size=20, pin_memory=False) as loader:
        batches = [batch for _, batch in zip(range(loader.batches_per_epoch), loader, strict=False)]
    labels = sorted(int(y) for batch in batches for y in batch["label"])
    assert len(labels) == SPLITS["train"] and 0 <= labels[0] and labels[-1] <= 9
    assert loader.bad_counts() == {"bad_samples": 0, "bad_shards": 0}

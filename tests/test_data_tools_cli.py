"""data_tools command line: one-line errors with exit code 2, verify finding real problems, info, digits."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from webdataset.writer import TarWriter

from data_tools import format as fmt
from data_tools.__main__ import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line, no traceback
    for w in words:
        assert w in lines[0]


def test_missing_src_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "shard", tmp_path / "nope", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "does not exist", "nope")
    assert not (tmp_path / "out").exists()


def test_empty_class_folder_exits_2(capsys, digits_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(digits_dir / "4", src / "4")
    (src / "9").mkdir()
    code, _, err = run(capsys, "shard", src, tmp_path / "out", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "'9'", "no samples")


def test_out_holding_a_different_dataset_exits_2(capsys, digits_dir, digits_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(digits_shards, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run(capsys, "shard", digits_dir, out, "--seed", "1", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "different dataset")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.pdf").write_bytes(b"%PDF")
    code, _, err = run(capsys, "shard", digits_dir, tmp_path / "other", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "not written by data_tools")


def test_bad_options_exit_2(capsys, digits_dir, tmp_path):
    code, _, err = run(capsys, "shard", digits_dir, digits_dir / "shards")
    assert code == 2
    assert_one_line_error(err, "inside SRC")
    code, _, err = run(capsys, "shard", digits_dir, tmp_path / "o", "--val-per-class", "2", "--val-fraction", "0.1")
    assert code == 2
    assert_one_line_error(err, "not both")
    code, _, err = run(capsys, "shard", digits_dir, tmp_path / "o", "--classes", tmp_path / "missing.txt")
    assert code == 2
    assert_one_line_error(err, "--classes")


def test_strict_exits_2_naming_the_file(capsys, digits_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(digits_dir / "1", src / "1")
    (src / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = run(capsys, "shard", src, tmp_path / "out", "--strict", "--workers", "1", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "1/broken.png", "--strict")


def test_shard_cli_prints_summary_with_patterns(capsys, digits_dir, tmp_path):
    code, out, _ = run(
        capsys,
        "shard",
        digits_dir,
        tmp_path / "o",
        "--samples-per-shard",
        "500",
        "--val-fraction",
        "0.1",
        "--resize-shorter",
        "16",
        "--workers",
        "2",
        "--no-progress",
    )
    assert code == 0
    assert "train: 1,617 samples in 4 shards" in out and "train-{000000..000003}.tar" in out
    assert "val: 180 samples in 1 shards" in out and "val-000000.tar" in out and "skipped: 0" in out
    code, out, _ = run(capsys, "verify", tmp_path / "o", "--no-progress")
    assert code == 0 and "1,797 samples in 5 shards decoded; OK" in out


def test_verify_passes_on_good_shards(capsys, digits_shards):
    code, out, _ = run(capsys, "verify", digits_shards, "--workers", "2", "--no-progress")
    assert code == 0 and "1,797 samples in 10 shards decoded; OK (10 of 10 sample indexes checked)" in out


def test_verify_checks_each_sample_index_against_its_shard(capsys, digits_shards, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(digits_shards, out)
    _rewrite_shard(out / "train-000001.tar", lambda i, s: None if i == 5 else s, reindex=False)  # index now stale
    (out / "train-000002.tar.idx").write_bytes(b"garbage")
    (out / "train-000003.tar.idx").unlink()  # optional: nothing to check
    with open(out / "train-000004.tar", "rb") as f:  # the writer's index is the one verify expects
        assert fmt.index_bytes(fmt.scan_index(f)) == (out / "train-000004.tar.idx").read_bytes()
    lengths = json.loads((out / "_info.json").read_text())["splits"]["train"]["shard_lengths"]
    lengths[1] -= 1  # keep the count check quiet: only the index is wrong
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = lengths
    info["splits"]["train"]["num_samples"] -= 1
    (out / "_info.json").write_text(json.dumps(info))
    code, text, _ = run(capsys, "verify", out, "--no-progress", "--workers", "1")
    assert code == 1
    n = lengths[1]
    assert f"train-000001.tar.idx: does not match its shard ({n + 1} samples indexed, {n} read; differs" in text
    assert "train-000002.tar.idx: not a shard index (bad magic or length)" in text
    assert "FAILED: 2 problems (9 of 10 sample indexes checked)" in text


def _rewrite_shard(path, edit, reindex: bool = True) -> None:
    """Rewrite a shard, passing each sample dict through `edit` (returns the sample or None to drop it), and its
    sample index as the writer does (unless `reindex` is False: a stale index)."""
    samples, cur = [], {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if cur and cur["__key__"] != key:
                samples.append(cur)
                cur = {}
            cur["__key__"] = key
            cur[ext] = tf.extractfile(m).read()
    samples.append(cur)
    with open(path, "wb") as f, TarWriter(f, encoder=False, mtime=0) as tw:
        for i, s in enumerate(samples):
            s = edit(i, s)
            if s is not None:
                tw.write(s)
    if reindex:
        with open(path, "rb") as f:
            Path(fmt.index_name(str(path))).write_bytes(fmt.index_bytes(fmt.scan_index(f)))


def test_verify_reports_shard_and_key_of_each_problem(capsys, digits_shards, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(digits_shards, out)
    keys = {}

    def corrupt(i, s):
        if i == 0:
            keys["cls"] = s["__key__"]
            return {**s, "cls": b"42"}
        if i == 1:
            keys["png"] = s["__key__"]
            return {**s, "png": s["png"][:60]}
        if i == 2:
            keys["json"] = s["__key__"]
            return {**s, "json": json.dumps({**json.loads(s["json"]), "class": "x"}).encode()}
        return None if i == 3 else s  # drop one sample: count no longer matches _info.json

    _rewrite_shard(out / "train-000002.tar", corrupt)
    shutil.copy(out / "val-000000.tar", out / "val-000001.tar")  # a stray shard not in _info.json
    code, text, _ = run(capsys, "verify", out, "--no-progress")
    assert code == 1
    assert f"train-000002.tar: {keys['cls']}: .cls 42 not in [0, 10)" in text
    assert f"train-000002.tar: {keys['png']}: .png does not decode" in text
    assert f"train-000002.tar: {keys['json']}: .json class 'x'" in text
    assert "train-000002.tar: holds 199 samples, _info.json says 200" in text
    assert "val-000001.tar: shard file not listed" in text
    assert "FAILED: 5 problems" in text


def test_verify_without_info_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "verify", tmp_path)
    assert code == 2
    assert_one_line_error(err, "_info.json")


def test_info_prints_splits_classes_and_sizes(capsys, digits_shards):
    code, out, _ = run(capsys, "info", digits_shards)
    assert code == 0
    assert "10 classes: 0, 1, 2, 3, 4, ... (10 in all)" in out
    assert "train: 1,747 samples in 9 shards" in out and "train-{000000..000008}.tar" in out
    assert "val: 50 samples in 1 shards" in out
    assert "samples per shard: 147..200" in out
    assert "shorter side (original, px): 32-63: 1747" in out


def test_digits_command_is_idempotent(capsys, tmp_path, digits_dir):
    code, out, _ = run(capsys, "digits", tmp_path / "d")
    assert code == 0 and "1,797" in out
    a = sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*.png"))
    assert a == sorted(p.relative_to(digits_dir) for p in digits_dir.rglob("*.png"))
    assert (tmp_path / "d" / "5" / "0005.png").read_bytes() == (digits_dir / "5" / "0005.png").read_bytes()
    assert run(capsys, "digits", tmp_path / "d")[0] == 0  # already there: left as is
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("a")
    code, _, err = run(capsys, "digits", tmp_path / "x")
    assert code == 2
    assert_one_line_error(err, "not empty")


def test_webdataset_decodes_samples(digits_shards):
    import webdataset as wds

    ds = wds.WebDataset(str(digits_shards / "val-000000.tar"), shardshuffle=False).decode("pil").to_tuple("png", "cls")
    items = list(ds)
    assert len(items) == 50 and all(img.size == (32, 32) and 0 <= cls < 10 for img, cls in items)


def test_verify_finds_samples_duplicated_across_shards(capsys, digits_shards, tmp_path):
    out = tmp_path / "dup"
    shutil.copytree(digits_shards, out)
    shutil.copy(out / "train-000000.tar", out / "train-000001.tar")  # same 200 samples twice, counts still right
    code, text, _ = run(capsys, "verify", out, "--no-progress")
    assert code == 1
    assert "train-000000.tar: holds keys that also appear in another shard" in text
    assert "train-000001.tar: holds keys that also appear in another shard" in text


def test_info_and_verify_accept_shards_made_elsewhere(capsys, digits_shards, tmp_path):
    # Only timm's keys: no class_names, stats or options, as in other public WebDataset releases.
    out = tmp_path / "ext"
    out.mkdir()
    shutil.copy(digits_shards / "val-000000.tar", out / "imagenet-val-000000.tar")
    split = {"name": "val", "num_samples": 50, "filenames": ["imagenet-val-000000.tar"], "shard_lengths": [50]}
    (out / "_info.json").write_text(json.dumps({"name": "ext", "num_classes": 10, "splits": {"val": split}}))
    code, text, _ = run(capsys, "info", out)
    assert code == 0 and "val: 50 samples in 1 shards, 0.2 MB: imagenet-val-000000.tar" in text
    code, text, _ = run(capsys, "verify", out, "--no-progress", "--workers", "1")
    assert code == 0 and "50 samples in 1 shards decoded; OK" in text


def test_verify_passes_multi_label_cls(capsys, digits_shards, tmp_path):
    out = tmp_path / "multi"
    shutil.copytree(digits_shards, out)
    keys = []

    def second_label(i, s):
        if i % 2:
            return s
        keys.append(s["__key__"])
        first = int(s["cls"])
        return {**s, "cls": f"{first},{(first + 3) % 10}".encode()}  # multi-label: `3,6`

    _rewrite_shard(out / "val-000000.tar", second_label)
    assert len(keys) == 25
    code, text, _ = run(capsys, "verify", out, "--no-progress", "--workers", "1")
    assert code == 0 and "1,797 samples in 10 shards decoded; OK" in text, text


def test_verify_reports_non_integer_cls(capsys, digits_shards, tmp_path):
    out = tmp_path / "cat"
    shutil.copytree(digits_shards, out)
    keys = {}

    def bad_label(i, s):
        if i in (0, 1):
            keys[i] = s["__key__"]
            return {**s, "cls": [b"cat", b"3,x"][i]}
        return s

    _rewrite_shard(out / "val-000000.tar", bad_label)
    code, text, _ = run(capsys, "verify", out, "--no-progress", "--workers", "1")
    assert code == 1
    assert f"val-000000.tar: {keys[0]}: .cls is not an integer label (b'cat')" in text
    assert f"val-000000.tar: {keys[1]}: .cls is not an integer label (b'3,x')" in text
    assert "FAILED: 2 problems" in text


def test_verify_accepts_exactly_the_labels_the_stream_reads(digits_shards, tmp_path):
    from data_tools.verify import verify
    from pretrain.data.decode import BadSample, label_of, read_shard

    good = [b"3", b"3,7", b" 3 , 7 ", b"3 7", b"+3"]
    bad = [b"cat", b"3,x", b"", b",", b"-1", b"3,-1", b"3.0", b"\xff"]
    values = good + bad
    out = tmp_path / "labels"
    shutil.copytree(digits_shards, out)
    written = {}

    def label(i, s):  # no .json: its class name would not match the new label
        written[s["__key__"]] = values[i % len(values)]
        return {"__key__": s["__key__"], "png": s["png"], "cls": values[i % len(values)]}

    _rewrite_shard(out / "val-000000.tar", label)
    rejected = set()
    for _, raw in read_shard(str(out / "val-000000.tar")):
        try:
            label_of(raw)
        except BadSample:
            rejected.add(raw.key)
    assert rejected == {k for k, v in written.items() if v in bad}
    problems = verify(out, workers=1, progress=False)["problems"]
    assert {p.split(": ")[1] for p in problems} == rejected

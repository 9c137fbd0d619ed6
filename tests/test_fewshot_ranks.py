"""Few-shot evaluation in real DeepSpeed runs (issue 25): a 2-rank ZeRO-3 training run logs it every N steps and at
the end with the same k-shot draw before and after a crash and resume; the features and accuracies of one
checkpoint are the same on 2 ranks (ZeRO-3) and on 1; and every export format gives the same table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pretrain.export import FORMATS, export_checkpoint
from pretrain.fewshot.__main__ import main as fewshot_main
from pretrain.ports import free_port
from tests.test_train import DEEPSPEED, ROOT, launch

pytestmark = pytest.mark.slow
HELPER = ROOT / "tests" / "helpers" / "fewshot_features.py"
FEWSHOT = ["fewshot.shots=1,5", "fewshot.every_steps=2", "deepspeed.zero_stage=3", "train.steps=4"]
FEWSHOT += ["checkpoint.every_steps=2", "train.eval_batches=1"]


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def run(digits_shards, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-3, few-shot at steps 2 and 4; SIGKILLed after step 3 and resumed from step 2's checkpoint."""
    out = tmp_path_factory.mktemp("fewshot_run") / "run"
    extra = [*FEWSHOT, f"fewshot.sets=digits={digits_shards}"]
    assert launch(digits_shards, out, *extra, env={"PRETRAIN_FAULT": "step:3"}, timeout=900) != 0
    (out.parent / "run.log").rename(out.parent / "first.log")  # the second launch writes run.log anew
    assert launch(digits_shards, out, *extra, timeout=900) == 0, (out.parent / "run.log").read_text()[-3000:]
    return out


def test_run_logs_fewshot_with_one_draw_across_evaluations_and_the_resume(run):
    first, second = (run.parent / "first.log").read_text(), (run.parent / "run.log").read_text()
    assert "fewshot step 2 | digits/1shot " in first and "fewshot step 4 | digits/1shot " in second
    assert "resumed from" in second and "fewshot step 2 " not in second
    fs = rows(run, "fewshot")
    assert [r["step"] for r in fs] == [2, 4]  # the first launch's evaluation at 2, the resumed launch's at the end
    assert fs[0]["digits/draw"] == fs[1]["digits/draw"]  # the same shots before and after the resume
    assert all(0.0 <= r[f"digits/{k}shot"] <= 1.0 for r in fs for k in (1, 5)) and all(r["time_s"] > 0 for r in fs)


def _features(run: Path, shards: Path, out: Path, ranks: int) -> dict:
    launcher = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [*launcher, str(HELPER), str(run), str(shards), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and out.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    return dict(np.load(out))


def test_two_rank_zero3_and_one_rank_give_the_same_features_and_accuracies(run, digits_shards, tmp_path):
    two = _features(run, digits_shards, tmp_path / "two.npz", 2)
    one = _features(run, digits_shards, tmp_path / "one.npz", 1)
    assert int(two["world"]) == 2 and int(one["world"]) == 1
    for key in ("train", "test"):
        assert two[key].shape == one[key].shape and two[key].shape[0] == {"train": 50, "test": 50}[key]
        np.testing.assert_allclose(two[key], one[key], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(two[f"{key}_labels"], one[f"{key}_labels"])
    v2, v1 = json.loads(str(two["values"])), json.loads(str(one["values"]))
    v2.pop("time_s"), v1.pop("time_s")
    assert v2 == v1 and set(v1) == {"digits/1shot", "digits/5shot", "digits/draw"}


def test_every_export_format_gives_the_same_table(run, digits_shards, tmp_path, capsys):
    tables = {}
    for fmt in FORMATS:
        export_checkpoint(run, tmp_path / fmt, fmt, head="drop")
        argv = ["--weights", str(tmp_path / fmt), "--data", f"digits={digits_shards}", "--shots", "1,5"]
        assert fewshot_main([*argv, "--no-progress", "--precision", "fp32"]) == 0, fmt
        tables[fmt] = capsys.readouterr().out.splitlines()[1:]
    assert len({tuple(t) for t in tables.values()}) == 1, tables

"""The pretraining loop on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo): ZeRO 1/2/3, checkpointing, exact resume,
crashes (also during a save), two "nodes" over loopback, and clear failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint_format import find_complete, read_meta
from pretrain.config import load_config
from pretrain.ports import free_port
from pretrain.train.__main__ import main
from pretrain.train.engine import lr_lambda
from tests.conftest import DIGITS_VAL_PER_CLASS

pytestmark = pytest.mark.slow
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "train.steps=8",
    "train.micro_batch_size=16",
    "train.global_batch_size=32",
    "log.every_steps=1",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=5",
    "schedule.warmup_steps=2",
    "optim.lr=0.003",
    "data.num_workers=1",
    "train.eval_batches=2",
    "model.drop_path_rate=0.1",  # dropout draws from the global RNG: resume must restore it exactly
    "log.tensorboard=false",
]


def launch(
    shards: Path, out: Path, *extra: str, env: dict | None = None, timeout: int = 400, cwd: Path | None = None
) -> int:
    """`deepspeed --num_gpus 2 --module pretrain.train` on this machine's CPU; returns the exit code. `cwd`: the
    source tree whose `pretrain` the ranks run (`python -m` imports from the working folder first)."""
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "pretrain.train",
        "--config",
        "configs/tiny_digits.yaml",
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        f"run.output_dir={out}",
        *BASE,
        *extra,
    ]
    return run_logged(cmd, out.parent / f"{out.name}.log", env, timeout, cwd)


def run_logged(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 400, cwd: Path | None = None) -> int:
    """Run a launcher in its own process group, so that a timeout kills its ranks too; output goes to `log`."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def losses(out: Path) -> dict[int, float]:
    """Training loss by step from metrics.jsonl; a step logged twice (before a crash and after) keeps the last."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def fp32_weights(out: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)


@pytest.fixture(scope="module")
def reference(digits_shards, tmp_path_factory):
    """The uninterrupted run every crash/resume test compares with (ZeRO-2, bf16, checkpointing on)."""
    out = tmp_path_factory.mktemp("train") / "reference"
    assert launch(digits_shards, out) == 0, (out.parent / "reference.log").read_text()[-3000:]
    return out


def test_reference_run_writes_checkpoints_metrics_and_eval(reference):
    ckpts = reference / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000008"
    meta = json.loads((ckpts / "step_00000008" / "pretrain_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["class_names"][:3] == ["0", "1", "2"]
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["images_per_s"] > 0 and r["mfu"] is None for r in train)  # no MFU without a known peak (CPU)
    assert [(r["skipped_steps"], r["bad_samples"], r["epoch"]) for r in train] == [(0, 0, 0)] * 8
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["step"], r["samples"]) for r in evals] == [(8, 10 * DIGITS_VAL_PER_CLASS)]  # the whole held-out split
    assert (reference / "config.yaml").is_file()


def test_resume_after_kill_is_bit_identical(reference, digits_shards, tmp_path):
    out = tmp_path / "killed"
    assert launch(digits_shards, out, env={"PRETRAIN_FAULT": "step:6"}) != 0  # SIGKILL after step 6
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert launch(digits_shards, out) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "killed.log").read_text()
    assert losses(out) == losses(reference)  # every step, exactly
    ours, ref = fp32_weights(out, "step_00000008"), fp32_weights(reference, "step_00000008")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


FLAT_LAYOUT_COMMIT = "332af2841421607a7f946c7d3db04c5a452f18df"
"""The last commit whose checkpoints hold the flat client state (before it was keyed by part)."""


def test_checkpoint_of_the_flat_layout_resumes(reference, digits_shards, tmp_path):
    """A checkpoint written by the code before the client state was keyed by part (checked out from git and run as
    is) resumes under this code: model, optimizer and step from the checkpoint; its input stream (a per-rank state of
    the order before issue 24) goes on at the same epoch and global batch of the elastic order, with a warning. The
    order itself changed, so the losses after the resume are not the reference's (before the elastic order they
    were, bit for bit)."""
    old = tmp_path / "old_source"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", FLAT_LAYOUT_COMMIT, "pretrain", "data_tools", "configs"],
        capture_output=True,
    )
    if archive.returncode:
        pytest.skip(f"commit {FLAT_LAYOUT_COMMIT[:7]} is not in this checkout's history (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    out = tmp_path / "flat"
    assert launch(digits_shards, out, env={"PRETRAIN_FAULT": "step:6"}, cwd=old) != 0  # SIGKILL after step 6
    tag = out / "checkpoints" / "step_00000004"
    client = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert "parts" not in client and client["step"] == 4 and len(client["stream"]) == 2  # the flat layout
    assert launch(digits_shards, out) == 0, (tmp_path / "flat.log").read_text()[-3000:]
    log = (tmp_path / "flat.log").read_text()
    assert "resumed from" in log and "written before the elastic order (version 1)" in log
    assert "epoch 0, global batch 4 of the new order" in log  # 4 steps of 32 samples
    assert sorted(losses(out)) == list(range(1, 9))
    assert read_meta(out / "checkpoints" / "step_00000008")["stream"]["consumed"] == 8 * 32 // 2  # C = 2


def test_kill_during_save_resumes_from_previous_complete_checkpoint(reference, digits_shards, tmp_path):
    out = tmp_path / "save_crash"
    assert launch(digits_shards, out, env={"PRETRAIN_FAULT": "save:8"}) != 0  # killed in the middle of the save
    half = out / "checkpoints" / "step_00000008"
    assert half.is_dir() and not (half / "pretrain_meta.json").exists()  # DeepSpeed's files, never marked complete
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert launch(digits_shards, out) == 0, (tmp_path / "save_crash.log").read_text()[-3000:]
    assert losses(out) == losses(reference)
    ours, ref = fp32_weights(out, "step_00000008"), fp32_weights(reference, "step_00000008")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train_and_loss_falls(digits_shards, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    # warm-up shorter than the run (the recipe's 30 steps would cover most of the run): the loss must visibly fall
    extra = ("train.steps=40", "checkpoint.every_steps=40", "schedule.warmup_steps=4")
    rc = launch(digits_shards, out, f"deepspeed.zero_stage={stage}", *extra)
    assert rc == 0, (tmp_path / f"zero{stage}.log").read_text()[-3000:]
    lo = list(losses(out).values())
    assert sum(lo[-4:]) / 4 < sum(lo[:4]) / 4 - 0.05, lo


def test_grad_checkpointing_off_gives_the_same_losses(reference, digits_shards, tmp_path):
    out = tmp_path / "no_ckpt"
    assert launch(digits_shards, out, "train.grad_checkpointing=false", "train.steps=4") == 0
    ref = losses(reference)
    assert losses(out) == {s: ref[s] for s in range(1, 5)}


def test_two_nodes_over_loopback(digits_shards, tmp_path):
    """Two launchers, one per "node" (slots=1 each), joined over 127.0.0.1 as on a real cluster."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out, port = tmp_path / "two_nodes", free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [
            DEEPSPEED,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--module",
            "pretrain.train",
            "--config",
            "configs/tiny_digits.yaml",
            f"data.train_shards={digits_shards}",
            f"data.val_shards={digits_shards}",
            f"run.output_dir={out}",
            *BASE,
            "train.steps=3",
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        )
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:]
    meta = json.loads((out / "checkpoints" / "step_00000003" / "pretrain_meta.json").read_text())
    assert meta["world_size"] == 2
    assert sorted(losses(out)) == [1, 2, 3]


def test_missing_shard_folder_fails_fast_under_the_launcher(tmp_path):
    rc = launch(tmp_path / "no_such_folder", tmp_path / "run", timeout=120)
    assert rc != 0
    assert "error: " in (tmp_path / "run.log").read_text()


def test_bad_config_and_missing_shards_exit_2_with_one_line(tmp_path, capsys, digits_shards):
    assert main(["--config", "configs/tiny_digits.yaml", "train.stepz=3"]) == 2
    assert main(["--config", "configs/tiny_digits.yaml", f"data.train_shards={tmp_path / 'nope'}"]) == 2
    assert (
        main(
            [
                "--config",
                "configs/tiny_digits.yaml",
                f"data.train_shards={digits_shards}",
                "data.val_shards=",
                "model.num_classes=7",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "model.num_classes=7" in err[2]


def test_resume_into_another_model_shape_is_refused(reference, digits_shards, capsys):
    rc = main(
        [
            "--config",
            "configs/tiny_digits.yaml",
            f"data.train_shards={digits_shards}",
            "data.val_shards=",
            f"run.output_dir={reference}",
            "model.img_size=48",
        ]
    )
    assert rc == 2
    assert "another shape" in capsys.readouterr().err


def test_resume_on_another_world_size_through_universal_checkpoint(reference, digits_shards, tmp_path):
    """2 ranks -> 1 rank: convert with vit-universal, resume with plain `python -m pretrain.train`."""
    import shutil

    from pretrain.train.universal import main as universal_main

    run = tmp_path / "resized"
    shutil.copytree(reference, run)
    for tag in ("step_00000008", "latest"):  # continue from step 4 as if the 2-rank job had stopped there
        target = run / "checkpoints" / tag
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert universal_main([str(run / "checkpoints" / "step_00000004")]) == 0
    uni = run / "checkpoints" / "step_00000004_universal"
    assert (uni / "zero").is_dir() and (uni / "pretrain_meta.json").is_file()
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        "--config",
        "configs/tiny_digits.yaml",
        f"data.train_shards={digits_shards}",
        f"data.val_shards={digits_shards}",
        f"run.output_dir={run}",
        f"train.resume={uni}",
        *BASE,
    ]
    log = tmp_path / "resized.log"
    assert run_logged(cmd, log) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    meta = json.loads((run / "checkpoints" / "step_00000008" / "pretrain_meta.json").read_text())
    assert meta["world_size"] == 1
    # same weights at step 4, other batches after it: the first resumed loss is close to the 2-rank run's
    assert abs(losses(run)[5] - losses(reference)[5]) < 0.2


def test_nonfinite_loss_skips_the_step_and_too_many_stop_the_run(digits_shards, tmp_path):
    out = tmp_path / "nan_once"
    assert launch(digits_shards, out, "train.steps=4", env={"PRETRAIN_FAULT": "nan:2"}) == 0
    rows = {
        r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    }
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    # 4 steps, one skipped: the schedule advanced 3 times (DeepSpeed steps it only when the update is applied)
    cfg = load_config("configs/tiny_digits.yaml", [*BASE, "train.steps=4"])
    factor = lr_lambda(cfg.schedule, cfg.train.steps)
    assert rows[4]["lr"] == pytest.approx(cfg.optim.lr * factor(3))
    assert rows[4]["lr"] != pytest.approx(cfg.optim.lr * factor(4))
    out = tmp_path / "nan_always"
    rc = launch(digits_shards, out, "train.steps=8", "train.max_nonfinite_steps=3", env={"PRETRAIN_FAULT": "nan:all"})
    assert rc != 0
    assert "3 steps in a row had non-finite gradients" in (tmp_path / "nan_always.log").read_text()


def test_test_helper_saves_through_the_trainers_checkpointer(reference, tmp_path):
    """tests/helpers/make_ds_checkpoint.py (behind the export tests) writes what a training run writes: a tag that
    `find_complete` picks, the same META fields and the same DeepSpeed client state (less the input stream)."""
    run = tmp_path / "helper"
    helper = ROOT / "tests" / "helpers" / "make_ds_checkpoint.py"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(helper), str(run), "--stage", "2"]
    log = tmp_path / "helper.log"
    assert run_logged(cmd, log, env={"PYTHONPATH": str(ROOT)}) == 0, log.read_text()[-3000:]
    ours, theirs = find_complete(run), find_complete(reference)
    assert ours.name == "step_00000002" and (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert list(read_meta(ours)) == list(read_meta(theirs))
    # Our own test checkpoints: DeepSpeed pickles non-tensor objects (its config, our client state) in this file.
    states = [torch.load(d / "mp_rank_00_model_states.pt", weights_only=False) for d in (ours, theirs)]
    assert set(states[0]) == set(states[1])
    parts = [s["parts"] for s in states]  # the client state, keyed by part
    assert set(parts[0]) == set(parts[1]) - {"stream"} == {"state", "rng"}
    assert parts[0]["state"]["step"] == 2 and parts[0]["state"]["samples_seen"] == 2 * 2 * 2  # 2 steps, 2 ranks x 2
    assert len(parts[0]["rng"]) == 2  # a per-rank part: every rank's state
    assert parts[1]["stream"]["version"] == 2  # the stream's: the ranks' states merged into one record

"""Pieces of the training loop that need no process group: DeepSpeed JSON, schedule, groups, losses, checkpoints,
the run's counters, fault injection, metrics and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint_format as fmt
from pretrain.config import BatchPlan, ConfigError, load_config
from pretrain.losses import classification_loss
from pretrain.models.vit import create_vit, resolve_args
from pretrain.train import checkpointer as ckpt
from pretrain.train import faults
from pretrain.train.distributed import rng_state
from pretrain.train.engine import deepspeed_config, lr_lambda, param_groups
from pretrain.train.evaluate import Evaluator
from pretrain.train.metrics import format_line
from pretrain.train.plot import main as plot_main
from pretrain.train.state import RankRNG, TrainingError, TrainState, set_determinism


def cfg_with(*overrides):
    return load_config("configs/tiny_digits.yaml", list(overrides))


def test_deepspeed_json_is_derived_from_the_config():
    cfg = cfg_with(
        "deepspeed.zero_stage=3",
        "train.micro_batch_size=8",
        "train.global_batch_size=64",
        "train.precision=bf16",
        "optim.grad_clip=0.5",
        "optim.lr=1e-3",
    )
    plan = BatchPlan.of(cfg.train, world_size=4)
    ds = deepspeed_config(plan, cfg.train, cfg.optim, cfg.deepspeed, on_cuda=True)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2  # 64 / (8 x 4)
    assert ds["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's fused Adam on CUDA
    cpu = deepspeed_config(plan, cfg.train, cfg.optim, cfg.deepspeed, on_cuda=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="world size \\(3\\)"):
        BatchPlan.of(cfg.train, world_size=3)


def test_lr_schedule_warmup_then_decay_to_floor():
    cfg = cfg_with("train.steps=100", "schedule.warmup_steps=10", "schedule.decay=cosine", "schedule.min_lr_ratio=0.1")
    factor = lr_lambda(cfg.schedule, cfg.train.steps)  # what the engine hands DeepSpeed's LambdaLR
    f = [factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    lin = cfg_with("train.steps=100", "schedule.warmup_steps=10", "schedule.decay=linear", "schedule.min_lr_ratio=0")
    assert lr_lambda(lin.schedule, lin.train.steps)(55) == pytest.approx(0.5)


def test_no_weight_decay_on_biases_norms_pos_embed_cls_token():
    model = create_vit("vit_test_patch4", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_losses_softmax_with_smoothing_and_sigmoid():
    logits = torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    soft = cfg_with("train.loss=softmax", "train.label_smoothing=0.1").train
    assert classification_loss(logits, y, soft.loss, soft.label_smoothing) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1).item()
    )
    sig = cfg_with("train.loss=sigmoid").train
    onehot = torch.nn.functional.one_hot(y, 10).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / 4
    assert classification_loss(logits, y, sig.loss).item() == pytest.approx(expected.item(), rel=1e-6)
    assert classification_loss(logits, onehot, sig.loss).item() == pytest.approx(expected.item(), rel=1e-6)


def _fake_tag(d, step, complete=True):
    tag = d / fmt.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.write_meta(d, tag.name, {"step": step, "model_args": {}})


def test_newest_complete_never_picks_a_half_written_tag(tmp_path):
    d = tmp_path / "checkpoints"
    _fake_tag(d, 100)
    _fake_tag(d, 200)
    _fake_tag(d, 300, complete=False)  # the run died while saving step 300
    assert fmt.newest_complete(d) == "step_00000200"
    (d / "latest").write_text("step_00000300")  # even if `latest` points at it
    assert fmt.newest_complete(d) == "step_00000200"
    assert ckpt.resolve_resume("auto", tmp_path) == (d, "step_00000200")
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(fmt.CheckpointError, match="incomplete"):
        ckpt.resolve_resume(str(d / "step_00000300"), tmp_path)
    with pytest.raises(fmt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "elsewhere"), tmp_path)


def test_prune_keeps_last_k_and_every_mth(tmp_path):
    d = tmp_path / "checkpoints"
    for s in (100, 200, 300, 400, 500):
        _fake_tag(d, s)
    _fake_tag(d, 250, complete=False)
    ckpt.prune(d, keep_last=2, keep_every=200)
    assert [t for _, t in fmt.complete_tags(d)] == ["step_00000200", "step_00000400", "step_00000500"]
    assert not (d / "step_00000250").exists()


def test_model_shape_mismatch_is_refused():
    import dataclasses

    args = resolve_args("vit_test_patch4", num_classes=10)
    meta = {"model_args": dataclasses.asdict(args)}
    ckpt.check_model_matches(meta, args, "x")
    other = resolve_args("vit_test_patch4", num_classes=10, img_size=48)
    with pytest.raises(fmt.CheckpointError, match="img_size: checkpoint 32 vs config 48"):
        ckpt.check_model_matches(meta, other, "x")


def test_resume_of_another_world_size_needs_a_universal_checkpoint(tmp_path):
    import dataclasses

    args = resolve_args("vit_test_patch4", num_classes=10)
    d = tmp_path / "checkpoints"
    (d / "step_00000004").mkdir(parents=True)
    ckpt.write_meta(d, "step_00000004", {"step": 4, "world_size": 2, "model_args": dataclasses.asdict(args)})
    target = ckpt.resolve_resume("auto", tmp_path)
    ckpt.check_resumable(target, args, world_size=2)
    with pytest.raises(fmt.CheckpointError, match="written by 2 ranks, this run has 1; convert it with"):
        ckpt.check_resumable(target, args, world_size=1)
    assert not ckpt.is_universal(target)
    (d / "step_00000004" / "zero").mkdir()  # what `ds_to_universal` writes
    assert ckpt.is_universal(target)
    ckpt.check_resumable(target, args, world_size=1)
    with pytest.raises(fmt.CheckpointError, match="another shape"):
        ckpt.check_resumable(target, resolve_args("vit_test_patch4", num_classes=7), world_size=2)


def test_saves_and_evaluations_fall_on_their_steps():
    cfg = cfg_with("train.steps=10", "checkpoint.every_steps=4", "train.eval_every_steps=5")
    saver = ckpt.Checkpointer(cfg.checkpoint, Path("unused"), total_steps=10, target=None, run_meta={})
    assert [s for s in range(1, 11) if saver.due(s)] == [4, 8, 10]  # and always the last step
    evaluator = Evaluator(None, cfg.train, num_classes=10)
    assert [s for s in range(1, 11) if evaluator.due(s)] == [5]  # the one at the end is the loop's
    assert evaluator.run(engine=None) == {}  # no held-out split: nothing to evaluate


def test_set_determinism_seeds_the_rank_and_rank_rng_restores_its_own_state():
    mixup = set_determinism(seed=1, rank=1)
    assert torch.initial_seed() == 1001 and mixup.initial_seed() == 1001
    rng = RankRNG(mixup, rank=1, world_size=2)
    assert rng.per_rank and not TrainState.per_rank  # the checkpointer gathers the one, not the other
    saved = rng.state_dict()
    first = torch.rand(3), torch.rand(3, generator=mixup)
    other = rng_state(torch.Generator().manual_seed(5))
    rng.load_state_dict([other, saved])  # every rank's state: this rank takes its own
    assert torch.equal(torch.rand(3), first[0]) and torch.equal(torch.rand(3, generator=mixup), first[1])
    rng.load_state_dict([saved])  # 1 rank saved it
    assert not torch.equal(torch.rand(3), first[0])  # another world size: this rank's stream goes on unrestored
    state = TrainState()
    state.load_state_dict({"step": 6, "samples_seen": 384, "nonfinite_steps": 1})
    assert state.state_dict() == {"step": 6, "samples_seen": 384, "nonfinite_steps": 1}


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_the_run():
    state = TrainState()
    for applied in (False, False, True, False, False):
        state.advance(64)
        state.count_nonfinite(applied, limit=3)
    assert state.nonfinite_steps == 4 and state.samples_seen == 320
    state.advance(64)
    with pytest.raises(TrainingError, match="^3 steps in a row had non-finite gradients \\(at step 6\\)"):
        state.count_nonfinite(False, limit=3)


def test_fault_injection_only_where_asked(monkeypatch):
    monkeypatch.delenv("PRETRAIN_FAULT", raising=False)
    assert not faults.injected("nan", 3)
    monkeypatch.setenv("PRETRAIN_FAULT", "nan:3")
    assert faults.injected("nan", 3) and not faults.injected("nan", 4) and not faults.injected("save", 3)
    monkeypatch.setenv("PRETRAIN_FAULT", "nan:all")
    assert all(faults.injected("nan", s) for s in (1, 7, 100))


def test_metrics_line_and_plot(tmp_path, capsys):
    line = format_line("train", 7, {"loss": 1.5, "lr": 1e-3, "mfu": None, "images_per_s": 100.0, "eta_s": 3725})
    assert line == "train step 7 | loss 1.5000 | lr 1.00e-03 | 100.0 img/s | MFU n/a | ETA 1:02:05"
    rows = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3, "images_per_s": 10.0} for s in range(1, 6)]
    rows.append({"kind": "eval", "step": 5, "loss": 0.5, "top1": 0.9})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert plot_main([str(tmp_path)]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert plot_main([str(tmp_path / "missing")]) == 2

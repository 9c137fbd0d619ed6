"""W&B logging from the Metrics writer, offline (`WANDB_MODE=offline`): a run written with the metrics and config."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pretrain.config import BatchPlan, ConfigError, LogConfig, load_config, save_config
from pretrain.train.metrics import Metrics


def metrics(tmp_path, log: LogConfig) -> Metrics:
    plan = BatchPlan(micro_batch=4, accum_steps=1, world_size=1)
    return Metrics(
        tmp_path, log, plan, total_steps=2, rank=0, device=torch.device("cpu"), flops_per_image=1.0, run_name="unit"
    )


def test_offline_run_holds_the_metrics_and_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("configs/tiny_digits.yaml", ["optim.lr=0.007", "log.wandb=true", "log.wandb_tags=a,b"])
    save_config(cfg, tmp_path / "config.yaml")  # as rank 0 writes it before building the model
    m = metrics(tmp_path, cfg.log)
    m.write(1, {"loss": 2.5, "lr": 0.001, "mfu": None})
    m.write(2, {"loss": 2.25, "lr": 0.002})
    m.write(2, {"loss": 1.5, "top1": 0.75}, kind="eval")
    m.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (log,) = runs[0].glob("run-*.wandb")  # W&B's transaction log of protobuf records (strings stored as is)
    data = log.read_bytes()
    for key in (b"train/loss", b"train/lr", b"eval/loss", b"eval/top1"):
        assert key in data, key
    assert b"2.25" in data and b"0.75" in data and b"train/mfu" not in data  # None is not a number: not logged
    assert b"0.007" in data and b"vit_test_patch4" in data  # the resolved config: optim.lr, model.name
    assert b"unit" in data  # run name: `run.name` (passed as run_name)


def test_enabled_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"wandb is not installed: pip install 'vit-pretrain\[wandb\]' or set log.wandb=false"
    ):
        metrics(tmp_path, LogConfig(wandb=True, tensorboard=False))
    metrics(tmp_path, LogConfig(wandb=False, tensorboard=False)).close()  # off: no package needed

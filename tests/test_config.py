"""Config: YAML + dotted overrides into typed dataclasses, with one clear line for each mistake."""

import re
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    BatchPlan,
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    head_size,
    load_config,
    main,
    save_config,
)

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_i21k_recipe_values():
    cfg = load_config("configs/vit_b16_i21k.yaml")
    assert (cfg.train.global_batch_size, cfg.model.img_size, cfg.model.num_classes) == (4096, 224, 21843)
    assert cfg.schedule.warmup_steps == 10_000 and cfg.optim.lr == 1e-3


def test_overrides_are_typed():
    cfg = load_config(
        "configs/tiny_digits.yaml",
        ["optim.lr=3e-4", "model.name=vit_large_patch16", "train.grad_checkpointing=true", "data.mean=[0.1,0.2,0.3]"],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.name == "vit_large_patch16"
    assert cfg.train.grad_checkpointing is True
    assert cfg.data.mean == (0.1, 0.2, 0.3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("nosection.x=1", "unknown key nosection"),
        ("train.steps=abc", "train.steps='abc' must be an integer"),
        ("train.precision=fp8", "choose one of: bf16, fp16, fp32"),
        ("deepspeed.zero_stage=4", "choose one of: 0, 1, 2, 3"),
        ("train.global_batch_size=100", "multiple of train.micro_batch_size"),
        ("train.steps=0", "train.steps=0 must be > 0"),
        ("model.name=vit_gigantic", "model.name='vit_gigantic' is unknown"),
        ("train.grad_checkpointing=maybe", "must be true or false"),
        ("optim.lr", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("configs/tiny_digits.yaml", [override])


def test_batch_plan_splits_the_global_batch_over_ranks_and_micro_steps():
    cfg = load_config("configs/tiny_digits.yaml", ["train.micro_batch_size=16", "train.global_batch_size=64"])
    plan = BatchPlan.of(cfg.train, world_size=2)
    assert (plan.micro_batch, plan.accum_steps, plan.world_size) == (16, 2, 2)
    assert (plan.per_rank, plan.global_batch) == (32, 64)
    with pytest.raises(ConfigError, match="world size \\(3\\); use a multiple of 48"):
        BatchPlan.of(cfg.train, world_size=3)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.shuffle_buffer=0", "data.shuffle_buffer=0 must be > 0"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("data.eval_crop_pct=1.5", "data.eval_crop_pct=1.5 must be in (0, 1]"),
        ("model.drop_path_rate=1.0", "model.drop_path_rate=1.0 must be in [0, 1)"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
        ("schedule.min_lr_ratio=1", "schedule.min_lr_ratio=1.0 must be in [0, 1)"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be > 0"),
        ("log.every_steps=0", "log.every_steps=0 must be > 0"),
    ],
)
def test_each_section_checks_its_own_fields(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config("configs/tiny_digits.yaml", [override])


def test_rules_across_sections_and_stored_configs_are_checked_when_built():
    with pytest.raises(ConfigError, match="data.decode=gpu cannot run RandAugment"):
        load_config("configs/tiny_digits.yaml", ["data.decode=gpu", "data.randaugment_ops=2"])
    fp16 = ["train.precision=fp16", "train.loss=sigmoid", "model.head_bias_init=-10"]
    with pytest.raises(ConfigError, match="head_bias_init below -8 overflows fp16"):
        load_config("configs/tiny_digits.yaml", fp16)
    stored = Config().to_dict()
    stored["train"]["micro_batch_size"] = 3  # a stored config read back is typed and checked like a file
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size \\(3\\)"):
        config_from_dict(stored)


def test_head_size_comes_from_the_data_unless_the_model_sets_it():
    assert head_size(ModelConfig(), 10, []) == 10 and head_size(ModelConfig(), 0, ["a", "b"]) == 2
    assert head_size(ModelConfig(num_classes=7), 0, []) == 7
    with pytest.raises(ConfigError, match="model.num_classes=7 but the shards have 10 classes"):
        head_size(ModelConfig(num_classes=7), 10, [])
    with pytest.raises(ConfigError, match="model.num_classes is unset and the shards carry no class list"):
        head_size(ModelConfig(), 0, [])


def test_cli_prints_resolved_config(capsys):
    assert main(["configs/tiny_digits.yaml", "optim.lr=0.01"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.01 and printed["model"]["name"] == "vit_test_patch4"


@pytest.mark.parametrize(
    "text,argv_extra",
    [
        ("model: {name: vit_base_patch16, colour: red}\n", []),
        ("model: [1, 2\n", []),
        ("- just a list\n", []),
        ("train: {steps: 10}\n", ["train.steps=-1"]),
    ],
)
def test_cli_bad_file_one_line_exit_2(tmp_path, capsys, text, argv_extra):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main([str(bad), *argv_extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_file(capsys):
    assert main(["configs/does_not_exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("configs/vit_l16_i21k.yaml", ["optim.lr=5e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert not list(tmp_path.glob(".tmp-*"))

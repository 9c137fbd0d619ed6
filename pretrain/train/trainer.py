"""Pretraining entry point.

    deepspeed [--num_gpus N | --hostfile H ...] --module pretrain.train --config configs/X.yaml [section.key=value ...]
    torchrun --nproc_per_node N -m pretrain.train --config ...        (or plain `python -m pretrain.train` for 1 rank)

Each rank streams its own shards (`pretrain.data`), trains the ViT (`pretrain.models.vit`) under DeepSpeed ZeRO
(`pretrain.train.engine`), and writes crash-safe checkpoints it resumes from bit for bit (`pretrain.train.checkpointer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.train import checkpointer as ckpt
from pretrain.config import Config, ConfigError, load_config, save_config
from pretrain.data import (
    ShardError,
    build_eval_loader,
    build_train_loader,
    mixup,
    normalize,
    resolve_shards,
    to_targets,
)
from pretrain.train.engine import autocast_dtype, deepspeed_config, loss_fn, lr_scheduler, param_groups
from pretrain.train.evaluate import evaluate
from pretrain.train.metrics import MetricsLogger, device_peak_flops, memory_gib
from pretrain.models.vit import ViTArgs, create_vit, resolve_args, train_flops_per_image
from pretrain.ports import free_port


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


def preflight(cfg: Config) -> tuple[int, list[str]]:
    """Checks every rank makes before any collective, so a bad run fails fast with one line instead of hanging.

    Returns the number of classes and the class names from the training shards' `_info.json`.
    """
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty; point it at the folder `python -m data_tools shard` wrote")
    shards = resolve_shards(cfg.data.train_shards, cfg.data.train_split, count=cfg.data.mode == "epoch")
    if cfg.data.val_shards:
        resolve_shards(cfg.data.val_shards, cfg.data.val_split)
    names = shards.class_names
    num_classes = cfg.model.num_classes or shards.num_classes or len(names)
    if not num_classes:
        raise ConfigError("model.num_classes is unset and the shards carry no class list; set model.num_classes")
    if shards.num_classes and cfg.model.num_classes and cfg.model.num_classes != shards.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the shards have {shards.num_classes} classes; "
            "remove model.num_classes to take it from the data"
        )
    return num_classes, names or [str(i) for i in range(num_classes)]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on CPU); one process started by hand becomes a world of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a single-rank world on a free local port
        port = free_port()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(acc.device_name())
    return dist.get_rank(), dist.get_world_size(), device


def rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    state["mixup"] = gen.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    gen.set_state(state["mixup"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train(cfg: Config) -> dict:
    """Run (or resume) the pretraining described by `cfg`; returns the last train and eval metrics."""
    import deepspeed
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    num_classes, class_names = preflight(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by every launcher; 1 for a plain python run
    cfg.grad_accum_steps(world_size)  # refuse an impossible batch split before joining the process group
    out_dir = Path(cfg.run.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    # Resume target before any collective: every rank reads the same files, so a refusal is raised on all alike.
    resume = ckpt.resolve_resume(cfg.train.resume, out_dir)
    model_args: ViTArgs = resolve_args(
        cfg.model.name, img_size=cfg.model.img_size, num_classes=num_classes, pool=cfg.model.pool,
        representation_size=cfg.model.representation_size, drop_rate=cfg.model.drop_rate,
        drop_path_rate=cfg.model.drop_path_rate, head_bias_init=cfg.model.head_bias_init,
    )  # fmt: skip
    if resume:
        meta = ckpt.read_meta(*resume)
        ckpt.check_model_matches(meta, model_args, str(resume[0] / resume[1]))
        if meta["world_size"] != world_size and not (resume[0] / resume[1] / "zero").is_dir():
            raise ckpt.CheckpointError(
                f"checkpoint {resume[1]} was written by {meta['world_size']} ranks, this run has {world_size}; "
                f"convert it with `python -m pretrain.universal {resume[0] / resume[1]}` and resume from the "
                "converted folder"
            )

    rank, world, device = init_distributed()
    accum = cfg.grad_accum_steps(world)
    on_cuda = device.type == "cuda"
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    # Model: identical initial weights on every rank (same seed); DeepSpeed shards them per ZeRO stage.
    torch.manual_seed(cfg.run.seed)
    model = create_vit(cfg.model.name, **dataclasses.asdict(model_args))
    model.set_grad_checkpointing(cfg.train.grad_checkpointing, cfg.train.grad_checkpointing_every)
    ds_config = deepspeed_config(cfg, world, on_cuda)
    if resume and (resume[0] / resume[1] / "zero").is_dir():
        ds_config["checkpoint"] = {"load_universal": True}  # a `ds_to_universal` folder: any world size
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=lr_scheduler(cfg),
    )  # fmt: skip

    # Input stream of this rank; mixup draws from its own generator so resume reproduces it.
    img_size = model_args.img_size
    multilabel = cfg.train.loss == "sigmoid"
    loader = build_train_loader(
        cfg.data, img_size=img_size, batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
        seed=cfg.run.seed, multilabel=multilabel,
    )  # fmt: skip
    eval_loader = build_eval_loader(
        cfg.data, img_size=img_size, batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
        multilabel=multilabel,
    )  # fmt: skip
    mix_gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)
    torch.manual_seed(cfg.run.seed * 1000 + rank)  # dropout / drop-path masks differ per rank

    step, samples_seen, skipped = 0, 0, 0
    if resume:
        _, client = engine.load_checkpoint(str(resume[0]), tag=resume[1])
        step, samples_seen, skipped = client["step"], client["samples_seen"], client["nonfinite_steps"]
        loader.load_state_dict(client["stream"])
        if len(client["rng"]) == world:
            set_rng_state(client["rng"][rank], mix_gen)
        if rank == 0:
            print(f"resumed from {resume[0] / resume[1]} at step {step}", flush=True)

    logger = MetricsLogger(out_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    flops = train_flops_per_image(model_args)
    peak = device_peak_flops(device)
    dtype = autocast_dtype(cfg.train.precision)
    mean, std = cfg.data.mean, cfg.data.std

    def save(at_step: int) -> None:
        tag = ckpt.tag_for(at_step)
        if rank == 0 and (ckpt_dir / tag).exists():
            shutil.rmtree(ckpt_dir / tag)  # leftovers of a save that crashed half-way
        client = {
            "step": at_step,
            "samples_seen": samples_seen,
            "nonfinite_steps": skipped,  # not "skipped_steps": DeepSpeed keeps that key for itself
            "stream": gather(loader.state_dict()),
            "rng": gather(rng_state(mix_gen)),
            # lets `ds_to_universal` (pretrain.universal) convert this checkpoint for another world size
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
        _kill_rank0_if("save", at_step)
        dist.barrier()  # every rank's shard is on disk before the tag is marked complete
        if rank == 0:
            ckpt.write_meta(ckpt_dir, tag, {
                "step": at_step, "samples_seen": samples_seen, "zero_stage": cfg.deepspeed.zero_stage,
                "world_size": world, "precision": cfg.train.precision, "model_name": cfg.model.name,
                "model_args": dataclasses.asdict(model_args), "class_names": class_names, "config": cfg.to_dict(),
            })  # fmt: skip
            ckpt.prune(ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        dist.barrier()

    def run_eval(at_step: int) -> dict:
        if eval_loader is None:
            return {}
        res = evaluate(engine, eval_loader, cfg, device, dtype, num_classes)
        logger.log(at_step, res, kind="eval")
        return res

    batches = iter(loader)
    engine.train()
    last_train, last_eval, in_a_row = {}, {}, 0
    loss_sum = torch.zeros((), device=device)
    t_log, steps_since_log = time.perf_counter(), 0
    while step < cfg.train.steps:
        for _ in range(accum):
            batch = next(batches)
            images = normalize(batch["image"].to(device, non_blocking=True), mean, std, dtype)  # (B, 3, H, W)
            targets = batch["label"].to(device, non_blocking=True)  # (B,) or (B, K) multi-label
            if cfg.data.mixup_alpha > 0 or targets.ndim == 2:
                targets = to_targets(targets, num_classes)  # (B, C) soft / multi-hot
                images, targets, _ = mixup(images, targets, cfg.data.mixup_alpha, mix_gen)
            loss = loss_fn(engine(images), targets, cfg)
            if _fault("nan", step + 1):
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            loss_sum += loss.detach()
        step += 1
        steps_since_log += 1
        samples_seen += cfg.train.global_batch_size
        _kill_rank0_if("step", step)
        # A non-finite gradient makes DeepSpeed skip the update (bf16/fp16 overflow check, clipping norm check).
        if engine.was_step_applied():
            in_a_row = 0
        else:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= cfg.train.max_nonfinite_steps:
                raise TrainingError(
                    f"{in_a_row} steps in a row had non-finite gradients (at step {step}); lower optim.lr, "
                    "check the data, or use train.precision=bf16"
                )

        if step % cfg.log.every_steps == 0 or step == cfg.train.steps:
            dist.all_reduce(loss_sum)  # host sync here: the logged loss is the mean over ranks and micro-steps
            dt = time.perf_counter() - t_log
            ips = steps_since_log * cfg.train.global_batch_size / dt
            grad_norm = engine.get_global_grad_norm()
            stats = loader.stats()
            last_train = {
                "loss": loss_sum.item() / (world * accum * steps_since_log),
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "images_per_s": ips,
                "images_per_s_per_device": ips / world,
                "mfu": ips / world * flops / peak if peak else None,
                "data_wait": stats["data_wait_fraction"],
                "memory_gib": memory_gib(device),
                "skipped_steps": skipped,
                "bad_samples": stats["bad_samples"],
                "eta_s": (cfg.train.steps - step) * dt / steps_since_log,
                "epoch": loader.epoch,
            }
            logger.log(step, last_train)
            loss_sum.zero_()
            t_log, steps_since_log = time.perf_counter(), 0

        if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0 and step < cfg.train.steps:
            last_eval = run_eval(step)
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
            save(step)

    last_eval = run_eval(step) or last_eval
    logger.close()
    return {"train": last_train, "eval": last_eval, "step": step}


def _fault(kind: str, step: int) -> bool:
    """Fault injection for the crash-safety tests, off unless PRETRAIN_FAULT is set: "save:4" kills rank 0 with
    SIGKILL in the middle of the save at step 4 (after DeepSpeed wrote its files, before the tag is marked
    complete); "step:5" kills it after step 5; "nan:3" makes step 3's loss NaN on every rank ("nan:all": every
    step's)."""
    name, _, at = os.environ.get("PRETRAIN_FAULT", "").partition(":")
    return name == kind and at in (str(step), "all")


def _kill_rank0_if(kind: str, step: int) -> None:
    if _fault(kind, step) and dist.get_rank() == 0:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

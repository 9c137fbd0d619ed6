"""The Trainer: builds the parts of a pretraining run and runs the loop over them.

Each rank streams its own shards (`pretrain.data`), trains the ViT (`pretrain.models.vit`) under DeepSpeed ZeRO
(`Engine`), and writes crash-safe checkpoints it resumes from bit for bit (`Checkpointer`). The parts:

    Engine        model + DeepSpeed (ZeRO, optimizer, LR schedule), loss, the training step
    TrainLoader   this rank's share of the one global sample order (checkpointed once: its position, the same on
                  every rank, with the ranks' bad-data counts merged)
    TrainState    step and sample counters, non-finite steps
    RankRNG       this rank's random generators (seeded once: `set_determinism`)
    Checkpointer  save, prune, resume
    Metrics       running loss, timers, console / JSONL / TensorBoard
    Evaluator     held-out loss and accuracy, reduced over ranks
    FewShotEvaluator  few-shot linear accuracy of the frozen features on downstream sets (`pretrain.fewshot`)
    StopRequest   SIGTERM / SIGUSR1: the ranks agree at a step boundary, save there and exit (preemption)
    Watchdog      a bound on every step, save and evaluation (a frozen or dead peer rank)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from data_tools.storage import IOPolicy, StorageError, is_remote, object_size
from pretrain.checkpoint_format import read_meta, tag_for
from pretrain.config import BatchPlan, Config, ConfigError, DataConfig, ModelConfig, TrainConfig, head_size, save_config
from pretrain.data import (
    EvalLoader,
    ShardError,
    StreamState,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    resolve_shards,
)
from pretrain.data.assign import Layout
from pretrain.data.gpu_decode import require_cuda
from pretrain.data.workers import start_server
from pretrain.fewshot.evaluate import FewShotEvaluator
from pretrain.models.vit import ViTArgs, resolve_args, train_flops_per_image
from pretrain.train import faults
from pretrain.train.checkpointer import Checkpointer, check_resumable, is_universal, resolve_resume, run_meta
from pretrain.train.distributed import Stateful, init_distributed
from pretrain.train.engine import Engine
from pretrain.train.evaluate import Evaluator
from pretrain.train.metrics import Metrics
from pretrain.train.preemption import Preempted, StopRequest, agree
from pretrain.train.state import RankRNG, TrainState, set_determinism
from pretrain.train.watchdog import Watchdog
from pretrain.train.zero_init import build_model


def preflight(data: DataConfig, model: ModelConfig) -> tuple[int, list[str]]:
    """Checks every rank makes before any collective, so a bad run fails fast with one line instead of hanging.

    Returns the number of classes and the class names from the training shards' `_info.json`.
    """
    if not data.train_shards:
        raise ConfigError("data.train_shards is empty; point it at the folder `python -m data_tools shard` wrote")
    require_cuda(data.decode)
    shards = resolve_shards(data.train_shards, data.train_split)
    check_readable(shards.urls[0], data.io_policy())  # a refusing store is named before anything else
    shards.counted()  # the order needs every shard's sample count
    if data.val_shards:
        check_readable(resolve_shards(data.val_shards, data.val_split).urls[0], data.io_policy())
    names = shards.class_names
    num_classes = head_size(model, shards.num_classes, names)
    return num_classes, names or [str(i) for i in range(num_classes)]


def check_stream_layout(meta: dict, data: DataConfig, plan: BatchPlan) -> None:
    """Refuse, before any collective, to resume a stream on a world size that cannot share its canonical streams
    (one line naming the valid ones). Checkpoints from before the stream state was in `pretrain_meta.json` skip
    this (the loader checks again when it loads the state)."""
    if meta.get("stream"):
        streams = StreamState.from_dict(meta["stream"]).streams
        Layout(streams, plan.global_batch, plan.world_size, data.num_workers, plan.accum_steps)


def check_readable(url: str, policy: IOPolicy) -> None:
    """A store that refuses the first shard (missing bucket, unknown key, no credentials) ends the run in one line.

    Raises:
        ShardError: the store refused (a fault beyond the retries is reported as well).
    """
    if is_remote(url):
        try:
            object_size(url, policy)
        except StorageError as e:
            raise ShardError(f"{url} cannot be read: {e}") from None


def model_args(model: ModelConfig, num_classes: int) -> ViTArgs:
    """The ViT the `model` section describes, with the head size from the data."""
    return resolve_args(
        model.name,
        img_size=model.img_size,
        num_classes=num_classes,
        pool=model.pool,
        representation_size=model.representation_size,
        drop_rate=model.drop_rate,
        drop_path_rate=model.drop_path_rate,
        head_bias_init=model.head_bias_init,
    )


def build_loaders(
    data: DataConfig, train: TrainConfig, plan: BatchPlan, img_size: int, *, seed: int, rank: int, device: torch.device
) -> tuple[TrainLoader, EvalLoader | None]:
    """This rank's training loader (micro-batches, on `device` with `data.decode=gpu`) and held-out loader (None
    without `data.val_shards`)."""
    multilabel, world = train.loss == "sigmoid", plan.world_size
    loader = build_train_loader(
        data,
        img_size=img_size,
        batch_size=plan.micro_batch,
        rank=rank,
        world_size=world,
        accum_steps=plan.accum_steps,
        seed=seed,
        multilabel=multilabel,
        device=device,
    )
    eval_loader = build_eval_loader(
        data, img_size=img_size, batch_size=plan.micro_batch, rank=rank, world_size=world, multilabel=multilabel
    )
    return loader, eval_loader


@dataclasses.dataclass
class Trainer:
    """The parts of one pretraining run (see the module docstring); `run()` is the loop."""

    cfg: Config
    plan: BatchPlan
    engine: Engine
    loader: TrainLoader
    state: TrainState
    rng: RankRNG
    checkpointer: Checkpointer
    metrics: Metrics
    evaluator: Evaluator
    stop: StopRequest
    watchdog: Watchdog
    fewshot: FewShotEvaluator

    @property
    def parts(self) -> dict[str, Stateful]:
        """What the checkpoint holds besides the engine's own files, by name, in save and load order."""
        return {"state": self.state, "rng": self.rng, "stream": self.loader}

    @classmethod
    def build(cls, cfg: Config) -> Trainer:
        """Check the run, join the process group and build every part, in the order the seeds are consumed."""
        stop = StopRequest()
        stop.install()  # a signal during the build is acted on after the first step
        if cfg.data.num_workers:
            start_server()  # the loaders' workers fork from this small process, not from a rank holding the model
        num_classes, class_names = preflight(cfg.data, cfg.model)
        world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by every launcher; 1 for a plain python run
        plan = BatchPlan.of(cfg.train, world_size)  # an impossible split is refused before joining the process group
        out_dir = Path(cfg.run.output_dir)
        # Resume target before any collective: every rank reads the same files, so a refusal is raised on all alike.
        target = resolve_resume(cfg.train.resume, out_dir)
        args = model_args(cfg.model, num_classes)
        if target:
            check_resumable(target, args, world_size)
            check_stream_layout(read_meta(target[0] / target[1]), cfg.data, plan)
        fewshot = FewShotEvaluator(  # resolves the few-shot sets now: a bad one fails before any collective
            cfg.fewshot,
            cfg.data,
            img_size=args.img_size,
            batch_size=cfg.train.micro_batch_size,
            total_steps=cfg.train.steps,
        )

        rank, world, device = init_distributed(cfg.train.collective_timeout_s)  # world == plan.world_size
        watchdog = Watchdog(cfg.train.collective_timeout_s, rank, world)
        watchdog.phase("start-up (model, DeepSpeed engine, loaders)")
        if rank == 0:
            save_config(cfg, out_dir / "config.yaml")
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank; DeepSpeed shards them
        model = build_model(cfg, args, plan, device=device)  # partitioned at ZeRO-3 (zero_init.py)
        model.set_grad_checkpointing(cfg.train.grad_checkpointing, cfg.train.grad_checkpointing_every)
        engine = Engine.from_config(model, cfg, plan, device=device, universal=bool(target) and is_universal(target))
        loader, eval_loader = build_loaders(
            cfg.data, cfg.train, plan, args.img_size, seed=cfg.run.seed, rank=rank, device=device
        )
        # This rank's own random state from here on, seeded once, after the parts that draw the shared weights
        rng = RankRNG(set_determinism(cfg.run.seed, rank), rank, world)
        state = TrainState()
        checkpointer = Checkpointer(
            cfg.checkpoint,
            out_dir / "checkpoints",
            total_steps=cfg.train.steps,
            target=target,
            run_meta=run_meta(cfg, world, args, class_names),
        )
        metrics = Metrics(
            out_dir,
            cfg.log,
            plan,
            total_steps=cfg.train.steps,
            rank=rank,
            device=device,
            flops_per_image=train_flops_per_image(args),
            run_name=cfg.run.name,
        )
        evaluator = Evaluator(eval_loader, cfg.train, num_classes)
        return cls(cfg, plan, engine, loader, state, rng, checkpointer, metrics, evaluator, stop, watchdog, fewshot)

    def run(self) -> dict[str, Any]:
        """Train from the newest checkpoint (or from scratch) to `train.steps`; returns the last metrics.

        Raises Preempted once a stop signal's checkpoint is saved."""
        engine, state, metrics, train = self.engine, self.state, self.metrics, self.cfg.train
        phase = self.watchdog.phase  # starts the clock of the next bounded phase
        phase("resume")
        self.checkpointer.resume(engine, self.parts)
        batches = faults.logged_keys(iter(self.loader), self.rng.rank)
        engine.train()
        metrics.start()
        last_train, last_eval = {}, {}
        while state.step < train.steps:
            phase(f"step {state.step + 1}")
            losses = engine.train_step(batches, self.rng.mixup, poison=faults.injected("nan", state.step + 1))
            state.advance(self.plan.global_batch)
            faults.kill_rank0_if("step", state.step)
            state.count_nonfinite(engine.step_applied(), limit=train.max_nonfinite_steps)
            metrics.add(losses)
            stop, overdue = agree(self.stop.requested, self.checkpointer.overdue(), device=engine.device)
            if metrics.due(state.step):
                last_train = metrics.log_train(state.step, engine, self.loader, state.nonfinite_steps)
            if self.evaluator.due(state.step) and not stop:
                phase(f"evaluation at step {state.step}")
                last_eval = metrics.log_eval(state.step, self.evaluator.run(engine))
            if self.fewshot.due(state.step) and not stop:
                phase(f"few-shot evaluation at step {state.step}")
                metrics.log_fewshot(state.step, self.fewshot.run(engine))
            if self.checkpointer.due(state.step) or stop or overdue:
                phase(f"checkpoint save at step {state.step}")
                self.checkpointer.save(state.step, engine, self.parts, state.samples_seen)
            if stop:
                metrics.close()
                raise Preempted(state.step, str(self.checkpointer.dir / tag_for(state.step)))
        phase("final evaluation")
        last_eval = metrics.log_eval(state.step, self.evaluator.run(engine)) or last_eval
        phase("final few-shot evaluation")
        metrics.log_fewshot(state.step, self.fewshot.run(engine))
        self.watchdog.idle()
        metrics.close()
        return {"train": last_train, "eval": last_eval, "step": state.step}

"""Fine-tune or linear-probe an exported backbone with accelerate.

    vit-finetune --weights EXPORT_DIR|FILE.pth|FILE.npz --data DATA --out OUT [--epochs E | --steps N]
    accelerate launch -m pretrain.downstream.finetune --weights EXPORT_DIR --data DATA --out OUT --mixed-precision bf16

DATA is a shard folder (`python -m data_tools shard`, with `_info.json`) or an image folder with one sub-folder per
class (sharded once into a cache folder, so the same input stream reads it). Each process reads its own part of the
stream (`pretrain.data`); accelerate wraps the model (DDP on several GPUs), mixed precision and the optimizer.
Without `--weights` the same ViT is trained from scratch: the ViT paper's comparison. See docs/finetune.md.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from data_tools.errors import DataToolsError
from data_tools.extras import require
from pretrain.config import DataConfig
from pretrain.data import EvalLoader, ShardError, TrainLoader, normalize
from pretrain.downstream.backbone import (
    Backbone,
    BackboneError,
    export_files,
    load_backbone,
    read_saved,
    save_backbone,
)
from pretrain.downstream.finetune_data import (
    LabelledData,
    build_loaders,
    data_config,
    labelled_data,
    resolve_data,
    shard_image_folder,
)
from pretrain.downstream.options import FinetuneError, FinetuneOptions, parse_options
from pretrain.losses import softmax_ce
from pretrain.models.vit import create_vit
from pretrain.schedule import lr_factor

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["FinetuneError", "FinetuneOptions", "finetune", "main", "resolve_data", "run", "shard_image_folder"]


def build_backbone(weights: str | None, model: str, img_size: int | None, names: list[str]) -> Backbone:
    """The exported backbone with a head for `names`, or (without `weights`) the variant `model` from scratch."""
    if weights:
        # The saved head is reused only for the very same classes; any other data gets a new zero head (ViT paper).
        # A pre-logits layer is always dropped with its head (the paper's recipe; the timm-layout result lacks it).
        saved = read_saved(weights)
        fresh = saved.class_names != names or bool(saved.args.representation_size)
        return load_backbone(saved, num_classes=len(names), img_size=img_size, fresh_head=fresh)
    try:
        net = create_vit(model, num_classes=len(names), img_size=img_size)
    except ValueError as e:
        raise FinetuneError(f"--model/--img-size: {e}") from None
    d = DataConfig()
    return Backbone(net, model, [], d.mean, d.std, d.eval_crop_pct, new_head=True)


def build_optimizer(
    net: torch.nn.Module, freeze_backbone: bool, name: str, lr: float, weight_decay: float
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """(trained parameters, optimizer); a linear probe trains the head only, the backbone stays as loaded."""
    if freeze_backbone:
        net.requires_grad_(False)
        net.head.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    if name == "sgd":  # the ViT paper fine-tunes with SGD, momentum 0.9, no weight decay
        return params, torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return params, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_schedule(
    opt: torch.optim.Optimizer, total: int, warmup_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (default 10% of the steps), then cosine decay to 0: the ViT paper's fine-tuning schedule."""
    warm = max(min(total // 10 if warmup_steps is None else warmup_steps, total - 1), 0)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, partial(lr_factor, warmup_steps=warm, total_steps=total, decay="cosine")
    )


class Tuner:
    """The model, optimizer and LR schedule under accelerate; one `train_step` is one optimizer step."""

    def __init__(
        self,
        acc: Accelerator,
        net: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LambdaLR,
        params: list[torch.nn.Parameter],
        grad_clip: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.acc, self.net, self.opt, self.sched = acc, net, opt, sched
        self.params, self.grad_clip, self.mean, self.std = params, grad_clip, mean, std
        self.net.train()

    def train_step(self, batch: dict) -> float:
        """Forward, backward, clip, optimizer and schedule step on one batch; returns the loss."""
        x = normalize(batch["image"].to(self.acc.device, non_blocking=True), self.mean, self.std)
        y = batch["label"].to(self.acc.device, non_blocking=True)
        loss = softmax_ce(self.net(x), y)
        self.acc.backward(loss)
        if self.grad_clip > 0:
            self.acc.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()  # by hand, once per optimizer step (accelerate would step a prepared one once per process)
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.sched.get_last_lr()[0]


class Evaluator:
    """Held-out top-1 after every epoch and at the end, each image counted once over all processes."""

    def __init__(
        self,
        acc: Accelerator,
        loader: EvalLoader,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        per_epoch: int,
        total: int,
    ) -> None:
        self.acc, self.loader, self.mean, self.std = acc, loader, mean, std
        self.per_epoch, self.total = per_epoch, total

    def due(self, step: int) -> bool:
        """True after the last step of an epoch and after the last step of the run."""
        return step % self.per_epoch == 0 or step == self.total

    @torch.no_grad()
    def run(self, net: torch.nn.Module) -> tuple[float, int]:
        """(top-1 in [0, 1], held-out images counted); the stream's padding is masked out."""
        acc = self.acc
        net.eval()
        correct = count = 0
        for b in self.loader:
            pred = net(normalize(b["image"].to(acc.device, non_blocking=True), self.mean, self.std)).argmax(-1)
            pred, y, m = acc.gather_for_metrics((pred, b["label"].to(acc.device), b["mask"].to(acc.device).long()))
            correct += int(((pred == y) & m.bool()).sum())
            count += int(m.sum())
        net.train()
        return correct / max(count, 1), count


class Progress:
    """The progress bar, the running loss and the per-epoch held-out report, kept as `history`."""

    def __init__(self, total: int, per_epoch: int, desc: str, show_bar: bool, report: bool) -> None:
        from tqdm.auto import tqdm

        self.total, self.per_epoch, self.report = total, per_epoch, report
        self.bar = tqdm(total=total, desc=desc, disable=not show_bar, dynamic_ncols=True)
        self.running = 0.0
        self.history: list[dict] = []

    def log(self, step: int, loss: float, lr: float) -> None:
        """Advance the bar; the running loss is an exponential average (the first step's loss to start)."""
        self.running = loss if step == 1 else 0.9 * self.running + 0.1 * loss
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.running:.3f}", lr=f"{lr:.2e}", refresh=False)

    def log_eval(self, step: int, top1: float, n_val: int) -> None:
        """Record the held-out top-1 and print it on the main process (also without the bar: it is the point)."""
        epoch = math.ceil(step / self.per_epoch)
        self.history.append({"epoch": epoch, "step": step, "top1": top1, "loss": self.running})
        if self.report:
            top = f"held-out top-1 {100 * top1:.2f}% ({n_val})"
            self.bar.write(f"epoch {epoch} step {step}/{self.total}: loss {self.running:.4f}, {top}")

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


@dataclass
class Parts:
    """What the loop uses, built by `build`."""

    acc: Accelerator
    data: LabelledData
    backbone: Backbone
    train_loader: TrainLoader
    tuner: Tuner
    evaluator: Evaluator
    progress: Progress
    total: int


def build(o: FinetuneOptions) -> Parts:
    """The parts of a run, consuming the seeded random numbers in this order: head / weights, loaders, optimizer."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(mixed_precision=o.mixed_precision)
    set_seed(o.seed)  # same seed, same head and (from scratch) same initial weights on every process
    with acc.main_process_first():  # the main process shards an image folder; the others then find it done
        paths = resolve_data(o.data, o.val_data, o.train_split, o.val_split, o.val_fraction, o.seed)
    data = labelled_data(*paths)
    bb = build_backbone(o.weights, o.model, o.img_size, data.names)
    cfg = data_config(
        data, bb, workers=o.workers, batch_size=o.batch_size, crop_scale_min=o.crop_scale_min, hflip=o.hflip
    )
    train, evaluation, per_epoch = build_loaders(
        cfg,
        img_size=bb.model.args.img_size,
        batch_size=o.batch_size,
        rank=acc.process_index,
        world_size=acc.num_processes,
        seed=o.seed,
    )
    total = o.steps or (o.epochs or 1) * per_epoch
    params, opt = build_optimizer(bb.model, o.freeze_backbone, o.optimizer, o.lr, o.weight_decay)
    sched = build_schedule(opt, total, o.warmup_steps)
    net, opt = acc.prepare(bb.model, opt)
    desc = "linear probe" if o.freeze_backbone else "fine-tune"
    return Parts(
        acc=acc,
        data=data,
        backbone=bb,
        train_loader=train,
        tuner=Tuner(acc, net, opt, sched, params, o.grad_clip, bb.mean, bb.std),
        evaluator=Evaluator(acc, evaluation, bb.mean, bb.std, per_epoch, total),
        progress=Progress(total, per_epoch, desc, o.progress and acc.is_local_main_process, acc.is_main_process),
        total=total,
    )


def run(o: FinetuneOptions) -> dict:
    """Fine-tune (or, with `freeze_backbone`, linear-probe) a backbone and report held-out top-1 every epoch.

    Returns:
        {"top1": final held-out top-1 in [0, 1], "history": [{"epoch", "step", "top1", "loss"}, ...], "steps",
        "num_classes", "class_names", "num_val", "img_size", "weights", "freeze_backbone", "out"}.

    Raises:
        FinetuneError, BackboneError, ShardError: bad options, weights or data (one-line messages).
    """
    o.check()
    p = build(o)
    batches, top1, n_val = iter(p.train_loader), 0.0, 0
    for step in range(1, p.total + 1):
        loss = p.tuner.train_step(p.data.single_label(next(batches)))
        p.progress.log(step, loss, p.tuner.lr)
        if p.evaluator.due(step):
            top1, n_val = p.evaluator.run(p.tuner.net)
            p.progress.log_eval(step, top1, n_val)
    p.progress.close()
    result = {
        "top1": top1,
        "history": p.progress.history,
        "steps": p.total,
        "num_classes": len(p.data.names),
        "class_names": p.data.names,
        "num_val": n_val,
        "img_size": p.backbone.model.args.img_size,
        "weights": o.weights,
        "freeze_backbone": o.freeze_backbone,
        "out": o.out,
    }
    save_result(p, result, o.out)
    return result


def save_result(p: Parts, result: dict, out: str | None) -> None:
    """Write the model in the export's timm layout plus `finetune.json` (main process), then end accelerate."""
    acc, bb = p.acc, p.backbone
    acc.wait_for_everyone()
    if out and acc.is_main_process:
        final = acc.unwrap_model(p.tuner.net)
        files = export_files(final, bb.variant, p.data.names, bb.mean, bb.std, bb.crop_pct, step=p.total)
        save_backbone(final, out, files | {"finetune.json": {k: v for k, v in result.items() if k != "class_names"}})
    acc.wait_for_everyone()
    acc.end_training()


def finetune(data: str, **options: Any) -> dict:
    """`run` with the options as keywords (the fields of `FinetuneOptions`): what `make demo` and tests call.

    `weights` None trains `model` from scratch; `batch_size` is per process; `steps` wins over `epochs`; with
    neither, one epoch.
    """
    return run(FinetuneOptions(data=data, **options))


def main(argv: list[str] | None = None) -> int:
    """The command line: one error line and exit code 2 for bad options, weights or data."""
    o = parse_options(argv, __doc__.split("\n")[0])
    try:
        require("accelerate")  # the `finetune` extra
        r = run(o)
    # DataToolsError: sharding an image folder, or a missing extra (MissingExtra)
    except (FinetuneError, BackboneError, ShardError, DataToolsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    saved = f"; saved {o.out}" if o.out else ""
    print(f"held-out top-1 {100 * r['top1']:.2f}% on {r['num_val']} images after {r['steps']} steps{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune or linear-probe an exported backbone with accelerate.

    python -m pretrain.finetune --weights EXPORT_DIR --data DATA --out OUT [--epochs E | --steps N] ...
    accelerate launch -m pretrain.finetune --weights EXPORT_DIR --data DATA --out OUT --mixed-precision bf16 ...

DATA is a shard folder (`python -m data_tools shard`, with `_info.json`) or an image folder with one sub-folder per
class (sharded once into a cache folder, so the same input stream reads it). Each process reads its own part of the
stream (`pretrain.data`); accelerate wraps the model (DDP on several GPUs), mixed precision and the optimizer.
Without `--weights` the same ViT is trained from scratch: the ViT paper's comparison. See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.downstream.backbone import Backbone, BackboneError, export_files, load_backbone, read_config, save_backbone
from pretrain.config import DataConfig
from pretrain.data import ShardError, build_eval_loader, build_train_loader, normalize, resolve_shards
from pretrain.models.vit import create_vit


class FinetuneError(ValueError):
    """Bad options or data; the message names the problem and the fix."""


def _image_folder(path: Path) -> bool:
    """A folder of class sub-folders (not shards): no `_info.json` and no `.tar` files in it."""
    return (
        path.is_dir()
        and not (path / "_info.json").exists()
        and not any(path.glob("*.tar"))
        and any(d.is_dir() for d in path.iterdir())
    )


def shard_image_folder(path: Path, val_fraction: float, seed: int) -> Path:
    """Shard an image folder once into a cache folder named after its file list; return the shard folder."""
    from data_tools.shard import shard

    files = sorted(f for f in path.rglob("*") if f.is_file())
    h = hashlib.sha1(f"{path.resolve()}|{val_fraction}|{seed}".encode())
    for f in files:  # a changed file list or file gives a new cache folder
        st = f.stat()
        h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    out = Path(tempfile.gettempdir()) / "pretrain-finetune" / f"{path.name}-{h.hexdigest()[:16]}"
    if not (out / "_info.json").is_file():
        shard(path, out, workers=1, seed=seed, val_fraction=val_fraction, progress=False)
    return out


def resolve_data(
    data: str, val_data: str | None, train_split: str, val_split: str, val_fraction: float, seed: int
) -> tuple[str, str, str, str]:
    """(train shards, train split, val shards, val split) for the two data options (image folders get sharded)."""
    p = Path(data)
    if not p.exists() and "{" not in data and "://" not in data and not data.startswith("pipe:"):
        raise FinetuneError(f"--data {data} does not exist; pass a shard folder or an image folder of class folders")
    if _image_folder(p):
        p = shard_image_folder(p, 0.0 if val_data else val_fraction, seed)
        data, train_split = str(p), "train"
    if val_data is None:
        return data, train_split, data, val_split
    v = Path(val_data)
    if not v.exists():
        raise FinetuneError(f"--val-data {val_data} does not exist; pass a shard folder or an image folder")
    if _image_folder(v):  # all of it is held out: sharded as a single "train" split
        return data, train_split, str(shard_image_folder(v, 0.0, seed)), "train"
    return data, train_split, val_data, val_split


def _lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 0 (the ViT paper's fine-tuning schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def finetune(
    data: str,
    *,
    weights: str | None = None,
    out: str | None = None,
    val_data: str | None = None,
    train_split: str = "train",
    val_split: str = "val",
    model: str = "vit_base_patch16",
    img_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 0.01,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float = 1.0,
    freeze_backbone: bool = False,
    mixed_precision: str = "no",
    crop_scale_min: float = 0.08,
    hflip: bool = True,
    val_fraction: float = 0.1,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune (or, with `freeze_backbone`, linear-probe) a backbone and report held-out top-1 every epoch.

    Args mirror the command-line options (docs/finetune.md). `weights` None trains `model` from scratch.
    `batch_size` is per process. `steps` wins over `epochs`; with neither, one epoch.

    Returns:
        {"top1": final held-out top-1 in [0, 1], "history": [{"epoch", "step", "top1", "loss"}, ...], "steps",
        "num_classes", "class_names", "num_val", "img_size", "out"}.

    Raises:
        FinetuneError, BackboneError, ShardError: bad options, weights or data (one-line messages).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if optimizer not in ("sgd", "adamw"):
        raise FinetuneError(f"--optimizer must be sgd or adamw, got {optimizer!r}")
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise FinetuneError(f"--mixed-precision must be no, bf16 or fp16, got {mixed_precision!r}")
    if batch_size < 1 or (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise FinetuneError("--batch-size, --steps and --epochs must be positive")
    acc = Accelerator(mixed_precision=mixed_precision)
    set_seed(seed)  # same seed, same head and (from scratch) same initial weights on every process

    with acc.main_process_first():  # the main process shards an image folder; the others then find it done
        tr, tr_split, va, va_split = resolve_data(data, val_data, train_split, val_split, val_fraction, seed)
    train_shards = resolve_shards(tr, tr_split)
    names = train_shards.class_names or [str(i) for i in range(train_shards.num_classes or 0)]
    if not names:
        raise FinetuneError(f"{tr} carries no class list (_info.json); shard it with `python -m data_tools shard`")
    try:
        val_shards = resolve_shards(va, va_split)
    except ShardError as e:
        raise FinetuneError(f"no held-out split ({e}); pass --val-data or --val-split") from None
    if val_shards.class_names and val_shards.class_names != names:
        raise FinetuneError(f"{va} has other classes than {tr}; shard both with the same class list (--classes)")

    if weights:
        # The saved head is reused only for the very same classes; any other data gets a new zero head (ViT paper).
        same = [str(n) for n in read_config(weights).get("label_names") or []] == names
        bb = load_backbone(weights, num_classes=len(names), img_size=img_size, fresh_head=not same)
    else:
        try:
            net = create_vit(model, num_classes=len(names), img_size=img_size)
        except ValueError as e:
            raise FinetuneError(f"--model/--img-size: {e}") from None
        d = DataConfig()
        bb = Backbone(net, model, [], d.mean, d.std, d.eval_crop_pct, new_head=True)
    net, size = bb.model, bb.model.args.img_size

    cfg = DataConfig(
        train_shards=tr, val_shards=va, train_split=tr_split, val_split=va_split, num_workers=workers,
        remainder="wrap", shuffle_buffer=min(2000, max(64, 4 * batch_size)), crop_scale_min=crop_scale_min,
        hflip=hflip, eval_crop_pct=bb.crop_pct, mean=bb.mean, std=bb.std,
    )  # fmt: skip
    rank, world = acc.process_index, acc.num_processes
    train_loader = build_train_loader(cfg, img_size=size, batch_size=batch_size, rank=rank, world_size=world, seed=seed)
    eval_loader = build_eval_loader(cfg, img_size=size, batch_size=batch_size, rank=rank, world_size=world)
    per_epoch = train_loader.batches_per_epoch or 0
    if per_epoch < 1:
        raise FinetuneError(f"{tr} has fewer samples than one global batch; lower --batch-size")
    total = steps or (epochs or 1) * per_epoch

    if freeze_backbone:  # linear probe: only the head learns; the backbone stays bit for bit as loaded
        net.requires_grad_(False)
        net.head.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "sgd":  # the ViT paper fine-tunes with SGD, momentum 0.9, no weight decay
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = min(total // 10 if warmup_steps is None else warmup_steps, total - 1)
    # Stepped once per optimizer step by hand (not prepared: accelerate would step it once per process).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max(warm, 0), total))
    net, opt = acc.prepare(net, opt)

    def evaluate() -> tuple[float, int]:
        net.eval()
        correct = count = 0
        with torch.no_grad():
            for b in eval_loader:
                x = normalize(b["image"].to(acc.device, non_blocking=True), bb.mean, bb.std)
                pred = net(x).argmax(-1)
                pred, y, m = acc.gather_for_metrics((pred, b["label"].to(acc.device), b["mask"].to(acc.device).long()))
                correct += int(((pred == y) & m.bool()).sum())
                count += int(m.sum())
        net.train()
        return correct / max(count, 1), count

    history: list[dict] = []
    bar = tqdm(total=total, desc="linear probe" if freeze_backbone else "fine-tune", disable=not progress or
               not acc.is_local_main_process, dynamic_ncols=True)  # fmt: skip
    batches, running, top1, n_val = iter(train_loader), 0.0, 0.0, 0
    net.train()
    for step in range(1, total + 1):
        b = next(batches)
        if b["label"].dim() != 1:
            raise FinetuneError(f"{tr} is multi-label; fine-tuning needs one class per image")
        x = normalize(b["image"].to(acc.device, non_blocking=True), bb.mean, bb.std)
        y = b["label"].to(acc.device, non_blocking=True)
        loss = F.cross_entropy(net(x).float(), y)
        acc.backward(loss)
        if grad_clip > 0:
            acc.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        if step % per_epoch == 0 or step == total:
            top1, n_val = evaluate()
            epoch = math.ceil(step / per_epoch)
            history.append({"epoch": epoch, "step": step, "top1": top1, "loss": running})
            msg = f"epoch {epoch} step {step}/{total}: loss {running:.4f}, held-out top-1 {100 * top1:.2f}% ({n_val})"
            if acc.is_main_process:
                bar.write(msg)  # also without the bar: the per-epoch report is the point
    bar.close()

    result = {
        "top1": top1, "history": history, "steps": total, "num_classes": len(names), "class_names": names,
        "num_val": n_val, "img_size": size, "weights": weights, "freeze_backbone": freeze_backbone, "out": out,
    }  # fmt: skip
    acc.wait_for_everyone()
    if out and acc.is_main_process:
        final = acc.unwrap_model(net)
        files = export_files(final, bb.variant, names, bb.mean, bb.std, bb.crop_pct, step=total)
        save_backbone(final, out, files | {"finetune.json": {k: v for k, v in result.items() if k != "class_names"}})
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _check_out(out: str | None) -> None:
    """Only ever replace an earlier export or fine-tune result, never a folder of something else."""
    if out is None:
        return
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FinetuneError(f"--out {p} is a file; choose a folder name")
    if p.is_dir() and any(p.iterdir()) and not (p / "config.json").is_file():
        raise FinetuneError(f"--out {p} exists and is not an earlier result; choose a new folder or remove it")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.finetune", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="exported backbone folder (timm format); omit to train from scratch")
    ap.add_argument("--data", required=True, help="shard folder with _info.json, or image folder of class folders")
    ap.add_argument("--val-data", help="held-out shards or image folder (default: the val split of --data)")
    ap.add_argument("--train-split", default="train", help="split of --data to train on")
    ap.add_argument("--val-split", default="val", help="held-out split name in the shards")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="held out of an image --data without --val-data")
    ap.add_argument("--model", default="vit_base_patch16", help="variant trained from scratch (without --weights)")
    ap.add_argument("--img-size", type=int, help="input size (default: the backbone's); resamples pos_embed")
    ap.add_argument("--epochs", type=int, help="passes over the training data (default 1)")
    ap.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    ap.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="SGD momentum 0.9 as the paper")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, help="linear warmup (default: 10%% of the steps), then cosine")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip; 0 disables it")
    ap.add_argument("--freeze-backbone", action="store_true", help="linear probe: train the head only")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"), help="passed to accelerate")
    ap.add_argument("--crop-scale-min", type=float, default=0.08, help="RandomResizedCrop lower area bound")
    ap.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flip")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for the result (safetensors + config.json), written atomically")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        _check_out(a.out)
        r = finetune(**{k: v for k, v in vars(a).items()})
    except (FinetuneError, BackboneError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # data_tools errors while sharding an image folder are bad input too
        from data_tools.errors import DataToolsError

        if not isinstance(e, DataToolsError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    print(f"held-out top-1 {100 * r['top1']:.2f}% on {r['num_val']} images after {r['steps']} steps" +
          (f"; saved {a.out}" if a.out else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU benchmark's measurements (`benchmarks.bench_gpu` orders, budgets and reports them), one function per stage.

Every function takes the device in a `Setup`, so that `python -m benchmarks.bench_gpu --smoke` runs each of them on
the CPU with a tiny model; that is how this code is tested before a GPU is lent. Lines that only do something on
CUDA are marked "CUDA only"; the nvJPEG decoder of `data.decode=gpu` is replaced on the CPU by torchvision's CPU
`decode_jpeg` (`Setup.cpu_decoder`), as in tests/test_gpu_decode.py.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pretrain.models.specs import BACKBONE_FIELDS, SPECS
from pretrain.models.vit import create_vit, resolve_args, train_flops_per_image
from pretrain.train.compile import compile_blocks
from pretrain.train.metrics import device_peak_flops

OOM = torch.cuda.OutOfMemoryError  # defined in CPU builds too; only a CUDA allocation raises it
TIMM_GENERIC = "vit_base_patch16_224"  # timm's ViT builder; the shape keywords below make any variant of it


@dataclass(frozen=True)
class Setup:
    """Where and how every stage trains: the device, bf16 weights or fp32 weights under bf16 autocast."""

    device: torch.device
    precision: str = "bf16"
    num_classes: int = 1000

    @property
    def dtype(self) -> torch.dtype:
        """The weights' and inputs' dtype."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def cuda(self) -> bool:
        """Whether this runs on a GPU (else: the CPU smoke run)."""
        return self.device.type == "cuda"

    def sync(self) -> None:
        """Wait for queued kernels (CUDA only), so that a wall-clock interval covers the work."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Drop unreferenced tensors and return cached blocks to the device (CUDA only), between stages."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def mfu(images_per_s: float, flops_per_image: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak; None where the peak is unknown."""
    if not peak_flops:
        return None
    return images_per_s * flops_per_image / peak_flops


def timm_twin(name: str, num_classes: int) -> torch.nn.Module:
    """timm's `VisionTransformer` of the same shape as our variant `name` (random weights)."""
    import timm

    a = resolve_args(name, num_classes=num_classes)
    shape = {k: getattr(a, k) for k in BACKBONE_FIELDS}  # timm's model_args, as the timm export writes them
    return timm.create_model(SPECS[name].timm or TIMM_GENERIC, pretrained=False, num_classes=num_classes, **shape)


def build(name: str, setup: Setup, *, compile_: bool, timm_too: bool) -> list[tuple[torch.nn.Module, object]]:
    """[(model to step, its optimizer)] for ours (and timm's, same weights), on the device in the setup's dtype.

    With `compile_`, ours is compiled regionally (each block, as `train.compile` does in training) and timm's whole.
    """
    with setup.device:  # initialised where they run: seconds of a short lease saved for ViT-H (632M parameters)
        ours = create_vit(name, num_classes=setup.num_classes)
        models = [ours]
        if timm_too:
            theirs = timm_twin(name, setup.num_classes)
            theirs.load_state_dict(ours.state_dict())  # same shapes, or this raises
            models.append(theirs)
    out = []
    for m in models:
        m = m.to(device=setup.device, dtype=setup.dtype).train()
        # fused: one kernel for the whole update; bf16 params keep bf16 moments (DeepSpeed keeps fp32 ones)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        if compile_ and m is ours:
            compile_blocks(m, zero_stage=0)
        elif compile_:
            m = torch.compile(m)
        out.append((m, opt))
    return out


def train_step(model: torch.nn.Module, opt, x: torch.Tensor, y: torch.Tensor, setup: Setup) -> None:
    """Forward, cross-entropy, backward, optimizer step."""
    with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.precision == "autocast"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def synthetic(name: str, batch: int, setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (B, 3, S, S) at the variant's size and random labels, on the device."""
    s = resolve_args(name).img_size
    x = torch.randn(batch, 3, s, s, device=setup.device, dtype=setup.dtype)
    return x, torch.randint(0, setup.num_classes, (batch,), device=setup.device)


def images_per_s(step: Callable[[], None], batch: int, steps: int, setup: Setup) -> float:
    """Images per second of `steps` calls of `step`, each a batch of `batch`."""
    setup.sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    setup.sync()
    return batch * steps / (time.perf_counter() - t)


def throughput(name: str, setup: Setup, batch: int, *, compile_: bool, timm_too: bool, steps: int, rounds: int) -> dict:
    """Synthetic-data images/s of ours (and timm's), interleaved rounds of `steps` steps, the best round of each.

    A smaller GPU than planned halves the batch until it fits.
    """
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)  # CUDA only
    runs = build(name, setup, compile_=compile_, timm_too=timm_too)
    while True:
        try:
            x, y = synthetic(name, batch, setup)
            for model, opt in runs:
                for _ in range(3):  # warm-up: kernel selection, allocator, compile
                    train_step(model, opt, x, y, setup)
            break
        except OOM:
            x = y = None
            setup.free()
            if batch == 1:
                raise
            batch //= 2
    best = [0.0] * len(runs)
    for _ in range(rounds):
        for i, (model, opt) in enumerate(runs):
            rate = images_per_s(partial(train_step, model, opt, x, y, setup), batch, steps, setup)
            best[i] = max(best[i], rate)
    flops = train_flops_per_image(resolve_args(name, num_classes=setup.num_classes))
    peak = device_peak_flops(setup.device)
    return {
        "batch": batch,
        "flops_per_image": flops,
        "ours_img_s": best[0],
        "timm_img_s": best[1] if timm_too else None,
        "ours_mfu": mfu(best[0], flops, peak),
        "timm_mfu": mfu(best[1], flops, peak) if timm_too else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.cuda else None,
    }


def sdpa_backends(name: str, setup: Setup, batch: int = 8) -> list[str]:
    """The SDPA kernels that accept this model's attention shapes on this device (each tried alone); the default
    dispatcher takes the first usable one of its priority list, flash attention first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    a = resolve_args(name)
    tokens, heads = (a.img_size // a.patch_size) ** 2 + 1, a.num_heads
    q = torch.randn(batch, heads, tokens, a.embed_dim // heads, device=setup.device, dtype=torch.bfloat16)
    usable = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            usable.append(backend.name.lower())
        except RuntimeError:
            pass
    return usable or ["math"]


def max_batch(name: str, setup: Setup, *, checkpointing: bool, cap: int, search: Callable) -> int:
    """Largest micro-batch (multiple of 8, at most `cap`) of our ViT, eager, that completes two training steps
    without running out of memory; `search` is `bench_gpu.largest_fitting`."""
    with setup.device:
        model = create_vit(name, num_classes=setup.num_classes).to(dtype=setup.dtype)
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def fits(batch: int) -> bool:
        x = y = None
        try:
            x, y = synthetic(name, batch, setup)
            for _ in range(2):  # the second step runs with the optimizer states already allocated
                train_step(model, opt, x, y, setup)
            setup.sync()
            return True
        except OOM:
            return False
        finally:
            del x, y
            opt.zero_grad(set_to_none=True)
            setup.free()

    try:
        return search(fits, cap=cap)
    finally:
        model = opt = None  # the closure's cells: frees the weights and optimizer states before empty_cache
        setup.free()


@dataclass(frozen=True)
class StreamRun:
    """One real-stream stage: the batch, loader workers, decode path, and the photos the shards are made of."""

    batch: int
    workers: int
    decode: str  # "cpu": JPEGs decoded in the workers; "gpu": `data.decode=gpu`
    steps: int
    photo_size: tuple[int, int] = (500, 375)


def with_stream(name: str, setup: Setup, run: StreamRun, *, compile_: bool) -> dict:
    """Images/s and data-wait of our training step fed by the real input stream from JPEG shards made here."""
    from data_tools.digits import write_photos
    from data_tools.shard import shard
    from pretrain.config import DataConfig
    from pretrain.data import build_train_loader, normalize

    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    try:
        photos = write_photos(tmp / "photos", classes=4, per_class=max(64, run.batch // 2), size=run.photo_size)
        shard(photos, tmp / "shards", workers=min(8, os.cpu_count() or 1), samples_per_shard=64, progress=False)
        # resampled: one endless stream, so no epoch boundary (worker restart) falls inside the timed steps
        cfg = DataConfig(
            train_shards=str(tmp / "shards"),
            num_workers=run.workers,
            shuffle_buffer=512,
            mode="resampled",
            decode=run.decode,
        )
        loader = build_train_loader(
            cfg,
            img_size=resolve_args(name).img_size,
            batch_size=run.batch,
            seed=0,
            pin_memory=setup.cuda,
            device=setup.device,
            decoder=None if setup.cuda else cpu_decoder,  # CUDA: nvJPEG
        )
        ((model, opt),) = build(name, setup, compile_=compile_, timm_too=False)
        it = iter(loader)

        def step() -> None:
            b = next(it)
            x = normalize(b["image"].to(setup.device, non_blocking=True), cfg.mean, cfg.std, setup.dtype)  # (B,3,S,S)
            train_step(model, opt, x, b["label"].to(setup.device, non_blocking=True), setup)

        for _ in range(5):  # warm-up: workers start, shuffle buffers fill
            step()
        loader.stats(reset=True)
        rate = images_per_s(step, run.batch, run.steps, setup)
        return {
            "batch": run.batch,
            "workers": run.workers,
            "img_s": rate,
            "data_wait_fraction": loader.stats()["data_wait_fraction"],
            "decode": run.decode,
        }
    finally:
        setup.free()
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_decoder(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """The CPU stand-in for nvJPEG in the smoke run: torchvision's `decode_jpeg` on the CPU, RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(datas, mode=ImageReadMode.RGB)

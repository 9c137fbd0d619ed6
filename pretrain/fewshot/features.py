"""Frozen features of chosen samples, computed on every rank for an even share and gathered to rank 0.

The representation is what the head reads: the pre-logits layer's output when the model has one, else the
(pooled) class token after the final norm, as the ViT paper's few-shot evaluation uses. It is caught by a forward
pre-hook on the head while the whole model runs, so DeepSpeed's ZeRO-3 hooks gather every parameter as in the
held-out evaluation. Each rank takes a contiguous block of ceil(N / world) positions and runs the same number of
batches (padded with masked zero images: ZeRO-3 needs every rank in every forward). Images are decoded and centre
cropped (`EvalTransform`) in threads, the forward runs under `torch.no_grad` (bf16 autocast where asked), and the
features come back in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_tools.storage import IOPolicy
from pretrain.data import EvalTransform
from pretrain.data.decode import BadSample, image_bytes
from pretrain.data.reader import Reader
from pretrain.fewshot.sets import Samples

Forward = Callable[[torch.Tensor], torch.Tensor]
"""uint8 images (B, 3, S, S) -> float32 features (B, F) on the embedder's device."""


def input_of(module: nn.Module, call: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    """The input of `module` (float32) while `call(x)` runs the model that holds it (`call` may be a DeepSpeed
    engine: its ZeRO-3 hooks gather every parameter as in any forward)."""
    caught: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _module, args: caught.append(args[0]))
    try:
        call(x)
    finally:
        handle.remove()
    return caught[-1].float()


@dataclass
class Embedder:
    """How one rank turns positions of a split into features."""

    forward: Forward
    """uint8 images -> float32 features (one forward of the model on every rank)."""
    img_size: int
    """Input size of the model."""
    crop_pct: float
    """Centre-crop fraction (`data.eval_crop_pct`)."""
    batch_size: int
    """Images per forward."""
    device: torch.device
    """Where the features are gathered (NCCL gathers device tensors)."""
    io: IOPolicy
    """Remote reads: timeouts and retries."""
    threads: int = 4
    """Decoding threads."""
    rank: int = 0
    world: int = 1


def _samples(samples: Samples, lo: int, hi: int, io: IOPolicy) -> Iterator[tuple[bytes | None, int]]:
    """(image bytes, label) of positions[lo:hi], in order; (None, -1) for a sample that cannot be read."""
    shards, want = samples.shards, samples.positions[lo:hi]
    offsets = np.cumsum([0, *shards.lengths])
    reader = Reader(tuple(shards.urls), tuple(shards.lengths), io)
    i = 0
    while i < len(want):
        j = int(np.searchsorted(offsets, want[i], side="right")) - 1
        here = (want[i:][want[i:] < offsets[j + 1]] - offsets[j]).tolist()  # this shard's wanted indices
        items = reader.fetch({k: (j, k) for k in here})  # one shard's images in memory at a time
        for k in here:
            item = items[k]
            yield (None, -1) if item.raw is None else (image_bytes(item.raw)[0], item.labels[0])
        i += len(here)


def _decode(transform: EvalTransform, data: bytes | None) -> torch.Tensor | None:
    if data is None:
        return None
    try:
        return transform(data)
    except BadSample:
        return None


def embed(
    e: Embedder, samples: Samples, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[None, None, None]:
    """Features and labels of `samples` on rank 0: (features (M, F) float32, labels (M,), kept (N,) bool) where
    the M kept positions are those that could be read; (None, None, None) on the other ranks. A collective."""
    n = len(samples.positions)
    block = -(-n // e.world)
    lo, hi = min(e.rank * block, n), min((e.rank + 1) * block, n)
    batches = max(1, -(-block // e.batch_size))  # equal on every rank
    transform = EvalTransform(e.img_size, e.crop_pct)
    feats, labels, mask = [], [], []
    source = _samples(samples, lo, hi, e.io)
    with ThreadPoolExecutor(max(1, e.threads)) as pool:
        for _ in range(batches):
            raw = [x for _, x in zip(range(e.batch_size), source, strict=False)]
            images = list(pool.map(lambda r: _decode(transform, r[0]), raw))
            x = torch.zeros(e.batch_size, 3, e.img_size, e.img_size, dtype=torch.uint8)
            ok = torch.zeros(e.batch_size, dtype=torch.bool)
            for i, img in enumerate(images):
                if img is not None:
                    x[i], ok[i] = img, True
            feats.append(e.forward(x).to(e.device, torch.float32))
            labels.append(torch.tensor([r[1] for r in raw] + [-1] * (e.batch_size - len(raw)), device=e.device))
            mask.append(ok.to(e.device, torch.uint8))  # uint8: what every backend gathers
            if progress:
                progress(len(raw))
    mine = [torch.cat(feats), torch.cat(labels), torch.cat(mask)]  # (batches * B, F), (batches * B,), ...
    every = [_gather(t, e) for t in mine]
    if e.rank:
        return None, None, None
    f, y, m = (torch.cat(t) for t in every)
    counts = [max(0, min((r + 1) * block, n) - r * block) for r in range(e.world)]  # positions of each rank
    real = torch.cat([torch.arange(batches * e.batch_size) < c for c in counts]).to(m.device)  # not padding
    kept = m[real].bool()
    return f[real][kept].cpu().numpy(), y[real][kept].cpu().numpy(), kept.cpu().numpy()


def _gather(t: torch.Tensor, e: Embedder) -> list[torch.Tensor]:
    """Every rank's `t` (same shape everywhere) on rank 0, in rank order."""
    if e.world == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(e.world)] if e.rank == 0 else None
    dist.gather(t, out, dst=0)
    return out or []

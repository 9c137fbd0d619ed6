"""Few-shot evaluation of a model on its sets: the draw (once), the features (every time), the fits (rank 0), and
`FewShotEvaluator`, the Trainer's part that runs it every `fewshot.every_steps` steps and at the end."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from data_tools.storage import IOPolicy
from pretrain.config import DataConfig, FewshotConfig
from pretrain.data.loader import io_policy
from pretrain.fewshot.features import Embedder, embed, input_of
from pretrain.fewshot.ridge import L2_GRID, ShotResult, fewshot_fit
from pretrain.fewshot.sets import Draw, FewshotSet, Samples, draw_shots, first_positions, read_labels, resolve_set
from pretrain.fewshot.spec import SetSpec, parse_sets, parse_shots

if TYPE_CHECKING:
    from pretrain.train.engine import Engine


@dataclass
class SetResult:
    """One set's few-shot results."""

    name: str
    """The set's name (`fewshot/<name>/<k>shot`)."""
    num_classes: int
    """Classes of the set."""
    train_images: int
    """Train images embedded (every drawn shot)."""
    test_images: int
    """Test images the accuracy is read on."""
    draw_id: str
    """12 hex digits of the drawn positions' SHA-1: equal ids, equal shots."""
    shots: dict[int, ShotResult] = field(default_factory=dict)
    """The result at each shot count."""
    short: dict[int, int] = field(default_factory=dict)
    """Classes with fewer than k images in the pool, per k (they get what there is)."""


class FewShot:
    """The sets of one evaluation setup; `run(embedder)` evaluates a model on them.

    Args:
        specs: the sets as written (`pretrain.fewshot.spec`).
        shots: shot counts, ascending.
        seed: seed of the draw.
        max_train_images: the shot pool is the first N train images (0: all).
        max_test_images: test images per set (0: all).
        io: remote read policy.
    """

    def __init__(
        self,
        specs: list[SetSpec],
        shots: tuple[int, ...],
        *,
        seed: int = 0,
        max_train_images: int = 0,
        max_test_images: int = 0,
        io: IOPolicy | None = None,
    ) -> None:
        self.shots, self.seed, self.pool, self.max_test = shots, seed, max_train_images, max_test_images
        self.io = io or IOPolicy()
        self.sets: list[FewshotSet] = [resolve_set(s, seed) for s in specs]
        self._draws: dict[str, Draw] = {}

    def draw(self, s: FewshotSet, rank: int = 0, world: int = 1) -> Draw:
        """The set's k-shot draw, made at the first call (reads the pool's labels: a collective of `world` ranks)."""
        if s.name not in self._draws:
            pool = len(first_positions(s.train, self.pool))
            labels = read_labels(s.train, pool, self.io, rank, world)
            self._draws[s.name] = draw_shots(labels, s.num_classes, max(self.shots), self.seed)
        return self._draws[s.name]

    def run(self, embedder: Embedder, progress: Callable[[str, int, int], Any] | None = None) -> list[SetResult]:
        """Every set's results on rank 0 ([] elsewhere): a collective of the embedder's ranks. `progress(set, done,
        total)` is called as images pass."""
        out = []
        for s in self.sets:
            d = self.draw(s, embedder.rank, embedder.world)
            train, test = Samples(s.train, d.positions()), Samples(s.test, first_positions(s.test, self.max_test))
            tick = Tick(progress, s.name, len(train.positions) + len(test.positions))
            tx, _, tkept = embed(embedder, train, tick)  # train labels: the draw's
            qx, qy, _ = embed(embedder, test, tick)
            if embedder.rank == 0:
                out.append(self._fit(s, d, train.positions[tkept], tx, qx, qy, embedder.device))
        return out

    def _fit(self, s: FewshotSet, d: Draw, kept: np.ndarray, tx, qx, qy, device: torch.device) -> SetResult:
        """Rank 0: the fit for every shot count (`ridge.fewshot_fit`, float64 on `device`) from the embedded train
        and test images."""
        row = {int(p): i for i, p in enumerate(kept)}  # position -> feature row (unreadable shots are left out)
        res = SetResult(s.name, s.num_classes, len(kept), len(qy), draw_id(d))
        for k in self.shots:
            pos, labels, index = d.shots(k)
            ok = np.array([int(p) in row for p in pos], dtype=bool)
            x = tx[[row[int(p)] for p in pos[ok]]]
            res.shots[k] = fewshot_fit(x, labels[ok], index[ok], k, qx, qy, s.num_classes, L2_GRID, device)
            res.short[k] = d.short_classes(k)
        return res


@dataclass
class Tick:
    """Counts the images of one set as they pass and reports `(set, done, total)`."""

    report: Callable[[str, int, int], Any] | None
    name: str
    total: int
    done: int = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.report:
            self.report(self.name, self.done, self.total)


def draw_id(d: Draw) -> str:
    """A short fingerprint of the drawn positions."""
    h = hashlib.sha1()
    for p in d.per_class:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:12]


def metric_values(results: list[SetResult]) -> dict[str, Any]:
    """`<set>/<k>shot` accuracies (and `<set>/draw`) as logged under `fewshot/`."""
    values: dict[str, Any] = {}
    for r in results:
        values.update({f"{r.name}/{k}shot": v.accuracy for k, v in r.shots.items()})
        values[f"{r.name}/draw"] = r.draw_id
    return values


class FewShotEvaluator:
    """The Trainer's few-shot part: every `fewshot.every_steps` steps (before the last) and at the end.

    Args:
        cfg: the `fewshot` section (no sets: the part does nothing).
        data: the `data` section (eval crop, loader threads, remote reads).
        img_size: the model's input size.
        batch_size: images per forward (`train.micro_batch_size`).
        total_steps: `train.steps`.
    """

    def __init__(
        self,
        cfg: FewshotConfig,
        data: DataConfig,
        *,
        img_size: int,
        batch_size: int,
        total_steps: int,
    ) -> None:
        self.every, self.total_steps = cfg.every_steps, total_steps
        self.img_size, self.crop_pct, self.batch_size = img_size, data.eval_crop_pct, batch_size
        self.threads = max(1, data.num_workers)
        self.setup = None
        if cfg.sets:
            self.setup = FewShot(
                parse_sets(cfg.sets),
                parse_shots(cfg.shots),
                seed=cfg.seed,
                max_train_images=cfg.max_train_images,
                max_test_images=cfg.max_test_images,
                io=io_policy(data),
            )

    @property
    def enabled(self) -> bool:
        return self.setup is not None

    def due(self, step: int) -> bool:
        """An evaluation during training (the one at the end is `run` after the loop)."""
        return self.enabled and bool(self.every) and step % self.every == 0 and step < self.total_steps

    def embedder(self, engine: Engine) -> Embedder:
        """This rank's feature function: the engine's normalisation and compute dtype (bf16 autocast in bf16 runs),
        the head's input of the ViT inside the DeepSpeed engine, float32 out."""
        model, module = engine.model, engine.model.module  # the DeepSpeed engine and our ViT inside it
        bf16 = engine.dtype == torch.bfloat16

        def forward(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=bf16):
                return input_of(module.head, model, engine.inputs(images))

        io = self.setup.io if self.setup else IOPolicy()
        rank, world = dist.get_rank(), dist.get_world_size()
        return Embedder(
            forward, self.img_size, self.crop_pct, self.batch_size, engine.device, io, self.threads, rank, world
        )

    @torch.no_grad()
    def run(self, engine: Engine) -> dict[str, Any]:
        """`<set>/<k>shot` accuracies, `<set>/draw` and `time_s` on rank 0; {} elsewhere and when off. A collective."""
        if self.setup is None:
            return {}
        t0 = time.perf_counter()
        was_training = engine.model.training
        engine.model.eval()
        embedder = self.embedder(engine)
        results = self.setup.run(embedder)
        if was_training:
            engine.model.train()
        if embedder.rank:
            return {}
        return {**metric_values(results), "time_s": time.perf_counter() - t0}

"""Crash-safe checkpoints on top of DeepSpeed's: save, prune, find what to resume from, and resume.

The layout (tag names, `pretrain_meta.json`, `latest`) is `pretrain.checkpoint_format`'s. A tag is complete only once
its `pretrain_meta.json` is written, after every rank saved: a crash at any moment, even in the middle of a save,
leaves the previous complete tag as the one that resume (and `pretrain.export`) picks.

The client state DeepSpeed stores with its files holds the run's parts keyed by name, under one key of its own
(`PARTS`, so that no part name can meet one of DeepSpeed's keys): `{"parts": {name: part.state_dict()}}`. A part
whose state differs per rank (`per_rank`) is saved as the list of every rank's state, gathered in `gather_parts`:
the one collective a save runs besides DeepSpeed's own; a part that can `merge` that list (the input stream: its
position is the same on every rank, only its bad-data counts differ) is saved as the merged record, once. The
stream's record is also written into `pretrain_meta.json`, so that a resume can refuse a world size the stream
cannot serve before any collective. Checkpoints written before this layout (one flat namespace
of every part's keys) still resume: `client_parts` reads both.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from data_tools.fsutil import atomic_write
from pretrain.checkpoint_format import (
    FORMAT_VERSION,
    LATEST,
    META,
    TAG,
    CheckpointError,
    checkpoints_dir,
    complete_tags,
    newest_complete,
    read_meta,
    tag_for,
)
from pretrain.config import CheckpointConfig, Config
from pretrain.models.specs import WEIGHT_FIELDS
from pretrain.train import faults
from pretrain.train.distributed import gather

if TYPE_CHECKING:
    from pretrain.train.distributed import Stateful
    from pretrain.train.engine import Engine

ResumeTarget = tuple[Path, str]  # (checkpoints folder, tag)
PARTS = "parts"
"""The key of DeepSpeed's client state that holds the parts: {part name: state}."""


def resolve_resume(resume: str, output_dir: str | Path) -> ResumeTarget | None:
    """Turn `train.resume` (auto | none | PATH) into (checkpoints dir, tag), or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpt_dir = Path(output_dir) / "checkpoints"
        tag = newest_complete(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    p = Path(resume)
    if (p / META).is_file():  # a tag folder
        return p.parent, p.name
    if TAG.match(p.name) and p.is_dir():
        raise CheckpointError(f"checkpoint {p} is incomplete (no {META}; the run died while saving); pick another")
    ckpt_dir = checkpoints_dir(p)
    tag = newest_complete(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"train.resume={resume}: no complete checkpoint there; use a run or tag folder")
    return ckpt_dir, tag


def is_universal(target: ResumeTarget) -> bool:
    """A `ds_to_universal` folder (`vit-universal`), which DeepSpeed loads on any world size."""
    return (target[0] / target[1] / "zero").is_dir()


def check_resumable(target: ResumeTarget, model_args: Any, world_size: int) -> None:
    """Refuse, before any collective, a checkpoint of another model shape or of another world size unconverted."""
    ckpt_dir, tag = target
    meta = read_meta(ckpt_dir / tag)
    check_model_matches(meta, model_args, str(ckpt_dir / tag))
    if meta["world_size"] != world_size and not is_universal(target):
        raise CheckpointError(
            f"checkpoint {tag} was written by {meta['world_size']} ranks, this run has {world_size}; "
            f"convert it with `vit-universal {ckpt_dir / tag}` and resume from the converted folder"
        )


def check_model_matches(meta: dict[str, Any], model_args: Any, where: str) -> None:
    """Refuse to resume into a model of another shape."""
    ours = dataclasses.asdict(model_args)
    theirs = meta.get("model_args", {})
    diff = [k for k in WEIGHT_FIELDS if theirs.get(k) != ours.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"checkpoint {where} holds a model of another shape ({detail}); "
            "resume with the same model settings, or start fresh with train.resume=none and a new run.output_dir"
        )


def run_meta(cfg: Config, world_size: int, model_args: Any, class_names: list[str]) -> dict[str, Any]:
    """The fields of `pretrain_meta.json` that hold for the whole run (the whole config is stored)."""
    return {
        "zero_stage": cfg.deepspeed.zero_stage,
        "world_size": world_size,
        "precision": cfg.train.precision,
        "model_name": cfg.model.name,
        "model_args": dataclasses.asdict(model_args),
        "class_names": class_names,
        "config": cfg.to_dict(),
    }


def gather_parts(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """{name: state} of every part; a `per_rank` part's state is the list of every rank's, in rank order (or its
    `merge` of that list, when the part has one).

    A collective (every rank calls it): the one all-gather of a save, for every per-rank part at once. No part's
    `state_dict()` runs a collective itself.
    """
    local = {name: part.state_dict() for name, part in parts.items()}
    per_rank = [name for name, part in parts.items() if part.per_rank]
    every_rank = gather({name: local[name] for name in per_rank})
    out = {name: [r[name] for r in every_rank] if name in per_rank else state for name, state in local.items()}
    return {name: parts[name].merge(state) if hasattr(parts[name], "merge") else state for name, state in out.items()}


def client_parts(client: Mapping[str, Any]) -> dict[str, Any]:
    """The parts' states in a loaded client state: {name: state}, also from a checkpoint of the flat layout."""
    if PARTS in client:
        return dict(client[PARTS])
    # The flat layout (format_version 1): TrainState's counters and every rank's RNG state ("rng") beside every
    # rank's stream position ("stream"), all at the top level of the client state.
    parts = {"state": {k: client[k] for k in ("step", "samples_seen", "nonfinite_steps")}, "rng": client["rng"]}
    return {**parts, **({"stream": client["stream"]} if "stream" in client else {})}


def write_meta(ckpt_dir: Path, tag: str, meta: dict[str, Any]) -> None:
    """Mark `tag` complete and point `latest` at it (rank 0, after every rank finished writing)."""
    atomic_write(ckpt_dir / tag / META, json.dumps({**meta, "format_version": FORMAT_VERSION}, indent=1))
    atomic_write(ckpt_dir / LATEST, tag)


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep_last`, except steps that are multiples of
    `keep_every`; also delete incomplete tags older than the newest complete one. Returns the deleted tags."""
    tags = complete_tags(ckpt_dir)
    keep = {t for _, t in tags[-keep_last:]}
    keep |= {t for s, t in tags if keep_every and s % keep_every == 0}
    newest = tags[-1][0] if tags else -1
    deleted = []
    for d in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        m = TAG.match(d.name)
        if not m or d.name in keep:
            continue
        if (d / META).is_file() or int(m.group(1)) < newest:
            shutil.rmtree(d, ignore_errors=True)
            deleted.append(d.name)
    return deleted


class Checkpointer:
    """Saves every `checkpoint.every_steps` steps and at the last one, keeps the newest ones, resumes a run.

    Args:
        section: the `checkpoint` config section.
        ckpt_dir: RUN/checkpoints.
        total_steps: the run's last step (always saved).
        target: what to resume from (`resolve_resume`), or None to start fresh.
        run_meta: the run-wide fields of `pretrain_meta.json` (`run_meta`).
    """

    def __init__(
        self,
        section: CheckpointConfig,
        ckpt_dir: Path,
        *,
        total_steps: int,
        target: ResumeTarget | None,
        run_meta: dict[str, Any],
    ) -> None:
        self.section, self.dir, self.total_steps = section, Path(ckpt_dir), total_steps
        self.target, self.run_meta = target, run_meta
        self.last_save = time.monotonic()

    def due(self, step: int) -> bool:
        return step % self.section.every_steps == 0 or step == self.total_steps

    def overdue(self) -> bool:
        """`checkpoint.every_minutes` passed since the last save, by this rank's clock (the ranks agree on rank 0's:
        the other ranks answer False)."""
        minutes = self.section.every_minutes
        return bool(minutes) and dist.get_rank() == 0 and time.monotonic() - self.last_save >= 60 * minutes

    def save(self, step: int, engine: Engine, parts: Mapping[str, Stateful], samples_seen: int) -> None:
        """Every rank writes its DeepSpeed files with the parts' state; once all did, rank 0 marks the tag complete,
        points `latest` at it and prunes. A collective: every rank calls it."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        rank, tag = dist.get_rank(), tag_for(step)
        if rank == 0 and (self.dir / tag).exists():
            shutil.rmtree(self.dir / tag)  # leftovers of a save that crashed half-way
        states = gather_parts(parts)  # the parts' collectives, all here
        client = {
            PARTS: states,
            # lets `ds_to_universal` (vit-universal) convert this checkpoint for another world size
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        dist.barrier()
        try:
            with faults.disk_full_if(step):
                engine.save_checkpoint(self.dir, tag, client)
        except OSError as e:  # this rank stops; the launcher ends the others, which wait for it in a barrier
            previous = newest_complete(self.dir)
            kept = f"the previous checkpoint {previous} is intact and resume picks it" if previous else "none before"
            raise CheckpointError(
                f"rank {rank}: saving the checkpoint at step {step} failed: {e}; {kept}; "
                f"free space in {self.dir} and run the same command again"
            ) from None
        faults.kill_rank0_if("save", step)
        dist.barrier()  # every rank's shard is on disk before the tag is marked complete
        if rank == 0:
            meta = {"step": step, "samples_seen": samples_seen, **self.run_meta, "stream": states.get("stream")}
            write_meta(self.dir, tag, meta)
            prune(self.dir, self.section.keep_last, self.section.keep_every)
        dist.barrier()
        self.last_save = time.monotonic()

    def resume(self, engine: Engine, parts: Mapping[str, Stateful]) -> None:
        """Load the target checkpoint into the engine and every part (nothing when starting fresh)."""
        if self.target is None:
            return
        ckpt_dir, tag = self.target
        saved = client_parts(engine.load_checkpoint(ckpt_dir, tag))
        missing = sorted(set(parts) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint {ckpt_dir / tag} holds no state for {', '.join(missing)}; start fresh")
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        if dist.get_rank() == 0:
            print(f"resumed from {ckpt_dir / tag} at step {read_meta(ckpt_dir / tag)['step']}", flush=True)

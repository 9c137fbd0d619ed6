"""Rebuild the fp32 master weights of a DeepSpeed ZeRO 1/2/3 checkpoint, one tensor at a time.

DeepSpeed keeps the fp32 master weights only inside the optimizer shards, one `*_optim_states.pt` per
data-parallel rank, as flat vectors (layout as in DeepSpeed's `utils/zero_to_fp32.py`):

- ZeRO 1 and 2: per parameter group, the group's parameters are concatenated (each followed by its alignment
  padding, if recorded), padded, and cut into one contiguous piece per rank
  (`single_partition_of_fp32_groups[group]`). A parameter is a slice of the concatenation of the ranks' pieces.
- ZeRO 3: every parameter is cut into `ceil(numel / world)` elements per rank (the last rank padded); each rank
  concatenates its pieces of all parameters in order (`fp32_flat_groups`, several groups back to back). A
  parameter is the concatenation of its piece on every rank, truncated to numel.

`zero_to_fp32` concatenates whole partitions (ZeRO 1/2) or materialises the full state dict; here each parameter
is assembled from the few byte ranges it occupies (`pread` through `torchzip`), so memory holds one parameter at a
time, and the optimizer moments stored next to the master weights are never read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.export.torchzip import LazyTensor, TorchZipError, TorchZipFile

_OPTIM = re.compile(r"^(?:.*_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class ZeroCheckpointError(ValueError):
    """The tag folder is not a complete DeepSpeed ZeRO checkpoint."""


def _by_rank(files: list[Path], pattern: re.Pattern[str], what: str, tag_dir: Path) -> list[Path]:
    ranked = {}
    for f in files:
        m = pattern.match(f.name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise ZeroCheckpointError(f"{tag_dir} was saved with model parallelism (mp_rank > 0), which is unsupported")
        ranked[int(m.group(1))] = f
    if not ranked:
        raise ZeroCheckpointError(f"{tag_dir} holds no {what} files; it is not a DeepSpeed ZeRO checkpoint")
    if sorted(ranked) != list(range(len(ranked))):
        raise ZeroCheckpointError(f"{tag_dir} misses {what} files of some ranks (found ranks {sorted(ranked)})")
    return [ranked[r] for r in range(len(ranked))]


class ZeroCheckpoint:
    """One DeepSpeed tag folder, opened lazily. `shapes()` lists every output tensor; `tensors()` streams them.

    Args:
        tag_dir: the folder DeepSpeed's `save_checkpoint` wrote (holds `*_model_states.pt`, `*_optim_states.pt`).
    """

    def __init__(self, tag_dir: str | Path) -> None:
        self.tag_dir = Path(tag_dir)
        files = sorted(self.tag_dir.glob("*.pt"))
        optim_paths = _by_rank(files, _OPTIM, "*_optim_states.pt", self.tag_dir)
        self._files: list[TorchZipFile] = []
        try:
            optims = [self._open(p)["optimizer_state_dict"] for p in optim_paths]
            self.stage = int(optims[0]["zero_stage"])
            world = optims[0]["partition_count"]
            self.world_size = max(world) if isinstance(world, list) else int(world)  # list: per-group counts
            if self.world_size != len(optims):
                raise ZeroCheckpointError(
                    f"{self.tag_dir} holds {len(optims)} optimizer shards but was saved by {self.world_size} ranks; "
                    "the save did not finish on every rank"
                )
            if self.stage in (1, 2):
                model_paths = [self.tag_dir / "mp_rank_00_model_states.pt"]
                self._flat = [o["single_partition_of_fp32_groups"] for o in optims]
                self._paddings = optims[0].get("param_alignment_paddings")
            elif self.stage == 3:
                model_re = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
                model_paths = _by_rank(files, model_re, "*_model_states.pt", self.tag_dir)
                self._flat = [o["fp32_flat_groups"] for o in optims]
            else:
                raise ZeroCheckpointError(f"{self.tag_dir}: ZeRO stage {self.stage} checkpoints are not supported")
            for p in model_paths:
                if not p.is_file():
                    raise ZeroCheckpointError(f"{self.tag_dir} lacks {p.name}; the checkpoint is incomplete")
            self._models = [self._open(p) for p in model_paths]
        except (KeyError, TypeError) as e:
            self.close()
            raise ZeroCheckpointError(f"{self.tag_dir}: unexpected DeepSpeed checkpoint layout (missing {e})") from e
        except Exception:
            self.close()
            raise
        state = self._models[0]
        self._param_shapes = [dict(g) for g in state["param_shapes"]]  # one {name: shape} per parameter group
        self._buffer_names = list(state.get("buffer_names") or [])
        self._frozen_shapes = dict(state.get("frozen_param_shapes") or {})
        self._shared = dict(state.get("shared_params") or {})

    def _open(self, path: Path) -> dict:
        try:
            f = TorchZipFile(path)
            self._files.append(f)
            return f.load()
        except TorchZipError as e:
            raise ZeroCheckpointError(f"{e}; the checkpoint is damaged or half-written") from e

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> ZeroCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- listing

    def shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """(shape, dtype) of every tensor `tensors()` yields, in the same order (as `zero_to_fp32`: buffers,
        frozen parameters, trainable parameters, then shared aliases)."""
        out: dict[str, tuple[torch.Size, torch.dtype]] = {}
        module = self._models[0]["module"]
        for name in self._buffer_names:
            t = module[name]
            out[name] = (t.shape, torch.float32 if t.dtype.is_floating_point else t.dtype)
        for name, shape in self._frozen_shapes.items():
            out[name] = (torch.Size(shape), torch.float32)
        for group in self._param_shapes:
            for name, shape in group.items():
                out[name] = (torch.Size(shape), torch.float32)
        for alias, target in self._shared.items():
            if target in out:
                out[alias] = out[target]
        return out

    # -------------------------------------------------------------------------------------------- streaming

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in `shapes()` order; parameters in fp32, each a new tensor."""
        module = self._models[0]["module"]
        for name in self._buffer_names:
            t = module[name].load()
            yield name, t.float() if t.is_floating_point() else t
        yield from self._frozen()
        yield from (self._zero12() if self.stage <= 2 else self._zero3())
        for alias, target in self._shared.items():  # tied weights: same values under a second name
            if target in self.shapes():
                yield alias, self._read_one(target)

    def _read_one(self, wanted: str) -> torch.Tensor:
        for name, t in self.tensors():
            if name == wanted:
                return t
        raise KeyError(wanted)

    def _frozen(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self._frozen_shapes.items():
            numel = math.prod(shape)
            if self.stage <= 2:  # rank 0 saved the whole frozen tensor
                t = self._models[0]["frozen_param_fragments"][name].load()
            else:  # each rank saved its piece
                t = torch.cat([m["frozen_param_fragments"][name].read() for m in self._models])[:numel]
            yield name, t.reshape(shape).float()

    def _zero12(self) -> Iterator[tuple[str, torch.Tensor]]:
        for g, shapes in enumerate(self._param_shapes):
            parts: list[LazyTensor] = [ranks[g] for ranks in self._flat]  # piece of group g on each rank
            starts = [0]
            for p in parts:
                starts.append(starts[-1] + p.numel())  # where each rank's piece begins in the group's vector
            pads = self._paddings[g] if self._paddings is not None else [0] * len(shapes)
            if len(pads) != len(shapes):
                raise ZeroCheckpointError(f"{self.tag_dir}: {len(pads)} paddings for {len(shapes)} params in group {g}")
            offset = 0
            for (name, shape), pad in zip(shapes.items(), pads, strict=True):
                numel = math.prod(shape)
                if offset + numel > starts[-1]:
                    raise ZeroCheckpointError(f"{self.tag_dir}: parameter {name} lies past the end of its group")
                yield name, _gather(parts, starts, offset, numel).view(shape)
                offset += numel + pad
            # ZeRO 2 pads every group to a multiple of 2 * world size; anything more means a layout we misread.
            align = 2 * self.world_size
            if math.ceil(offset / align) * align != math.ceil(starts[-1] / align) * align:
                raise ZeroCheckpointError(f"{self.tag_dir}: group {g} has {starts[-1]} elements, params use {offset}")

    def _zero3(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Per rank, the groups' flat vectors back to back: a piece may straddle two groups.
        group_sizes = [t.numel() for t in self._flat[0]]
        starts = [0]
        for n in group_sizes:
            starts.append(starts[-1] + n)
        offset = 0
        for shapes in self._param_shapes:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                piece = math.ceil(numel / self.world_size)  # elements of this parameter on every rank
                chunks = [_gather(rank_groups, starts, offset, piece) for rank_groups in self._flat]
                yield name, torch.cat(chunks)[:numel].view(shape)
                offset += piece
        if offset != starts[-1]:
            raise ZeroCheckpointError(f"{self.tag_dir}: ranks hold {starts[-1]} elements, params use {offset}")


def _gather(parts: list[LazyTensor], starts: list[int], offset: int, numel: int) -> torch.Tensor:
    """Elements [offset, offset + numel) of the concatenation of `parts` (which begin at `starts`)."""
    chunks = []
    for part, begin, end in zip(parts, starts[:-1], starts[1:], strict=True):
        lo, hi = max(offset, begin), min(offset + numel, end)
        if lo < hi:
            chunks.append(part.read(lo - begin, hi - lo))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

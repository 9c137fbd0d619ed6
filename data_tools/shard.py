"""`shard SRC OUT`: list SRC, shuffle globally, hold out a val split, and write WebDataset shards in parallel.

Steps: catalog SRC (sources.py) -> fingerprint input + options and check OUT -> split and plan shard boundaries
(by count and by source bytes, so the plan never depends on worker timing) -> workers each write whole shards
(temporary name, then rename, then a progress marker) -> `_info.json`, `_skipped.txt`, summary.
Every shard is a pure function of its planned samples, so output is byte-identical for any `--workers`, and a
killed run resumes by skipping shards that have a marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools import format as fmt
from data_tools import layout
from data_tools.errors import DataToolsError
from data_tools.fsutil import atomic_path, atomic_write
from data_tools.images import SIZE_EDGES, BadImage, ImageOptions, encode_image, size_bucket
from data_tools.parallel import default_workers, run_tasks
from data_tools.sources import Catalog, build_catalog, check_src, read_bytes, read_record
from data_tools.summary import all_shards_exist, assemble_info, shard_count, summarize

DEFAULT_SAMPLES_PER_SHARD = 2000
DEFAULT_MAX_SHARD_BYTES = 512 * 1024**2
# Tar bytes a sample adds beyond its image (padded to 512-byte blocks): three 512-byte headers plus one block each
# for the cls and json members (a json stays under 512 bytes unless the source path is very long).
SAMPLE_OVERHEAD = 3 * 512 + 2 * 512
# Bytes closing a tar: two zero blocks, then padding of the whole file to a 10,240-byte record (at most).
TAR_END = 10240


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: which samples, in which order."""

    split: str
    """`train` or `val`."""
    index: int
    """Shard number within the split."""
    keys: np.ndarray
    """int64 [n]: global shuffled position of each sample (its key)."""
    offsets: np.ndarray
    """int64 [n]: catalog record offset of each sample."""


@dataclass(frozen=True)
class WorkerContext:
    """What every worker needs, sent once per process."""

    out: Path
    """Output folder."""
    catalog: Path
    """Catalog file to read records from."""
    class_names: tuple[str, ...]
    """Class names, indexed by label."""
    image: ImageOptions
    """Resize and re-encode options."""
    strict: bool
    """Raise on the first bad input instead of skipping it."""


_CTX: WorkerContext | None = None


def shard(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    resize_shorter: int | None = None,
    quality: int | None = None,
    seed: int = 0,
    val_per_class: int = 0,
    val_fraction: float = 0.0,
    classes: str | os.PathLike | None = None,
    strict: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> dict:
    """Write SRC as WebDataset shards plus `_info.json` into OUT; resume if OUT holds this run half-done.

    Args:
        src: Image folder, CSV/TSV file list, or folder of per-class tars (see `sources.build_catalog`).
        out: Output folder: new, empty, or holding this same dataset (finished or interrupted).
        workers: Processes writing shards; default all cores.
        samples_per_shard: Most samples in one shard.
        max_shard_bytes: Most bytes in one shard, planned from source file sizes (re-encoded shards come out smaller
            when downscaling, and can be larger when re-encoding small images at high quality).
        resize_shorter: Downscale so the shorter side is at most this; never upscale.
        quality: Re-encode every image as JPEG at this quality.
        seed: Seed of the global shuffle and of the val hold-out.
        val_per_class: Hold out this many samples of each class as the `val` split.
        val_fraction: Hold out this fraction of all samples as the `val` split.
        classes: Text file fixing the class order (one name per line); default sorted folder names / labels.
        strict: Stop at the first unreadable input instead of skipping it.
        progress: Show a tqdm progress bar.
        name: Dataset name in `_info.json`; default SRC's base name.

    Returns:
        The summary: per split samples, shards, bytes and brace pattern; classes; skipped; timing.

    Raises:
        DataToolsError: Bad options or input, an OUT holding something else, or a bad input file under `strict`.
    """
    start = time.perf_counter()
    _check_options(samples_per_shard, max_shard_bytes, resize_shorter, quality, val_per_class, val_fraction)
    src, out = check_src(src), Path(out)
    _prepare_out(src, out)
    catalog_path = out / f".tmp-catalog-{os.getpid()}.jsonl"
    try:
        catalog = build_catalog(src, catalog_path, classes)
        image = ImageOptions(resize_shorter=resize_shorter, quality=quality)
        options = _run_options(image, seed, samples_per_shard, max_shard_bytes, val_per_class, val_fraction)
        fingerprint = _fingerprint(catalog, options)
        existing = layout.check_out_folder(out, fingerprint)
        finished = None if existing is None else fmt.DatasetInfo.from_dict(existing, str(out / fmt.INFO))
        if finished is not None and all_shards_exist(out, finished):
            return summarize(out, finished, written=0, reused=shard_count(finished), images=0, seconds=0.0)

        # Plan: shuffle, hold out val, cut shards; shards with a marker were finished by an earlier run.
        name = name or (src.name if src.is_dir() else src.stem)
        fmt.write_json(out / layout.PROGRESS / layout.PLAN, {"fingerprint": fingerprint, "name": name})
        perm, splits = split_samples(catalog, seed, val_per_class, val_fraction)
        plans = {
            s: plan_shards(catalog.sizes[perm[pos]], samples_per_shard, max_shard_bytes) for s, pos in splits.items()
        }
        markers = {s: [_read_marker(out, fmt.shard_name(s, i)) for i in range(len(p) - 1)] for s, p in plans.items()}
        todo = sum(plans[s][i + 1] - plans[s][i] for s in plans for i, m in enumerate(markers[s]) if m is None)
        tasks = _pending_tasks(catalog, perm, splits, plans, markers)

        # Write the missing shards, whole shards per worker.
        ctx = WorkerContext(out, catalog_path, tuple(catalog.class_names), image, strict)
        reused = sum(m is not None for ms in markers.values() for m in ms)
        written = _write_missing(ctx, tasks, markers, todo, workers or default_workers(), progress)
        info = assemble_info(name, fingerprint, options, catalog, markers)
        _finish(out, info, markers)
        seconds = time.perf_counter() - start
        return summarize(out, info, written=written, reused=reused, images=todo, seconds=seconds)
    finally:
        catalog_path.unlink(missing_ok=True)


def _run_options(
    image: ImageOptions,
    seed: int,
    samples_per_shard: int,
    max_shard_bytes: int,
    val_per_class: int,
    val_fraction: float,
) -> dict:
    """The options that decide the shards' content: stored in `_info.json` and hashed into the fingerprint."""
    return dict(
        asdict(image),
        seed=seed,
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        val_per_class=val_per_class,
        val_fraction=val_fraction,
    )


def _prepare_out(src: Path, out: Path) -> None:
    """Refuse an OUT inside SRC or holding unrelated files; create it and clean a killed run's temporaries."""
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DataToolsError(f"OUT '{out}' is inside SRC '{src}' and would be read as input; put OUT elsewhere")
    if _unrelated(out):
        layout.check_out_folder(out, fingerprint="")  # raises: OUT is a file or holds unrelated files
    out.mkdir(parents=True, exist_ok=True)
    layout.clean_temporaries(out)


def _fingerprint(catalog: Catalog, options: dict) -> str:
    """Identity of a run: the input (classes, files) and every option that changes the output."""
    blob = json.dumps({"input": catalog.digest, "classes": catalog.class_names, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_missing(
    ctx: WorkerContext, tasks: Iterator[ShardTask], markers: dict, todo: int, workers: int, progress: bool
) -> int:
    """Write the pending shards in `workers` processes, filling in their `markers`; returns how many were written."""
    written = 0
    bar = tqdm(total=todo, unit="img", unit_scale=True, desc=f"shard -> {ctx.out.name}", disable=not progress)
    with bar:
        for marker in run_tasks(_write_shard, tasks, workers, _init_worker, (ctx,)):
            markers[marker["split"]][marker["index"]] = marker
            written += 1
            bar.update(marker["count"] + len(marker["skipped"]))
    return written


def _finish(out: Path, info: dict, markers: dict) -> None:
    """The dataset description and the skipped list, then no more progress files."""
    atomic_write(
        out / layout.SKIPPED, "".join(f"{p}\t{r}\n" for ms in markers.values() for m in ms for p, r in m["skipped"])
    )
    fmt.write_info(out, info)
    shutil.rmtree(out / layout.PROGRESS)


def _unrelated(out: Path) -> bool:
    """True when OUT exists with content but holds neither `_info.json` nor a plan: refuse before writing anything."""
    if not out.exists():
        return False
    if not out.is_dir():
        return True
    has_ours = (out / fmt.INFO).is_file() or (out / layout.PROGRESS / layout.PLAN).is_file()
    return not has_ours and any(not n.startswith(".tmp-") for n in os.listdir(out))


def _check_options(samples_per_shard, max_shard_bytes, resize_shorter, quality, val_per_class, val_fraction) -> None:
    if samples_per_shard < 1:
        raise DataToolsError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes < 1:
        raise DataToolsError(f"--max-shard-bytes must be >= 1, got {max_shard_bytes}")
    if resize_shorter is not None and resize_shorter < 1:
        raise DataToolsError(f"--resize-shorter must be >= 1 pixel, got {resize_shorter}")
    if quality is not None and not 1 <= quality <= 100:
        raise DataToolsError(f"--quality must be in 1..100, got {quality}")
    if val_per_class < 0 or not 0.0 <= val_fraction < 1.0:
        raise DataToolsError("--val-per-class must be >= 0 and --val-fraction in [0, 1)")
    if val_per_class and val_fraction:
        raise DataToolsError("give --val-per-class or --val-fraction, not both")


def split_samples(
    catalog: Catalog, seed: int, val_per_class: int, val_fraction: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Shuffle globally and hold out val.

    Returns:
        perm: int64 [N], the catalog index of the sample at each shuffled position.
        splits: split name -> int64 array of shuffled positions (in order); only non-empty splits.
    """
    n = len(catalog)
    perm = np.random.default_rng(seed).permutation(n)
    if val_per_class:
        # The first K samples of each class in shuffled order go to val: rank of each position within its class.
        lab = catalog.labels[perm]  # [N] label at each shuffled position
        order = np.argsort(lab, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(lab, minlength=len(catalog.class_names)))[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[lab[order]]
        is_val = rank < val_per_class
    else:
        is_val = np.arange(n) < round(n * val_fraction)
    positions = np.arange(n, dtype=np.int64)
    splits = {"train": positions[~is_val], "val": positions[is_val]}
    if not len(splits["train"]):
        raise DataToolsError("the val hold-out leaves no training samples; lower --val-per-class or --val-fraction")
    return perm, {k: v for k, v in splits.items() if len(v)}


def plan_shards(sizes: np.ndarray | list[int], samples_per_shard: int, max_shard_bytes: int) -> list[int]:
    """Shard boundaries over samples of the given source sizes: shard i holds samples [b[i], b[i+1]).

    Greedy: each shard takes samples while it has fewer than `samples_per_shard` and its tar size, computed from the
    source sizes, stays within `max_shard_bytes` (a single bigger sample still gets a shard). One numpy search per
    shard, no Python loop over samples.
    """
    est = -(-np.asarray(sizes, dtype=np.int64) // 512) * 512 + SAMPLE_OVERHEAD  # [n] tar bytes of each sample
    csum = np.concatenate([[0], np.cumsum(est)])  # [n+1] bytes before each sample
    budget = max_shard_bytes - TAR_END
    n, bounds, i = len(est), [0], 0
    while i < n:
        j = int(np.searchsorted(csum, csum[i] + budget, side="right")) - 1  # most samples within the cap
        i = min(max(j, i + 1), i + samples_per_shard, n)
        bounds.append(i)
    return bounds


def _pending_tasks(
    catalog: Catalog, perm: np.ndarray, splits: dict[str, np.ndarray], plans: dict[str, list[int]], markers: dict
) -> Iterator[ShardTask]:
    """Lazily, the tasks of the shards that have no marker yet, split by split in shard order."""
    for split, positions in splits.items():
        bounds = plans[split]
        for i, marker in enumerate(markers[split]):
            if marker is None:
                chunk = positions[bounds[i] : bounds[i + 1]]  # [n] shuffled positions of this shard's samples
                yield ShardTask(split, i, chunk, catalog.offsets[perm[chunk]])


def _read_marker(out: Path, name: str) -> dict | None:
    """The progress marker of a finished shard, or None when the shard must be (re)written."""
    path = out / layout.PROGRESS / f"{name}.json"
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    tar = out / name
    return marker if tar.is_file() and tar.stat().st_size == marker["file_bytes"] else None


def _init_worker(ctx: WorkerContext) -> None:
    global _CTX
    _CTX = ctx


def _write_shard(task: ShardTask) -> dict:
    """Write one shard (temporary name, then rename), then its progress marker; return the marker."""
    from webdataset.writer import TarWriter  # here, not at the top: webdataset imports torch (seconds)

    ctx = _CTX
    name = fmt.shard_name(task.split, task.index)
    counts: dict[int, int] = {}
    hist_orig = [0] * (len(SIZE_EDGES) + 1)
    hist_stored = [0] * (len(SIZE_EDGES) + 1)
    skipped: list[list[str]] = []
    starts: list[int] = []  # the sample index, recorded as the samples are written
    with open(ctx.catalog, "rb") as cat, atomic_path(ctx.out / name) as tmp:
        # mtime=0 and fixed user/group/mode: the tar bytes depend only on the samples.
        with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as tw:
            for pos, offset in zip(task.keys.tolist(), task.offsets.tolist(), strict=True):
                rec = read_record(cat, offset)
                try:
                    enc = encode_image(read_bytes(rec), ctx.image)
                except (BadImage, OSError) as e:
                    reason = str(e) if isinstance(e, BadImage) else f"{type(e).__name__}: {e}"
                    if ctx.strict:
                        raise DataToolsError(f"{rec.display}: {reason}; drop --strict to skip bad files") from None
                    skipped.append([rec.display, reason])
                    continue
                meta = {
                    "class": ctx.class_names[rec.label],
                    "path": rec.display,
                    "width": enc.width,
                    "height": enc.height,
                }
                sample = {
                    "__key__": fmt.sample_key(pos),
                    enc.ext: enc.data,
                    fmt.LABEL_EXT: fmt.cls_bytes(rec.label),
                    fmt.META_EXT: fmt.json_bytes(meta),
                }
                starts.append(tw.tarstream.offset)  # where the sample's first header goes
                tw.write(sample)
                counts[rec.label] = counts.get(rec.label, 0) + 1
                hist_orig[size_bucket(min(enc.width, enc.height))] += 1
                hist_stored[size_bucket(enc.stored_shorter)] += 1
            end = tw.tarstream.offset  # the end of the last sample (before the tar's closing blocks)
        # the sample index, for random access (resume) over ranged reads
        atomic_write(ctx.out / fmt.index_name(name), fmt.index_bytes([*starts, end]))
    marker = {
        "split": task.split,
        "index": task.index,
        "count": sum(counts.values()),
        "file_bytes": (ctx.out / name).stat().st_size,
        "class_counts": sorted(counts.items()),
        "orig_shorter_hist": hist_orig,
        "stored_shorter_hist": hist_stored,
        "skipped": skipped,
    }
    fmt.write_json(ctx.out / layout.PROGRESS / f"{name}.json", marker)
    return marker

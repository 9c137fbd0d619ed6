"""Convert a checkpoint to DeepSpeed's universal format, so a run can resume on a different number of ranks.

    vit-universal RUN_DIR|CHECKPOINTS_DIR|TAG_DIR [--tag step_00001000]     (or python -m pretrain.train.universal)

writes `CHECKPOINTS_DIR/<tag>_universal/` (DeepSpeed's `ds_to_universal` output plus our `pretrain_meta.json`),
then resume with `train.resume=CHECKPOINTS_DIR/<tag>_universal` on any world size. The input stream goes on with the
uninterrupted run's global batches on any world size that divides its canonical streams (docs/stream.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from data_tools.extras import MissingExtra, require
from data_tools.fsutil import atomic_path, atomic_write
from pretrain import checkpoint_format as ckpt


def convert(src: Path, tag: str | None = None) -> Path:
    """Convert one complete tag; returns the universal folder. Raises CheckpointError for a bad source."""
    if (src / ckpt.META).is_file() and tag is None:
        ckpt_dir, tag = src.parent, src.name
    else:
        ckpt_dir = ckpt.checkpoints_dir(src)
        tag = tag or ckpt.newest_complete(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / ckpt.META).is_file():
        raise ckpt.CheckpointError(f"{src}: no complete checkpoint{f' {tag}' if tag else ''} to convert")
    out = ckpt_dir / f"{tag}_universal"
    with atomic_path(out) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt_dir / tag),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise ckpt.CheckpointError(f"ds_to_universal failed on {ckpt_dir / tag}: {proc.stderr.strip()[-500:]}")
        shutil.copy2(ckpt_dir / tag / ckpt.META, tmp / ckpt.META)  # copied last: marks the folder complete
    atomic_write(ckpt_dir / "latest_universal", out.name)  # ds_to_universal wrote the temporary name there
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-universal", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="run folder, its checkpoints/ folder, or one tag folder")
    p.add_argument("--tag", default=None, help="tag to convert (default: the newest complete one)")
    args = p.parse_args(argv)
    try:
        require("deepspeed")  # its ds_to_universal converts; the `train` extra
        out = convert(args.checkpoint, args.tag)
    except (ckpt.CheckpointError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}\nresume on any number of ranks with: train.resume={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

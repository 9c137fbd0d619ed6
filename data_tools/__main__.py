"""`python -m data_tools {shard,verify,info,digits}`: thin command line over the library functions."""

from __future__ import annotations

import argparse
import sys

from data_tools import storage
from data_tools.errors import DataToolsError
from data_tools.shard import DEFAULT_MAX_SHARD_BYTES, DEFAULT_SAMPLES_PER_SHARD

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_bytes(text: str) -> int:
    """'1000', '500M', '1G', '1.5GB' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500M, 1G, 1000000)") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all four commands."""
    p = argparse.ArgumentParser(prog="data_tools", description="Make, check and describe WebDataset image shards.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shard", help="write SRC as WebDataset shards plus _info.json into OUT (resumable)")
    s.add_argument("src", help="image folder (one sub-folder per class), CSV/TSV list of path,label, or per-class tars")
    s.add_argument(
        "out", help="output folder (new, empty, or an interrupted run of the same command), or s3://bucket/prefix/"
    )
    s.add_argument("--staging", default=None, metavar="DIR", help="with an s3:// OUT: local folder written first")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD, help="most samples per shard")
    s.add_argument(
        "--max-shard-bytes", type=parse_bytes, default=DEFAULT_MAX_SHARD_BYTES, help="most bytes per shard: 500M, 1G"
    )
    s.add_argument("--resize-shorter", type=int, default=None, metavar="S", help="downscale so the shorter side <= S")
    s.add_argument("--quality", type=int, default=None, metavar="Q", help="re-encode every image as JPEG quality Q")
    s.add_argument("--seed", type=int, default=0, help="seed of the global shuffle and the val hold-out")
    s.add_argument("--val-per-class", type=int, default=0, metavar="K", help="hold out K samples per class as val")
    s.add_argument("--val-fraction", type=float, default=0.0, metavar="F", help="hold out a fraction F as val")
    s.add_argument("--classes", default=None, metavar="FILE", help="class order, one name per line")
    s.add_argument("--name", default=None, help="dataset name in _info.json (default: SRC's name)")
    s.add_argument("--strict", action="store_true", help="stop at the first unreadable input instead of skipping it")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="decode every sample and check labels and counts against _info.json")
    v.add_argument("out")
    v.add_argument(
        "--num-classes",
        type=_positive,
        default=None,
        metavar="N",
        help="labels must be below N (default: the class count in _info.json; without one, any label >= 0)",
    )
    v.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="print samples, shards, bytes, classes and image sizes")
    i.add_argument("out")

    d = sub.add_parser("digits", help="write scikit-learn's handwritten digits as a 32x32 PNG image folder")
    d.add_argument("out")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input or a store's refusal prints `error: ...` and returns 2, failed verification 1,
    Ctrl-C 130."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (DataToolsError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Finished shards are kept; the same command finishes the rest.
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _shard(args: argparse.Namespace) -> int:
    from data_tools import upload
    from data_tools.shard import shard
    from data_tools.summary import format_summary

    remote = storage.is_remote(args.out)
    if remote and not (args.out.startswith("s3://") and args.staging):
        raise DataToolsError(f"{args.out}: output to a URL needs s3://bucket/prefix/ and --staging DIR (local folder)")
    if remote:
        upload.check_destination(args.out)  # a refused bucket or key ends the command now, not after the sharding
    summary = shard(
        args.src,
        args.staging if remote else args.out,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        resize_shorter=args.resize_shorter,
        quality=args.quality,
        seed=args.seed,
        val_per_class=args.val_per_class,
        val_fraction=args.val_fraction,
        classes=args.classes,
        strict=args.strict,
        progress=not args.no_progress,
        name=args.name,
    )
    if remote:
        upload.publish(args.staging, args.out)
    print(format_summary(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_tools.verify import verify

    report = verify(args.out, workers=args.workers, progress=not args.no_progress, num_classes=args.num_classes)
    for problem in report["problems"][:100]:
        print(problem)
    if len(report["problems"]) > 100:
        print(f"... and {len(report['problems']) - 100} more problems")
    print(_label_line(report, from_flag=args.num_classes is not None))
    status = "OK" if report["ok"] else f"FAILED: {len(report['problems'])} problems"
    indexes = f" ({report['indexes']} of {report['shards']} sample indexes checked)"
    print(f"{args.out}: {report['samples']:,} samples in {report['shards']} shards decoded; {status}{indexes}")
    return 0 if report["ok"] else 1


def _label_line(report: dict, from_flag: bool) -> str:
    """`labels 0..9 seen; ...`: the range found, and what it was checked against."""
    lo_hi = report["labels"]
    seen = f"labels {lo_hi[0]}..{lo_hi[1]} seen" if lo_hi else "no labels seen"
    n = report["num_classes"]
    if n is None:
        return f"{seen}; no class list in _info.json (pass --num-classes N to check the range)"
    return f"{seen}; checked against {n} classes ({'--num-classes' if from_flag else '_info.json'})"


def _info(args: argparse.Namespace) -> int:
    from data_tools.info import describe, format_info

    print(format_info(describe(args.out)))
    return 0


def _digits(args: argparse.Namespace) -> int:
    from data_tools.digits import write_digits

    out = write_digits(args.out)
    print(f"{out}: 1,797 digit images (32x32 PNG) in class folders 0..9")
    return 0


_COMMANDS = {"shard": _shard, "verify": _verify, "info": _info, "digits": _digits}

if __name__ == "__main__":
    sys.exit(main())

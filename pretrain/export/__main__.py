"""`python -m pretrain.export CHECKPOINT_DIR OUT --format timm|torchvision|hf|pth|npz ...`: see `pretrain.export`."""

from __future__ import annotations

import argparse
import sys

from pretrain.export import DTYPES, FORMATS, HEADS, errors, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Export the fp32 weights of a DeepSpeed ZeRO 1/2/3 checkpoint as safetensors for timm, "
        "torchvision or Hugging Face transformers, as a plain PyTorch .pth, or as the original JAX .npz.",
    )
    ap.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or one tag folder")
    ap.add_argument("out", help="output folder (written under a temporary name, then renamed)")
    ap.add_argument("--format", required=True, choices=FORMATS, help="target library")
    ap.add_argument("--tag", help="checkpoint tag, e.g. step_00010000 (default: the newest complete one)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    ap.add_argument(
        "--head",
        choices=HEADS,
        help="keep the head (and pre-logits layer), keep the pre-logits layer alone, or drop both: the backbone only "
        "(default: keep what the format can hold whole, else drop)",
    )
    ap.add_argument("--img-size", type=int, help="resample the position embedding for this input size")
    a = ap.parse_args(argv)
    try:
        r = export_checkpoint(a.checkpoint, a.out, a.format, a.tag, a.dtype, a.head, a.img_size)
    except errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {r.tag_dir} -> {r.out} ({a.format}, {r.num_tensors} tensors, {r.num_params / 1e6:.2f} M "
        f"parameters, {a.dtype}, head {r.head}) in {r.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a `.safetensors` file tensor by tensor, holding one tensor in memory at a time.

The format (https://github.com/huggingface/safetensors) is: 8 bytes little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` padded with spaces to a
multiple of 8, then the raw little-endian bytes of every tensor back to back. Since the header must come first,
the caller states every name, shape and dtype up front (the `plan`) and then streams tensors in that order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: str | Path,
    plan: dict[str, tuple[torch.Size, torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `tensors` (yielded in `plan` order, matching its shapes and dtypes) to `path`; returns bytes written."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, (shape, dtype) in plan.items():
        if dtype not in _DTYPES:
            raise ValueError(f"safetensors cannot store {name} of dtype {dtype}")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    names = iter(plan.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors:
            want_name, (want_shape, want_dtype) = next(names, (None, (None, None)))
            if name != want_name or t.shape != want_shape or t.dtype != want_dtype:
                raise ValueError(f"tensor {name} {tuple(t.shape)} {t.dtype} does not match the plan ({want_name})")
            if t.numel():  # numpy hands the tensor's bytes to write() without a copy
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        missing = [n for n, _ in names]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]}")
    return 8 + len(raw) + offset

"""Region decode of a JPEG: only the rows and iMCU columns a crop needs, at 1/1, 1/2, 1/4 or 1/8 scale.

    decode_region  bytes + scale + box -> uint8 (3, h, w) tensor: the box's pixels, as the full decode has them
    Refused        what the region path leaves to the full decoder, with a reason (`REASONS`)
    available      whether the C part built and loaded here

No maintained Python binding decodes a JPEG region: PyTurboJPEG's `crop` is a lossless transform (the cropped JPEG
is re-encoded, then decoded) and needs the TurboJPEG 3 API (Debian 12 ships TurboJPEG 2.1, which has no cropping
region for decompression); simplejpeg and jpeg4py have no crop. So `jpeg_region.c` drives libjpeg's own
`jpeg_crop_scanline` / `jpeg_skip_scanlines` (what TurboJPEG 3's `tj3SetCroppingRegion` does inside) with the
setjmp error handling ctypes cannot do. It is compiled on first use (`cc -O2 -shared -fPIC ... -ljpeg`, a few tenths
of a second) into `<venv>/var/vit-pretrain/` (or the user's temp folder where that is read-only), named by the hash
of its source, and renamed into place atomically, so concurrent workers never load half a file. Without a compiler
or libjpeg's headers (Debian: libjpeg62-turbo-dev) `available()` is False, one warning line says why, and every
image takes the full decoder (`data_tools.decode.decode_crop` counts it as `unavailable`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pretrain.data")

SOURCE = Path(__file__).with_name("jpeg_region.c")
CFLAGS = ("-O2", "-shared", "-fPIC")
MARGIN = 2
"""Columns decoded beyond the box on each side (JR_MARGIN in the C source)."""
REASONS = {  # the C return codes -> the fallback's name in the counters
    1: "refused",  # libjpeg refused the data (corrupt, truncated, 12-bit, lossless, ...)
    2: "colorspace",  # CMYK, YCCK: the full decoder converts them
    3: "sampling",  # chroma layouts other than 4:4:4, 4:2:2, 4:2:0, 4:4:0 (and grey)
    4: "size",  # the header disagrees with the size the caller computed
    5: "region",  # a box outside the image
}


class Refused(Exception):
    """The region path does not take this image; `reason` names why (a key of the fallback counters)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def build_dir() -> Path:
    """Where the compiled library is kept: beside the venv (per interpreter prefix), else the user's temp folder."""
    user_temp = Path(tempfile.gettempdir()) / f"vit-pretrain-{os.getuid()}"
    for base in (Path(sys.prefix) / "var" / "vit-pretrain", user_temp):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base
        except OSError:
            continue
    raise OSError("no writable folder for the region decoder's build")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled region decoder, built once per source version; None (and one warning) where it cannot be."""
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((x for x in lines if "error" in x), lines[0])  # the compiler's first error, else the first line
        log.warning("JPEG region decode unavailable, every image is decoded whole: %s", why.strip()[:200])
        return None
    f = lib.jr_decode
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_char_p, ctypes.c_ulong, *[ctypes.c_int] * 7, ctypes.c_void_p, ctypes.c_int]
    f.argtypes += [ctypes.c_char_p, ctypes.c_int]
    return lib


def _build() -> Path:
    """Compile jpeg_region.c (unless this version is already built) and return the library's path."""
    cc = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    out = build_dir() / f"jpeg_region-{digest}.so"
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(
            [cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-ljpeg"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {(done.stderr or done.stdout).strip()}")
        os.replace(tmp, out)  # atomic: another process sees the whole library or none
        for old in out.parent.glob("jpeg_region-*.so"):  # earlier versions' builds (a loaded copy stays mapped)
            if old != out:
                old.unlink(missing_ok=True)
    except FileNotFoundError as e:
        raise OSError(f"no C compiler ({e.filename})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def available() -> bool:
    """True where the region decoder is built and loaded (builds it on the first call)."""
    return _library() is not None


def decode_region(data: bytes, scale: int, size: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """The pixels of `box` of a JPEG decoded at 1/`scale` scale, as the full decode has them.

    Args:
        data: JPEG bytes.
        scale: 1, 2, 4 or 8.
        size: (width, height) of the image at that scale (ceil(full / scale), libjpeg's and Pillow's rule).
        box: (top, left, height, width) inside that image.

    Returns:
        uint8 (3, height, width), channels-last in memory (what the crop-resize takes without a copy).

    Raises:
        Refused: the region path does not take this image (reason in `.reason`).
    """
    import torch

    lib = _library()
    if lib is None:
        raise Refused("unavailable")
    data = data if isinstance(data, bytes) else bytes(data)  # ctypes passes bytes without a copy
    top, left, height, width = box
    cols = width + 2 * MARGIN + 15  # the columns decoded: the margins and the left edge's move to an iMCU boundary
    out = torch.empty(height * cols * 3, dtype=torch.uint8)
    msg = ctypes.create_string_buffer(200)
    code = lib.jr_decode(data, len(data), scale, *size, top, left, height, width, out.data_ptr(), cols, msg, len(msg))
    if code:
        raise Refused(REASONS.get(code, "refused"), msg.value.decode(errors="replace"))
    return out[: height * width * 3].view(height, width, 3).permute(2, 0, 1)  # (3, H, W) over the packed HWC rows

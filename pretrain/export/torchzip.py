"""Read `torch.save` files lazily and safely: the pickle is decoded without running any of its code, and tensor
bytes are read from the file only when asked for, slice by slice.

DeepSpeed's checkpoint files pickle DeepSpeed objects (`LossScaler`, `ZeroStageEnum`), so `torch.load` would need
`weights_only=False`, i.e. permission to run whatever the pickle names. This reader instead resolves only the few
globals a tensor needs (`_rebuild_tensor_v2`, storage types, `OrderedDict`, `torch.Size`) and turns every other
class into an inert `Opaque` record of its arguments. Nothing is imported or called on the pickle's behalf, and
the optimizer moments (`exp_avg`, `exp_avg_sq`, two thirds of every `*_optim_states.pt`) are never read: a
`LazyTensor` is only a (file, offset, dtype, shape) record until `read` is called.

A `torch.save` zip stores each storage uncompressed as `<archive>/data/<key>`, so a slice of it is one `pread`.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Storage classes as pickled by torch.save -> element dtype.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class TorchZipError(ValueError):
    """The file is not a readable `torch.save` zip archive."""


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    file: TorchZipFile
    key: str
    dtype: torch.dtype
    numel: int


class Opaque:
    """Stand-in for any non-tensor object in the pickle (e.g. DeepSpeed's `ZeroStageEnum(3)`): keeps its
    constructor arguments and state, runs nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:  # pickle's NEWOBJ calls __new__ without __init__
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:  # IntEnum-like records, e.g. ZeroStageEnum(3)
        return int(self.args[0])

    def __repr__(self) -> str:
        return f"Opaque({self.qualname}, args={self.args!r})"


class LazyTensor:
    """A tensor in a `torch.save` file that is read on demand."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, torch.Size(size), tuple(stride)
        self.dtype = storage.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for n in reversed(self.shape):
            expected.append(step)
            step *= n
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape, strict=True) if n != 1)

    def read(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of the flattened (contiguous) tensor, as a new 1-D tensor."""
        count = self.numel() - start if count is None else count
        if not self.is_contiguous():
            return self.load().reshape(-1)[start : start + count].clone()
        if start < 0 or start + count > self.numel():
            raise IndexError(f"slice [{start}, {start + count}) out of a tensor of {self.numel()} elements")
        return self.storage.file.read_elements(self.storage, self.offset + start, count)

    def load(self) -> torch.Tensor:
        """The whole tensor (copies the storage span it views)."""
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) if self.numel() else 0
        flat = self.storage.file.read_elements(self.storage, self.offset, span)
        return torch.as_strided(flat, self.shape, self.stride).clone()

    def __repr__(self) -> str:
        return f"LazyTensor({tuple(self.shape)}, {self.dtype})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_from_type_v2(func, new_type, args, state):  # tensor subclasses: keep the plain tensor
    return func(*args)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, owner: TorchZipFile) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.owner = owner

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        # Anything else becomes an inert record; a fresh subclass keeps the name for error messages.
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise TorchZipError(f"{self.owner.path}: unsupported persistent id {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else storage_type
        if not isinstance(dtype, torch.dtype):
            raise TorchZipError(f"{self.owner.path}: unknown storage type {storage_type!r}")
        # numel counts bytes for untyped storages (dtype given separately) and elements for typed ones
        if not isinstance(storage_type, _StorageType):
            numel //= dtype.itemsize
        return _Storage(self.owner, str(key), dtype, numel)


class TorchZipFile:
    """One `torch.save` file: `load()` gives its object tree with `LazyTensor`s in place of tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise TorchZipError(f"{self.path} is not a torch.save zip archive ({e})") from e
        pkls = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise TorchZipError(f"{self.path} is not a torch.save zip archive (no <name>/data.pkl)")
        self.prefix = pkls[0][: -len("data.pkl")]
        order = self.prefix + "byteorder"
        if order in self._zip.namelist() and self._zip.read(order).decode().strip() != "little":
            raise TorchZipError(f"{self.path} was written on a big-endian machine; convert it there first")
        self._offsets: dict[str, int] = {}
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        self._zip.close()
        os.close(self._fd)

    def __enter__(self) -> TorchZipFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self) -> Any:
        try:
            return _Unpickler(self._zip.read(self.prefix + "data.pkl"), self).load()
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise TorchZipError(f"{self.path}: cannot decode its pickle ({e})") from e

    def _data_offset(self, key: str) -> int:
        """File offset of the first byte of storage `key`: after the entry's local header (30 bytes, name,
        extra field), which the central directory does not describe."""
        if key not in self._offsets:
            info = self._zip.getinfo(f"{self.prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise TorchZipError(f"{self.path}: storage {key} is compressed; re-save it with torch.save")
            header = os.pread(self._fd, 30, info.header_offset)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[key] = info.header_offset + 30 + name_len + extra_len
        return self._offsets[key]

    def read_elements(self, storage: _Storage, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of a storage, as a new 1-D tensor (one pread)."""
        if start < 0 or start + count > storage.numel:
            raise TorchZipError(f"{self.path}: read past the end of storage {storage.key}")
        size = storage.dtype.itemsize
        out = torch.empty(count, dtype=storage.dtype)
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        pos, done = self._data_offset(storage.key) + start * size, 0
        while done < count * size:  # pread may return fewer bytes than asked for
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n <= 0:
                raise TorchZipError(f"{self.path}: truncated (storage {storage.key})")
            done += n
        return out

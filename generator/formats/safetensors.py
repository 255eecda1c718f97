"""safetensors files: the header reader every stage checks files with, and the streaming writer.

A safetensors file is an 8-byte little-endian header length, a JSON header (`name -> {dtype, shape,
data_offsets}` plus an optional `__metadata__`) and the tensor bytes. Reading only the header tells whether a
file is whole (its data must reach the last offset) without touching the tensors. Only the writer needs torch,
so reading headers (validate, inspect) imports it only when a writer is made.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from generator.errors import GenRepoError

if TYPE_CHECKING:
    import torch


def read_safetensors_header(path: Path, exact: bool = False) -> dict[str, Any]:
    """The JSON header of a safetensors file (without `__metadata__`), after checking the file is complete.

    `exact`: also refuse bytes after the last tensor (a file this writer wrote ends exactly there).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise GenRepoError(f"weight file {path} is truncated or empty ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise GenRepoError(f"weight file {path} is truncated: its header needs {header_len} bytes, "
                                   f"the file has {size}")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as error:
        raise GenRepoError(f"cannot read weight file {path}: {error}") from error
    if 8 + header_len + data_end > size:
        raise GenRepoError(f"weight file {path} is truncated: it should hold {8 + header_len + data_end} bytes, "
                           f"it has {size}")
    if exact and 8 + header_len + data_end != size:
        raise GenRepoError(f"weight file {path} holds {size} bytes but its header describes "
                           f"{8 + header_len + data_end}")
    return header


def tensor_bytes(entry: dict[str, Any]) -> int:
    """Bytes of one header entry's tensor (0 for a dtype gen-repo does not know)."""
    from generator.formats.dtypes import from_safetensors

    dtype = from_safetensors(str(entry.get("dtype")))
    count = 1
    for size in entry["shape"]:
        count *= int(size)
    return count * dtype.itemsize if dtype else 0


def header_budget(names: list[str]) -> int:
    """Bytes to reserve for the safetensors header of these tensors (and their weight-only scales)."""
    # one entry: "name":{"dtype":"BF16","shape":[a,b,c],"data_offsets":[x,y]}, at most ~110 bytes besides the name
    return 256 + sum(2 * (len(name) + 160) for name in names)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, without holding the tensors in memory.

    Tensor data goes straight into the file after `header_reserve` bytes kept for the header, which `close`
    fills in (the format allows the JSON header to be padded with spaces). If the header outgrows the
    reservation, `close` rewrites the file once. Tensors whose byte size is not a multiple of 8 are kept back
    and written last, largest element size first, so every tensor stays aligned to its element size
    (safetensors readers view the bytes in place).
    """

    def __init__(self, path: Path, header_reserve: int = 4096) -> None:
        self.path = Path(path)
        self._reserve = header_reserve + (-header_reserve % 8)
        self._file: BinaryIO = self.path.open("wb")
        self._file.seek(8 + self._reserve)
        self._entries: dict[str, dict[str, Any]] = {}
        self._deferred: list[tuple[str, torch.Tensor]] = []
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from generator.formats.dtypes import from_torch

        if name in self._entries or any(name == deferred for deferred, _ in self._deferred):
            raise GenRepoError(f"tensor {name} written twice to {self.path}")
        tensor = tensor.detach().contiguous()
        if from_torch(tensor.dtype) is None:
            raise GenRepoError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot hold")
        if tensor.numel() * tensor.element_size() % 8:
            self._deferred.append((name, tensor))
        else:
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        from generator.formats.dtypes import from_torch

        if tensor.numel():
            self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        size = tensor.numel() * tensor.element_size()
        dtype = from_torch(tensor.dtype)
        assert dtype is not None  # checked in add
        self._entries[name] = {"dtype": dtype.safetensors, "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    def close(self) -> None:
        for name, tensor in sorted(self._deferred, key=lambda item: -item[1].element_size()):
            self._write(name, tensor)
        self._deferred.clear()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) <= self._reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserve) + header + b" " * (self._reserve - len(header)))
            self._file.close()
            return
        self._file.close()  # the header outgrew its reservation: rewrite once with a larger one
        header += b" " * (-len(header) % 8)
        moved = self.path.with_name(self.path.name + ".data")
        os.replace(self.path, moved)
        with self.path.open("wb") as out, moved.open("rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            data.seek(8 + self._reserve)
            shutil.copyfileobj(data, out, length=16 << 20)
        moved.unlink()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

"""Reading and writing (sharded) safetensors one tensor at a time.

Reads use plain positioned reads rather than mmap: a memory-mapped file's touched pages count towards the
process's resident memory until the kernel evicts them, so mmap makes peak RSS grow with model size. With reads,
the only resident tensors are the ones being merged.

Writes stream too: every output shape and dtype is known before the merge starts, so each shard's header is
written first and each merged tensor's bytes are appended as soon as it exists.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from vlsafe.errors import VlsafeError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            (size,) = struct.unpack("<Q", raw)
            header = json.loads(handle.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise VlsafeError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise VlsafeError(f"{path}: tensor {name} has dtype {entry['dtype']}, which vlsafe cannot merge")
        start, end = entry["data_offsets"]
        out[name] = TensorInfo(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + size + start, 8 + size + end)
    return out


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (through its index when sharded). Pickled weights are
    refused by name: loading them would run arbitrary code."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise VlsafeError(f"{index}: not a safetensors index ({err})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise VlsafeError(f"{index}: lists missing shard {missing[0]}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED)
        detail = f" (found {pickled[0]}: convert it to safetensors; vlsafe never unpickles)" if pickled else ""
        raise VlsafeError(f"{directory}: no .safetensors weights{detail}")
    return files


def read_index(directory: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(directory):
        for name, info in read_header(file).items():
            if name in tensors:
                raise VlsafeError(f"{directory}: tensor {name} is stored twice ({tensors[name].file.name}, {file.name})")
            tensors[name] = info
    return tensors


class Reader:
    """Keeps one handle per file open for the whole merge; reads one tensor's bytes at a time."""

    def __init__(self) -> None:
        self._handles: dict[Path, BinaryIO] = {}

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self._read(info, info.start, info.end, info.shape)

    def read_rows(self, info: TensorInfo, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the first dimension: a large tensor can be streamed in blocks of rows."""
        end = min(end, info.shape[0])
        row_bytes = (info.end - info.start) // info.shape[0] if info.shape and info.shape[0] else 0
        return self._read(info, info.start + start * row_bytes, info.start + end * row_bytes,
                          (max(0, end - start), *info.shape[1:]))

    def _read(self, info: TensorInfo, begin: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
        if stop <= begin:
            return torch.empty(shape, dtype=info.dtype)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
        buffer = bytearray(stop - begin)
        handle.seek(begin)
        view = memoryview(buffer)
        got = 0
        while got < len(buffer):  # a raw read may return fewer bytes than asked
            n = handle.readinto(view[got:])
            if not n:
                raise VlsafeError(f"{info.file}: truncated (tensor data ends early)")
            got += n
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Greedy, in order: a tensor opens a new shard when it would overflow the current one (a tensor larger
    than `max_bytes` gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, shape, dtype) in enumerate(entries):
        size = nbytes(shape, dtype)
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes one shard: header first (from the planned shapes), then each tensor in planned order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.path = path
        self._expected = list(entries)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns tensor data to 8 bytes
        self._handle = open(path, "wb")
        self._digest = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self.total = offset

    def _emit(self, data) -> None:
        self._handle.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self._expected.pop(0)
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"shard writer expected {want_name} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if tensor.numel():
            self._emit(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> Optional[str]:
        """Returns the file's sha256 (hashed while writing, so no second read)."""
        if self._expected:
            raise RuntimeError(f"{self.path}: {len(self._expected)} planned tensors never written")
        self._handle.close()
        return self._digest.hexdigest()

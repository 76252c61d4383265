"""Read and write safetensors with numpy only (no torch); bfloat16 and float8 through ml_dtypes.

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. Reads are memory-mapped; writes go to a temporary file that
is renamed into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Lazy reader: `keys()`, `shape(name)`, `dtype(name)`, `get(name)` (a numpy view of the mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{self.path}: file too short for a safetensors header")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise SafetensorsError(f"{self.path}: header length {n} exceeds file size {size}")
                header = json.loads(fh.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is a JSON {type(header).__name__}, expected an object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._data_start = 8 + n
        for name, info in header.items():
            self._check_entry(name, info, size)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None

    def _check_entry(self, name, info, size: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise SafetensorsError(f"{where}: header entry needs dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{where}: unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise SafetensorsError(f"{where}: invalid shape {shape!r} or data_offsets {offsets!r}")
        start, end = offsets
        want = DTYPES[info["dtype"]].itemsize * int(np.prod(shape, dtype=np.int64))
        if end - start != want or self._data_start + end > size:
            raise SafetensorsError(f"{where} {shape}: byte range {offsets} is corrupt or truncated")

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._header[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        start, end = info["data_offsets"]
        dt = DTYPES[info["dtype"]]
        if end == start:
            return np.zeros(info["shape"], dt)
        buf = self._mmap[self._data_start + start: self._data_start + end]
        return buf.view(dt).reshape(info["shape"])


class TensorStore:
    """All tensors of a directory: a single ``*.safetensors`` or an index-sharded set
    (``*.safetensors.index.json`` with a ``weight_map``)."""

    def __init__(self, directory: str | os.PathLike, stem: str = "diffusion_pytorch_model"):
        self.directory = Path(directory)
        index = self.directory / f"{stem}.safetensors.index.json"
        single = self.directory / f"{stem}.safetensors"
        files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index}: not a safetensors index with a weight_map ({e})") from e
            for name, fname in weight_map.items():
                if fname not in files:
                    if not (self.directory / fname).exists():
                        raise SafetensorsError(f"{index}: shard {fname} (holding {name!r}) is missing")
                    files[fname] = SafetensorsFile(self.directory / fname)
                if name not in files[fname].keys():
                    raise SafetensorsError(f"{index}: {name!r} is mapped to {fname} but is not in it")
                self._where[name] = files[fname]
        elif single.exists():
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors*"))
            raise SafetensorsError(f"{self.directory}: no {single.name} or {index.name}"
                                   + (f" (found {found})" if found else ""))

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


def _header_for(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None):
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr in tensors.items():
        dt = np.dtype(arr.dtype).newbyteorder("<") if np.dtype(arr.dtype).byteorder == ">" else np.dtype(arr.dtype)
        if dt not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    return raw


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` atomically (temporary name, fsync, rename)."""
    path = Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    raw = _header_for(tensors, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for arr in tensors.values():
            fh.write(arr.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_sharded(tensors: Mapping[str, np.ndarray], directory: str | os.PathLike, stem: str,
                 max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write one file, or index-sharded files of at most `max_shard_bytes` with the HF naming
    (``stem-00001-of-0000N.safetensors`` + ``stem.safetensors.index.json``). Returns the file names."""
    directory = Path(directory)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / f"{stem}.safetensors", metadata)
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, directory / fname, metadata)
        weight_map.update({k: fname for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(directory / f"{stem}.safetensors.index.json", json.dumps(index, indent=2))
    return names + [f"{stem}.safetensors.index.json"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)



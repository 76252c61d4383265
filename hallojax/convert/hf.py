"""Reading and writing transformers model directories for the converters.

A transformers directory holds ``config.json`` and the weights as ``model.safetensors``, an
index-sharded ``model-0000i-of-0000n.safetensors`` set, or (older uploads) ``pytorch_model.bin`` /
``pytorch_model.bin.index.json`` / a single ``*.pt``. The pickled formats (torch's zip container, and the
legacy plain pickle of torch < 1.6) are read only when torch is importable, always with
``torch.load(..., weights_only=True)``, so a checkpoint carrying code is refused.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from hallojax.convert.common import read_json
from hallojax.convert.safetensors_io import SafetensorsError, TensorStore, save_sharded
from hallojax.convert.table import ConversionError, Transform
from hallojax.fsutil import atomic_directory

STEM = "model"

# torch Conv1d weight [O, I, K] <-> our kernel [K, I, O] (lax "WIO")
CONV1D = Transform("conv1d", lambda x: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0))


class DictSource:
    """Tensors held as a {name: array-like} mapping (a torch state dict is converted lazily)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        return _to_numpy(self._tensors[name])


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# the dicts a state dict comes wrapped in: Lightning's, DeepSpeed's (Hallo3), HunyuanVideo's --load-key choices
WRAPPERS = ("state_dict", "module", "ema")


def _torch_load(path: Path, wrapper: str | None = None) -> dict:
    """The state dict in `path`, unwrapped from `wrapper` (default: the first of WRAPPERS the file holds)."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading a pickled PyTorch checkpoint needs torch; install it or convert "
                              "the weights to safetensors") from e
    import zipfile

    try:
        # memory-mapped when it can be: only torch's zip container (torch >= 1.6) maps; older checkpoints are
        # a plain pickle, read whole. weights_only either way: a pickle that would run code is refused
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, ...)
        raise ConversionError(f"{path}: not a loadable PyTorch state dict ({type(e).__name__}: {e})") from e
    for name in (wrapper,) if wrapper else WRAPPERS:
        if isinstance(sd, dict) and isinstance(sd.get(name), dict):
            sd = sd[name]
            break
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ConversionError(f"{path}: expected a dict of tensors (a state dict)")
    return sd


def open_weights(src: str | os.PathLike):
    """The tensors of a transformers directory, from safetensors (preferred) or pickled torch files."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if (src / f"{STEM}.safetensors").exists() or (src / f"{STEM}.safetensors.index.json").exists():
        try:
            return TensorStore(src, STEM)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from e
    index = src / "pytorch_model.bin.index.json"
    if index.exists():
        weight_map = read_json(index, "a PyTorch index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no weight_map")
        tensors: dict[str, Any] = {}
        for fname in sorted(set(weight_map.values())):
            if not (src / fname).exists():
                raise ConversionError(f"{index}: shard {fname} is missing")
            tensors.update(_torch_load(src / fname))
        return DictSource(tensors)
    candidates = [src / "pytorch_model.bin"] + sorted(src.glob("*.pt")) + sorted(src.glob("*.pth"))
    for path in candidates:
        if path.exists():
            return DictSource(_torch_load(path))
    found = sorted(p.name for p in src.iterdir())
    raise ConversionError(f"{src}: no {STEM}.safetensors, {STEM}.safetensors.index.json, pytorch_model.bin(.index.json) "
                          f"or *.pt weights (found {found})")


class RenamedSource:
    """A view of `source` with names rewritten: `rename(name) -> new name or None (hidden)`."""

    def __init__(self, source, rename: Callable[[str], str | None]):
        self._source = source
        self._names: dict[str, str] = {}
        for k in source.keys():
            new = rename(k)
            if new is None:
                continue
            if new in self._names:
                raise ConversionError(f"checkpoint holds both {self._names[new]!r} and {k!r}, which name the "
                                      f"same tensor {new!r}; keep one")
            self._names[new] = k

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._source.shape(self._names[name]))

    def get(self, name: str) -> np.ndarray:
        return self._source.get(self._names[name])


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def write_directory(out: str | os.PathLike, tensors: Mapping[str, np.ndarray], files: Mapping[str, dict], *,
                    inputs=(), overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a transformers directory atomically: safetensors (index-sharded above `max_shard_bytes`)
    plus the JSON `files` ({"config.json": {...}, ...})."""
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        save_sharded(tensors, tmp, STEM, max_shard_bytes, metadata={"format": "pt"})
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return Path(out)

"""The plumbing every converter shares: read a PyTorch-side directory through a rule table into our
pretrained directory, and back. Each model's module supplies only its table and its config mapping."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hallojax.checkpoint import load_params_numpy, param_shapes, read_config, save_pretrained
from hallojax.convert.safetensors_io import TensorStore, save_sharded
from hallojax.convert.table import ConversionError, Rule, export_tensors, import_tensors
from hallojax.fsutil import atomic_directory, read_json_object


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a ConversionError naming the file."""
    return read_json_object(path, what, ConversionError)


def read_json_config(src: str | os.PathLike, what: str) -> dict:
    return read_json(Path(src) / "config.json", f"a {what} directory")


def convert_directory(src: str | os.PathLike, out: str | os.PathLike, cfg, rules: Sequence[Rule], *,
                      num_layers: int = 0, stem: str, what: str, ignore: Sequence[str] = (),
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Tensors of `src` (single or index-sharded safetensors) -> our pretrained directory for `cfg`.
    Every check runs before anything is written."""
    store = TensorStore(src, stem)
    params = import_tensors(rules, store, param_shapes(cfg), num_layers, ignore=ignore,
                            what=f"{src} as {what}", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": what, "path": str(Path(src).absolute())})


def export_directory(ckpt: str | os.PathLike, out: str | os.PathLike,
                     rules_for: Callable[[Any], Sequence[Rule]], config_json: Callable[[Any], Mapping[str, Any]],
                     *, num_layers: Callable[[Any], int] = lambda cfg: 0, stem: str, overwrite: bool = False,
                     max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> safetensors (index-sharded above `max_shard_bytes`) + config.json,
    in the dtype the parameters are stored in."""
    cfg, _ = read_config(ckpt)
    tensors = export_tensors(rules_for(cfg), load_params_numpy(ckpt), num_layers(cfg), progress=progress)
    with atomic_directory(out, overwrite=overwrite, inputs=(ckpt,)) as tmp:
        save_sharded(tensors, tmp, stem, max_shard_bytes, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dict(config_json(cfg)), indent=2) + "\n")
    return Path(out)

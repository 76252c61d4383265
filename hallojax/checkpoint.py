"""Pretrained-model directories: our config (JSON) + an Orbax checkpoint of the parameters.

Layout of a directory written by `save_pretrained` (and by `hallojax convert`):

    OUT_DIR/config.json   {"format": "hallojax-pretrained", "version": 1, "kind": "wan-dit",
                           "model": {...the kind's config...}, "source": {...}}
    OUT_DIR/params/       Orbax PyTree checkpoint, parameters in the dtype they were converted in

`kind` names an entry of `hallojax.registry.KINDS` (the DiT, the encoders, the VAE).

The directory is assembled under a temporary name beside OUT_DIR and renamed into place last, so a
directory named OUT_DIR is always complete. `load_pretrained` restores straight onto devices (and
onto a mesh, sharded, when one is given), casting to the configured `param_dtype`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hallojax import registry
from hallojax.fsutil import atomic_directory, read_json_object
from hallojax.sharding import Rules, state_shardings

FORMAT = "hallojax-pretrained"
VERSION = 1


class CheckpointError(ValueError):
    pass


def flat_params(tree) -> dict[str, Any]:
    """{dotted path: array} of a module or state (Params only)."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    return {".".join(str(p) for p in path): v.get_value() if isinstance(v, nnx.Variable) else v
            for path, v in nnx.to_flat_state(state)}


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of the model `cfg` describes (any registered kind)."""
    return {k: tuple(v.shape) for k, v in flat_params(registry.abstract(cfg)).items()}


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_pretrained(out_dir: str | os.PathLike, params: Mapping[str, Any], cfg, *,
                    source: Mapping[str, Any] | None = None, overwrite: bool = False,
                    inputs: tuple = (), extra: Mapping[str, Any] | None = None) -> Path:
    """Write {dotted path: array} + config atomically to `out_dir`. `extra`: more top-level config.json
    sections (e.g. "sample" / "generation": the sampling recipe `hallojax generate` defaults to)."""
    out_dir = Path(out_dir).absolute()
    expected = param_shapes(cfg)
    bad = sorted(set(expected) ^ set(params)) + sorted(
        f"{k}: {tuple(np.shape(v))} != {expected[k]}" for k, v in params.items()
        if k in expected and tuple(np.shape(v)) != expected[k])
    if bad:
        raise CheckpointError(f"parameters do not match the model config: {bad}")
    with atomic_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", _nest(params))
            ckptr.wait_until_finished()
        meta = {"format": FORMAT, "version": VERSION, "kind": registry.kind_of(cfg), "model": cfg.to_dict(),
                "source": dict(source or {}), **dict(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_config(path: str | os.PathLike) -> tuple[Any, dict]:
    """(config of the directory's model kind, the whole config.json)."""
    cfg_file = Path(path) / "config.json"
    meta = read_json_object(cfg_file, "a hallojax pretrained directory; convert PyTorch weights with "
                            "`hallojax convert FORMAT SRC OUT`", CheckpointError)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format is {meta.get('format')!r}, expected {FORMAT!r}"
                              + (" (this looks like a diffusers directory: convert it first)"
                                 if "_class_name" in meta else ""))
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{cfg_file}: version {meta['version']} is newer than this hallojax ({VERSION})")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{cfg_file}: no 'model' section")
    try:
        config_cls, _ = registry.resolve(meta.get("kind", "wan-dit"))
        return config_cls.from_dict(meta["model"]), meta
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: invalid model config ({e})") from e


def restore_numpy(directory: str | os.PathLike) -> dict:
    """An Orbax PyTree checkpoint as host numpy arrays in their stored dtype, whatever topology wrote it."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(Path(directory).absolute())
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(tree),
                              is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        return jax.tree.map(np.asarray, ckptr.restore(Path(directory).absolute(), target))


def load_params_numpy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All parameters of a pretrained directory as host numpy arrays, in their stored dtype."""
    params_dir = Path(path).absolute() / "params"
    if not params_dir.exists():
        raise CheckpointError(f"{params_dir}: missing")
    return _flatten(restore_numpy(params_dir))


def load_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | Mapping | None = None, **overrides):
    """Load a pretrained directory of any kind: ``model, config = load_pretrained(OUT_DIR)``.

    overrides replace config fields that do not change parameter shapes (the kind's NUMERIC_FIELDS,
    e.g. dtype, param_dtype, remat, attention for the DiT). With `mesh`, parameters are restored
    directly sharded by `rules`.
    """
    cfg, _ = read_config(path)
    shape_changing = set(overrides) - set(cfg.NUMERIC_FIELDS)
    if shape_changing:
        raise CheckpointError(f"load_pretrained overrides {sorted(shape_changing)} would change parameter "
                              f"shapes; only {cfg.NUMERIC_FIELDS} can be overridden")
    cfg = cfg.replace(**overrides)
    graphdef, abs_state = nnx.split(registry.abstract(cfg))
    if mesh is not None:
        shardings = state_shardings(abs_state, mesh, rules)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abs_state)
    # each variable in the dtype the model declares (param_dtype, or float32 for norms and modulation)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abs_state), nnx.to_pure_dict(shardings))
    params_dir = Path(path).absolute() / "params"
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{params_dir}: parameters do not match config.json ({e})") from e
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state), cfg

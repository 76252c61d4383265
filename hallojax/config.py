"""Loading experiment configs: ml_collections Python files with `get_config(arg)`.

``load_config("configs/wan.py:tiny,mesh=fsdp", ["--config.model.remat=full"])``: the part after the
first ':' is passed to `get_config`; overrides use the ml_collections flag syntax and keep types.
A bare preset name (``tiny``) means ``configs/wan.py:tiny``. Numbers a run cannot use (zero steps, a
negative learning rate, ...) are refused by `check_ranges` as soon as the config is loaded.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import ml_collections

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_FILE = REPO_CONFIGS / "wan.py"


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used."""


# key -> (lowest, highest) allowed value, None: unbounded; keys a config file lacks are not checked
RANGES = {
    "train.steps": (1, None), "train.batch_size": (1, None), "train.accum_steps": (1, None),
    "train.log_every": (1, None), "train.frames": (1, None), "train.height": (1, None), "train.width": (1, None),
    "train.text_len": (1, None), "train.learning_rate": (0, None), "train.warmup_steps": (0, None),
    "train.weight_decay": (0, None), "train.grad_clip": (0, None), "train.eps": (0, None),
    "train.b1": (0, 1), "train.b2": (0, 1), "train.ema_decay": (0, 1),
    "checkpoint.every": (1, None), "checkpoint.keep": (1, None), "checkpoint.keep_every": (0, None),
    "data.num_videos": (1, None), "data.frames": (1, None), "data.size": (8, None), "data.face_scale": (0, None),
}


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"hallojax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config(arg)")
    return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path_str.endswith(".py"):
        path, arg = DEFAULT_FILE, spec  # a bare preset name
    elif not path.exists() and (REPO_CONFIGS / path.name).exists():
        path = REPO_CONFIGS / path.name
    if not path.exists():
        raise ConfigError(f"config file {path_str} not found (cwd {os.getcwd()})")
    module = _load_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    config.overrides = []  # the keys set below: sizes the data implies are checked against them (hallojax.data)
    apply_overrides(config, overrides)
    check_ranges(config)
    return config


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the key for a number outside `RANGES`."""
    for key, (low, high) in RANGES.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            if low is not None and node < low or high is not None and node > high:
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(f"{key}={node}: must be {bound}")


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(current)(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``--config.a.b=value`` (or ``a.b=value``) overrides in order; unknown keys are errors."""
    for item in overrides:
        key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --config.key=value")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node or not hasattr(node[p], "keys"):
                raise ConfigError(f"override {item!r}: no config key {key!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: no config key {key!r} (known: {sorted(node.keys())})")
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except TypeError as e:
            raise ConfigError(f"override {item!r}: {e}") from e
        if "overrides" in config:
            config.overrides = [*config.overrides, key]

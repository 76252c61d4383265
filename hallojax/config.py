"""Loading experiment configs: ml_collections Python files with `get_config(arg)`.

``load_config("configs/wan.py:tiny,mesh=fsdp", ["--config.model.remat=full"])``: the part after the
first ':' is passed to `get_config`; overrides use the ml_collections flag syntax and keep types.
A bare preset name (``tiny``) means ``configs/wan.py:tiny``.
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
    return config


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

"""Atomic file-system writes: nothing half-written is ever found under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False, inputs=()):
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir`, on error it is removed.

    An existing non-empty `out_dir` is an error unless `overwrite`; an `out_dir` that is or contains
    one of `inputs` is always an error (replacing it would delete the input).
    """
    out_dir = Path(out_dir).absolute()
    for src in inputs:
        src = Path(src).resolve()
        if src == out_dir.resolve() or out_dir.resolve() in src.parents:
            raise FileExistsError(f"output {out_dir} would replace the input {src}; choose another directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path` (same suffix, so writers that go by it pick the format); on
    success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data, **dumps_kw) -> Path:
    """`data` as indented JSON at `path`, written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, **dumps_kw) + "\n", encoding="utf-8")
    return Path(path)


def read_json_object(path: Path, what: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `path`; `error` naming the file if it is missing, invalid or not an object."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path.parent}: no {path.name} (expected {what})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d

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

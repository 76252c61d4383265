"""Atomic writes: a file appears under its final name complete or not at all."""

import json

import pytest

from hallojax.fsutil import atomic_file, write_json


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != path
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # not visible before the write is done
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_write_json(tmp_path):
    out = write_json(tmp_path / "a.json", {"b": [1, 2.5]}, sort_keys=True)
    assert json.loads(out.read_text()) == {"b": [1, 2.5]} and out.read_text().endswith("\n")

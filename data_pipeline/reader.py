"""Reading prepared shards for training: Grain over the ArrayRecord files, records decoded by schema.py.

    from data_pipeline.reader import clip_dataset
    ds = clip_dataset("data/prepared", seed=0)            # grain.MapDataset of decoded dicts, shuffled
    batches = ds.to_iter_dataset().batch(8)                # or ds[i] for random access
    first = next(iter(batches))                            # {"latents": [8, F, h, w, C], ...}

Only finished output directories are read (manifest.json present, same schema version); the record
order is the manifest's shard order, i.e. the same for every host.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline import schema
from data_pipeline.pipeline import FORMAT, _read_json


def load_manifest(prepared_dir) -> dict:
    """The manifest of a finished prepare run; clear errors for unfinished or foreign directories."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.exists():
        hint = " (prepare has not finished: rerun it to complete)" if (Path(prepared_dir) / "plan.json").exists() else ""
        raise ValueError(f"{path} not found: not a finished prepare output{hint}")
    manifest = _read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {manifest.get('schema_version')}, this reader understands "
                         f"{schema.SCHEMA_VERSION}")
    for s in manifest["shards"]:
        f = Path(prepared_dir) / s["file"]
        if not f.exists() or f.stat().st_size != s["bytes"]:
            raise ValueError(f"shard {f} is missing or has a different size than manifest.json says ({s['bytes']})")
    return manifest


def shard_files(prepared_dir) -> list[str]:
    return [str(Path(prepared_dir) / s["file"]) for s in load_manifest(prepared_dir)["shards"]]


def array_record_source(prepared_dir):
    """grain.sources.ArrayRecordDataSource over every shard: `source[i]` is record i's bytes."""
    import grain

    files = shard_files(prepared_dir)
    if not files:
        raise ValueError(f"{prepared_dir} holds no clips (every input was skipped: see report.json)")
    return grain.sources.ArrayRecordDataSource(files)


def clip_dataset(prepared_dir, *, seed: int | None = None):
    """grain.MapDataset of decoded records (dicts of numpy arrays, read-only, and `source` as str);
    shuffled with `seed` when given."""
    import grain

    ds = grain.MapDataset.source(array_record_source(prepared_dir))
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    return ds.map(schema.decode_record)

"""Videos -> ArrayRecord shards, over any number of processes, resumable, deterministic, nothing lost.

How work is cut: the inputs (files under the given directories, sorted by their relative path, the
`source`) are grouped `videos_per_shard` at a time; group k becomes shard k, and process p of P writes
the shards with k % P == p. Which clip lands in which shard therefore depends only on the inputs and the
config, never on timing, and N hosts split the work with nothing but their process index (from
`jax.distributed` when it is initialised).

Output directory:

    plan.json                               what is being built (config, codec, sources); a rerun must match
    shard-00000-of-00004.array_record       records (schema.py), clips of the shard's videos in input order
    shard-00000-of-00004.json               the shard's completion marker: counts, sha256, per-video outcome
    manifest.json                           written once every shard is done: counts, shards, videos, schema
    report.json                             skipped inputs with their reasons, warnings, unlisted directories

Sources are file names as Python holds them: a name that is not valid UTF-8 (POSIX names are bytes) is
surrogate-escaped (`os.fsdecode`), so no input is lost for its name. Records keep the name's own bytes
(schema.py); the JSON files here are ASCII and write such a byte 0xXX as the escape `\\udcXX`, which
`json.loads` turns back into the same name (`os.fsencode` gives the bytes).

Every file is written under a temporary name and renamed; a shard's .json is renamed last, so a shard is
done exactly when its .json exists (and its file has the size it records). A rerun skips done shards and
redoes the others from scratch, so a run killed at any point and rerun gives the same bytes as a run
that was never interrupted. A video is written all or nothing: its records are built before any is
written. Problems with an input (unreadable, no audio, too small, ...) skip that input with a reason;
problems with the output (disk full) stop the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import av
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipeline import schema
from data_pipeline.clips import VIDEO_EXTENSIONS, ClipConfig, SkipVideo, extract_clips
from data_pipeline.extras import VideoConditioning, check_codec, parse_extras
from data_pipeline.features import encode_clips, get_audio_features
from hallojax.codec import get_codec, latent_frames

log = logging.getLogger("data_pipeline")

FORMAT = "hallojax-clips"
# group_size 1: every record is its own chunk, so random access (Grain, TFDS) reads only that record
WRITER_OPTIONS = "group_size:1,zstd:3"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    codec: str = "pixel"
    audio_features: str | None = None  # a registered spec, e.g. "rms" or later "wav2vec2:PATH"
    videos_per_shard: int = 16
    encode_batch: int = 8  # clips per codec call
    # optional (data_pipeline.extras): per-video files and codec extras; left out of plan.json when unset, so
    # sets prepared before they existed resume unchanged
    face_embeddings: str | None = None  # FILE.npz: source -> [E]
    text_states: str | None = None  # FILE.npz: source -> [L, D] (+ source/mask, source/pooled), or "*"
    extras: str | None = None  # "hallo3", "hunyuan-avatar" (comma-separated)
    captions: str | None = None  # FILE.json: source -> caption, encoded by text_encoder (T5) into text states
    text_encoder: str | None = None
    tokenizer: str | None = None
    text_len: int | None = None  # tokens of the encoded captions (default 226: Hallo3's T5)

    OPTIONAL = ("face_embeddings", "text_states", "extras", "captions", "text_encoder", "tokenizer", "text_len")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in self.OPTIONAL and v is None)}

    def validate(self):
        self.clip.validate()
        if self.videos_per_shard < 1 or self.encode_batch < 1:
            raise ValueError(f"videos_per_shard and encode_batch must be >= 1, got "
                             f"{self.videos_per_shard}, {self.encode_batch}")


@dataclasses.dataclass(frozen=True)
class Input:
    source: str  # path relative to the input directory (file name for a file given directly)
    path: Path


def _walk(root: Path, unlisted: list[dict]) -> list[tuple[str, Path]]:
    """(source, path) of every name under `root` with a video extension that is not a directory (hidden
    names ignored, links to directories not followed): regular files, but also broken links, link loops,
    FIFOs, ..., which stage 1 then skips with the reason. Subdirectories that cannot be listed are added
    to `unlisted`; an unlistable `root` is an error."""
    def onerror(e: OSError):
        if Path(e.filename) == root:
            raise ValueError(f"input {root}: cannot list the directory ({e.strerror})")
        unlisted.append({"source": Path(e.filename).relative_to(root).as_posix(), "path": e.filename,
                         "reason": f"cannot list the directory ({e.strerror}): videos in it, if any, are not prepared"})

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    return found


def discover(inputs) -> tuple[list[Input], list[dict]]:
    """(inputs, unlisted directories): every name with a video extension under the given directories
    (recursively; hidden names ignored) and the files given directly, sorted by source, so that each ends
    in the manifest or in the report; and the subdirectories that could not be listed, with the reason.
    Missing inputs and clashing sources are errors."""
    found: dict[str, Path] = {}
    clashes, unlisted = [], []
    for arg in inputs:
        root = Path(arg)
        if root.is_dir():
            files = _walk(root, unlisted)
        elif root.is_file():
            files = [(root.name, root)]
        else:
            raise ValueError(f"input {arg} does not exist")
        for source, path in files:
            if source in found and found[source].resolve() != path.resolve():
                clashes.append(f"{source} ({found[source]} and {path})")
            found[source] = path
    if clashes:
        raise ValueError(f"inputs give the same source name twice: {'; '.join(clashes[:5])}; pass their parent "
                         "directory instead, so sources keep their relative paths")
    for u in unlisted:
        log.warning("%s: %s", u["path"], u["reason"])
    return [Input(s, found[s]) for s in sorted(found)], sorted(unlisted, key=lambda u: u["path"])


def process_slot(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """(index, count) of this process: explicit values, else jax's when jax.distributed is initialised."""
    if process_index is not None or process_count is not None:
        if process_index is None or process_count is None or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        return process_index, process_count
    if "jax" in sys.modules:  # jax.distributed cannot be initialised without jax having been imported
        import jax

        if jax.distributed.is_initialized():
            return jax.process_index(), jax.process_count()
    return 0, 1


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _foreign(out: Path) -> list[str]:
    """Entries of `out` that no prepare run wrote (another process's temporaries do not count: in a
    multi-process start one of them may be writing plan.json while another looks)."""
    return [p.name for p in out.iterdir() if ".tmp-" not in p.name or not p.name.startswith(".")]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _differences(old, new, prefix="") -> list[str]:
    """'key: old -> new' for every differing leaf of two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []
    if isinstance(old, list) and isinstance(new, list) and len(old) + len(new) > 8:
        return [(f"{prefix[:-1]}: {len(old)} entries -> {len(new)} entries, "
                 f"{len(set(map(str, old)) ^ set(map(str, new)))} differ")]
    return [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


class Preparer:
    """One process's share of one prepare run (see the module docstring)."""

    def __init__(self, inputs, out_dir, config: PrepareConfig = PrepareConfig(), *, process_index=None,
                 process_count=None, overwrite: bool = False, progress: bool = True):
        config.validate()
        self.config, self.progress = config, progress
        self.codec = get_codec(config.codec)
        clip = config.clip
        latent_frames(self.codec, clip.num_frames)
        s = self.codec.spatial_stride
        if clip.height % s or clip.width % s:
            raise ValueError(f"output size {clip.width}x{clip.height} must be a multiple of codec {self.codec.name!r}"
                             f" spatial stride {s}")
        self.audio_fn = get_audio_features(config.audio_features)
        getattr(self.audio_fn, "validate", lambda clip: None)(clip)
        self.extras = parse_extras(config.extras)
        check_codec(self.extras, self.codec)
        self.conditioning = VideoConditioning(config.face_embeddings, config.text_states, config.captions,
                                              config.text_encoder, config.tokenizer, config.text_len)
        self.inputs, self.unlisted = discover(inputs)
        if not self.inputs:
            raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) found in {list(map(str, inputs))}")
        self.out = Path(out_dir)
        self.index, self.count = process_slot(process_index, process_count)
        g = config.videos_per_shard
        self.num_shards = -(-len(self.inputs) // g)
        self.plan = {
            "format": FORMAT, "schema_version": schema.SCHEMA_VERSION, "config": config.to_dict(),
            "codec": self.codec_info(), "num_shards": self.num_shards, "sources": [i.source for i in self.inputs]}
        if self.conditioning.plan():
            self.plan["files"] = self.conditioning.plan()
        self._prepare_out_dir(overwrite, inputs)
        self.stage_s = [0.0, 0.0, 0.0]  # seconds in stage 1 (decode, clips), stage 2 (encode, serialise), writing
        self.totals = {"ok": 0, "skipped": 0, "clips": 0}  # videos and clips done by this process in this run

    def codec_info(self) -> dict:
        c = self.codec
        return {"spec": self.config.codec, "name": c.name, "temporal_stride": c.temporal_stride,
                "spatial_stride": c.spatial_stride, "latent_channels": c.latent_channels}

    def _prepare_out_dir(self, overwrite, inputs):
        out = self.out
        try:  # input names may be any bytes; the output's path is opened by grain, which takes only UTF-8
            str(out.absolute()).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"output directory {out}: its path is not valid UTF-8, which the shard reader (grain) "
                             "cannot open; choose another directory") from None
        for src in inputs:
            src = Path(src).resolve()
            if src == out.resolve() or out.resolve() in src.parents or src in out.resolve().parents:
                raise ValueError(f"output {out} and input {src} overlap; choose another output directory")
        plan_path = out / "plan.json"
        if out.exists() and not out.is_dir():
            raise ValueError(f"output {out} exists and is not a directory")
        if overwrite and out.exists():
            if self.count > 1:
                raise ValueError("overwrite with several processes would race; clear the directory first")
            if _foreign(out) and not plan_path.exists():
                raise ValueError(f"{out} is not a prepared directory (no plan.json); refusing to delete it")
            shutil.rmtree(out)
        if out.exists() and _foreign(out) and not plan_path.exists():
            raise ValueError(f"{out} exists, is not empty and holds no plan.json: not a prepare output directory")
        out.mkdir(parents=True, exist_ok=True)
        if plan_path.exists():
            old = _read_json(plan_path)
            if old != self.plan:
                diff = "; ".join(_differences(old, self.plan)[:4])
                raise ValueError(f"{out} was prepared with a different plan ({diff}); "
                                 "use a new directory, or --overwrite to start again")
        else:
            write_json_atomic(plan_path, self.plan)
        if self.count == 1:  # nobody else writes here: every temporary is left over from a killed run
            for stale in out.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)

    # --- shards -----------------------------------------------------------------------------------------

    def shard_paths(self, k: int) -> tuple[Path, Path]:
        stem = f"shard-{k:05d}-of-{self.num_shards:05d}"
        return self.out / f"{stem}.array_record", self.out / f"{stem}.json"

    def shard_inputs(self, k: int) -> list[Input]:
        g = self.config.videos_per_shard
        return self.inputs[k * g:(k + 1) * g]

    def shard_done(self, k: int) -> bool:
        data, meta = self.shard_paths(k)
        if not meta.exists():
            return False
        try:
            m = _read_json(meta)
            return m["num_records"] == 0 or (data.exists() and data.stat().st_size == m["bytes"])
        except (ValueError, KeyError, TypeError, OSError):
            return False

    def _video_records(self, inp: Input):
        """(encoded records, outcome dict) for one input; never raises for a bad input."""
        cfg = self.config
        outcome = {"source": inp.source, "clips": 0, "skipped": None, "warnings": []}
        t0 = time.perf_counter()
        try:
            fields = self.conditioning.fields(inp.source)  # a video without its key is skipped before decoding
            clips = extract_clips(inp.path, inp.source, cfg.clip)
            t1 = time.perf_counter()
            records = encode_clips(clips, cfg.clip, self.codec, self.audio_fn, cfg.audio_features,
                                   cfg.encode_batch, self.extras, fields)
            blobs = [schema.encode_record(r) for r in records]
        except SkipVideo as e:
            outcome["skipped"] = e.reason
            return [], outcome
        except av.error.FFmpegError as e:
            outcome["skipped"] = f"ffmpeg: {e}"
            return [], outcome
        except MemoryError:
            outcome["skipped"] = "out of memory while decoding (try --max-seconds)"
            return [], outcome
        except Exception as e:  # noqa: BLE001 - one odd file must not end a run over millions
            log.warning("%s: unexpected error, skipped:\n%s", inp.path, traceback.format_exc())
            outcome["skipped"] = f"{type(e).__name__}: {e}"
            return [], outcome
        self.stage_s[0] += t1 - t0
        self.stage_s[1] += time.perf_counter() - t1
        outcome["clips"], outcome["warnings"] = len(blobs), clips.warnings
        return blobs, outcome

    def write_shard(self, k: int, bar=None) -> dict:
        data, meta = self.shard_paths(k)
        for stale in list(self.out.glob(f".{data.name}.tmp-*")) + list(self.out.glob(f".{meta.name}.tmp-*")):
            stale.unlink(missing_ok=True)
        tmp = _tmp_name(data)
        writer, digest, videos, count = None, hashlib.sha256(), [], 0
        try:
            for inp in self.shard_inputs(k):
                blobs, outcome = self._video_records(inp)
                videos.append(outcome)
                t0 = time.perf_counter()
                if blobs and writer is None:
                    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
                for b in blobs:
                    writer.write(b)
                count += len(blobs)
                self.stage_s[2] += time.perf_counter() - t0
                self.totals["skipped" if outcome["skipped"] else "ok"] += 1
                self.totals["clips"] += outcome["clips"]
                if bar is not None:
                    bar.set_postfix(self.totals, refresh=False)
                    bar.update(1)
            size = 0
            if writer is not None:
                writer.close()
                writer = None
                with open(tmp, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                size = tmp.stat().st_size
                _fsync(tmp)
                os.replace(tmp, data)
            info = {"shard": k, "file": data.name if count else None, "num_records": count, "bytes": size,
                    "sha256": digest.hexdigest() if count else None, "videos": videos}
            write_json_atomic(meta, info)
            return info
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)

    # --- the run ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm import tqdm

        mine = [k for k in range(self.num_shards) if k % self.count == self.index]
        todo = [k for k in mine if not self.shard_done(k)]
        if len(todo) < len(mine):
            log.info("process %d: %d of its %d shards are already done", self.index, len(mine) - len(todo), len(mine))
        total = sum(len(self.shard_inputs(k)) for k in todo)
        with tqdm(total=total, unit="video", desc=f"prepare {self.index}/{self.count}",
                  disable=not self.progress, dynamic_ncols=True) as bar:
            for k in todo:
                info = self.write_shard(k, bar)
                log.info("shard %d/%d: %d clips from %d videos", k + 1, self.num_shards, info["num_records"],
                         sum(v["skipped"] is None for v in info["videos"]))
        self._barrier()
        manifest = None
        if self.index == 0 or not _jax_distributed():
            manifest = self.finalize()
        return {"out_dir": str(self.out), "shards_written": len(todo), "shards_already_done": len(mine) - len(todo),
                "videos_ok": self.totals["ok"], "videos_skipped": self.totals["skipped"],
                "clips": self.totals["clips"], "manifest": manifest,
                "seconds": dict(zip(("stage1", "stage2", "write"), self.stage_s))}

    def _barrier(self):
        if self.count > 1 and _jax_distributed():
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("data_pipeline.prepare: shards written")

    def finalize(self) -> str | None:
        """Write manifest.json and report.json once every shard is done; returns the manifest path or None."""
        pending = [k for k in range(self.num_shards) if not self.shard_done(k)]
        if pending:
            log.info("%d shards are not done yet (other processes?); the last process to finish writes the "
                     "manifest", len(pending))
            return None
        metas = [_read_json(self.shard_paths(k)[1]) for k in range(self.num_shards)]
        videos = [v for m in metas for v in m["videos"]]
        if [v["source"] for v in videos] != self.plan["sources"]:
            raise ValueError(f"shard files in {self.out} do not match plan.json's sources; the directory was "
                             "modified by hand, rerun with --overwrite")
        shards = [{"file": m["file"], "num_records": m["num_records"], "bytes": m["bytes"], "sha256": m["sha256"]}
                  for m in metas if m["num_records"]]
        ok = [v for v in videos if v["skipped"] is None]
        shapes = {}
        if shards:
            reader = ArrayRecordReader(str(self.out / shards[0]["file"]))
            try:
                first = schema.decode_record(reader.read([0])[0])
            finally:
                reader.close()
            shapes = {k: list(getattr(v, "shape", ())) for k, v in sorted(first.items())}
        counts = {"inputs": len(videos), "videos_ok": len(ok), "videos_skipped": len(videos) - len(ok),
                  "clips": sum(v["clips"] for v in videos), "shards": self.num_shards, "shard_files": len(shards)}
        manifest = {
            "format": FORMAT, "schema_version": schema.SCHEMA_VERSION, "schema": schema.describe(),
            "config": self.plan["config"], "codec": self.plan["codec"], "counts": counts,
            "record_shapes": shapes, "shards": shards,
            "videos": [{"source": v["source"], "clips": v["clips"], "shard": m["shard"]}
                       for m in metas for v in m["videos"] if v["skipped"] is None],
        }
        paths = {i.source: str(i.path) for i in self.inputs}
        report = {
            "counts": counts,
            "skipped": [{"source": v["source"], "path": paths.get(v["source"]), "reason": v["skipped"]}
                        for v in videos if v["skipped"] is not None],
            "warnings": [{"source": v["source"], "warning": w} for v in videos for w in v["warnings"]],
            "unlisted_directories": self.unlisted,
        }
        write_json_atomic(self.out / "report.json", report)
        write_json_atomic(self.out / "manifest.json", manifest)  # last: its presence means complete
        log.info("%d clips from %d of %d videos in %d shard files; %d skipped (see %s)", counts["clips"],
                 counts["videos_ok"], counts["inputs"], counts["shard_files"], counts["videos_skipped"],
                 self.out / "report.json")
        return str(self.out / "manifest.json")


def _jax_distributed() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized()


def prepare(inputs, out_dir, config: PrepareConfig = PrepareConfig(), **kwargs) -> dict:
    """Prepare `inputs` (directories and/or video files) into `out_dir`; see `Preparer` for the options."""
    return Preparer(inputs, out_dir, config, **kwargs).run()

"""Where a training batch comes from: random, synthetic or prepared clips (under the trainer and the demo).

    configure(config)                      # the source, the prepared set, the model sizes it implies
    rows = local_rows(mesh, rules, B)      # the rows of every global batch this process's devices hold
    source = make_source(config, cfg, rows)
    batch = global_batch(next(source), rows, mesh, rules, B)   # global jax.Arrays

Sources (`config.data`):
- ``random``: one fixed batch (smooth random latents, random text states and whatever conditioning the
  model needs), repeated: smoke tests and the `tiny` demo.
- ``synthetic``: synthetic talking-face videos rendered and prepared into <data.workdir>/prepared by the
  data pipeline (`prepare_synthetic`), then read as a prepared set (the demo).
- ``prepared``: a directory written by `hallojax prepare`. Giving `data.prepared=DIR` is enough: the source
  follows from it, and the model's input sizes from its manifest.json (`adopt_prepared_sizes`): in/out
  channels from the codec's latent channels (2C + 4 in for masked-input models), audio_in_layers /
  audio_in_dim from the records' audio features [T, N, D], audio_stride from the codec's temporal stride.
  Each adopted value is logged; a value set on the command line that disagrees is refused in one line
  naming both. Hallo3 and HunyuanVideo-Avatar take theirs from `prepared_sizes`.

Data order, the same on any topology: the global batch at step s is positions [s·B, (s+1)·B) of a global
order of record indices, a fresh permutation per epoch drawn from (seed, epoch) (Grain's index shuffle,
O(1) per index: `GlobalOrder`). Process p loads only the rows of that global batch its devices hold
(`local_rows`, read from the batch sharding, so any device order works), and `global_batch` places each
row on the devices that hold it. The iterator state is the global position (records consumed), so a
checkpoint resumes on any number of processes, devices or even another batch size. Reading stays Grain's:
a random-access source, decoded and batched by prefetch threads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hallojax.models.wan import DiTConfig
from hallojax.sharding import batch_sharding

log = logging.getLogger("hallojax.data")

SOURCES = ("random", "synthetic", "prepared")


# --- sources and sizes ---------------------------------------------------------------------------
def configure(config) -> dict | None:
    """Resolve `config.data` in place (synthetic: render and prepare the set; prepared: check it) and
    adopt the model sizes the prepared set implies. Returns the prepared set's manifest (None: random)."""
    data = config.data
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r}: expected one of {SOURCES}")
    if data.source == "synthetic" and not data.prepared:
        data.prepared = str(prepare_synthetic(data, config.seed))
    if not data.prepared:
        return None
    from data_pipeline.reader import load_manifest

    manifest = load_manifest(data.prepared)
    if data.source != "prepared":
        log.info("data: prepared clips in %s (data.source %r -> 'prepared': data.prepared is set)", data.prepared,
                 data.source)
        data.source = "prepared"
    adopt_prepared_sizes(config, manifest, set(config.overrides))
    record_media(config, manifest)
    return manifest


def record_media(config, manifest: dict) -> None:
    """config.data.media: what the clips are (codec, audio features, fps, clip length, size, crop scale),
    saved with every checkpoint so that `hallojax generate` feeds the model what it was trained on even
    after the prepared set is gone."""
    import ml_collections

    clip = manifest["config"]["clip"]
    config.data.media = ml_collections.ConfigDict(dict(
        codec=manifest["codec"]["spec"], audio_features=manifest["config"].get("audio_features") or "",
        fps=float(clip["fps"]), frames=int(clip["num_frames"]), height=int(clip["height"]),
        width=int(clip["width"]), box_scale=float(clip["box_scale"])))


def adopt_prepared_sizes(config, manifest: dict, explicit: set[str] = frozenset()) -> dict:
    """Set the model's input sizes from a prepared set's manifest; returns {key: (old, new)} of the changes.
    `explicit`: config keys set by hand ("model.in_channels", ...): a disagreement there is an error."""
    model, where = config.model, f"{config.data.prepared}/manifest.json"
    codec = manifest["codec"]
    c = int(codec["latent_channels"])
    if model.get("kind") in ("hallo3", "hunyuan-avatar"):  # their sizes and checks: hallojax.families
        want = prepared_sizes(model, manifest, where)
    elif model.get("kind", "wan-dit") == "letstalk":  # per-frame latents in (out: 2C), audio always on, stride 1
        want = {"in_channels": (c, f"codec {codec['name']}: {c} latent channels")}
        if int(codec["temporal_stride"]) != 1:
            raise ValueError(f"{where}: codec {codec['name']} has temporal stride {codec['temporal_stride']}; "
                             "LetsTalk trains on per-frame latents (stride 1)")
    else:
        masked = model.in_channels == 2 * model.out_channels + 4
        want = {"out_channels": (c, f"codec {codec['name']}: {c} latent channels"),
                "in_channels": (2 * c + 4 if masked else c, f"codec {codec['name']}: {c} latent channels"
                                + (", masked input 2C + 4" if masked else ""))}
    if model.get("audio", "per-frame") != "none" and model.get("kind") not in ("hallo3", "hunyuan-avatar"):
        shape = manifest["record_shapes"].get("audio_features")
        if not shape:
            raise ValueError(f"model.audio={model.audio!r} needs per-frame audio features, but the records of "
                             f"{config.data.prepared} have none (prepare it with --audio-features)")
        _, n, d = shape
        want["audio_in_layers"] = (n, f"audio features [T, {n}, {d}]")
        want["audio_in_dim"] = (d, f"audio features [T, {n}, {d}]")
        if "audio_stride" in model:
            s = int(codec["temporal_stride"])
            want["audio_stride"] = (s, f"codec {codec['name']}: temporal stride {s}")
    changes = {}
    for key, (value, why) in want.items():
        old = model[key]
        if old == value:
            continue
        if f"model.{key}" in explicit:
            raise ValueError(f"model.{key}={old} was set on the command line, but {where} gives {value} ({why})")
        model[key] = value
        changes[key] = (old, value)
    if changes:
        log.info("model sizes from %s: %s", where, ", ".join(f"{k} {a} -> {b} ({want[k][1]})"
                                                            for k, (a, b) in changes.items()))
    return changes


# the flags a prepared set needs, per family: {record field: the prepare flag that writes it}
PREPARED_NEEDS = {
    "hallo3": {"concat_latent": "--extras hallo3", "masked_ref_latent": "--extras hallo3",
               "face_embedding": "--face-embeddings FILE.npz", "audio_features": "--audio-features wav2vec2:DIR"},
    "hunyuan-avatar": {"ref_video_latent": "--extras hunyuan-avatar", "audio_features": "--audio-features whisper:DIR"},
}


def prepared_sizes(model, manifest: dict, where: str) -> dict:
    """{model key: (value, why)} a Hallo3 or Avatar model takes from a prepared set's manifest; refuses a codec
    whose temporal stride is not 4 and a set without the records the family needs (naming the prepare flag)."""
    kind, codec, shapes = model.get("kind"), manifest["codec"], manifest["record_shapes"]
    name, c = codec["name"], int(codec["latent_channels"])
    if int(codec["temporal_stride"]) != 4:
        raise ValueError(f"{where}: codec {name} has temporal stride {codec['temporal_stride']}; model.kind={kind} "
                         "groups 4 video frames per latent frame (prepare with --codec cogvideox-vae:DIR or "
                         "hunyuan-vae:DIR)")
    spec = manifest["config"].get("audio_features") or ""
    missing = {k: v for k, v in PREPARED_NEEDS[kind].items() if k not in shapes}
    if kind == "hunyuan-avatar" and "audio_features" in shapes and spec.partition(":")[0] != "whisper":
        missing["audio_features"] = f"--audio-features whisper:DIR (not {spec})"
    if missing:
        raise ValueError(f"{where}: model.kind={kind} needs records with {sorted(missing)}: prepare the set with "
                         f"{' '.join(sorted(set(missing.values())))}")
    t, n, d = shapes["audio_features"]
    feats = f"audio features [T, {n}, {d}] ({spec})"
    codec_why = f"codec {name}: {c} latent channels"
    if kind == "hallo3":
        f, h, w, _ = shapes["latents"]
        want = {"out_channels": (c, codec_why), "in_channels": (2 * c, codec_why + ", + the concat latent's C"),
                "audio_layers": (n, feats), "audio_in_dim": (d, feats),
                "face_in": (shapes["face_embedding"][0], f"face embeddings [{shapes['face_embedding'][0]}]"),
                # the learned position table: the set's latent grid, at least its frames
                "sample_height": (h, f"latents [{f}, {h}, {w}, {c}]"), "sample_width": (w, f"latents [{f}, {h}, {w}]"),
                "sample_frames": (max(f, model["sample_frames"]), f"latents of {f} frames")}
        if shapes["concat_latent"][0] != 1:
            raise ValueError(f"{where}: concat_latent has {shapes['concat_latent'][0]} latent frames; Hallo3 takes 1 "
                             f"(codec {name} must encode 3 frames to 1, as the CogVideoX VAE does)")
    else:
        from hallojax.models.avatar_audio import WINDOW

        if n % WINDOW:
            raise ValueError(f"{where}: {feats} are not {WINDOW}-frame whisper windows (prepare with "
                             "--audio-features whisper:DIR)")
        want = {"in_channels": (c, codec_why), "out_channels": (c, codec_why), "audio_window": (WINDOW, feats),
                "audio_layers": (n // WINDOW, feats), "audio_channels": (d, feats)}
        if "text_pooled" in shapes:
            want["pooled_dim"] = (shapes["text_pooled"][0], f"text_pooled [{shapes['text_pooled'][0]}]")
    if "text_states" in shapes:
        want["text_dim"] = (shapes["text_states"][1], f"text states [{', '.join(map(str, shapes['text_states']))}]")
    return want


# --- random: a fixed batch -----------------------------------------------------------------------
def synthetic_batch(cfg: DiTConfig, train, seed: int):
    """A fixed batch of smooth latents (low-frequency patterns) and random text states."""
    rng = np.random.default_rng(seed)
    b, f, h, w = train.batch_size, train.frames, train.height, train.width
    grid = np.stack(np.meshgrid(np.linspace(0, 1, f), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij"))
    freqs = rng.normal(size=(b, cfg.in_channels, 3)) * 3
    phase = rng.uniform(0, 2 * np.pi, size=(b, cfg.in_channels))
    lat = np.sin(np.einsum("bcx,xfhw->bfhwc", freqs, grid) + phase[:, None, None, None, :])
    ctx = rng.normal(size=(b, train.text_len, cfg.text_dim))
    return lat.astype(np.float32), ctx.astype(np.float32)


def example_batch(cfg: DiTConfig, batch: int, frames: int, height: int, width: int, *, text_len: int = 512,
                  image_len: int = 257, audio_stride: int | None = None, seed: int | None = 0) -> dict:
    """A trainer batch for latents [batch, frames, height, width, C] (latent grid sizes): random numpy
    arrays, or `jax.ShapeDtypeStruct`s with seed=None (ahead-of-time compilation, benchmarks)."""
    pt, ph, pw = cfg.patch_size
    stride = audio_stride or cfg.audio_stride
    shapes = {"latents": (batch, frames, height, width, cfg.out_channels), "context": (batch, text_len, cfg.text_dim)}
    if cfg.identity_tokens or cfg.symbiotic or cfg.identity_additive or cfg.reference_net:
        shapes["reference"] = (batch, 1, height, width, cfg.out_channels)
    if cfg.audio != "none":
        shapes["audio"] = (batch, 1 + stride * (frames - 1), cfg.audio_in_layers, cfg.audio_in_dim)
    if cfg.audio_face_mask:
        shapes["face_mask"] = (batch, frames // pt, height // ph, width // pw)
    if cfg.image_dim is not None:
        shapes["image_context"] = (batch, image_len, cfg.image_dim)
    if seed is None:
        return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    rng = np.random.default_rng(seed)
    out = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    if "face_mask" in out:
        out["face_mask"] = (out["face_mask"] > -0.5).astype(np.float32)
    return out


def sample_inputs(cfg, frames, height, width, text_len, seed, batch: int = 1):
    """Model inputs of `batch` clips and their null versions, from the trainer's example batch: numpy
    arrays, or `jax.ShapeDtypeStruct`s with seed=None (`hallojax compile --sample`)."""
    example = example_batch(cfg, batch, frames, height, width, text_len=text_len, seed=seed)
    full = {"context": example["context"]}
    for k in ("reference", "audio", "face_mask"):
        if k in example and not (k == "reference" and cfg.reference_net and not (
                cfg.identity_tokens or cfg.identity_additive or cfg.symbiotic)):
            full[k] = example[k]
    if cfg.motion_frames:
        motion = (batch, cfg.motion_frames, height, width, cfg.out_channels)
        full["motion"] = np.zeros(motion, np.float32) if seed is not None else jax.ShapeDtypeStruct(motion, np.float32)
    null = {k: (v if k in ("face_mask", "motion") or seed is None else np.zeros_like(v)) for k, v in full.items()}
    return full, null, example.get("reference")


class FixedBatches:
    """data.source = "random": one fixed global batch, repeated; `next` gives this process's `rows` of it.
    Latents and text are `synthetic_batch`'s (learnable); other inputs the model needs are random."""

    def __init__(self, cfg: DiTConfig, t, seed: int, rows: Sequence[int] | None = None, batch: dict | None = None):
        if batch is None:  # the Wan DiT's (other model families give theirs: hallojax.families)
            batch = example_batch(cfg, t.batch_size, t.frames, t.height, t.width, text_len=t.text_len, seed=seed)
            batch["latents"], batch["context"] = synthetic_batch(cfg.replace(in_channels=cfg.out_channels), t, seed)
        rows = list(range(t.batch_size)) if rows is None else list(rows)
        self.batch = {k: v[rows] for k, v in batch.items()}
        self.batch_size, self.position = t.batch_size, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.position += self.batch_size
        return dict(self.batch)

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


# --- synthetic: the talking-face set through the data pipeline ------------------------------------
def prepare_synthetic(data, seed: int) -> Path:
    """Render the synthetic videos and run the data pipeline on them (both resume: reruns are cheap)."""
    import argparse

    from data_pipeline import prepare as prep
    from data_pipeline import synthetic

    workdir = Path(data.workdir)
    videos, out = workdir / "videos", workdir / "prepared"
    synthetic.generate(videos, data.num_videos, seed, synthetic.SyntheticConfig(), progress=False)
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    prep.run(parser.parse_args([str(videos), "-o", str(out), "--frames", str(data.frames), "--size", str(data.size),
                                "--codec", data.codec, "--audio-features", data.audio_features,
                                "--box-scale", str(data.get("box_scale", 1.6)), "--no-progress"]))
    return out


def load_clips(prepared) -> dict[str, np.ndarray]:
    """Every prepared clip, stacked: latents [N, F, h, w, C], reference [N, 1, h, w, C], audio [N, T, L, D]."""
    from data_pipeline.reader import clip_dataset

    records = list(clip_dataset(prepared))
    if not records:
        raise ValueError(f"{prepared}: no clips were prepared (see its report.json)")
    return {"latents": np.stack([r["latents"] for r in records]),
            "reference": np.stack([r["ref_latent"] for r in records]),
            "audio": np.stack([r["audio_features"] for r in records])}


# --- prepared: Grain over the ArrayRecord shards, in a topology-free global order ----------------------
class GlobalOrder:
    """Random-access source of one process's samples: sample j is row `rows[j % n]` of global batch j // n
    counted from global position `start`; global position q holds record index_shuffle(q mod N) of epoch
    q // N, shuffled with seed + epoch (Grain's shuffle, so the same order as `MapDataset.shuffle(seed)`)."""

    def __init__(self, records, seed: int, batch_size: int, rows: Sequence[int], start: int):
        self.records, self.seed, self.batch_size, self.rows, self.start = records, seed, batch_size, rows, start

    def __len__(self) -> int:
        return 2**62  # endless: epochs follow one another

    def record(self, q: int) -> int:
        """The record at global position q."""
        from grain.experimental import index_shuffle

        epoch, i = divmod(q, len(self.records))
        return index_shuffle(i, max_index=len(self.records) - 1, seed=(self.seed + epoch) % 2**32, rounds=4)

    def __getitem__(self, j: int) -> bytes:
        n = len(self.rows)
        return self.records[self.record(self.start + (j // n) * self.batch_size + self.rows[j % n])]


class PreparedBatches:
    """This process's `rows` of every global batch of a prepared set, in the global order of the module
    docstring (`GlobalOrder`), read by Grain's prefetch threads; records -> the trainer's inputs (face_mask:
    the record's face box scaled by `data.face_scale`, on the token grid of every frame; context: the null
    prompt, as records hold no text)."""

    def __init__(self, data, batch_size: int, seed: int, cfg: DiTConfig, rows: Sequence[int] | None = None,
                 read_options=None):
        import grain

        from data_pipeline.reader import array_record_source

        self.records = array_record_source(data.prepared)
        if len(self.records) < batch_size:
            raise ValueError(f"{data.prepared}: {len(self.records)} clips, fewer than the batch size {batch_size}")
        self.num_records = len(self.records)
        self.data, self.cfg, self.seed, self.batch_size = data, cfg, seed, batch_size
        self.rows = list(range(batch_size)) if rows is None else list(rows)
        self.read_options = read_options or grain.ReadOptions()
        self.set_state({"position": 0})

    def inputs(self, raw: bytes) -> dict:
        from data_pipeline.schema import decode_record

        r, cfg = decode_record(raw), self.cfg
        out = {"latents": r["latents"], "reference": r["ref_latent"],
               "context": np.zeros((1, cfg.text_dim), np.float32)}
        if "audio_features" in r:
            out["audio"] = r["audio_features"]
        if cfg.audio_face_mask:
            from hallojax.conditioning import face_mask_tokens

            f, h, w = r["latents"].shape[:3]
            grid = (h // cfg.patch_size[1], w // cfg.patch_size[2])
            mask = face_mask_tokens(tuple(r["face_box"]), *r["ref_frame"].shape[:2], grid, scale=self.data.face_scale)
            out["face_mask"] = np.broadcast_to(mask, (f // cfg.patch_size[0], *grid)).copy()
        return out

    def set_state(self, state: dict) -> None:
        """Start at a global position (records consumed by earlier steps, on whatever topology)."""
        self.start, self.batches, self._it = int(state["position"]), 0, None

    def get_state(self) -> dict:
        return {"position": self.start + self.batches * self.batch_size}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:  # built on first use: a restored position does not discard a prefetch
            import grain

            order = GlobalOrder(self.records, self.seed, self.batch_size, self.rows, self.start)
            local = grain.MapDataset.source(order).map(self.inputs).batch(len(self.rows), drop_remainder=True)
            self._it = iter(local.to_iter_dataset(self.read_options))
        batch = next(self._it)
        self.batches += 1
        return batch


def make_dataset(data, batch_size: int, seed: int, cfg: DiTConfig, rows: Sequence[int] | None = None,
                 read_options=None):
    """The prepared source (`PreparedBatches`): `rows` of every global batch (default: all of it); Grain's
    default read options (16 threads, 500 batches prefetched) unless `read_options` are given."""
    return PreparedBatches(data, batch_size, seed, cfg, rows, read_options)


def make_source(config, cfg: DiTConfig, rows: Sequence[int]):
    """The iterator of this process's rows of every global batch, for the configured source."""
    if config.data.prepared:
        return make_dataset(config.data, config.train.batch_size, config.seed, cfg, rows)
    return FixedBatches(cfg, config.train, config.seed, rows)


# --- placement -------------------------------------------------------------------------------------
def local_rows(mesh, rules, batch_size: int) -> list[int]:
    """The rows of a global batch held by this process's devices under the batch sharding (sorted)."""
    sharding = batch_sharding(mesh, (batch_size,), rules)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return sorted(rows)


def global_batch(local: dict, rows: Sequence[int], mesh, rules, batch_size: int) -> dict:
    """This process's `rows` of a global batch -> global arrays sharded over the batch mesh axes; every
    device gets exactly the rows it holds."""
    where = {r: i for i, r in enumerate(rows)}
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = (batch_size, *value.shape[1:])

        def shard(index, value=value):
            picked = value[[where[r] for r in range(*index[0].indices(batch_size))]]
            return picked[(slice(None), *index[1:])]

        out[key] = jax.make_array_from_callback(shape, batch_sharding(mesh, shape, rules), shard)
    return out

"""What every generation pipeline shares, and the Wan DiT's pipeline (`WanPipeline`), under `hallojax.generate`.

`hallojax.generate` is the entry point (its `Pipeline.load` takes any checkpoint and the CLI); this module and
`hallojax.generate_families` (Hallo3, LetsTalk, HunyuanVideo-Avatar: `FamilyPipeline(WanPipeline)`) sit below
it and never import it.

Sections: sampling settings · checkpoints (a `hallojax train` workdir: latest or a given step, EMA weights when
they have warmed up; or a converted directory) · what the model was trained on (`MediaSpec`) · inputs (the
portrait cropped around the face with the data pipeline's crop rule and encoded by the codec the model was
trained with; the speech resampled to 16 kHz mono and turned into the model's audio features over the whole,
padded timeline; the prompt through a converted umT5 and a local tokenizer, or the null prompt) · the result ·
the pipeline: `SamplingEngine` (one jitted program per clip shape: every denoising step inside, all guidance
branches of a step as one batched model call, compiled once and reused for every clip), long video
(`hallojax.sample.long_video`: motion / continue / overlap), output (decode, trim to the speech's length, mux
with the original speech, JSON sidecar).

Sharding: the model is restored onto the checkpoint config's mesh over the devices present (parameters
by their logical axes); each step's guidance branches are stacked on the batch axis, which the rules
split over (data, fsdp), and video tokens go over `context` where the mesh has one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hallojax.checkpoint import CheckpointError
from hallojax.models.wan import DiTConfig, ReferenceCache, WanDiT
from hallojax.fsutil import write_json
from hallojax.media import MediaError, normalize_loudness, read_audio, read_image, speech_16k, write_mp4
from hallojax.sample import guidance as guidance_lib
from hallojax.sample import long_video
from hallojax.sample.schedules import make_schedule
from hallojax.sample.solvers import SAMPLERS, Known, get_sampler, sample, schedule_arrays
from hallojax.sharding import DEFAULT_RULES, make_mesh, normalize_rules, state_shardings, use_rules

log = logging.getLogger("hallojax.generate")  # the logger users know


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sampling settings (`config.sample` in a config file; CLI flags override)."""

    sampler: str = "unipc"  # flow: euler | unipc | dpm++ | wan-unipc; VP: cogvideox-ddim | cogvideox-dpm | ddpm | ddim
    steps: int = 25
    shift: float = 3.0  # the σ shift of flow samplers; the SNR shift of the cogvideox-* ones (1 for ddpm / ddim)
    guidance: str = "none"  # a chain spec or a preset (hallojax.sample.guidance.PRESETS)
    long_video: str = "auto"  # auto | motion | overlap | continue
    overlap: int = 0  # latent frames shared by consecutive clips / windows (0: a quarter of a clip)
    clip_frames: int = 0  # video frames per clip (0: the clip length the model was trained on)
    # EchoMimicV3 preview's "phase-aware negative CFG": the negative prompt's embeddings are multiplied by
    # negative_scale at every step i <= negative_steps, cumulatively (x1.5^3 from step 2 on with 1.5 / 2)
    negative_scale: float = 1.0
    negative_steps: int = 0
    # masked-input models: "paste" (known frames noised into x at every step and pasted back, plus the mask
    # channels: how the trainer shows them) | "condition" (only the mask channels and the VAE encoding of the
    # masked clip, unknown frames mid-grey, carry them; x is noise everywhere: Wan-Fun-InP / EchoMimicV3 as released)
    known_frames: str = "paste"
    loudness: float | None = None  # normalise the speech to this integrated loudness (LUFS) before the audio
    # features (EchoMimicV3 Flash: -23, pyloudnorm), not the muxed audio

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r}: expected one of {sorted(SAMPLERS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"--steps {self.steps!r}: must be an integer >= 1")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"--shift {self.shift!r}: must be a positive number")
        if self.long_video not in ("auto",) + long_video.STRATEGIES:
            raise ValueError(f"--long-video {self.long_video!r}: expected auto or one of {long_video.STRATEGIES}")
        if self.overlap < 0 or self.clip_frames < 0:
            raise ValueError(f"--overlap {self.overlap} / --clip-frames {self.clip_frames}: must be >= 0")
        if self.known_frames not in ("paste", "condition"):
            raise ValueError(f"sample.known_frames={self.known_frames!r}: expected 'paste' or 'condition'")
        if not (math.isfinite(self.negative_scale) and self.negative_scale > 0) or self.negative_steps < 0:
            raise ValueError(f"sample.negative_scale={self.negative_scale} / negative_steps={self.negative_steps}: "
                             "a positive scale and steps >= 0")
        if self.loudness is not None and not -70 <= self.loudness <= 0:
            raise ValueError(f"sample.loudness={self.loudness}: a loudness in LUFS, -70..0")

    def negative_multipliers(self) -> np.ndarray:
        """float32 [steps]: the factor on the negative prompt's embeddings at each step (cumulative scaling)."""
        i = np.arange(self.steps)
        return (self.negative_scale ** (np.minimum(i, self.negative_steps) + 1.0)).astype(np.float32) \
            if self.negative_scale != 1.0 else np.ones(self.steps, np.float32)


# --- checkpoints ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    model: WanDiT
    cfg: DiTConfig
    config: ml_collections.ConfigDict
    source: dict
    mesh: jax.sharding.Mesh
    rules: dict


def _mesh_for(config, devices=None) -> jax.sharding.Mesh:
    """The config's mesh over the devices present; a mesh of fixed sizes made for another device count
    becomes FSDP over all devices (logged)."""
    shape = {k: int(v) for k, v in dict(config.mesh).items()} if "mesh" in config else {"fsdp": -1}
    try:
        return make_mesh(shape, devices)
    except ValueError as e:
        log.info("mesh %s does not fit %d devices (%s): using fsdp over all of them", shape,
                 len(devices or jax.devices()), e)
        return make_mesh({"fsdp": -1}, devices)


def _check_overrides(config, overrides, numeric_fields=DiTConfig.NUMERIC_FIELDS) -> None:
    """--config.KEY=VALUE on a checkpoint may only change numerics, the mesh and sampling settings."""
    allowed = tuple("model." + f for f in numeric_fields)
    for item in overrides:
        key = item.removeprefix("--").removeprefix("config.").partition("=")[0]
        if key.startswith(("mesh.", "sample.", "data.face_scale")) or key in allowed or key == "rules":
            continue
        raise ValueError(f"{item}: a checkpoint's {key} cannot be changed at generation (only "
                         f"model.{{{','.join(numeric_fields)}}}, mesh.*, sample.*)")


def _steps_in(workdir: Path) -> list[int]:
    """Finished checkpoint steps of a workdir (Orbax renames a step directory into place when committed)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit() and (p / "state").is_dir() and (p / "config").is_dir())


class _quiet_absl:
    """Orbax logs expected conditions (a partial restore's missing metadata file) as absl warnings."""

    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def load_checkpoint(path, *, step: int | None = None, weights: str = "auto", overrides=(),
                    devices=None) -> Loaded:
    """A DiT from a `hallojax train` workdir (or one of its step directories) or a converted directory."""
    path = Path(path).absolute()  # Orbax takes absolute paths
    if weights not in ("auto", "ema", "params"):
        raise ValueError(f"--weights {weights!r}: expected auto, ema or params")
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory")
    if path.parent.name == "checkpoints" and path.name.isdigit() and (path / "state").is_dir():
        step, path = int(path.name) if step is None else step, path.parent.parent  # a step directory
    if (path / "checkpoints").is_dir():
        config, model, source = _load_workdir(path, step, weights, overrides, devices)
    elif (path / "config.json").exists():
        if step is not None:
            raise ValueError(f"--step {step}: {path} is a converted directory (one set of weights), not a workdir")
        config, model, source = _load_converted(path, overrides, devices)
    else:
        raise CheckpointError(f"--checkpoint {path}: neither a `hallojax train` workdir (no checkpoints/) nor a "
                              "converted directory (no config.json)")
    model, mesh, rules = model
    return Loaded(model, model.cfg, config, source, mesh, rules)


def _load_workdir(path: Path, step, weights, overrides, devices):
    import orbax.checkpoint as ocp

    from hallojax.config import apply_overrides

    steps = _steps_in(path)
    if not steps:
        raise CheckpointError(f"--checkpoint {path}: no finished checkpoint in {path / 'checkpoints'}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"--step {step}: {path / 'checkpoints'} holds steps {sorted(steps)}")
    ckpt = path / "checkpoints" / str(step)
    meta_file = ckpt / "config" / "metadata"
    try:
        config = ml_collections.ConfigDict(json.loads(meta_file.read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: the run's config cannot be read ({e})") from None
    _check_overrides(config, overrides)
    apply_overrides(config, overrides)
    from hallojax import families

    try:
        cfg = families.model_config(config.model)  # the Wan DiT, or another family's (config.model.kind)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: not a DiT training config ({e})") from None
    mesh = _mesh_for(config, devices)
    rules = normalize_rules(config.get("rules", DEFAULT_RULES))
    decay = float(config.get("train", {}).get("ema_decay", 0.0) or 0.0)
    if weights == "auto":
        # an EMA that still holds much of the initial weights (decay^step >= 5 %) is worse than the weights
        weights = "ema" if decay > 0 and decay ** step < 0.05 else "params"
    from hallojax.models.hallo3 import Buffer

    abstract = nnx.eval_shape(lambda: families.model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
    # the trainer keeps Buffers (Hallo3's RoPE tables and dead position table) apart from the parameters, in
    # state["buffers"] (hallojax.train.split_model): both are restored
    graphdef, abs_params, abs_buffers, rest = nnx.split(abstract, nnx.All(nnx.Param, nnx.Not(Buffer)), Buffer, ...)
    groups = {weights: abs_params, "buffers": abs_buffers}
    if not nnx.to_flat_state(abs_buffers):
        del groups["buffers"]

    def target(tree):
        shardings = nnx.to_pure_dict(state_shardings(tree, mesh, rules))
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(tree),
                            shardings)

    item = {k: target(v) for k, v in groups.items()}
    try:
        with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(ckpt / "state", args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{ckpt / 'state'}: the {weights} weights do not match the run's model config ({e})") \
            from None
    for k, tree in groups.items():
        nnx.replace_by_pure_dict(tree, restored[k])
    model = nnx.merge(graphdef, abs_params, abs_buffers, rest)
    source = {"kind": "workdir", "path": str(path), "step": step, "weights": weights, "ema_decay": decay}
    log.info("checkpoint %s step %d (%s weights)", path, step, weights)
    return config, (model, mesh, rules), source


def _load_converted(path: Path, overrides, devices):
    from hallojax import registry
    from hallojax.checkpoint import load_pretrained, read_config
    from hallojax.config import apply_overrides

    cfg, meta = read_config(path)
    kind = registry.kind_of(cfg)
    if kind != "wan-dit":
        raise CheckpointError(f"--checkpoint {path} holds a {kind} model, not a DiT (give it as --codec / "
                              "--audio-features / --text-encoder where it belongs)")
    config = ml_collections.ConfigDict({
        "preset": meta.get("source", {}).get("name", path.name), "model": cfg.to_dict(),
        "mesh": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}, "rules": [list(r) for r in DEFAULT_RULES],
        "data": dict(meta.get("generation", {})), "sample": dict(meta.get("sample", {}))})
    _check_overrides(config, overrides)
    apply_overrides(config, overrides)
    numeric = {k: config.model[k] for k in DiTConfig.NUMERIC_FIELDS if config.model[k] != getattr(cfg, k)}
    mesh = _mesh_for(config, devices)
    rules = normalize_rules(config.rules)
    model, cfg = load_pretrained(path, mesh=mesh, rules=rules, **numeric)
    return config, (model, mesh, rules), {"kind": "converted", "path": str(path)}


def load_text_encoder(text_encoder, tokenizer, text_dim: int):
    """(T5Encoder, tokenizer) from a converted T5 / umT5 directory and its tokenizer directory, or None."""
    if not (text_encoder or tokenizer):
        return None
    if not (text_encoder and tokenizer):
        raise ValueError("--text-encoder and --tokenizer go together (a converted umT5 directory and its "
                         "local tokenizer directory)")
    from hallojax.checkpoint import load_pretrained
    from hallojax.models.encoders.t5 import T5Encoder, load_tokenizer

    enc, enc_cfg = load_pretrained(text_encoder)
    if not isinstance(enc, T5Encoder):
        raise ValueError(f"--text-encoder {text_encoder} holds a {type(enc).__name__}, not a T5/umT5 encoder")
    if enc_cfg.dim != text_dim:
        raise ValueError(f"--text-encoder {text_encoder}: width {enc_cfg.dim} != the model's text_dim {text_dim}")
    return enc, load_tokenizer(tokenizer)


# --- what the model was trained on ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MediaSpec:
    """The codec, audio features, frame rate, clip length and size the model was trained with."""

    codec: str
    audio_features: str | None
    fps: float
    clip_frames: int
    height: int
    width: int
    face_scale: float = 3.0
    box_scale: float = 1.6


def media_spec(config, *, codec=None, audio_features=None, fps=None, height=None, width=None) -> MediaSpec:
    """Flags first, then what the run recorded (`config.data.media`, written by the trainer from its
    prepared set's manifest), then that manifest if it still exists, then the run's data settings."""
    data = config.get("data", {}) or {}
    media = dict(data.get("media", {}) or {})
    prepared = data.get("prepared") or ""
    if not media and prepared and (Path(prepared) / "manifest.json").exists():
        try:
            manifest = json.loads((Path(prepared) / "manifest.json").read_text())
            clip = manifest["config"]["clip"]
            media = dict(codec=manifest["codec"]["spec"], audio_features=manifest["config"].get("audio_features"),
                         fps=clip["fps"], frames=clip["num_frames"], height=clip["height"], width=clip["width"],
                         box_scale=clip["box_scale"])
        except (ValueError, KeyError, TypeError):
            media = {}
    codec = codec or media.get("codec") or data.get("codec")
    if not codec:
        raise ValueError("the checkpoint records no codec: pass --codec (pixel:P, or KIND:DIR for a VAE directory "
                         "from `hallojax convert KIND`, KIND one of wan-vae, sd-vae, hunyuan-vae, cogvideox-vae)")
    feats = audio_features or media.get("audio_features") or data.get("audio_features")
    size = data.get("size")
    return MediaSpec(
        codec=codec, audio_features=feats or None, fps=float(fps or media.get("fps") or data.get("fps") or 25.0),
        clip_frames=int(media.get("frames") or data.get("frames") or 81),
        height=int(height or media.get("height") or size or 480), width=int(width or media.get("width") or size or 832),
        face_scale=float(data.get("face_scale", 3.0)), box_scale=float(media.get("box_scale", 1.6)))


# --- inputs --------------------------------------------------------------------------------------
def _face_box_from_sidecar(image_path: Path):
    from data_pipeline.clips import SkipVideo, read_face_box

    try:
        return read_face_box(image_path)
    except SkipVideo as e:
        raise MediaError(f"image {image_path}: {e.reason}") from None


def detect_face(rgb: np.ndarray):
    """The largest frontal face (x0, y0, x1, y1) by OpenCV's bundled Haar cascade, or None."""
    try:
        import cv2
    except ImportError:
        return None
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
    if cascade.empty():
        return None
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    side = min(gray.shape)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(max(16, side // 10),) * 2)
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return [float(x), float(y), float(x + w), float(y + h)]


def parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"--face-box {text!r}: expected x0,y0,x1,y1 with x1 > x0 and y1 > y0 (pixels)")
    return box


@dataclasses.dataclass
class Portrait:
    frame: np.ndarray  # uint8 [H, W, 3], cropped and resized to the model's size
    box: list[float] | None  # the face box in those pixels (None: no face found; centre crop)
    source_box: list[float] | None
    box_from: str  # argument | sidecar | detector | none


def prepare_portrait(image: np.ndarray, width: int, height: int, *, box=None, box_from="argument",
                     box_scale: float = 1.6, where: str = "image") -> Portrait:
    """The data pipeline's crop (`crop_region`: the face box enlarged by `box_scale`, the output's aspect,
    moved into the frame) and resize (`crop_resize`), and the face box in output pixels."""
    from data_pipeline.clips import crop_region, crop_resize

    h0, w0 = image.shape[:2]
    if box is not None:
        x0, y0, x1, y1 = box
        if x1 <= 0 or y1 <= 0 or x0 >= w0 or y0 >= h0:
            raise MediaError(f"{where}: face box {list(box)} lies outside the {w0}x{h0} image")
    region = crop_region(w0, h0, width, height, box, box_scale)
    frame = crop_resize(image, region, width, height)
    out_box = None
    if box is not None:
        rx, ry, rw, rh = region
        sx, sy = width / rw, height / rh
        out_box = [float(np.clip((box[0] - rx) * sx, 0, width)), float(np.clip((box[1] - ry) * sy, 0, height)),
                   float(np.clip((box[2] - rx) * sx, 0, width)), float(np.clip((box[3] - ry) * sy, 0, height))]
    return Portrait(frame, out_box, list(box) if box is not None else None, box_from if box is not None else "none")


def to_model_range(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) / 127.5 - 1.0


def to_uint8(video) -> np.ndarray:
    return np.clip((np.asarray(video, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


# --- the result ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [S, C]: the input speech, for muxing
    audio_rate: int
    fps: float
    plan: long_video.Plan
    settings: dict
    timings: dict
    warnings: list
    portrait: Portrait
    latents: list = dataclasses.field(default_factory=list)  # final latents per clip (or the whole sequence)

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


def run_timings(t_start: float, video_s: float, t_encode, t_compile, t_denoise, t_decode) -> dict:
    """The sidecar's timings (seconds), logged."""
    total = time.perf_counter() - t_start
    log.info("encode %.2f s, compile %.2f s, denoise %.2f s, decode %.2f s: %.2f s for %.2f s of video "
             "(%.2f s per second)", t_encode, t_compile, t_denoise, t_decode, total, video_s, total / video_s)
    return {"encode_s": t_encode, "compile_s": t_compile, "denoise_s": t_denoise, "decode_s": t_decode,
            "total_s": total, "video_s": video_s, "seconds_per_video_second": total / video_s}


# --- the pipeline --------------------------------------------------------------------------------
COND_OF = {"context": "text", "audio": "audio", "reference": "ref", "reference_cache": "ref"}


def combine_branches(out: jax.Array, weights: jax.Array, channels: int) -> jax.Array:
    """Guidance branches' outputs [branches, B, ..., C or 2C] combined with their weights [branches]. A learned
    variance is not extrapolated: the prediction half is guided, the variance half is that of the branch with the
    most conditions (the last; DiT's forward_with_cfg keeps the conditional half's)."""
    if out.shape[-1] == channels:
        return jnp.tensordot(weights, out, axes=1)
    return jnp.concatenate([jnp.tensordot(weights, out[..., :channels], axes=1), out[-1, ..., channels:]], axis=-1)


class SamplingEngine:
    """The model's side of generation: its sharded weights, the jitted sampling programs (one per kind,
    sampler, guidance and step count; jit caches shapes) and the reference-network cache. Pipelines and
    `hallojax bench sample` drive it; nothing here touches media."""

    def __init__(self, model: WanDiT, mesh, rules):
        self.model, self.cfg, self.mesh, self.rules = model, model.cfg, mesh, rules
        self.graphdef, self.state = nnx.split(model)
        self.masked_input = self.cfg.in_channels == 2 * self.cfg.out_channels + 4
        self._programs: dict = {}
        self._bar = None

    def set_weights(self, model: WanDiT) -> None:
        """Swap in another checkpoint's weights of the same model (compiled programs are reused)."""
        graphdef, self.state = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("set_weights: a model of another structure; load a new pipeline instead")
        self.model = model

    def _tick(self):
        if self._bar is not None:
            self._bar.update(1)

    def guided(self, state, x, t, i, full: dict, null: dict, live_drops, weights_live, masked=None, negative=None):
        """One batched model call over the live branches, combined with their weights: [B, ...] float32.
        The model is merged here, inside the loops that call it (an NNX module must be built at the trace
        level of the transform that uses it)."""
        model = nnx.merge(self.graphdef, jax.tree.map(lambda a: a, state))  # fresh variables at this level
        nb, b = len(live_drops), x.shape[0]
        xin = x
        if masked is not None:
            from hallojax.conditioning import inpainting_input

            xin = inpainting_input(x, *masked)
        xb = jnp.concatenate([xin] * nb, axis=0)
        kw = {}
        for k, v in full.items():
            cond = COND_OF.get(k)
            nk = null[k] * negative[i] if k == "context" and negative is not None else null.get(k)
            parts = [nk if cond in drops else v for drops in live_drops]
            if k == "reference_cache":
                kw[k] = ReferenceCache(jnp.concatenate(parts, axis=1))
            else:
                kw[k] = jnp.concatenate(parts, axis=0)
        ctx = kw.pop("context")
        out = model(xb, jnp.full((nb * b,), t, jnp.float32), ctx, **kw).astype(jnp.float32)
        return combine_branches(out.reshape(nb, b, *out.shape[1:]), weights_live[i], self.cfg.out_channels)

    def program(self, kind: str, sampler, guidance, steps: int, progress: bool):
        key = (kind, sampler.name, guidance.spec, steps, progress)
        if key in self._programs:
            return self._programs[key]
        phases = guidance.phases(steps)
        drops = guidance.branches()
        on_step = self._tick if progress else None
        masked_model = self.masked_input
        prediction = self.cfg.prediction
        out_c = self.cfg.output_channels  # the model output's channels (2C with a learned variance)

        def weights_for(weights, live):
            return weights[:, jnp.array(live)]

        if kind == "clip":
            def program(state, x, full, null, known, arrays, weights):
                known = Known(*known)
                masked = None
                if "y_mask" in arrays:  # known_frames="condition": the mask channels and masked-clip latents
                    masked = (arrays["y_mask"], arrays["y_latents"])
                elif masked_model:
                    m = known.mask.astype(jnp.float32)
                    masked = (jnp.broadcast_to(m, (*x.shape[:4], 4)), known.latents * m)
                neg = arrays.get("negative")
                dens = [lambda x, t, i, live=live: self.guided(state, x, t, i, full, null, [drops[k] for k in live],
                                                              weights_for(weights, live), masked, neg)
                        for _, _, live in phases]
                return sample(dens, x, arrays, sampler, prediction, phases=[(a, b) for a, b, _ in phases],
                              known=known, on_step=on_step, key=arrays.get("key"))
        else:  # overlap windows over the whole sequence
            def program(state, x, full, null, known, arrays, weights, window):
                known = Known(*known)
                starts, audio_w, blend = window["starts"], window.get("audio"), window["blend"]
                f = blend.shape[1]

                def make(live):
                    def denoise(x, t, i):
                        def one(acc, w):
                            a, wt = w["start"], w["blend"]
                            xw = jax.lax.dynamic_slice_in_dim(x, a, f, axis=1)
                            fw = dict(full)
                            if audio_w is not None:
                                fw["audio"] = w["audio"]
                            masked = None
                            if "y_mask" in arrays:  # condition mode: every window starts from the portrait, as
                                masked = (arrays["y_mask"], arrays["y_latents"])  # the released long-video CFG
                            elif masked_model:
                                m = jax.lax.dynamic_slice_in_dim(known.mask, a, f, axis=1).astype(jnp.float32)
                                lat = jax.lax.dynamic_slice_in_dim(known.latents, a, f, axis=1)
                                masked = (jnp.broadcast_to(m, (*xw.shape[:4], 4)), lat * m)
                            out = self.guided(state, xw, t, i, fw, null, [drops[k] for k in live],
                                               weights_for(weights, live), masked, arrays.get("negative"))
                            cur = jax.lax.dynamic_slice_in_dim(acc, a, f, axis=1)
                            acc = jax.lax.dynamic_update_slice_in_dim(acc, cur + wt[None, :, None, None, None] * out,
                                                                      a, axis=1)
                            return acc, None

                        xs = {"start": starts, "blend": blend}
                        if audio_w is not None:
                            xs["audio"] = audio_w
                        acc, _ = jax.lax.scan(one, jnp.zeros((*x.shape[:-1], out_c), jnp.float32), xs)
                        return acc
                    return denoise

                dens = [make(live) for _, _, live in phases]
                return sample(dens, x, arrays, sampler, prediction, phases=[(a, b) for a, b, _ in phases],
                              known=known, on_step=on_step, key=arrays.get("key"))

        fn = jax.jit(program)
        self._programs[key] = fn
        return fn

    def reference_caches(self, ref_latent, need_null: bool):
        """Hallo3's reference network, once per video: the portrait's cache and (if a branch drops the
        reference) the null reference's."""
        encode = self._programs.get("encode_reference")
        if encode is None:
            graphdef = self.graphdef
            encode = self._programs["encode_reference"] = jax.jit(
                lambda state, r: nnx.merge(graphdef, state).encode_reference(r).features)
        full = encode(self.state, ref_latent)
        return full, (encode(self.state, jnp.zeros_like(ref_latent)) if need_null else jnp.zeros_like(full))

    def on_mesh(self):
        """The model's mesh and rules, for the model's programs only (codecs and encoders run on their own
        devices, outside it)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(use_rules(self.rules))
        return stack

    def compile(self, fn, *args):
        t0 = time.perf_counter()
        with self.on_mesh():
            compiled = fn.lower(*args).compile()
        return compiled, time.perf_counter() - t0

    def run(self, compiled, args, *, steps: int, desc: str, progress: bool):
        """Execute a compiled program on the mesh with a step progress bar: (result, seconds)."""
        from tqdm import tqdm

        self._bar = tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not progress, dynamic_ncols=True)
        try:
            t0 = time.perf_counter()
            with self.on_mesh():
                out = jax.block_until_ready(compiled(*args))
            return out, time.perf_counter() - t0
        finally:
            self._bar.close()
            self._bar = None


@dataclasses.dataclass
class _Job:
    """One `generate` call's prepared inputs, for the clip loop of its strategy."""

    plan: long_video.Plan
    portrait: np.ndarray  # uint8 [H, W, 3]
    key: jax.Array
    lat_shape: tuple  # one clip's latents [1, F, h, w, C]
    full: dict  # model inputs with every condition
    null: dict  # the same inputs with the conditions dropped (zeros / the negative prompt)
    feats: np.ndarray | None  # audio features [1, frames, L, D] from video frame `first` on
    first: int
    arrays: dict  # the schedule's per-step arrays
    weights: jax.Array  # guidance weights [steps, branches]
    guidance: guidance_lib.Guidance
    sampler: object
    steps: int
    progress: bool
    frames: np.ndarray  # the output video, filled clip by clip
    latents: list
    bar: object
    known_frames: str = "paste"  # SampleConfig.known_frames


class WanPipeline:
    """A loaded model with its codec, audio features and (optional) text encoder; `generate` makes videos."""

    def __init__(self, loaded: Loaded, spec: MediaSpec, *, codec=None, audio_fn=None, text=None, image_encoder=None):
        from hallojax.codec import get_codec

        self.loaded, self.spec = loaded, spec
        self.model, self.cfg, self.mesh, self.rules = loaded.model, loaded.cfg, loaded.mesh, loaded.rules
        self.codec = codec or get_codec(spec.codec)
        self.audio_fn = audio_fn
        self.text = text  # (T5Encoder, tokenizer) or None
        self.image_encoder = image_encoder  # CLIPVision (I2V / Wan-Fun-InP / EchoMimicV3 image context) or None
        self.sample_defaults = SampleConfig(**{k: v for k, v in dict(loaded.config.get("sample", {})).items()
                                               if k in {f.name for f in dataclasses.fields(SampleConfig)}})
        self.engine = SamplingEngine(self.model, self.mesh, self.rules)
        self._check_model()

    # ---- loading ----
    @classmethod
    def load(cls, checkpoint, *, step=None, weights="auto", codec=None, audio_features=None, text_encoder=None,
             tokenizer=None, fps=None, height=None, width=None, overrides=(), devices=None,
             image_encoder=None) -> "WanPipeline":
        from data_pipeline.features import get_audio_features

        loaded = load_checkpoint(checkpoint, step=step, weights=weights, overrides=overrides, devices=devices)
        spec = media_spec(loaded.config, codec=codec, audio_features=audio_features, fps=fps, height=height,
                          width=width)
        audio_fn = None
        if loaded.cfg.audio != "none":
            if not spec.audio_features:
                raise ValueError("the model takes audio but the checkpoint records no audio features: pass "
                                 "--audio-features (rms, or wav2vec2:DIR)")
            audio_fn = get_audio_features(spec.audio_features)
        text = load_text_encoder(text_encoder, tokenizer, loaded.cfg.text_dim)
        clip = None
        if image_encoder:
            from hallojax.checkpoint import load_pretrained
            from hallojax.models.encoders.clip import CLIPVision

            clip, clip_cfg = load_pretrained(image_encoder)
            if not isinstance(clip, CLIPVision):
                raise ValueError(f"--image-encoder {image_encoder} holds a {type(clip).__name__}, "
                                 "not a CLIP image encoder")
            if clip_cfg.hidden_size != loaded.cfg.image_dim:
                raise ValueError(f"--image-encoder {image_encoder}: width {clip_cfg.hidden_size} != the DiT's "
                                 f"image_dim {loaded.cfg.image_dim}")
        return cls(loaded, spec, audio_fn=audio_fn, text=text, image_encoder=clip)

    def load_step(self, step: int, weights: str = "auto") -> "WanPipeline":
        """This workdir's weights at another checkpoint step (e.g. a learning curve), programs reused."""
        if self.loaded.source.get("kind") != "workdir":
            raise ValueError("load_step needs a `hallojax train` workdir checkpoint")
        loaded = load_checkpoint(self.loaded.source["path"], step=step, weights=weights,
                                 devices=list(self.mesh.devices.flat))
        self.engine.set_weights(loaded.model)
        self.loaded, self.model = loaded, loaded.model
        return self

    def _check_model(self):
        cfg, codec = self.cfg, self.codec
        if cfg.image_dim is not None and self.image_encoder is None:
            raise ValueError("this DiT takes CLIP image tokens (image_dim): give --image-encoder DIR (a `hallojax "
                             "convert clip` directory)")
        latent_c = codec.latent_channels
        if cfg.out_channels != latent_c or cfg.in_channels not in (latent_c, 2 * latent_c + 4):
            raise ValueError(f"codec {codec.name!r} has {latent_c} latent channels; the model takes "
                             f"{cfg.in_channels} in / {cfg.out_channels} out (wrong --codec for this checkpoint?)")
        if cfg.audio != "none" and cfg.audio_stride != codec.temporal_stride:
            raise ValueError(f"model.audio_stride={cfg.audio_stride} but codec {codec.name!r} has temporal "
                             f"stride {codec.temporal_stride}")

    @property
    def masked_input(self) -> bool:
        return self.engine.masked_input

    @property
    def has_ref(self) -> bool:
        c = self.cfg
        return c.identity_tokens or c.identity_additive or c.symbiotic or c.reference_net

    def conditions(self) -> set[str]:
        out = {"text"}
        if self.cfg.audio != "none":
            out.add("audio")
        if self.has_ref:
            out.add("ref")
        return out

    def audio_feature_shape(self) -> tuple[tuple[int, int], str]:
        """(layers, width) of the audio features per video frame the model takes, and the config fields named."""
        return (self.cfg.audio_in_layers, self.cfg.audio_in_dim), "model.audio_in_layers, audio_in_dim"

    # ---- inputs ----
    def _portrait(self, image, width, height, face_box, warnings) -> Portrait:
        where = f"image {image}" if isinstance(image, (str, os.PathLike)) else "image"
        if isinstance(image, (str, os.PathLike)):
            rgb = read_image(image)
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
                raise MediaError(f"image array: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
        box, src = None, "none"
        if face_box is not None:
            box, src = (parse_box(face_box) if isinstance(face_box, str) else [float(v) for v in face_box]), "argument"
        elif isinstance(image, (str, os.PathLike)) and (box := _face_box_from_sidecar(Path(image))) is not None:
            src = "sidecar"
        elif (box := detect_face(rgb)) is not None:
            src = "detector"
        if box is None:
            warnings.append(f"{where}: no face found (no --face-box, no sidecar, the detector found none): "
                            "centre crop")
            log.warning(warnings[-1])
        return prepare_portrait(rgb, width, height, box=box, box_from=src, box_scale=self.spec.box_scale,
                                where=where)

    def _speech(self, audio, fps, allow_silent):
        if isinstance(audio, (str, os.PathLike)):
            wave, rate = read_audio(audio)
            where = f"audio {audio}"
        else:
            wave, rate = audio
            wave = np.asarray(wave, np.float32)
            wave = wave[:, None] if wave.ndim == 1 else wave
            where = "audio array"
            if wave.ndim != 2 or wave.shape[0] == 0 or not rate or rate <= 0:
                raise MediaError(f"{where}: expected (float32 [S] or [S, C], rate > 0)")
        frames = round(wave.shape[0] / rate * fps)
        if frames < 1:
            raise MediaError(f"{where}: {wave.shape[0] / rate * 1000:.1f} ms of audio is shorter than one frame at "
                             f"{fps:g} fps")
        peak = float(np.abs(wave).max())
        if peak < 1e-4 and not allow_silent:
            raise MediaError(f"{where} is silent (peak {peak:.1e}, below -80 dBFS): nothing to lip-sync "
                             "(allow_silent / --allow-silent to generate anyway)")
        return wave, rate, frames

    def _audio_features(self, speech16, fps, first: int, count: int) -> np.ndarray | None:
        """Features [1, count, L, D] of video frames first..first+count-1 (silence outside the speech)."""
        if self.audio_fn is None:
            return None
        per_frame = 16000 / fps
        pre = round(-first * per_frame) if first < 0 else 0
        total = round(count * per_frame)
        wave = np.zeros(total, np.float32)
        src = speech16[max(0, round(first * per_frame)):]
        n = min(len(src), total - pre)
        wave[pre:pre + n] = src[:n]
        feats = np.asarray(self.audio_fn(wave[None], fps, count), np.float32)
        want, names = self.audio_feature_shape()
        if feats.shape[2:] != want:
            raise ValueError(f"audio features {self.spec.audio_features!r} give {feats.shape[2:]} per frame; the model "
                             f"takes {want} ({names}): wrong --audio-features?")
        return feats

    def _context(self, prompt, negative):
        cfg = self.cfg
        if prompt is None:
            if negative is not None:
                raise ValueError("--negative-prompt needs --prompt")
            z = np.zeros((1, 1, cfg.text_dim), np.float32)
            return z, z
        if self.text is None:
            raise ValueError("--prompt needs a text encoder: --text-encoder DIR (converted umT5) --tokenizer DIR")
        from hallojax.models.encoders.t5 import encode_text

        enc, tok = self.text
        ctx = np.asarray(encode_text(enc, tok, [prompt]), np.float32)
        null = np.asarray(encode_text(enc, tok, [negative]), np.float32) if negative else np.zeros_like(ctx)
        return ctx, null

    # ---- programs ----
    # ---- generate ----
    def generate(self, image, audio, *, prompt: str | None = None, negative_prompt: str | None = None,
                 sampler: str | None = None, steps: int | None = None, shift: float | None = None,
                 guidance: str | None = None, long_video_strategy: str | None = None, overlap: int | None = None,
                 clip_frames: int | None = None, height: int | None = None, width: int | None = None,
                 fps: float | None = None, seed: int = 0, face_box=None, allow_silent: bool = False,
                 progress: bool = True) -> Result:
        """Make a talking video (see the module docstring). Unset settings come from the checkpoint's
        `config.sample` (SampleConfig defaults) and the media it was trained on."""
        from tqdm import tqdm

        t_start = time.perf_counter()
        d = self.sample_defaults
        sc = dataclasses.replace(d, sampler=sampler or d.sampler, steps=d.steps if steps is None else steps,
                          shift=d.shift if shift is None else shift,
                          guidance=d.guidance if guidance is None else guidance,
                          long_video=long_video_strategy or d.long_video,
                          overlap=d.overlap if overlap is None else overlap,
                          clip_frames=d.clip_frames if clip_frames is None else clip_frames)
        sc.validate()
        cfg, codec, spec = self.cfg, self.codec, self.spec
        fps = float(fps or spec.fps)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"--fps {fps}: must be positive")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"--seed {seed!r}: must be an integer >= 0")
        height, width = int(height or spec.height), int(width or spec.width)
        unit = (codec.spatial_stride * cfg.patch_size[1], codec.spatial_stride * cfg.patch_size[2])
        if height < 1 or width < 1 or height % unit[0] or width % unit[1]:
            raise ValueError(f"--height {height} --width {width}: must be positive multiples of {unit[0]} x {unit[1]} "
                             f"(codec {codec.name!r} stride {codec.spatial_stride} x patch {cfg.patch_size[1:]})")
        s = codec.temporal_stride
        clip_len = sc.clip_frames or spec.clip_frames
        if clip_len < 1 or (clip_len - 1) % s or (1 + (clip_len - 1) // s) % cfg.patch_size[0]:
            raise ValueError(f"--clip-frames {clip_len}: must be 1 + {s}·k video frames (codec {codec.name!r}) with "
                             f"latent frames a multiple of patch {cfg.patch_size[0]}")
        f_lat = 1 + (clip_len - 1) // s

        # guidance: the model's conditions; without a prompt the text term is dropped (its branches equal)
        g = guidance_lib.parse_guidance(sc.guidance)
        g.check(self.conditions())
        if prompt is None and "text" in g.guided:
            simplified = _without(g, "text")
            log.info("no prompt: text guidance has no effect (its branches are equal); guidance %r -> %r",
                     g.spec, simplified.spec)
            g = simplified
        strategy = sc.long_video
        if strategy == "auto":
            strategy = "motion" if cfg.motion_frames else "continue" if self.masked_input else "overlap"
        if strategy == "motion" and not cfg.motion_frames:
            raise ValueError("--long-video motion needs a model with motion frames (model.motion_frames > 0)")
        if strategy in ("continue", "chunks") and not self.masked_input:
            raise ValueError(f"--long-video {strategy} needs a masked-input model (in_channels = 2C + 4); this one "
                             f"takes {cfg.in_channels}")
        if strategy == "overlap" and cfg.motion_frames:
            raise ValueError("--long-video overlap: this model needs motion frames per clip; use motion")
        warnings: list[str] = []

        # ---- inputs ----
        t0 = time.perf_counter()
        wave, rate, n_frames = self._speech(audio, fps, allow_silent)
        portrait = self._portrait(image, width, height, face_box, warnings)
        ref_video = to_model_range(portrait.frame)[None, None]  # [1, 1, H, W, 3]
        ref_latent = np.asarray(codec.encode(ref_video), np.float32)  # [1, 1, h, w, C]
        ctx, null_ctx = self._context(prompt, negative_prompt)
        overlap_lat = sc.overlap or min(max(1, f_lat // 4), f_lat - 1)  # a quarter of a clip (none for 1 frame)
        known_lat = cfg.motion_frames if strategy == "motion" else overlap_lat
        plan = long_video.plan(strategy, n_frames, clip_len, s, known_latent=known_lat,
                               overlap_latent=overlap_lat, overlap_frames=sc.overlap or s * max(1, f_lat // 4))
        speech16 = speech_16k(wave, rate)
        if sc.loudness is not None:
            speech16 = normalize_loudness(speech16, 16000, sc.loudness)
        first = min(c.start for c in plan.clips)
        last = max(c.start + clip_len for c in plan.clips)
        feats = self._audio_features(speech16, fps, first, last - first)
        h, w = ref_latent.shape[2:4]
        self.engine_shape = (height, width)
        full = {"context": ctx}
        null = {"context": null_ctx}
        if self.image_encoder is not None:  # the original portrait's CLIP tokens, in every branch and clip
            from hallojax.models.encoders.clip import encode_image

            full["image_context"] = null["image_context"] = np.asarray(encode_image(self.image_encoder, portrait.frame))
        if cfg.identity_tokens or cfg.identity_additive or cfg.symbiotic:
            full["reference"], null["reference"] = ref_latent, np.zeros_like(ref_latent)
        if cfg.audio_face_mask:
            from hallojax.conditioning import face_mask_tokens

            grid = (h // cfg.patch_size[1], w // cfg.patch_size[2])
            if portrait.box is None:
                mask = np.ones(grid, np.float32)
            else:
                mask = face_mask_tokens(tuple(portrait.box), height, width, grid, scale=spec.face_scale)
            full["face_mask"] = null["face_mask"] = np.broadcast_to(
                mask, (1, f_lat // cfg.patch_size[0], *grid)).astype(np.float32)
        sampler_obj = get_sampler(sc.sampler)
        schedule = make_schedule(sc.sampler, sc.steps, sc.shift, cfg.prediction)
        arrays = schedule_arrays(sampler_obj, schedule)
        if sc.negative_scale != 1.0 and negative_prompt is not None:
            arrays["negative"] = sc.negative_multipliers()
        weights = jnp.asarray(g.weights(sc.steps), jnp.float32)
        if cfg.reference_net:
            need_null = any("ref" in d for d in g.branches())
            with self.engine.on_mesh():
                full["reference_cache"], null["reference_cache"] = self.engine.reference_caches(
                    jnp.asarray(ref_latent), need_null)
        t_encode = time.perf_counter() - t0
        log.info("%s", plan.describe())
        log.info("%s; sampler %s, %d steps, shift %g; %dx%d at %g fps, %d frames (%.2f s)", g.describe(sc.steps),
                 sc.sampler, sc.steps, sc.shift, width, height, fps, n_frames, n_frames / fps)
        key = jax.random.key(seed)
        lat_shape = (1, f_lat, h, w, cfg.out_channels)
        t_denoise = t_decode = t_compile = 0.0
        frames = np.zeros((n_frames, height, width, 3), np.uint8)
        latents_out = []
        clip_bar = tqdm(total=len(plan.clips), desc="clips", unit="clip", disable=not progress,
                        dynamic_ncols=True)
        if sc.known_frames == "condition" and not self.masked_input:
            raise ValueError("sample.known_frames='condition' needs a masked-input model (in_channels = 2C + 4)")
        if strategy == "chunks" and sc.known_frames != "condition":
            raise ValueError("--long-video chunks shows its overlap frames through the mask channels only: it needs "
                             "sample.known_frames='condition' (--config.sample.known_frames=condition)")
        job = _Job(plan, portrait.frame, key, lat_shape, full, null, feats, first, arrays, weights, g, sampler_obj,
                   sc.steps, progress, frames, latents_out, clip_bar, sc.known_frames)
        try:
            run = self._run_overlap if strategy == "overlap" else self._run_clips
            t_compile, t_denoise, t_decode = run(job)
        finally:
            clip_bar.close()
        timings = run_timings(t_start, n_frames / fps, t_encode, t_compile, t_denoise, t_decode)
        settings = {"checkpoint": self.loaded.source, "codec": codec.name, "audio_features": spec.audio_features,
                    "sampler": sc.sampler, "steps": sc.steps, "shift": sc.shift, "guidance": g.spec,
                    "known_frames": sc.known_frames, "negative_scale": sc.negative_scale,
                    "negative_steps": sc.negative_steps, "loudness": sc.loudness,
                    "image_context": self.image_encoder is not None,
                    "guidance_requested": sc.guidance, "long_video": strategy, "overlap": plan.overlap,
                    "clip_frames": clip_len, "clips": len(plan.clips), "height": height, "width": width,
                    "fps": fps, "frames": n_frames, "seed": seed, "prompt": prompt, "negative_prompt": negative_prompt,
                    **self.run_settings(portrait, rate, wave)}
        return Result(frames, wave, rate, fps, plan, settings, timings, warnings, portrait, latents_out)

    def run_settings(self, portrait: Portrait, rate: int, wave: np.ndarray) -> dict:
        """The sidecar's settings every model shares: the face box, the speech, the devices."""
        return {"face_box": portrait.source_box, "face_box_from": portrait.box_from, "face_box_output": portrait.box,
                "audio_rate": rate, "audio_channels": int(wave.shape[1]), "mesh": dict(self.mesh.shape),
                "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}

    def _encode_frames(self, frames_uint8: np.ndarray) -> np.ndarray:
        return np.asarray(self.codec.encode(to_model_range(frames_uint8)[None]), np.float32)

    def _condition_inputs(self, known_uint8: np.ndarray | None, clip_frames: int) -> dict:
        """The mask channels [1, F, h, w, 4] (1 = known) and the masked clip's latents [1, F, h, w, C] as the
        released Wan-Fun-InP pipeline builds them: the clip with its known frames and mid-grey (0) elsewhere,
        encoded whole by the codec; the pixel mask's first frame repeated stride times, regrouped per latent frame."""
        from hallojax.conditioning import latent_mask, masked_video, pixel_mask

        h, w = self.engine_shape
        known = 0 if known_uint8 is None else len(known_uint8)
        video = np.zeros((clip_frames, h, w, 3), np.float32)
        if known:
            video[:known] = to_model_range(known_uint8)
        pm = pixel_mask("continuation", clip_frames, h, w, known_frames=known) if known else \
            pixel_mask("t2v", clip_frames, h, w)
        lat = np.asarray(self.codec.encode(masked_video(video, pm)[None]), np.float32)
        ym = latent_mask(pm, temporal_stride=self.codec.temporal_stride, spatial_stride=self.codec.spatial_stride)
        return {"y_mask": ym[None], "y_latents": lat}

    def _run_clips(self, job: "_Job"):
        """motion / continue: clip after clip, each from the previous clip's last frames (one compiled program)."""
        plan, lat_shape, steps = job.plan, job.lat_shape, job.steps
        s = plan.stride
        fn = self.engine.program("clip", job.sampler, job.guidance, steps, job.progress)
        compiled, t_compile = None, 0.0
        t_denoise = t_decode = 0.0
        prev_frames = None  # uint8 video frames of the previous clip
        for k, clip in enumerate(plan.clips):
            kx, kn = jax.random.split(jax.random.fold_in(job.key, k))
            x = jax.random.normal(kx, lat_shape, jnp.float32)
            known_noise = jax.random.normal(kn, lat_shape, jnp.float32)
            known_lat = np.zeros(lat_shape, np.float32)
            n_known = long_video.latent_count(clip.known, s) if clip.known else 0
            if clip.known:
                # motion: clip 0's motion frames are the portrait repeated; continue: clip 0 knows the portrait
                # as its frame 0; every later clip knows the previous clip's last frames
                src = (np.repeat(job.portrait[None], clip.known, axis=0) if prev_frames is None
                       else prev_frames[-clip.known:])
                if job.known_frames == "paste":
                    known_lat[:, :n_known] = self._encode_frames(src)
            mask = np.zeros((1, lat_shape[1], 1, 1, 1), bool)
            mask[:, :n_known] = True
            arrays = job.arrays
            if getattr(job.sampler, "stochastic", False):  # the per-step noise of DDPM / CogVideoX DPM
                arrays = {**arrays, "key": jax.random.fold_in(jax.random.fold_in(job.key, k), 1)}
            if job.known_frames == "condition":  # as Wan-Fun-InP / EchoMimicV3: the masked clip, VAE-encoded
                arrays = {**arrays, **self._condition_inputs(src if clip.known else None, plan.clip_frames)}
                mask[:] = False  # nothing pasted into x
            cf, cn = dict(job.full), dict(job.null)
            if job.feats is not None:
                a = clip.start - job.first
                cf["audio"] = job.feats[:, a:a + plan.clip_frames]
                cn["audio"] = np.zeros_like(cf["audio"])
            if self.cfg.motion_frames:
                cf["motion"] = cn["motion"] = known_lat[:, :self.cfg.motion_frames]
            args = (self.engine.state, x, cf, cn, (known_lat, mask, known_noise), arrays, job.weights)
            if compiled is None:
                compiled, t_compile = self.engine.compile(fn, *args)
            lat, dt = self.engine.run(compiled, args, steps=steps, desc=f"clip {k + 1}/{len(plan.clips)}",
                                      progress=job.progress)
            t_denoise += dt
            t0 = time.perf_counter()
            lat = np.asarray(lat)
            job.latents.append(lat)
            video = to_uint8(self.codec.decode(lat))[0]  # [T, H, W, 3]
            a, b = clip.emit
            job.frames[a:b] = video[a - clip.start:b - clip.start]
            if plan.strategy == "chunks" and k:  # the overlap frames cross-faded in pixels, old to new
                m = min(clip.known, b - a)
                r = np.linspace(0, 1, clip.known, dtype=np.float32)[:m, None, None, None]
                old = prev_frames[len(prev_frames) - clip.known:][:m].astype(np.float32)
                job.frames[a:a + m] = np.round(old * (1 - r) + video[:m].astype(np.float32) * r).astype(np.uint8)
            prev_frames = video
            t_decode += time.perf_counter() - t0
            job.bar.update(1)
        return t_compile, t_denoise, t_decode

    def _run_overlap(self, job: "_Job"):
        """overlap: every window at every step, blended, in one program over the whole latent sequence."""
        plan, steps = job.plan, job.steps
        total = plan.total_latent
        kx, kn = jax.random.split(job.key)
        shape = (1, total, *job.lat_shape[2:])
        x = jax.random.normal(kx, shape, jnp.float32)
        known_lat = np.zeros(shape, np.float32)
        mask = np.zeros((1, total, 1, 1, 1), bool)
        arrays = job.arrays
        if getattr(job.sampler, "stochastic", False):
            arrays = {**arrays, "key": jax.random.fold_in(job.key, 1)}
        if job.known_frames == "condition":
            arrays = {**arrays, **self._condition_inputs(job.portrait[None], plan.clip_frames)}
        elif self.masked_input:  # image-to-video: frame 0 is the portrait
            known_lat[:, :1] = self._encode_frames(job.portrait[None])
            mask[:, :1] = True
        window = {"starts": np.array([c.start // plan.stride for c in plan.clips], np.int32),
                  "blend": long_video.window_weights(plan)}
        cf, cn = dict(job.full), dict(job.null)
        if job.feats is not None:
            window["audio"] = np.stack([job.feats[:, c.start - job.first:c.start - job.first + plan.clip_frames]
                                        for c in plan.clips])
            cn["audio"] = np.zeros_like(window["audio"][0])
            cf["audio"] = cn["audio"]  # placeholder: each window's own audio replaces it
        fn = self.engine.program("overlap", job.sampler, job.guidance, steps, job.progress)
        args = (self.engine.state, x, cf, cn, (known_lat, mask, jax.random.normal(kn, shape, jnp.float32)), arrays,
                job.weights, window)
        compiled, t_compile = self.engine.compile(fn, *args)
        lat, t_denoise = self.engine.run(compiled, args, steps=steps, desc=f"{len(plan.clips)} windows",
                                         progress=job.progress)
        lat = np.asarray(lat)
        t0 = time.perf_counter()
        job.latents.append(lat)
        video = to_uint8(self.codec.decode(lat))[0]
        n = min(len(job.frames), len(video))
        job.frames[:n] = video[:n]
        job.bar.update(len(plan.clips))
        return t_compile, t_denoise, time.perf_counter() - t0

    # ---- output ----
    def save(self, result: Result, out) -> Path:
        """OUT.mp4 (h264 yuv420p + AAC, the input speech) and OUT.json (settings, seed, timings), each written
        under a temporary name and renamed."""
        out = Path(out)
        if out.suffix.lower() != ".mp4":
            raise ValueError(f"--out {out}: the output is an mp4 file (name it .mp4)")
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_mp4(out, result.frames, result.audio, result.fps, result.audio_rate, threads=0)
        result.timings["mux_s"] = time.perf_counter() - t0
        info = {"output": str(out), "settings": result.settings, "timings": result.timings,
                "plan": result.plan.describe().splitlines(), "warnings": result.warnings}
        write_json(out.with_suffix(".json"), info, default=str)
        return out


def _without(g: guidance_lib.Guidance, cond: str) -> guidance_lib.Guidance:
    """The same guidance with `cond` removed from every term (terms left empty are dropped): exact when the
    branches with and without `cond` are equal."""
    terms = [(c - {cond}, s) for c, s in g.terms if c - {cond}]
    spec = ",".join("+".join(sorted(c)) + "=" + s.text for c, s in terms) or "none"
    return guidance_lib.Guidance(tuple(terms), spec)

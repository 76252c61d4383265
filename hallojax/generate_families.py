"""`hallojax generate` for the VP model families: Hallo3 (CogVideoX, v-prediction) and LetsTalk (factorized DiT,
DDPM ε + learned variance, memory bank), from a converted directory of either kind.

    hallojax generate --checkpoint hallo3_dir --image p.png --audio s.wav --face-embedding emb.npy --out t.mp4
    hallojax generate --checkpoint letstalk_dir --image p.png --audio s.wav --out t.mp4

`generate.Pipeline.load` hands such a directory to `FamilyPipeline`, which keeps the Wan pipeline's media steps
(portrait crop, speech, audio features, mp4 + JSON sidecar) and the shared samplers and guidance, and asks the
model's `Family` adapter for the rest:
- recipe: the default sampling settings (config.json's "sample" section overrides them, then the flags);
- once per video: Hallo3's reference bank (the reference net at t = 0 on the face-masked portrait's latent) and
  face embedding; LetsTalk's portrait latent;
- per clip: the inputs with every condition and the guidance's dropped versions (zeros), e.g. Hallo3's 16
  conditioning channels (the latent of [portrait, motion₁, motion₂], motion frames pixel-masked at rate 0.1,
  then zero latent frames) and LetsTalk's memory bank (the last M latent frames of the previous clip; the first
  clip: M copies of the portrait latent);
- the denoiser call: the live guidance branches stacked on the batch axis, one model call per step, combined
  on the prediction (on x̂0 as released: the same, x̂0 being affine in the output with a shared skip term).

Clips follow `long_video.plan("motion", motion_video_frames=m)`: Hallo3 carries its 2 motion frames (a clip of
T frames gives T − 2 new ones; the decoded motion frames are not re-emitted), LetsTalk 0 (clips of T frames
end to end, the memory bank outside the clip). Each clip starts from fresh noise; the stochastic samplers
draw their per-step noise from (seed, clip). Sharding as the Wan pipeline's: parameters by their logical
axes on the checkpoint's mesh over the devices present; guidance branches on the batch axis.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hallojax import pipeline as gen
from hallojax.checkpoint import CheckpointError
from hallojax.media import speech_16k
from hallojax.nn.audio import window_features
from hallojax.sample import guidance as guidance_lib
from hallojax.sample import long_video
from hallojax.sample.schedules import make_schedule
from hallojax.sample.solvers import get_sampler, sample, schedule_arrays


# --- the family adapters ---------------------------------------------------------------------------
class Family:
    """What generation needs to know about a model family (class attributes) and how to feed it."""

    kind: str
    prediction: str  # the sampler's reading of the (first C channels of the) output
    conditions: frozenset  # the conditions guidance may drop
    cond_of: dict  # input name -> the condition it carries (replaced by the null input where dropped)
    batch_free: tuple = ()  # inputs the model broadcasts over the batch (not stacked per branch)
    recipe: dict  # SampleConfig fields: the released sampling recipe
    media: dict  # the released media: fps, frames (per clip), height, width

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def channels(self) -> int:  # latent channels of x
        raise NotImplementedError

    def motion_frames(self) -> int:
        raise NotImplementedError

    def feature_shape(self) -> tuple[tuple[int, int], str]:
        raise NotImplementedError

    def check(self, pipe: "FamilyPipeline") -> None:
        codec = pipe.codec
        if codec.latent_channels != self.channels:
            raise ValueError(f"codec {codec.name!r} has {codec.latent_channels} latent channels; this {self.kind} "
                             f"model takes {self.channels} (wrong --codec for this checkpoint?)")


class Hallo3Family(Family):
    """Hallo3 (hallojax.models.hallo3): v-prediction, DPM-Solver++(2M) SDE 50 steps, CFG 3.5 with zero text and
    zero audio as the unconditional branch (face, conditioning latent and reference bank shared), clips of 49
    frames with 2 motion frames. Facts: shared/research/hallo3.md §1.4-1.7, §3."""

    kind = "hallo3"
    prediction = "v"
    conditions = frozenset({"text", "audio"})
    cond_of = {"context": "text", "audio": "audio"}
    batch_free = ("bank",)
    recipe = dict(sampler="cogvideox-dpm", steps=50, shift=1.0, guidance="hallo3", long_video="motion")
    media = dict(fps=25.0, frames=49, height=480, width=720)
    MOTION = 2  # pixel motion frames (`n_motion_frame`)
    MASK_RATE = 0.1  # `add_mask_to_first_frame` at inference: motion pixels with u <= 0.1 zeroed
    FACE_EXPAND = 1.2  # the reference net's face rectangle: the face box grown x1.2 about its centre

    @property
    def channels(self) -> int:
        return self.cfg.out_channels

    def motion_frames(self) -> int:
        return self.MOTION

    def feature_shape(self):
        return (self.cfg.audio_layers, self.cfg.audio_in_dim), "model.audio_layers, audio_in_dim"

    def check(self, pipe):
        super().check(pipe)
        if pipe.codec.temporal_stride != 4:
            raise ValueError(f"codec {pipe.codec.name!r} has temporal stride {pipe.codec.temporal_stride}; Hallo3's "
                             "audio projector groups 4 video frames per latent frame (a CogVideoX VAE)")

    def face(self, face_embedding) -> np.ndarray:
        """[1, face_in] float32 from a path (.npy) or an array; clear errors for a missing or wrong input."""
        want = self.cfg.face_in
        if face_embedding is None:
            raise ValueError(f"Hallo3 needs --face-embedding EMB.npy: the portrait's InsightFace identity embedding "
                             f"({want} values, `face.embedding` of insightface's FaceAnalysis; see README, Hallo3)")
        where = "--face-embedding"
        if isinstance(face_embedding, (str, os.PathLike)):
            where = f"--face-embedding {face_embedding}"
            try:
                face_embedding = np.load(face_embedding, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}: not a readable .npy array ({e})") from None
        emb = np.asarray(face_embedding)
        if emb.shape not in ((want,), (1, want)) or not np.issubdtype(emb.dtype, np.number):
            raise ValueError(f"{where}: shape {emb.shape} ({emb.dtype}); expected {want} numbers ([{want}] or "
                             f"[1, {want}]: InsightFace's raw embedding)")
        emb = emb.astype(np.float32).reshape(1, want)
        if not np.all(np.isfinite(emb)):
            raise ValueError(f"{where}: holds non-finite values")
        return emb

    def per_video(self, pipe, job) -> dict:
        """The face embedding and the reference bank of the face-masked portrait (the reference net, once)."""
        frame = job.portrait.frame
        masked = frame.copy()
        if job.portrait.box is not None:  # the rectangle applied to the image's pixels (black outside)
            x0, y0, x1, y1 = job.portrait.box
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            hw, hh = (x1 - x0) * self.FACE_EXPAND / 2, (y1 - y0) * self.FACE_EXPAND / 2
            h, w = frame.shape[:2]
            keep = np.zeros((h, w), bool)
            keep[max(0, math.floor(cy - hh)):min(h, math.ceil(cy + hh)), max(0, math.floor(cx - hw)):
                 min(w, math.ceil(cx + hw))] = True
            masked[~keep] = 0
        ref = np.asarray(pipe.codec.encode(gen.to_model_range(masked)[None, None]), np.float32)
        bank = pipe.engine.reference_bank(jnp.asarray(ref))
        windows = np.asarray(window_features(jnp.asarray(job.feats), self.cfg.audio_window))  # over the whole track
        return {"face": self.face(job.face_embedding), "bank": bank, "windows": windows}

    def clip_inputs(self, pipe, job, k, clip, prev_frames, prev_latents):
        m = self.MOTION
        portrait = gen.to_model_range(job.portrait.frame)[None]
        motion = np.repeat(portrait, m, axis=0) if prev_frames is None else prev_frames[-m:]
        pix = np.concatenate([portrait, motion]).astype(np.float32)  # [1 + m, H, W, 3] in [-1, 1]
        u = np.random.default_rng([job.seed, k]).uniform(size=pix.shape[1:3])
        pix[1:, u <= self.MASK_RATE] = 0.0  # one spatial mask for both motion frames and all channels
        lat = np.asarray(pipe.codec.encode(pix[None]), np.float32)
        if lat.shape[1] != 1:
            raise ValueError(f"codec {pipe.codec.name!r} encodes Hallo3's {1 + m} conditioning frames to "
                             f"{lat.shape[1]} latent frames; Hallo3 takes 1 (a CogVideoX VAE: 3 -> 2 -> 1)")
        cond = np.zeros(job.lat_shape, np.float32)
        cond[:, :1] = lat
        # the clip's audio windows (built over the whole track, as released): the m frames before its new frames
        # lead (zeros before the video), clamped at the end
        windows = job.once["windows"]
        idx = np.arange(clip.start, clip.start + job.plan.clip_frames)
        audio = windows[:, np.clip(idx, 0, windows.shape[1] - 1)] * (idx >= 0)[None, :, None, None, None]
        full = {"context": job.context, "face": job.once["face"], "bank": job.once["bank"], "cond": cond,
                "audio": audio}
        null = {"context": job.null_context, "audio": np.zeros_like(audio)}
        return full, null

    def __call__(self, model, x, t, inputs):
        xin = jnp.concatenate([x, inputs["cond"].astype(x.dtype)], axis=-1)
        return model(xin, t, inputs["context"], face=inputs["face"], audio=inputs["audio"], bank=inputs["bank"])


class LetsTalkFamily(Family):
    """LetsTalk (hallojax.models.letstalk): ε-prediction with learned-range variance, respaced ancestral DDPM
    (250 steps as released, `--sampler ddim` the option), no CFG (cfg_scale 1), clips of `num_frames` frames end
    to end with the memory bank. Facts: shared/research/hyavatar_letstalk.md C.3, C.5, C.6. A model trained with
    flow matching (model.prediction="flow": configs/letstalk.py:lipsync-small) samples as a flow model
    (UniPC, 25 steps, shift 3, unless its config's sample section says otherwise)."""

    kind = "letstalk"
    conditions = frozenset({"audio", "ref"})
    cond_of = {"audio": "audio", "reference": "ref"}
    recipe = dict(sampler="ddpm", steps=250, shift=1.0, guidance="none", long_video="motion")
    media = dict(fps=25.0, frames=16, height=256, width=256)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.media = {**self.media, "frames": cfg.num_frames}
        self.prediction = cfg.prediction  # "epsilon" as released; "flow" (the lipsync-small recipe) samples as flow
        if cfg.prediction == "flow":  # the Wan recipe's sampling
            self.recipe = {**self.recipe, "sampler": "unipc", "steps": 25, "shift": 3.0}

    @property
    def channels(self) -> int:
        return self.cfg.in_channels

    def motion_frames(self) -> int:
        return 0  # the memory bank lies before the clip: clips do not overlap

    def feature_shape(self):
        return (self.cfg.audio_in_layers, self.cfg.audio_in_dim), "model.audio_in_layers, audio_in_dim"

    def check(self, pipe):
        super().check(pipe)
        if pipe.codec.temporal_stride != 1:
            raise ValueError(f"codec {pipe.codec.name!r} has temporal stride {pipe.codec.temporal_stride}; LetsTalk "
                             "works on per-frame latents (an SD VAE: stride 1)")

    def per_video(self, pipe, job) -> dict:
        ref = np.asarray(pipe.codec.encode(gen.to_model_range(job.portrait.frame)[None, None]), np.float32)
        return {"reference": ref}

    def clip_inputs(self, pipe, job, k, clip, prev_frames, prev_latents):
        from hallojax.models.letstalk import audio_windows, memory_from_previous

        cfg = self.cfg
        audio = np.asarray(audio_windows(job.feats, clip.start, job.plan.clip_frames, cfg.audio_window))
        ref = job.once["reference"]
        full = {"reference": ref, "audio": audio}
        null = {"reference": np.zeros_like(ref), "audio": np.zeros_like(audio)}
        if cfg.memory_frames:
            full["memory"] = np.asarray(memory_from_previous(prev_latents, ref, cfg.memory_frames))
        return full, null

    def __call__(self, model, x, t, inputs):
        return model(x, t, inputs["reference"], inputs["audio"], memory=inputs.get("memory"))


class HunyuanAvatarFamily(Family):
    """HunyuanVideo-Avatar (hallojax.models.hunyuan_avatar): flow velocity, Euler 50 steps, shift 5, the
    two-phase `hunyuan-avatar` guidance (text + audio dropped together, then audio alone), windows of 129
    frames (33 latent) over ONE latent buffer with the time-aware position shift (`long_video.shift_plan`):
    every step runs each window once and merges. Audio: whisper windows (`--audio-features whisper:DIR`),
    text: precomputed LLaVA / CLIP states (`--text-states FILE.npz`, zeros without). Facts:
    shared/research/hyavatar_letstalk.md B.2, B.6, B.7."""

    kind = "hunyuan-avatar"
    prediction = "flow"
    conditions = frozenset({"text", "audio"})
    recipe = dict(sampler="euler", steps=50, shift=5.0, guidance="hunyuan-avatar", long_video="shift")
    media = dict(fps=25.0, frames=129, height=704, width=704)
    MASK_SCALE, MASK_STEPS = 0.6, 10  # the adapters' face mask is scaled by 0.6 on steps < 10
    POSITION_SHIFT = 10  # latent frames the windows move each step

    @property
    def channels(self) -> int:
        return self.cfg.out_channels

    def motion_frames(self) -> int:
        return 0

    def feature_shape(self):
        cfg = self.cfg
        return (cfg.audio_layers, cfg.audio_channels), "model.audio_layers, audio_channels"

    def text_states(self, path) -> dict:
        """The --text-states .npz as model inputs (module docstring of `AvatarPipeline` lists the keys)."""
        cfg = self.cfg
        zeros = {"text": np.zeros((1, 1, cfg.text_dim), np.float32), "mask": np.ones((1, 1), np.int32),
                 "pooled": np.zeros((1, cfg.pooled_dim), np.float32)}
        if path is None:
            return {"full": zeros, "null": zeros}
        where = f"--text-states {path}"
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: not a readable .npz ({e})") from None
        unknown = sorted(set(data) - set(TEXT_KEYS))
        if unknown or "text_states" not in data:
            raise ValueError(f"{where}: keys {sorted(data)}; expected text_states [L, {cfg.text_dim}] and optionally "
                             f"{', '.join(k for k in TEXT_KEYS if k != 'text_states')}"
                             + (f" (unknown: {unknown})" if unknown else ""))
        out = {}
        for prefix in ("text", "negative"):
            states = data.get(f"{prefix}_states")
            if states is None:
                out[prefix] = zeros
                continue
            if states.ndim != 2 or states.shape[1] != cfg.text_dim or not np.issubdtype(states.dtype, np.number):
                raise ValueError(f"{where}: {prefix}_states has shape {states.shape}; expected [L, {cfg.text_dim}]")
            mask = data.get(f"{prefix}_mask", np.ones(states.shape[:1]))
            pooled = data.get(f"{prefix}_pooled", np.zeros(cfg.pooled_dim))
            if mask.shape != states.shape[:1]:
                raise ValueError(f"{where}: {prefix}_mask has shape {mask.shape}; expected [{states.shape[0]}]")
            if pooled.shape != (cfg.pooled_dim,):
                raise ValueError(f"{where}: {prefix}_pooled has shape {pooled.shape}; expected [{cfg.pooled_dim}]")
            if not (np.all(np.isfinite(states)) and np.all(np.isfinite(pooled))):
                raise ValueError(f"{where}: {prefix} states hold non-finite values")
            out[prefix] = {"text": states.astype(np.float32)[None], "mask": (mask != 0).astype(np.int32)[None],
                           "pooled": pooled.astype(np.float32)[None]}
        full, null = out["text"], out["negative"]
        if null["text"].shape[1] != full["text"].shape[1]:  # one batch: pad the shorter with masked zeros
            n = max(full["text"].shape[1], null["text"].shape[1])
            full, null = (_pad_text(full, n), _pad_text(null, n))
        return {"full": full, "null": null}

    def __call__(self, model, x, t, inputs):
        return model(x, t, inputs["text"], inputs["pooled"], inputs["ref"], inputs["audio"],
                     text_mask=inputs.get("mask"), face_mask=inputs["face_mask"], mask_scale=inputs["mask_scale"])


TEXT_KEYS = ("text_states", "text_mask", "text_pooled", "negative_states", "negative_mask", "negative_pooled")


def _pad_text(d, n):
    k = n - d["text"].shape[1]
    return {"text": np.pad(d["text"], ((0, 0), (0, k), (0, 0))), "mask": np.pad(d["mask"], ((0, 0), (0, k))),
            "pooled": d["pooled"]}


FAMILIES = {"hallo3": Hallo3Family, "letstalk": LetsTalkFamily, "hunyuan-avatar": HunyuanAvatarFamily}


def _workdir_kind(path: Path) -> str | None:
    """config.model.kind of a `hallojax train` workdir's latest checkpoint (or step directory), else None."""
    import json

    if path.parent.name == "checkpoints" and path.name.isdigit():
        path = path.parent.parent
    steps = gen._steps_in(path) if (path / "checkpoints").is_dir() else []
    if not steps:
        return None
    try:
        model = json.loads((path / "checkpoints" / str(max(steps)) / "config" / "metadata").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_checkpoint reports what is wrong with it
    kind = model.get("kind") if isinstance(model, dict) else None
    return kind if kind in FAMILIES else None


def family_kind(path) -> str | None:
    """The family of a converted directory or a `hallojax train` workdir (FAMILIES), or None (a Wan DiT, not
    a directory)."""
    from hallojax import registry
    from hallojax.checkpoint import read_config

    path = Path(path)
    if not (path / "config.json").is_file():
        return _workdir_kind(path.absolute())
    try:
        kind = registry.kind_of(read_config(path)[0])
    except (CheckpointError, ValueError, TypeError):
        return None  # Pipeline.load reports what is wrong with it
    return kind if kind in FAMILIES else None


def preflight(checkpoint, face_embedding, text_states=None) -> None:
    """The CLI's checks before a model is loaded: a Hallo3 directory needs a readable face embedding of the
    right size; other models take none; --text-states only for (and readable by) HunyuanVideo-Avatar."""
    from hallojax.checkpoint import read_config

    kind = family_kind(checkpoint)
    if kind == "hunyuan-avatar":
        HunyuanAvatarFamily(read_config(checkpoint)[0]).text_states(text_states)
    elif text_states is not None:
        raise ValueError(f"--text-states {text_states}: only HunyuanVideo-Avatar checkpoints take text states")
    if kind == "hallo3":
        Hallo3Family(read_config(checkpoint)[0]).face(face_embedding)
    elif face_embedding is not None:
        raise ValueError(f"--face-embedding {face_embedding}: only Hallo3 checkpoints take a face embedding")


# --- the engine ---------------------------------------------------------------------------------
class FamilyEngine(gen.SamplingEngine):
    """SamplingEngine for a family model: one jitted program per (sampler, guidance, steps) running every step
    of a clip, the live guidance branches batched into one model call per step."""

    def __init__(self, model, mesh, rules, family: Family):
        self.model, self.cfg, self.mesh, self.rules, self.family = model, model.cfg, mesh, rules, family
        self.graphdef, self.state = nnx.split(model)
        self.masked_input = False
        self._programs: dict = {}
        self._bar = None

    def reference_bank(self, ref_latent) -> jax.Array:
        """Hallo3's reference net on the reference latent, on the mesh (call once per video)."""
        fn = self._programs.get("reference_bank")
        if fn is None:
            graphdef = self.graphdef
            fn = self._programs["reference_bank"] = jax.jit(
                lambda state, r: nnx.merge(graphdef, state).reference_bank(r))
        with self.on_mesh():
            return fn(self.state, ref_latent)

    def program(self, sampler, guidance, steps: int, progress: bool):
        key = ("family", sampler.name, guidance.spec, steps, progress)
        if key in self._programs:
            return self._programs[key]
        family, graphdef = self.family, self.graphdef
        phases, drops = guidance.phases(steps), guidance.branches()
        on_step = self._tick if progress else None

        def guided(state, x, t, full, null, live, w):
            model = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # fresh variables at this trace level
            nb, b = len(live), x.shape[0]
            inputs = {}
            for name, v in full.items():
                cond = family.cond_of.get(name)
                inputs[name] = v if name in family.batch_free else jnp.concatenate(
                    [null[name] if cond in drops[j] else v for j in live], axis=0)
            out = family(model, jnp.concatenate([x] * nb, axis=0), jnp.full((nb * b,), t, jnp.float32), inputs)
            out = out.astype(jnp.float32)
            return gen.combine_branches(out.reshape(nb, b, *out.shape[1:]), w, family.channels)

        def program(state, x, full, null, arrays, weights):
            dens = [lambda x, t, i, live=live: guided(state, x, t, full, null, live, weights[:, jnp.array(live)][i])
                    for _, _, live in phases]
            return sample(dens, x, arrays, sampler, family.prediction, phases=[(a, b) for a, b, _ in phases],
                          on_step=on_step, key=arrays.get("key"))

        fn = self._programs[key] = jax.jit(program)
        return fn


# --- the pipeline -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _FamilyJob:
    plan: long_video.Plan
    portrait: gen.Portrait
    seed: int
    key: jax.Array
    lat_shape: tuple  # one clip's latents [1, F, h, w, C]
    feats: np.ndarray  # audio features [1, frames, layers, D] of video frames 0.. (the whole track)
    face_embedding: object
    context: np.ndarray | None
    null_context: np.ndarray | None
    once: dict = dataclasses.field(default_factory=dict)


class FamilyPipeline(gen.WanPipeline):
    """A converted Hallo3 / LetsTalk directory with its codec and audio features; `generate` makes videos
    (the Wan `Pipeline`'s interface and outputs; Hallo3 also takes `face_embedding`)."""

    def __init__(self, loaded: gen.Loaded, spec: gen.MediaSpec, family: Family, *, codec=None, audio_fn=None,
                 text=None):
        from hallojax.codec import get_codec

        self.loaded, self.spec, self.family = loaded, spec, family
        self.model, self.cfg, self.mesh, self.rules = loaded.model, loaded.cfg, loaded.mesh, loaded.rules
        self.codec = codec or get_codec(spec.codec)
        self.audio_fn, self.text, self.image_encoder = audio_fn, text, None
        fields = {f.name for f in dataclasses.fields(gen.SampleConfig)}
        self.sample_defaults = gen.SampleConfig(**{**family.recipe, **{
            k: v for k, v in dict(loaded.config.get("sample", {})).items() if k in fields}})
        self.engine = FamilyEngine(self.model, self.mesh, self.rules, family)
        family.check(self)

    @classmethod
    def load(cls, checkpoint, *, step=None, weights="auto", codec=None, audio_features=None, text_encoder=None,
             tokenizer=None, fps=None, height=None, width=None, overrides=(), devices=None,
             image_encoder=None) -> "FamilyPipeline":
        from data_pipeline.features import get_audio_features
        from hallojax import registry
        from hallojax.checkpoint import load_pretrained, read_config
        from hallojax.config import apply_overrides
        from hallojax.models.avatar_audio import WINDOW as WHISPER_WINDOW
        from hallojax.sharding import DEFAULT_RULES, normalize_rules

        path = Path(checkpoint).absolute()
        if not (path / "config.json").is_file():  # a `hallojax train` workdir of a family model
            if image_encoder or text_encoder or tokenizer:
                raise ValueError("--image-encoder / --text-encoder / --tokenizer: not taken by a workdir's "
                                 f"{_workdir_kind(path)} model")
            loaded = gen.load_checkpoint(path, step=step, weights=weights, overrides=overrides, devices=devices)
            family = FAMILIES[registry.kind_of(loaded.cfg)](loaded.cfg)
            config = loaded.config
            if "frames" in family.media and "media" in config.get("data", {}):  # clips of the model's length
                config.data.media.frames = family.media["frames"]
            spec = gen.media_spec(config, codec=codec, audio_features=audio_features, fps=fps, height=height,
                                  width=width)
            if not spec.audio_features:
                raise ValueError(f"{path}: the run records no audio features: pass --audio-features")
            return cls(loaded, spec, family, audio_fn=get_audio_features(spec.audio_features))
        cfg, meta = read_config(path)
        kind = registry.kind_of(cfg)
        if step is not None or weights != "auto":
            raise ValueError(f"--step / --weights: {path} is a converted {kind} directory (one set of weights)")
        if image_encoder:
            raise ValueError(f"--image-encoder: a {kind} model takes no CLIP image tokens")
        family_cls = FAMILIES[kind]
        config = ml_collections.ConfigDict({
            "preset": meta.get("source", {}).get("name", path.name), "model": cfg.to_dict(),
            "mesh": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}, "rules": [list(r) for r in DEFAULT_RULES],
            "data": {"media": {**family_cls(cfg).media, **dict(meta.get("generation", {}))}},
            "sample": dict(meta.get("sample", {}))})
        gen._check_overrides(config, overrides, cfg.NUMERIC_FIELDS)
        apply_overrides(config, overrides)
        numeric = {k: config.model[k] for k in cfg.NUMERIC_FIELDS if config.model[k] != getattr(cfg, k)}
        mesh = gen._mesh_for(config, devices)
        rules = normalize_rules(config.rules)
        model, cfg = load_pretrained(path, mesh=mesh, rules=rules, **numeric)
        loaded = gen.Loaded(model, cfg, config, {"kind": "converted", "path": str(path), "model": kind}, mesh, rules)
        spec = gen.media_spec(config, codec=codec, audio_features=audio_features, fps=fps, height=height,
                              width=width)
        if kind == "hunyuan-avatar":
            if text_encoder or tokenizer:
                raise ValueError("--text-encoder / --tokenizer: HunyuanVideo-Avatar takes precomputed text states "
                                 "(--text-states FILE.npz from the PyTorch LLaVA encoder)")
            whisper = AvatarPipeline.whisper(spec.audio_features)
            got = (WHISPER_WINDOW, whisper.cfg.num_layers + 1, whisper.cfg.hidden_size)
            if got != (cfg.audio_window, cfg.audio_layers, cfg.audio_channels):
                raise ValueError(f"--audio-features {spec.audio_features}: whisper windows of {got[0]} frames x "
                                 f"{got[1]} hidden states x {got[2]}; {path / 'config.json'} takes "
                                 f"{(cfg.audio_window, cfg.audio_layers, cfg.audio_channels)} (audio_window, "
                                 "audio_layers, audio_channels)")
            return AvatarPipeline(loaded, spec, family_cls(cfg), audio_fn=whisper)
        if not spec.audio_features:
            raise ValueError(f"a {kind} model takes audio but {path / 'config.json'} records no audio features: pass "
                             "--audio-features wav2vec2:DIR (a `hallojax convert wav2vec2` directory)")
        if kind != "hallo3" and (text_encoder or tokenizer):
            raise ValueError(f"--text-encoder / --tokenizer: a {kind} model takes no text")
        text = gen.load_text_encoder(text_encoder, tokenizer, cfg.text_dim) if kind == "hallo3" else None
        return cls(loaded, spec, family_cls(cfg), audio_fn=get_audio_features(spec.audio_features), text=text)

    def audio_feature_shape(self):
        return self.family.feature_shape()

    def _settings(self, sampler, steps, shift, guidance, long_video_strategy, clip_frames) -> gen.SampleConfig:
        """The recipe (sample_defaults) with the call's settings that are set."""
        d = self.sample_defaults
        return dataclasses.replace(d, sampler=sampler or d.sampler, steps=d.steps if steps is None else steps,
                                   shift=d.shift if shift is None else shift,
                                   guidance=d.guidance if guidance is None else guidance,
                                   long_video=long_video_strategy or d.long_video,
                                   clip_frames=d.clip_frames if clip_frames is None else clip_frames)

    def conditions(self) -> set[str]:
        return set(self.family.conditions)

    def _text(self, prompt, negative):
        """Hallo3's T5 context [1, text_len, text_dim] and its unconditional one (zeros, as released)."""
        if not isinstance(self.family, Hallo3Family):
            if prompt is not None or negative is not None:
                raise ValueError(f"--prompt / --negative-prompt: a {self.family.kind} model takes no text")
            return None, None
        cfg = self.cfg
        zeros = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)
        if prompt is None:
            if negative is not None:
                raise ValueError("--negative-prompt needs --prompt")
            return zeros, zeros
        if self.text is None:
            raise ValueError("--prompt needs a text encoder: --text-encoder DIR (converted T5) --tokenizer DIR")
        from hallojax.models.encoders.t5 import encode_text

        enc, tok = self.text
        encode = lambda p: np.asarray(encode_text(enc, tok, [p], max_length=cfg.text_len), np.float32)  # noqa: E731
        return encode(prompt), (encode(negative) if negative else zeros)

    def generate(self, image, audio, *, face_embedding=None, prompt: str | None = None,
                 negative_prompt: str | None = None, sampler: str | None = None, steps: int | None = None,
                 shift: float | None = None, guidance: str | None = None, long_video_strategy: str | None = None,
                 overlap: int | None = None, clip_frames: int | None = None, height: int | None = None,
                 width: int | None = None, fps: float | None = None, seed: int = 0, face_box=None,
                 allow_silent: bool = False, progress: bool = True) -> gen.Result:
        """A talking video, clip after clip (module docstring). Unset settings: the model's recipe."""
        from tqdm import tqdm

        t_start = time.perf_counter()
        family, cfg, codec, spec = self.family, self.cfg, self.codec, self.spec
        sc = self._settings(sampler, steps, shift, guidance, long_video_strategy, clip_frames)
        sc.validate()
        if sc.long_video not in ("auto", "motion") or overlap:
            raise ValueError(f"--long-video {sc.long_video} / --overlap {overlap}: a {family.kind} model generates "
                             "clip after clip from the previous clip's frames (motion)")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"--seed {seed!r}: must be an integer >= 0")
        if isinstance(family, Hallo3Family):
            face = family.face(face_embedding)  # before any work: a missing embedding fails fast
        elif face_embedding is not None:
            raise ValueError(f"face_embedding: a {family.kind} model takes none (only Hallo3)")
        fps = float(fps or spec.fps)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"--fps {fps}: must be positive")
        height, width = int(height or spec.height), int(width or spec.width)
        patch = cfg.patch_size if hasattr(cfg, "patch_size") else 2
        unit = codec.spatial_stride * patch
        if height < 1 or width < 1 or height % unit or width % unit:
            raise ValueError(f"--height {height} --width {width}: must be positive multiples of {unit} (codec "
                             f"{codec.name!r} stride {codec.spatial_stride} x patch {patch})")
        s = codec.temporal_stride
        clip_len = sc.clip_frames or spec.clip_frames
        m = family.motion_frames()
        if clip_len < 1 or (clip_len - 1) % s or clip_len <= m:
            raise ValueError(f"--clip-frames {clip_len}: must be 1 + {s}·k video frames (codec {codec.name!r}) and "
                             f"more than the {m} motion frames")
        g = guidance_lib.parse_guidance(sc.guidance)
        g.check(self.conditions())
        if prompt is None and "text" in g.guided:
            g = gen._without(g, "text")  # without a prompt the text branches are equal (zeros)
        ctx, null_ctx = self._text(prompt, negative_prompt)
        warnings: list[str] = []

        # ---- inputs ----
        t0 = time.perf_counter()
        wave, rate, n_frames = self._speech(audio, fps, allow_silent)
        portrait = self._portrait(image, width, height, face_box, warnings)
        plan = long_video.plan("motion", n_frames, clip_len, s, motion_video_frames=m)
        speech16 = speech_16k(wave, rate)
        # the whole track's features from frame 0, zero-padded to whole clips (Hallo3: to a multiple of 49)
        end = max(c.start + clip_len for c in plan.clips)
        feats = self._audio_features(speech16, fps, 0, clip_len * math.ceil(end / clip_len))
        f_lat = 1 + (clip_len - 1) // s
        lat_shape = (1, f_lat, height // codec.spatial_stride, width // codec.spatial_stride, family.channels)
        key = jax.random.key(seed)
        job = _FamilyJob(plan, portrait, seed, key, lat_shape, feats, face if isinstance(family, Hallo3Family)
                         else None, ctx, null_ctx)
        job.once = family.per_video(self, job)
        t_encode = time.perf_counter() - t0

        sampler_obj = get_sampler(sc.sampler)
        schedule = make_schedule(sc.sampler, sc.steps, sc.shift, family.prediction)
        arrays = schedule_arrays(sampler_obj, schedule)
        weights = jnp.asarray(g.weights(sc.steps), jnp.float32)
        gen.log.info("%s", plan.describe())
        gen.log.info("%s; sampler %s, %d steps, shift %g; %dx%d at %g fps, %d frames (%.2f s)", g.describe(sc.steps),
                     sc.sampler, sc.steps, sc.shift, width, height, fps, n_frames, n_frames / fps)
        fn = self.engine.program(sampler_obj, g, sc.steps, progress)
        frames = np.zeros((n_frames, height, width, 3), np.uint8)
        latents_out: list = []
        compiled, t_compile, t_denoise, t_decode = None, 0.0, 0.0, 0.0
        prev_frames = prev_latents = None
        bar = tqdm(total=len(plan.clips), desc="clips", unit="clip", disable=not progress, dynamic_ncols=True)
        try:
            for k, clip in enumerate(plan.clips):
                x = jax.random.normal(jax.random.fold_in(key, k), lat_shape, jnp.float32)
                full, null = family.clip_inputs(self, job, k, clip, prev_frames, prev_latents)
                clip_arrays = arrays
                if getattr(sampler_obj, "stochastic", False):
                    clip_arrays = {**arrays, "key": jax.random.fold_in(jax.random.fold_in(key, k), 1)}
                args = (self.engine.state, x, full, null, clip_arrays, weights)
                if compiled is None:
                    compiled, t_compile = self.engine.compile(fn, *args)
                lat, dt = self.engine.run(compiled, args, steps=sc.steps, desc=f"clip {k + 1}/{len(plan.clips)}",
                                          progress=progress)
                t_denoise += dt
                t1 = time.perf_counter()
                lat = np.asarray(lat)
                latents_out.append(lat)
                video = np.clip(np.asarray(codec.decode(lat), np.float32)[0], -1.0, 1.0)  # [T, H, W, 3]
                a, b = clip.emit
                frames[a:b] = gen.to_uint8(video[a - clip.start:b - clip.start])
                prev_frames, prev_latents = video, lat
                t_decode += time.perf_counter() - t1
                bar.update(1)
        finally:
            bar.close()
        timings = gen.run_timings(t_start, n_frames / fps, t_encode, t_compile, t_denoise, t_decode)
        settings = {"checkpoint": self.loaded.source, "model": family.kind, "codec": codec.name,
                    "audio_features": spec.audio_features, "sampler": sc.sampler, "steps": sc.steps,
                    "shift": sc.shift, "guidance": g.spec, "guidance_requested": sc.guidance, "long_video": "motion",
                    "motion_frames": m, "clip_frames": clip_len, "clips": len(plan.clips), "height": height,
                    "width": width, "fps": fps, "frames": n_frames, "seed": seed, "prompt": prompt,
                    "negative_prompt": negative_prompt, "face_embedding": str(face_embedding)
                    if isinstance(face_embedding, (str, os.PathLike)) else face_embedding is not None,
                    **self.run_settings(portrait, rate, wave)}
        return gen.Result(frames, wave, rate, fps, plan, settings, timings, warnings, portrait, latents_out)


# --- HunyuanVideo-Avatar: one latent buffer, windows moved every step -------------------------------
@dataclasses.dataclass(frozen=True)
class ShiftRun(long_video.ShiftPlan):
    """A `ShiftPlan` as a generation's plan (`Result.plan`): its windows as clips, the output frame count."""

    frames: int = 0
    strategy: str = "shift"
    clip_frames: int = 0

    @property
    def clips(self) -> tuple:
        f, s = self.window, self.stride
        return tuple(long_video.Clip(start=s * f * k, known=0, emit=(min(s * f * k, self.frames),
                                                                     min(s * f * (k + 1), self.frames)))
                     for k in range(self.num_windows))


def avatar_step(family: HunyuanAvatarFamily, graphdef, drops, live: tuple):
    """One Euler step of every window over the live guidance branches (`drops[j]` for j in `live`), as
    `AvatarPipeline` runs it (and `hallojax compile --sample` sizes it):
    step(state, buf [1, N, h, w, C], idx [W, F], aidx [W, 4F − 3], counts [N], fixed, t, dt, w [live],
    mask_scale) -> the merged buffer. fixed: audio [1, A, ...] whisper windows, ref [1, F, h, w, C],
    face_mask [1, tokens], text / null_text {"text", "pooled"[, "mask"]} (without "mask": no text mask, as
    splash attention needs). Rows: branch-major, then window."""

    def step(state, buf, idx, aidx, counts, fixed, t, dt, w, mask_scale):
        model = nnx.merge(graphdef, state)
        xw = buf[0][idx]  # [W, F, h, w, C]
        nw, nl = xw.shape[0], len(live)
        audio = fixed["audio"][0][aidx]  # [W, 4F − 3, window, layers, D]
        texts = [fixed["null_text" if "text" in drops[j] else "text"] for j in live]
        rows = lambda a: jnp.concatenate([a] * nw)  # noqa: E731
        inputs = {k: jnp.concatenate([rows(tx[k]) for tx in texts]) for k in texts[0]}
        inputs.update(audio=jnp.concatenate([jnp.zeros_like(audio) if "audio" in drops[j] else audio for j in live]),
                      ref=jnp.concatenate([fixed["ref"]] * (nw * nl)),
                      face_mask=jnp.concatenate([fixed["face_mask"]] * (nw * nl)), mask_scale=mask_scale)
        x = jnp.concatenate([xw] * nl)
        v = family(model, x, jnp.full((x.shape[0],), t, jnp.float32), inputs).astype(jnp.float32)
        v = gen.combine_branches(v.reshape(nl, nw, *v.shape[1:]), w, family.channels)
        out = (xw + dt * v).reshape(-1, *xw.shape[2:])
        total = jnp.zeros(buf.shape[1:], jnp.float32).at[idx.reshape(-1)].add(out)
        return (total / counts[:, None, None, None])[None]

    return step


class AvatarPipeline(FamilyPipeline):
    """A converted HunyuanVideo-Avatar directory (`HunyuanAvatarFamily`):

        hallojax generate --checkpoint hyavatar_dir --image p.png --audio s.wav --audio-features whisper:DIR \\
            --text-states prompt.npz --out talk.mp4

    --text-states: an .npz of the PyTorch text encoders' outputs: `text_states` [L, text_dim] (LLaVA's
    hidden states of the prompt), optional `text_mask` [L] (1 = token; default all ones), `text_pooled`
    [pooled_dim] (CLIP-L's pooled vector; default zeros), and the same three with the `negative_` prefix for
    the negative prompt (the dropped-text branch; default zeros). No file: zero states for both.
    Per step i (one jitted program per set of live guidance branches, every window of the step in one batch):
    windows = buffer[plan.latent_indices(i)], audio[plan.audio_indices(i)]; v = guided velocity; each window
    x + (σ_{i+1} − σ_i)·v, merged back (`ShiftPlan.merge`'s scatter-add / count, traced)."""

    @staticmethod
    def whisper(spec):
        from hallojax.checkpoint import load_pretrained

        name, _, arg = (spec or "").partition(":")
        if name != "whisper" or not arg:
            raise ValueError(f"--audio-features {spec}: HunyuanVideo-Avatar needs whisper:DIR (a `hallojax convert "
                             "whisper` directory of whisper-tiny)")
        return load_pretrained(arg)[0]

    def _step_program(self, live: tuple):
        key = ("avatar-step", live)
        fn = self.engine._programs.get(key)
        if fn is None:
            fn = self.engine._programs[key] = jax.jit(avatar_step(self.family, self.engine.graphdef,
                                                                  self._guidance.branches(), live))
        return fn

    def generate(self, image, audio, *, text_states=None, face_embedding=None, prompt=None, negative_prompt=None,
                 sampler=None, steps=None, shift=None, guidance=None, long_video_strategy=None, overlap=None,
                 clip_frames=None, height=None, width=None, fps=None, seed: int = 0, face_box=None,
                 allow_silent: bool = False, progress: bool = True) -> gen.Result:
        """A talking video: the whole latent buffer denoised together with the time-aware shift (class doc)."""
        from hallojax.models.avatar_audio import (audio_windows, face_box_mask, face_mask_tokens,
                                                  pad_for_inference)
        from hallojax.models.encoders.whisper import encode_audio

        t_start = time.perf_counter()
        family, cfg, codec, spec = self.family, self.cfg, self.codec, self.spec
        if prompt is not None or negative_prompt is not None:
            raise ValueError("--prompt / --negative-prompt: HunyuanVideo-Avatar takes precomputed text states "
                             "(--text-states FILE.npz)")
        if face_embedding is not None:
            raise ValueError("face_embedding: a hunyuan-avatar model takes none (only Hallo3)")
        sc = self._settings(sampler, steps, shift, guidance, long_video_strategy, clip_frames)
        if sc.sampler != "euler" or sc.long_video not in ("auto", "shift") or overlap:
            raise ValueError(f"--sampler {sc.sampler} / --long-video {sc.long_video} / --overlap {overlap}: "
                             "HunyuanVideo-Avatar runs the euler sampler one step at a time over its shifted windows "
                             "(--long-video shift)")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"--seed {seed!r}: must be an integer >= 0")
        texts = family.text_states(text_states)  # before any work: a bad file fails fast
        fps = float(fps or spec.fps)
        if fps != 25.0:
            raise ValueError(f"--fps {fps:g}: HunyuanVideo-Avatar's whisper windows are built for 25 fps")
        height, width = int(height or spec.height), int(width or spec.width)
        unit = codec.spatial_stride * cfg.patch_size[1]
        if height < 1 or width < 1 or height % unit or width % unit:
            raise ValueError(f"--height {height} --width {width}: must be positive multiples of {unit}")
        s = codec.temporal_stride
        clip_len = sc.clip_frames or spec.clip_frames
        if clip_len < 2 or (clip_len - 1) % s:
            raise ValueError(f"--clip-frames {clip_len}: must be 1 + {s}·k video frames (codec {codec.name!r})")
        g = guidance_lib.parse_guidance(sc.guidance)
        g.check(self.conditions())
        self._guidance = g
        warnings: list[str] = []

        # ---- inputs ----
        t0 = time.perf_counter()
        wave, rate, n_frames = self._speech(audio, fps, allow_silent)
        portrait = self._portrait(image, width, height, face_box, warnings)
        speech16 = speech_16k(wave, rate)
        states = encode_audio(self.audio_fn, speech16, mel_dtype="float16")  # [1, P, layers, D]
        windows = np.asarray(pad_for_inference(audio_windows(states, n_frames, fps)), np.float32)
        if windows.shape[1] < n_frames:
            raise ValueError(f"audio of {n_frames} frames: HunyuanVideo-Avatar's audio reads at most "
                             f"{windows.shape[1]} frames ({windows.shape[1] / fps:.1f} s)")
        f_lat = 1 + (clip_len - 1) // s
        base = long_video.shift_plan(n_frames, window=f_lat, shift=family.POSITION_SHIFT, stride=s)
        plan = ShiftRun(**{k.name: getattr(base, k.name) for k in dataclasses.fields(base)}, frames=n_frames,
                        clip_frames=clip_len)
        pad = plan.audio_frames - windows.shape[1]
        windows = np.concatenate([windows, np.zeros((1, pad, *windows.shape[2:]), np.float32)], axis=1) \
            if pad > 0 else windows[:, :plan.audio_frames]
        h, w = height // codec.spatial_stride, width // codec.spatial_stride
        pix = gen.to_model_range(portrait.frame)
        ref = np.asarray(codec.encode(np.repeat(pix[None, None], clip_len, axis=1)), np.float32)
        box = portrait.box
        mask = face_box_mask(height, width, None if box is None else (box[0], box[1], box[2] - box[0],
                                                                      box[3] - box[1]))
        fixed = {"audio": windows, "ref": ref, "face_mask": face_mask_tokens(mask, (h, w), f_lat, cfg.patch_size[1]),
                 "text": texts["full"], "null_text": texts["null"]}
        t_encode = time.perf_counter() - t0

        schedule = make_schedule("euler", sc.steps, sc.shift, "flow")
        ts, sig = np.asarray(schedule.timesteps, np.float32), np.asarray(schedule.sigmas, np.float32)
        weights = np.asarray(g.weights(sc.steps), np.float32)
        gen.log.info("%s", plan.describe())
        gen.log.info("%s; euler, %d steps, shift %g; %dx%d at %g fps, %d frames", g.describe(sc.steps), sc.steps,
                     sc.shift, width, height, fps, n_frames)
        buf = jax.random.normal(jax.random.key(seed), (1, plan.total_latent, h, w, family.channels), jnp.float32)
        t_compile, t1 = 0.0, time.perf_counter()
        with self.engine.on_mesh():
            fixed = jax.tree.map(jnp.asarray, fixed)
            for i in range(sc.steps):
                live = tuple(int(j) for j in np.flatnonzero(weights[i]))
                idx, aidx = plan.latent_indices(i), plan.audio_indices(i)
                buf = self._step_program(live)(
                    self.engine.state, buf, jnp.asarray(idx, jnp.int32), jnp.asarray(aidx, jnp.int32),
                    jnp.asarray(plan.counts(i), jnp.float32), fixed, ts[i], sig[i + 1] - sig[i],
                    jnp.asarray(weights[i, list(live)]),
                    jnp.float32(family.MASK_SCALE if i < family.MASK_STEPS else 1.0))
            lat = np.asarray(buf)
        t_denoise = time.perf_counter() - t1
        t1 = time.perf_counter()
        keep = min(1 + -(-(n_frames - 1) // s), plan.total_latent)  # enough latent frames for every audio frame
        video = np.clip(np.asarray(codec.decode(lat[:, :keep]), np.float32)[0], -1.0, 1.0)
        frames = gen.to_uint8(video[:n_frames])
        t_decode = time.perf_counter() - t1
        timings = gen.run_timings(t_start, n_frames / fps, t_encode, t_compile, t_denoise, t_decode)
        settings = {"checkpoint": self.loaded.source, "model": family.kind, "codec": codec.name,
                    "audio_features": spec.audio_features, "sampler": "euler", "steps": sc.steps, "shift": sc.shift,
                    "guidance": g.spec, "long_video": "shift", "position_shift": plan.shift, "clip_frames": clip_len,
                    "windows": plan.num_windows, "latent_frames": plan.total_latent, "height": height, "width": width,
                    "fps": fps, "frames": n_frames, "seed": seed,
                    "text_states": None if text_states is None else str(text_states),
                    **self.run_settings(portrait, rate, wave)}
        return gen.Result(frames, wave, rate, fps, plan, settings, timings, warnings, portrait, [lat])


__all__ = ["AvatarPipeline", "avatar_step", "FAMILIES", "Family", "FamilyEngine", "FamilyPipeline", "Hallo3Family",
           "HunyuanAvatarFamily", "LetsTalkFamily", "ShiftRun", "family_kind"]

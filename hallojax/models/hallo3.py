"""Hallo3 as released (fudan-generative-vision/hallo3, CVPR 2025) on two CogVideoX-5B-I2V backbones.
Facts: shared/research/hallo3.md §1 (the quirks the released weights depend on).

- ``denoiser``: a `CogVideoXTransformer` (SAT numerics: final AdaLayerNorm eps 1e-6, learned position table
  sliced by rows) whose every layer, after the self-attention residual and before the FFN, adds on the video
  stream (no gate, no modulation) face then audio cross-attention: ``x += dense(attn(q(LN(x)), kv(tokens)))``
  with the queries grouped per latent frame (P = H'·W' tokens each), q and k through the self-attention's own
  per-layer qk-LayerNorms and q rotated with the RoPE rows of frame t = 0 (the released hook chain reaches
  the cross-attention too); keys/values: the 4 face tokens (all frames) or the 32 audio tokens of that frame.
- ``reference``: a second full backbone run once per video at t = 0 on [ref, ref] (the face-masked reference
  latent twice, 32 channels) with an all-zero text; every layer's modulated video attention input is banked
  ([num_layers, B, P, D], `reference_bank`) and joined to the same denoiser layer's joint attention as extra
  keys/values (its K/V projections and k-norm, no RoPE; outputs at those positions are not formed).
- ``face_proj``: Linear(512 -> 4·1024) -> LayerNorm: the InsightFace identity embedding as 4 tokens.
- ``audio_proj``: per video frame a window of 5 frames (clamped at the ends) x 12 wav2vec2 layers x 768
  flattened (window, layer, channel) -> Linear 512, ReLU -> Linear 512, ReLU -> Linear 32·768; then twice:
  frame 0 kept, the rest taken in pairs through ONE shared Conv1d(32·768, 32·768, k 2, s 2) (49 -> 25 ->
  13 frames: latent frame k >= 1 sees video frames 4k-3..4k); LayerNorm(768) -> [B, F, 32, 768].
- ``*_buffers``: tensors the released file carries but the forward pass never reads (each net's RoPE tables
  `freqs_sin/cos` and SAT's dead `position_embeddings`), kept as `Buffer` variables so that an export is
  bitwise the released file and the count is the file's: 14,551,030,912 at full size.

Numerics follow the backbone's (matmuls in `dtype`, norms in float32, residual adds in float32 rounded once).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer, LayerHook
from hallojax.models.wan import REMAT_POLICIES, param_count
from hallojax.nn.attention import ATTENTION_IMPLS
from hallojax.nn.audio import local_attention, window_features
from hallojax.nn.layers import Dense, LayerNorm, stacked
from hallojax.nn.rope import apply_rope, axis_dims, grid_coords

__all__ = ["Buffer", "Hallo3", "Hallo3Config", "PRESETS", "preset", "param_count"]

SAT_DEAD_POSITIONS = 64  # SAT's unused `transformer.position_embeddings` (max_sequence_length 64)


@dataclasses.dataclass(frozen=True)
class Hallo3Config(ModelConfig):
    """Sizes and numerics of Hallo3. Defaults: the released model (`hallo3` preset)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision", "remat", "attention",
                                                 "scan_unroll")

    # the two CogVideoX-5B-I2V backbones
    num_layers: int = 42
    num_heads: int = 48
    head_dim: int = 64
    in_channels: int = 32  # 16 noisy + 16 conditioning (reference + motion frames) latent channels
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 226
    time_embed_dim: int = 512
    sample_frames: int = 13  # latent grid of the position tables (SAT: 49 frames, 480x720)
    sample_height: int = 60
    sample_width: int = 90
    # identity: an InsightFace embedding -> face_tokens tokens of face_dim
    face_in: int = 512
    face_tokens: int = 4
    face_dim: int = 1024
    # audio: wav2vec2 states per video frame, a window of ±audio_window frames
    audio_window: int = 2
    audio_layers: int = 12
    audio_in_dim: int = 768
    audio_hidden: int = 512
    audio_tokens: int = 32
    audio_dim: int = 768
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    precision: str = "auto"
    remat: str = "none"
    attention: str = "xla"
    scan_unroll: int = 1

    def __post_init__(self):
        small = [f"model.{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.type == "int" and f.name != "audio_window" and getattr(self, f.name) < 1]
        if small or self.audio_window < 0:
            raise ValueError(f"{', '.join(small) or f'model.audio_window={self.audio_window}'}: sizes must be >= 1 "
                             "(audio_window >= 0)")
        check_dtypes(self, "model")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.in_channels != 2 * self.out_channels:
            raise ValueError(f"model.in_channels={self.in_channels}: Hallo3 takes 2 x out_channels "
                             f"({2 * self.out_channels}): noisy latents + the conditioning latent")
        self.backbone()  # the backbone's own checks (head_dim % 16, ...)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def video_tokens(self) -> int:
        """Tokens of the position tables' grid (17,550 at 13 x 30 x 45)."""
        return self.sample_frames * (self.sample_height // 2) * (self.sample_width // 2)

    def backbone(self) -> CogVideoXConfig:
        """Either net's CogVideoXConfig: 5B-I2V (RoPE + learned table) with SAT's final-norm eps 1e-6."""
        return CogVideoXConfig(
            num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim,
            in_channels=self.in_channels, out_channels=self.out_channels, text_dim=self.text_dim,
            text_len=self.text_len, time_embed_dim=self.time_embed_dim, patch_size=2,
            sample_frames=4 * (self.sample_frames - 1) + 1, sample_height=self.sample_height,
            sample_width=self.sample_width, temporal_compression_ratio=4, rope=True, learned_positions=True,
            norm_out_eps=1e-6, param_dtype=self.param_dtype, dtype=self.dtype, precision=self.precision,
            remat=self.remat, attention=self.attention, scan_unroll=self.scan_unroll)


PRESETS: dict[str, dict[str, Any]] = {
    "hallo3": {},  # the released model (the dataclass defaults)
    # tests: every width distinct where it can be, 2 layers
    "tiny": dict(num_layers=2, num_heads=2, head_dim=16, in_channels=8, out_channels=4, text_dim=24, text_len=6,
                 time_embed_dim=16, sample_frames=3, sample_height=4, sample_width=6, face_in=20, face_dim=12,
                 audio_layers=3, audio_in_dim=8, audio_hidden=14, audio_tokens=3, audio_dim=10),
}


def preset(name: str, **overrides) -> Hallo3Config:
    if name not in PRESETS:
        raise ValueError(f"unknown Hallo3 preset {name!r}; known: {sorted(PRESETS)}")
    return Hallo3Config(**{**PRESETS[name], **overrides})


# --- conditioning projectors ---


class FaceProjector(nnx.Module):
    """`FaceProjModel`: [B, face_in] -> Linear -> [B, tokens, dim] -> LayerNorm (eps 1e-5)."""

    def __init__(self, face_in: int, tokens: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = Dense(face_in, tokens * dim, (None, "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(dim, 1e-5, affine=True)
        self.tokens, self.dim = tokens, dim

    def __call__(self, face: jax.Array) -> jax.Array:
        if face.ndim != 2 or face.shape[1] != self.proj.kernel.shape[0]:
            raise ValueError(f"face embedding has shape {tuple(face.shape)}; expected [B, "
                             f"{self.proj.kernel.shape[0]}] (InsightFace's raw 512-d embedding, zeros if no face)")
        x = self.proj(face).reshape(face.shape[0], self.tokens, self.dim)
        return self.norm(x).astype(x.dtype)


class AudioProjector(nnx.Module):
    """`AudioProjModel` as released: windowed wav2vec2 states -> [B, F, tokens, dim] per latent frame.

    `conv` is the shared Conv1d(K·C, K·C, kernel 2, stride 2) as a kernel [2, in, out] (tap 0 = earlier frame).
    """

    def __init__(self, *, window: int, layers: int, in_dim: int, hidden: int, tokens: int, dim: int,
                 rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width = tokens * dim
        self.proj1 = Dense((2 * window + 1) * layers * in_dim, hidden, (None, "mlp"), **kw)
        self.proj2 = Dense(hidden, hidden, ("mlp", None), **kw)
        self.proj3 = Dense(hidden, width, (None, "mlp"), **kw)
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.conv = nnx.Param(init(rngs.params(), (2, width, width), param_dtype), out_sharding=(None, "embed", "mlp"),
                              eager_sharding=False)
        self.conv_bias = nnx.Param(jnp.zeros((width,), param_dtype), out_sharding=("mlp",), eager_sharding=False)
        self.norm = LayerNorm(dim, 1e-5, affine=True)
        self.window, self.layers, self.in_dim, self.tokens, self.dim = window, layers, in_dim, tokens, dim
        self.dtype = dtype

    def _pairs(self, x: jax.Array) -> jax.Array:
        """Frame 0 kept, frames 1.. through the conv in non-overlapping pairs: [B, 1 + 2n, W] -> [B, 1 + n, W]."""
        b, t, w = x.shape
        pairs = x[:, 1:].reshape(b, (t - 1) // 2, 2, w)
        y = jnp.einsum("bnkc,kco->bno", pairs, self.conv[...].astype(x.dtype), preferred_element_type=jnp.float32)
        y = (y + self.conv_bias[...].astype(jnp.float32)).astype(x.dtype)
        return jnp.concatenate([x[:, :1], y], axis=1)

    def __call__(self, audio: jax.Array) -> jax.Array:
        """audio: [B, T, layers, C] per video frame (windows built here, clamped at the ends, as at inference)
        or [B, T, 2w+1, layers, C] already windowed (training takes real neighbours); T = 1 + 4k."""
        win = 2 * self.window + 1
        audio = jnp.asarray(audio)
        if audio.ndim == 4 and audio.shape[2:] == (self.layers, self.in_dim):
            audio = window_features(audio, self.window)
        if audio.ndim != 5 or audio.shape[2:] != (win, self.layers, self.in_dim) or (audio.shape[1] - 1) % 4:
            raise ValueError(f"audio features have shape {tuple(audio.shape)}; expected [B, 1 + 4k, {self.layers}, "
                             f"{self.in_dim}] (wav2vec2 states per video frame) or [B, 1 + 4k, {win}, {self.layers}, "
                             f"{self.in_dim}] (windows)")
        b, t = audio.shape[:2]
        dtype = self.dtype or audio.dtype
        x = jax.nn.relu(self.proj1(audio.reshape(b, t, -1).astype(dtype)))
        x = jax.nn.relu(self.proj2(x))
        x = self._pairs(self._pairs(self.proj3(x)))  # [B, F, K·C]
        x = x.reshape(b, x.shape[1], self.tokens, self.dim)
        return self.norm(x).astype(dtype)


# --- per-layer face / audio cross-attention ---


class FrameCrossAttention(nnx.Module):
    """SAT `CrossAttention` + its input LayerNorm: query Linear(D, D), key_value Linear(C, 2D) ([K; V]), dense."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(dim, 1e-5, affine=True, axis_name="embed")
        self.query = Dense(dim, dim, ("embed", "heads"), **kw)
        self.key_value = Dense(kv_dim, 2 * dim, (None, "heads"), **kw)
        self.dense = Dense(dim, dim, ("heads", "embed"), **kw)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array, tokens: jax.Array, norm_q, norm_k, rope, frames: int) -> jax.Array:
        """x [B, F·P, D] video tokens; tokens [B, F | 1, M, C] (1: the same for every frame); norm_q/norm_k the
        layer's self-attention qk-LayerNorms; rope (cos, sin) [1, P, K/2] of frame t = 0. Returns [B, F·P, D]."""
        b, length, d = x.shape
        n, p = self.num_heads, length // frames
        q = self.query(self.norm(x).astype(x.dtype)).reshape(b * frames, p, n, -1)
        q = apply_rope(norm_q(q).astype(x.dtype), *rope).reshape(b, frames, p, n, -1)  # [B, F, P, N, K]
        k, v = jnp.split(self.key_value(tokens.astype(x.dtype)), 2, axis=-1)
        k = norm_k(k.reshape(*k.shape[:3], n, -1)).astype(x.dtype)
        v = v.reshape(*v.shape[:3], n, -1)
        k, v = (jnp.broadcast_to(z, (b, frames, *z.shape[2:])) for z in (k, v))  # [B, F, M, N, K]
        out = local_attention(q, k, v, jnp.ones(k.shape[1:3], bool))
        return self.dense(out.reshape(b, length, d))


class FaceAudioLayer(nnx.Module):
    """One layer's two cross-attentions (`face_attn` + `face_input_layernorm`, `audio_attn` + ...)."""

    def __init__(self, cfg: Hallo3Config, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
        self.face = FrameCrossAttention(cfg.dim, cfg.face_dim, cfg.num_heads, **kw)
        self.audio = FrameCrossAttention(cfg.dim, cfg.audio_dim, cfg.num_heads, **kw)


class Buffer(nnx.Param):
    """A released tensor the forward pass does not read (kept for a bitwise export and the released count);
    optimizers should leave it out (`nnx.Not(Buffer)`)."""


class SatBuffers(nnx.Module):
    """One net's `freqs_sin`, `freqs_cos` [L, K] and the dead `position_embeddings` [64, D]."""

    def __init__(self, cfg: Hallo3Config, param_dtype):
        sin, cos = sat_rope_buffers(cfg)
        meta = dict(out_sharding=(None, None), eager_sharding=False)
        self.freqs_sin = Buffer(jnp.asarray(sin, param_dtype), **meta)
        self.freqs_cos = Buffer(jnp.asarray(cos, param_dtype), **meta)
        self.position_embeddings = Buffer(jnp.zeros((SAT_DEAD_POSITIONS, cfg.dim), param_dtype), **meta)


def sat_rope_buffers(cfg: Hallo3Config) -> tuple[np.ndarray, np.ndarray]:
    """SAT's `freqs_sin`, `freqs_cos` [F·H'·W', K] of the sample grid (float32): each pair's angle twice."""
    coords = grid_coords(cfg.sample_frames, cfg.sample_height // 2, cfg.sample_width // 2).astype(np.float32)
    angles = []
    for axis, d in enumerate(axis_dims(cfg.head_dim, "cogvideox")):
        inv = np.float32(1.0) / np.float32(10000.0) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
        angles.append(np.repeat(coords[:, axis:axis + 1] * inv[None].astype(np.float32), 2, axis=1))
    ang = np.concatenate(angles, axis=1)
    return np.sin(ang), np.cos(ang)


# --- the model ---


class Hallo3(nnx.Module):
    """Hallo3's denoiser + reference network.

    ``bank = model.reference_bank(reference)``: reference [B, 1, H, W, C_out], the VAE latent (x 0.7) of the
    face-masked reference image -> [num_layers, B, H'·W', D]; compute it once per video, reuse it for every
    step and both guidance branches (its batch is broadcast when it is 1).
    ``model(latents, timesteps, context, *, face, audio, bank=None, reference=None)``: latents [B, F, H, W, C_in]
    (noisy + conditioning channels, channels last), timesteps [B] (0..999), context [B, text_len, text_dim]
    (T5; zeros = no text), face [B, face_in], audio [B, T, layers, C] or [B, T, 2w+1, layers, C] with
    T = 4F - 3; the bank (or the reference, to compute it here). Returns the v-prediction [B, F, H, W, C_out].
    """

    def __init__(self, cfg: Hallo3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        bb = cfg.backbone()
        kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
        with nnx.use_eager_sharding(False):
            self.denoiser = CogVideoXTransformer(bb, rngs=rngs)
            self.reference = CogVideoXTransformer(bb, rngs=rngs)
            self.cross = stacked(FaceAudioLayer, cfg.num_layers, rngs, cfg)
            self.face_proj = FaceProjector(cfg.face_in, cfg.face_tokens, cfg.face_dim, **kw)
            self.audio_proj = AudioProjector(window=cfg.audio_window, layers=cfg.audio_layers, in_dim=cfg.audio_in_dim,
                                             hidden=cfg.audio_hidden, tokens=cfg.audio_tokens, dim=cfg.audio_dim, **kw)
            self.denoiser_buffers = SatBuffers(cfg, DTYPES[cfg.param_dtype])
            self.reference_buffers = SatBuffers(cfg, DTYPES[cfg.param_dtype])

    @with_precision
    def reference_bank(self, reference: jax.Array) -> jax.Array:
        """The reference net at t = 0 on [reference, reference] with zero text: [num_layers, B, P, D]."""
        cfg = self.cfg
        if reference.ndim != 5 or reference.shape[1] != 1 or reference.shape[-1] != cfg.out_channels:
            raise ValueError(f"reference has shape {tuple(reference.shape)}; expected [B, 1, H, W, {cfg.out_channels}] "
                             "(one latent frame of the face-masked reference image)")
        b = reference.shape[0]
        x = jnp.concatenate([reference, reference], axis=-1)
        context = jnp.zeros((b, cfg.text_len, cfg.text_dim), DTYPES[cfg.dtype])
        return self.reference.attention_inputs(x, jnp.zeros((b,), jnp.float32), context)

    @with_precision
    def __call__(self, latents, timesteps, context, *, face, audio, bank=None, reference=None):
        cfg = self.cfg
        if (bank is None) == (reference is None):
            raise ValueError("give exactly one of `bank` (from reference_bank) and `reference`")
        b, f, h, w, _ = latents.shape
        gh, gw = h // 2, w // 2
        if bank is None:
            bank = self.reference_bank(reference)
        want = (cfg.num_layers, gh * gw, cfg.dim)
        if bank.ndim != 4 or (bank.shape[0], *bank.shape[2:]) != want or bank.shape[1] not in (1, b):
            raise ValueError(f"bank has shape {tuple(bank.shape)}; expected [{cfg.num_layers}, {b} or 1, "
                             f"{gh * gw}, {cfg.dim}] (reference_bank of a reference latent of this size)")
        bank = jnp.broadcast_to(bank, (cfg.num_layers, b, *bank.shape[2:])).astype(DTYPES[cfg.dtype])
        face_tokens = self.face_proj(face)[:, None]  # [B, 1, 4, face_dim]: the same tokens for every frame
        audio_tokens = self.audio_proj(audio)  # [B, F, K, audio_dim]
        if audio_tokens.shape[:2] != (b, f):
            raise ValueError(f"audio covers {audio.shape[1]} video frames = {audio_tokens.shape[1]} latent frames "
                             f"(batch {audio_tokens.shape[0]}); the latents have {f} (batch {b})")
        rope0 = self.denoiser.rope((1, gh, gw))  # frame t = 0: the rows the released cross-attention rotates by

        def cross(block, layer, video, text, inputs):
            norm_q, norm_k = block.attn1.norm_q, block.attn1.norm_k
            for attn, tokens in ((layer.face, inputs["face"]), (layer.audio, inputs["audio"])):
                out = attn(video, tokens, norm_q, norm_k, inputs["rope"], f)
                video = (video.astype(jnp.float32) + out.astype(jnp.float32)).astype(video.dtype)
            return video

        hook = LayerHook(cross, self.cross, {"face": face_tokens, "audio": audio_tokens, "rope": rope0})
        return self.denoiser(latents, timesteps, context, extra_tokens=bank, hook=hook)


def build_model(cfg: Hallo3Config, seed: int = 0) -> Hallo3:
    return Hallo3(cfg, rngs=nnx.Rngs(seed))

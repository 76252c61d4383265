"""HunyuanVideo-Avatar (Tencent-Hunyuan/HunyuanVideo-Avatar, `hymm_sp/modules/models_audio.py`) in Flax NNX:
the HunyuanVideo trunk (`hallojax.models.hunyuan`, no guidance embedder) plus the released Avatar modules,
composed through the trunk's extension points. Facts: shared/research/hyavatar_letstalk.md B.1, B.2, B.4, B.5.

One 33-latent-frame window, in the released order (latents channels-last [B, F, H, W, 16]):
  vec = time_in(t) + motion_exp(4 scalars) + motion_pose(4 scalars) + fps_proj(fps) + vector_in(pooled)
        (motion scalars each through a 256 -> D/4 -> D/4 timestep MLP, the 4 results concatenated to D;
        fps through its own 256 -> D -> D timestep MLP; cos-first sinusoids as the trunk's)
  img = img_in(x) + before_proj(ref_in(ref_latents))      (ref_latents: the reference image repeated over
                                                           the window, VAE-encoded: one token per video token)
  img = [img_in(ref_latents[:, :1]) ; img]                (the reference frame, RoPE t = −1, same (h, w) grid)
  audio = latent_audio_tokens(audio_proj(whisper windows))   [B, F, 16, D]
  dual blocks; after blocks 1, 3, ..., 19: img += [0 ; adapter(img, audio) · face_mask · mask_scale]
  single blocks on [img ; txt]; drop text and reference tokens; final adaLN + Linear; unpatchify.

Parameters: the trunk's own names (`x_embedder`, `double_blocks`, ...), then `ref_in` (PatchEmbed),
`before_proj`, `audio_proj` (AudioProjection), `audio_adapters` (10 FaceAwareAudioAdapter stacked),
`motion_exp`, `motion_pose`, `fps_proj` (MLPs, float32 like the trunk's vector MLPs). Numerics are the
trunk's (matmuls in `dtype`, float32 norms / modulation / vector MLPs / softmax); the adapters' LayerNorms
use eps 1e-5 as released.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.modelconfig import DTYPES, with_precision
from hallojax.models.avatar_audio import AudioProjection, FaceAwareAudioAdapter, latent_audio_tokens
from hallojax.models.hunyuan import FREQ_DIM, TOKENS, HunyuanVideoConfig, HunyuanVideoTransformer
from hallojax.nn.layers import MLP, Dense, PatchEmbed, stacked, timestep_embedding
from hallojax.nn.rope import frame_coords
from hallojax.sharding import constrain

__all__ = ["HunyuanAvatar", "HunyuanAvatarConfig", "PRESETS", "preset"]

MOTION_SCALARS = 4  # motion_exp / motion_pose each take 4 scalars per sample (inference: [30]*4, [25]*4)
RELEASED = dict(fps=25.0, motion_exp=30.0, motion_pose=25.0)  # the sampling script's fixed inputs


@dataclasses.dataclass(frozen=True)
class HunyuanAvatarConfig(HunyuanVideoConfig):
    """The trunk's sizes (HunyuanVideoConfig; no guidance embedder) plus the Avatar modules'. Defaults: the
    released model."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = HunyuanVideoConfig.NUMERIC_FIELDS

    guidance_embeds: bool = False
    audio_window: int = 10  # whisper frames per video frame
    audio_layers: int = 5  # whisper-tiny: embedding output + 4 layers
    audio_channels: int = 384
    audio_hidden: int = 1024  # AudioProjNet2's hidden width
    audio_tokens: int = 4  # tokens per video frame (16 per latent frame)
    adapter_inner: int = 1024  # the face-aware adapter's single head
    adapter_every: int = 2  # adapters after dual blocks 1, 3, 5, ... (every second one)

    def __post_init__(self):
        super().__post_init__()
        if self.guidance_embeds:
            raise ValueError("model.guidance_embeds=True: HunyuanVideo-Avatar has no guidance embedder")
        small = [f"model.{k}={getattr(self, k)}" for k in ("audio_window", "audio_layers", "audio_channels",
                                                          "audio_hidden", "audio_tokens", "adapter_inner",
                                                          "adapter_every") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be >= 1")
        if self.dim % MOTION_SCALARS:
            raise ValueError(f"width {self.dim}: the motion embedders need a multiple of {MOTION_SCALARS}")

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        """Dual blocks (0-based) followed by an audio adapter: 1, 3, ..., 19 as released."""
        return tuple(range(self.adapter_every - 1, self.num_layers, self.adapter_every))


PRESETS: dict[str, dict[str, Any]] = {
    "hunyuan-avatar": {},  # the released model: 12,991,493,184 parameters
    # tests: 4 dual blocks (2 adapters), 2 single, width 64
    "tiny": dict(num_layers=4, num_single_layers=2, num_heads=4, head_dim=16, rope_axes=(4, 6, 6), in_channels=8,
                 out_channels=8, text_dim=32, pooled_dim=24, audio_window=3, audio_layers=2, audio_channels=8,
                 audio_hidden=24, adapter_inner=16),
}


def preset(name: str, **overrides) -> HunyuanAvatarConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown HunyuanVideo-Avatar preset {name!r}; known: {sorted(PRESETS)}")
    return HunyuanAvatarConfig(**{**PRESETS[name], **overrides})


def _vector_inputs(fps, motion_exp, motion_pose, batch: int):
    """fps [B, 1], motion_exp / motion_pose [B, 4] float32 from scalars or per-sample values."""
    def scalars(x, n, name):
        x = jnp.asarray(x, jnp.float32)
        x = jnp.broadcast_to(x, (batch, n)) if x.ndim == 0 else (x[:, None] if n == 1 and x.ndim == 1 else x)
        if x.shape != (batch, n):
            raise ValueError(f"{name} has shape {tuple(np.shape(x))}; expected [{batch}, {n}] or a scalar")
        return x

    return (scalars(fps, 1, "fps"), scalars(motion_exp, MOTION_SCALARS, "motion_exp"),
            scalars(motion_pose, MOTION_SCALARS, "motion_pose"))


class _Adapter(FaceAwareAudioAdapter):
    """The adapter as a dual-block hook (`img = hook(img, txt, **inputs)`; the text stream is not read)."""

    def __call__(self, img, txt, audio, face_mask=None, *, frames: int, ref_tokens: int, mask_scale=1.0):
        return super().__call__(img, audio, face_mask, frames=frames, ref_tokens=ref_tokens, mask_scale=mask_scale)


class HunyuanAvatar(HunyuanVideoTransformer):
    """HunyuanVideo-Avatar's transformer.

    Call: ``model(latents, timesteps, text, pooled, ref_latents, audio_windows, *, text_mask=None,
    face_mask=None, mask_scale=1.0, fps=25, motion_exp=30, motion_pose=25)``
      latents [B, F, H, W, C] (noisy, channels last); timesteps [B] in [0, 1000]; text [B, M, text_dim]
      LLaVA states (text_mask [B, M], right padding); pooled [B, pooled_dim] CLIP; ref_latents
      [B, F, H, W, C] the reference image's latent video (frame 0 also becomes the t = −1 token frame);
      audio_windows [B, 4F − 3, window, layers, channels] whisper windows per video frame
      (`avatar_audio.audio_windows`; zeros = the unconditional audio); face_mask [B, F·H'·W'] on the token
      grid (`face_mask_tokens`; None = everywhere) times mask_scale (the pipeline's 0.6 for its first 10
      steps); fps [B] or scalar; motion_exp / motion_pose [B, 4] or scalar.
      single_cache (the released feature cache, off by default): "store" returns (velocity, cache), the last
      single block's input; passing that cache back runs only the last single block (with this call's
      timestep / motion / fps vector) and the head (`feature_cache_schedule` says on which steps).
    Returns the flow velocity [B, F, H, W, C_out] in the compute dtype.
    """

    def __init__(self, cfg: HunyuanAvatarConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        dim, dtype, pdt, f32 = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], jnp.float32
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        vec_kw = dict(rngs=rngs, dtype=f32, param_dtype=pdt)
        md = dim // MOTION_SCALARS
        with nnx.use_eager_sharding(False):
            self.ref_in = PatchEmbed(cfg.patch_size, cfg.in_channels, dim, **kw)
            self.before_proj = Dense(dim, dim, ("embed", "mlp"), **kw)
            self.audio_proj = AudioProjection(window=cfg.audio_window, layers=cfg.audio_layers,
                                              channels=cfg.audio_channels, hidden=cfg.audio_hidden,
                                              tokens=cfg.audio_tokens, dim=dim, **kw)
            self.audio_adapters = stacked(_Adapter, len(cfg.adapter_layers), rngs, dim, cfg.adapter_inner,
                                          dtype=dtype, param_dtype=pdt)
            mlp = lambda out: MLP(FREQ_DIM, out, out, jax.nn.silu, axes_in=(None, "embed"),  # noqa: E731
                                  axes_out=("embed", "mlp"), **vec_kw)
            self.motion_exp = mlp(md)
            self.motion_pose = mlp(md)
            self.fps_proj = mlp(dim)

    def avatar_vector(self, fps, motion_exp, motion_pose, batch: int) -> jax.Array:
        """float32 [B, D]: concat_4(motion_exp) + concat_4(motion_pose) + fps_proj(fps); scalars broadcast."""
        fps, motion_exp, motion_pose = _vector_inputs(fps, motion_exp, motion_pose, batch)

        def motion(mlp, x):
            return mlp(timestep_embedding(x.reshape(-1), FREQ_DIM)).reshape(batch, -1)  # [B, 4·D/4]

        return (motion(self.motion_exp, motion_exp) + motion(self.motion_pose, motion_pose)
                + self.fps_proj(timestep_embedding(fps[:, 0], FREQ_DIM)))

    def reference(self, ref_latents) -> tuple[jax.Array, jax.Array]:
        """(image_add [B, L, D], reference-frame tokens [B, H'·W', D]) of the reference latent video."""
        add = self.before_proj(constrain(self.ref_in(ref_latents.astype(DTYPES[self.cfg.dtype])), TOKENS))
        return constrain(add, TOKENS), self.embed(ref_latents[:, :1])

    @with_precision
    def __call__(self, latents, timesteps, text, pooled, ref_latents, audio_windows, *, text_mask=None,
                 face_mask=None, mask_scale=1.0, fps=RELEASED["fps"], motion_exp=RELEASED["motion_exp"],
                 motion_pose=RELEASED["motion_pose"], single_cache=None):
        cfg = self.cfg
        b, f, h, w, _ = latents.shape
        if tuple(ref_latents.shape) != tuple(latents.shape):
            raise ValueError(f"ref_latents have shape {tuple(ref_latents.shape)}; expected {tuple(latents.shape)} "
                             "(the reference image's latent video, one per window)")
        want = (b, 4 * f - 3, cfg.audio_window, cfg.audio_layers, cfg.audio_channels)
        if tuple(audio_windows.shape) != want:
            raise ValueError(f"audio_windows have shape {tuple(audio_windows.shape)}; expected {want} "
                             f"(4F − 3 video frames of whisper windows for F = {f} latent frames)")
        _vector_inputs(fps, motion_exp, motion_pose, b)  # named before anything runs
        pt, ph, pw = cfg.patch_size
        gh, gw = h // ph, w // pw
        vec = self.avatar_vector(fps, motion_exp, motion_pose, b)
        if single_cache is not None and not isinstance(single_cache, str):  # reuse: the last single block + head
            return super().__call__(latents, timesteps, text, pooled, text_mask=text_mask,
                                    extra_tokens=self.embed(ref_latents[:, :1]),
                                    extra_coords=frame_coords(gh, gw, t=-1), extra_vec=vec, single_cache=single_cache)
        image_add, ref_tokens = self.reference(ref_latents)
        audio = latent_audio_tokens(self.audio_proj(audio_windows))  # [B, F, 16, D]
        inputs = dict(audio=audio, frames=f // pt, ref_tokens=gh * gw, mask_scale=jnp.asarray(mask_scale, jnp.float32))
        if face_mask is not None:
            inputs["face_mask"] = jnp.asarray(face_mask)
        return super().__call__(
            latents, timesteps, text, pooled, text_mask=text_mask, extra_tokens=ref_tokens,
            extra_coords=frame_coords(gh, gw, t=-1), extra_vec=vec, image_add=image_add,
            dual_hook=(self.audio_adapters, cfg.adapter_layers), hook_inputs=inputs, single_cache=single_cache)


def feature_cache_schedule(steps: int = 50, *, warmup: int = 15, every: int = 5, tail: int = 9) -> np.ndarray:
    """bool [steps]: True where the released sampler reuses the cached last-single-block input instead of a
    full forward (B.7). Full passes: steps < warmup, every `every`-th step, the last `tail` steps; for 50 steps
    full at 0-14, 15, 20, ..., 40, 41-49 and reuse at 16-19, 21-24, 26-29, 31-34, 36-39 (20 steps)."""
    i = np.arange(steps)
    return (i >= warmup) & (i < steps - tail) & (i % every != 0)


def build_model(cfg: HunyuanAvatarConfig, seed: int = 0) -> HunyuanAvatar:
    return HunyuanAvatar(cfg, rngs=nnx.Rngs(seed))


def avatar_flops(cfg: HunyuanAvatarConfig, rows: int, frames: int, height: int, width: int, text_len: int) -> float:
    """Forward matmul + attention FLOPs (2 per multiply-add) of `rows` samples: every parameter once per token
    of its stream, plus 4·L²·D per joint attention (QKᵀ and PV)."""
    d, m = cfg.dim, cfg.mlp_dim
    video = frames * (height // 2) * (width // 2)
    img = video + (height // 2) * (width // 2)
    seq = img + text_len
    dual = 2 * (img + text_len) * (4 * d * d + 2 * d * m) + 4 * seq * seq * d
    single = 2 * seq * (3 * d * d + d * m + (d + m) * d) + 4 * seq * seq * d
    adapter = 2 * video * (cfg.adapter_inner * d * 2) + 2 * frames * 16 * 2 * cfg.adapter_inner * d
    return rows * (cfg.num_layers * dual + cfg.num_single_layers * single + len(cfg.adapter_layers) * adapter)

"""Portrait-conditioning inputs as pure functions: masked multi-task input (EchoMimicV3 / Wan-InP),
motion frames for long videos (Hallo3, LetsTalk), face masks for the face-aware audio adapter
(HunyuanVideo-Avatar, EchoMimicV3) and condition dropout for classifier-free guidance.

Conventions (channels last):
- pixel mask [T, H, W]: 1 = generate, 0 = keep (known). Latent mask [F, h, w, 4]: the first frame's
  pixel mask is repeated 4 times so every latent frame owns 4 pixel frames, each group is resized to the
  latent grid (nearest), and the result is inverted: **1 = known**.
- masked video: known pixels kept, generated pixels set to 0 (mid-grey in [-1, 1]); VAE-encoded it is
  the masked-video latent. Model input = [noisy latent (16), latent mask (4), masked-video latent (16)].
- condition dropout returns per-sample *keep* flags; a dropped condition is replaced by zeros (the
  unconditional branch of classifier-free guidance zeroes text and audio, as Hallo3 does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("t2v", "i2v", "first_last", "continuation", "region")


def pixel_mask(task: str, frames: int, height: int, width: int, *, known_frames: int = 1,
               box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """float32 [T, H, W], 1 = generate.

    t2v: everything generated; i2v: frame 0 known; first_last: first and last frames known;
    continuation: the first `known_frames` known; region: the pixels inside `box` = (x0, y0, x1, y1)
    generated in every frame (e.g. the mouth), the rest known.
    """
    mask = np.ones((frames, height, width), np.float32)
    if task == "t2v":
        pass
    elif task == "i2v":
        mask[0] = 0
    elif task == "first_last":
        mask[0] = mask[-1] = 0
    elif task == "continuation":
        if not 0 < known_frames <= frames:
            raise ValueError(f"continuation: known_frames={known_frames} must be in 1..{frames}")
        mask[:known_frames] = 0
    elif task == "region":
        if box is None:
            raise ValueError("region task needs box=(x0, y0, x1, y1)")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"region box {box} is empty or outside the {width}x{height} frame")
        mask[:] = 0
        mask[:, y0:y1, x0:x1] = 1
    else:
        raise ValueError(f"mask task {task!r}: expected one of {TASKS}")
    return mask


def latent_mask(mask: np.ndarray, *, temporal_stride: int = 4, spatial_stride: int = 8) -> np.ndarray:
    """Pixel mask [T, H, W] (1 = generate) -> latent mask [F, h, w, stride_t] (1 = known)."""
    t, h, w = mask.shape
    if (t - 1) % temporal_stride or h % spatial_stride or w % spatial_stride:
        raise ValueError(f"pixel mask {mask.shape}: T must be 1 + {temporal_stride}k, H and W multiples "
                         f"of {spatial_stride}")
    m = np.concatenate([np.repeat(mask[:1], temporal_stride - 1, axis=0), mask], axis=0)  # [4F, H, W]
    m = m.reshape(-1, temporal_stride, h, w)
    m = m[:, :, spatial_stride // 2::spatial_stride, spatial_stride // 2::spatial_stride]  # nearest
    return (1.0 - m).transpose(0, 2, 3, 1).astype(np.float32)


def masked_video(video: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """video [.., T, H, W, 3] in [-1, 1] with the generated pixels (mask 1) set to 0."""
    return video * (1.0 - mask[..., None])


def inpainting_input(noisy: jax.Array, mask_latent: jax.Array, masked_latent: jax.Array) -> jax.Array:
    """[noisy (C), latent mask (4), masked-video latent (C)] along channels: the 36-channel InP input."""
    return jnp.concatenate([noisy, mask_latent.astype(noisy.dtype), masked_latent.astype(noisy.dtype)], axis=-1)


def motion_channels(motion: jax.Array, num_frames: int) -> jax.Array:
    """Motion-frame latents [B, n, h, w, C] zero-padded over the remaining latent frames -> [B, F, h, w, C],
    to be concatenated with the noisy latent along channels (Hallo3)."""
    n = motion.shape[1]
    if n > num_frames:
        raise ValueError(f"{n} motion latent frames do not fit in {num_frames} latent frames")
    return jnp.pad(motion, ((0, 0), (0, num_frames - n), (0, 0), (0, 0), (0, 0)))


def motion_from_clip(rng: jax.Array, latents: jax.Array, n: int, *, log_sigma_mean: float = -3.0,
                     log_sigma_std: float = 0.5) -> jax.Array:
    """Training stand-in for the previous clip's last frames: the clip's own first n latent frames with
    noise of σ = exp(N(mean, std)) per sample (Hallo3's augmentation)."""
    r_sigma, r_noise = jax.random.split(rng)
    sigma = jnp.exp(log_sigma_mean + log_sigma_std * jax.random.normal(r_sigma, (latents.shape[0],)))
    first = latents[:, :n]
    return first + sigma[:, None, None, None, None] * jax.random.normal(r_noise, first.shape, first.dtype)


def face_mask_tokens(box: tuple[float, float, float, float], height: int, width: int, grid: tuple[int, int], *,
                     scale: float = 1.0) -> np.ndarray:
    """float32 [h', w']: 1 for tokens whose patch centre lies in the face box (x0, y0, x1, y1) of an
    H×W frame, the box scaled by `scale` about its centre (HunyuanVideo-Avatar uses 3)."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    gh, gw = grid
    ys = (np.arange(gh) + 0.5) * height / gh
    xs = (np.arange(gw) + 0.5) * width / gw
    inside = (np.abs(ys[:, None] - cy) <= hh) & (np.abs(xs[None, :] - cx) <= hw)
    return inside.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DropoutConfig:
    """Per-sample condition dropout for classifier-free guidance.

    Base probabilities drop each condition independently. With `phases`, the timestep decides too
    (EchoMimicV3): σ ≥ early_sigma (early sampling steps, mostly noise): text only (audio and reference
    dropped); late_sigma ≤ σ < early_sigma: the base probabilities; σ < late_sigma: additionally one or
    two of the three modalities dropped at random, each with probability `late_drop`.
    """

    p_text: float = 0.1
    p_audio: float = 0.1
    p_ref: float = 0.05
    phases: bool = False
    early_sigma: float = 0.8
    late_sigma: float = 0.2
    late_drop: float = 0.5


def condition_dropout(rng: jax.Array, sigma: jax.Array, cfg: DropoutConfig) -> dict[str, jax.Array]:
    """Keep flags {"text", "audio", "ref"}: bool [B], reproducible from `rng`."""
    b = sigma.shape[0]
    r_base, r_late, r_count, r_pick = jax.random.split(rng, 4)
    base = jax.random.uniform(r_base, (3, b)) >= jnp.array([cfg.p_text, cfg.p_audio, cfg.p_ref])[:, None]
    keep = {"text": base[0], "audio": base[1], "ref": base[2]}
    if not cfg.phases:
        return keep
    early = sigma >= cfg.early_sigma
    late = sigma < cfg.late_sigma
    # late phase: with probability late_drop, drop 1 or 2 (equally likely) distinct modalities
    drop_late = late & (jax.random.uniform(r_late, (b,)) < cfg.late_drop)
    count = 1 + jax.random.bernoulli(r_count, 0.5, (b,)).astype(jnp.int32)
    order = jnp.argsort(jax.random.uniform(r_pick, (b, 3)), axis=-1)  # a random permutation per sample
    rank = jnp.argsort(order, axis=-1)  # rank of modality m in that permutation
    dropped = drop_late[:, None] & (rank < count[:, None])  # [B, 3]: text, audio, ref
    return {
        "text": keep["text"] & ~dropped[:, 0],
        "audio": keep["audio"] & ~early & ~dropped[:, 1],
        "ref": keep["ref"] & ~early & ~dropped[:, 2],
    }


def apply_keep(x: jax.Array | None, keep: jax.Array) -> jax.Array | None:
    """Zero the samples of x [B, ...] whose keep flag is False."""
    if x is None:
        return None
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))

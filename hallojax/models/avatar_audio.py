"""HunyuanVideo-Avatar's audio path, as its released code builds it: whisper windows per video frame, the
audio projector (4 tokens per video frame), their grouping into 16 tokens per latent frame, the face mask
on the token grid, and the Face-Aware Audio Adapter that adds audio to the video tokens.

    windows = encode_avatar_audio(whisper_model, wav)                        # [1, T, 10, 5, 384], T >= 129
    # = pad_for_inference(audio_windows(whisper.encode_audio(whisper_model, wav, mel_dtype="float16"),
    #                                   num_video_frames(len(wav))))
    tokens = latent_audio_tokens(projector(windows[:, :129]))                # [1, 33, 16, 3072]
    img = adapter(img, tokens, mask, frames=33, ref_tokens=R, mask_scale=0.6 if step < 10 else 1.0)

Windows: the whisper states (50 Hz, every hidden state) get 4 zero frames in front; video frame f (25 fps)
takes the 10 frames starting at 2f of that padded sequence, i.e. whisper frames [2f−4, 2f+6) (stride 4 at
12.5 fps). T = samples // 640 whatever the fps, capped at 400. Projector (``AudioProjNet2``): the window
[10, 5, 384] flattened window-major -> ReLU(Linear 1024) -> ReLU(Linear 1024) -> Linear 4·3072 -> 4 tokens
-> LayerNorm (eps 1e-5). Latent frames: frame 0's tokens repeated 3 more times in front, so latent frame 0
holds audio frame 0 four times and latent frame j ≥ 1 audio frames 4j−3..4j (T = 4F − 3), 16 tokens each.

Adapter (``PerceiverAttentionCA``, one per odd dual block 1, 3, ..., 19): single-head cross-attention,
inner 1024, per latent frame: q = to_q(LN2(that frame's video tokens)), [k | v] = to_kv(LN1(its 16 audio
tokens)), softmax(q·kᵀ/√1024) in float32, to_out (zero-initialised, no bias, no gate), times the face mask
(times `mask_scale`: the pipeline's 0.6 for the first 10 steps). The prepended reference-frame tokens get
no update. LayerNorms are affine, eps 1e-5, float32; no projection has a bias.

Parameter names follow the released keys, so a converter maps them one to one (PyTorch [out, in] weights
transposed to our [in, out] kernels; LayerNorm weight -> scale):

    audio_proj.proj{1,2,3}.{weight,bias}          -> AudioProjection.proj{1,2,3}.{kernel,bias}  [19200,1024] ...
    audio_proj.norm.{weight,bias}                 -> AudioProjection.norm.{scale,bias}          [3072]
    audio_adapter_blocks.{i}.norm{1,2}.{weight,bias} -> FaceAwareAudioAdapter.norm{1,2}.{scale,bias} [3072]
    audio_adapter_blocks.{i}.to_q.weight (1024,3072) -> .to_q.kernel [3072, 1024]
    audio_adapter_blocks.{i}.to_kv.weight (2048,3072) -> .to_kv.kernel [3072, 2048] (columns [k | v])
    audio_adapter_blocks.{i}.to_out.weight (3072,1024) -> .to_out.kernel [1024, 3072]

`hallojax.convert.avatar_audio` holds that table (`audio_rules`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.nn.audio import local_attention
from hallojax.nn.layers import Dense, LayerNorm

ADAPTER_BLOCKS = (1, 3, 5, 7, 9, 11, 13, 15, 17, 19)  # dual blocks (0-based) followed by an adapter
WINDOW = 10  # whisper frames per video frame
FRONT_PAD = 4  # zero whisper frames in front
MAX_FRAMES = 400  # encode_audio's cap on video frames
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps: the release counts frames this way whatever the fps
STRIDES = {25: 2, 12.5: 4}  # whisper frames per video frame
WINDOW_FRAMES = 129  # video frames per 33-latent-frame window
FACE_AREA = 3.0  # the face box's sides are scaled by this about its centre


# --- whisper windows per video frame ---

def num_video_frames(num_samples: int) -> int:
    """The release's audio length in video frames: 16 kHz samples // 640 (at any fps)."""
    return int(num_samples) // SAMPLES_PER_FRAME


def window_indices(num_frames: int, fps: float = 25) -> np.ndarray:
    """int [T, 10]: per video frame, the indices into the front-padded whisper sequence (index i is whisper
    frame i − 4; indices 0..3 are the zero frames). T = min(num_frames, 400)."""
    if fps not in STRIDES:
        raise ValueError(f"fps={fps}: HunyuanVideo-Avatar's audio windows support only {sorted(STRIDES)} fps")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
    t = min(int(num_frames), MAX_FRAMES)
    return STRIDES[fps] * np.arange(t)[:, None] + np.arange(WINDOW)[None, :]


def audio_windows(states: jax.Array, num_frames: int, fps: float = 25) -> jax.Array:
    """whisper states [B, A, layers, D] (every hidden state, 50 Hz) -> [B, T, 10, layers, D] per video frame."""
    if states.ndim != 4:
        raise ValueError(f"whisper states have shape {tuple(states.shape)}; expected [B, frames, layers, D] "
                         "(whisper.encode_audio)")
    idx = window_indices(num_frames, fps)
    available = states.shape[1] + FRONT_PAD
    if idx[-1, -1] >= available:
        raise ValueError(f"{idx.shape[0]} video frames at {fps} fps need whisper frames up to {idx[-1, -1] - FRONT_PAD}"
                         f", but only {states.shape[1]} are given")
    padded = jnp.concatenate([jnp.zeros_like(states[:, :FRONT_PAD]), states], axis=1)
    return padded[:, jnp.asarray(idx)]


def pad_for_inference(windows: jax.Array) -> jax.Array:
    """The sampling script's padding with zero windows: up to 129 frames, or 5 more when longer."""
    t = windows.shape[1]
    extra = WINDOW_FRAMES - t if t <= WINDOW_FRAMES else 5
    return jnp.concatenate([windows, jnp.zeros((windows.shape[0], extra, *windows.shape[2:]), windows.dtype)], axis=1)


def encode_avatar_audio(whisper_model, waveform_16k, fps: float = 25, *, extractor=None) -> jax.Array:
    """The sampling script's audio input: [B, T', 10, layers, D] windows of every whisper hidden state per
    video frame, T = samples // 640 (capped at 400) padded with zero windows to 129 (or by 5 when longer).
    The log-mels are rounded to float16 as the release's dataset stores them; whisper runs on the first
    window (30 s) only."""
    from hallojax.models.encoders.whisper import encode_audio

    wav = np.asarray(waveform_16k, np.float32)
    states = encode_audio(whisper_model, wav, extractor=extractor, mel_dtype="float16")
    return pad_for_inference(audio_windows(states, num_video_frames(wav.shape[-1]), fps))


# --- audio tokens ---

class AudioProjection(nnx.Module):
    """``AudioProjNet2``: windows [B, T, window, layers, channels] -> tokens [B, T, tokens, dim]."""

    def __init__(self, *, window: int = WINDOW, layers: int = 5, channels: int = 384, hidden: int = 1024,
                 tokens: int = 4, dim: int = 3072, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_shape, self.tokens, self.dim = (window, layers, channels), tokens, dim
        self.proj1 = Dense(window * layers * channels, hidden, (None, "mlp"), **kw)
        self.proj2 = Dense(hidden, hidden, ("mlp", None), **kw)
        self.proj3 = Dense(hidden, tokens * dim, (None, "mlp"), **kw)
        self.norm = LayerNorm(dim, 1e-5, affine=True, axis_name="embed")
        self.dtype = dtype

    def __call__(self, windows: jax.Array) -> jax.Array:
        if windows.ndim != 5 or tuple(windows.shape[2:]) != self.in_shape:
            raise ValueError(f"audio windows have shape {tuple(windows.shape)}; expected [B, T, "
                             f"{', '.join(map(str, self.in_shape))}] (audio_windows)")
        b, t = windows.shape[:2]
        x = windows.reshape(b, t, -1).astype(self.dtype or windows.dtype)
        x = jax.nn.relu(self.proj1(x))
        x = jax.nn.relu(self.proj2(x))
        x = self.proj3(x).reshape(b, t, self.tokens, self.dim)
        return self.norm(x).astype(x.dtype)


def latent_audio_tokens(tokens: jax.Array, stride: int = 4) -> jax.Array:
    """Audio tokens per video frame [B, T, K, D] (T = 4F − 3) -> per latent frame [B, F, 4K, D]: frame 0's
    tokens repeated 3 more times in front, then groups of 4 consecutive frames."""
    b, t, k, d = tokens.shape
    if (t + stride - 1) % stride:
        raise ValueError(f"{t} audio frames do not group into latent frames: expected {stride}F − {stride - 1} "
                         f"(e.g. 129 for 33 latent frames)")
    x = jnp.concatenate([jnp.repeat(tokens[:, :1], stride - 1, axis=1), tokens], axis=1)
    return x.reshape(b, (t + stride - 1) // stride, stride * k, d)


# --- the face mask ---

def face_box_mask(height: int, width: int, box=None, area: float = FACE_AREA) -> np.ndarray:
    """float32 [H, W] binary mask of the face box (x, y, w, h) in pixels scaled by `area` per side about its
    centre and clipped to the image, as the release's `get_facemask` computes it (floor divisions, then
    integer truncation of the corners). box None (no face found): the whole image."""
    x1, y1, w, h = (0, 0, width, height) if box is None else box
    x2, y2 = x1 + w, y1 + h
    w, h = (x2 - x1) * area, (y2 - y1) * area
    cx, cy = (x2 + x1) // 2, (y2 + y1) // 2
    left, top = max(cx - w // 2, 0), max(cy - h // 2, 0)
    right, bottom = min(cx + w // 2, width), min(cy + h // 2, height)
    mask = np.zeros((height, width), np.float32)
    mask[int(top):int(bottom), int(left):int(right)] = 1.0
    return mask


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear resize (align_corners=False, no antialias)."""
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0).astype(np.float32)
    w = np.zeros((out_size, in_size), np.float32)
    np.add.at(w, (np.arange(out_size), i0), 1 - lam)
    np.add.at(w, (np.arange(out_size), i1), lam)
    return w


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index per output of torch's nearest resize: floor(i · in/out), clamped."""
    return np.minimum(np.floor(np.arange(out_size) * np.float32(in_size / out_size)).astype(np.int64), in_size - 1)


def face_mask_tokens(pixel_mask, latent_hw: tuple[int, int], frames: int, patch: int = 2) -> np.ndarray:
    """float32 [B, F·(h/p)·(w/p)]: the pixel mask [B, H, W] bilinearly resized to the latent grid (h, w),
    repeated over F latent frames and nearest-resized to the token grid, flattened (f, h, w) like the tokens."""
    m = np.asarray(pixel_mask, np.float32)
    m = m[None] if m.ndim == 2 else m
    h, w = latent_hw
    if m.ndim != 3 or h % patch or w % patch:
        raise ValueError(f"face mask of shape {np.shape(pixel_mask)} to latent grid {latent_hw} (patch {patch}): "
                         "expected [B, H, W] and a latent grid divisible by the patch")
    lat = np.einsum("oh,bhw,pw->bop", _bilinear_matrix(m.shape[1], h), m, _bilinear_matrix(m.shape[2], w))
    tok = lat[:, _nearest_index(h, h // patch)][:, :, _nearest_index(w, w // patch)]  # [B, h/p, w/p]
    return np.broadcast_to(tok[:, None], (m.shape[0], frames, *tok.shape[1:])).reshape(m.shape[0], -1).copy()


# --- the adapter ---

class FaceAwareAudioAdapter(nnx.Module):
    """``PerceiverAttentionCA``: ``adapter(img [B, R + F·S, D], audio [B, F, M, D], face_mask [B, F·S] | None,
    *, frames=F, ref_tokens=R, mask_scale=1.0) -> img`` with the masked audio attention added to the F·S
    video tokens (ordered (f, h, w)) and nothing to the R reference tokens in front."""

    def __init__(self, dim: int = 3072, inner: int = 1024, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.norm1 = LayerNorm(dim, 1e-5, affine=True, axis_name="embed")  # audio tokens
        self.norm2 = LayerNorm(dim, 1e-5, affine=True, axis_name="embed")  # video tokens
        self.to_q = Dense(dim, inner, ("embed", "heads"), **kw)
        self.to_kv = Dense(dim, 2 * inner, ("embed", "heads"), **kw)  # [k | v]
        self.to_out = Dense(inner, dim, ("heads", "embed"), kernel_init=nnx.initializers.zeros_init(), **kw)
        self.inner = inner

    def __call__(self, img: jax.Array, audio: jax.Array, face_mask: jax.Array | None = None, *, frames: int,
                 ref_tokens: int = 0, mask_scale: float | jax.Array = 1.0) -> jax.Array:
        b, n, d = img.shape
        if (n - ref_tokens) % frames or audio.ndim != 4 or audio.shape[:2] != (b, frames):
            raise ValueError(f"audio adapter: {n} tokens − {ref_tokens} reference tokens over {frames} latent "
                             f"frames, audio tokens {tuple(audio.shape)}: expected [B, {frames}, M, D] audio and "
                             "whole frames of video tokens")
        s = (n - ref_tokens) // frames
        video = img[:, ref_tokens:]
        q = self.to_q(self.norm2(video).astype(video.dtype)).reshape(b, frames, s, 1, self.inner)
        kv = self.to_kv(self.norm1(audio).astype(audio.dtype))
        k, v = (x.reshape(*audio.shape[:3], 1, self.inner) for x in jnp.split(kv, 2, axis=-1))
        out = local_attention(q, k, v, jnp.ones(audio.shape[1:3], bool))  # [B, F, S, 1, inner]
        out = self.to_out(out.reshape(b, frames * s, self.inner))
        if face_mask is not None:
            if face_mask.shape != (b, frames * s):
                raise ValueError(f"face_mask has shape {tuple(face_mask.shape)}; expected [B, {frames * s}] "
                                 "(face_mask_tokens)")
            out = out * (face_mask * mask_scale)[..., None].astype(out.dtype)
        elif not isinstance(mask_scale, (int, float)) or mask_scale != 1.0:
            out = out * jnp.asarray(mask_scale, out.dtype)
        return img.at[:, ref_tokens:].add(out.astype(img.dtype))

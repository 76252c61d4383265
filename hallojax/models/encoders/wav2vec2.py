"""wav2vec 2.0 speech encoder in Flax NNX, op for op transformers' `Wav2Vec2Model` (base and large:
group-norm or layer-norm feature extractor, post-norm or stable-layer-norm transformer).

    model, cfg = load_pretrained("ckpt/wav2vec2-base-960h")          # see `hallojax convert wav2vec2`
    feats = encode_audio(model, waveform_16k, fps=25)                 # [B, T, layers, D] per video frame

Layout is channels-last throughout ([B, time, channels]). Layers are stacked (`nnx.vmap`) and run with
`nnx.scan`; every layer's output is returned, so ``hidden_states`` has ``num_layers + 1`` entries exactly
as transformers' ``output_hidden_states=True`` (the encoder input, then each layer's output; in the
stable-layer-norm variant the last entry is before the final LayerNorm, ``last_hidden_state`` after it).

The positional convolution keeps its weight-norm parameters ``weight_g`` [K] and ``weight_v`` [K, D/G, D]
and forms ``v * (g / ‖v‖)`` (norm over everything but the kernel axis, torch's ``dim=2``) at run time,
so conversion both ways is bitwise.

Hallo3 resamples the 50 Hz convolutional features to one vector per video frame by linear interpolation
(``align_corners=True``) *before* the feature projection and transformer; ``num_frames=`` does that, and
`encode_audio` returns the per-layer states stacked as [B, T, layers, D] (Hallo3's ``hidden_states[1:]``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.models.encoders.common import activation, attention, conv1d
from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.nn.layers import MLP, Dense, LayerNorm, stacked
from hallojax.sharding import constrain

FEAT_EXTRACT_NORMS = ("group", "layer")


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config(ModelConfig):
    """Sizes of a wav2vec 2.0 encoder. Defaults are facebook/wav2vec2-base-960h (transformers config
    names in brackets where ours differ)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision", "do_normalize")

    hidden_size: int = 768
    num_layers: int = 12  # [num_hidden_layers]
    num_heads: int = 12  # [num_attention_heads]
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"  # "group": GroupNorm after conv 0 only; "layer": LayerNorm after each
    feat_extract_activation: str = "gelu"
    num_conv_pos_embeddings: int = 128  # positional conv kernel size
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False  # pre-norm layers + final LayerNorm (the "large" variants)
    layer_norm_eps: float = 1e-5
    masked_spec_embed: bool = True  # a SpecAugment mask vector is stored (mask_time_prob > 0); unused here
    do_normalize: bool = True  # the feature extractor's zero-mean unit-variance input normalisation
    sampling_rate: int = 16000
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (Hallo3 runs wav2vec2 in float32)
    precision: str = "auto"  # matmul/conv precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) >= 1):
            raise ValueError(f"wav2vec2 conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and conv_stride "
                             f"{self.conv_stride} must have the same (non-zero) length")
        if self.feat_extract_norm not in FEAT_EXTRACT_NORMS:
            raise ValueError(f"wav2vec2 feat_extract_norm={self.feat_extract_norm!r}: expected one of "
                             f"{FEAT_EXTRACT_NORMS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"wav2vec2 hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"wav2vec2 hidden_size={self.hidden_size} is not divisible by "
                             f"num_conv_pos_embedding_groups={self.num_conv_pos_embedding_groups}")
        activation(self.hidden_act)
        activation(self.feat_extract_activation)
        check_dtypes(self, "wav2vec2")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame."""
        r = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            r = (r - 1) * s + k
        return r

    def num_features(self, num_samples: int) -> int:
        """Output frames of the convolutional feature encoder for `num_samples` input samples."""
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = (n - k) // s + 1
        return n



class Wav2Vec2Output(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, D]
    hidden_states: jax.Array  # [num_layers + 1, B, T, D]
    extract_features: jax.Array  # [B, T, C]: the normalised convolutional features (before projection)


class ChannelGroupNorm(nnx.Module):
    """GroupNorm with one group per channel (torch `GroupNorm(C, C)`): each channel normalised over time,
    in float32, eps 1e-5."""

    def __init__(self, channels: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=("embed",))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("embed",))

    def __call__(self, x):  # x [B, T, C]
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class FeatureConv(nnx.Module):
    """Conv1d (no padding) -> optional norm -> activation. kernel [K, I, O]."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, *, bias: bool, norm: str | None, act: str,
                 rngs: nnx.Rngs, dtype, param_dtype):
        init = nnx.initializers.he_normal(in_axis=(0, 1), out_axis=2)
        self.kernel = nnx.Param(init(rngs.params(), (k, cin, cout), param_dtype), out_sharding=(None, None, "embed"))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=("embed",)) if bias else None
        if norm == "group":
            self.norm = ChannelGroupNorm(cout)
        elif norm == "layer":
            self.norm = LayerNorm(cout, 1e-5, affine=True, axis_name="embed")  # torch default eps
        else:
            self.norm = None
        self.stride = stride
        self.act = activation(act)
        self.dtype = dtype

    def __call__(self, x):
        y = conv1d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        y = y.astype(self.dtype)
        if self.norm is not None:
            y = self.norm(y).astype(self.dtype)
        return self.act(y.astype(jnp.float32)).astype(self.dtype)


class FeatureEncoder(nnx.Module):
    """The convolutional front end: raw samples [B, N] -> 50 Hz features [B, S, conv_dim[-1]]."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.num_convs = len(cfg.conv_dim)
        cin = 1
        for j, (cout, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            norm = "layer" if cfg.feat_extract_norm == "layer" else ("group" if j == 0 else None)
            setattr(self, f"conv{j}", FeatureConv(cin, cout, k, s, bias=cfg.conv_bias, norm=norm,
                                                  act=cfg.feat_extract_activation, rngs=rngs, dtype=dtype,
                                                  param_dtype=param_dtype))
            cin = cout

    def __call__(self, samples):
        x = samples[:, :, None]
        for j in range(self.num_convs):
            x = getattr(self, f"conv{j}")(x)
        return x


class PositionalConv(nnx.Module):
    """Weight-normalised grouped Conv1d (kernel K, padding K//2, last frame dropped when K is even) + activation."""

    def __init__(self, dim: int, k: int, groups: int, act: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        std = 2 * math.sqrt(1 / (k * dim))
        self.weight_v = nnx.Param(std * jax.random.normal(rngs.params(), (k, dim // groups, dim), param_dtype),
                                  out_sharding=(None, None, "embed"))
        self.weight_g = nnx.Param(jnp.ones((k,), param_dtype), out_sharding=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",))
        self.k, self.groups, self.act, self.dtype = k, groups, activation(act), dtype

    def weight(self) -> jax.Array:
        """torch `_weight_norm(v, g, dim=2)`: v * (g / ‖v‖), the norm per kernel tap over (in, out)."""
        v = self.weight_v[...].astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2)))
        return v * (self.weight_g[...].astype(jnp.float32) / norm)[:, None, None]

    def __call__(self, x):  # [B, T, D]
        t = x.shape[1]
        y = conv1d(x.astype(self.dtype), self.weight().astype(self.dtype), padding=self.k // 2, groups=self.groups)
        y = (y + self.bias[...].astype(jnp.float32))[:, :t]  # even K: one frame too many, the last is dropped
        return self.act(y.astype(self.dtype).astype(jnp.float32)).astype(self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.v = Dense(dim, dim, ("embed", "heads"), **kw)
        self.out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.num_heads = num_heads

    def _heads(self, x):
        x = x.reshape(*x.shape[:-1], self.num_heads, -1)
        return constrain(x, ("act_batch", "act_len", "act_heads", None))

    def __call__(self, x, key_mask=None):
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        o = attention(q, k, v, scale=q.shape[-1] ** -0.5, key_mask=key_mask)
        return self.out(o.reshape(*o.shape[:2], -1))


class EncoderLayer(nnx.Module):
    """Post-norm (base) or pre-norm (stable layer norm, large) transformer layer."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d = cfg.hidden_size
        self.attn = SelfAttention(d, cfg.num_heads, rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.attn_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.ffn = MLP(d, cfg.intermediate_size, d, activation(cfg.hidden_act), axes_in=("embed", "mlp"),
                       axes_out=("mlp", "embed"), act_axes=("act_batch", "act_len", "act_mlp"), rngs=rngs,
                       dtype=dtype, param_dtype=pdt)
        self.ffn_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.pre_norm = cfg.do_stable_layer_norm
        self.dtype = dtype

    def __call__(self, x, key_mask):
        dt = self.dtype
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x).astype(dt), key_mask)
            x = x + self.ffn(self.ffn_norm(x).astype(dt))
        else:
            x = self.attn_norm(x + self.attn(x, key_mask)).astype(dt)
            x = self.ffn_norm(x + self.ffn(x)).astype(dt)
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class Wav2Vec2(nnx.Module):
    """wav2vec 2.0 encoder.

    Call: ``model(input_values, attention_mask=None, *, num_frames=None) -> Wav2Vec2Output``
      input_values [B, N]: 16 kHz samples, normalised as transformers' Wav2Vec2FeatureExtractor does;
      attention_mask [B, N] (1 = real sample; right padding) as the feature extractor returns it;
      num_frames: resample the convolutional features to this many frames (Hallo3) before the transformer.
    """

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d = cfg.hidden_size
        with nnx.use_eager_sharding(False):
            self.feature_encoder = FeatureEncoder(cfg, rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.proj_norm = LayerNorm(cfg.conv_dim[-1], cfg.layer_norm_eps, affine=True, axis_name="embed")
            self.proj = Dense(cfg.conv_dim[-1], d, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.masked_spec_embed = (nnx.Param(jax.random.uniform(rngs.params(), (d,), pdt), out_sharding=("embed",))
                                      if cfg.masked_spec_embed else None)
            self.pos_conv = PositionalConv(d, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups,
                                           cfg.feat_extract_activation, rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.enc_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")

            self.layers = stacked(EncoderLayer, cfg.num_layers, rngs, cfg)

    def check_inputs(self, input_values, attention_mask, num_frames):
        cfg = self.cfg
        if input_values.ndim != 2:
            raise ValueError(f"input_values have shape {tuple(input_values.shape)}; expected [B, samples]")
        if input_values.shape[1] < cfg.receptive_field:
            raise ValueError(f"input_values have {input_values.shape[1]} samples; wav2vec2 needs at least "
                             f"{cfg.receptive_field} ({cfg.receptive_field / cfg.sampling_rate * 1000:.0f} ms)")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_values.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(input_values.shape)} (one entry per sample)")
        if num_frames is not None:
            if int(num_frames) < 1:
                raise ValueError(f"num_frames={num_frames}: must be >= 1")
            if attention_mask is not None:
                raise ValueError("num_frames (resampling to video frames) cannot be combined with an attention_mask; "
                                 "encode each clip separately")

    def feature_mask(self, attention_mask, num_features: int) -> jax.Array:
        """[B, N] sample mask -> [B, S] feature mask (transformers `_get_feature_vector_attention_mask`)."""
        lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
        for k, s in zip(self.cfg.conv_kernel, self.cfg.conv_stride):
            lengths = (lengths - k) // s + 1
        return jnp.arange(num_features)[None, :] < lengths[:, None]

    @with_precision
    def __call__(self, input_values, attention_mask=None, *, num_frames: int | None = None) -> Wav2Vec2Output:
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        self.check_inputs(input_values, attention_mask, num_frames)
        feats = self.feature_encoder(jnp.asarray(input_values, jnp.float32).astype(dtype))  # [B, S, C]
        if num_frames is not None:
            feats = interpolate_features(feats, int(num_frames))
        key_mask = None if attention_mask is None else self.feature_mask(attention_mask, feats.shape[1])
        extract = self.proj_norm(feats).astype(dtype)
        x = self.proj(extract)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        if key_mask is not None:
            x = jnp.where(key_mask[..., None], x, 0).astype(dtype)
        x = x + self.pos_conv(x)
        if not cfg.do_stable_layer_norm:
            x = self.enc_norm(x).astype(dtype)

        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0))
        def run(x, layer, key_mask):
            x = layer(x, key_mask)
            return x, x

        last, per_layer = run(x, self.layers, key_mask)
        hidden_states = jnp.concatenate([x[None], per_layer], axis=0)  # [L + 1, B, T, D]
        if cfg.do_stable_layer_norm:
            last = self.enc_norm(last).astype(dtype)
        return Wav2Vec2Output(last, hidden_states, extract)


def interpolate_features(x: jax.Array, num_frames: int) -> jax.Array:
    """Linear resampling along time with aligned corners (torch `F.interpolate(mode="linear",
    align_corners=True)`, Hallo3's `linear_interpolation`): x [B, S, ...] -> [B, num_frames, ...].

    Output frame j samples input position j·(S-1)/(num_frames-1): the first and last frames coincide
    with the first and last input frames. Positions and weights are computed in float32 as torch does.
    """
    s = x.shape[1]
    if num_frames < 1 or s < 1:
        raise ValueError(f"interpolate_features: cannot resample {s} frames to {num_frames}")
    scale = np.float32(s - 1) / np.float32(num_frames - 1) if num_frames > 1 else np.float32(0)
    src = scale * np.arange(num_frames, dtype=np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), s - 1)
    i1 = np.minimum(i0 + 1, s - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    shape = (1, num_frames) + (1,) * (x.ndim - 2)
    lam = jnp.asarray(lam).reshape(shape)
    xf = x.astype(jnp.float32)
    y = jnp.take(xf, jnp.asarray(i0), axis=1) * (1 - lam) + jnp.take(xf, jnp.asarray(i1), axis=1) * lam
    return y.astype(x.dtype)


def num_video_frames(num_samples: int, fps: float, sampling_rate: int = 16000) -> int:
    """Hallo3's frame count for an audio clip: ceil(samples / rate · fps)."""
    return math.ceil(num_samples / sampling_rate * fps)


def feature_extractor(cfg: Wav2Vec2Config):
    """transformers' `Wav2Vec2FeatureExtractor` for this model, built in memory (no files)."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=cfg.sampling_rate, padding_value=0.0,
                                    do_normalize=cfg.do_normalize, return_attention_mask=False)


@nnx.jit(static_argnames=("num_frames",))
def _forward_frames(model: Wav2Vec2, input_values, num_frames: int):
    return model(input_values, num_frames=num_frames).hidden_states


def encode_audio(model: Wav2Vec2, waveform_16k, fps: float, num_frames: int | None = None, *,
                 extractor=None) -> jax.Array:
    """Per-video-frame audio features, as Hallo3 computes them: [B, T, num_layers, D].

    waveform_16k: [N] or [B, N] float samples at the model's sampling rate (16 kHz), equal lengths;
    fps: video frame rate; num_frames: T (default ceil(N / 16000 · fps)). The waveform is normalised by
    transformers' `Wav2Vec2FeatureExtractor` (`extractor`, default built from the config), the 50 Hz
    convolutional features are linearly resampled to T frames, and the outputs of every transformer
    layer (``hidden_states[1:]``) are stacked on axis 2. Runs under the active mesh/rules if any.
    """
    cfg = model.cfg
    wav = np.asarray(waveform_16k, np.float32)
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2 or wav.shape[1] == 0:
        raise ValueError(f"waveform has shape {tuple(np.shape(waveform_16k))}; expected [samples] or [B, samples]")
    if fps is None or not fps > 0:
        raise ValueError(f"fps={fps!r}: must be positive")
    if num_frames is None:
        num_frames = num_video_frames(wav.shape[1], fps, cfg.sampling_rate)
    extractor = extractor or feature_extractor(cfg)
    values = extractor(list(wav), sampling_rate=cfg.sampling_rate, return_tensors="np").input_values
    values = np.asarray(values, np.float32)
    model.check_inputs(values, None, num_frames)
    hidden = _forward_frames(model, values, int(num_frames))  # [L + 1, B, T, D]
    return jnp.transpose(hidden[1:], (1, 2, 0, 3))


class Wav2Vec2Features:
    """wav2vec2 behind the data pipeline's audio-feature hook (spec "wav2vec2:PATH"): a callable
    (waveform [B, S] at 16 kHz, fps, num_frames) -> [B, num_frames, layers, D] float32 numpy."""

    def __init__(self, model: Wav2Vec2):
        self.model = model
        self.extractor = feature_extractor(model.cfg)

    @classmethod
    def load(cls, path: str | None) -> "Wav2Vec2Features":
        if not path:
            raise ValueError("audio features 'wav2vec2' need a path: 'wav2vec2:DIR' (from `hallojax convert wav2vec2`)")
        from hallojax.checkpoint import load_pretrained

        model, _ = load_pretrained(path)
        if not isinstance(model, Wav2Vec2):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a wav2vec2 model")
        return cls(model)

    def __call__(self, waveform, fps: float, num_frames: int):
        return np.asarray(encode_audio(self.model, waveform, fps, num_frames, extractor=self.extractor), np.float32)


@nnx.jit
def _forward_last(model: Wav2Vec2, input_values):
    return model(input_values).last_hidden_state


class Wav2Vec2Tokens(Wav2Vec2Features):
    """The last hidden state at wav2vec2's own rate (50 Hz at 16 kHz), r = 50 / fps tokens per video frame, as
    [B, num_frames, r, D] (spec "wav2vec2-tokens:PATH"): EchoMimicV3 preview's audio input (wav2vec2-base-960h,
    2 tokens per 25-fps frame). The waveform is encoded whole, then the token sequence is cut or zero-padded
    to exactly r·num_frames (the encoder gives one token fewer than 50 per second)."""

    def __call__(self, waveform, fps: float, num_frames: int):
        rate = self.model.cfg.sampling_rate / math.prod(self.model.cfg.conv_stride)  # 50 Hz
        r = rate / fps
        if abs(r - round(r)) > 1e-6 or r < 1:
            raise ValueError(f"audio features wav2vec2-tokens: {rate:g} Hz tokens do not divide into "
                             f"{fps:g} fps frames")
        r = round(r)
        wav = np.asarray(waveform, np.float32)
        wav = wav[None] if wav.ndim == 1 else wav
        values = np.asarray(self.extractor(list(wav), sampling_rate=self.model.cfg.sampling_rate,
                                           return_tensors="np").input_values, np.float32)
        self.model.check_inputs(values, None, None)
        tokens = np.asarray(_forward_last(self.model, values), np.float32)[:, :r * num_frames]  # [B, S, D]
        tokens = np.pad(tokens, ((0, 0), (0, r * num_frames - tokens.shape[1]), (0, 0)))
        return tokens.reshape(tokens.shape[0], num_frames, r, -1)

"""The Whisper speech encoder in Flax NNX, op for op transformers' `WhisperEncoder` (the encoder half of
`WhisperModel`): HunyuanVideo-Avatar's audio encoder (whisper-tiny, all hidden states).

    model, cfg = load_pretrained("ckpt/whisper-tiny")         # see `hallojax convert whisper`
    states = encode_audio(model, waveform_16k)                 # [B, 1500, 5, 384]: every hidden state, 50 Hz

Layout is channels-last: the log-mel input is [B, frames, mels] (transformers' extractor gives
[B, mels, frames]; `encode_audio` transposes). Front end: Conv1d(mels -> D, k 3, pad 1) -> exact-erf GELU ->
Conv1d(D -> D, k 3, stride 2, pad 1) -> GELU, then the positional table ``embed_positions`` [P, D] added
as stored (a parameter: the checkpoint's sinusoids, initialised with transformers' `sinusoids`); the input
must have exactly 2·P frames (3000 = 30 s for P = 1500), as transformers requires. Then pre-LN layers
(k projection without bias, FFN with ``hidden_act``) and a final LayerNorm (eps 1e-5, torch's default).

``hidden_states`` has ``num_layers + 1`` entries exactly as transformers' ``output_hidden_states=True``:
the embeddings, the outputs of layers 1..L-1, and the final LayerNorm's output (transformers ties the
last entry to ``last_hidden_state``). Numerics: matmuls/convolutions in `dtype` with float32
accumulation, LayerNorms and softmax in float32.

The log-mel front end is transformers' `WhisperFeatureExtractor` (numpy; no torch needed), built in
memory by `feature_extractor` with a window of 2·P frames (30 s for whisper-tiny).
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


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig(ModelConfig):
    """Sizes of a Whisper encoder. Defaults are openai/whisper-tiny (transformers config names in
    brackets where ours differ); `PRESETS` names the sizes."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")

    hidden_size: int = 384  # [d_model]
    num_layers: int = 4  # [encoder_layers]
    num_heads: int = 6  # [encoder_attention_heads]
    intermediate_size: int = 1536  # [encoder_ffn_dim]
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # P: the encoder sees exactly 2·P mel frames
    hidden_act: str = "gelu"  # [activation_function]; the two convolutions always use exact-erf GELU
    layer_norm_eps: float = 1e-5  # not in transformers' config: torch's LayerNorm default
    sampling_rate: int = 16000  # the feature extractor's
    hop_length: int = 160  # mel frames every 10 ms at 16 kHz
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (HunyuanVideo-Avatar runs whisper in float32)
    precision: str = "auto"  # matmul/conv precision (hallojax.modelconfig): auto = highest for float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"whisper hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if min(self.num_layers, self.max_source_positions, self.num_mel_bins, self.hop_length) < 1:
            raise ValueError(f"whisper num_layers={self.num_layers}, max_source_positions={self.max_source_positions},"
                             f" num_mel_bins={self.num_mel_bins}, hop_length={self.hop_length}: must be positive")
        if self.hidden_size % 2:
            raise ValueError(f"whisper hidden_size={self.hidden_size}: must be even (sinusoidal positions)")
        activation(self.hidden_act)
        check_dtypes(self, "whisper")

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder takes: 2·P (3000 = 30 s for whisper-tiny)."""
        return 2 * self.max_source_positions

    @property
    def chunk_samples(self) -> int:
        """Waveform samples one encoder window covers (480,000 = 30 s at 16 kHz for whisper-tiny)."""
        return self.num_frames * self.hop_length


PRESETS: dict[str, WhisperEncoderConfig] = {
    "tiny": WhisperEncoderConfig(),  # openai/whisper-tiny: 4 layers x 384, 6 heads, 80 mels, 1500 positions
    # a CPU-test size: 2 s windows (200 mel frames -> 100 positions), 2 layers x 32
    "test": WhisperEncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                 max_source_positions=100),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """transformers' `sinusoids` (the initial ``embed_positions``): [sin | cos] halves, timescales
    max_timescale^(i / (channels/2 - 1)), computed in float32 as torch does."""
    half = channels // 2
    increment = np.float32(math.log(max_timescale) / (half - 1)) if half > 1 else np.float32(0)
    inv = np.exp(-increment * np.arange(half, dtype=np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class WhisperOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, P, D] (after the final LayerNorm)
    hidden_states: jax.Array  # [num_layers + 1, B, P, D]; the last entry is last_hidden_state


class Conv(nnx.Module):
    """Conv1d (kernel 3, padding 1) + bias -> exact-erf GELU. kernel [3, I, O]."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.kernel = nnx.Param(init(rngs.params(), (3, cin, cout), param_dtype), out_sharding=(None, None, "embed"))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=("embed",))
        self.stride, self.dtype = stride, dtype

    def __call__(self, x):  # [B, T, I] -> [B, T / stride, O]
        y = conv1d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, padding=1)
        y = (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        return jax.nn.gelu(y.astype(jnp.float32), approximate=False).astype(self.dtype)


class WhisperLayer(nnx.Module):
    """Pre-LN layer: x += out(attn(LN(x))); x += fc2(act(fc1(LN(x)))). The k projection has no bias."""

    def __init__(self, cfg: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d, kw = cfg.hidden_size, dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.attn_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.q = Dense(d, d, ("embed", "heads"), **kw)
        self.k = Dense(d, d, ("embed", "heads"), use_bias=False, **kw)
        self.v = Dense(d, d, ("embed", "heads"), **kw)
        self.out = Dense(d, d, ("heads", "embed"), **kw)
        self.mlp_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.mlp = MLP(d, cfg.intermediate_size, d, activation(cfg.hidden_act), axes_in=("embed", "mlp"),
                       axes_out=("mlp", "embed"), act_axes=("act_batch", "act_len", "act_mlp"), rngs=rngs,
                       dtype=dtype, param_dtype=pdt)
        self.num_heads, self.dtype = cfg.num_heads, dtype

    def __call__(self, x):  # [B, P, D] in the compute dtype
        h = self.attn_norm(x).astype(self.dtype)
        q, k, v = (constrain(p(h).reshape(*h.shape[:2], self.num_heads, -1),
                             ("act_batch", "act_len", "act_heads", None)) for p in (self.q, self.k, self.v))
        o = attention(q, k, v, scale=q.shape[-1] ** -0.5)
        x = x + self.out(o.reshape(*o.shape[:2], -1))
        x = x + self.mlp(self.mlp_norm(x).astype(self.dtype))
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class WhisperEncoder(nnx.Module):
    """Whisper encoder: ``model(features [B, 2·P, mels]) -> WhisperOutput`` (log-mels, channels-last)."""

    def __init__(self, cfg: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d = cfg.hidden_size
        with nnx.use_eager_sharding(False):
            self.conv1 = Conv(cfg.num_mel_bins, d, 1, rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.conv2 = Conv(d, d, 2, rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.embed_positions = nnx.Param(jnp.asarray(sinusoids(cfg.max_source_positions, d), pdt),
                                             out_sharding=(None, "embed"))
            self.layers = stacked(WhisperLayer, cfg.num_layers, rngs, cfg)
            self.layer_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.dtype = dtype

    def check_inputs(self, features) -> None:
        cfg = self.cfg
        want = (cfg.num_frames, cfg.num_mel_bins)
        if features.ndim != 3 or tuple(features.shape[1:]) != want:
            raise ValueError(f"whisper input features have shape {tuple(features.shape)}; expected [B, {want[0]}, "
                             f"{want[1]}] (log-mels, channels-last, exactly 2·max_source_positions frames: "
                             "transpose the feature extractor's [B, mels, frames] and pad to the window)")

    @with_precision
    def __call__(self, features: jax.Array) -> WhisperOutput:
        self.check_inputs(features)
        x = self.conv2(self.conv1(jnp.asarray(features).astype(self.dtype)))  # [B, P, D]
        x = (x.astype(jnp.float32) + self.embed_positions[...].astype(jnp.float32)).astype(self.dtype)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(x, layer):
            x = layer(x)
            return x, x

        last, per_layer = run(x, self.layers)
        last = self.layer_norm(last).astype(self.dtype)
        # transformers' hidden_states: the embeddings, layers 1..L-1, and (tied) the final LayerNorm's output
        hidden_states = jnp.concatenate([x[None], per_layer[:-1], last[None]], axis=0)  # [L + 1, B, P, D]
        return WhisperOutput(last, hidden_states)


# --- the log-mel front end and the per-frame features ---

def feature_extractor(cfg: WhisperEncoderConfig):
    """transformers' `WhisperFeatureExtractor` for this encoder's window (2·P frames), built in memory."""
    from transformers import WhisperFeatureExtractor

    seconds, rest = divmod(cfg.chunk_samples, cfg.sampling_rate)
    if rest:
        raise ValueError(f"whisper window of {cfg.num_frames} frames x hop {cfg.hop_length} = {cfg.chunk_samples} "
                         f"samples is not a whole number of seconds at {cfg.sampling_rate} Hz (the extractor's "
                         "chunk_length)")
    return WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=cfg.sampling_rate,
                                   hop_length=cfg.hop_length, chunk_length=seconds)


def log_mel(cfg: WhisperEncoderConfig, waveform_16k, *, extractor=None) -> np.ndarray:
    """float32 [B, 2·P, mels]: the log-mel spectrogram of each clip's first window (30 s for whisper-tiny),
    zero-padded to the window, as transformers' `WhisperFeatureExtractor` computes it."""
    wav = np.asarray(waveform_16k, np.float32)
    wav = wav[None] if wav.ndim == 1 else wav
    if wav.ndim != 2 or wav.shape[1] == 0:
        raise ValueError(f"waveform has shape {tuple(np.shape(waveform_16k))}; expected [samples] or [B, samples]")
    extractor = extractor or feature_extractor(cfg)
    feats = extractor(list(wav[:, :cfg.chunk_samples]), sampling_rate=cfg.sampling_rate,
                      return_tensors="np").input_features  # [B, mels, 2·P]
    feats = np.asarray(feats, np.float32).transpose(0, 2, 1)
    if feats.shape[1:] != (cfg.num_frames, cfg.num_mel_bins):
        raise ValueError(f"feature extractor returned {feats.shape[1:]} per clip; the encoder needs "
                         f"({cfg.num_frames}, {cfg.num_mel_bins}) (extractor built for another window?)")
    return feats


_forward = nnx.jit(lambda model, feats: model(feats).hidden_states)


def encode_audio(model: WhisperEncoder, waveform_16k, *, extractor=None, mel_dtype: str = "float32") -> jax.Array:
    """Every hidden state per 20 ms encoder frame: [B, P, num_layers + 1, D] (1500 x 5 x 384 for
    whisper-tiny), i.e. transformers' ``torch.stack(hidden_states, dim=2)`` over the first window.

    waveform_16k: [N] or [B, N] float samples at 16 kHz (equal lengths); audio past the first window
    (30 s) is not encoded (HunyuanVideo-Avatar reads only the first 3000 mel frames). mel_dtype: round
    the log-mels to this dtype before the encoder ("float16" reproduces HunyuanVideo-Avatar's dataset,
    which stores them as float16 before its float32 encoder). Runs under the active mesh/rules if any.
    """
    feats = log_mel(model.cfg, waveform_16k, extractor=extractor)
    if mel_dtype not in DTYPES:
        raise ValueError(f"mel_dtype={mel_dtype!r}: expected one of {sorted(DTYPES)}")
    feats = np.asarray(jnp.asarray(feats).astype(DTYPES[mel_dtype]).astype(jnp.float32))
    model.check_inputs(feats)
    return jnp.transpose(_forward(model, feats), (1, 2, 0, 3))

"""The CLIP image encoder of Wan I2V / Wan-Fun-InP / EchoMimicV3 in Flax NNX: the visual tower of open-clip's
XLM-RoBERTa ViT-H/14, run to its penultimate block, as transformers' `CLIPVisionModel`
``hidden_states[-2]`` (what diffusers' Wan I2V pipeline uses) and Wan's ``visual(..., use_31_block=True)``.

    model, cfg = load_pretrained("ckpt/clip-vit-h")                # hallojax convert clip SRC OUT
    tokens = encode_image(model, frame_uint8)                        # [1, 257, 1280]: the DiT's image_context

Tower: patch embedding (Conv2d, no bias) + class token + learned positions, LayerNorm, then pre-norm blocks
(attention with q/k/v/out biases, MLP with exact-erf GELU for ViT-H). `num_layers` is the number of blocks
RUN: the checkpoint's last block (and its post-norm / projection head) are not part of this model, so a
32-block tower converts to 31 blocks. Numerics: matmuls in `dtype` with float32 accumulation, LayerNorms
and softmax in float32.

Preprocessing (`preprocess`), as the Wan / EchoMimicV3 pipelines do it: the frame at the video's size in
[−1, 1], resized to 224×224 by bicubic interpolation without antialiasing (torch `F.interpolate(mode=
"bicubic", align_corners=False)`, a = −0.75, borders clamped), mapped to [0, 1] and normalised with
CLIP's mean and std.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.models.encoders.common import activation, attention
from hallojax.nn.layers import MLP, Dense, LayerNorm, stacked
from hallojax.modelconfig import DTYPES, ModelConfig, check_dtypes, with_precision
from hallojax.sharding import constrain

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ModelConfig):
    """Defaults: open-clip XLM-RoBERTa ViT-H/14 run to block 31 of 32 (transformers names in brackets)."""

    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "precision")

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1280
    num_layers: int = 31  # blocks run: [num_hidden_layers] − 1 (the penultimate block's output)
    num_heads: int = 16  # [num_attention_heads]
    intermediate_size: int = 5120
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"
    precision: str = "auto"

    def __post_init__(self):
        activation(self.hidden_act)
        check_dtypes(self, "clip")
        if self.image_size % self.patch_size or self.hidden_size % self.num_heads or self.num_layers < 1:
            raise ValueError(f"clip: image_size {self.image_size} / patch {self.patch_size}, hidden {self.hidden_size} "
                             f"/ heads {self.num_heads}, num_layers {self.num_layers}: sizes do not fit")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d, kw = cfg.hidden_size, dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.q, self.k, self.v = (Dense(d, d, ("embed", "heads"), **kw) for _ in range(3))
        self.out = Dense(d, d, ("heads", "embed"), **kw)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")
        self.mlp = MLP(d, cfg.intermediate_size, d, activation(cfg.hidden_act), axes_in=("embed", "mlp"),
                       axes_out=("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=pdt)
        self.num_heads, self.dtype = cfg.num_heads, dtype

    def __call__(self, x):  # [B, L, D] in the compute dtype
        h = self.norm1(x).astype(self.dtype)
        q, k, v = (p(h).reshape(*h.shape[:2], self.num_heads, -1) for p in (self.q, self.k, self.v))
        o = attention(q, k, v, scale=q.shape[-1] ** -0.5)
        x = x + self.out(o.reshape(*o.shape[:2], -1))
        x = x + self.mlp(self.norm2(x).astype(self.dtype))
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class CLIPVision(nnx.Module):
    """``model(pixels [B, 224, 224, 3] normalised) -> [B, 1 + P, D]``: the last run block's output."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d, p = cfg.hidden_size, cfg.patch_size
        with nnx.use_eager_sharding(False):
            init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
            self.patch_kernel = nnx.Param(init(rngs.params(), (p, p, 3, d), pdt),
                                          out_sharding=(None, None, None, "embed"))
            self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), pdt) * d**-0.5,
                                             out_sharding=("embed",))
            self.position_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_positions, d), pdt) * d**-0.5,
                                                out_sharding=(None, "embed"))
            self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, affine=True, axis_name="embed")

            self.layers = stacked(CLIPLayer, cfg.num_layers, rngs, cfg)
        self.dtype = dtype

    @with_precision
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        s, p = cfg.image_size, cfg.patch_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels have shape {tuple(pixels.shape)}; expected [B, {s}, {s}, 3] (see preprocess)")
        b, g = pixels.shape[0], s // p
        x = pixels.astype(self.dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)  # [B, g, g, p, p, 3]
        x = jnp.einsum("bijhwc,hwcd->bijd", x, self.patch_kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32).reshape(b, g * g, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(jnp.float32)
        x = self.pre_norm(x).astype(self.dtype)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, layer):
            return layer(x)

        return run(x, self.layers)


def _cubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out, in] resampling matrix of torch's bicubic (align_corners=False, no antialias, clamped borders)."""
    scale = in_size / out_size  # positions in float64: torch's own float32 ones are off by up to ~1e-5 pixels
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for j, d in zip(range(base - 1, base + 3), (1 + t, t, 1 - t, 2 - t)):
            c = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else (((d - 5) * d + 8) * d - 4) * a
            w[i, min(max(j, 0), in_size - 1)] += c
    return w.astype(np.float32)


def preprocess(frame, size: int = 224) -> np.ndarray:
    """float32 [1, size, size, 3]: a frame (uint8 [H, W, 3], or float in [−1, 1]) as Wan's CLIP sees it."""
    x = np.asarray(frame)
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
    h, w = x.shape[:2]
    x = np.einsum("oh,hwc->owc", _cubic_weights(h, size), x)
    x = np.einsum("pw,owc->opc", _cubic_weights(w, size), x)
    return (((x * 0.5 + 0.5) - MEAN) / STD)[None].astype(np.float32)


_forward = nnx.jit(lambda model, pixels: model(pixels))


def encode_image(model: CLIPVision, frame) -> jax.Array:
    """The DiT's image context [1, 1 + P, D] for one frame (uint8 [H, W, 3] or float in [−1, 1])."""
    return _forward(model, jnp.asarray(preprocess(frame, model.cfg.image_size)))

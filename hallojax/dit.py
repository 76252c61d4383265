"""The Wan-family video DiT in Flax NNX, op for op the diffusers `WanTransformer3DModel`.

Latents are channels-last [B, F, H, W, C]. Tokens are ordered (f, h, w) after a (pt, ph, pw) patch
embedding. Blocks are created stacked (`nnx.vmap`) and run with `nnx.scan`, so compile time does not
grow with depth and the stacked parameters carry a leading ``layers`` axis. Parameters are kept in
`param_dtype` (float32 by default); matmuls run in `dtype` (bfloat16 by default). As in the reference
(diffusers' `_keep_in_fp32_modules`), norms, the timestep MLP and the modulation tables are float32
parameters computed in float32 whatever `param_dtype` is; the timestep embedding is rounded to `dtype`
before the 6-way projection, which runs in `dtype`, and modulation is applied in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hallojax.attention import ATTENTION_IMPLS, Attention
from hallojax.layers import MLP, Dense, LayerNorm, gelu_erf, gelu_tanh, timestep_embedding
from hallojax.rope import grid_coords, rope_cos_sin
from hallojax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "offload_attn_out": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["attn_out"],
        offload_src="device", offload_dst="pinned_host"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Sizes and numerics of a Wan-family DiT. Defaults are Wan2.1-T2V-1.3B (diffusers config names
    in brackets where ours differ)."""

    # fields that change numerics but no parameter shape (safe to override when loading)
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype", "remat", "attention")

    num_layers: int = 30
    num_heads: int = 12  # [num_attention_heads]
    head_dim: int = 128  # [attention_head_dim]
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    image_dim: int | None = None  # I2V: CLIP image-embedding width (1280)
    added_kv_proj_dim: int | None = None  # I2V: width of the added K/V input (= dim)
    pos_embed_seq_len: int | None = None  # FLF2V: learned position embedding over image tokens
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype of matmuls and the residual stream
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "xla"  # one of ATTENTION_IMPLS

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"model.patch_size={self.patch_size}: expected three positive ints (t, h, w)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected one of {sorted(DTYPES)}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"model.head_dim={self.head_dim}: must be even and >= 6 for 3D RoPE")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("model.image_dim and model.added_kv_proj_dim must be set together (I2V)")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("model.pos_embed_seq_len needs the image path (model.image_dim)")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("model.attention='cudnn' needs dtype bfloat16 or float16 (cuDNN flash attention)")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def replace(self, **kw) -> "DiTConfig":
        return dataclasses.replace(self, **kw)


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = patch, as one matmul over patches. kernel [pt, ph, pw, C, D]."""

    def __init__(self, patch, in_channels: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.patch = tuple(patch)
        init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(init(rngs.params(), (*patch, in_channels, dim), param_dtype),
                                out_sharding=(None, None, None, None, "embed"), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, F', H', W', pt, ph, pw, C]
        x = x.reshape(b, -1, pt, ph, pw, c).astype(self.dtype)  # [B, L, pt, ph, pw, C]
        y = jnp.einsum("blthwc,thwcd->bld", x, self.kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class ImageEmbedder(nnx.Module):
    """I2V image-token embedder: LayerNorm -> FeedForward(mult 1, erf GELU) -> LayerNorm (eps 1e-5)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None, *, rngs, dtype, param_dtype):
        self.norm1 = LayerNorm(image_dim, 1e-5, affine=True)
        self.ff = MLP(image_dim, image_dim, dim, gelu_erf, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                      rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = LayerNorm(dim, 1e-5, affine=True, axis_name="embed")
        self.pos_embed = (nnx.Param(jnp.zeros((1, pos_embed_seq_len, image_dim), param_dtype),
                                    out_sharding=(None, None, None), eager_sharding=False)
                          if pos_embed_seq_len is not None else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"image context has {x.shape[1]} tokens; this model's position embedding "
                                 f"expects {self.pos_embed.shape[1]} (both frames' tokens concatenated)")
            x = x + self.pos_embed[...].astype(x.dtype)
        h = self.norm1(x).astype(self.dtype)
        h = self.ff(h)
        return self.norm2(h).astype(self.dtype)


class WanBlock(nnx.Module):
    """adaLN-modulated self-attention (3D RoPE), cross-attention, GELU-tanh FFN."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt, impl=cfg.attention)
        self.scale_shift_table = nnx.Param(  # float32 whatever param_dtype: it is the modulation
            jax.random.normal(rngs.params(), (1, 6, dim), jnp.float32) / dim**0.5,
            out_sharding=(None, None, "embed"), eager_sharding=False)
        self.norm1 = LayerNorm(dim, cfg.eps, affine=False)
        self.attn1 = Attention(dim, cfg.num_heads, eps=cfg.eps, **kw)
        self.norm2 = LayerNorm(dim, cfg.eps, affine=True, axis_name="embed") if cfg.cross_attn_norm else None
        self.attn2 = Attention(dim, cfg.num_heads, eps=cfg.eps, added_kv_dim=cfg.added_kv_proj_dim, **kw)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=False)
        self.ffn = MLP(dim, cfg.ffn_dim, dim, gelu_tanh, axes_in=("embed", "mlp"), axes_out=("mlp", "embed"),
                       act_axes=("act_batch", "act_len", "act_mlp"), rngs=rngs, dtype=dtype, param_dtype=pdt)

    def __call__(self, x, temb6, context, rope, image_context=None):
        """x [B, L, D]; temb6 [B, 6, D]; context [B, M, D]; rope (cos, sin)."""
        dtype = x.dtype
        mod = self.scale_shift_table[...].astype(jnp.float32) + temb6.astype(jnp.float32)  # [B, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i : i + 1] for i in range(6))

        h = (self.norm1(x) * (1 + scale) + shift).astype(dtype)
        a = checkpoint_name(self.attn1(h, rope=rope), "attn_out")
        x = (x.astype(jnp.float32) + a.astype(jnp.float32) * gate).astype(dtype)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))

        h = self.norm2(x).astype(dtype) if self.norm2 is not None else x
        x = x + self.attn2(h, context, added_context=image_context).astype(dtype)

        h = (self.norm3(x) * (1 + c_scale) + c_shift).astype(dtype)
        x = (x.astype(jnp.float32) + self.ffn(h).astype(jnp.float32) * c_gate).astype(dtype)
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class WanDiT(nnx.Module):
    """Wan2.1 T2V / I2V transformer.

    Call: ``model(latents, timesteps, context, *, image_context=None, coords=None)``
      latents [B, F, H, W, C_in], timesteps [B] (0..1000, float or int), context [B, M, text_dim]
      (umT5 states; the Wan pipeline zero-pads to 512), image_context [B, 257, image_dim] (I2V only),
      coords: optional int [L, 3] or [B, L, 3] RoPE (t, h, w) coordinates of the video tokens
      (default: the grid, from 0).
    Returns [B, F, H, W, C_out] in the compute dtype.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim, dtype, pdt = cfg.dim, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        f32 = jnp.float32
        with nnx.use_eager_sharding(False):
            self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.in_channels, dim, rngs=rngs, dtype=dtype,
                                              param_dtype=pdt)
            # the timestep MLP is float32 parameters and compute (diffusers keeps it in fp32)
            # every large weight names one axis for fsdp and one for tensor, so FSDP+TP splits it fully
            self.time_embedder = MLP(cfg.freq_dim, dim, dim, jax.nn.silu, axes_in=(None, "embed"),
                                     axes_out=("embed", "mlp"), rngs=rngs, dtype=f32, param_dtype=f32)
            self.time_proj = Dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.text_embedder = MLP(cfg.text_dim, dim, dim, gelu_tanh, axes_in=("mlp", "embed"),
                                     axes_out=("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=pdt)
            self.image_embedder = (ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len, rngs=rngs,
                                                 dtype=dtype, param_dtype=pdt)
                                   if cfg.image_dim is not None else None)

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return WanBlock(cfg, rngs=r)

            self.blocks = make_blocks(rngs)
            self.norm_out = LayerNorm(dim, cfg.eps, affine=False)
            self.proj_out = Dense(dim, cfg.out_channels * cfg.patch_volume, ("embed", "mlp"), rngs=rngs,
                                  dtype=dtype, param_dtype=pdt)
            self.scale_shift_table = nnx.Param(
                jax.random.normal(rngs.params(), (1, 2, dim), f32) / dim**0.5,
                out_sharding=(None, None, "embed"), eager_sharding=False)

    def check_inputs(self, latents, timesteps, context, image_context, coords=None):
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, F, H, W, "
                             f"{cfg.in_channels}] (channels last)")
        b, f, h, w, _ = latents.shape
        for name, n, p in zip("FHW", (f, h, w), cfg.patch_size):
            if n % p:
                raise ValueError(f"latents {tuple(latents.shape)}: {name}={n} is not divisible by patch {p}")
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps have shape {tuple(timesteps.shape)}; expected [{b}]")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, M, {cfg.text_dim}]")
        if coords is not None:
            want = f * h * w // cfg.patch_volume
            if np.ndim(coords) not in (2, 3) or np.shape(coords)[-2:] != (want, 3) or (
                    np.ndim(coords) == 3 and np.shape(coords)[0] != b):
                raise ValueError(f"coords have shape {tuple(np.shape(coords))}; expected [{want}, 3] or "
                                 f"[{b}, {want}, 3] (one (t, h, w) per video token)")
        if image_context is not None:
            if cfg.image_dim is None:
                raise ValueError("image_context given to a model without an image embedder (T2V config)")
            if image_context.ndim != 3 or image_context.shape[0] != b or image_context.shape[-1] != cfg.image_dim:
                raise ValueError(f"image_context has shape {tuple(image_context.shape)}; expected "
                                 f"[{b}, M', {cfg.image_dim}]")

    def __call__(self, latents, timesteps, context, *, image_context=None, coords=None):
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        self.check_inputs(latents, timesteps, context, image_context, coords)
        b, f, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        gf, gh, gw = f // pt, h // ph, w // pw

        x = self.patch_embedding(latents)  # [B, L, D]
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        if coords is None:
            coords = grid_coords(gf, gh, gw)
        cos, sin = rope_cos_sin(coords, cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)
        if cos.ndim == 2:
            cos, sin = cos[None], sin[None]  # [1, L, K/2]

        # float32 MLP, then rounded to the compute dtype as the reference does (`temb.type_as(...)`)
        temb = self.time_embedder(timestep_embedding(timesteps, cfg.freq_dim)).astype(dtype)  # [B, D]
        temb6 = self.time_proj(jax.nn.silu(temb.astype(jnp.float32)).astype(dtype)).reshape(b, 6, cfg.dim)
        ctx = self.text_embedder(context.astype(dtype))  # [B, M, D]
        img = None
        if image_context is not None:
            img = self.image_embedder(image_context.astype(dtype))  # [B, M', D]

        policy = REMAT_POLICIES[cfg.remat]

        def body(x, block, temb6, ctx, cos, sin, img):
            return block(x, temb6, ctx, (cos, sin), img)

        if cfg.remat != "none":
            body = nnx.remat(body, policy=policy, prevent_cse=False)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None, None, None, None), out_axes=nnx.Carry)
        def run(x, block, temb6, ctx, cos, sin, img):
            return body(x, block, temb6, ctx, cos, sin, img)

        x = run(x.astype(dtype), self.blocks, temb6, ctx, cos, sin, img)

        mod = self.scale_shift_table[...].astype(jnp.float32) + temb[:, None].astype(jnp.float32)  # [B, 2, D]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        x = (self.norm_out(x) * (1 + scale) + shift).astype(dtype)
        x = self.proj_out(x)  # [B, L, pt·ph·pw·C]
        x = x.reshape(b, gf, gh, gw, pt, ph, pw, cfg.out_channels)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, F', pt, H', ph, W', pw, C]
        return x.reshape(b, f, h, w, cfg.out_channels)


def build_model(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    return WanDiT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: DiTConfig) -> WanDiT:
    """The model with ShapeDtypeStruct leaves: free, even at 14B."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def param_count(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))

"""diffusers `CogVideoXTransformer3DModel` <-> hallojax `CogVideoXTransformer`: the name table and the config
mapping.

    hallojax convert cogvideox SRC_DIR OUT_DIR    # diffusers directory (the pipeline's 'transformer') -> ours
    hallojax export  cogvideox CKPT_DIR OUT_DIR   # ours -> a directory `from_pretrained` loads

Patch embedding: 1.0's Conv2d weight [D, C, p, p] is our kernel [1, p, p, C, D]; 1.5's Linear weight
[D, C·pt·p·p] (features ordered c, pt, p, p) is reshaped to the same [pt, p, p, C, D] layout. The learned
position table (5B-I2V) is the persistent buffer `patch_embed.pos_embedding`; 2B's sin-cos table is not
stored (diffusers does not save it either).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import ConversionError, Rule, Transform, linear, norm
from hallojax.models.cogvideox import CogVideoXConfig

DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
DIFFUSERS_VERSION = "0.42.1"  # the version the parity tests run against
WEIGHTS_STEM = "diffusion_pytorch_model"

# torch Conv2d weight [D, C, p, p] <-> our patch kernel [1, p, p, C, D]
CONV2D_PATCH = Transform("conv2d-patch", lambda x: x.transpose(2, 3, 1, 0)[None],
                         lambda x: x[0].transpose(3, 2, 0, 1))


def linear_patch(channels: int, pt: int, p: int) -> Transform:
    """torch Linear weight [D, C·pt·p·p] (c outermost) <-> our patch kernel [pt, p, p, C, D]."""
    return Transform("linear-patch", lambda x: x.reshape(x.shape[0], channels, pt, p, p).transpose(2, 3, 4, 1, 0),
                     lambda x: x.transpose(4, 3, 0, 1, 2).reshape(x.shape[4], -1))


def rules(cfg: CogVideoXConfig) -> tuple[Rule, ...]:
    """The whole mapping for `cfg`; optional parts (learned table, ofs embedding) are selected by whether
    the target exists in the model built from the config."""
    pt, p, _ = cfg.patch
    patch = CONV2D_PATCH if cfg.patch_size_t is None else linear_patch(cfg.in_channels, pt, p)
    b = "transformer_blocks.{i}"
    return tuple(
        [Rule("patch_embed.proj.weight", "patch_embed.kernel", patch),
         Rule("patch_embed.proj.bias", "patch_embed.bias"),
         Rule("patch_embed.pos_embedding", "pos_embedding")]
        + linear("patch_embed.text_proj", "text_proj")
        + linear("time_embedding.linear_1", "time_embedding.fc1")
        + linear("time_embedding.linear_2", "time_embedding.fc2")
        + linear("ofs_embedding.linear_1", "ofs_embedding.fc1")
        + linear("ofs_embedding.linear_2", "ofs_embedding.fc2")
        + linear(f"{b}.norm1.linear", "blocks.norm1.linear") + norm(f"{b}.norm1.norm", "blocks.norm1.norm")
        + linear(f"{b}.attn1.to_q", "blocks.attn1.to_q")
        + linear(f"{b}.attn1.to_k", "blocks.attn1.to_k")
        + linear(f"{b}.attn1.to_v", "blocks.attn1.to_v")
        + linear(f"{b}.attn1.to_out.0", "blocks.attn1.to_out")
        + norm(f"{b}.attn1.norm_q", "blocks.attn1.norm_q") + norm(f"{b}.attn1.norm_k", "blocks.attn1.norm_k")
        + linear(f"{b}.norm2.linear", "blocks.norm2.linear") + norm(f"{b}.norm2.norm", "blocks.norm2.norm")
        + linear(f"{b}.ff.net.0.proj", "blocks.ff.fc1")
        + linear(f"{b}.ff.net.2", "blocks.ff.fc2")
        + norm("norm_final", "norm_final")
        + linear("norm_out.linear", "norm_out_linear") + norm("norm_out.norm", "norm_out")
        + linear("proj_out", "proj_out")
    )


# diffusers config key -> CogVideoXConfig field (same meaning; values copied)
_CONFIG_KEYS = {
    "num_layers": "num_layers", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "in_channels": "in_channels", "out_channels": "out_channels", "text_embed_dim": "text_dim",
    "max_text_seq_length": "text_len", "time_embed_dim": "time_embed_dim", "ofs_embed_dim": "ofs_embed_dim",
    "patch_size": "patch_size", "patch_size_t": "patch_size_t", "patch_bias": "patch_bias",
    "sample_frames": "sample_frames", "sample_height": "sample_height", "sample_width": "sample_width",
    "temporal_compression_ratio": "temporal_compression_ratio", "use_rotary_positional_embeddings": "rope",
    "use_learned_positional_embeddings": "learned_positions",
    "spatial_interpolation_scale": "spatial_interpolation_scale",
    "temporal_interpolation_scale": "temporal_interpolation_scale", "norm_eps": "norm_eps",
}
# diffusers options every released CogVideoX has and this port implements only in that setting
_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "attention_bias": True, "activation_fn": "gelu-approximate",
          "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "dropout": 0.0}


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> CogVideoXConfig:
    if not isinstance(d, dict):
        raise ConversionError(f"{where}: expected a JSON object")
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    bad = [f"{k}={d[k]!r} (supported: {v!r})" for k, v in _FIXED.items() if k in d and d[k] != v]
    if bad:
        raise ConversionError(f"{where}: unsupported settings {', '.join(bad)}")
    defaults = dict(num_layers=30, num_heads=30, in_channels=16, out_channels=16, ofs_embed_dim=None,
                    rope=False, learned_positions=False, patch_size_t=None, sample_frames=49, sample_height=60,
                    sample_width=90)  # diffusers' own defaults where they differ from ours
    kw = {**defaults, **{ours: d[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in d}}
    if kw["out_channels"] is None:
        kw["out_channels"] = kw["in_channels"]
    try:
        return CogVideoXConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: CogVideoXConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **_FIXED}
    for theirs, ours in _CONFIG_KEYS.items():
        d[theirs] = getattr(cfg, ours)
    return d


def read_diffusers_config(src: str | os.PathLike) -> CogVideoXConfig:
    d = read_json_config(src, "diffusers CogVideoXTransformer3DModel (the 'transformer' folder of a CogVideoX "
                              "pipeline)")
    return config_from_diffusers(d, str(Path(src) / "config.json"))


def convert_cogvideox(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                      progress: bool = True) -> Path:
    """diffusers directory -> our pretrained directory. Checks everything before writing anything."""
    cfg = read_diffusers_config(src)
    return convert_directory(src, out, cfg, rules(cfg), num_layers=cfg.num_layers, stem=WEIGHTS_STEM,
                             what=DIFFUSERS_CLASS, overwrite=overwrite, progress=progress)


def export_cogvideox(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                     max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> a diffusers directory `CogVideoXTransformer3DModel.from_pretrained` loads."""
    return export_directory(ckpt, out, rules, config_to_diffusers, num_layers=lambda cfg: cfg.num_layers,
                            stem=WEIGHTS_STEM, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                            progress=progress)

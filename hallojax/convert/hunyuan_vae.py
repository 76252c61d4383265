"""diffusers `AutoencoderKLHunyuanVideo` <-> hallojax `HunyuanVAE`.

    hallojax convert hunyuan-vae SRC_DIR OUT_DIR     # the 'vae' folder of a diffusers HunyuanVideo pipeline
    hallojax export  hunyuan-vae CKPT_DIR OUT_DIR    # ours -> a directory AutoencoderKLHunyuanVideo loads

Generated from the model the config builds, as for the SD VAE (`hallojax.convert.sd_vae`): every
parameter keeps its dotted path with a layout transform by kind of layer (3D conv, linear, GroupNorm),
plus the reference's wrappers: each causal conv holds its Conv3d as `.conv` (quant_conv and
post_quant_conv are bare Conv3d), a downsampler is `downsamplers.0.conv`, the attention's output
projection is `to_out.0`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import param_shapes
from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import CONV3D, IDENTITY, LINEAR, ConversionError, Rule
from hallojax.models.hunyuan_vae import HunyuanVAEConfig

DIFFUSERS_CLASS = "AutoencoderKLHunyuanVideo"
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_STEM = "diffusion_pytorch_model"

_SAME_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
              "norm_num_groups", "scaling_factor", "spatial_compression_ratio", "temporal_compression_ratio")
REQUIRED = dict(act_fn="silu", mid_block_add_attention=True)
_BARE = ("quant_conv.", "post_quant_conv.")  # plain nn.Conv3d in the reference


def hunyuan_vae_rules(cfg: HunyuanVAEConfig) -> list[Rule]:
    shapes = param_shapes(cfg)
    rules = []
    for path, shape in shapes.items():
        module, leaf = path.rsplit(".", 1)
        is_conv = len(shapes.get(f"{module}.kernel", ())) == 5
        torch_leaf, transform = {"kernel": ("weight", CONV3D if is_conv else LINEAR), "scale": ("weight", IDENTITY),
                                 "bias": ("bias", IDENTITY)}[leaf]
        torch = module
        if is_conv and not path.startswith(_BARE):
            torch += ".conv"
        torch = f"{torch}.{torch_leaf}".replace(".to_out.", ".to_out.0.")
        rules.append(Rule(torch.replace(".downsamplers.0.", ".downsamplers.0.conv."), path, transform))
    return rules


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> HunyuanVAEConfig:
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    unsupported = [f"{k}={d[k]!r}" for k, v in REQUIRED.items() if k in d and d[k] != v]
    n = len(d.get("block_out_channels", HunyuanVAEConfig.block_out_channels))
    for key, block in (("down_block_types", "HunyuanVideoDownBlock3D"), ("up_block_types", "HunyuanVideoUpBlock3D")):
        if key in d and list(d[key]) != [block] * n:
            unsupported.append(f"{key}={list(d[key])} (expected {n} x {block})")
    if unsupported:
        raise ConversionError(f"{where}: not supported: {', '.join(unsupported)}")
    try:
        return HunyuanVAEConfig(**{k: d[k] for k in _SAME_KEYS if k in d})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: HunyuanVAEConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    d = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    for k in _SAME_KEYS:
        v = getattr(cfg, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    d.update(REQUIRED, down_block_types=["HunyuanVideoDownBlock3D"] * n, up_block_types=["HunyuanVideoUpBlock3D"] * n)
    return d


def convert_hunyuan_vae(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                        progress: bool = True) -> Path:
    d = read_json_config(src, "diffusers AutoencoderKLHunyuanVideo (the 'vae' folder of a HunyuanVideo pipeline)")
    cfg = config_from_diffusers(d, str(Path(src) / "config.json"))
    return convert_directory(src, out, cfg, hunyuan_vae_rules(cfg), stem=WEIGHTS_STEM, what=DIFFUSERS_CLASS,
                             overwrite=overwrite, progress=progress)


def export_hunyuan_vae(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                       max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    return export_directory(ckpt, out, hunyuan_vae_rules, config_to_diffusers, stem=WEIGHTS_STEM,
                            overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)

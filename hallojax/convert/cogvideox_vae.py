"""diffusers `AutoencoderKLCogVideoX` (CogVideoX 2B / 5B) <-> hallojax `CogVideoXVAE`.

    hallojax convert cogvideox-vae SRC_DIR OUT_DIR     # the 'vae' folder of a CogVideoX pipeline -> ours
    hallojax export  cogvideox-vae CKPT_DIR OUT_DIR    # ours -> a directory AutoencoderKLCogVideoX loads

Our parameter paths are diffusers' module paths, so the table is generated from the model the config
builds: a causal 3D conv `X.kernel` is torch `X.conv.weight` (CogVideoXCausalConv3d wraps a Conv3d),
except the resnets' plain 1×1×1 `conv_shortcut`; per-frame 2D convs (down/upsamplers) and GroupNorms
(`scale` = torch `weight`) keep their names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import param_shapes
from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import CONV3D, IDENTITY, ConversionError, Rule
from hallojax.convert.wan_vae import CONV2D
from hallojax.models.cogvideox_vae import CogVideoXVAEConfig

DIFFUSERS_CLASS = "AutoencoderKLCogVideoX"
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_STEM = "diffusion_pytorch_model"


def vae_rules(cfg: CogVideoXVAEConfig) -> list[Rule]:
    shapes = param_shapes(cfg)
    rules = []
    for path, shape in shapes.items():
        prefix, leaf = path.rsplit(".", 1)
        kernel = shapes.get(f"{prefix}.kernel")
        if kernel is None:  # GroupNorm
            rules.append(Rule(f"{prefix}.{'weight' if leaf == 'scale' else leaf}", path))
            continue
        torch_prefix = prefix if len(kernel) == 4 or prefix.endswith("conv_shortcut") else f"{prefix}.conv"
        if leaf == "kernel":
            rules.append(Rule(f"{torch_prefix}.weight", path, CONV3D if len(shape) == 5 else CONV2D))
        else:
            rules.append(Rule(f"{torch_prefix}.{leaf}", path, IDENTITY))
    return rules


_SAME_KEYS = ("in_channels", "out_channels", "block_out_channels", "latent_channels", "layers_per_block", "norm_eps",
              "norm_num_groups", "temporal_compression_ratio", "scaling_factor", "invert_scale_latents")
_DOWN, _UP = "CogVideoXDownBlock3D", "CogVideoXUpBlock3D"


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> CogVideoXVAEConfig:
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    unsupported = [f"{k}=true" for k in ("use_quant_conv", "use_post_quant_conv") if d.get(k)]
    unsupported += [f"{k}={d[k]!r}" for k in ("shift_factor", "latents_mean", "latents_std") if d.get(k) is not None]
    if d.get("act_fn", "silu") != "silu":
        unsupported.append(f"act_fn={d['act_fn']!r}")
    for key, kind in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        if key in d and any(t != kind for t in d[key]):
            unsupported.append(f"{key}={d[key]} (only {kind})")
        if key in d and len(d[key]) != len(d.get("block_out_channels", (0,) * 4)):
            unsupported.append(f"{len(d[key])} {key} for {len(d.get('block_out_channels', (0,) * 4))} "
                               "block_out_channels")
    if unsupported:
        raise ConversionError(f"{where}: not supported: {', '.join(unsupported)}")
    try:
        return CogVideoXVAEConfig(**{k: d[k] for k in _SAME_KEYS if k in d})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: CogVideoXVAEConfig) -> dict[str, Any]:
    d = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    for k in _SAME_KEYS:
        v = getattr(cfg, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    n = len(cfg.block_out_channels)
    d.update(down_block_types=[_DOWN] * n, up_block_types=[_UP] * n, act_fn="silu", sample_height=480,
             sample_width=720, shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
             use_quant_conv=False, use_post_quant_conv=False)
    return d


def convert_cogvideox_vae(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                          progress: bool = True) -> Path:
    d = read_json_config(src, "diffusers AutoencoderKLCogVideoX (the 'vae' folder of a CogVideoX pipeline)")
    cfg = config_from_diffusers(d, str(Path(src) / "config.json"))
    return convert_directory(src, out, cfg, vae_rules(cfg), stem=WEIGHTS_STEM, what=DIFFUSERS_CLASS,
                             overwrite=overwrite, progress=progress)


def export_cogvideox_vae(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                         max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    return export_directory(ckpt, out, vae_rules, config_to_diffusers, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)

"""diffusers `AutoencoderKL` (the SD VAE) <-> hallojax `SDVAE`.

    hallojax convert sd-vae SRC_DIR OUT_DIR     # e.g. stabilityai/sd-vae-ft-ema, or a pipeline's 'vae' folder
    hallojax export  sd-vae CKPT_DIR OUT_DIR    # ours -> a directory AutoencoderKL.from_pretrained loads

The table is generated from the model the config builds: our modules carry diffusers' names, so every
parameter maps to the same dotted path with a layout transform chosen by the kind of layer (2D conv,
linear, GroupNorm), plus two renames: the attention's `to_out` is torch's `to_out.0`, and a
downsampler is torch's `downsamplers.0.conv`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import param_shapes
from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import IDENTITY, LINEAR, ConversionError, Rule
from hallojax.convert.wan_vae import CONV2D
from hallojax.models.sd_vae import SDVAEConfig

DIFFUSERS_CLASS = "AutoencoderKL"
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_STEM = "diffusion_pytorch_model"

# AutoencoderKL.__init__ defaults, for keys a config.json leaves out
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                          latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
# what our SDVAE computes; any other value is refused by name
REQUIRED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                use_post_quant_conv=True, mid_block_add_attention=True)


def sd_vae_rules(cfg: SDVAEConfig) -> list[Rule]:
    rules = []
    for path, shape in param_shapes(cfg).items():
        torch, transform = path, IDENTITY
        if path.endswith(".kernel"):
            torch = path[: -len("kernel")] + "weight"
            transform = {4: CONV2D, 2: LINEAR}[len(shape)]
        elif path.endswith(".scale"):
            torch = path[: -len("scale")] + "weight"
        torch = torch.replace(".to_out.", ".to_out.0.").replace(".downsamplers.0.", ".downsamplers.0.conv.")
        rules.append(Rule(torch, path, transform))
    return rules


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> SDVAEConfig:
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    kw = {k: d.get(k, v) for k, v in DIFFUSERS_DEFAULTS.items()}
    n = len(kw["block_out_channels"])
    unsupported = [f"{k}={d[k]!r}" for k, v in REQUIRED.items() if k in d and d[k] != v]
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != ["DownEncoderBlock2D"] * n:
        unsupported.append(f"down_block_types={down} (expected {n} x DownEncoderBlock2D)")
    if up != ["UpDecoderBlock2D"] * n:
        unsupported.append(f"up_block_types={up} (expected {n} x UpDecoderBlock2D)")
    if unsupported:
        raise ConversionError(f"{where}: not supported: {', '.join(unsupported)}")
    try:
        return SDVAEConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: SDVAEConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    d = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    d.update({k: getattr(cfg, k) for k in DIFFUSERS_DEFAULTS}, **REQUIRED)
    d.update(block_out_channels=list(cfg.block_out_channels), down_block_types=["DownEncoderBlock2D"] * n,
             up_block_types=["UpDecoderBlock2D"] * n, sample_size=512, force_upcast=True)
    return d


def convert_sd_vae(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   progress: bool = True) -> Path:
    d = read_json_config(src, "diffusers AutoencoderKL (an SD VAE, or the 'vae' folder of an SD pipeline)")
    cfg = config_from_diffusers(d, str(Path(src) / "config.json"))
    return convert_directory(src, out, cfg, sd_vae_rules(cfg), stem=WEIGHTS_STEM, what=DIFFUSERS_CLASS,
                             overwrite=overwrite, progress=progress)


def export_sd_vae(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                  max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    return export_directory(ckpt, out, sd_vae_rules, config_to_diffusers, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)

"""diffusers `AutoencoderKLWan` (Wan2.1) <-> hallojax `WanVAE`.

    hallojax convert wan-vae SRC_DIR OUT_DIR     # the 'vae' folder of a Wan pipeline -> ours
    hallojax export  wan-vae CKPT_DIR OUT_DIR    # ours -> a directory AutoencoderKLWan.from_pretrained loads

The VAE's layer list depends on its config, so the table is generated from the model the config
builds: every parameter maps to the same dotted path in diffusers with a layout transform chosen by
the kind of layer (3D conv, per-frame 2D conv, 1x1 conv used as a linear, channel norm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import param_shapes
from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import CONV3D, IDENTITY, ConversionError, Rule, Transform
from hallojax.models.wan_vae import VAEConfig

DIFFUSERS_CLASS = "AutoencoderKLWan"
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_STEM = "diffusion_pytorch_model"

# torch Conv2d [O, I, kh, kw] <-> ours [kh, kw, I, O]
CONV2D = Transform("conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
# torch 1x1 Conv2d [O, I, 1, 1] <-> our Dense kernel [I, O]
CONV1X1 = Transform("conv1x1", lambda x: x[:, :, 0, 0].T, lambda x: x.T[:, :, None, None])
# channel-norm gamma: torch [C, 1, 1, 1] (video) or [C, 1, 1] (per-frame attention) <-> ours [C]
GAMMA_VIDEO = Transform("gamma[C,1,1,1]", lambda x: x.reshape(-1), lambda x: x.reshape(-1, 1, 1, 1))
GAMMA_FRAME = Transform("gamma[C,1,1]", lambda x: x.reshape(-1), lambda x: x.reshape(-1, 1, 1))


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    rules = []
    for path, shape in param_shapes(cfg).items():
        torch = path
        if path.endswith(".kernel"):
            torch = path[: -len("kernel")] + "weight"
            transform = {5: CONV3D, 4: CONV2D, 2: CONV1X1}[len(shape)]
        elif path.endswith(".scale"):
            torch = path[: -len("scale")] + "gamma"
            transform = GAMMA_FRAME if path.endswith(".norm.scale") else GAMMA_VIDEO
        else:
            transform = IDENTITY
        torch = torch.replace(".resample.", ".resample.1.")  # torch: Sequential(pad/upsample, conv)
        rules.append(Rule(torch, path, transform))
    return rules


_SAME_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
              "in_channels", "out_channels", "latents_mean", "latents_std")


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> VAEConfig:
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    unsupported = []
    if d.get("is_residual"):
        unsupported.append("is_residual=true (the Wan2.2 VAE)")
    if d.get("patch_size") is not None:
        unsupported.append(f"patch_size={d['patch_size']}")
    if d.get("decoder_base_dim") not in (None, d.get("base_dim", 96)):
        unsupported.append(f"decoder_base_dim={d['decoder_base_dim']} != base_dim")
    if unsupported:
        raise ConversionError(f"{where}: not supported yet: {', '.join(unsupported)}")
    try:
        return VAEConfig(**{k: d[k] for k in _SAME_KEYS if k in d})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    d = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    for k in _SAME_KEYS:
        v = getattr(cfg, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    d.update(is_residual=False, patch_size=None, decoder_base_dim=None, dropout=0.0,
             scale_factor_temporal=cfg.temporal_stride, scale_factor_spatial=cfg.spatial_stride)
    return d


def convert_wan_vae(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                    progress: bool = True) -> Path:
    d = read_json_config(src, "diffusers AutoencoderKLWan (the 'vae' folder of a Wan pipeline)")
    cfg = config_from_diffusers(d, str(Path(src) / "config.json"))
    return convert_directory(src, out, cfg, vae_rules(cfg), stem=WEIGHTS_STEM, what=DIFFUSERS_CLASS,
                             overwrite=overwrite, progress=progress)


def export_wan_vae(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    return export_directory(ckpt, out, vae_rules, config_to_diffusers, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)

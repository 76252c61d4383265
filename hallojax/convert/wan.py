"""diffusers `WanTransformer3DModel` <-> hallojax `WanDiT`: the name table and the config mapping.

    hallojax convert wan-diffusers SRC_DIR OUT_DIR    # diffusers directory -> our pretrained directory
    hallojax export  wan-diffusers CKPT_DIR OUT_DIR   # ours -> a directory `from_pretrained` loads
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import CONV3D, ConversionError, Rule, linear, norm
from hallojax.models.wan import DiTConfig

DIFFUSERS_CLASS = "WanTransformer3DModel"
DIFFUSERS_VERSION = "0.42.1"  # the version the parity tests run against
WEIGHTS_STEM = "diffusion_pytorch_model"
IGNORED = ("*.norm_added_q.*",)  # diffusers drops these on load too


def _attention(i: str, name: str) -> list[Rule]:
    t, o = f"blocks.{i}.{name}", f"blocks.{name}"
    rules = []
    for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
        rules += linear(f"{t}.{proj}", f"{o}.{proj}")
    rules += linear(f"{t}.to_out.0", f"{o}.to_out")
    for n in ("norm_q", "norm_k", "norm_added_k"):
        rules += norm(f"{t}.{n}", f"{o}.{n}", bias=False)
    return rules


# The whole mapping. Optional parts (I2V image path, cross-attention norm, FLF2V position embedding)
# are selected by whether the target exists in the model built from the config.
WAN_RULES: tuple[Rule, ...] = tuple(
    [Rule("patch_embedding.weight", "patch_embedding.kernel", CONV3D),
     Rule("patch_embedding.bias", "patch_embedding.bias")]
    + linear("condition_embedder.time_embedder.linear_1", "time_embedder.fc1")
    + linear("condition_embedder.time_embedder.linear_2", "time_embedder.fc2")
    + linear("condition_embedder.time_proj", "time_proj")
    + linear("condition_embedder.text_embedder.linear_1", "text_embedder.fc1")
    + linear("condition_embedder.text_embedder.linear_2", "text_embedder.fc2")
    + norm("condition_embedder.image_embedder.norm1", "image_embedder.norm1")
    + linear("condition_embedder.image_embedder.ff.net.0.proj", "image_embedder.ff.fc1")
    + linear("condition_embedder.image_embedder.ff.net.2", "image_embedder.ff.fc2")
    + norm("condition_embedder.image_embedder.norm2", "image_embedder.norm2")
    + [Rule("condition_embedder.image_embedder.pos_embed", "image_embedder.pos_embed"),
       Rule("blocks.{i}.scale_shift_table", "blocks.scale_shift_table")]
    + _attention("{i}", "attn1")
    + _attention("{i}", "attn2")
    + norm("blocks.{i}.norm2", "blocks.norm2")
    + linear("blocks.{i}.ffn.net.0.proj", "blocks.ffn.fc1")
    + linear("blocks.{i}.ffn.net.2", "blocks.ffn.fc2")
    + linear("proj_out", "proj_out")
    + [Rule("scale_shift_table", "scale_shift_table")]
)

# diffusers config key -> DiTConfig field (same meaning; values copied)
_CONFIG_KEYS = {
    "num_layers": "num_layers", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "ffn_dim": "ffn_dim", "in_channels": "in_channels", "out_channels": "out_channels",
    "text_dim": "text_dim", "freq_dim": "freq_dim", "patch_size": "patch_size", "eps": "eps",
    "cross_attn_norm": "cross_attn_norm", "image_dim": "image_dim", "added_kv_proj_dim": "added_kv_proj_dim",
    "pos_embed_seq_len": "pos_embed_seq_len", "rope_max_seq_len": "rope_max_seq_len",
}


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> DiTConfig:
    if not isinstance(d, dict):
        raise ConversionError(f"{where}: expected a JSON object")
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ConversionError(f"{where}: qk_norm={d['qk_norm']!r} is not supported "
                              "(only 'rms_norm_across_heads', as in every released Wan model)")
    kw = {ours: d[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in d}
    if kw.get("out_channels") is None:
        kw["out_channels"] = kw.get("in_channels", DiTConfig.in_channels)
    try:
        return DiTConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: DiTConfig) -> dict[str, Any]:
    d = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    for theirs, ours in _CONFIG_KEYS.items():
        d[theirs] = getattr(cfg, ours)
    d["patch_size"] = list(cfg.patch_size)
    d["qk_norm"] = "rms_norm_across_heads"
    return d


def read_diffusers_config(src: str | os.PathLike) -> DiTConfig:
    d = read_json_config(src, "diffusers WanTransformer3DModel (e.g. the 'transformer' folder of a Wan pipeline)")
    return config_from_diffusers(d, str(Path(src) / "config.json"))


def convert_wan_diffusers(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                          progress: bool = True) -> Path:
    """diffusers directory -> our pretrained directory. Checks everything before writing anything."""
    cfg = read_diffusers_config(src)
    return convert_directory(src, out, cfg, WAN_RULES, num_layers=cfg.num_layers, stem=WEIGHTS_STEM,
                             what=DIFFUSERS_CLASS, ignore=IGNORED, overwrite=overwrite, progress=progress)


def export_wan_diffusers(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                         max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> a diffusers directory `WanTransformer3DModel.from_pretrained` loads."""
    return export_directory(ckpt, out, lambda cfg: WAN_RULES, config_to_diffusers,
                            num_layers=lambda cfg: cfg.num_layers, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)

"""Original-format Wan2.1 / Wan2.1-Fun checkpoints <-> hallojax `WanDiT`: the name table, the config
mapping, and reading checkpoints however they are shipped.

    hallojax convert wan SRC OUT      # SRC: a Wan directory (config.json + weights) or one weights file
    hallojax export  wan CKPT OUT     # -> config.json + diffusion_pytorch_model.safetensors, Wan's names

"Original" is the naming of the Wan team's `WanModel` (Wan2.1 repository), which VideoX-Fun's Wan-Fun
models and EchoMimicV3 keep: `blocks.N.self_attn.q`, `cross_attn.k_img`, `norm3` (the affine norm before
cross-attention, diffusers' `norm2`), `modulation`, `head.head`, `img_emb.proj.N`, ... Weights come as
a single or index-sharded safetensors set or a pickled `.pth` (read with `weights_only=True`), in a
directory or as one file; a ComfyUI-style `model.diffusion_model.` prefix is dropped. A `config.json`
(`model_type`, `dim`, `in_dim`, ...) is read when present, else the sizes are read off the tensor
shapes (head size 128, as in every released Wan model). T2V, I2V (CLIP image path), FLF2V (its image
position embedding) and Fun-InP (36 input channels) are covered by one table whose optional parts are
selected by the model the config describes, as for the diffusers format (`hallojax.convert.wan`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from hallojax.convert.common import read_json
from hallojax.convert.hf import DictSource, RenamedSource, _torch_load
from hallojax.convert.safetensors_io import SafetensorsError, SafetensorsFile, TensorStore
from hallojax.convert.table import CONV3D, ConversionError, Rule, linear, norm
from hallojax.models.wan import DiTConfig

ORIGINAL_CLASS = "WanModel"
WEIGHTS_STEM = "diffusion_pytorch_model"
PREFIX = "model.diffusion_model."  # ComfyUI / single-file checkpoints
HEAD_DIM = 128  # every released Wan model; used when a checkpoint comes without config.json


def _attention(name: str, ours: str) -> list[Rule]:
    t, o = f"blocks.{{i}}.{name}", f"blocks.{ours}"
    rules: list[Rule] = []
    for theirs, mine in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out"), ("k_img", "add_k_proj"),
                         ("v_img", "add_v_proj")):
        rules += linear(f"{t}.{theirs}", f"{o}.{mine}")
    for theirs, mine in (("norm_q", "norm_q"), ("norm_k", "norm_k"), ("norm_k_img", "norm_added_k")):
        rules += norm(f"{t}.{theirs}", f"{o}.{mine}", bias=False)
    return rules


# The whole mapping, written independently of the diffusers table (the tests check the two agree through
# diffusers' own original -> diffusers renaming).
ORIGINAL_RULES: tuple[Rule, ...] = tuple(
    [Rule("patch_embedding.weight", "patch_embedding.kernel", CONV3D),
     Rule("patch_embedding.bias", "patch_embedding.bias")]
    + linear("text_embedding.0", "text_embedder.fc1") + linear("text_embedding.2", "text_embedder.fc2")
    + linear("time_embedding.0", "time_embedder.fc1") + linear("time_embedding.2", "time_embedder.fc2")
    + linear("time_projection.1", "time_proj")
    + norm("img_emb.proj.0", "image_embedder.norm1") + linear("img_emb.proj.1", "image_embedder.ff.fc1")
    + linear("img_emb.proj.3", "image_embedder.ff.fc2") + norm("img_emb.proj.4", "image_embedder.norm2")
    + [Rule("img_emb.emb_pos", "image_embedder.pos_embed"),
       Rule("blocks.{i}.modulation", "blocks.scale_shift_table")]
    + _attention("self_attn", "attn1") + _attention("cross_attn", "attn2")
    + norm("blocks.{i}.norm3", "blocks.norm2")
    + linear("blocks.{i}.ffn.0", "blocks.ffn.fc1") + linear("blocks.{i}.ffn.2", "blocks.ffn.fc2")
    + linear("head.head", "proj_out")
    + [Rule("head.modulation", "scale_shift_table")]
)

MODEL_TYPES = ("t2v", "i2v", "flf2v")


# --- reading ---------------------------------------------------------------------------------------
def _weights_file(path: Path):
    if path.suffix == ".safetensors":
        try:
            return SafetensorsFile(path)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from e
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return DictSource(_torch_load(path))
    raise ConversionError(f"{path}: not a weights file (expected .safetensors, .pth, .pt or .bin)")


def open_checkpoint(src: str | os.PathLike):
    """(tensors, config.json contents or None) of a Wan checkpoint: a directory holding config.json and
    ``diffusion_pytorch_model.safetensors`` (or its index-sharded set, or one ``*.safetensors`` / ``*.pth``),
    or a single weights file. A ``model.diffusion_model.`` prefix on every name is dropped."""
    src = Path(src)
    config = None
    if src.is_file():
        store = _weights_file(src)
    elif src.is_dir():
        if (src / "config.json").exists():
            config = read_json(src / "config.json", "a Wan model config")
        indexes = sorted(src.glob("*.safetensors.index.json"))
        singles = sorted(src.glob("*.safetensors"))
        pickles = sorted(p for ext in ("*.pth", "*.pt", "*.bin") for p in src.glob(ext))
        try:
            if any((src / f"{WEIGHTS_STEM}.{ext}").exists() for ext in ("safetensors", "safetensors.index.json")):
                store = TensorStore(src, WEIGHTS_STEM)
            elif len(indexes) == 1:
                store = TensorStore(src, indexes[0].name.removesuffix(".safetensors.index.json"))
            elif len(singles) == 1:
                store = SafetensorsFile(singles[0])
            elif not singles and len(pickles) == 1:
                store = DictSource(_torch_load(pickles[0]))
            else:
                found = sorted(p.name for p in src.iterdir())
                raise ConversionError(f"{src}: cannot tell which file holds the weights (found {found}); give the "
                                      "file itself")
        except SafetensorsError as e:
            raise ConversionError(str(e)) from e
    else:
        raise ConversionError(f"{src}: no such file or directory")
    keys = list(store.keys())
    if keys and all(k.startswith(PREFIX) for k in keys):
        store = RenamedSource(store, lambda k: k[len(PREFIX):])
    return store, config


def _layers(keys) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def config_from_original(d: Mapping[str, Any] | None, source, where: str = "checkpoint") -> DiTConfig:
    """DiTConfig from an original config.json (`dim`, `in_dim`, `model_type`, ...); sizes it lacks are
    read off the tensor shapes."""
    d = dict(d or {})
    if "num_attention_heads" in d:
        raise ConversionError(f"{where}: a {d.get('_class_name')} config in diffusers naming; convert it with "
                              "`hallojax convert wan-diffusers`")
    keys = set(source.keys())

    def shape(name: str) -> tuple[int, ...]:
        if name not in keys:
            raise ConversionError(f"{where}: no tensor {name!r}; not an original-format Wan checkpoint "
                                  f"(found {sorted(keys)[:6]}{'...' if len(keys) > 6 else ''})")
        return tuple(source.shape(name))

    for flag, want in (("qk_norm", True), ("cross_attn_norm", True)):
        if d.get(flag, want) != want:
            raise ConversionError(f"{where}: {flag}={d[flag]} is not supported (every released Wan model has {want})")
    if list(d.get("window_size", (-1, -1))) != [-1, -1]:
        raise ConversionError(f"{where}: window_size={d['window_size']} (local attention) is not supported")
    dim, in_dim, pt, ph, pw = shape("patch_embedding.weight")
    model_type = d.get("model_type", "i2v" if "img_emb.proj.0.weight" in keys else "t2v")
    if model_type == "i2v" and "img_emb.emb_pos" in keys:
        model_type = "flf2v"
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{where}: model_type {model_type!r} is not supported (expected one of {MODEL_TYPES})")
    out_features = shape("head.head.weight")[0]
    if "num_heads" not in d and dim % HEAD_DIM:
        raise ConversionError(f"{where}: no config.json, and the width {dim} is not a multiple of Wan's head size "
                              f"{HEAD_DIM}: give the checkpoint's config.json (num_heads)")
    kw: dict[str, Any] = dict(
        num_layers=int(d.get("num_layers", _layers(keys))), num_heads=int(d.get("num_heads", dim // HEAD_DIM)),
        ffn_dim=int(d.get("ffn_dim", shape("blocks.0.ffn.0.weight")[0])), in_channels=int(d.get("in_dim", in_dim)),
        out_channels=int(d.get("out_dim", out_features // (pt * ph * pw))),
        text_dim=int(d.get("text_dim", shape("text_embedding.0.weight")[1])),
        freq_dim=int(d.get("freq_dim", shape("time_embedding.0.weight")[1])),
        patch_size=tuple(d.get("patch_size", (pt, ph, pw))), eps=float(d.get("eps", 1e-6)))
    if int(d.get("dim", dim)) != dim or dim % kw["num_heads"]:
        raise ConversionError(f"{where}: dim {d.get('dim', dim)} does not match the patch embedding ({dim}) or "
                              f"num_heads {kw['num_heads']}")
    kw["head_dim"] = dim // kw["num_heads"]
    if model_type in ("i2v", "flf2v"):
        kw.update(image_dim=shape("img_emb.proj.0.weight")[0], added_kv_proj_dim=dim)
    if model_type == "flf2v":
        kw["pos_embed_seq_len"] = shape("img_emb.emb_pos")[1]
    try:
        return DiTConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_original(cfg: DiTConfig) -> dict[str, Any]:
    """config.json as the Wan repositories ship it."""
    model_type = "t2v" if cfg.image_dim is None else ("flf2v" if cfg.pos_embed_seq_len else "i2v")
    return {"_class_name": ORIGINAL_CLASS, "model_type": model_type, "patch_size": list(cfg.patch_size),
            "text_len": 512, "in_dim": cfg.in_channels, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
            "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_channels,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "window_size": [-1, -1], "qk_norm": True,
            "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps}


def read_original(src: str | os.PathLike):
    """(tensors, DiTConfig) of an original-format Wan checkpoint."""
    store, d = open_checkpoint(src)
    return store, config_from_original(d, store, str(src))


# --- import / export -------------------------------------------------------------------------------
def convert_wan_original(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                         progress: bool = True) -> Path:
    """Original-format Wan checkpoint -> our pretrained directory. Checks everything before writing."""
    from hallojax.checkpoint import param_shapes, save_pretrained
    from hallojax.convert.table import import_tensors

    store, cfg = read_original(src)
    params = import_tensors(ORIGINAL_RULES, store, param_shapes(cfg), cfg.num_layers,
                            what=f"{src} as an original-format {ORIGINAL_CLASS}", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "wan-original", "path": str(Path(src).absolute())})


def export_wan_original(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                        max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> config.json + diffusion_pytorch_model.safetensors (index-sharded above
    `max_shard_bytes`) in the original names, in the stored dtype."""
    from hallojax.convert.common import export_directory

    def rules_for(cfg):
        if not isinstance(cfg, DiTConfig):
            raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not a Wan DiT")
        if cfg.audio != "none" or cfg.has_extra_tokens or cfg.identity_additive or cfg.motion_frames:
            raise ConversionError(f"{ckpt}: the original Wan format has no portrait-conditioning modules; "
                                  "this model has some")
        return ORIGINAL_RULES

    return export_directory(ckpt, out, rules_for, config_to_original, num_layers=lambda cfg: cfg.num_layers,
                            stem=WEIGHTS_STEM, overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)


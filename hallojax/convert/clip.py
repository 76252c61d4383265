"""CLIP image encoders -> hallojax `CLIPVision` (the tower up to its penultimate block).

    hallojax convert clip SRC OUT

SRC is either a transformers directory (`CLIPVisionModel`, `CLIPVisionModelWithProjection` or a whole
`CLIPModel`: config.json + weights; e.g. the `image_encoder/` folder of a diffusers Wan I2V pipeline), or
Wan's original `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (a file, or a directory holding
it), whose names (`visual.transformer.N.attn.to_qkv`, `visual.cls_embedding`, ...) are presented in
transformers' names (the fused q/k/v split in three) so that one table serves both. The last block, the
post-norm, the projection head and any text tower are dropped (the output is the penultimate block's).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from hallojax.convert.hf import RenamedSource, open_weights
from hallojax.convert.table import ConversionError, Rule, Transform, import_tensors, linear, norm
from hallojax.models.encoders.clip import CLIPVisionConfig

V = "vision_model."
# torch Conv2d weight [D, 3, p, p] <-> our patch kernel [p, p, 3, D]
CONV2D = Transform("conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))

CLIP_RULES: tuple[Rule, ...] = tuple(
    [Rule(f"{V}embeddings.patch_embedding.weight", "patch_kernel", CONV2D),
     Rule(f"{V}embeddings.class_embedding", "class_embedding"),
     Rule(f"{V}embeddings.position_embedding.weight", "position_embedding")]
    + norm(f"{V}pre_layrnorm", "pre_norm")
    + [r for theirs, ours in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                              ("self_attn.out_proj", "out"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
       for r in linear(f"{V}encoder.layers.{{i}}.{theirs}", f"layers.{ours}")]
    + norm(f"{V}encoder.layers.{{i}}.layer_norm1", "layers.norm1")
    + norm(f"{V}encoder.layers.{{i}}.layer_norm2", "layers.norm2")
)
DROPPED = (f"{V}post_layernorm.*", f"{V}embeddings.position_ids", "visual_projection.*", "text_model.*",
           "text_projection.*", "logit_scale")


class WanClipSource:
    """Wan's open-clip `visual.*` tensors under transformers' names (q/k/v split out of `to_qkv`)."""

    _SIMPLE = {"patch_embedding.weight": "embeddings.patch_embedding.weight", "pre_norm.weight": "pre_layrnorm.weight",
               "pre_norm.bias": "pre_layrnorm.bias"}
    _BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.0": "mlp.fc1",
              "mlp.2": "mlp.fc2"}

    def __init__(self, store):
        self.store = store
        self._map: dict[str, tuple[str, int | None]] = {}  # our name -> (theirs, q/k/v index or None)
        for k in store.keys():
            if not k.startswith("visual."):
                continue
            rest = k[len("visual."):]
            if rest in self._SIMPLE:
                self._map[V + self._SIMPLE[rest]] = (k, None)
            elif rest == "cls_embedding":
                self._map[V + "embeddings.class_embedding"] = (k, None)
            elif rest == "pos_embedding":
                self._map[V + "embeddings.position_embedding.weight"] = (k, None)
            elif m := re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", rest):
                i, part, kind = m.groups()
                if part == "attn.to_qkv":
                    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                        self._map[f"{V}encoder.layers.{i}.self_attn.{name}.{kind}"] = (k, j)
                elif part in self._BLOCK:
                    self._map[f"{V}encoder.layers.{i}.{self._BLOCK[part]}.{kind}"] = (k, None)
                else:
                    self._map["visual." + rest] = (k, None)  # reported as unexpected
            elif rest not in ("post_norm.weight", "post_norm.bias", "head"):
                self._map["visual." + rest] = (k, None)

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        theirs, j = self._map[name]
        shape = tuple(self.store.shape(theirs))
        if j is not None:
            return (shape[0] // 3, *shape[1:])
        return shape[-1:] if name.endswith("class_embedding") else shape[-2:] if "position_embedding" in name else shape

    def get(self, name: str) -> np.ndarray:
        theirs, j = self._map[name]
        x = np.asarray(self.store.get(theirs))
        if j is not None:
            n = x.shape[0] // 3
            return x[j * n:(j + 1) * n]
        return x.reshape(self.shape(name))


def config_from_hf(d: dict, where: str) -> CLIPVisionConfig:
    v = d.get("vision_config", d) if d.get("model_type") == "clip" else d
    if d.get("model_type") not in ("clip", "clip_vision_model"):
        raise ConversionError(f"{where}: model_type {d.get('model_type')!r}, expected 'clip_vision_model' or 'clip'")
    try:
        return CLIPVisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                                hidden_size=v.get("hidden_size", 768), num_layers=v.get("num_hidden_layers", 12) - 1,
                                num_heads=v.get("num_attention_heads", 12),
                                intermediate_size=v.get("intermediate_size", 3072),
                                hidden_act=v.get("hidden_act", "quick_gelu"),
                                layer_norm_eps=v.get("layer_norm_eps", 1e-5))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_from_wan(source, where: str, head_dim: int = 80) -> CLIPVisionConfig:
    """Wan's checkpoint has no config: the ViT-H/14 sizes off the shapes (head size 80, exact-erf GELU)."""
    keys = source.keys()
    blocks = {int(m[1]) for k in keys if (m := re.match(rf"{re.escape(V)}encoder\.layers\.(\d+)\.", k))}
    try:
        d, _, p, _ = source.shape(f"{V}embeddings.patch_embedding.weight")
        positions = source.shape(f"{V}embeddings.position_embedding.weight")[0]
        ffn = source.shape(f"{V}encoder.layers.0.mlp.fc1.weight")[0]
        return CLIPVisionConfig(image_size=math.isqrt(positions - 1) * p, patch_size=p, hidden_size=d,
                                num_layers=len(blocks) - 1, num_heads=d // head_dim, intermediate_size=ffn,
                                hidden_act="gelu")
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: not Wan's open-clip checkpoint ({e})") from e


def convert_clip(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """A transformers CLIP directory or Wan's open-clip .pth -> our pretrained directory (the tower to its
    penultimate block). Checks everything before writing."""
    from hallojax.checkpoint import param_shapes, save_pretrained
    from hallojax.convert.common import read_json
    from hallojax.convert.wan_original import open_checkpoint

    src = Path(src)
    if src.is_dir() and (src / "config.json").exists():
        cfg = config_from_hf(read_json(src / "config.json", "a transformers CLIP directory"), str(src / "config.json"))
        # transformers 5 saves a CLIPVisionModel without the `vision_model.` prefix older versions write
        own = (V, "text_model.", "visual_projection.", "text_projection.", "logit_scale")
        source = RenamedSource(open_weights(src), lambda k: k if k.startswith(own) else V + k)
        what = "transformers CLIP vision tower"
    else:
        store, _ = open_checkpoint(src)
        if not any(k.startswith("visual.") for k in store.keys()):
            raise ConversionError(f"{src}: neither a transformers CLIP directory (config.json) nor Wan's open-clip "
                                  "checkpoint (visual.* tensors)")
        source, what = WanClipSource(store), "Wan's open-clip visual tower"
        cfg = config_from_wan(source, str(src))
    ignore = (*DROPPED, f"{V}encoder.layers.{cfg.num_layers}.*")  # the last block: not run
    params = import_tensors(CLIP_RULES, source, param_shapes(cfg), cfg.num_layers, ignore=ignore,
                            what=f"{src} as {what}", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "clip", "path": str(src.absolute())})

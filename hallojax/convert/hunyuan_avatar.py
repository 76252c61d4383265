"""HunyuanVideo-Avatar transformer checkpoints <-> hallojax `HunyuanAvatar` (research/hyavatar_letstalk.md B.0,
B.1, B.9).

    hallojax convert hunyuan-avatar SRC OUT    # mp_rank_00_model_states.pt ({"module": state dict}), its fp8
                                               # variant mp_rank_00_model_states_fp8.pt (+ ..._fp8_map.pt beside
                                               # it), a .safetensors file or our export's directory
    hallojax export  hunyuan-avatar CKPT OUT   # -> released (Tencent) names as safetensors + our config.json

Names: the trunk's Tencent names (`hallojax.convert.hunyuan.original_rules`: fused qkv / linear1 rows, the
final layer's (shift, scale) swap; no `guidance_in`), plus the Avatar keys kept as released: `ref_in.proj`
(Conv3d), `before_proj`, `audio_proj.*` / `audio_adapter_blocks.{i}.*` (`convert.avatar_audio.audio_rules`),
`motion_exp.mlp.{0,2}`, `motion_pose.mlp.{0,2}`, `fps_proj.mlp.{0,2}`. Sizes are read off the tensor shapes;
the audio window layout (10 x 5 x 384, whose product is all proj1 shows) is the release's unless a saved
config says otherwise. The released loader is `load_state_dict(strict=False)`; we are strict: every
missing, unexpected and mis-shaped key is named in one error, and nothing is written on error.

fp8 variant: every nn.Linear weight under `double_blocks` / `single_blocks` is float8_e4m3fn and the map file
(`<weights>_map.pt`, {"module": {module name: scale}} or the bare dict) holds one scale per Linear module
(`double_blocks.0.img_attn_qkv`, ...). We DEQUANTISE ON LOAD to float32, weight = float(fp8) · scale, which is
exact (a 4-bit significand times the scale's fits float32), and store ordinary parameters: TPUs up to v6e
have no fp8 matmul, the released pipeline itself computes in bf16 after dequantising, and one parameter
layout keeps every other path (sharding, training, export) unchanged. Every fp8 weight must have a scale and
every scale an fp8 weight (named in the same one error). Export writes the dequantised weights (no fp8
re-quantisation: its scales would not be the released ones).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hallojax.convert.avatar_audio import audio_rules
from hallojax.convert.common import export_directory
from hallojax.convert.hunyuan import WEIGHTS_STEM, _mlp, config_from_original, layer_counts, open_original, \
    original_rules
from hallojax.convert.table import CONV3D, ConversionError, Rule, linear
from hallojax.models.hunyuan_avatar import HunyuanAvatarConfig

FP8_BLOCKS = ("double_blocks.", "single_blocks.")  # the released fp8 file quantises the Linears under these


def avatar_layer_counts(cfg: HunyuanAvatarConfig) -> dict[str, int]:
    return {**layer_counts(cfg), "audio_adapters": len(cfg.adapter_layers)}


def extra_rules() -> list[Rule]:
    """The Avatar-only keys (same names in every format: they have no diffusers equivalent)."""
    return ([Rule("ref_in.proj.weight", "ref_in.kernel", CONV3D), Rule("ref_in.proj.bias", "ref_in.bias")]
            + linear("before_proj", "before_proj") + audio_rules("audio_proj", "audio_adapters")
            + [r for m in ("motion_exp", "motion_pose", "fps_proj") for r in _mlp(m, m, "mlp.0", "mlp.2")])


def avatar_rules(cfg: HunyuanAvatarConfig) -> list[Rule]:
    """The released checkpoint's table: Tencent trunk names + the Avatar keys."""
    return [r for r in original_rules(cfg) if not r.torch.startswith("guidance_in.")] + extra_rules()


def config_from_avatar(source, where: str, saved: Mapping[str, Any] | None = None) -> HunyuanAvatarConfig:
    """HunyuanAvatarConfig from the tensor shapes (+ what only a saved config can say: RoPE, audio layout)."""
    keys = set(source.keys())
    need = ["audio_proj.proj1.weight", "audio_proj.proj3.weight", "audio_adapter_blocks.0.to_q.weight"]
    if absent := [k for k in need if k not in keys]:
        raise ConversionError(f"{where}: no tensors {absent}; not a HunyuanVideo-Avatar transformer")
    if "guidance_in.mlp.0.weight" in keys:
        raise ConversionError(f"{where}: holds guidance_in.*: a guidance-distilled HunyuanVideo, not the Avatar "
                              "(use `hallojax convert hunyuan-video-original`)")
    saved = dict(saved or {})
    trunk = config_from_original(source, where, saved)
    hidden, flat = source.shape("audio_proj.proj1.weight")
    window = {k: saved.get(k, getattr(HunyuanAvatarConfig, k)) for k in ("audio_window", "audio_layers",
                                                                         "audio_channels")}
    if int(np.prod(list(window.values()))) != flat:
        raise ConversionError(f"{where}: audio_proj.proj1.weight takes {flat} inputs, not the window "
                              f"{window} ({int(np.prod(list(window.values())))}); give a config.json with them")
    adapters = len({k.split(".")[1] for k in keys if k.startswith("audio_adapter_blocks.")})
    kw = dict(trunk.to_dict(), **window, audio_hidden=hidden,
              audio_tokens=source.shape("audio_proj.proj3.weight")[0] // trunk.dim,
              adapter_inner=source.shape("audio_adapter_blocks.0.to_q.weight")[0],
              adapter_every=max(trunk.num_layers // max(adapters, 1), 1))
    kw.pop("guidance_embeds")
    try:
        return HunyuanAvatarConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


# --- the fp8 variant ---
class Fp8Source:
    """The fp8 file's tensors ({name: torch tensor}), float8 weights dequantised with their module's scale on
    read: float32(weight) · scale."""

    def __init__(self, tensors: Mapping[str, Any], scales: Mapping[str, Any]):
        self._tensors, self._scales = dict(tensors), dict(scales)

    def keys(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def get(self, name):
        from hallojax.convert.hf import _to_numpy

        t = self._tensors[name]
        if not _is_fp8(t):
            return _to_numpy(t)
        scale = self._scales.get(name.rsplit(".", 1)[0])
        if scale is None or scale.numel() != 1:  # reported by open_fp8; nothing is written
            return t.float().numpy()
        return (t.float() * scale.float().reshape(())).numpy()


def _is_fp8(t) -> bool:
    return "float8" in str(getattr(t, "dtype", ""))


def fp8_map_path(src: Path) -> Path:
    """The released naming: `<weights>.pt` -> `<weights>_map.pt`."""
    return src.with_name(src.name[:-len(src.suffix)] + "_map.pt")


def _strip(d: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a wrapper prefix every key carries (`module.`, ...), as the non-fp8 path does."""
    from hallojax.convert.hunyuan import ORIGINAL_PREFIXES

    for prefix in ORIGINAL_PREFIXES:
        if d and all(k.startswith(prefix) for k in d):
            return {k[len(prefix):]: v for k, v in d.items()}
    return dict(d)


def open_fp8(src: Path) -> tuple[Fp8Source, list[str], int]:
    """(source, problems, fp8 count): the fp8 file's tensors dequantised with the map beside it. Problems:
    every fp8 weight without a scale, scale without an fp8 weight, fp8 tensor outside the quantised blocks,
    non-scalar scale."""
    from hallojax.convert.hf import _torch_load

    mp = fp8_map_path(src)
    if not mp.is_file():
        raise ConversionError(f"{src}: holds float8 weights but its scale map {mp.name} is not beside it")
    tensors, scales = _strip(_torch_load(src)), _strip(_torch_load(mp))
    fp8 = sorted(k for k, t in tensors.items() if _is_fp8(t))
    modules = {k.rsplit(".", 1)[0] for k in fp8}
    problems = [f"{k}.weight is float8 but {mp.name} has no scale {k!r}" for k in sorted(modules - set(scales))]
    problems += [f"{mp.name}: scale {k!r} names no float8 weight {k}.weight" for k in sorted(set(scales) - modules)]
    problems += [f"{k}: float8 outside {FP8_BLOCKS} or not a weight" for k in fp8
                 if not (k.startswith(FP8_BLOCKS) and k.endswith(".weight"))]
    problems += [f"{mp.name}: scale {k!r} has shape {tuple(v.shape)}, expected one number" for k, v in scales.items()
                 if int(np.prod(v.shape)) != 1]
    return Fp8Source(tensors, scales), problems, len(fp8)


def _has_fp8(store) -> bool:
    return any(_is_fp8(t) for t in getattr(getattr(store, "_source", store), "_tensors", {}).values())


# --- convert / export ---
def convert_hunyuan_avatar(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                           progress: bool = True) -> Path:
    """Released Avatar transformer (bf16/fp32 `.pt`, fp8 `.pt` + map, safetensors) -> our pretrained directory."""
    from hallojax.checkpoint import param_shapes, save_pretrained
    from hallojax.convert.table import import_tensors

    src = Path(src)
    store, saved = open_original(src)
    if saved is None and src.is_file() and (src.parent / "config.json").is_file():  # our export's, beside a file
        from hallojax.convert.common import read_json

        saved = read_json(src.parent / "config.json", "an exported HunyuanVideo-Avatar config").get("model")
    problems: list[str] = []
    fp8 = 0
    if _has_fp8(store):
        store, problems, fp8 = open_fp8(src)
    cfg = config_from_avatar(store, str(src), saved)
    what = f"{src} as a HunyuanVideo-Avatar transformer" + (" (fp8 + scale map)" if fp8 else "")
    try:
        params = import_tensors(avatar_rules(cfg), store, param_shapes(cfg), avatar_layer_counts(cfg),
                                what=what, progress=progress)
    except ConversionError as e:
        raise ConversionError("\n".join([str(e)] + ([f"  {len(problems)} fp8:"] + [f"    {p}" for p in problems]
                                                    if problems else []))) from e
    if problems:
        raise ConversionError("\n".join([f"cannot convert {what}:", f"  {len(problems)} fp8:"]
                                        + [f"    {p}" for p in problems]))
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "hunyuan-avatar", "path": str(src.absolute()),
                                   "fp8_dequantised_weights": fp8})


def export_hunyuan_avatar(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                          max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> the released names as safetensors (+ our config.json)."""

    def rules(cfg):
        if not isinstance(cfg, HunyuanAvatarConfig):
            raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not HunyuanVideo-Avatar")
        return avatar_rules(cfg)

    return export_directory(ckpt, out, rules, lambda cfg: {"format": "hunyuan-avatar", "model": cfg.to_dict()},
                            num_layers=avatar_layer_counts, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)

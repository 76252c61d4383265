"""HunyuanVideo transformer checkpoints <-> hallojax `HunyuanVideoTransformer`: two name tables (diffusers,
original Tencent) and the config mappings.

    hallojax convert hunyuan-video          SRC_DIR OUT   # diffusers `HunyuanVideoTransformer3DModel` directory
    hallojax export  hunyuan-video          CKPT OUT      # -> a directory `from_pretrained` loads
    hallojax convert hunyuan-video-original SRC OUT       # Tencent names: mp_rank_00_model_states.pt ({"module":
    hallojax export  hunyuan-video-original CKPT OUT      #   state dict}), a .safetensors file, or a directory

The original names (HunyuanVideo / HunyuanVideo-Avatar `hymm_sp`) fuse what diffusers keeps apart: each
stream's `*_attn_qkv` (rows [q | k | v]) and the single blocks' `linear1` (rows [q | k | v | mlp_in]) are
read as row ranges (`Rule.rows`) and concatenated back on export; the final layer's modulation is
(shift, scale) where diffusers (and we) hold (scale, shift), so its halves are swapped. The original
`.pt` holds no config: sizes are read off the tensor shapes (head size 128, as released).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hallojax.convert.common import convert_directory, export_directory, read_json_config
from hallojax.convert.table import CONV3D, LINEAR, ConversionError, Rule, Transform, linear, norm
from hallojax.models.hunyuan import HunyuanVideoConfig

DIFFUSERS_CLASS = "HunyuanVideoTransformer3DModel"
DIFFUSERS_VERSION = "0.42.1"  # the version the parity tests run against
WEIGHTS_STEM = "diffusion_pytorch_model"
HEAD_DIM = 128  # every released HunyuanVideo model; used when a checkpoint has no config


def layer_counts(cfg: HunyuanVideoConfig) -> dict[str, int]:
    """{our stacked prefix: layers} for the table's per-layer rules."""
    return {"double_blocks": cfg.num_layers, "single_blocks": cfg.num_single_layers,
            "refiner.blocks": cfg.num_refiner_layers}


def _mlp(theirs: str, ours: str, fc1: str = "net.0.proj", fc2: str = "net.2") -> list[Rule]:
    return linear(f"{theirs}.{fc1}", f"{ours}.fc1") + linear(f"{theirs}.{fc2}", f"{ours}.fc2")


# --- diffusers names -------------------------------------------------------------------------------
def _dual_attention(t: str, o: str) -> list[Rule]:
    rules: list[Rule] = []
    for stream, projs, norms, out in (("img", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0"),
                                      ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                       ("norm_added_q", "norm_added_k"), "to_add_out")):
        for theirs, mine in zip(projs, ("to_q", "to_k", "to_v")):
            rules += linear(f"{t}.attn.{theirs}", f"{o}.{stream}_attn.{mine}")
        for theirs, mine in zip(norms, ("norm_q", "norm_k")):
            rules += norm(f"{t}.attn.{theirs}", f"{o}.{stream}_attn.{mine}", bias=False)
        rules += linear(f"{t}.attn.{out}", f"{o}.{stream}_out")
    return rules


_R, _D, _S = "context_embedder.token_refiner.refiner_blocks.{i}", "transformer_blocks.{i}", \
    "single_transformer_blocks.{i}"
DIFFUSERS_RULES: tuple[Rule, ...] = tuple(
    [Rule("x_embedder.proj.weight", "x_embedder.kernel", CONV3D), Rule("x_embedder.proj.bias", "x_embedder.bias")]
    + _mlp("time_text_embed.timestep_embedder", "time_embedder", "linear_1", "linear_2")
    + _mlp("time_text_embed.guidance_embedder", "guidance_embedder", "linear_1", "linear_2")
    + _mlp("time_text_embed.text_embedder", "text_embedder", "linear_1", "linear_2")
    # the text token refiner
    + _mlp("context_embedder.time_text_embed.timestep_embedder", "refiner.time_embedder", "linear_1", "linear_2")
    + _mlp("context_embedder.time_text_embed.text_embedder", "refiner.text_embedder", "linear_1", "linear_2")
    + linear("context_embedder.proj_in", "refiner.proj_in")
    + norm(f"{_R}.norm1", "refiner.blocks.norm1") + norm(f"{_R}.norm2", "refiner.blocks.norm2")
    + [r for p in ("to_q", "to_k", "to_v") for r in linear(f"{_R}.attn.{p}", f"refiner.blocks.attn.{p}")]
    + linear(f"{_R}.attn.to_out.0", "refiner.blocks.to_out") + _mlp(f"{_R}.ff", "refiner.blocks.ff")
    + linear(f"{_R}.norm_out.linear", "refiner.blocks.mod")
    # dual-stream blocks
    + linear(f"{_D}.norm1.linear", "double_blocks.img_mod")
    + linear(f"{_D}.norm1_context.linear", "double_blocks.txt_mod")
    + _dual_attention(_D, "double_blocks")
    + _mlp(f"{_D}.ff", "double_blocks.img_mlp") + _mlp(f"{_D}.ff_context", "double_blocks.txt_mlp")
    # single-stream blocks
    + linear(f"{_S}.norm.linear", "single_blocks.mod")
    + [r for p in ("to_q", "to_k", "to_v") for r in linear(f"{_S}.attn.{p}", f"single_blocks.attn.{p}")]
    + norm(f"{_S}.attn.norm_q", "single_blocks.attn.norm_q", bias=False)
    + norm(f"{_S}.attn.norm_k", "single_blocks.attn.norm_k", bias=False)
    + linear(f"{_S}.proj_mlp", "single_blocks.proj_mlp") + linear(f"{_S}.proj_out", "single_blocks.proj_out")
    # head
    + linear("norm_out.linear", "norm_out_mod") + linear("proj_out", "proj_out")
)

# diffusers config key -> HunyuanVideoConfig field (same meaning)
_CONFIG_KEYS = {
    "num_layers": "num_layers", "num_single_layers": "num_single_layers", "num_refiner_layers": "num_refiner_layers",
    "num_attention_heads": "num_heads", "attention_head_dim": "head_dim", "mlp_ratio": "mlp_ratio",
    "in_channels": "in_channels", "out_channels": "out_channels", "text_embed_dim": "text_dim",
    "pooled_projection_dim": "pooled_dim", "guidance_embeds": "guidance_embeds", "rope_theta": "rope_theta",
    "rope_axes_dim": "rope_axes",
}


def config_from_diffusers(d: Mapping[str, Any], where: str = "config.json") -> HunyuanVideoConfig:
    if not isinstance(d, dict):
        raise ConversionError(f"{where}: expected a JSON object")
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"{where}: _class_name is {d['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
    if d.get("qk_norm", "rms_norm") != "rms_norm":
        raise ConversionError(f"{where}: qk_norm={d['qk_norm']!r} is not supported (only 'rms_norm', as released)")
    if d.get("image_condition_type") is not None:
        raise ConversionError(f"{where}: image_condition_type={d['image_condition_type']!r} (I2V) is not supported; "
                              "only the T2V transformer (None)")
    kw = {ours: d[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in d}
    if kw.get("out_channels") is None:
        kw["out_channels"] = kw.get("in_channels", HunyuanVideoConfig.in_channels)
    kw["patch_size"] = (int(d.get("patch_size_t", 1)), int(d.get("patch_size", 2)), int(d.get("patch_size", 2)))
    try:
        return HunyuanVideoConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_diffusers(cfg: HunyuanVideoConfig) -> dict[str, Any]:
    if cfg.patch_size[1] != cfg.patch_size[2]:
        raise ConversionError(f"patch_size {cfg.patch_size}: diffusers needs equal height and width patches")
    d: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION}
    for theirs, ours in _CONFIG_KEYS.items():
        d[theirs] = getattr(cfg, ours)
    d.update(rope_axes_dim=list(cfg.rope_axes), patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
             qk_norm="rms_norm", image_condition_type=None)
    return d


def read_diffusers_config(src: str | os.PathLike) -> HunyuanVideoConfig:
    d = read_json_config(src, f"diffusers {DIFFUSERS_CLASS} (the 'transformer' folder of a HunyuanVideo pipeline)")
    return config_from_diffusers(d, str(Path(src) / "config.json"))


def convert_hunyuan_diffusers(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                              progress: bool = True) -> Path:
    """diffusers directory -> our pretrained directory. Checks everything before writing anything."""
    cfg = read_diffusers_config(src)
    return convert_directory(src, out, cfg, DIFFUSERS_RULES, num_layers=layer_counts(cfg), stem=WEIGHTS_STEM,
                             what=DIFFUSERS_CLASS, overwrite=overwrite, progress=progress)


def _hunyuan_config(cfg, ckpt) -> HunyuanVideoConfig:
    if not isinstance(cfg, HunyuanVideoConfig):
        raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not a HunyuanVideo transformer")
    return cfg


def export_hunyuan_diffusers(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                             max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> a diffusers directory `HunyuanVideoTransformer3DModel.from_pretrained` loads."""
    return export_directory(ckpt, out, lambda cfg: (_hunyuan_config(cfg, ckpt), DIFFUSERS_RULES)[1],
                            config_to_diffusers, num_layers=layer_counts, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)


# --- original (Tencent) names ----------------------------------------------------------------------
def _swap(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]], axis=0)


# final_layer.adaLN_modulation.1 rows are (shift, scale); ours (diffusers') are (scale, shift)
SWAP_LINEAR = Transform("swap halves, linear", lambda x: _swap(x).T, lambda x: _swap(x.T))
SWAP = Transform("swap halves", _swap, _swap)


def _fused(theirs: str, ours: list[str], sizes: list[int]) -> list[Rule]:
    """Row parts of a fused Linear `theirs` (weight and bias) into our Dense modules `ours`."""
    rules, start = [], 0
    for o, n in zip(ours, sizes):
        rows = (start, start + n)
        rules += [Rule(f"{theirs}.weight", f"{o}.kernel", LINEAR, rows), Rule(f"{theirs}.bias", f"{o}.bias", rows=rows)]
        start += n
    return rules


def original_rules(cfg: HunyuanVideoConfig) -> list[Rule]:
    """The Tencent-name table for `cfg` (the fused row ranges depend on the width)."""
    d, m = cfg.dim, cfg.mlp_dim
    r, b, s = "txt_in.individual_token_refiner.blocks.{i}", "double_blocks.{i}", "single_blocks.{i}"
    qkv = lambda o: [f"{o}.to_q", f"{o}.to_k", f"{o}.to_v"]  # noqa: E731
    rules = (
        [Rule("img_in.proj.weight", "x_embedder.kernel", CONV3D), Rule("img_in.proj.bias", "x_embedder.bias")]
        + _mlp("time_in", "time_embedder", "mlp.0", "mlp.2")
        + _mlp("guidance_in", "guidance_embedder", "mlp.0", "mlp.2")
        + _mlp("vector_in", "text_embedder", "in_layer", "out_layer")
        + _mlp("txt_in.t_embedder", "refiner.time_embedder", "mlp.0", "mlp.2")
        + _mlp("txt_in.c_embedder", "refiner.text_embedder", "linear_1", "linear_2")
        + linear("txt_in.input_embedder", "refiner.proj_in")
        + norm(f"{r}.norm1", "refiner.blocks.norm1") + norm(f"{r}.norm2", "refiner.blocks.norm2")
        + _fused(f"{r}.self_attn_qkv", qkv("refiner.blocks.attn"), [d, d, d])
        + linear(f"{r}.self_attn_proj", "refiner.blocks.to_out") + _mlp(f"{r}.mlp", "refiner.blocks.ff", "fc1", "fc2")
        + linear(f"{r}.adaLN_modulation.1", "refiner.blocks.mod")
    )
    for st in ("img", "txt"):
        o = f"double_blocks.{st}"
        rules += (linear(f"{b}.{st}_mod.linear", f"{o}_mod")
                  + _fused(f"{b}.{st}_attn_qkv", qkv(f"{o}_attn"), [d, d, d])
                  + norm(f"{b}.{st}_attn_q_norm", f"{o}_attn.norm_q", bias=False)
                  + norm(f"{b}.{st}_attn_k_norm", f"{o}_attn.norm_k", bias=False)
                  + linear(f"{b}.{st}_attn_proj", f"{o}_out") + _mlp(f"{b}.{st}_mlp", f"{o}_mlp", "fc1", "fc2"))
    rules += (
        _fused(f"{s}.linear1", qkv("single_blocks.attn") + ["single_blocks.proj_mlp"], [d, d, d, m])
        + linear(f"{s}.linear2", "single_blocks.proj_out")
        + norm(f"{s}.q_norm", "single_blocks.attn.norm_q", bias=False)
        + norm(f"{s}.k_norm", "single_blocks.attn.norm_k", bias=False)
        + linear(f"{s}.modulation.linear", "single_blocks.mod")
        + [Rule("final_layer.adaLN_modulation.1.weight", "norm_out_mod.kernel", SWAP_LINEAR),
           Rule("final_layer.adaLN_modulation.1.bias", "norm_out_mod.bias", SWAP)]
        + linear("final_layer.linear", "proj_out")
    )
    return rules


ORIGINAL_PREFIXES = ("module.", "model.diffusion_model.")  # DeepSpeed / ComfyUI-style wrappers


def _count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def config_from_original(source, where: str, saved: Mapping[str, Any] | None = None) -> HunyuanVideoConfig:
    """HunyuanVideoConfig from the shapes of an original-name state dict (no config ships with it). What
    shapes cannot tell (RoPE axes and θ) is the release's unless `saved` (our exported config) says otherwise."""
    keys = set(source.keys())

    def shape(name: str) -> tuple[int, ...]:
        if name not in keys:
            raise ConversionError(f"{where}: no tensor {name!r}; not an original-name HunyuanVideo transformer "
                                  f"(found {sorted(keys)[:6]}{'...' if len(keys) > 6 else ''})")
        return tuple(source.shape(name))

    dim, c_in, pt, ph, pw = shape("img_in.proj.weight")
    head_dim = shape("double_blocks.0.img_attn_q_norm.weight")[0]
    if dim % head_dim:
        raise ConversionError(f"{where}: width {dim} is not a multiple of the head size {head_dim}")
    saved = dict(saved or {})
    if head_dim != HEAD_DIM and "rope_axes" not in saved:
        raise ConversionError(f"{where}: head size {head_dim} (released: {HEAD_DIM}) and no config.json giving "
                              "rope_axes beside the weights")
    kw = dict(num_layers=_count(keys, r"double_blocks\.(\d+)\."),
              num_single_layers=_count(keys, r"single_blocks\.(\d+)\."),
              num_refiner_layers=_count(keys, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
              num_heads=dim // head_dim, head_dim=head_dim,
              mlp_ratio=shape("double_blocks.0.img_mlp.fc1.weight")[0] / dim,
              in_channels=c_in, out_channels=shape("final_layer.linear.weight")[0] // (pt * ph * pw),
              patch_size=(pt, ph, pw), text_dim=shape("txt_in.input_embedder.weight")[1],
              pooled_dim=shape("vector_in.in_layer.weight")[1],
              guidance_embeds="guidance_in.mlp.0.weight" in keys,
              **{k: saved[k] for k in ("rope_axes", "rope_theta", "rope_max_seq_len") if k in saved})
    try:
        return HunyuanVideoConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def open_original(src: str | os.PathLike):
    """(tensors, saved model config or None) of an original-name checkpoint: a `.pt`/`.pth` (a state dict,
    or {"module"|"ema": state dict}), a `.safetensors` file, or a directory holding one of those (index-sharded
    safetensors too) and optionally the config.json our export writes. Wrapper prefixes are dropped."""
    from hallojax.convert.common import read_json
    from hallojax.convert.hf import DictSource, _torch_load
    from hallojax.convert.safetensors_io import SafetensorsError, SafetensorsFile, TensorStore

    src = Path(src)
    saved = None
    if src.is_dir():
        if (src / "config.json").exists():
            saved = read_json(src / "config.json", "an exported HunyuanVideo config").get("model")
        if any((src / f"{WEIGHTS_STEM}.{e}").exists() for e in ("safetensors", "safetensors.index.json")):
            try:
                return _unwrap(TensorStore(src, WEIGHTS_STEM)), saved
            except SafetensorsError as e:
                raise ConversionError(str(e)) from e
        files = sorted(p for ext in ("*.pt", "*.pth", "*.safetensors") for p in src.glob(ext))
        files = [p for p in files if not p.name.endswith(("_fp8.pt", "_map.pt"))]
        if len(files) != 1:
            raise ConversionError(f"{src}: expected one .pt / .pth / .safetensors weights file, found "
                                  f"{[p.name for p in files]}; give the file itself")
        src = files[0]
    if not src.is_file():
        raise ConversionError(f"{src}: no such file or directory")
    if src.suffix == ".safetensors":
        try:
            store = SafetensorsFile(src)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from e
    elif src.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        store = DictSource(_torch_load(src))  # a state dict, or {"module" | "ema": state dict}
    else:
        raise ConversionError(f"{src}: not a weights file (expected .pt, .pth or .safetensors)")
    return _unwrap(store), saved


def _unwrap(store):
    from hallojax.convert.hf import RenamedSource

    keys = list(store.keys())
    for prefix in ORIGINAL_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            store = RenamedSource(store, lambda k, n=len(prefix): k[n:])
    return store


def convert_hunyuan_original(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                             progress: bool = True) -> Path:
    """Original-name HunyuanVideo transformer -> our pretrained directory. Checks everything before writing."""
    from hallojax.checkpoint import param_shapes, save_pretrained
    from hallojax.convert.table import import_tensors

    store, saved = open_original(src)
    cfg = config_from_original(store, str(src), saved)
    params = import_tensors(original_rules(cfg), store, param_shapes(cfg), layer_counts(cfg),
                            what=f"{src} as an original-name HunyuanVideo transformer", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "hunyuan-video-original", "path": str(Path(src).absolute())})


def export_hunyuan_original(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                            max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> original names as safetensors (+ our config.json for reference)."""

    def config_json(cfg):
        return {"format": "hunyuan-video-original", "model": cfg.to_dict()}

    return export_directory(ckpt, out, lambda cfg: original_rules(_hunyuan_config(cfg, ckpt)), config_json,
                            num_layers=layer_counts, stem=WEIGHTS_STEM, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, progress=progress)

"""transformers `T5EncoderModel` / `UMT5EncoderModel` (or the encoder of a full T5 / umT5 checkpoint)
<-> hallojax `T5Encoder`: the name table and the config mapping.

    hallojax convert umt5 SRC_DIR OUT_DIR     # e.g. the text_encoder folder of Wan2.1-T2V-*-Diffusers
    hallojax convert t5   SRC_DIR OUT_DIR
    hallojax export  umt5 CKPT_DIR OUT_DIR    # -> a directory UMT5EncoderModel.from_pretrained loads

The token embedding is ``shared.weight`` (``encoder.embed_tokens.weight`` is the same tensor tied to
it; it is used only when ``shared.weight`` is absent). Decoder and LM-head tensors are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import load_params_numpy, param_shapes, read_config, save_pretrained
from hallojax.convert.hf import RenamedSource, open_weights, read_json, write_directory
from hallojax.convert.table import ConversionError, Rule, export_tensors, import_tensors, linear, norm
from hallojax.models.encoders.t5 import T5EncoderConfig

MODEL_TYPES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}
IGNORED = ("decoder.*", "lm_head.*")
EMBED, TIED = "shared.weight", "encoder.embed_tokens.weight"

_b = "encoder.block.{i}.layer"
T5_RULES: tuple[Rule, ...] = tuple(
    [Rule(EMBED, "embedding"),
     # T5: one table in layer 0, shared by all layers; umT5: one per layer (chosen by the model's params)
     Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "position_bias.table"),
     Rule(f"{_b}.0.SelfAttention.relative_attention_bias.weight", "blocks.attn.position_bias.table")]
    + norm(f"{_b}.0.layer_norm", "blocks.attn_norm", bias=False)
    + [r for p in "qkvo" for r in linear(f"{_b}.0.SelfAttention.{p}", f"blocks.attn.{p}", bias=False)]
    + norm(f"{_b}.1.layer_norm", "blocks.ffn_norm", bias=False)
    + [r for p in ("wi", "wi_0", "wi_1", "wo")
       for r in linear(f"{_b}.1.DenseReluDense.{p}", f"blocks.ffn.{p}", bias=False)]
    + norm("encoder.final_layer_norm", "final_norm", bias=False)
)

_CONFIG_KEYS = {
    "vocab_size": "vocab_size", "d_model": "dim", "d_kv": "head_dim", "num_heads": "num_heads", "d_ff": "ffn_dim",
    "num_layers": "num_layers", "relative_attention_num_buckets": "num_buckets",
    "relative_attention_max_distance": "max_distance", "layer_norm_epsilon": "eps",
}
_HF_DEFAULT_PROJ = {"t5": "relu", "umt5": "gated-gelu"}


def parse_feed_forward_proj(proj: str, where: str) -> tuple[str, bool]:
    """transformers' reading of ``feed_forward_proj``: "gated-ACT" or "ACT"; "gated-gelu" means tanh GELU."""
    parts = str(proj).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConversionError(f"{where}: feed_forward_proj={proj!r}: expected 'gated-ACT' or 'ACT'")
    gated = len(parts) == 2
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return act, gated


def config_from_hf(d: Mapping[str, Any], where: str = "config.json", expect: str | None = None) -> T5EncoderConfig:
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{where}: model_type is {model_type!r}, expected one of {sorted(MODEL_TYPES)}")
    if expect is not None and model_type != expect:
        raise ConversionError(f"{where}: model_type is {model_type!r}, expected {expect!r} "
                              f"(use `hallojax convert {model_type}`)")
    kw: dict[str, Any] = {ours: d[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in d}
    kw["act"], kw["gated"] = parse_feed_forward_proj(d.get("feed_forward_proj", _HF_DEFAULT_PROJ[model_type]), where)
    kw["per_layer_bias"] = model_type == "umt5"
    try:
        return T5EncoderConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_hf(cfg: T5EncoderConfig) -> dict[str, Any]:
    if cfg.gated:
        if cfg.act == "gelu":
            raise ConversionError("a gated erf-GELU feed-forward has no transformers feed_forward_proj "
                                  "('gated-gelu' means tanh GELU)")
        proj = "gated-gelu" if cfg.act == "gelu_new" else f"gated-{cfg.act}"
    else:
        proj = cfg.act
    d: dict[str, Any] = {"architectures": [MODEL_TYPES[cfg.variant]], "model_type": cfg.variant,
                         "feed_forward_proj": proj, "is_encoder_decoder": False, "use_cache": False,
                         "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    for theirs, ours in _CONFIG_KEYS.items():
        d[theirs] = getattr(cfg, ours)
    d["num_decoder_layers"] = cfg.num_layers
    return d


def read_hf_config(src: str | os.PathLike, expect: str | None = None) -> T5EncoderConfig:
    path = Path(src) / "config.json"
    return config_from_hf(read_json(path, "a transformers T5 / umT5 model directory"), str(path), expect)


def _source(store):
    keys = set(store.keys())
    if EMBED in keys:  # the tied copy is the same tensor: read shared.weight only
        return RenamedSource(store, lambda k: None if k == TIED else k)
    return RenamedSource(store, lambda k: EMBED if k == TIED else k)


def convert_t5(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, progress: bool = True,
               *, expect: str | None = None) -> Path:
    """transformers T5 / umT5 directory (model_type from config.json) -> our pretrained directory.
    `expect` ("t5" or "umt5") rejects the other kind."""
    cfg = read_hf_config(src, expect)
    store = open_weights(src)
    cls = MODEL_TYPES[cfg.variant]
    params = import_tensors(T5_RULES, _source(store), param_shapes(cfg), cfg.num_layers, ignore=IGNORED,
                            what=f"{src} as {cls}", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "transformers", "class": cls, "path": str(Path(src).absolute())})


def convert_umt5(src, out, overwrite: bool = False, progress: bool = True) -> Path:
    """`convert_t5` that accepts umT5 only (the Wan text encoder)."""
    return convert_t5(src, out, overwrite, progress, expect="umt5")


def export_t5(ckpt: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
              max_shard_bytes: int = 5 * 2**30, progress: bool = True, *, expect: str | None = None) -> Path:
    """Our pretrained directory -> config.json + safetensors that `T5EncoderModel.from_pretrained`
    (T5) or `UMT5EncoderModel.from_pretrained` (umT5) loads, in the stored dtype. `expect` ("t5" or
    "umt5") rejects the other kind."""
    cfg, _ = read_config(ckpt)
    if not isinstance(cfg, T5EncoderConfig):
        raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not a T5 encoder")
    if expect is not None and cfg.variant != expect:
        raise ConversionError(f"{ckpt}: holds a {cfg.variant} encoder, not {expect} (use `hallojax export {cfg.variant}`)")
    tensors = export_tensors(T5_RULES, load_params_numpy(ckpt), cfg.num_layers, progress=progress)
    return write_directory(out, tensors, {"config.json": config_to_hf(cfg)}, inputs=(ckpt,), overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes)


def export_umt5(ckpt, out, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    return export_t5(ckpt, out, overwrite, max_shard_bytes, progress, expect="umt5")

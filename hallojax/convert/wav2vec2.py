"""transformers `Wav2Vec2Model` (or the ``wav2vec2.`` part of `Wav2Vec2ForCTC` / `Wav2Vec2ForPreTraining`)
<-> hallojax `Wav2Vec2`: the name table and the config mapping.

    hallojax convert wav2vec2 SRC_DIR OUT_DIR     # e.g. a facebook/wav2vec2-base-960h snapshot
    hallojax export  wav2vec2 CKPT_DIR OUT_DIR    # -> a directory Wav2Vec2Model.from_pretrained loads

The positional convolution's weight norm is read under either checkpoint naming
(``weight_g``/``weight_v``, or ``parametrizations.weight.original0``/``original1``) and written back
under the current one (transformers loads both).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import load_params_numpy, param_shapes, read_config, save_pretrained
from hallojax.convert.hf import CONV1D, RenamedSource, matches, open_weights, read_json, write_directory
from hallojax.convert.table import ConversionError, Rule, Transform, export_tensors, import_tensors, linear, norm
from hallojax.models.encoders.wav2vec2 import Wav2Vec2Config

MODEL_TYPE = "wav2vec2"
PREFIX = "wav2vec2."  # the base model inside Wav2Vec2ForCTC / ForPreTraining checkpoints
HEADS = ("lm_head.*", "quantizer.*", "project_hid.*", "project_q.*")  # task heads: dropped silently
POS = "encoder.pos_conv_embed.conv."
LEGACY = {f"{POS}weight_g": f"{POS}parametrizations.weight.original0",
          f"{POS}weight_v": f"{POS}parametrizations.weight.original1"}

# weight-norm magnitude: torch [1, 1, K] <-> ours [K]; any other shape is left as is (and reported)
WEIGHT_G = Transform("weight_g",
                     lambda x: x.reshape(x.shape[-1:]) if x.ndim == 3 and x.shape[:2] == (1, 1) else x,
                     lambda x: x.reshape((1, 1) + x.shape))


def wav2vec2_rules(cfg: Wav2Vec2Config) -> list[Rule]:
    rules: list[Rule] = []
    for j in range(len(cfg.conv_dim)):
        t, o = f"feature_extractor.conv_layers.{j}", f"feature_encoder.conv{j}"
        rules += [Rule(f"{t}.conv.weight", f"{o}.kernel", CONV1D), Rule(f"{t}.conv.bias", f"{o}.bias")]
        rules += norm(f"{t}.layer_norm", f"{o}.norm")
    rules += norm("feature_projection.layer_norm", "proj_norm") + linear("feature_projection.projection", "proj")
    rules += [Rule("masked_spec_embed", "masked_spec_embed"),
              Rule(f"{POS}parametrizations.weight.original0", "pos_conv.weight_g", WEIGHT_G),
              Rule(f"{POS}parametrizations.weight.original1", "pos_conv.weight_v", CONV1D),
              Rule(f"{POS}bias", "pos_conv.bias")]
    rules += norm("encoder.layer_norm", "enc_norm")
    t = "encoder.layers.{i}"
    for theirs, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "out")):
        rules += linear(f"{t}.attention.{theirs}", f"layers.attn.{ours}")
    rules += norm(f"{t}.layer_norm", "layers.attn_norm")
    rules += linear(f"{t}.feed_forward.intermediate_dense", "layers.ffn.fc1")
    rules += linear(f"{t}.feed_forward.output_dense", "layers.ffn.fc2")
    rules += norm(f"{t}.final_layer_norm", "layers.ffn_norm")
    return rules


# transformers config key -> Wav2Vec2Config field
_CONFIG_KEYS = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size", "hidden_act": "hidden_act", "conv_dim": "conv_dim",
    "conv_kernel": "conv_kernel", "conv_stride": "conv_stride", "conv_bias": "conv_bias",
    "feat_extract_norm": "feat_extract_norm", "feat_extract_activation": "feat_extract_activation",
    "num_conv_pos_embeddings": "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups": "num_conv_pos_embedding_groups",
    "do_stable_layer_norm": "do_stable_layer_norm", "layer_norm_eps": "layer_norm_eps",
}
_HF_DEFAULTS = {"mask_time_prob": 0.05, "mask_feature_prob": 0.0}  # transformers' defaults


def config_from_hf(d: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                   where: str = "config.json") -> Wav2Vec2Config:
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConversionError(f"{where}: model_type is {d['model_type']!r}, expected {MODEL_TYPE!r}")
    if d.get("add_adapter"):
        raise ConversionError(f"{where}: add_adapter=true (a convolutional adapter after the encoder) is not supported")
    if d.get("adapter_attn_dim") is not None:
        raise ConversionError(f"{where}: adapter_attn_dim={d['adapter_attn_dim']} (MMS attention adapters) is not "
                              "supported")
    n = d.get("num_feat_extract_layers")
    if n is not None and "conv_dim" in d and n != len(d["conv_dim"]):
        raise ConversionError(f"{where}: num_feat_extract_layers={n} but conv_dim has {len(d['conv_dim'])} entries")
    kw: dict[str, Any] = {ours: d[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in d}
    prob = lambda k: d.get(k, _HF_DEFAULTS[k]) or 0
    kw["masked_spec_embed"] = prob("mask_time_prob") > 0 or prob("mask_feature_prob") > 0
    if preprocessor:
        if "do_normalize" in preprocessor:
            kw["do_normalize"] = bool(preprocessor["do_normalize"])
        if "sampling_rate" in preprocessor:
            kw["sampling_rate"] = int(preprocessor["sampling_rate"])
    try:
        return Wav2Vec2Config(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def config_to_hf(cfg: Wav2Vec2Config) -> dict[str, Any]:
    d: dict[str, Any] = {"architectures": ["Wav2Vec2Model"], "model_type": MODEL_TYPE}
    for theirs, ours in _CONFIG_KEYS.items():
        v = getattr(cfg, ours)
        d[theirs] = list(v) if isinstance(v, tuple) else v
    d["num_feat_extract_layers"] = len(cfg.conv_dim)
    d["mask_time_prob"] = _HF_DEFAULTS["mask_time_prob"] if cfg.masked_spec_embed else 0.0
    d["mask_feature_prob"] = 0.0
    return d


def preprocessor_to_hf(cfg: Wav2Vec2Config) -> dict[str, Any]:
    return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "padding_side": "right",
            "padding_value": 0.0, "sampling_rate": cfg.sampling_rate, "do_normalize": cfg.do_normalize,
            # transformers' advice: group-norm models must not get an attention mask, layer-norm ones should
            "return_attention_mask": cfg.feat_extract_norm == "layer"}


def read_hf_config(src: str | os.PathLike) -> Wav2Vec2Config:
    src = Path(src)
    d = read_json(src / "config.json", "a transformers Wav2Vec2 model directory")
    pre = src / "preprocessor_config.json"
    return config_from_hf(d, read_json(pre, "") if pre.exists() else None, str(src / "config.json"))


def _rename(name: str, prefixed: bool) -> str | None:
    if prefixed:
        if not name.startswith(PREFIX):
            return None if matches(name, HEADS) else name
        name = name[len(PREFIX):]
    return LEGACY.get(name, name)


def convert_wav2vec2(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """transformers Wav2Vec2 directory -> our pretrained directory. Checks everything before writing."""
    cfg = read_hf_config(src)
    store = open_weights(src)
    prefixed = any(k.startswith(PREFIX) for k in store.keys())
    source = RenamedSource(store, lambda k: _rename(k, prefixed))
    params = import_tensors(wav2vec2_rules(cfg), source, param_shapes(cfg), cfg.num_layers,
                            ignore=() if prefixed else HEADS, what=f"{src} as Wav2Vec2Model", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "transformers", "class": "Wav2Vec2Model",
                                   "path": str(Path(src).absolute())})


def export_wav2vec2(ckpt: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                    max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> config.json + preprocessor_config.json + safetensors that
    `transformers.Wav2Vec2Model.from_pretrained` loads, in the stored dtype."""
    cfg, _ = read_config(ckpt)
    if not isinstance(cfg, Wav2Vec2Config):
        raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not wav2vec2")
    tensors = export_tensors(wav2vec2_rules(cfg), load_params_numpy(ckpt), cfg.num_layers, progress=progress)
    return write_directory(out, tensors, {"config.json": config_to_hf(cfg),
                                          "preprocessor_config.json": preprocessor_to_hf(cfg)},
                           inputs=(ckpt,), overwrite=overwrite, max_shard_bytes=max_shard_bytes)

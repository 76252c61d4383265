"""transformers `WhisperModel` / `WhisperForConditionalGeneration` (encoder only) <-> hallojax `WhisperEncoder`:
the name table and the config mapping.

    hallojax convert whisper SRC_DIR OUT_DIR     # e.g. openai/whisper-tiny, or HunyuanVideo-Avatar's whisper-tiny/
    hallojax export  whisper CKPT_DIR OUT_DIR    # -> a directory WhisperModel.from_pretrained loads (encoder)

Import strips the ``model.`` prefix of `WhisperForConditionalGeneration` checkpoints and drops the decoder
(``decoder.*``) and the LM head (``proj_out.*``) by name; every other tensor must be an encoder tensor of
the right shape (all problems listed in one error, nothing written). Export writes the encoder's tensors
under `WhisperModel` names with a config whose decoder sizes mirror the encoder's (transformers then
initialises a fresh decoder, which HunyuanVideo-Avatar never runs), plus the feature extractor's
``preprocessor_config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hallojax.checkpoint import load_params_numpy, param_shapes, read_config, save_pretrained
from hallojax.convert.hf import CONV1D, RenamedSource, open_weights, read_json, write_directory
from hallojax.convert.table import ConversionError, Rule, export_tensors, import_tensors, linear, norm
from hallojax.models.encoders.whisper import WhisperEncoderConfig

MODEL_TYPE = "whisper"
PREFIX = "model."  # WhisperForConditionalGeneration's base model
DROPPED = ("decoder.*", "proj_out.*")  # not part of the encoder: ignored by name
E = "encoder."

WHISPER_RULES: tuple[Rule, ...] = tuple(
    [Rule(f"{E}conv1.weight", "conv1.kernel", CONV1D), Rule(f"{E}conv1.bias", "conv1.bias"),
     Rule(f"{E}conv2.weight", "conv2.kernel", CONV1D), Rule(f"{E}conv2.bias", "conv2.bias"),
     Rule(f"{E}embed_positions.weight", "embed_positions")]
    + linear(f"{E}layers.{{i}}.self_attn.q_proj", "layers.q")
    + linear(f"{E}layers.{{i}}.self_attn.k_proj", "layers.k", bias=False)
    + linear(f"{E}layers.{{i}}.self_attn.v_proj", "layers.v")
    + linear(f"{E}layers.{{i}}.self_attn.out_proj", "layers.out")
    + norm(f"{E}layers.{{i}}.self_attn_layer_norm", "layers.attn_norm")
    + linear(f"{E}layers.{{i}}.fc1", "layers.mlp.fc1")
    + linear(f"{E}layers.{{i}}.fc2", "layers.mlp.fc2")
    + norm(f"{E}layers.{{i}}.final_layer_norm", "layers.mlp_norm")
    + norm(f"{E}layer_norm", "layer_norm")
)

# transformers config key -> WhisperEncoderConfig field
_CONFIG_KEYS = {"d_model": "hidden_size", "encoder_layers": "num_layers", "encoder_attention_heads": "num_heads",
                "encoder_ffn_dim": "intermediate_size", "num_mel_bins": "num_mel_bins",
                "max_source_positions": "max_source_positions", "activation_function": "hidden_act"}


def config_from_hf(d: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                   where: str = "config.json") -> WhisperEncoderConfig:
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConversionError(f"{where}: model_type is {d['model_type']!r}, expected {MODEL_TYPE!r}")
    kw: dict[str, Any] = {ours: d[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in d}
    if preprocessor:
        for key in ("sampling_rate", "hop_length"):
            if key in preprocessor:
                kw[key] = int(preprocessor[key])
    try:
        cfg = WhisperEncoderConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e
    if preprocessor:
        size = preprocessor.get("feature_size", cfg.num_mel_bins)
        frames = preprocessor.get("nb_max_frames")
        if size != cfg.num_mel_bins or (frames is not None and frames != cfg.num_frames):
            raise ConversionError(f"{where}: the feature extractor makes {frames} frames x {size} mels, the "
                                  f"encoder takes {cfg.num_frames} x {cfg.num_mel_bins} (2·max_source_positions x "
                                  "num_mel_bins)")
    return cfg


def config_to_hf(cfg: WhisperEncoderConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"architectures": ["WhisperModel"], "model_type": MODEL_TYPE}
    d.update({theirs: getattr(cfg, ours) for theirs, ours in _CONFIG_KEYS.items()})
    # no decoder is stored: mirror the encoder's sizes so that WhisperModel can be built
    d.update(decoder_layers=cfg.num_layers, decoder_attention_heads=cfg.num_heads,
             decoder_ffn_dim=cfg.intermediate_size)
    return d


def preprocessor_to_hf(cfg: WhisperEncoderConfig) -> dict[str, Any]:
    from hallojax.models.encoders.whisper import feature_extractor

    return feature_extractor(cfg).to_dict()


def read_hf_config(src: str | os.PathLike) -> WhisperEncoderConfig:
    src = Path(src)
    d = read_json(src / "config.json", "a transformers Whisper model directory")
    pre = src / "preprocessor_config.json"
    return config_from_hf(d, read_json(pre, "a Whisper feature extractor config") if pre.exists() else None,
                          str(src / "config.json"))


def convert_whisper(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """transformers Whisper directory -> our pretrained directory (the encoder). Checks everything before
    writing."""
    cfg = read_hf_config(src)
    store = open_weights(src)
    prefixed = any(k.startswith(PREFIX) for k in store.keys())
    source = RenamedSource(store, lambda k: k[len(PREFIX):] if prefixed and k.startswith(PREFIX) else k)
    params = import_tensors(WHISPER_RULES, source, param_shapes(cfg), cfg.num_layers, ignore=DROPPED,
                            what=f"{src} as a Whisper encoder", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "transformers", "class": "WhisperEncoder",
                                   "path": str(Path(src).absolute())})


def export_whisper(ckpt: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                   max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Our pretrained directory -> config.json + preprocessor_config.json + safetensors (the encoder under
    `WhisperModel` names), in the stored dtype."""
    cfg, _ = read_config(ckpt)
    if not isinstance(cfg, WhisperEncoderConfig):
        raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not a Whisper encoder")
    tensors = export_tensors(WHISPER_RULES, load_params_numpy(ckpt), cfg.num_layers, progress=progress)
    return write_directory(out, tensors, {"config.json": config_to_hf(cfg),
                                          "preprocessor_config.json": preprocessor_to_hf(cfg)},
                           inputs=(ckpt,), overwrite=overwrite, max_shard_bytes=max_shard_bytes)

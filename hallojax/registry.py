"""Model kinds that pretrained directories can hold: kind name -> (config class, model class).

A config class is a frozen dataclass with `from_dict`, `to_dict`, `replace` and a class attribute
`NUMERIC_FIELDS` (fields that change numerics but no parameter shape); a model class is built as
`Model(cfg, *, rngs)`. Modules are imported lazily, so loading a DiT never imports the VAE.
"""

from __future__ import annotations

import importlib

from flax import nnx

KINDS: dict[str, tuple[str, str, str]] = {
    "wan-dit": ("hallojax.models.wan", "DiTConfig", "WanDiT"),
    "wav2vec2": ("hallojax.models.encoders.wav2vec2", "Wav2Vec2Config", "Wav2Vec2"),
    "t5-encoder": ("hallojax.models.encoders.t5", "T5EncoderConfig", "T5Encoder"),
    "wan-vae": ("hallojax.models.wan_vae", "VAEConfig", "WanVAE"),
    "clip-vision": ("hallojax.models.encoders.clip", "CLIPVisionConfig", "CLIPVision"),
    "sd-vae": ("hallojax.models.sd_vae", "SDVAEConfig", "SDVAE"),
    "hunyuan-vae": ("hallojax.models.hunyuan_vae", "HunyuanVAEConfig", "HunyuanVAE"),
    "whisper-encoder": ("hallojax.models.encoders.whisper", "WhisperEncoderConfig", "WhisperEncoder"),
    "cogvideox": ("hallojax.models.cogvideox", "CogVideoXConfig", "CogVideoXTransformer"),
    "hallo3": ("hallojax.models.hallo3", "Hallo3Config", "Hallo3"),
    "letstalk": ("hallojax.models.letstalk", "LetsTalkConfig", "LetsTalk"),
    "hunyuan-video": ("hallojax.models.hunyuan", "HunyuanVideoConfig", "HunyuanVideoTransformer"),
    "cogvideox-vae": ("hallojax.models.cogvideox_vae", "CogVideoXVAEConfig", "CogVideoXVAE"),
    "hunyuan-avatar": ("hallojax.models.hunyuan_avatar", "HunyuanAvatarConfig", "HunyuanAvatar"),
}


def resolve(kind: str):
    """(config class, model class) of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    module, config_name, model_name = KINDS[kind]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, model_name)


def kind_of(cfg) -> str:
    for kind, (module, config_name, _) in KINDS.items():
        if type(cfg).__module__ == module and type(cfg).__name__ == config_name:
            return kind
    raise ValueError(f"{type(cfg).__name__} is not a registered model config ({sorted(KINDS)})")


def abstract(cfg) -> nnx.Module:
    """The model for `cfg` with ShapeDtypeStruct leaves: free at any size."""
    _, model_cls = resolve(kind_of(cfg))
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))

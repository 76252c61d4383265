"""EchoMimicV3's released transformer files -> hallojax `WanDiT` (with `hallojax.models.echomimic`'s projectors).

    hallojax convert echomimic-v3 BASE_DIR ECHO_FILE OUT

BASE_DIR is the Wan2.1-Fun-V1.1-1.3B-InP folder (original Wan names: config.json + weights); ECHO_FILE the
EchoMimicV3 file (preview: `transformer/diffusion_pytorch_model.safetensors`; Flash:
`echomimicv3-flash-pro/diffusion_pytorch_model.safetensors`; a `.pth` with or without a `state_dict`
wrapper also works). As the released loader does (`load_state_dict(..., strict=False)` over the base), the
EchoMimic tensors overlay the base and every key the file lacks keeps the base's value. The variant is
told by the file's projector (`audio2token.*`: preview, `audio_injection.*`: Flash); the sizes come from
the base config and the tensor shapes (wav2vec2 width 768). Unlike the released loader, a key that fits
nowhere (unexpected) or has the wrong shape is an error, listed with every missing one before anything is
written. The output's config records the variant's sampling recipe (`hallojax generate` defaults).
"""

from __future__ import annotations

import os
from pathlib import Path

from hallojax.convert.table import LINEAR, ConversionError, Rule, linear, norm
from hallojax.convert.wan_original import ORIGINAL_RULES, open_checkpoint, config_from_original
from hallojax.models.echomimic import RECIPES, VARIANTS

# the released audio modules, in the released names (shared/research/echomimic_v3.md §1.3-1.4)
_KV: tuple[Rule, ...] = tuple(
    [r for theirs, ours in (("k_audio", "audio_k_proj"), ("v_audio", "audio_v_proj"), ("q_audio", "audio_q_proj"))
     for r in linear(f"blocks.{{i}}.cross_attn.{theirs}", f"blocks.attn2.{ours}")]
    + norm("blocks.{i}.cross_attn.norm_k_audio", "blocks.attn2.norm_audio_k", bias=False))
AUDIO_RULES: dict[str, tuple[Rule, ...]] = {
    "preview": (Rule("audio2token.proj.weight", "audio_proj.proj.kernel", LINEAR),
                *norm("audio2token.norm", "audio_proj.norm"), *_KV),
    "flash": (*[r for name in ("proj1", "proj1_vf", "proj2", "proj3")
                for r in linear(f"audio_injection.{name}", f"audio_proj.{name}")],
              *norm("audio_injection.norm", "audio_proj.norm"), *_KV),
}
PREVIEW_ONLY, FLASH_ONLY = "audio2token.", "audio_injection."
WAV2VEC2_WIDTH = 768  # wav2vec2-base (both released audio encoders)


class OverlaySource:
    """`top` over `base`: names of both, a name in both read from `top`."""

    def __init__(self, base, top):
        self.base, self.top = base, top
        self._top = set(top.keys())
        self._names = list(dict.fromkeys([*base.keys(), *top.keys()]))

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple((self.top if name in self._top else self.base).shape(name))

    def get(self, name: str):
        return (self.top if name in self._top else self.base).get(name)


def variant_of(keys) -> str:
    keys = list(keys)
    preview = any(k.startswith(PREVIEW_ONLY) for k in keys)
    flash = any(k.startswith(FLASH_ONLY) for k in keys)
    if preview == flash:
        raise ConversionError("not an EchoMimicV3 transformer file: expected the preview's audio2token.* or the "
                              f"Flash model's audio_injection.* tensors ({'both' if preview else 'neither'} found)")
    return "preview" if preview else "flash"


def echomimic_config(base_cfg, source, variant: str):
    """The base DiTConfig + the variant's fields, sizes from the tensor shapes."""
    dim = base_cfg.dim
    kw = dict(VARIANTS[variant], in_channels=base_cfg.in_channels, image_dim=base_cfg.image_dim, audio_dim=dim,
              added_kv_proj_dim=dim)
    if base_cfg.image_dim is None:
        raise ConversionError("the base model has no CLIP image path (img_emb.*): EchoMimicV3 sits on "
                              "Wan2.1-Fun-1.3B-InP (model_type i2v)")
    try:
        if variant == "preview":
            kw["audio_in_dim"] = source.shape("audio2token.proj.weight")[1]
        else:
            w = kw["audio_window"]
            hidden, fan_in = source.shape("audio_injection.proj1.weight")
            kw.update(audio_hidden=hidden, audio_in_layers=fan_in // ((2 * w + 1) * WAV2VEC2_WIDTH),
                      audio_tokens=source.shape("audio_injection.proj3.weight")[0] // dim)
    except KeyError as e:
        raise ConversionError(f"EchoMimicV3 {variant} file without {e}") from None
    try:
        return base_cfg.replace(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"EchoMimicV3 {variant} sizes: {e}") from e


def convert_echomimic_v3(base_dir: str | os.PathLike, echo_file: str | os.PathLike, out: str | os.PathLike, *,
                         overwrite: bool = False, progress: bool = True) -> Path:
    """Wan2.1-Fun-InP base + an EchoMimicV3 file -> our pretrained directory. Checks before writing."""
    from hallojax.checkpoint import param_shapes, save_pretrained
    from hallojax.convert.table import import_tensors

    base, base_json = open_checkpoint(base_dir)
    echo, _ = open_checkpoint(echo_file)
    variant = variant_of(echo.keys())
    base_cfg = config_from_original(base_json, base, str(base_dir))
    merged = OverlaySource(base, echo)
    cfg = echomimic_config(base_cfg, merged, variant)
    params = import_tensors(ORIGINAL_RULES + AUDIO_RULES[variant], merged, param_shapes(cfg), cfg.num_layers,
                            what=f"{base_dir} + {echo_file} as EchoMimicV3 {variant}", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(base_dir, echo_file),
                           source={"format": "echomimic-v3", "variant": variant, "name": f"echomimic-v3-{variant}",
                                   "base": str(Path(base_dir).absolute()), "path": str(Path(echo_file).absolute())},
                           extra=RECIPES[variant])

"""The released Hallo3 file <-> hallojax `Hallo3` (both nets), through diffusers' CogVideoX names.

    hallojax convert hallo3 SRC OUT     # SRC: the `hallo3` folder (`latest` + `1/mp_rank_00_model_states.pt`),
                                        # the .pt itself, or a .safetensors holding the same names
    hallojax export  hallo3 CKPT OUT    # -> OUT/latest + OUT/1/mp_rank_00_model_states.pt ({"module": ...})

The file is a DeepSpeed/SAT `torch.save` dict whose `module` holds 2,238 tensors (bf16; kept as stored):
the denoiser under ``model.diffusion_model.``, the reference net under ``ref_model.diffusion_model.``
(research/hallo3.md §2). Read with torch (`weights_only=True`, memory-mapped) when torch is installed.

The mapping is composed from three declarative pieces: (1) `SAT_RENAMES` / `SAT_SPLITS`, each net's SAT
names -> diffusers CogVideoX names (what diffusers' scripts/convert_cogvideox_to_diffusers.py does: the fused
`query_key_value` split in three row blocks; the 12-chunk adaLN table -> norm1.linear = chunks 0,1,2,6,7,8 and
norm2.linear = 3,4,5,9,10,11; renames), (2) the CogVideoX converter's diffusers -> ours table
(`hallojax.convert.cogvideox.rules`) under ``denoiser.`` / ``reference.``, (3) Hallo3's own tensors in SAT names
(`OWN_RULES`: face/audio modules and projectors; the RoPE buffers and SAT's dead `position_embeddings`, kept
as `Buffer`s). Every key, shape and prefix is checked against the model the shapes describe before anything
is read or written; all problems are reported in one error, in the file's own names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from hallojax.convert.cogvideox import rules as cogvideox_rules
from hallojax.convert.hf import CONV1D, DictSource, _torch_load
from hallojax.convert.safetensors_io import SafetensorsError, SafetensorsFile
from hallojax.convert.table import ConversionError, Rule, import_tensors, linear, norm
from hallojax.models.hallo3 import PRESETS, Hallo3Config

DENOISER, REFERENCE = "model.diffusion_model.", "ref_model.diffusion_model."
NETS = ((DENOISER, "denoiser"), (REFERENCE, "reference"))
STATES = "mp_rank_00_model_states.pt"

# --- (1) SAT -> diffusers CogVideoX names, per net ---
# module renames (.weight and .bias both)
SAT_RENAMES: tuple[tuple[str, str], ...] = (
    ("mixins.patch_embed.proj", "patch_embed.proj"),
    ("mixins.patch_embed.text_proj", "patch_embed.text_proj"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("transformer.layers.{i}.input_layernorm", "transformer_blocks.{i}.norm1.norm"),
    ("transformer.layers.{i}.post_attention_layernorm", "transformer_blocks.{i}.norm2.norm"),
    ("transformer.layers.{i}.attention.dense", "transformer_blocks.{i}.attn1.to_out.0"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h", "transformer_blocks.{i}.ff.net.0.proj"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h", "transformer_blocks.{i}.ff.net.2"),
    ("mixins.adaln_layer.query_layernorm_list.{i}", "transformer_blocks.{i}.attn1.norm_q"),
    ("mixins.adaln_layer.key_layernorm_list.{i}", "transformer_blocks.{i}.attn1.norm_k"),
    ("transformer.final_layernorm", "norm_final"),  # SAT: all tokens; diffusers: video only (same result)
    ("mixins.final_layer.norm_final", "norm_out.norm"),
    ("mixins.final_layer.adaLN_modulation.1", "norm_out.linear"),  # shift, scale in both
    ("mixins.final_layer.linear", "proj_out"),
)
SAT_TENSOR_RENAMES = (("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),)
# one fused SAT module -> row blocks: (SAT module, number of equal row chunks, ((diffusers module, chunks), ...))
SAT_SPLITS: tuple[tuple[str, int, tuple[tuple[str, tuple[int, ...]], ...]], ...] = (
    ("transformer.layers.{i}.attention.query_key_value", 3,
     (("transformer_blocks.{i}.attn1.to_q", (0,)), ("transformer_blocks.{i}.attn1.to_k", (1,)),
      ("transformer_blocks.{i}.attn1.to_v", (2,)))),
    # SAT chunks: shift, scale, gate (msa), shift, scale, gate (mlp), then the same six for text
    ("mixins.adaln_layer.adaLN_modulations.{i}.1", 12,
     (("transformer_blocks.{i}.norm1.linear", (0, 1, 2, 6, 7, 8)),
      ("transformer_blocks.{i}.norm2.linear", (3, 4, 5, 9, 10, 11)))),
)


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)") + r"$")


# (SAT template, diffusers template, row chunks or None, chunk count): every entry of the three tables above
_ENTRIES = ([(f"{s}.{wb}", f"{d}.{wb}", None, 1) for s, d in SAT_RENAMES for wb in ("weight", "bias")]
            + [(s, d, None, 1) for s, d in SAT_TENSOR_RENAMES]
            + [(f"{s}.{wb}", f"{d}.{wb}", idx, n) for s, n, parts in SAT_SPLITS for d, idx in parts
               for wb in ("weight", "bias")])
_FORWARD = [(_pattern(s), d, idx, n) for s, d, idx, n in _ENTRIES]
_BACKWARD = [(_pattern(d), s, idx, n) for s, d, idx, n in _ENTRIES]


def _fill(template: str, m: re.Match) -> str:
    return template.format(i=m.group("i")) if "{i}" in template else template


def sat_to_diffusers(name: str) -> list[tuple[str, tuple[int, ...] | None, int]]:
    """A net-relative SAT name -> [(diffusers name, row chunks or None, chunk count)]; [] if not a backbone
    tensor (a fused SAT tensor gives several)."""
    return [(_fill(d, m), idx, n) for pat, d, idx, n in _FORWARD if (m := pat.match(name))]


def _to_sat(name: str) -> tuple[str, tuple[int, ...] | None, int]:
    """A `DiffusersView` name -> (released name, its row chunks or None, chunk count)."""
    prefix = next((p for p, _ in NETS if name.startswith(p)), None)
    if prefix is not None:
        for pat, s, idx, n in _BACKWARD:
            if m := pat.match(name[len(prefix):]):
                return prefix + _fill(s, m), idx, n
    return name, None, 1


class DiffusersView:
    """The released tensors with each net's backbone under diffusers names (``<net prefix><diffusers name>``,
    fused tensors split lazily); every other name passes through unchanged."""

    def __init__(self, source):
        self.source = source
        self._map: dict[str, tuple[str, tuple[int, ...] | None, int]] = {}
        for key in source.keys():
            prefix = next((p for p, _ in NETS if key.startswith(p)), None)
            pieces = sat_to_diffusers(key[len(prefix):]) if prefix else []
            for dest, idx, n in pieces:
                self._map[prefix + dest] = (key, idx, n)
            if not pieces:
                self._map[key] = (key, None, 1)

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        key, idx, n = self._map[name]
        shape = tuple(self.source.shape(key))
        return shape if idx is None else (shape[0] // n * len(idx), *shape[1:])

    def get(self, name: str) -> np.ndarray:
        key, idx, n = self._map[name]
        arr = self.source.get(key)
        if idx is None:
            return arr
        rows = arr.shape[0] // n
        return np.concatenate([arr[j * rows:(j + 1) * rows] for j in idx])


def diffusers_to_sat(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `DiffusersView` on whole arrays (export): fused tensors reassembled."""
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        key, idx, n = _to_sat(name)
        if idx is None:
            out[key] = arr
            continue
        rows = arr.shape[0] // len(idx)
        full = out.setdefault(key, np.empty((rows * n, *arr.shape[1:]), arr.dtype))
        for pos, j in enumerate(idx):
            full[j * rows:(j + 1) * rows] = arr[pos * rows:(pos + 1) * rows]
    return out


# --- (3) Hallo3's own tensors, in the released names ---
def _cross(kind: str) -> list[Rule]:
    t, o = f"{DENOISER}transformer.layers.{{i}}.", f"cross.{kind}"
    return (norm(f"{t}{kind}_input_layernorm", f"{o}.norm") + linear(f"{t}{kind}_attn.query", f"{o}.query")
            + linear(f"{t}{kind}_attn.key_value", f"{o}.key_value") + linear(f"{t}{kind}_attn.dense", f"{o}.dense"))


_P = f"{DENOISER}transformer."
OWN_RULES: tuple[Rule, ...] = tuple(
    _cross("face") + _cross("audio")
    + linear(f"{_P}face_proj.proj", "face_proj.proj") + norm(f"{_P}face_proj.norm", "face_proj.norm")
    + [r for n in ("proj1", "proj2", "proj3") for r in linear(f"{_P}audio_proj.{n}", f"audio_proj.{n}")]
    + [Rule(f"{_P}audio_proj.conv1.weight", "audio_proj.conv", CONV1D),
       Rule(f"{_P}audio_proj.conv1.bias", "audio_proj.conv_bias")]
    + norm(f"{_P}audio_proj.norm", "audio_proj.norm")
    + [Rule(f"{prefix}{sat}", f"{ours}_buffers.{mine}") for prefix, ours in NETS
       for sat, mine in (("mixins.pos_embed.freqs_sin", "freqs_sin"), ("mixins.pos_embed.freqs_cos", "freqs_cos"),
                         ("transformer.position_embeddings.weight", "position_embeddings"))]
)


def rules(cfg: Hallo3Config) -> tuple[Rule, ...]:
    """The whole table over `DiffusersView` names: (2) under each net prefix, plus (3)."""
    backbone = cogvideox_rules(cfg.backbone())
    return tuple(Rule(prefix + r.torch, f"{ours}.{r.ours}", r.transform) for prefix, ours in NETS
                 for r in backbone) + OWN_RULES


def released_shapes(cfg: Hallo3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name and torch shape of the released file for `cfg`, from the model's shapes alone."""
    from hallojax.checkpoint import param_shapes

    ours = param_shapes(cfg)
    view: dict[str, tuple[int, ...]] = {}
    for r in rules(cfg):
        if r.ours not in ours:
            continue
        shape = r.transform.torch_shape(ours[r.ours][1:] if r.per_layer else ours[r.ours])
        for i in range(cfg.num_layers) if r.per_layer else [None]:
            view[r.torch.format(i=i)] = shape
    out = {}
    for name, shape in view.items():
        key, idx, n = _to_sat(name)
        out[key] = shape if idx is None else (shape[0] // len(idx) * n, *shape[1:])
    return out


# --- reading ---
def open_released(src: str | os.PathLike):
    """The released tensors of SRC: a folder with `latest` (the tag of `<tag>/mp_rank_00_model_states.pt`) or
    that .pt beside it, the .pt (a `{"module": {...}}` dict, or the bare state dict), or a .safetensors."""
    src = Path(src)
    if src.is_dir():
        if (src / "latest").is_file():
            tag = (src / "latest").read_text().strip()
            src = src / tag / STATES
        elif (src / STATES).is_file():
            src = src / STATES
        else:
            found = sorted(p.name for p in src.iterdir())
            raise ConversionError(f"{src}: neither `latest` nor {STATES} found (found {found}); give the Hallo3 "
                                  "folder or the .pt itself")
    if not src.is_file():
        raise ConversionError(f"{src}: no such file")
    if src.suffix == ".safetensors":
        try:
            return SafetensorsFile(src)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from e
    return DictSource(_torch_load(src, wrapper="module"))


def _check_prefixes(keys, where: str) -> None:
    keys = list(keys)
    if not any(k.startswith(DENOISER) for k in keys) or not any(k.startswith(REFERENCE) for k in keys):
        found = sorted({k.split(".diffusion_model.")[0] + ".diffusion_model." if ".diffusion_model." in k
                        else k.split(".")[0] + "." for k in keys})
        raise ConversionError(f"{where}: not a Hallo3 checkpoint: expected the denoiser under {DENOISER!r} and the "
                              f"reference net under {REFERENCE!r}; found the prefixes {found[:8]}")


def config_from_shapes(source, where: str) -> Hallo3Config:
    """Sizes from the tensor shapes; the latent grid (and wav2vec2 width) of the preset whose position tables
    have as many rows. A missing tensor falls back to that preset (the key check then names it)."""
    keys = set(source.keys())

    def shape(name, fallback):
        return tuple(source.shape(DENOISER + name)) if DENOISER + name in keys else fallback

    rows = shape("mixins.pos_embed.freqs_sin", (0,))[0]
    base = next((Hallo3Config(**p) for p in PRESETS.values() if Hallo3Config(**p).video_tokens == rows), None)
    if base is None:
        known = {n: Hallo3Config(**p).video_tokens for n, p in PRESETS.items()}
        raise ConversionError(f"{where}: {DENOISER}mixins.pos_embed.freqs_sin has {rows} rows (video tokens); the "
                              f"known latent grids have {known}")
    dim, text_dim = shape("mixins.patch_embed.text_proj.weight", (base.dim, base.text_dim))
    head_dim = shape("mixins.adaln_layer.query_layernorm_list.0.weight", (base.head_dim,))[0]
    layer_ids = {int(m[1]) for k in keys if (m := re.match(re.escape(DENOISER) + r"transformer\.layers\.(\d+)\.", k))}
    face_rows, face_in = shape("transformer.face_proj.proj.weight", (base.face_tokens * base.face_dim, base.face_in))
    face_dim = shape("transformer.face_proj.norm.weight", (base.face_dim,))[0]
    hidden, fan = shape("transformer.audio_proj.proj1.weight", (base.audio_hidden, 0))
    audio_dim = shape("transformer.audio_proj.norm.weight", (base.audio_dim,))[0]
    kw = dict(
        num_layers=max(layer_ids) + 1 if layer_ids else base.num_layers, num_heads=dim // head_dim, head_dim=head_dim,
        in_channels=shape("mixins.patch_embed.proj.weight", (0, base.in_channels))[1],
        out_channels=shape("mixins.final_layer.linear.weight", (4 * base.out_channels,))[0] // 4,
        text_dim=text_dim, text_len=shape("mixins.pos_embed.pos_embedding", (0, base.text_len + rows))[1] - rows,
        time_embed_dim=shape("time_embed.0.weight", (base.time_embed_dim,))[0],
        face_in=face_in, face_dim=face_dim, face_tokens=face_rows // face_dim, audio_hidden=hidden,
        audio_dim=audio_dim, audio_tokens=shape("transformer.audio_proj.proj3.weight", (0,))[0] // audio_dim
        or base.audio_tokens)
    per_frame = (2 * base.audio_window + 1) * base.audio_in_dim  # wav2vec2's width as in the preset
    kw["audio_layers"] = fan // per_frame if fan and fan % per_frame == 0 else base.audio_layers
    try:
        return base.replace(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: the tensor shapes describe no valid Hallo3 model ({e})") from e


def check_released(source, cfg: Hallo3Config, where: str) -> None:
    """Every missing, unexpected and mis-shaped tensor (released names) in one error."""
    want = released_shapes(cfg)
    have = set(source.keys())
    missing = sorted(set(want) - have)
    unexpected = sorted(have - set(want))
    bad = sorted(f"{k}: {tuple(source.shape(k))}, expected {want[k]}" for k in have & set(want)
                 if tuple(source.shape(k)) != want[k])
    if missing or unexpected or bad:
        lines = [f"cannot convert {where} as Hallo3 ({len(want)} tensors expected for {cfg.num_layers} layers, "
                 f"width {cfg.dim}):"]
        for title, items in (("missing", [f"{k} (expected {want[k]})" for k in missing]),
                             ("unexpected", [f"{k} {tuple(source.shape(k))}" for k in unexpected]),
                             ("mis-shaped", bad)):
            if items:
                lines += [f"  {len(items)} {title}:"] + [f"    {s}" for s in items]
        raise ConversionError("\n".join(lines))


# --- import / export ---
def convert_hallo3(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """The released file -> our pretrained directory (both nets, stored dtype kept). Checks before writing."""
    from hallojax.checkpoint import param_shapes, save_pretrained

    source = open_released(src)
    _check_prefixes(source.keys(), str(src))
    cfg = config_from_shapes(source, str(src))
    check_released(source, cfg, str(src))
    params = import_tensors(rules(cfg), DiffusersView(source), param_shapes(cfg), cfg.num_layers,
                            what=f"{src} as Hallo3", progress=progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "hallo3", "path": str(Path(src).absolute())})


def export_hallo3(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                  max_shard_bytes: int | None = None, progress: bool = True) -> Path:
    """Our pretrained directory -> OUT/latest ("1") + OUT/1/mp_rank_00_model_states.pt = {"module": {...}} in the
    released names and the stored dtype (one file, as released: `max_shard_bytes` is not used). Needs torch."""
    from hallojax.checkpoint import load_params_numpy, read_config
    from hallojax.convert.table import export_tensors
    from hallojax.fsutil import atomic_directory

    cfg, _ = read_config(ckpt)
    if not isinstance(cfg, Hallo3Config):
        raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not Hallo3")
    try:
        import ml_dtypes
        import torch
    except ImportError as e:
        raise ConversionError("writing the released .pt layout needs torch") from e
    tensors = diffusers_to_sat(export_tensors(rules(cfg), load_params_numpy(ckpt), cfg.num_layers,
                                              progress=progress))

    def to_torch(a: np.ndarray):
        a = np.ascontiguousarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    with atomic_directory(out, overwrite=overwrite, inputs=(ckpt,)) as tmp:
        (tmp / "1").mkdir()
        torch.save({"module": {k: to_torch(v) for k, v in tensors.items()}}, tmp / "1" / STATES)
        (tmp / "latest").write_text("1")
    return Path(out)

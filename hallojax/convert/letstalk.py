"""LetsTalk's released training checkpoints <-> hallojax `LetsTalk`.

    hallojax convert letstalk SRC OUT [--weights ema|model]   # SRC: the torch.save file (e.g. last.ckpt)
    hallojax export  letstalk CKPT OUT                        # OUT: a torch.save file in the released layout

The released file (`train_pl.py`) is ``torch.save({"model": ..., "ema": ..., "audioproj": ...})``: two state
dicts of the DiT (raw and EMA; inference loads "ema", the default here) and one of the audio projector. Keys
as shared/research/hyavatar_letstalk.md C.9 lists them. Sizes are read off the shapes: width, channels and
patch from `x_embedder.proj`, depth from the block indices, latent size from `pos_embed`, the variant from
`temp_embed` (VDTcat) or `long_temp_embed` (VDTcatlong: its length is clip frames + memory frames; the clip is
16 frames unless `num_frames` says otherwise). Heads are not in any shape: the released sizes' (S 6, B 12,
L 16, XL 16) or width / 64 (`num_heads` overrides). The fixed sin-cos tables (`pos_embed`, `temp_embed` /
`long_temp_embed`) are checked against ours and not stored; export writes ours. Every missing, unexpected or
mis-shaped key is listed in one error before anything is written. Export writes the same weights as both
"model" and "ema" (a hallojax checkpoint holds one set), and for a model trained with flow matching
(`prediction="flow"`, e.g. `configs/letstalk.py:lipsync-small`) a "hallojax" entry {"prediction": "flow"} that
the released loader ignores and convert reads back (a released file has none: ε).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from hallojax.convert.hf import DictSource
from hallojax.convert.table import ConversionError, Rule, Transform, export_tensors, import_tensors, linear, norm
from hallojax.models.letstalk import SIZES, LetsTalkConfig, sincos_2d, temporal_table

# torch Conv2d weight [D, C, p, p] <-> our patch kernel [1, p, p, C, D]
CONV2D = Transform("conv2d", lambda x: x.transpose(2, 3, 1, 0)[None], lambda x: x[0].transpose(3, 2, 0, 1))
WEIGHTS = ("ema", "model")
AUDIO = "audioproj."  # the audio projector's keys, prefixed with its dict's name in our one namespace
META = "hallojax"  # export's note of what the released layout cannot say (a flow-trained model's objective)
TABLES = {"pos_embed": "@pos_embed", "temp_embed": "@temp_embed", "long_temp_embed": "@temp_embed"}


def _block(name: str, ours: str, bias: bool = True) -> list[Rule]:
    return linear(f"blocks.{{i}}.{name}", f"blocks.{ours}", bias)


RULES: tuple[Rule, ...] = tuple(
    [Rule("x_embedder.proj.weight", "x_embedder.kernel", CONV2D), Rule("x_embedder.proj.bias", "x_embedder.bias")]
    + linear("t_embedder.mlp.0", "t_embedder.fc1") + linear("t_embedder.mlp.2", "t_embedder.fc2")
    + _block("attn.qkv", "attn.qkv") + _block("attn.proj", "attn.proj")
    + _block("mlp.fc1", "mlp.fc1") + _block("mlp.fc2", "mlp.fc2")
    + _block("adaLN_modulation.1", "modulation")
    + norm("blocks.{i}.temporal_norm1", "blocks.temporal_norm1")
    + _block("temporal_attn.qkv", "temporal_attn.qkv") + _block("temporal_attn.proj", "temporal_attn.proj")
    + _block("temporal_fc", "temporal_fc")
    + _block("cross_attn.q_proj", "cross_attn.q_proj", bias=False)
    + _block("cross_attn.k_proj", "cross_attn.k_proj", bias=False)
    + _block("cross_attn.v_proj", "cross_attn.v_proj", bias=False)
    + _block("cross_attn.proj", "cross_attn.proj")
    + linear("final_layer.linear", "final_linear") + linear("final_layer.adaLN_modulation.1", "final_modulation")
    + linear(AUDIO + "proj1", "audio_proj.fc1") + linear(AUDIO + "proj2", "audio_proj.fc2")
    + linear(AUDIO + "proj3", "audio_proj.fc3") + norm(AUDIO + "norm", "audio_proj.norm")
)


def _table_rules(cfg: LetsTalkConfig) -> list[Rule]:
    temp = "long_temp_embed" if cfg.variant == "VDTcatlong" else "temp_embed"
    return [Rule("pos_embed", TABLES["pos_embed"]), Rule(temp, TABLES[temp])]


def tables(cfg: LetsTalkConfig) -> dict[str, np.ndarray]:
    """Our fixed tables under their pseudo-parameter names, in the released shapes (1, N, D) / (1, F + M, D)."""
    g = cfg.latent_size // cfg.patch_size
    return {TABLES["pos_embed"]: sincos_2d(cfg.hidden, g, g)[None],
            "@temp_embed": temporal_table(cfg.hidden, cfg.num_frames + cfg.memory_frames)[None]}


# --- reading ---------------------------------------------------------------------------------------
def read_checkpoint(src: str | os.PathLike, weights: str = "ema") -> DictSource:
    """The chosen DiT state dict and the audio projector's (keys prefixed ``audioproj.``) as one source."""
    if weights not in WEIGHTS:
        raise ConversionError(f"--weights {weights!r}: expected one of {WEIGHTS}")
    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"{src}: no such file (expected the torch.save file of a LetsTalk run, e.g. last.ckpt)")
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{src}: reading a pickled PyTorch checkpoint needs torch") from e
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds
        raise ConversionError(f"{src}: not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    parts = {k: v for k, v in ckpt.items() if isinstance(v, dict)} if isinstance(ckpt, dict) else {}
    wanted = [weights, "audioproj"]
    if any(k not in parts for k in wanted):
        raise ConversionError(f"{src}: expected a dict with {wanted!r} state dicts (the released "
                              f"torch.save({{'model', 'ema', 'audioproj'}})); found "
                              f"{sorted(parts) if isinstance(ckpt, dict) else type(ckpt).__name__}")
    tensors = {**parts[weights], **{AUDIO + k: v for k, v in parts["audioproj"].items()}}
    if not all(hasattr(v, "shape") for v in tensors.values()):
        raise ConversionError(f"{src}: the {weights!r} / 'audioproj' entries must hold only tensors")
    source = DictSource(tensors)
    source.meta = dict(ckpt.get(META, {}))  # what a hallojax export adds beyond the released layout
    return source


def config_from_shapes(source, where: str, *, num_heads: int | None = None, num_frames: int = 16,
                       **numerics) -> LetsTalkConfig:
    """LetsTalkConfig from a released state dict's shapes (see the module docstring)."""
    keys = set(source.keys())

    def shape(name: str) -> tuple[int, ...]:
        if name not in keys:
            raise ConversionError(f"{where}: no tensor {name!r}; not a LetsTalk checkpoint "
                                  f"(found {sorted(keys)[:6]}{'...' if len(keys) > 6 else ''})")
        return tuple(source.shape(name))

    dim, channels, patch, _ = shape("x_embedder.proj.weight")
    depth = 1 + max((int(m[1]) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    n = shape("pos_embed")[1]
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ConversionError(f"{where}: pos_embed {shape('pos_embed')} is not a square patch grid")
    long = "long_temp_embed" in keys
    if long == ("temp_embed" in keys):
        raise ConversionError(f"{where}: expected one of temp_embed (VDTcat) or long_temp_embed (VDTcatlong)")
    length = shape("long_temp_embed" if long else "temp_embed")[1]
    frames, memory = (num_frames, length - num_frames) if long else (length, 0)
    if memory < 0:
        raise ConversionError(f"{where}: long_temp_embed covers {length} frames, fewer than the clip's {num_frames}")
    heads = num_heads or {hidden: h for _, hidden, h in SIZES.values()}.get(dim, max(1, dim // 64))
    out = shape("final_layer.linear.weight")[0] // (patch * patch)
    hidden, fan_in = shape(AUDIO + "proj1.weight")
    audio_dim = shape(AUDIO + "norm.weight")[0]
    in_dim, window = 768, 2  # wav2vec2-base; ±2 frames (audio_margin)
    kw = dict(variant="VDTcatlong" if long else "VDTcat", depth=depth, hidden=dim, num_heads=heads, patch_size=patch,
              in_channels=channels, learn_sigma=out == 2 * channels,
              mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / dim if depth else 4.0, latent_size=grid * patch,
              num_frames=frames, memory_frames=memory, audio_dim=audio_dim,
              audio_in_layers=fan_in // ((2 * window + 1) * in_dim), audio_in_dim=in_dim, audio_window=window,
              audio_hidden=hidden, audio_tokens=shape(AUDIO + "proj3.weight")[0] // audio_dim, **numerics)
    if out not in (channels, 2 * channels) or fan_in % ((2 * window + 1) * in_dim):
        raise ConversionError(f"{where}: final_layer.linear {shape('final_layer.linear.weight')} or audioproj.proj1 "
                              f"{(hidden, fan_in)} does not fit {channels} channels / 5 x layers x {in_dim} audio")
    try:
        return LetsTalkConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def import_letstalk(source, cfg: LetsTalkConfig, where: str, progress: bool = True) -> dict[str, np.ndarray]:
    """{our dotted path: array} from a released-layout source; the fixed tables checked, then dropped."""
    from hallojax.checkpoint import param_shapes

    ours = tables(cfg)
    shapes = {**param_shapes(cfg), **{k: v.shape for k, v in ours.items()}}
    params = import_tensors(RULES + tuple(_table_rules(cfg)), source, shapes, cfg.depth, what=where,
                            progress=progress)
    for rule in _table_rules(cfg):
        got = np.asarray(params.pop(rule.ours), np.float32)
        err = float(np.abs(got - ours[rule.ours]).max())
        if err > 1e-2:  # a bf16 copy is fine; another layout or length is not
            raise ConversionError(f"{where}: {rule.torch} differs from the fixed sin-cos table this model uses "
                                  f"(max |difference| {err:.3g}): not a LetsTalk table for {cfg.hidden} channels")
    return params


# --- import / export -------------------------------------------------------------------------------
def convert_letstalk(src: str | os.PathLike, out: str | os.PathLike, *, weights: str = "ema",
                     num_heads: int | None = None, num_frames: int = 16, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """A released LetsTalk checkpoint -> our pretrained directory (`weights`: "ema" or "model")."""
    from hallojax.checkpoint import save_pretrained

    source = read_checkpoint(src, weights)
    extra = {k: source.meta[k] for k in ("prediction",) if k in source.meta}
    cfg = config_from_shapes(source, str(src), num_heads=num_heads, num_frames=num_frames, **extra)
    params = import_letstalk(source, cfg, f"{src} ({weights!r}) as LetsTalk {cfg.variant}", progress)
    return save_pretrained(out, params, cfg, overwrite=overwrite, inputs=(src,),
                           source={"format": "letstalk", "weights": weights, "path": str(Path(src).absolute())})


def export_letstalk(ckpt: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                    progress: bool = True, **_) -> Path:
    """Our pretrained directory -> ``torch.save({"model", "ema", "audioproj"})`` at `out` (one file, written
    under a temporary name and renamed), in the stored dtype."""
    import torch

    from hallojax.checkpoint import load_params_numpy, read_config
    from hallojax.fsutil import atomic_file

    cfg, _ = read_config(ckpt)
    if not isinstance(cfg, LetsTalkConfig):
        raise ConversionError(f"{ckpt}: holds a {type(cfg).__name__} model, not LetsTalk")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    params = load_params_numpy(ckpt)
    dtype = params["x_embedder.kernel"].dtype  # the tables in the weights' dtype, as a bf16 file stores them
    params.update({k: v.astype(dtype) for k, v in tables(cfg).items()})
    tensors = export_tensors(RULES + tuple(_table_rules(cfg)), params, cfg.depth, progress=progress)

    def to_torch(a: np.ndarray):
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    dit = {k: to_torch(v) for k, v in tensors.items() if not k.startswith(AUDIO)}
    audio = {k[len(AUDIO):]: to_torch(v) for k, v in tensors.items() if k.startswith(AUDIO)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        # the released loader reads "model" / "ema" / "audioproj"; a model trained with another objective than the
        # released ε says so under META, so that converting the file back restores it
        meta = {META: {"prediction": cfg.prediction}} if cfg.prediction != "epsilon" else {}
        torch.save({"model": dit, "ema": {k: v.clone() for k, v in dit.items()}, "audioproj": audio, **meta}, tmp)
    return out

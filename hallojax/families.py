"""Model families the trainer trains and `hallojax compile` sizes: `config.model.kind` -> a `Family` adapter.

    hallojax train --config configs/hallo3.py:stage2,size=tiny --workdir runs/hallo3
    hallojax train --config configs/letstalk.py:tiny --workdir runs/letstalk

kind (default "wan-dit": every Wan config and checkpoint without the key trains as before) selects, through
`FAMILIES`, the config and model classes (`hallojax.registry`), the batch the model needs at given latent
sizes (`batch_shapes`), the model's output on x_t at time t with the batch's conditions (`predict`; condition
dropout applied as zeros), what the step draws besides σ/t and ε (`randomness`), its prediction type (checked
against train.objective) and its analytic FLOPs. The Wan adapter is the trainer's own code (hallojax.train).

- hallo3: latents [B, F, H, W, 16] (F = 13 at 49 frames), image_latent [B, 1, H, W, 16] (the VAE latent of
  [reference, motion₁, motion₂], x 0.7; zero-padded to F frames as the 16 concat channels), reference
  [B, 1, H, W, 16] (face-masked, the reference net's input), face [B, 512], audio windows
  [B, 4F − 3, 2w + 1, 12, 768], context [B, 226, 4096] (T5). The concat latent is dropped (zeros) per sample
  with probability train.p_concat (released 0.05); the loss covers every frame, motion frames included.
- letstalk: latents [B, F, H, W, 4], reference [B, 1, H, W, 4], audio windows [B, F, 2w + 1, 12, 768] and,
  with a memory bank (M > 0), memory [B, M, H, W, 4] (the M latent frames before the clip), noised at DDPM
  t ~ U{0..49} and 25 %-masked in the step (`regularize_memory`, as released). No text.
- hunyuan-avatar: latents and ref_latents [B, F, H, W, 16] (the reference image repeated over the clip, encoded),
  text [B, L, 4096] (LLaVA) + pooled [B, 768] (CLIP), whisper windows [B, 4F − 3, 10, 5, 384], face_mask
  [B, F·H/2·W/2] (`face_mask_tokens`); flow velocity; text (with its pooled vector) and audio dropped as zeros
  per sample (train.dropout). The random source's face mask is Gaussian noise (a multiplier; shapes only).

Prepared sets (data.prepared=DIR): `make_source` reads them for every family through `PreparedBatches`' order
(`LetsTalkClips`, `Hallo3Clips`, `AvatarClips`: a record -> the family's inputs); `data.prepared_sizes` gives
Hallo3's and the Avatar's model sizes from the manifest and refuses sets prepared without what they need
(`data_pipeline.extras`: prepare --extras hallo3 / hunyuan-avatar, --face-embeddings, --text-states).
"""

from __future__ import annotations

import dataclasses
import logging
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hallojax import registry
from hallojax.data import PreparedBatches

log = logging.getLogger("hallojax.families")

# --- the table -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    kind: str
    # (prediction, learned_variance) of a config: checked against train.objective
    prediction: Callable[[Any], tuple[str, bool]]
    # {key: shape} of a batch on latents [batch, frames, height, width, C] (latent grid sizes)
    batch_shapes: Callable[..., dict[str, tuple[int, ...]]]
    # (model, cfg, batch with its drawn randomness, x_t, time [B]) -> the model's output
    predict: Callable[..., jax.Array]
    # (cfg, train config, batch, key) -> extra per-batch draws merged into the batch
    randomness: Callable[..., dict]
    # forward FLOPs of one step's model call (hallojax.flops conventions: matmuls, 2·m·k·n)
    forward_flops: Callable[..., float]
    # tokens of one sample's latents [frames, height, width]
    tokens: Callable[..., int]


def kind_of(model: Any) -> str:
    """config.model's kind (a config dict or a model config dataclass)."""
    if hasattr(model, "get"):
        return model.get("kind", "wan-dit")
    return registry.kind_of(model)


def family(model: Any) -> Family:
    kind = kind_of(model)
    if kind not in FAMILIES:
        raise ValueError(f"model.kind={kind!r}: the trainer trains {sorted(FAMILIES)}")
    return FAMILIES[kind]


def model_config(model) -> Any:
    """The model config dataclass of config.model (its `kind` key selects the class; default the Wan DiT)."""
    fam = family(model)
    config_cls, _ = registry.resolve(fam.kind)
    return config_cls.from_dict({k: v for k, v in dict(model).items() if k != "kind"})


def model_class(cfg) -> type:
    return registry.resolve(registry.kind_of(cfg))[1]


def example_batch(cfg, batch: int, frames: int, height: int, width: int, *, text_len: int = 512,
                  seed: int | None = 0) -> dict:
    """A batch of this family's model: random numpy arrays, or `jax.ShapeDtypeStruct`s with seed=None."""
    fam = family(cfg)
    if fam.kind == "wan-dit":
        from hallojax.data import example_batch as wan_batch

        return wan_batch(cfg, batch, frames, height, width, text_len=text_len, seed=seed)
    shapes = fam.batch_shapes(cfg, batch, frames, height, width, text_len)
    if seed is None:
        return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def make_source(config, cfg, rows):
    """data.source = "random" for every family; every family also takes prepared clips (the Wan DiT synthetic too)."""
    from hallojax import data

    if family(cfg).kind == "wan-dit":
        return data.make_source(config, cfg, rows)
    clips = {"letstalk": LetsTalkClips, "hallo3": Hallo3Clips, "hunyuan-avatar": AvatarClips}.get(family(cfg).kind)
    if clips is not None and config.data.prepared:
        source = clips(config.data, config.train.batch_size, config.seed, cfg, rows)
        source.text_len = config.train.text_len
        return source
    if config.data.prepared or config.data.source != "random":
        raise ValueError(f"data.source={config.data.source!r}: model.kind={family(cfg).kind!r} trains on "
                         "data.source='random' (a fixed batch) or a prepared set (data.prepared=DIR)")
    t = config.train
    batch = example_batch(cfg, t.batch_size, t.frames, t.height, t.width, text_len=t.text_len, seed=config.seed)
    # learnable latents: the smooth patterns of the Wan source (hallojax.data.synthetic_batch)
    channels = batch["latents"].shape[-1]
    batch["latents"], _ = data.synthetic_batch(types.SimpleNamespace(in_channels=channels, text_dim=1), t,
                                               config.seed)
    return data.FixedBatches(cfg, t, config.seed, rows, batch=batch)


# --- Wan: how the DiT is called on a batch ------------------------------------------------------------
def masked_input(cfg) -> bool:
    """The model takes [noisy (C), latent mask (4), masked latent (C)] (Wan I2V / InP, EchoMimicV3)."""
    return cfg.in_channels == 2 * cfg.out_channels + 4


def model_kwargs(cfg, b: dict) -> dict:
    """The model's conditioning inputs from a (micro)batch, condition dropout applied (zeros)."""
    from hallojax.conditioning import apply_keep

    kw = {}
    if cfg.identity_tokens or cfg.symbiotic or cfg.identity_additive or cfg.reference_net:
        kw["reference"] = apply_keep(_need(b, "reference"), b["keep_ref"])
    if cfg.audio != "none":
        kw["audio"] = apply_keep(_need(b, "audio"), b["keep_audio"])
    if cfg.audio_face_mask:
        kw["face_mask"] = _need(b, "face_mask")
    if cfg.motion_frames:
        kw["motion"] = b["motion"]
    if cfg.image_dim is not None:
        kw["image_context"] = apply_keep(_need(b, "image_context"), b["keep_ref"])
    return kw


def _need(b: dict, key: str):
    if key not in b:
        raise ValueError(f"the model's config needs batch[{key!r}]; the batch has {sorted(b)}")
    return b[key]


def _wan_predict(model, cfg, b: dict, x_t: jax.Array, time: jax.Array) -> jax.Array:
    """The model's output on x_t at `time` [B] with the batch's conditions (and, for masked-input models,
    the known frames' mask channels and clean latents)."""
    from hallojax.conditioning import apply_keep, inpainting_input

    x_in = x_t
    if masked_input(cfg):
        k = b["known"][:, :, None, None, None]
        x0 = b["latents"].astype(jnp.float32)
        x_in = inpainting_input(x_t, jnp.broadcast_to(k, (*x0.shape[:4], 4)), x0 * k)
    return model(x_in, time, apply_keep(b["context"], b["keep_text"]), **model_kwargs(cfg, b))


def _wan_flops(cfg, **shape) -> float:
    from hallojax.flops import forward_flops

    return forward_flops(cfg, **shape)["total"]


WAN = Family("wan-dit", prediction=lambda cfg: (cfg.prediction, cfg.learned_variance), batch_shapes=None,
             predict=_wan_predict, randomness=lambda cfg, t, batch, key: {}, forward_flops=_wan_flops,
             tokens=lambda cfg, f, h, w: f * h * w // cfg.patch_volume)


# --- Hallo3 ----------------------------------------------------------------------------------------
def _hallo3_shapes(cfg, b: int, f: int, h: int, w: int, text_len: int) -> dict:
    c = cfg.out_channels
    return {"latents": (b, f, h, w, c), "image_latent": (b, 1, h, w, c), "reference": (b, 1, h, w, c),
            "face": (b, cfg.face_in), "audio": (b, 4 * f - 3, 2 * cfg.audio_window + 1, cfg.audio_layers,
                                                 cfg.audio_in_dim),
            "context": (b, cfg.text_len, cfg.text_dim)}


def _hallo3_randomness(cfg, t, batch, key) -> dict:
    b = batch["latents"].shape[0]
    return {"keep_concat": jax.random.uniform(jax.random.fold_in(key, 3), (b,)) >= t.get("p_concat", 0.0)}


def _hallo3_predict(model, cfg, b, x_t, time):
    from hallojax.conditioning import apply_keep

    image = apply_keep(b["image_latent"], b["keep_concat"]).astype(x_t.dtype)
    pad = jnp.zeros((*x_t.shape[:1], x_t.shape[1] - 1, *x_t.shape[2:]), x_t.dtype)
    x_in = jnp.concatenate([x_t, jnp.concatenate([image, pad], axis=1)], axis=-1)
    return model(x_in, time, apply_keep(b["context"], b["keep_text"]), face=b["face"],
                 audio=apply_keep(b["audio"], b["keep_audio"]), reference=apply_keep(b["reference"], b["keep_ref"]))


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def hallo3_flops(cfg, *, batch: int, frames: int, height: int, width: int, text_len: int | None = None,
                 **_) -> float:
    """Matmul FLOPs of one Hallo3 forward pass (denoiser + the reference net on one frame + projectors)."""
    b, d, n_layers = batch, cfg.dim, cfg.num_layers
    per = (height // 2) * (width // 2)
    video, text = frames * per, cfg.text_len
    ffn = cfg.backbone().ffn_dim
    t_emb = _mm(b, d, cfg.time_embed_dim) + _mm(b, cfg.time_embed_dim, cfg.time_embed_dim)

    def backbone(n_video, keys_extra):
        n = n_video + text
        layer = (_mm(b * n, d, 3 * d) + 2 * _mm(b * keys_extra, d, d)  # q, k, v (+ the bank's k, v)
                 + 2 * _mm(b * n, d, n + keys_extra)  # QKᵀ, PV
                 + _mm(b * n, d, d) + 2 * _mm(b * n, d, ffn)  # out, FFN
                 + _mm(b, cfg.time_embed_dim, 12 * d))  # the expert adaLN's 12 chunks
        return (n_layers * layer + _mm(b * n_video, 4 * cfg.in_channels, d) + _mm(b * text, cfg.text_dim, d)
                + t_emb + _mm(b * n_video, d, 4 * cfg.out_channels))

    def cross(tokens, kv_dim, keys):  # q, dense; k, v of the tokens; QKᵀ, PV of every frame's queries
        return 2 * _mm(b * video, d, d) + _mm(b * tokens, kv_dim, 2 * d) + 2 * _mm(b * video, d, keys)

    t = 4 * frames - 3
    win = (2 * cfg.audio_window + 1) * cfg.audio_layers * cfg.audio_in_dim
    k = cfg.audio_tokens * cfg.audio_dim
    audio_proj = _mm(b * t, win, cfg.audio_hidden) + _mm(b * t, cfg.audio_hidden, cfg.audio_hidden) + _mm(
        b * t, cfg.audio_hidden, k) + _mm(b * (t - 1) // 2, 2 * k, k) + _mm(b * (t - 1) // 4, 2 * k, k)
    total = backbone(video, per) + backbone(per, 0)  # denoiser (+ the bank's keys); reference net on 1 frame
    total += n_layers * (cross(cfg.face_tokens, cfg.face_dim, cfg.face_tokens)
                         + cross(frames * cfg.audio_tokens, cfg.audio_dim, cfg.audio_tokens))
    return total + _mm(b, cfg.face_in, cfg.face_tokens * cfg.face_dim) + audio_proj


HALLO3 = Family("hallo3", prediction=lambda cfg: ("v", False), batch_shapes=_hallo3_shapes,
                predict=_hallo3_predict, randomness=_hallo3_randomness, forward_flops=hallo3_flops,
                tokens=lambda cfg, f, h, w: f * (h // 2) * (w // 2))


# --- prepared sets for Hallo3 and HunyuanVideo-Avatar --------------------------------------------------
def _fit_text(states, length: int, dim: int):
    """[L, D] states -> [length, D] (cropped or zero-padded); None -> zeros."""
    out = np.zeros((length, dim), np.float32)
    if states is not None:
        n = min(length, states.shape[0])
        out[:n] = states[:n]
    return out


class _FamilyClips(PreparedBatches):
    """A family's batches from a prepared set: `PreparedBatches`' order and state, `family_inputs` per record."""

    text_len = None  # the trainer's text length (train.text_len), set by `make_source`

    def __init__(self, data, *args, **kwargs):
        super().__init__(data, *args, **kwargs)
        from data_pipeline.reader import load_manifest

        shapes = load_manifest(data.prepared)["record_shapes"]
        if "text_states" not in shapes:
            log.info("%s: the records hold no text states (prepare --text-states FILE.npz): the text input is "
                     "zeros", data.prepared)
        self.note_once(shapes)

    def note_once(self, shapes) -> None:
        pass

    def inputs(self, raw: bytes) -> dict:
        from data_pipeline.schema import decode_record

        return self.family_inputs(decode_record(raw), self.cfg, self.text_len)


def hallo3_inputs(record: dict, cfg, text_len: int | None = None) -> dict:  # text: model.text_len (positions)
    """A prepared record (`--extras hallo3`, face embeddings, per-frame features [T, N, D]) -> Hallo3's inputs:
    each frame's window of ±audio_window feature frames, clamped at the clip's ends (the released training reads
    real neighbours past the clip: a record holds only its clip's audio), text states cropped / zero-padded to
    model.text_len (zeros without), the concat latent, the face-masked reference latent, the face embedding."""
    from hallojax.nn.audio import window_features

    lat, feats = record["latents"], record["audio_features"]
    if feats.shape[0] != 4 * lat.shape[0] - 3:
        raise ValueError(f"a record of {lat.shape[0]} latent frames and {feats.shape[0]} audio frames: Hallo3 takes "
                         "4F - 3 video frames per F latent frames (a codec of temporal stride 4)")
    return {"latents": lat, "image_latent": record["concat_latent"], "reference": record["masked_ref_latent"],
            "face": record["face_embedding"],
            "audio": window_features(np.asarray(feats)[None], cfg.audio_window)[0],
            "context": _fit_text(record.get("text_states"), cfg.text_len, cfg.text_dim)}


class Hallo3Clips(_FamilyClips):
    family_inputs = staticmethod(hallo3_inputs)

    def note_once(self, shapes) -> None:
        log.info("Hallo3 audio windows: ±%d frames of the clip's own features, clamped at its ends",
                 self.cfg.audio_window)


# --- LetsTalk --------------------------------------------------------------------------------------
def _letstalk_shapes(cfg, b: int, f: int, h: int, w: int, text_len: int) -> dict:
    c = cfg.in_channels
    out = {"latents": (b, f, h, w, c), "reference": (b, 1, h, w, c),
           "audio": (b, f, 2 * cfg.audio_window + 1, cfg.audio_in_layers, cfg.audio_in_dim)}
    if cfg.memory_frames:
        out["memory"] = (b, cfg.memory_frames, h, w, c)
    return out


def letstalk_inputs(record: dict, cfg) -> dict:
    """A prepared record (latents [M + F, h, w, C] of a per-frame codec, per-frame audio features [M + F, N, D])
    -> LetsTalk's inputs: the last F frames as the clip, the M before them as the memory bank, the reference
    latent, and each clip frame's audio window (±audio_window frames, clamped at the record's ends, as
    `models.letstalk.audio_windows` does over a whole track)."""
    from hallojax.models.letstalk import audio_windows

    lat, m = record["latents"], cfg.memory_frames
    if lat.shape[0] <= m:
        raise ValueError(f"a prepared clip of {lat.shape[0]} frames cannot hold the memory bank's {m} frames and a "
                         f"clip (prepare data.frames = model.num_frames + memory_frames = {cfg.num_frames + m})")
    if "audio_features" not in record:
        raise ValueError("LetsTalk needs per-frame audio features: prepare the set with --audio-features")
    f = lat.shape[0] - m
    out = {"latents": lat[m:], "reference": record["ref_latent"],
           "audio": np.asarray(audio_windows(record["audio_features"][None], m, f, cfg.audio_window))[0]}
    if m:
        out["memory"] = lat[:m]
    return out


class LetsTalkClips(PreparedBatches):
    """LetsTalk batches from a prepared set: `PreparedBatches`' order and state, `letstalk_inputs` per record."""

    def inputs(self, raw: bytes) -> dict:
        from data_pipeline.schema import decode_record

        return letstalk_inputs(decode_record(raw), self.cfg)


def _letstalk_randomness(cfg, t, batch, key) -> dict:
    from hallojax.models.letstalk import regularize_memory

    if not cfg.memory_frames:
        return {}
    return {"memory": regularize_memory(jax.random.fold_in(key, 4), batch["memory"].astype(jnp.float32))}


def _letstalk_predict(model, cfg, b, x_t, time):
    from hallojax.conditioning import apply_keep

    memory = {"memory": b["memory"]} if cfg.memory_frames else {}
    return model(x_t, time, apply_keep(b["reference"], b["keep_ref"]), apply_keep(b["audio"], b["keep_audio"]),
                 **memory)


def _letstalk_flops(cfg, *, batch: int, frames: int, height: int, width: int, **_) -> float:
    from hallojax.letstalk_cost import letstalk_flops

    return letstalk_flops(cfg, batch=batch, frames=frames, height=height, width=width)["total"]


LETSTALK = Family("letstalk", prediction=lambda cfg: (cfg.prediction, cfg.learn_sigma),
                  batch_shapes=_letstalk_shapes, predict=_letstalk_predict, randomness=_letstalk_randomness,
                  forward_flops=_letstalk_flops,
                  tokens=lambda cfg, f, h, w: f * (h // cfg.patch_size) * (w // cfg.patch_size))


# --- HunyuanVideo-Avatar ---------------------------------------------------------------------------
def _avatar_shapes(cfg, b: int, f: int, h: int, w: int, text_len: int) -> dict:
    lat = (b, f, h, w, cfg.in_channels)
    _, ph, pw = cfg.patch_size
    return {"latents": lat, "ref_latents": lat, "text": (b, text_len, cfg.text_dim), "pooled": (b, cfg.pooled_dim),
            "audio": (b, 4 * f - 3, cfg.audio_window, cfg.audio_layers, cfg.audio_channels),
            "face_mask": (b, f * (h // ph) * (w // pw))}


def _avatar_predict(model, cfg, b, x_t, time):
    from hallojax.conditioning import apply_keep

    return model(x_t, time, apply_keep(b["text"], b["keep_text"]), apply_keep(b["pooled"], b["keep_text"]),
                 b["ref_latents"], apply_keep(b["audio"], b["keep_audio"]), face_mask=b["face_mask"],
                 text_mask=b.get("text_mask"))


def _avatar_flops(cfg, *, batch: int, frames: int, height: int, width: int, text_len: int = 832, **_) -> float:
    from hallojax.models.hunyuan_avatar import avatar_flops

    return avatar_flops(cfg, batch, frames, height, width, text_len)


def avatar_inputs(record: dict, cfg, text_len: int) -> dict:
    """A prepared record (`--extras hunyuan-avatar`, whisper windows [T, 10·layers, D]) -> the Avatar's inputs:
    latents, ref latents (the reference repeated over the clip, encoded), windows [T, 10, layers, D], the face
    box (x3 about its centre, as released) as face-mask tokens, text states cropped / zero-padded to
    train.text_len with their mask (the record's, else its tokens; 0 on the padding) and the pooled vector
    (zeros without text states: no mask, as the random source)."""
    from hallojax.models.avatar_audio import face_box_mask, face_mask_tokens

    lat, feats = record["latents"], record["audio_features"]
    f, h, w = lat.shape[:3]
    x0, y0, x1, y1 = (float(v) for v in record["face_box"])
    mask = face_box_mask(*record["ref_frame"].shape[:2], (x0, y0, x1 - x0, y1 - y0))
    pooled, states = record.get("text_pooled"), record.get("text_states")
    out = {"latents": lat, "ref_latents": record["ref_video_latent"],
           "audio": feats.reshape(feats.shape[0], cfg.audio_window, -1, feats.shape[-1]),
           "face_mask": face_mask_tokens(mask, (h, w), f, cfg.patch_size[1])[0],
           "text": _fit_text(states, text_len, cfg.text_dim),
           "pooled": np.zeros(cfg.pooled_dim, np.float32) if pooled is None else pooled}
    if states is not None:  # right padding, as the release's LLaVA states: the padded rows attend nowhere
        valid = record.get("text_mask", np.ones(states.shape[0], np.float32))
        out["text_mask"] = _fit_text(valid[:, None], text_len, 1)[:, 0]
    return out


class AvatarClips(_FamilyClips):
    family_inputs = staticmethod(avatar_inputs)


HUNYUAN_AVATAR = Family("hunyuan-avatar", prediction=lambda cfg: ("flow", False), batch_shapes=_avatar_shapes,
                        predict=_avatar_predict, randomness=lambda cfg, t, batch, key: {},
                        forward_flops=_avatar_flops, tokens=lambda cfg, f, h, w: f * (h // cfg.patch_size[1])
                        * (w // cfg.patch_size[2]))

FAMILIES = {f.kind: f for f in (WAN, HALLO3, LETSTALK, HUNYUAN_AVATAR)}


def train_flops(cfg, **shape) -> float:
    """Model FLOPs of one training step (forward + backward = 3 forwards, the usual MFU convention)."""
    return 3.0 * family(cfg).forward_flops(cfg, **shape)

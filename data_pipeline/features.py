"""Stage 2: clips -> schema records (codec latents, reference latent, audio and optional audio features).

Audio features plug in as a callable `(waveform [B, S] float32 at 16 kHz, fps, num_frames) ->
[B, num_frames, layers, D]` (with an optional `validate(clip_config)` attribute, called before any video is
read), built from a spec string by a registered factory, like codecs:

    register_audio_features("wav2vec2", lambda path: Wav2Vec2Features(path))   # "wav2vec2:PATH"

The built-in "rms" feature (per-frame log RMS energy, [B, T, 1, 1]) is a cheap stand-in that needs no
weights; on the synthetic set it follows the mouth opening.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from data_pipeline.clips import ClipConfig, VideoClips
from data_pipeline.schema import SAMPLE_RATE
from hallojax.codec import Codec, latent_frames

AudioFeatureFn = Callable[[np.ndarray, float, int], np.ndarray]


def rms_features(waveform: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """[B, T, 1, 1] log RMS energy of each frame's span of the waveform."""
    b, s = waveform.shape
    edges = np.round(np.arange(num_frames + 1) * s / num_frames).astype(int)
    sq = np.concatenate([np.zeros((b, 1)), np.cumsum(waveform.astype(np.float64) ** 2, axis=1)], axis=1)
    energy = (sq[:, edges[1:]] - sq[:, edges[:-1]]) / np.maximum(np.diff(edges), 1)
    return np.log(energy + 1e-8).astype(np.float32)[:, :, None, None] / 2


def _wav2vec2(arg: str | None) -> AudioFeatureFn:
    from hallojax.models.encoders.wav2vec2 import Wav2Vec2Features  # imported on use

    return Wav2Vec2Features.load(arg)


def _wav2vec2_tokens(arg: str | None) -> AudioFeatureFn:
    from hallojax.models.encoders.wav2vec2 import Wav2Vec2Tokens  # imported on use

    return Wav2Vec2Tokens.load(arg)


def _whisper(arg: str | None) -> AudioFeatureFn:
    """"whisper:DIR" (a `hallojax convert whisper` directory): HunyuanVideo-Avatar's windows per video frame,
    [B, T, 10 · layers, D] (10 whisper frames x every hidden state, window-major; `models.avatar_audio`)."""
    from hallojax.checkpoint import load_pretrained
    from hallojax.models.avatar_audio import FRONT_PAD, MAX_FRAMES, audio_windows, window_indices
    from hallojax.models.encoders.whisper import WhisperEncoder, encode_audio

    if not arg:
        raise ValueError("audio features 'whisper' need a path: 'whisper:DIR' (from `hallojax convert whisper`)")
    model, _ = load_pretrained(arg)
    if not isinstance(model, WhisperEncoder):
        raise ValueError(f"{arg} holds a {type(model).__name__}, not a whisper encoder")

    def fn(waveform: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
        # log-mels rounded to float16 as the release's dataset stores them (as `hallojax generate` does)
        w = np.asarray(audio_windows(encode_audio(model, waveform, mel_dtype="float16"), num_frames, fps))
        return w.reshape(*w.shape[:2], -1, w.shape[-1])

    def validate(clip) -> None:  # before any video is read: the clip length and rate the windows can take
        where, p = f"audio features whisper:{arg}: clips of {clip.num_frames} frames at {clip.fps:g} fps", \
            model.cfg.max_source_positions
        try:
            need = int(window_indices(clip.num_frames, clip.fps)[-1, -1]) - FRONT_PAD + 1
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if clip.num_frames > MAX_FRAMES or need > p:
            raise ValueError(f"{where} read whisper frames up to {need}; the encoder gives {p} ({p / 50:g} s) and "
                             f"the release's windows at most {MAX_FRAMES} frames")

    fn.validate = validate
    return fn


# name -> factory(arg or None) -> AudioFeatureFn; "wav2vec2:DIR" is a `hallojax convert wav2vec2` directory
# (every layer, resampled to the frame rate: Hallo3, EchoMimicV3 Flash); "wav2vec2-tokens:DIR" its last layer at
# 50 Hz, 2 tokens per 25-fps frame (EchoMimicV3 preview); "whisper:DIR" HunyuanVideo-Avatar's whisper windows
AUDIO_FEATURES: dict[str, Callable[[str | None], AudioFeatureFn]] = {"rms": lambda arg: rms_features,
                                                                     "wav2vec2": _wav2vec2,
                                                                     "wav2vec2-tokens": _wav2vec2_tokens,
                                                                     "whisper": _whisper}


def register_audio_features(name: str, factory: Callable[[str | None], AudioFeatureFn]) -> None:
    """Make `get_audio_features("NAME[:ARG]")` call `factory(ARG)`."""
    if ":" in name or not name:
        raise ValueError(f"audio feature name must be non-empty and contain no ':', got {name!r}")
    AUDIO_FEATURES[name] = factory


def get_audio_features(spec: str | None) -> AudioFeatureFn | None:
    if spec is None:
        return None
    name, _, arg = spec.partition(":")
    if name not in AUDIO_FEATURES:
        raise ValueError(f"unknown audio features {name!r} in {spec!r}; registered: {sorted(AUDIO_FEATURES)}")
    return AUDIO_FEATURES[name](arg or None)


def to_model_range(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], the codec's input range."""
    return frames_uint8.astype(np.float32) / 127.5 - 1.0


def _run_audio_features(fn: AudioFeatureFn, spec: str, audio: np.ndarray, fps: float, t: int) -> np.ndarray:
    out = np.asarray(fn(audio, fps, t))
    if out.ndim != 4 or out.shape[:2] != (audio.shape[0], t):
        raise ValueError(f"audio features {spec!r} returned shape {out.shape}, expected [B={audio.shape[0]}, "
                         f"T={t}, layers, D]")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"audio features {spec!r} returned non-finite values")
    return out.astype(np.float32)


def encode_clips(clips: VideoClips, cfg: ClipConfig, codec: Codec, audio_features: AudioFeatureFn | None = None,
                 audio_features_spec: str | None = None, batch_size: int = 8, extras: tuple[str, ...] = (),
                 video_fields: dict | None = None) -> list[dict]:
    """Records (schema fields) for every clip of one video, in clip order; `extras`: the codec extras of
    `data_pipeline.extras` to add, `video_fields`: per-video fields (face embedding, text states) for every clip."""
    from data_pipeline.extras import codec_extras

    t = cfg.num_frames
    latent_frames(codec, t)  # refuses clip lengths the codec cannot encode
    n = len(clips.starts)
    records: list[dict] = [{} for _ in range(n)]
    for b0 in range(0, n, batch_size):
        idx = range(b0, min(b0 + batch_size, n))
        video = to_model_range(np.stack([clips.clip_frames(i, t) for i in idx]))  # [B, T, H, W, 3]
        latents = np.asarray(codec.encode(video), np.float32)
        refs = to_model_range(clips.frames[[clips.ref_indices[i] for i in idx]])[:, None]  # [B, 1, H, W, 3]
        ref_latents = np.asarray(codec.encode(refs), np.float32)
        more = codec_extras(extras, codec, clips, idx, video, refs, cfg.seed)
        audio = clips.audio[list(idx)]
        feats = (_run_audio_features(audio_features, audio_features_spec or "audio_features", audio, cfg.fps, t)
                 if audio_features is not None else None)
        for j, i in enumerate(idx):
            r = records[i]
            r["latents"] = latents[j]
            r["ref_latent"] = ref_latents[j]
            r["audio"] = audio[j]
            if feats is not None:
                r["audio_features"] = feats[j]
            r.update({k: v[j] for k, v in more.items()})
    for i, r in enumerate(records):
        r.update(
            ref_frame=clips.frames[clips.ref_indices[i]],
            face_mask=clips.face_mask,
            face_box=clips.face_box,
            source=clips.source,
            clip_index=np.int32(i),
            start_frame=np.int32(clips.starts[i]),
            num_frames=np.int32(t),
            ref_index=np.int32(clips.ref_indices[i]),
            fps=np.float32(cfg.fps),
            sample_rate=np.int32(SAMPLE_RATE),
            **(video_fields or {}),
        )
    return records

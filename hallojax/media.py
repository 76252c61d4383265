"""Reading portraits and speech, writing talking videos: the media edges of generation.

- `read_image`: png / jpg / webp / bmp / gif (first frame) of any size, mode and EXIF orientation
  -> uint8 RGB [H, W, 3] (Pillow).
- `read_audio`: wav / flac / mp3 / m4a / ogg / the audio track of a video, any rate and channel count
  -> float32 [S, C] at its own rate (PyAV, the decoder the data pipeline uses); `speech_16k` mixes to mono
  and resamples to 16 kHz with soxr, exactly as `data_pipeline.clips` does for training audio.
- `write_mp4`: h264 (yuv420p) + AAC through PyAV, written under a temporary name and renamed, so a file
  under the final name is always complete.

Every failure names the file and says what is wrong with it (a `MediaError`, a ValueError).
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import numpy as np

SPEECH_RATE = 16000  # what the audio encoders take (data_pipeline.schema.SAMPLE_RATE)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".mp4", ".mov", ".mkv", ".webm")
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


class MediaError(ValueError):
    """An input file that cannot be used; the message names the file."""


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{what} {path}: no such file")
    if not path.is_file():
        raise MediaError(f"{what} {path}: not a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{what} {path}: empty file (0 bytes)")
    return path


def read_image(path) -> np.ndarray:
    """uint8 RGB [H, W, 3], EXIF orientation applied, alpha composited on white, grey expanded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = _existing(path, "image")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"image {path}: cannot be read as an image ({type(e).__name__}: {e}); supported: "
                         f"{', '.join(IMAGE_EXTENSIONS)}") from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 8:
        raise MediaError(f"image {path}: {rgb.shape[1]}x{rgb.shape[0]} pixels is too small (at least 8x8)")
    return np.ascontiguousarray(rgb)


def read_audio(path) -> tuple[np.ndarray, int]:
    """(float32 [S, C], sample rate) of the first audio stream, at its own rate and channel count."""
    import av

    path = _existing(path, "audio")
    chunks, rate = [], None
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise MediaError(f"audio {path}: no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")
            for frame in container.decode(stream):
                if rate is None:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:
                    raise MediaError(f"audio {path}: the sample rate changes mid-stream "
                                     f"({rate} -> {frame.sample_rate})")
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())  # [C, n] float32 planar
            for f in resampler.resample(None) if rate is not None else ():
                chunks.append(f.to_ndarray())
    except av.error.FFmpegError as e:
        raise MediaError(f"audio {path}: cannot be decoded ({e}); supported: {', '.join(AUDIO_EXTENSIONS)}") from None
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise MediaError(f"audio {path}: no decodable samples (empty audio)")
    channels = {c.shape[0] for c in chunks}
    if len(channels) != 1:
        raise MediaError(f"audio {path}: the channel count changes mid-stream ({sorted(channels)})")
    wave = np.concatenate(chunks, axis=1).T.astype(np.float32)  # [S, C]
    if not np.all(np.isfinite(wave)):
        raise MediaError(f"audio {path}: non-finite samples")
    return np.ascontiguousarray(wave), int(rate)


def speech_16k(wave: np.ndarray, rate: int) -> np.ndarray:
    """float32 [S'] mono at 16 kHz: the channel mean, resampled with soxr (as the data pipeline does)."""
    import soxr

    mono = wave.mean(axis=1, dtype=np.float32) if wave.ndim == 2 else np.asarray(wave, np.float32)
    if rate != SPEECH_RATE:
        mono = soxr.resample(mono, rate, SPEECH_RATE)
    return np.asarray(mono, np.float32)


def normalize_loudness(wave: np.ndarray, rate: int, lufs: float) -> np.ndarray:
    """`wave` [S] scaled to an integrated loudness of `lufs` (ITU-R BS.1770-4, pyloudnorm), as EchoMimicV3 Flash
    prepares speech for its audio features; left as it is where the meter reads |loudness| > 100 (silence)."""
    import warnings

    import pyloudnorm

    loudness = pyloudnorm.Meter(rate).integrated_loudness(np.asarray(wave, np.float64))
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return np.asarray(wave, np.float32)
    with warnings.catch_warnings():  # "possible clipped samples": the released pipeline keeps them too
        warnings.simplefilter("ignore")
        return np.asarray(pyloudnorm.normalize.loudness(np.asarray(wave, np.float64), loudness, lufs), np.float32)


def _fps_fraction(fps) -> fractions.Fraction:
    return fractions.Fraction(fps).limit_denominator(1001)


def write_mp4(path, frames: np.ndarray, audio: np.ndarray | None, fps, audio_rate: int, crf: int = 18,
              threads: int = 1) -> Path:
    """frames uint8 [T, H, W, 3] (even H and W) + audio float32 [S] or [S, C] (C <= 2) at `audio_rate` ->
    h264 (yuv420p) + AAC mp4, atomically. Audio at a rate AAC does not take is resampled to 48 kHz."""
    import av

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 {path}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_mp4 {path}: h264/yuv420p needs even sizes, got {frames.shape[2]}x{frames.shape[1]}")
    if audio is not None:
        audio = np.asarray(audio, np.float32)
        audio = audio[:, None] if audio.ndim == 1 else audio
        if audio.shape[1] > 2:
            audio = audio.mean(axis=1, keepdims=True)
        if audio_rate not in AAC_RATES:
            import soxr

            audio = np.asarray(soxr.resample(audio, audio_rate, 48000), np.float32).reshape(-1, audio.shape[1])
            audio_rate = 48000
    rate = _fps_fraction(fps)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            vs = out.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "medium"})
            vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            vs.codec_context.thread_count = threads
            ast = None
            if audio is not None:
                layout = "mono" if audio.shape[1] == 1 else "stereo"
                ast = out.add_stream("aac", rate=audio_rate, layout=layout)
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                vf.pts = i
                vf.time_base = 1 / rate
                out.mux(vs.encode(vf))
            out.mux(vs.encode())
            if ast is not None:
                step = ast.codec_context.frame_size or 1024
                planar = np.ascontiguousarray(audio.T)  # [C, S]
                for i in range(0, planar.shape[1], step):
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, i:i + step]), format="fltp",
                                                    layout=layout)
                    af.sample_rate, af.pts = audio_rate, i
                    out.mux(ast.encode(af))
                out.mux(ast.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

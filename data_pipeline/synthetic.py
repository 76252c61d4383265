"""Synthetic talking faces: the embedded default data for the demo and the tests.

Each video is a procedurally drawn portrait (numpy only: background gradient, hair, an elliptic face,
eyes that blink, lips and a mouth) speaking a synthetic speech-like signal: voiced harmonics on a
drifting pitch, shaped by two moving formants, under syllable envelopes grouped into words with pauses.
The mouth opening of every frame is the mean syllable envelope over that frame, and the head sways
slightly and nods with the speech, so lip sync is learnable and measurable. Identity is the face shape
and position, skin, hair and background colours, eye spacing and mouth width, all drawn from the seed.

Written as real mp4 files (h264 + AAC, through PyAV) so they go through exactly the decode path of real
data, with two sidecars per video:

    talk_00000.mp4          the video (default 64x64, 25 fps, 2-4 s, AAC mono at 24 kHz)
    talk_00000.face.json    {"box": [x0, y0, x1, y1]}: the face region over the whole video (pixels)
    talk_00000.mouth.json   {"fps", "num_frames", "mouth_open": [per-frame opening in 0..1], "identity"}

`measure_mouth_opening` reads the opening back from pixels and `lipsync_correlation` compares it with
the ground truth, so generated videos of these identities can be scored for lip sync.

    python -m data_pipeline.synthetic OUT_DIR --num-videos 8 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path

import numpy as np

from hallojax.fsutil import write_json
from hallojax.media import write_mp4

SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 90], [160, 110, 75],
                 [120, 80, 55]], np.float64)
HAIR = np.array([[20, 16, 14], [70, 45, 25], [120, 80, 40], [210, 180, 110], [160, 60, 30], [150, 150, 150]],
                np.float64)
MOUTH_INSIDE = np.array([45, 12, 20], np.float64)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    height: int = 64
    width: int = 64
    fps: int = 25
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    audio_rate: int = 24000  # not 16 kHz, so the pipeline's resampler is exercised
    supersample: int = 2  # drawn at 2x and box-filtered: smooth edges without a rasteriser
    crf: int = 18

    def validate(self):
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise ValueError(f"synthetic size must be even and >= 16, got {self.width}x{self.height}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 0 < min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.fps < 1 or self.audio_rate < 8000:
            raise ValueError(f"fps must be >= 1 and audio_rate >= 8000, got {self.fps}, {self.audio_rate}")


def speech_signal(rng: np.random.Generator, seconds: float, rate: int):
    """(waveform float32 [n], envelope float64 [n] in 0..1): syllables grouped into words, with pauses."""
    n = round(seconds * rate)
    env = np.zeros(n)
    t = rng.uniform(0.1, 0.3)  # speech starts after a short silence
    while t < seconds - 0.15:
        for _ in range(rng.integers(1, 5)):  # one word
            dur, amp = rng.uniform(0.12, 0.28), rng.uniform(0.45, 1.0)
            i0, i1 = int(t * rate), min(int((t + dur) * rate), n)
            if i1 - i0 < 2:
                break
            shape = np.sin(np.pi * np.linspace(0, 1, i1 - i0)) ** 1.5
            env[i0:i1] = np.maximum(env[i0:i1], amp * shape)
            t += dur + rng.uniform(0.0, 0.04)
        t += rng.uniform(0.06, 0.18)
        if rng.random() < 0.3:
            t += rng.uniform(0.3, 0.7)  # a pause
    time = np.arange(n) / rate
    base = rng.uniform(95, 230)
    f0 = base * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 0.9) * time + rng.uniform(0, 6.3))
                 + 0.02 * np.sin(2 * np.pi * 5.5 * time))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    f1 = 300 + 500 * env  # first formant rises as the mouth opens
    f2 = 1300 + 500 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * time + rng.uniform(0, 6.3))
    voiced = np.zeros(n)
    for k in range(1, int(min(4000, 0.45 * rate) / (base * 1.1))):  # harmonics up to 4 kHz carry speech
        fk = k * f0
        gain = (np.exp(-0.5 * ((fk - f1) / 150) ** 2) + 0.6 * np.exp(-0.5 * ((fk - f2) / 250) ** 2) + 0.05) / k**0.5
        voiced += gain * np.sin(k * phase)
    onsets = np.clip(np.diff(env, prepend=0) * rate / 20, 0, 1)  # a little breath noise as syllables start
    wave = env * voiced + 0.3 * onsets * rng.normal(size=n)
    wave *= 0.6 / max(np.abs(wave).max(), 1e-6)
    return wave.astype(np.float32), env


def mouth_track(env: np.ndarray, rate: int, fps: int, num_frames: int) -> np.ndarray:
    """Mouth opening of each frame: the mean envelope over the frame's time span."""
    edges = np.round(np.arange(num_frames + 1) * rate / fps).astype(int)
    return np.array([env[a:b].mean() if b > a else 0.0 for a, b in itertools.pairwise(edges)])


def sample_identity(rng: np.random.Generator) -> dict:
    """Everything that makes one synthetic person look like themselves (fractions of the frame size)."""
    def jitter(c, s=18):
        return np.clip(c + rng.normal(0, s, 3), 0, 255).round().tolist()

    return {
        "bg_top": rng.uniform(0, 255, 3).round().tolist(),
        "bg_bottom": rng.uniform(0, 255, 3).round().tolist(),
        "skin": jitter(SKIN[rng.integers(len(SKIN))], 10),
        "hair": jitter(HAIR[rng.integers(len(HAIR))]),
        "hair_volume": float(rng.uniform(1.05, 1.3)),
        "hair_length": float(rng.uniform(0.0, 0.9)),  # how far long hair falls beside the face
        "center": [float(rng.uniform(0.42, 0.58)), float(rng.uniform(0.47, 0.56))],
        "axes": [float(rng.uniform(0.17, 0.23)), float(rng.uniform(0.24, 0.3))],
        "eye_spacing": float(rng.uniform(0.32, 0.45)),
        "eye_size": float(rng.uniform(0.09, 0.14)),
        "iris": jitter(np.array([60, 90, 120]) * rng.uniform(0.3, 1.2), 30),
        "mouth_width": float(rng.uniform(0.35, 0.5)),
        "sway": float(rng.uniform(0.005, 0.02)),
        "sway_hz": float(rng.uniform(0.15, 0.5)),
    }


def head_motion(rng, identity: dict, mouth: np.ndarray, fps: int) -> np.ndarray:
    """[T, 2] head offset (x, y) in frame fractions: a slow sway plus a slight nod with the speech."""
    t = np.arange(len(mouth)) / fps
    ph = rng.uniform(0, 2 * np.pi, 2)
    a, hz = identity["sway"], identity["sway_hz"]
    dx = a * np.sin(2 * np.pi * hz * t + ph[0])
    dy = 0.5 * a * np.sin(2 * np.pi * hz * 0.7 * t + ph[1]) + 0.01 * mouth
    return np.stack([dx, dy], axis=1)


def render_frames(identity: dict, mouth: np.ndarray, motion: np.ndarray, blinks: np.ndarray,
                  height: int, width: int, supersample: int = 2) -> np.ndarray:
    """uint8 [T, H, W, 3]: the portrait with mouth opening `mouth[t]`, head offset `motion[t]`."""
    ss, size = supersample, min(height, width)
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    yy, xx = ys[:, None], xs[None, :]
    g = (ys / height)[:, None, None]
    background = (1 - g) * np.array(identity["bg_top"]) + g * np.array(identity["bg_bottom"])
    background = np.broadcast_to(background, (height * ss, width * ss, 3))
    skin, hair = np.array(identity["skin"]), np.array(identity["hair"])
    lips = skin * np.array([0.8, 0.5, 0.55])
    a, b = identity["axes"][0] * size, identity["axes"][1] * size

    def ellipse(cx, cy, rx, ry):
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

    out = np.empty((len(mouth), height, width, 3), np.uint8)
    for i, (m, (dx, dy), blink) in enumerate(zip(mouth, motion, blinks)):
        cx = (identity["center"][0] + dx) * width
        cy = (identity["center"][1] + dy) * height
        img = background.copy()
        v = identity["hair_volume"]
        img[ellipse(cx, cy - 0.12 * b, a * v, b * v)] = hair
        if identity["hair_length"] > 0.05:  # long hair falls behind the shoulders
            fall = (np.abs(xx - cx) <= a * v) & (yy >= cy - 0.12 * b) & (yy <= cy + b * (0.2 + identity["hair_length"]))
            img[fall] = hair
        img[ellipse(cx, cy + 0.95 * b, 0.45 * a, 0.45 * b)] = skin * 0.85  # neck
        img[ellipse(cx, cy, a, b)] = skin
        ex, ey = identity["eye_spacing"] * a * 1.1, cy - 0.18 * b
        er = identity["eye_size"] * a * 2
        eh = er * (0.12 if blink else 0.6)
        for side in (-1, 1):
            img[ellipse(cx + side * ex, ey, er, eh)] = (245, 245, 240)
            if not blink:
                img[ellipse(cx + side * ex, ey, er * 0.5, min(eh, er * 0.5))] = identity["iris"]
        img[ellipse(cx, cy + 0.15 * b, 0.08 * a, 0.12 * b)] = skin * 0.88  # nose
        mw = identity["mouth_width"] * a * (1 + 0.15 * m)
        mh = 0.02 * b + 0.22 * b * m
        my = cy + 0.5 * b
        img[ellipse(cx, my, mw * 1.12, mh + 0.06 * b)] = lips
        img[ellipse(cx, my, mw, mh)] = MOUTH_INSIDE
        img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
        out[i] = np.clip(img.round(), 0, 255).astype(np.uint8)
    return out


def face_box(identity: dict, motion: np.ndarray, height: int, width: int) -> list[float]:
    """The face ellipse's bounding box over all frames, in pixels."""
    size = min(height, width)
    a, b = identity["axes"][0] * size, identity["axes"][1] * size
    cx = (identity["center"][0] + motion[:, 0]) * width
    cy = (identity["center"][1] + motion[:, 1]) * height
    return [round(float(v), 2) for v in ((cx - a).min(), (cy - b).min(), (cx + a).max(), (cy + b).max())]


def measure_mouth_opening(frames: np.ndarray, box) -> np.ndarray:
    """Per-frame mouth opening read from pixels: how much darker than skin the central lower face is.

    `frames` uint8 [T, H, W, 3], `box` the face box (x0, y0, x1, y1) in the same pixels. Works on decoded,
    cropped or generated frames of these portraits; compare with the truth via `lipsync_correlation`.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0

    def lum(r0, r1, c0, c1):  # luminance of a box-relative window, [T, rows, cols]
        rows = slice(max(round(y0 + r0 * h), 0), round(y0 + r1 * h))
        cols = slice(max(round(x0 + c0 * w), 0), round(x0 + c1 * w))
        return frames[:, rows, cols].astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    mouth, lower_face = lum(0.6, 0.9, 0.32, 0.68), lum(0.45, 0.9, 0.25, 0.75)
    if mouth.size == 0:
        raise ValueError(f"face box {list(box)} leaves no mouth region in frames of shape {frames.shape}")
    # skin brightness from the wider lower face, where skin dominates even with the mouth wide open
    skin = np.percentile(lower_face.reshape(len(frames), -1), 75, axis=1)[:, None, None]
    # darkness below the skin, summed: grows with the dark mouth area, anti-aliased edges included
    return np.clip((skin - mouth) / np.maximum(skin, 1.0), 0, 1).mean(axis=(1, 2))


def lipsync_correlation(measured, truth) -> float:
    """Pearson correlation of two per-frame mouth-opening tracks (1 = perfect sync)."""
    x, y = np.asarray(measured, np.float64), np.asarray(truth, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"need two 1-D tracks of the same length >= 3, got {x.shape} and {y.shape}")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def make_video(out_dir: str | os.PathLike, index: int, seed: int, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write video `index` of the set drawn with `seed` (independent of how many others there are)."""
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, index])
    identity = sample_identity(rng)
    seconds = rng.uniform(cfg.min_seconds, cfg.max_seconds)
    num_frames = max(1, round(seconds * cfg.fps))
    seconds = num_frames / cfg.fps
    wave, env = speech_signal(rng, seconds, cfg.audio_rate)
    mouth = mouth_track(env, cfg.audio_rate, cfg.fps, num_frames)
    motion = head_motion(rng, identity, mouth, cfg.fps)
    blinks = np.zeros(num_frames, bool)
    for start in rng.choice(num_frames, size=max(1, num_frames // 60), replace=False):
        blinks[start:start + 3] = True
    frames = render_frames(identity, mouth, motion, blinks, cfg.height, cfg.width, cfg.supersample)

    stem = out_dir / f"talk_{index:05d}"
    # sidecars first, video last: a finished mp4 always has its sidecars
    write_json(stem.with_suffix(".face.json"), {"box": face_box(identity, motion, cfg.height, cfg.width)},
               sort_keys=True)
    write_json(stem.with_suffix(".mouth.json"), {
        "fps": cfg.fps, "num_frames": num_frames, "seed": seed, "index": index,
        "mouth_open": [round(float(v), 4) for v in mouth], "blinks": np.flatnonzero(blinks).tolist(),
        "identity": identity}, sort_keys=True)
    path = stem.with_suffix(".mp4")
    write_mp4(path, frames, wave, cfg.fps, cfg.audio_rate, cfg.crf)
    return path


def generate(out_dir, num_videos: int, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig(),
             progress: bool = False) -> list[Path]:
    """Write videos 0..num_videos-1; ones already there (from an earlier, maybe interrupted run) are kept."""
    cfg.validate()
    if num_videos < 0 or seed < 0:
        raise ValueError(f"num_videos and seed must be >= 0, got {num_videos}, {seed}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # a bad OUT_DIR fails before the progress bar
    from tqdm import tqdm

    paths = []
    for i in tqdm(range(num_videos), desc="synthetic", unit="video", disable=not progress):
        path = Path(out_dir) / f"talk_{i:05d}.mp4"
        paths.append(path if path.exists() else make_video(out_dir, i, seed, cfg))
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SyntheticConfig()
    p.add_argument("out_dir", help="directory for talk_NNNNN.mp4 and their sidecars")
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--fps", type=int, default=d.fps)
    p.add_argument("--min-seconds", type=float, default=d.min_seconds)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds)
    p.add_argument("--audio-rate", type=int, default=d.audio_rate)


def run(args) -> list[Path]:
    cfg = SyntheticConfig(height=args.height, width=args.width, fps=args.fps, min_seconds=args.min_seconds,
                          max_seconds=args.max_seconds, audio_rate=args.audio_rate)
    paths = generate(args.out_dir, args.num_videos, args.seed, cfg, progress=True)
    print(f"wrote {len(paths)} synthetic talking-face videos to {args.out_dir}")
    return paths


def main(argv=None) -> int:
    from hallojax.usage import ArgumentParser, print_error

    p = ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        run(p.parse_args(argv))
    except (ValueError, OSError) as e:
        print_error("synthetic", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

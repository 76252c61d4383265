"""Stage 1: one input video -> training clips.

Decodes the video and audio streams with PyAV in one demux pass, puts the video on a fixed-rate timeline
by timestamps (nearest frame; so constant, variable and mismatched frame rates all come out at `fps`),
applies the container's rotation, crops (centre, or around the face box of a sidecar JSON) and resizes
every kept frame at once to the output size, so memory holds only output-sized frames. The audio track is
mixed to mono, resampled to 16 kHz with soxr and cut to each clip on the same timeline.

Anything a file can do wrong ends in `SkipVideo(reason)`; the caller records the reason and moves on.

Face-box sidecar: `<video stem>.face.json` beside the video, `{"box": [x0, y0, x1, y1]}` in pixels of the
displayed (rotated) frame, one box for the whole video. A box of which less than half lies inside the
frame skips the video ("face box ... lies outside the frame"): such a sidecar belongs to another video
or another resolution, and its clips would carry a face mask of zeros (no audio signal for the face-mask
presets). The sidecar is the problem to fix, so the video is not quietly given a centre crop instead.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import stat
from pathlib import Path

import av
import numpy as np
import soxr

from data_pipeline.schema import SAMPLE_RATE

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm")
MIN_BOX_INSIDE = 0.5  # at least this fraction of the sidecar's face box must lie inside the frame


class SkipVideo(Exception):
    """This input cannot give training clips; `reason` says why (it goes into the report)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    fps: float = 25.0
    num_frames: int = 17  # 1 + 4k, so the same shards suit a causal VAE of temporal stride 4
    stride: int | None = None  # frames between clip starts; None: num_frames (no overlap)
    height: int = 64
    width: int = 64
    crop: str = "auto"  # "auto": around the sidecar face box when there is one, else centre; "center"
    box_scale: float = 1.6  # the crop spans the face box enlarged by this factor (hair, chin, shoulders)
    min_side: int = 32  # a crop region narrower than this many source pixels is "tiny resolution"
    audio_slack_s: float = 0.04  # up to this much missing audio per clip is zero-padded (codec padding)
    max_seconds: float | None = None  # read at most this much of each video
    seed: int = 0

    @property
    def clip_stride(self) -> int:
        return self.stride or self.num_frames

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"clip config: {msg}")

        if not (self.fps > 0 and math.isfinite(self.fps)):
            bad(f"fps must be positive, got {self.fps}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            bad(f"num_frames must be 1 + 4k (e.g. 17, 25, 49, 81), got {self.num_frames}")
        if self.stride is not None and self.stride < 1:
            bad(f"stride must be >= 1, got {self.stride}")
        if self.height < 8 or self.width < 8:
            bad(f"output size must be at least 8x8, got {self.width}x{self.height}")
        if self.crop not in ("auto", "center"):
            bad(f"crop must be 'auto' or 'center', got {self.crop!r}")
        if not self.box_scale >= 1.0:
            bad(f"box_scale must be >= 1, got {self.box_scale}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            bad(f"max_seconds must be positive, got {self.max_seconds}")
        if self.min_side < 1:
            bad(f"min_side must be >= 1, got {self.min_side}")
        if self.seed < 0:
            bad(f"seed must be >= 0, got {self.seed}")

    @property
    def samples_per_clip(self) -> int:
        return round(self.num_frames * SAMPLE_RATE / self.fps)


@dataclasses.dataclass
class VideoClips:
    """Everything stage 2 needs from one video."""

    source: str
    frames: np.ndarray  # uint8 [N, H, W, 3]: the whole video on the output timeline
    starts: list[int]  # first frame of each clip
    audio: np.ndarray  # float32 [num_clips, S]
    ref_indices: list[int]  # reference frame of each clip
    face_box: np.ndarray  # float32 [4] in output pixels
    face_mask: np.ndarray  # uint8 [H, W]
    warnings: list[str]

    def clip_frames(self, i: int, num_frames: int) -> np.ndarray:
        return self.frames[self.starts[i]:self.starts[i] + num_frames]


def face_sidecar(video: Path) -> Path:
    return video.with_name(video.stem + ".face.json")


def read_face_box(video: Path) -> list[float] | None:
    """The face box from the sidecar, None without one; an unreadable sidecar skips the video."""
    path = face_sidecar(video)
    if not path.exists():
        return None
    try:
        box = json.loads(path.read_text(encoding="utf-8"))["box"]
        box = [float(v) for v in box]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise SkipVideo(f"unreadable face sidecar {path.name}: {type(e).__name__}: {e}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        raise SkipVideo(f"unreadable face sidecar {path.name}: 'box' must be [x0, y0, x1, y1] "
                        f"with x1 > x0 and y1 > y0, got {box}")
    return box


def check_box_in_frame(box, w: int, h: int) -> None:
    """SkipVideo unless at least MIN_BOX_INSIDE of the face box's area lies inside the w x h frame."""
    inside = max(0.0, min(box[2], w) - max(box[0], 0)) * max(0.0, min(box[3], h) - max(box[1], 0))
    fraction = inside / ((box[2] - box[0]) * (box[3] - box[1]))
    shown = [round(v, 2) if v % 1 else int(v) for v in box]
    if fraction == 0:
        raise SkipVideo(f"face box {shown} lies outside the {w}x{h} frame (sidecar for another video or size?)")
    if fraction < MIN_BOX_INSIDE:
        raise SkipVideo(f"only {fraction:.0%} of face box {shown} lies inside the {w}x{h} frame (at least "
                        f"{MIN_BOX_INSIDE:.0%} must)")


def crop_region(src_w: int, src_h: int, out_w: int, out_h: int, box=None, box_scale: float = 1.6):
    """Integer crop (x0, y0, w, h) of the source with the output's aspect ratio: the largest centred one,
    or the smallest that holds the enlarged face box, moved (and if need be shrunk) to lie in the frame."""
    aspect = out_w / out_h
    fit_w = min(src_w, src_h * aspect)  # the largest region of this aspect inside the frame
    if box is None:
        w, cx, cy = fit_w, src_w / 2, src_h / 2
    else:
        bw, bh = (box[2] - box[0]) * box_scale, (box[3] - box[1]) * box_scale
        w = min(max(bw, bh * aspect), fit_w)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    h = w / aspect
    w, h = max(1, round(w)), max(1, round(h))
    x0 = min(max(round(cx - w / 2), 0), src_w - w)
    y0 = min(max(round(cy - h / 2), 0), src_h - h)
    return x0, y0, w, h


def crop_resize(img: np.ndarray, region, width: int, height: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> the `crop_region` (x0, y0, w, h) resized to width x height (area averaging
    when shrinking, bicubic when enlarging): the one resize of training clips and of generation portraits."""
    x0, y0, cw, ch = region
    crop = np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw])
    if (cw, ch) == (width, height):
        return crop
    interpolation = "AREA" if cw >= width else "BICUBIC"
    out = av.VideoFrame.from_ndarray(crop, format="rgb24").reformat(
        width=width, height=height, format="rgb24", interpolation=interpolation)
    return out.to_ndarray()


def _stable_hash(text: str) -> int:
    # the name's own bytes: a file name that is not UTF-8 arrives surrogate-escaped (os.fsdecode)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "little")


def reference_index(seed: int, source: str, clip_index: int, start: int, num_frames: int, total: int) -> int:
    """A frame of the same video outside the clip when the video has one (inside otherwise), drawn from
    a generator keyed by (seed, source, clip): independent of order, process and timing."""
    rng = np.random.default_rng([seed, _stable_hash(source), clip_index])
    outside = total - num_frames
    if outside <= 0:
        return start + int(rng.integers(num_frames))
    r = int(rng.integers(outside))
    return r + num_frames if r >= start else r


class _FrameSampler:
    """Turns decoded frames (any rate, variable too) into frames at `fps` on a timeline starting at the
    first frame: output frame k shows the source frame whose timestamp is nearest to k/fps."""

    def __init__(self, cfg: ClipConfig, box, source_name: str):
        self.cfg, self.box, self.name = cfg, box, source_name
        self.t0 = None
        self.prev = None  # (av frame, time)
        self.prev_out = None  # its processed array, computed at most once
        self.frames: list[np.ndarray] = []
        self.deltas: list[float] = []
        self.geometry = None
        self.warnings: list[str] = []
        self.dropped = 0
        self.done = False

    def _target_time(self, k: int) -> float:
        return self.t0 + k / self.cfg.fps

    def _emit(self):
        if self.prev_out is None:
            self.prev_out = self._process(self.prev[0])
        self.frames.append(self.prev_out)
        if self.cfg.max_seconds is not None and len(self.frames) >= self.cfg.max_seconds * self.cfg.fps:
            self.done = True

    def push(self, frame, t):
        if self.done:
            return
        if t is None:  # no timestamp: assume the nominal rate after the previous frame
            t = (self.prev[1] + (np.median(self.deltas) if self.deltas else 1 / self.cfg.fps)) if self.prev else 0.0
        if self.t0 is None:
            self.t0 = t
        if self.prev is not None:
            if t <= self.prev[1]:  # out-of-order or repeated timestamp: cannot place it on the timeline
                self.dropped += 1
                return
            mid = (self.prev[1] + t) / 2
            while not self.done and self._target_time(len(self.frames)) <= mid + 1e-9:
                self._emit()
            self.deltas.append(t - self.prev[1])
        self.prev, self.prev_out = (frame, t), None

    def finish(self, last_duration: float | None):
        if self.prev is None:
            return
        if not last_duration or last_duration <= 0:
            last_duration = float(np.median(self.deltas)) if self.deltas else 1 / self.cfg.fps
        end = self.prev[1] + last_duration
        while not self.done and self._target_time(len(self.frames)) < end - 1e-6:
            self._emit()
        if self.dropped:
            self.warnings.append(f"{self.dropped} frames with non-increasing timestamps dropped")

    def _process(self, frame) -> np.ndarray:
        cfg = self.cfg
        rotation = int(getattr(frame, "rotation", 0) or 0)
        quarter = round(rotation / 90) % 4
        if rotation % 90:
            msg = f"rotation {rotation} degrees rounded to {quarter * 90}"
            if msg not in self.warnings:
                self.warnings.append(msg)
        w, h = (frame.height, frame.width) if quarter % 2 else (frame.width, frame.height)
        key = (frame.width, frame.height, quarter)
        if self.geometry is None:
            if self.box is not None:
                check_box_in_frame(self.box, w, h)
            x0, y0, cw, ch = crop_region(w, h, cfg.width, cfg.height, self.box, cfg.box_scale)
            if min(cw, ch) < cfg.min_side:
                raise SkipVideo(f"tiny resolution: {w}x{h} source, {cw}x{ch} crop region is below "
                                f"min_side={cfg.min_side}")
            self.geometry = (key, (x0, y0, cw, ch), (w, h))
        elif self.geometry[0] != key:
            raise SkipVideo(f"frame size or rotation changes mid-stream: {self.geometry[0]} -> {key}")
        # rgb24 conversion handles every pixel format: gray becomes 3 equal channels, alpha is dropped
        img = frame.to_ndarray(format="rgb24")
        if quarter:
            img = np.rot90(img, k=quarter)  # rotation is counter-clockwise degrees, as np.rot90 turns
        return crop_resize(img, self.geometry[1], cfg.width, cfg.height)


class _AudioCollector:
    def __init__(self):
        self.resampler = av.AudioResampler(format="fltp")
        self.chunks: list[np.ndarray] = []
        self.t0 = None
        self.rate = None
        self.samples = 0

    def push(self, frame):
        if self.rate is None:
            self.rate = frame.sample_rate
            self.t0 = frame.time if frame.time is not None else 0.0
        elif frame.sample_rate != self.rate:
            raise SkipVideo(f"audio sample rate changes mid-stream: {self.rate} -> {frame.sample_rate} Hz")
        for f in self.resampler.resample(frame):
            self._add(f)

    def _add(self, f):
        x = f.to_ndarray()  # [channels, samples], float32 planar
        self.chunks.append(x.mean(axis=0, dtype=np.float32))
        self.samples += x.shape[1]

    def finish(self) -> np.ndarray:
        if self.rate is not None:
            for f in self.resampler.resample(None):
                self._add(f)
        if not self.samples:
            raise SkipVideo("audio stream has no decodable samples")
        mono = np.concatenate(self.chunks)
        if self.rate != SAMPLE_RATE:
            mono = soxr.resample(mono, self.rate, SAMPLE_RATE)
        return np.asarray(mono, dtype=np.float32)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_file(path: Path) -> None:
    """SkipVideo unless `path` is (or links to) a readable, non-empty regular file; never opens anything else
    (a FIFO would block)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise SkipVideo(f"broken symbolic link: its target {os.readlink(path)} does not exist") from None
        raise SkipVideo("the file disappeared after it was listed") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SkipVideo("symbolic link loop (too many levels of symbolic links)") from None
        raise SkipVideo(f"cannot read the file: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "an unknown kind")
        raise SkipVideo(f"not a regular file ({kind})")
    if st.st_size == 0:
        raise SkipVideo("empty file (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise SkipVideo(f"cannot read the file: {e.strerror}") from None


def _decode(path: Path, cfg: ClipConfig, box):
    """(sampler with the output frames, audio collector, 16 kHz mono audio)."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise SkipVideo(f"unreadable container: {e}") from None
    with container:
        if not container.streams.video:
            raise SkipVideo("no video stream")
        if not container.streams.audio:
            raise SkipVideo("no audio stream")
        vs, as_ = container.streams.video[0], container.streams.audio[0]
        sampler, audio = _FrameSampler(cfg, box, path.name), _AudioCollector()
        last_duration = None
        try:
            for packet in container.demux(vs, as_):
                if packet.stream is vs:
                    for frame in packet.decode():
                        sampler.push(frame, frame.time)
                        if frame.duration and frame.time_base is not None:
                            last_duration = float(frame.duration * frame.time_base)
                else:
                    for frame in packet.decode():
                        audio.push(frame)
                if sampler.done and audio.t0 is not None and audio.samples > (cfg.max_seconds + 1) * audio.rate:
                    break  # read enough of both streams for max_seconds (plus slack for their offset)
        except av.error.FFmpegError as e:
            raise SkipVideo(f"decode error: {e}") from None
        sampler.finish(last_duration)
        if not sampler.frames:
            raise SkipVideo("video stream has no decodable frames")
        return sampler, audio, audio.finish()


def extract_clips(path: str | Path, source: str, cfg: ClipConfig) -> VideoClips:
    """Stage 1 for one video; raises SkipVideo with the reason when it gives no clip."""
    path = Path(path)
    check_file(path)
    box = read_face_box(path) if cfg.crop == "auto" else None
    sampler, audio, wave = _decode(path, cfg, box)
    frames = np.stack(sampler.frames)  # [N, H, W, 3]
    n, t, warnings = len(frames), cfg.num_frames, list(sampler.warnings)
    if n < t:
        raise SkipVideo(f"too short: {n} frames at {cfg.fps:g} fps ({n / cfg.fps:.2f} s), a clip needs {t}")

    # audio sample of output frame 0 (the two streams may start at different times)
    offset = (sampler.t0 - audio.t0) * SAMPLE_RATE
    spc, slack = cfg.samples_per_clip, int(cfg.audio_slack_s * SAMPLE_RATE)
    starts, cuts = [], []
    candidates = range(0, n - t + 1, cfg.clip_stride)
    for s in candidates:
        i0 = round(offset + s * SAMPLE_RATE / cfg.fps)
        missing = max(0, -i0) + max(0, i0 + spc - len(wave))
        if missing > slack:
            continue
        cut = np.zeros(spc, np.float32)
        lo, hi = max(i0, 0), min(i0 + spc, len(wave))
        if hi > lo:
            cut[lo - i0:hi - i0] = wave[lo:hi]
        starts.append(s)
        cuts.append(cut)
    audio_s, video_s = (len(wave) - offset) / SAMPLE_RATE, n / cfg.fps
    if not starts:
        raise SkipVideo(f"audio shorter than video: audio covers {max(audio_s, 0):.2f} s of the "
                        f"{video_s:.2f} s video, not one {t}-frame clip")
    if len(starts) < len(candidates):
        warnings.append(f"audio shorter than video ({audio_s:.2f} s of {video_s:.2f} s): "
                        f"{len(candidates) - len(starts)} of {len(candidates)} clips dropped")

    h, w = cfg.height, cfg.width
    if box is None:
        face_box = np.array([0, 0, w, h], np.float32)
    else:
        x0, y0, cw, ch = sampler.geometry[1]
        sx, sy = w / cw, h / ch
        face_box = np.array([(box[0] - x0) * sx, (box[1] - y0) * sy, (box[2] - x0) * sx, (box[3] - y0) * sy])
        face_box = np.clip(face_box, 0, [w, h, w, h]).astype(np.float32)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5  # pixel centres
    face_mask = (((ys >= face_box[1]) & (ys < face_box[3]))[:, None]
                 & ((xs >= face_box[0]) & (xs < face_box[2]))[None, :]).astype(np.uint8)

    refs = [reference_index(cfg.seed, source, i, s, t, n) for i, s in enumerate(starts)]
    return VideoClips(source=source, frames=frames, starts=starts, audio=np.stack(cuts), ref_indices=refs,
                      face_box=face_box, face_mask=face_mask, warnings=warnings)

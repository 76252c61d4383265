"""Long videos: speech of any length cut into clips of the model's frame count, joined without seams.

Three strategies (`plan(strategy, ...)` returns the clip plan; `hallojax.pipeline` runs it):

- `motion` (Hallo3, LetsTalk; models with `motion_frames`): every clip starts with m known frames, the
  motion frames: for clip 0 the portrait repeated (Hallo3 uses the reference twice), for clip k the last m
  frames of clip k − 1. The model was trained exactly so (its motion input = the clip's own first frames,
  excluded from the loss), so each clip yields T − m new frames; the known frames are never re-emitted.
  Clip k covers video frames [k·S − m, k·S − m + T) with S = T − m; the m frames before 0 have silent audio.
- `continue` (masked-input models: EchoMimicV3 / Wan-InP 2C + 4 channels): clip 0 is image-to-video (frame 0
  known = the portrait); clip k ≥ 1 starts m frames before the end of clip k − 1 with those m frames known
  (mask channels + masked latent), and emits the frames after them.
- `chunks` (masked-input models; EchoMimicV3 preview's default): like `continue`, with the m known frames
  given in video frames (`overlap_frames`, 8 in the release, not a whole number of latent frames: the mask
  channels mark them frame by frame), and every frame of a clip emitted: its first m frames cross-fade
  over the previous clip's last m in pixels, old·(1 − r) + new·r with r = linspace(0, 1, m).
- `overlap` (any model; EchoMimicV3's "long video" mode, MultiDiffusion-style): one denoising loop over the
  whole latent sequence; at every step each window of F latent frames is denoised (windows overlap by O
  latent frames, the last one aligned to the end) and the velocities are blended with linear ramps over
  the overlaps before the solver step, so windows agree at every noise level and multistep solvers keep
  one consistent state.

Known frames reach the next clip through pixels (decode, take the last m frames, encode), so a causal
VAE sees them as the first frames of a clip exactly as in training (m = 1 + s·(n − 1) video frames for n
latent frames at temporal stride s); with the lossless pixel codec this is the latent overlap itself.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

STRATEGIES = ("motion", "overlap", "continue", "chunks")


@dataclasses.dataclass(frozen=True)
class Clip:
    start: int  # first video frame the clip covers (may be < 0: motion prefix before the video)
    known: int  # leading video frames that are known (motion frames / continuation / the i2v frame)
    emit: tuple[int, int]  # video frames [a, b) of the output this clip provides


@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str
    frames: int  # output video frames N
    clip_frames: int  # video frames per clip T (overlap: per window)
    latent_frames: int  # latent frames per clip F
    stride: int  # the codec's temporal stride s
    clips: tuple[Clip, ...]
    overlap: int  # video frames shared by consecutive clips (overlap: latent frames shared by windows)
    total_latent: int = 0  # overlap: latent frames of the whole sequence

    def describe(self) -> str:
        unit = "latent frames" if self.strategy == "overlap" else "frames"
        head = (f"clip plan ({self.strategy}): {self.frames} frames in {len(self.clips)} "
                f"{'window' if self.strategy == 'overlap' else 'clip'}{'s' if len(self.clips) != 1 else ''} of "
                f"{self.clip_frames} frames ({self.latent_frames} latent), overlap {self.overlap} {unit}")
        if self.strategy == "overlap":
            head += f"; {self.total_latent} latent frames denoised together"
        rows = [f"  {i}: frames {c.start}..{c.start + self.clip_frames - 1}" + (f", {c.known} known" if c.known else "")
                + f" -> output {c.emit[0]}..{c.emit[1] - 1}" for i, c in enumerate(self.clips)]
        return "\n".join([head] + rows)


def latent_count(frames: int, stride: int) -> int:
    return 1 + (frames - 1) // stride


def known_video_frames(latent: int, stride: int) -> int:
    """Video frames held by the first `latent` latent frames of a causal codec (1 + s·(n − 1))."""
    return 1 + stride * (latent - 1) if latent > 0 else 0


def plan(strategy: str, frames: int, clip_frames: int, stride: int, *, known_latent: int = 1,
         overlap_latent: int = 1, overlap_frames: int = 8, motion_video_frames: int | None = None) -> Plan:
    """The clips for `frames` output frames with clips of `clip_frames` (= 1 + stride·(F − 1)) frames.

    known_latent: latent frames carried from one clip to the next (motion: the model's motion_frames;
    continue: the continuation overlap); overlap_latent: the window overlap of `overlap`;
    motion_video_frames: motion only, the video frames carried when the model counts them in pixels (Hallo3:
    2, encoded into its conditioning channels; LetsTalk: 0, its memory bank lies before the clip)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--long-video {strategy!r}: expected one of {STRATEGIES}")
    if frames < 1:
        raise ValueError(f"{frames} output frames: need at least 1")
    if clip_frames < 1 or (clip_frames - 1) % stride:
        raise ValueError(f"clip of {clip_frames} frames: must be 1 + {stride}·k for temporal stride {stride}")
    f = latent_count(clip_frames, stride)
    if strategy == "overlap":
        return _overlap(frames, clip_frames, f, stride, overlap_latent)
    if strategy == "chunks":
        m = overlap_frames
        if not 0 < m < clip_frames:
            raise ValueError(f"chunks: {m} overlap frames must be in 1..{clip_frames - 1}")
        clips = [Clip(start=0, known=1, emit=(0, min(clip_frames, frames)))]
        while clips[-1].emit[1] < frames:
            a = clips[-1].start + clip_frames - m
            clips.append(Clip(start=a, known=m, emit=(a, min(a + clip_frames, frames))))
        return Plan(strategy, frames, clip_frames, f, stride, tuple(clips), m)
    if strategy == "motion" and motion_video_frames is not None:
        m = motion_video_frames
        if not 0 <= m < clip_frames:
            raise ValueError(f"motion: {m} motion frames per clip must be in 0..{clip_frames - 1}")
    elif not 0 < known_latent < f:
        raise ValueError(f"{strategy}: {known_latent} known latent frames per clip must be in 1..{f - 1} "
                         f"(clips have {f} latent frames)")
    else:
        m = known_video_frames(known_latent, stride)
    step = clip_frames - m
    clips = []
    if strategy == "motion":
        for k in range(math.ceil(frames / step)):
            a = k * step
            clips.append(Clip(start=a - m, known=m, emit=(a, min(a + step, frames))))
    else:  # continue
        clips.append(Clip(start=0, known=1, emit=(0, min(clip_frames, frames))))
        k = 1
        while clips[-1].emit[1] < frames:
            a = k * step
            clips.append(Clip(start=a, known=m, emit=(a + m, min(a + clip_frames, frames))))
            k += 1
    return Plan(strategy, frames, clip_frames, f, stride, tuple(clips), m)


def _overlap(frames, clip_frames, f, stride, overlap):
    total = max(latent_count(frames + (-(frames - 1)) % stride, stride), f)  # the sequence, padded to a window
    if not 0 <= overlap < f:
        raise ValueError(f"overlap: {overlap} shared latent frames must be in 0..{f - 1}")
    starts = list(range(0, total - f + 1, f - overlap)) if total > f else [0]
    if starts[-1] + f < total:
        starts.append(total - f)  # the last window ends with the sequence
    clips = []
    for a in starts:
        v0 = stride * a  # window frame 0 shows video frame s·a; frames j >= 1 match global latent a + j exactly
        clips.append(Clip(start=v0, known=0, emit=(min(v0, frames), min(v0 + clip_frames, frames))))
    return Plan("overlap", frames, clip_frames, f, stride, tuple(clips), overlap, total)


def window_weights(plan: Plan) -> np.ndarray:
    """[windows, F] blend weights of the `overlap` strategy: linear ramps over each overlap with its
    neighbours, normalised so that every latent frame's weights sum to 1."""
    f = plan.latent_frames
    starts = [c.start // plan.stride for c in plan.clips]
    w = np.ones((len(starts), f))
    for k in range(len(starts) - 1):
        shared = starts[k] + f - starts[k + 1]  # frames window k and k + 1 share
        if shared > 0:
            ramp = (np.arange(1, shared + 1)) / (shared + 1)
            w[k + 1, :shared] = np.minimum(w[k + 1, :shared], ramp)
            w[k, f - shared:] = np.minimum(w[k, f - shared:], ramp[::-1])
    total = np.zeros(plan.total_latent)
    for a, row in zip(starts, w):
        total[a:a + f] += row
    for i, a in enumerate(starts):
        w[i] /= total[a:a + f]
    return w.astype(np.float32)


# --- time-aware position shift (HunyuanVideo-Avatar's long videos; any model) ---
@dataclasses.dataclass(frozen=True)
class ShiftPlan:
    """HunyuanVideo-Avatar's long-video scheme (research/hyavatar_letstalk.md B.7), usable by any model: ONE
    latent buffer of `total_latent` frames is denoised together; on step i it is covered by windows of
    `window` latent frames starting at s_k = window·k − shift_i (k = 0, 1, ... while window·k < total), each
    taking latent frames (s_k + j) mod total (circular: the last window wraps onto the start) and audio
    (video) frames (stride·s_k + m) mod audio_frames, m < stride·(window − 1) + 1. Every window runs one solver
    step on its frames on its own; the results are scattered back, summed and divided by the per-frame count
    (frames two windows share — only at the wrap — are averaged; as both start from the same x, that is
    the solver step with the averaged velocity). shift_i = (shift · i) mod window, so window boundaries move
    by `shift` latent frames every step and no seam stays put. A buffer of exactly one window: no shift.
    The released values: window 33, shift 10, stride 4 (129 video frames per window)."""

    total_latent: int
    audio_frames: int  # per-video-frame audio entries the sampler holds (the padded audio)
    window: int = 33
    shift: int = 10
    stride: int = 4

    def __post_init__(self):
        if self.window < 1 or self.total_latent < self.window:
            raise ValueError(f"shift plan: {self.total_latent} latent frames cannot hold a window of {self.window}")
        if self.audio_frames < self.stride * (self.window - 1) + 1:
            raise ValueError(f"shift plan: {self.audio_frames} audio frames < one window's "
                             f"{self.stride * (self.window - 1) + 1}")

    @property
    def num_windows(self) -> int:
        return -(-self.total_latent // self.window)

    def offset(self, step: int) -> int:
        """shift_i: how far window 0 starts before latent frame 0 on `step`."""
        return 0 if self.total_latent == self.window else (self.shift * step) % self.window

    def starts(self, step: int) -> np.ndarray:
        return self.window * np.arange(self.num_windows) - self.offset(step)

    def latent_indices(self, step: int) -> np.ndarray:
        """int [windows, window]: the latent frames each window covers on `step` (circular)."""
        return (self.starts(step)[:, None] + np.arange(self.window)[None]) % self.total_latent

    def audio_indices(self, step: int) -> np.ndarray:
        """int [windows, stride·(window − 1) + 1]: the audio (video-frame) entries each window reads."""
        m = np.arange(self.stride * (self.window - 1) + 1)
        return (self.stride * self.starts(step)[:, None] + m[None]) % self.audio_frames

    def counts(self, step: int) -> np.ndarray:
        """int [total_latent]: windows covering each latent frame on `step` (1, or 2 at the wrap)."""
        return np.bincount(self.latent_indices(step).ravel(), minlength=self.total_latent)

    def merge(self, step: int, outs, xp=np):
        """Window results [windows, window, ...] -> the buffer [total_latent, ...]: scatter-add, then divide
        by the per-frame count. `xp`: numpy or jax.numpy."""
        idx = self.latent_indices(step).ravel()
        flat = outs.reshape(-1, *outs.shape[2:])
        counts = self.counts(step).reshape(-1, *([1] * (flat.ndim - 1)))
        if xp is np:
            total = np.zeros((self.total_latent, *flat.shape[1:]), flat.dtype)
            np.add.at(total, idx, flat)
        else:
            total = xp.zeros((self.total_latent, *flat.shape[1:]), flat.dtype).at[idx].add(flat)
        return total / xp.asarray(counts, flat.dtype)

    def describe(self, steps: int = 3) -> str:
        rows = [f"time-aware shift: {self.total_latent} latent frames, {self.num_windows} windows of {self.window} "
                f"(shift {self.shift}/step), audio {self.audio_frames} frames"]
        for i in range(min(steps, 3)):
            spans = [f"{(s % self.total_latent)}..{(s + self.window - 1) % self.total_latent}" for s in self.starts(i)]
            rows.append(f"  step {i}: " + ", ".join(spans))
        return "\n".join(rows)


def shift_plan(audio_frames: int, *, window: int = 33, shift: int = 10, stride: int = 4) -> ShiftPlan:
    """The released sizing for `audio_frames` video frames of audio (25 fps): n = audio_frames // c + 1 chunks of
    c = stride·(window − 1) video frames; the latent buffer holds n·(window − 1) + 1 frames and the audio is
    zero-padded to n·c + stride frames (decode the first 1 + (audio_frames − 1)//stride latent frames' worth and
    cut to the audio length)."""
    if audio_frames < 1:
        raise ValueError(f"shift plan: {audio_frames} audio frames; need at least 1")
    c = stride * (window - 1)
    n = audio_frames // c + 1
    return ShiftPlan(total_latent=n * (window - 1) + 1, audio_frames=n * c + stride, window=window, shift=shift,
                     stride=stride)

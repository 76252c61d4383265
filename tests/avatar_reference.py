"""An independent PyTorch reference of HunyuanVideo-Avatar's audio path, written from the research facts
(research/hyavatar_letstalk.md B.3, B.4), not from our JAX code: per-frame whisper windows, the audio
projector, the latent-frame grouping, the face mask resizes and the face-aware audio adapter. Parameter
names are the released checkpoint's (``audio_proj.*``, ``audio_adapter_blocks.{i}.*``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def windows(states: torch.Tensor, num_frames: int, fps: float = 25) -> torch.Tensor:
    """[B, A, layers, D] -> [B, T, 10, layers, D]: 4 zero frames in front, frame f takes 10 frames from
    (f · step) · 2 of the padded sequence, step 1 at 25 fps and 2 at 12.5 fps; T = min(num_frames, 400)."""
    step = {25: 1, 12.5: 2}[fps]
    padded = torch.cat([torch.zeros_like(states[:, :4]), states], dim=1)
    clips = []
    for f in range(min(num_frames, 400)):
        start = f * step * 2
        clip = padded[:, start:start + 10]
        assert clip.shape[1] == 10, "window past the end"
        clips.append(clip)
    return torch.stack(clips, dim=1)


class AudioProj(nn.Module):
    """Per frame: flatten 10x5x384 -> ReLU(Linear 1024) -> ReLU(Linear 1024) -> Linear 4·D -> (4, D) -> LN."""

    def __init__(self, window=10, layers=5, channels=384, hidden=1024, tokens=4, dim=3072):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.proj1 = nn.Linear(window * layers * channels, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, w):  # [B, T, window, layers, channels]
        b, t = w.shape[:2]
        x = w.reshape(b * t, -1)
        x = torch.relu(self.proj2(torch.relu(self.proj1(x))))
        return self.norm(self.proj3(x).view(b * t, self.tokens, self.dim)).view(b, t, self.tokens, self.dim)


def group_latent(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, 4, D] -> [B, (T+3)/4, 16, D]: 3 copies of frame 0 prepended, then consecutive groups of 4."""
    b, t, k, d = tokens.shape
    x = torch.cat([tokens[:, :1].repeat(1, 3, 1, 1), tokens], dim=1)
    return x.view(b, (t + 3) // 4, 4 * k, d)


class FaceAdapter(nn.Module):
    """Single-head cross-attention per latent frame, inner 1024: q from LN2(video), [k|v] from LN1(audio),
    logits (q·d^-1/4)·(k·d^-1/4), softmax in fp32, zero-init to_out, no biases."""

    def __init__(self, dim=3072, inner=1024):
        super().__init__()
        self.inner = inner
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        nn.init.zeros_(self.to_out.weight)

    def forward(self, audio, video):  # audio [B, F, 16, D], video [B, F, S, D]
        q = self.to_q(self.norm2(video))
        k, v = self.to_kv(self.norm1(audio)).split(self.inner, dim=-1)
        s = 1 / math.sqrt(math.sqrt(self.inner))
        w = torch.softmax(((q * s) @ (k * s).transpose(-1, -2)).float(), dim=-1).to(q.dtype)
        return self.to_out(w @ v)


def apply_adapter(adapter: FaceAdapter, img, audio, face_mask, frames: int, ref_tokens: int):
    """img [B, R + F·S, D] += cat(zeros for the R reference tokens, adapter(...) · face_mask)."""
    b, _, d = img.shape
    video = img[:, ref_tokens:].reshape(b, frames, -1, d)
    out = adapter(audio, video).reshape(b, -1, d)
    return img + torch.cat([torch.zeros_like(img[:, :ref_tokens]), out * face_mask[..., None]], dim=1)


def face_mask_tokens(pixel_mask: torch.Tensor, latent_hw, frames: int) -> torch.Tensor:
    """[B, H, W] -> bilinear to latent (h, w) -> repeat over frames -> nearest to (F, h/2, w/2) -> [B, F·h/2·w/2]."""
    lat = F.interpolate(pixel_mask[:, None], size=latent_hw, mode="bilinear")  # [B, 1, h, w]
    vol = lat[:, :, None].repeat(1, 1, frames, 1, 1)  # [B, 1, F, h, w]
    tok = F.interpolate(vol, size=[frames, latent_hw[0] // 2, latent_hw[1] // 2], mode="nearest")
    return tok.reshape(pixel_mask.shape[0], -1)

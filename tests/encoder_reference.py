"""Shared helpers of the encoder parity tests: weight perturbation of tiny transformers models, the
parity bound, and Hallo3's per-frame wav2vec2 features from the PyTorch model."""

from __future__ import annotations

import numpy as np
import torch


def assert_parity(ours, ref, note: str = "") -> float:
    """max |ours - ref| <= 1e-5 * max(1, max |ref|). Never loosen it: find the bug. Returns the error."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape} {note}"
    err = float(np.abs(ours - ref).max())
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert err <= bound, f"max |ours - reference| = {err:.3g} > {bound:.3g} {note}"
    return err


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with every norm scale away from 1 and every norm bias away from 0, so a swapped or
    dropped norm parameter cannot go unnoticed; linear/conv weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif name.endswith("original0") or name.endswith("weight_g"):  # weight-norm magnitude
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "relative_attention_bias" in name or name.endswith("shared.weight") or "masked_spec" in name:
                p.copy_(noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(noise / np.sqrt(fan_in))
    return model


def param_count_torch(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters are counted once


def hallo3_audio_features(model: torch.nn.Module, values: torch.Tensor, frames: int) -> np.ndarray:
    """transformers' Wav2Vec2Model as Hallo3 runs it: the conv features linearly resampled (align_corners)
    to `frames` video frames, then the transformer; hidden_states[1:] stacked -> [B, frames, layers, D]."""
    import torch.nn.functional as F

    conv = model.feature_extractor

    class Resampled(torch.nn.Module):  # Hallo3's linear_interpolation on the [B, C, S] conv output
        def forward(self, x):
            return F.interpolate(conv(x), size=frames, align_corners=True, mode="linear")

    model.feature_extractor = Resampled()
    try:
        with torch.no_grad():
            hidden = model(values, output_hidden_states=True).hidden_states
    finally:
        model.feature_extractor = conv
    return torch.stack(hidden[1:], dim=2).numpy()


# transformers WhisperConfig of the tiny test model: the encoder at our "test" preset's sizes (2 s windows)
WHISPER_TINY_HF = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48, decoder_layers=1,
                       decoder_attention_heads=4, decoder_ffn_dim=24, num_mel_bins=80, max_source_positions=100,
                       max_target_positions=16, vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=1)


def speech_like(seconds=2.5, seed=0, batch=1) -> np.ndarray:
    """[batch, samples] of a voiced, syllable-rate-modulated 16 kHz waveform (harmonics of a gliding pitch
    plus breath noise): a real waveform for the log-mel front ends, without an audio file."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    out = []
    for _ in range(batch):
        f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
        out.append(0.2 * envelope * voiced + 0.01 * rng.standard_normal(t.size))
    return np.stack(out).astype(np.float32)


def bad_copy(src, tensors: dict, out):
    """A copy of the transformers directory `src` (its config.json) holding `tensors` as model.safetensors:
    the edited checkpoint of a converter-error test. Returns `out`."""
    import safetensors.numpy

    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
    return out

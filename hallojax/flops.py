"""Analytic FLOP count of the DiT, device peaks, and MFU.

Model FLOPs are the matrix multiplications of one forward pass, 2·m·n·k each (attention's QKᵀ and PV
included; norms, softmax and activations, about 1-2 % more, are not); a training step is 3× the
forward (the backward pass costs two forwards). Rematerialisation recomputes work but adds no model
FLOPs, so MFU = model FLOPs per step / (step time × peak) compares settings fairly.
`tests/test_flops.py` checks the count against XLA's `cost_analysis` of the compiled program within 10 %.

    from hallojax.flops import forward_flops, train_flops, device_peak
    train_flops(cfg, batch=8, frames=21, height=60, width=104, text_len=512)  # latent grid sizes
"""

from __future__ import annotations

from hallojax.models.wan import DiTConfig

# bf16 dense peak TFLOP/s per chip / GPU and HBM GiB, by substrings of `jax.Device.device_kind`
# (first match wins: "v5 lite" before "v5")
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("TPU v4", 275.0, 32.0),
    ("TPU v5 lite", 197.0, 16.0),  # v5e
    ("TPU v5e", 197.0, 16.0),
    ("TPU v5", 459.0, 95.74),  # v5p ("TPU v5" / "TPU v5p")
    ("TPU v6", 918.0, 32.0),  # v6e ("TPU v6 lite")
    ("H200", 989.0, 141.0),
    ("H100", 989.0, 80.0),
    ("A100", 312.0, 80.0),
)


def device_spec(kind: str) -> tuple[float, float] | None:
    """(peak bf16 TFLOP/s, HBM GiB) for a device kind, or None when unknown (CPU, other GPUs)."""
    for key, peak, hbm in PEAKS:
        if key.lower() in kind.lower():
            return peak, hbm
    return None


def device_peak(kind: str) -> float | None:
    spec = device_spec(kind)
    return spec[0] * 1e12 if spec else None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, kind: str) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the device's peak is unknown."""
    peak = device_peak(kind)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * num_devices * peak)


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def _block(b, video, extra, keys_extra, d, ffn, m_text, m_img) -> float:
    """One WanBlock: `video` tokens whose queries also see `keys_extra` extra keys, plus an `extra`-token
    stream (its own keys among them). The layer scan runs the same body in every layer, so the last
    layer's extra stream is counted too although its output is unused (an unrolled forward pass lets
    XLA drop it: a few % fewer FLOPs there; a training step computes it either way)."""

    def stream(n, keys):  # q, out, attention, cross-attention, FFN of n query tokens
        f = 2 * _mm(b * n, d, d) + 2 * _mm(b * n, d, keys)
        f += 2 * _mm(b * n, d, d) + 2 * _mm(b * n, d, m_text) + 2 * _mm(b * n, d, ffn)
        if m_img:
            f += 2 * _mm(b * n, d, m_img)
        return f

    f = 2 * _mm(b * (video + extra), d, d)  # k, v of self-attention
    f += 2 * _mm(b * m_text, d, d) + (2 * _mm(b * m_img, d, d) if m_img else 0.0)  # k, v of text (and image)
    f += stream(video, video + keys_extra)
    if extra:
        f += stream(extra, video + keys_extra)
    return f


def forward_flops(cfg: DiTConfig, *, batch: int, frames: int, height: int, width: int, text_len: int = 512,
                  image_len: int = 0, reference_cached: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one forward pass on latents [batch, frames, height, width, C] (latent grid sizes),
    by component, with the sum under "total". image_len: I2V image tokens (257, 514 for FLF2V);
    reference_cached: Hallo3's reference network not run (sampling with a `ReferenceCache`)."""
    b, d, ffn = batch, cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    gf, gh, gw = frames // pt, height // ph, width // pw
    per_frame = gh * gw
    video = gf * per_frame
    pv = cfg.patch_volume
    out: dict[str, float] = {}

    # extra token stream (identity frame, symbiotic copies, prefix motion) and reference-network keys
    extra = (per_frame if cfg.identity_tokens else 0) + (video if cfg.symbiotic else 0)
    if cfg.motion_frames and cfg.motion_mode == "prefix":
        extra += cfg.motion_frames // pt * per_frame
    ref_keys = per_frame if cfg.reference_net else 0
    embedded = video + (per_frame if cfg.identity_tokens or cfg.symbiotic else 0)  # one reference frame, tiled
    embedded += extra - (per_frame if cfg.identity_tokens else 0) - (video if cfg.symbiotic else 0)  # motion

    out["embed"] = _mm(b * embedded, pv * cfg.embed_channels, d)
    out["time"] = _mm(b, cfg.freq_dim, d) + _mm(b, d, d) + _mm(b, d, 6 * d)
    out["text"] = _mm(b * text_len, cfg.text_dim, d) + _mm(b * text_len, d, d)
    if cfg.image_dim is not None and image_len:
        out["image"] = _mm(b * image_len, cfg.image_dim, cfg.image_dim) + _mm(b * image_len, cfg.image_dim, d)
    m_img = image_len if cfg.image_dim else 0
    ref_kv = 2 * _mm(b * ref_keys, d, d)  # reference features through k, v
    out["blocks"] = cfg.num_layers * (_block(b, video, extra, extra + ref_keys, d, ffn, text_len, m_img) + ref_kv)
    if cfg.identity_additive:
        out["identity_additive"] = _mm(b * per_frame, pv * cfg.out_channels, d) + _mm(b * per_frame, d, d)
    if cfg.reference_net and not reference_cached:
        out["reference_net"] = (_mm(b * per_frame, pv * cfg.embed_channels, d) + out["time"]
                                + _mm(b, cfg.text_dim, d) + _mm(b, d, d)
                                + cfg.num_layers * _block(b, per_frame, 0, 0, d, ffn, 1, 0))
    if cfg.audio != "none":
        out.update(_audio_flops(cfg, b, frames, gf, video, d))
    out["head"] = _mm(b * video, d, pv * cfg.output_channels)
    out["total"] = sum(out.values())
    return out


def _audio_flops(cfg: DiTConfig, b: int, frames: int, gf: int, video: int, d: int) -> dict[str, float]:
    s = cfg.audio_stride
    t = 1 + s * (frames - 1)  # video frames the audio features cover
    h, k, da = cfg.audio_hidden, cfg.audio_tokens, cfg.audio_dim
    proj = (_mm(b * t, (2 * cfg.audio_window + 1) * cfg.audio_in_layers * cfg.audio_in_dim, h)
            + _mm(b * t, h, h) + _mm(b * t, h, k * da))
    if cfg.audio_align == "conv":
        rest = t - 1
        for _ in range(s.bit_length() - 1):  # stride-2 convolutions, kernel 3
            rest //= 2
            proj += _mm(b * k * rest, 3 * da, da)
        tokens = k
    else:
        tokens = s * k
    window = (2 * cfg.audio_neighbors + 1) * tokens  # audio keys per latent frame
    kv = 2 * _mm(b * gf * window, da, d)
    attn = 2 * _mm(b * video, d, window)
    if cfg.audio == "cross_attn":
        per = 2 * _mm(b * video, d, d) + kv + attn  # q, out | k, v | QKᵀ, PV
        return {"audio_proj": proj, "audio_attention": cfg.num_layers // cfg.audio_every * per}
    return {"audio_proj": proj, "audio_attention": cfg.num_layers * (kv + attn)}  # decoupled: shared q, out


def train_flops(cfg: DiTConfig, **shape) -> float:
    """Model FLOPs of one training step (forward + backward = 3 forwards) on `shape` (see forward_flops)."""
    return 3.0 * forward_flops(cfg, **shape)["total"]


def format_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"

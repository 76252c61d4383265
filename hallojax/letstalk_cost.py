"""What LetsTalk's factorized attention saves: FLOPs per denoising step and measured CPU time, factorized
(spatial attention over a frame's [P video + P reference] tokens, temporal attention over a position's frames)
against full attention (one self-attention over all F·2P tokens of the clip, no temporal module).

    python -m hallojax.letstalk_cost [--model VDTcat-B/2] [--frames 16 64] [--latent 32] [--measure-latent 16]

FLOPs follow `hallojax.flops`: matrix multiplications of one forward pass, 2·m·k·n each, attention's QKᵀ and PV
included (norms, softmax, activations left out); a training step is 3x. Measured: the attention cores of one
block for one 64-wide head at batch 1 (XLA attention on this machine's CPU, best of `repeats`), full attention
over query chunks so its [L, L] logits fit in memory; the whole-model factor follows from the FLOPs.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from hallojax.flops import format_flops
from hallojax.models.letstalk import LetsTalkConfig
from hallojax.nn.attention import dot_product_attention


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def letstalk_flops(cfg: LetsTalkConfig, *, batch: int, frames: int, height: int, width: int,
                   attention: str = "factorized") -> dict[str, float]:
    """Matmul FLOPs of one forward pass on latents [batch, frames, height, width, C], by component ("total":
    the sum). attention: "factorized" (the model) or "full" (one attention over all the clip's F·2P tokens,
    no temporal module)."""
    if attention not in ("factorized", "full"):
        raise ValueError(f"attention={attention!r}: expected 'factorized' or 'full'")
    b, d, p = batch, cfg.hidden, cfg.patch_size
    per = (height // p) * (width // p)  # P tokens per frame
    f, m = frames, cfg.memory_frames
    video, both = f * per, 2 * f * per
    out = {"embed": _mm(b * (f + 1 + m) * per, p * p * cfg.in_channels, d),  # the reference is embedded once
           # the timestep MLP, every block's 6-way modulation and the final (shift, scale)
           "time": _mm(b, cfg.freq_dim, d) + _mm(b, d, d) + cfg.depth * _mm(b, d, 6 * d) + _mm(b, d, 2 * d),
           "audio_proj": _mm(b * f, (2 * cfg.audio_window + 1) * cfg.audio_in_layers * cfg.audio_in_dim,
                             cfg.audio_hidden) + _mm(b * f, cfg.audio_hidden, cfg.audio_hidden)
           + _mm(b * f, cfg.audio_hidden, cfg.audio_tokens * cfg.audio_dim)}
    k = cfg.audio_tokens
    audio = (2 * _mm(b * video, d, d) + 2 * _mm(b * f * k, cfg.audio_dim, d)  # q, out | k, v
             + 2 * _mm(b * video, d, k))  # QKᵀ, PV per frame
    spatial_proj = _mm(b * both, d, 3 * d) + _mm(b * both, d, d) + 2 * _mm(b * both, d, cfg.mlp_hidden)
    if attention == "factorized":
        t = f + m
        temporal = _mm(b * t * per, d, 3 * d) + 2 * _mm(b * t * per, d, d) + 2 * _mm(b * per * t, d, t)
        spatial_attn = 2 * _mm(b * f * 2 * per, d, 2 * per)
    else:
        temporal = 0.0
        spatial_attn = 2 * _mm(b * both, d, both)
    out["temporal"] = cfg.depth * temporal
    out["audio_attention"] = cfg.depth * audio
    out["spatial_projections_mlp"] = cfg.depth * spatial_proj
    out["spatial_attention"] = cfg.depth * spatial_attn
    out["head"] = _mm(b * video, d, p * p * cfg.out_channels)
    out["total"] = sum(out.values())
    return out


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_attention(frames: int, per_frame: int, *, head_dim: int = 64, repeats: int = 3,
                      chunk: int = 2048) -> dict[str, float]:
    """Seconds of one block's attention cores for one head at batch 1 on this machine: "factorized" (spatial over
    2P per frame + temporal over F per position) and "full" (one sequence of F·2P tokens, queries in chunks)."""
    n = 2 * per_frame
    spatial = jnp.sin(jnp.arange(frames * n * head_dim, dtype=jnp.float32)).reshape(frames, n, 1, head_dim)
    temporal = spatial[:, :per_frame].transpose(1, 0, 2, 3)  # [P, F, N, K]
    full = spatial.reshape(1, frames * n, 1, head_dim)

    @jax.jit
    def factorized(s, t):
        return dot_product_attention(s, s, s), dot_product_attention(t, t, t)

    @jax.jit
    def joint(x):
        length = x.shape[1]
        size = min(chunk, length)
        qs = x[0, : length // size * size].reshape(length // size, 1, size, 1, head_dim)
        return jax.lax.map(lambda q: dot_product_attention(q, x, x), qs)

    return {"factorized": _time(factorized, spatial, temporal, repeats=repeats),
            "full": _time(joint, full, repeats=repeats)}


def report(model: str = "VDTcat-B/2", frames=(16, 64), latent: int = 32, measure_latent: int = 16,
           repeats: int = 3, out=sys.stdout) -> list[dict]:
    """Print (and return) the FLOPs of both layouts for `model` at `latent`² latents and the measured attention
    cores at `measure_latent`²."""
    cfg = LetsTalkConfig.named(model)
    p = cfg.patch_size
    rows = []
    print(f"LetsTalk {model}, latent {latent}x{latent} (P = {(latent // p) ** 2} tokens a frame), batch 1, forward:",
          file=out)
    for f in frames:
        fac = letstalk_flops(cfg, batch=1, frames=f, height=latent, width=latent)
        full = letstalk_flops(cfg, batch=1, frames=f, height=latent, width=latent, attention="full")
        attn_fac = fac["temporal"] + fac["spatial_attention"]
        attn_full = full["spatial_attention"]
        pm = (measure_latent // p) ** 2
        t = measure_attention(f, pm, repeats=repeats)
        core = (f * (2 * pm) ** 2 + pm * f * f) / (f * 2 * pm) ** 2  # factorized / full QKᵀ and PV FLOPs
        row = dict(frames=f, flops_factorized=fac["total"], flops_full=full["total"], core_flops_ratio=1 / core,
                   attention_flops_factorized=attn_fac, attention_flops_full=attn_full,
                   seconds_factorized=t["factorized"], seconds_full=t["full"])
        rows.append(row)
        print(f"  F={f:3d}: step {format_flops(fac['total'])} factorized vs {format_flops(full['total'])} full "
              f"({full['total'] / fac['total']:.1f}x); token mixing {format_flops(attn_fac)} vs "
              f"{format_flops(attn_full)} ({attn_full / attn_fac:.1f}x)", file=out)
        print(f"         measured, one block's attention, one head, latent {measure_latent}x{measure_latent} "
              f"(P = {(measure_latent // p) ** 2}): {t['factorized'] * 1e3:.1f} ms factorized vs "
              f"{t['full'] * 1e3:.1f} ms full ({t['full'] / t['factorized']:.1f}x; their FLOPs {1 / core:.1f}x) on "
              f"{jax.devices()[0].platform}", file=out)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hallojax.letstalk_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="VDTcat-B/2")
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--latent", type=int, default=32, help="latent side for the FLOPs (256 px / 8)")
    ap.add_argument("--measure-latent", type=int, default=16, help="latent side for the measured attention")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print("$ python -m hallojax.letstalk_cost " + " ".join(sys.argv[1:] if argv is None else argv))
    report(args.model, tuple(args.frames), args.latent, args.measure_latent, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

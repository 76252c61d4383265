"""Benchmarks that print their figures and the command that produced them (never timed tests).

    hallojax bench vae [--height 480 --width 832 --frames 17 --batch 1 --dtype bfloat16 --tile 0]

Random weights at the published Wan2.1 VAE size (throughput does not depend on the values); reports
encode and decode frames/s after one warm-up call, and peak memory: the device's own counter where
it has one (GPU/TPU), otherwise XLA's compiled estimate (arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import jax
import numpy as np
from flax import nnx


def _timed(fn, *args, repeats: int):
    out = jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t0) / repeats


def _xla_bytes(fn, *args) -> int:
    m = fn.lower(*args).compile().memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_vae(argv) -> dict:
    from hallojax.vae import VAEConfig, WanVAE

    p = argparse.ArgumentParser(prog="hallojax bench vae")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=17, help="1 + 4k video frames")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tile", type=int, default=0, help="spatial decode tile in pixels (0: untiled)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    vae = WanVAE(VAEConfig(dtype=args.dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    video = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.frames, args.height, args.width, 3))
    video = video.astype(np.float32)

    encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v))
    tile = args.tile or None
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, tile=tile))
    latents, t_enc = _timed(encode, state, video, repeats=args.repeats)
    _, t_dec = _timed(decode, state, latents, repeats=args.repeats)
    frames = args.batch * args.frames
    dev = jax.devices()[0]
    result = {
        "device": f"{jax.device_count()} x {dev.device_kind}",
        "encode_frames_per_s": frames / t_enc, "decode_frames_per_s": frames / t_dec,
        "encode_xla_bytes": _xla_bytes(encode, state, video), "decode_xla_bytes": _xla_bytes(decode, state, latents),
        "device_peak_bytes": _peak(dev),
    }
    print(f"command: hallojax bench vae {shlex.join(argv)}")
    print(f"device: {result['device']}; video {args.batch}x{args.frames}x{args.height}x{args.width}, "
          f"latents {tuple(latents.shape)}, {args.dtype}, tile {tile}")
    print(f"encode: {result['encode_frames_per_s']:.2f} frames/s ({t_enc:.2f} s/call), "
          f"XLA memory {result['encode_xla_bytes'] / 2**30:.2f} GiB")
    print(f"decode: {result['decode_frames_per_s']:.2f} frames/s ({t_dec:.2f} s/call), "
          f"XLA memory {result['decode_xla_bytes'] / 2**30:.2f} GiB")
    if result["device_peak_bytes"] is not None:
        print(f"device peak memory: {result['device_peak_bytes'] / 2**30:.2f} GiB")
    return result


BENCHES = {"vae": bench_vae}


def main(argv) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: hallojax bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    BENCHES[argv[0]](argv[1:])
    return 0

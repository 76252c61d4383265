"""Benchmark of the data pipeline on the synthetic talking-face set: clips per second per CPU core.

    python -m data_pipeline.bench                       # 8 videos of 4 s, 64x64, 17-frame clips, pixel codec
    python -m data_pipeline.bench --videos 16 --size 128 --frames 49 --codec pixel:8 --audio-features rms
    python -m data_pipeline.bench --train-input data/prepared [--batch 8 --batches 200 --processes 2]

The process is pinned to one core (and its libraries to one thread), so the figures are per core; a host
runs one prepare process per core (`--process-index/--process-count`, or one JAX process each).
Stage 1: decode, resample to fps, crop/resize, audio to 16 kHz and cut. Stage 2: codec encode (reference
included), audio features, record serialisation, ArrayRecord write. `--train-input DIR` times the other
end instead: the trainer's input over a prepared set (`hallojax.data`: the global order, Grain's reading,
decoding and batching threads) as one of `--processes` processes (its rows of every global batch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def pin_to_one_core() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity here)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="length of every synthetic video")
    p.add_argument("--size", type=int, default=64, help="synthetic and output frame size")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--codec", default="pixel")
    p.add_argument("--audio-features", default=None)
    p.add_argument("--no-pin", action="store_true", help="use every core the process may run on")
    g = p.add_argument_group("the trainer's input instead (--train-input)")
    g.add_argument("--train-input", metavar="PREPARED_DIR", help="time the trainer's input over this prepared set")
    g.add_argument("--config", default="configs/wan.py:demo", help="the model the batches are for")
    g.add_argument("--batch", type=int, default=8, help="global batch")
    g.add_argument("--batches", type=int, default=200, help="timed batches (after one warm-up batch)")
    g.add_argument("--processes", type=int, default=1, help="this process reads batch / processes rows")
    args = p.parse_args(argv)
    if args.train_input:
        if args.batch < 1 or args.batches < 1 or args.processes < 1 or args.batch % args.processes:
            p.error(f"--batch {args.batch}, --batches {args.batches}, --processes {args.processes}: positive, and "
                    "the batch a multiple of the processes")
        return train_input(args, argv)

    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from data_pipeline import schema, synthetic
    from data_pipeline.clips import ClipConfig, extract_clips
    from data_pipeline.features import encode_clips, get_audio_features
    from data_pipeline.pipeline import WRITER_OPTIONS
    from hallojax.codec import get_codec

    pinned = "not pinned" if args.no_pin else pin_to_one_core()
    cfg = ClipConfig(num_frames=args.frames, height=args.size, width=args.size)
    codec, audio_fn = get_codec(args.codec), get_audio_features(args.audio_features)
    with tempfile.TemporaryDirectory() as tmp:
        scfg = synthetic.SyntheticConfig(height=args.size, width=args.size, min_seconds=args.seconds,
                                         max_seconds=args.seconds)
        t = time.perf_counter()
        paths = synthetic.generate(os.path.join(tmp, "videos"), args.videos, seed=0, cfg=scfg)
        gen_s = time.perf_counter() - t

        t = time.perf_counter()
        all_clips = [extract_clips(path, path.name, cfg) for path in paths]
        s1 = time.perf_counter() - t
        n = sum(len(c.starts) for c in all_clips)

        t = time.perf_counter()
        writer = ArrayRecordWriter(os.path.join(tmp, "bench.array_record"), WRITER_OPTIONS)
        nbytes = 0
        for clips in all_clips:
            for r in encode_clips(clips, cfg, codec, audio_fn, args.audio_features):
                blob = schema.encode_record(r)
                nbytes += len(blob)
                writer.write(blob)
        writer.close()
        s2 = time.perf_counter() - t
        disk = os.path.getsize(os.path.join(tmp, "bench.array_record"))

    frames = sum(len(c.frames) for c in all_clips)
    print(f"command: python -m data_pipeline.bench {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"set-up: {args.videos} synthetic videos of {args.seconds:g} s at {args.size}x{args.size}, "
          f"{args.frames}-frame clips, codec {codec.name}, audio features {args.audio_features}; {pinned}")
    print(f"synthetic generation: {args.videos / gen_s:8.1f} videos/s")
    print(f"stage 1 (decode, resample, crop, audio): {n / s1:8.1f} clips/s per core "
          f"({frames / s1:.0f} frames/s, {n} clips in {s1:.2f} s)")
    print(f"stage 2 (encode, serialise, write):      {n / s2:8.1f} clips/s per core "
          f"({nbytes / n / 2**20:.2f} MiB per record, {disk / max(nbytes, 1):.2f} compressed)")
    print(f"both stages:                             {n / (s1 + s2):8.1f} clips/s per core")
    return 0 if np.isfinite(n / (s1 + s2)) else 1


def train_input(args, argv) -> int:
    """Clips/s of the trainer's input: process 0's rows of every global batch, after a warm-up batch."""
    from hallojax import data
    from hallojax.config import load_config
    from hallojax.models.wan import DiTConfig

    pinned = "not pinned" if args.no_pin else pin_to_one_core()
    config = load_config(args.config, [f"--config.data.prepared={args.train_input}",
                                       f"--config.train.batch_size={args.batch}"])
    data.configure(config)
    rows = list(range(args.batch // args.processes))  # process 0's rows of a batch split over the processes
    source = data.make_source(config, DiTConfig.from_dict(config.model), rows)
    first = next(source)
    t = time.perf_counter()
    for _ in range(args.batches):
        next(source)
    seconds = time.perf_counter() - t
    clips = args.batches * len(rows)
    print(f"command: python -m data_pipeline.bench {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"set-up: {source.num_records} clips in {args.train_input}, latents {list(first['latents'].shape[1:])}; "
          f"global batch {args.batch} over {args.processes} process(es): {len(rows)} rows here; {pinned}")
    print(f"training input: {clips / seconds:8.1f} clips/s ({args.batches / seconds:.1f} batches/s, {clips} clips "
          f"in {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

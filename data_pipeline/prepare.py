"""The `prepare` command: talking-head videos -> training shards (stage 1 clips, stage 2 features).

    python -m data_pipeline.prepare VIDEO_DIR [MORE_DIRS_OR_FILES ...] -o OUT_DIR \\
        [--frames 17] [--stride 17] [--fps 25] [--size 64] [--codec pixel] [--audio-features rms]
        [--face-embeddings FILE.npz] [--text-states FILE.npz] [--extras hallo3|hunyuan-avatar]

Multi-host: start the same command on every host with `--distributed` (jax.distributed.initialize()
finds the cluster on TPU pods and SLURM; or give --coordinator/--num-processes/--process-id); each process
writes its share of the shards and process 0 writes the manifest. Without JAX, `--process-index I
--process-count N` splits the work the same way (the last process to finish writes the manifest).
A killed run is resumed by running the same command again. Errors in arguments or the output directory
print one line and exit with status 2; bad input videos are skipped and listed in OUT_DIR/report.json.

This module only parses arguments (cheap to import); the work is in `pipeline.py`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="directories (searched recursively for .mp4 .mov .mkv .webm) or files")
    p.add_argument("-o", "--out", required=True, help="output directory (created; a rerun resumes it)")
    g = p.add_argument_group("clips (stage 1)")
    g.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (e.g. 17, 49, 81)")
    g.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --frames)")
    g.add_argument("--fps", type=float, default=25.0)
    g.add_argument("--size", type=int, default=None, help="square output size (sets --height and --width)")
    g.add_argument("--height", type=int, default=64)
    g.add_argument("--width", type=int, default=64)
    g.add_argument("--crop", choices=["auto", "center"], default="auto",
                   help="auto: around the face box of VIDEO.face.json when present, else centre")
    g.add_argument("--box-scale", type=float, default=1.6, help="crop = face box enlarged by this factor")
    g.add_argument("--min-side", type=int, default=32, help="skip videos whose crop region is smaller (pixels)")
    g.add_argument("--max-seconds", type=float, default=None, help="use at most this much of each video")
    g.add_argument("--seed", type=int, default=0, help="seed of the reference-frame choice")
    g = p.add_argument_group("features (stage 2) and shards")
    g.add_argument("--codec", default="pixel",
                   help="codec spec: pixel, pixel:4, wan-vae:DIR, sd-vae:DIR, hunyuan-vae:DIR, cogvideox-vae:DIR")
    g.add_argument("--audio-features", default=None, help="audio feature spec (e.g. rms); default: raw audio only")
    g.add_argument("--face-embeddings", default=None, metavar="FILE.npz",
                   help="per-video face embeddings: key = the video's path relative to its input directory -> [E]")
    g.add_argument("--text-states", default=None, metavar="FILE.npz",
                   help="per-video text states: SOURCE -> [L, D], optional SOURCE/mask [L], SOURCE/pooled [P]; "
                        "or one '*' key for every video")
    g.add_argument("--captions", default=None, metavar="FILE.json",
                   help="per-video captions {SOURCE: text} or {\"*\": text}, encoded by --text-encoder into "
                        "text states")
    g.add_argument("--text-encoder", default=None, metavar="DIR", help="with --captions: a converted T5 / umT5")
    g.add_argument("--tokenizer", default=None, metavar="DIR", help="with --captions: the encoder's tokenizer")
    g.add_argument("--text-len", type=int, default=None, help="with --captions: tokens per caption (default 226)")
    g.add_argument("--extras", default=None, help="model-specific latents: hallo3, hunyuan-avatar (comma-separated)")
    g.add_argument("--videos-per-shard", type=int, default=16)
    g.add_argument("--encode-batch", type=int, default=8, help="clips per codec call")
    g.add_argument("--overwrite", action="store_true", help="delete an earlier output directory first")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("several processes")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    g.add_argument("--coordinator", default=None, help="with --distributed: HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    g.add_argument("--process-id", type=int, default=None, help="with --distributed")
    g.add_argument("--process-index", type=int, default=None, help="without JAX: this process's index")
    g.add_argument("--process-count", type=int, default=None, help="without JAX: number of processes")


def config_from_args(args):
    from data_pipeline.clips import ClipConfig
    from data_pipeline.pipeline import PrepareConfig

    height, width = (args.size, args.size) if args.size is not None else (args.height, args.width)
    clip = ClipConfig(fps=args.fps, num_frames=args.frames, stride=args.stride, height=height, width=width,
                      crop=args.crop, box_scale=args.box_scale, min_side=args.min_side,
                      max_seconds=args.max_seconds, seed=args.seed)
    return PrepareConfig(clip=clip, codec=args.codec, audio_features=args.audio_features,
                         videos_per_shard=args.videos_per_shard, encode_batch=args.encode_batch,
                         face_embeddings=args.face_embeddings, text_states=args.text_states, extras=args.extras,
                         captions=args.captions, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         text_len=args.text_len)


def run(args) -> dict:
    """Run prepare from parsed arguments; user errors raise ValueError/OSError (the caller prints them)."""
    from data_pipeline.pipeline import prepare

    if args.distributed:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # barrier on CPU-only hosts
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
    summary = prepare(args.inputs, args.out, config_from_args(args), process_index=args.process_index,
                      process_count=args.process_count, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"prepare: {summary['clips']} clips from {summary['videos_ok']} videos written, {summary['videos_skipped']} "
          f"skipped, {summary['shards_already_done']} shards already done"
          + (f"; manifest {summary['manifest']}" if summary["manifest"] else ""))
    return summary


def main(argv=None) -> int:
    from hallojax.usage import ArgumentParser, print_error

    p = ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(p.parse_args(argv))
    except (ValueError, OSError) as e:
        print_error("prepare", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

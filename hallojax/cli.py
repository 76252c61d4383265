"""The `hallojax` command.

    hallojax convert FORMAT SRC_DIR OUT_DIR [--overwrite]       FORMAT: wan-diffusers, wan, wan-vae, wav2vec2, umt5, t5,
                                                                cogvideox
    hallojax convert echomimic-v3 BASE_DIR ECHO_FILE OUT_DIR    Wan2.1-Fun-InP base + an EchoMimicV3 file
    hallojax convert letstalk CKPT_FILE OUT_DIR [--weights ema|model]   a LetsTalk torch.save file
    hallojax export  FORMAT CKPT_DIR OUT_DIR [--overwrite] [--max-shard-gb 5]
    hallojax demo    [--config configs/wan.py:demo] [--config.key=value ...]
    hallojax train   --config configs/wan.py:demo --workdir DIR [--config.train.steps=200 ...]
    hallojax generate --checkpoint DIR --image PORTRAIT --audio SPEECH --out OUT.mp4 [--prompt TEXT]
                     [--sampler euler|unipc|dpm++] [--steps N] [--shift S] [--guidance text=X,audio=Y]
                     [--long-video motion|overlap|continue] [--height H --width W] [--fps 25] [--seed S]
    hallojax eval    --checkpoint DIR --videos HELDOUT_DIR --out OUT_DIR [--max-seconds 2] [--side-by-side]
    hallojax info    [--config configs/wan.py:wan2.1-t2v-14b,mesh=fsdp] [--devices 64]
    hallojax compile --config PRESET --topology v5p:2x2x2 [--batch 32 --frames 21 --height 60 --width 104]
                     [--sample --guidance text=5]          one denoising step of generation instead
    hallojax bench   vae [--height 480 --width 832 --frames 17] [--vae DIR]
    hallojax bench   train [--config configs/wan.py:tiny --batch N --frames 3 --height 8 --width 8 --steps 5]
    hallojax synthetic OUT_DIR [--num-videos N --seed S]      synthetic talking faces (mp4 + sidecars)
    hallojax prepare VIDEO_DIR -o OUT_DIR [--frames 49 --size 256 --codec pixel:8|KIND:DIR]
                                                              (KIND: wan-vae, sd-vae, hunyuan-vae, cogvideox-vae)

Errors in user input (arguments, files, keys, shapes) print one clear message, `hallojax CMD: error: ...`,
and exit with status 2; argparse's own errors too (no usage block: `--help` prints it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hallojax.usage import USER_ERRORS, ArgumentParser, UsageError, print_error  # noqa: F401  (re-exported)


def _convert(args):
    from hallojax.convert import converter

    from hallojax.convert import SOURCES

    names = SOURCES.get(args.format, ("SRC",))
    if len(args.src) != len(names):
        raise UsageError("hallojax convert", f"convert {args.format} takes {' '.join(names)} OUT: "
                         f"{len(args.src) + 1} paths given")
    if args.weights and args.format != "letstalk":
        raise UsageError("hallojax convert", f"--weights is a letstalk option, not {args.format}'s")
    kw = {"weights": args.weights} if args.weights else {}  # letstalk: which state dict of the file
    out = converter(args.format, "convert")(*args.src, args.out, overwrite=args.overwrite, **kw)
    print(f"wrote {out}")


def _export(args):
    from hallojax.convert import converter

    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb {args.max_shard_gb}: must be positive")
    out = converter(args.format, "export")(args.ckpt, args.out, overwrite=args.overwrite,
                                           max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")


def _demo(args, overrides):
    from hallojax.config import load_config
    from hallojax.demo import run

    run(load_config(args.config, overrides))


def _train(args, overrides):
    """Flow-matching training; resumes from the latest checkpoint in --workdir."""
    from hallojax.config import load_config
    from hallojax.train import initialize_distributed, run

    config = load_config(args.config, overrides)
    if config.data.get("prepared"):  # a wrong directory is found before the model is built
        from data_pipeline.reader import load_manifest

        load_manifest(config.data.prepared)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    result = run(config, args.workdir)
    print(f"trained to step {result['step']}" + (" (preempted, saved)" if result["preempted"] else ""))


def _compile(args, overrides):
    """TPU fit check: compile the training step (or with --sample one denoising step of generation) ahead of
    time for a TPU topology (per-chip HBM, FLOPs, collective bytes)."""
    import shlex

    from hallojax.aot import compile_sample_step, compile_train_step
    from hallojax.config import load_config

    print("$ hallojax " + " ".join(shlex.quote(a) for a in args.argv))
    config = load_config(args.config, overrides)
    shape = dict(frames=args.frames, height=args.height, width=args.width, text_len=args.text_len)
    if args.sample:
        report = compile_sample_step(config, args.topology, batch=1 if args.batch is None else args.batch,
                                     guidance=args.guidance, **shape)
    elif args.guidance is not None:
        raise ValueError("--guidance is for --sample (the branches of a denoising step)")
    else:
        report = compile_train_step(config, args.topology, batch=8 if args.batch is None else args.batch, **shape)
    print("\n".join(report.lines()))
    return 0 if report.fits else 1


def _info(args, overrides):
    """Parameter count and per-device parameter memory of a preset on its mesh, from shapes only."""
    import jax
    import numpy as np
    from flax import nnx

    from hallojax.config import load_config
    from hallojax.models.wan import DiTConfig, abstract_model, param_count
    from hallojax.sharding import logical_to_spec, normalize_rules, resolve_mesh_shape, shard_shape

    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices {args.devices}: must be >= 1 (default: the devices present)")
    config = load_config(args.config, overrides)
    cfg = DiTConfig.from_dict(config.model)
    rules = normalize_rules(config.rules)
    mesh_shape = resolve_mesh_shape(dict(config.mesh), args.devices or jax.device_count())
    state = nnx.state(abstract_model(cfg), nnx.Param)
    per_device = 0
    for _, v in nnx.to_flat_state(state):
        spec = logical_to_spec(v.get_metadata().get("out_sharding") or (None,) * v.ndim, v.shape, rules, mesh_shape)
        per_device += int(np.prod(shard_shape(v.shape, spec, mesh_shape))) * np.dtype(v.dtype).itemsize
    total = param_count(state)
    print(f"preset {config.preset}: {total:,} parameters ({total * 4 / 2**30:.2f} GiB fp32)")
    print(f"mesh {mesh_shape}: {per_device / 2**30:.3f} GiB of parameters per device")


def _bench(args):
    from hallojax.bench import BENCHES, main

    if args.bench_args and args.bench_args[0] in BENCHES:
        args.command = f"bench {args.bench_args[0]}"  # its errors read "hallojax bench vae: error: ..."
    return main(args.bench_args)


def build_parser() -> ArgumentParser:
    """The `hallojax` parser: one subparser per command; `--config.*` overrides are left for `main`."""
    parser = ArgumentParser(prog="hallojax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = sub.choices

    from hallojax.convert import FORMATS

    p = sub.add_parser("convert", help="PyTorch weights -> a hallojax pretrained directory")
    p.add_argument("format", choices=sorted(FORMATS))
    p.add_argument("src", nargs="+", help="the source (echomimic-v3: BASE_DIR ECHO_FILE)")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--weights", choices=("ema", "model"), help="letstalk: the file's EMA (default) or raw weights")
    p.set_defaults(fn=_convert)

    p = sub.add_parser("export", help="a hallojax pretrained directory -> PyTorch weights")
    p.add_argument("format", choices=sorted(FORMATS))
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.set_defaults(fn=_export)

    for name, fn, default in (("demo", _demo, "configs/wan.py:demo"),
                              ("train", _train, "configs/wan.py:demo"),
                              ("info", _info, "configs/wan.py:wan2.1-t2v-1.3b"),
                              ("compile", _compile, "configs/wan.py:wan2.1-t2v-1.3b,remat=full")):
        p = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0] or "the embedded default job")
        p.add_argument("--config", default=default, help="FILE.py[:ARG], or a preset name")
        if name == "info":
            p.add_argument("--devices", type=int, help="device count for -1 mesh axes (default: those present)")
        if name == "compile":
            p.add_argument("--topology", required=True, help="TPU slice: v5p:2x2x2 (chip grid) or v5p-16")
            p.add_argument("--batch", type=int, help="global batch (default 8; --sample: videos per step, 1; "
                           "HunyuanVideo-Avatar: windows per step)")
            p.add_argument("--sample", action="store_true",
                           help="one denoising step of generation (all guidance branches) instead of a train step")
            p.add_argument("--guidance", help="--sample: the guidance spec (default: the config's sample.guidance)")
            p.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames: 21)")
            p.add_argument("--height", type=int, default=60, help="latent height (480 pixels: 60)")
            p.add_argument("--width", type=int, default=104, help="latent width (832 pixels: 104)")
            p.add_argument("--text-len", type=int, default=512, help="text tokens (Wan pads to 512)")
        if name == "train":
            p.add_argument("--workdir", required=True, help="checkpoints and logs; a rerun resumes from it")
            p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (or HALLOJAX_COORDINATOR)")
            p.add_argument("--num-processes", type=int, help="multi-host: process count (or HALLOJAX_NUM_PROCESSES)")
            p.add_argument("--process-id", type=int, help="multi-host: this process (or HALLOJAX_PROCESS_ID)")
        p.set_defaults(fn=fn, takes_overrides=True)

    from hallojax import generate

    p = sub.add_parser("generate", help="a portrait and a speech track -> a talking video (mp4 with the speech)")
    generate.add_arguments(p)
    p.set_defaults(fn=lambda a, o: generate.run(a, o), takes_overrides=True)

    from hallojax import evaluate

    p = sub.add_parser("eval", help="lip sync, identity and stability of generated videos on held-out speech")
    evaluate.add_arguments(p)
    p.set_defaults(fn=lambda a, o: evaluate.run(a, o), takes_overrides=True)

    import importlib

    for name in ("prepare", "synthetic"):  # the data pipeline's own commands
        module = importlib.import_module(f"data_pipeline.{name}")
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().split("\n")[0])
        module.add_arguments(p)
        p.set_defaults(fn=module.run)

    p = sub.add_parser("bench", help="benchmarks that print figures and their command (bench vae, train, sample)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_bench)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        overrides = [a for a in rest if a.startswith("--config.")]
        command_parser = parser.subcommands[args.command]  # its errors name it: hallojax convert: error: ...
        if len(overrides) != len(rest):
            command_parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")
        if overrides and not getattr(args, "takes_overrides", False):
            command_parser.error("takes no --config.* overrides")
    except UsageError as e:
        print_error("hallojax", e)
        return 2
    args.argv = argv

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if getattr(args, "takes_overrides", False):
            return args.fn(args, overrides) or 0
        result = args.fn(args)
        return result if isinstance(result, int) else 0
    except USER_ERRORS as e:
        print_error(f"hallojax {args.command}", e)
        return 2
    except RuntimeError as e:  # a run that stopped itself (train.nonfinite="stop"): not the user's input
        from hallojax.train import NonFiniteStep

        if not isinstance(e, NonFiniteStep):
            raise
        print_error(f"hallojax {args.command}", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())

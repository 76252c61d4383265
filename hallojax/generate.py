"""Generation: a portrait and a speech track in, a talking video with its audio out.

    hallojax generate --checkpoint runs/demo/train --image portrait.png --audio speech.wav --out talk.mp4

    from hallojax.generate import Pipeline
    pipe = Pipeline.load("runs/demo/train")                  # a train workdir or a converted directory
    result = pipe.generate("portrait.png", "speech.wav", steps=25, guidance="audio=3")
    result.frames                                            # uint8 [T, H, W, 3], T = round(duration x fps)
    pipe.save(result, "talk.mp4")                           # h264 + AAC mp4 (+ talk.json: settings, timings)

The entry point of generation, on top of the pipelines: `Pipeline.load` takes a `hallojax train` workdir or a
converted directory of any model kind and returns its pipeline (the Wan DiT's: `hallojax.pipeline.WanPipeline`,
whose module docstring describes the steps; Hallo3, LetsTalk, HunyuanVideo-Avatar:
`hallojax.generate_families.FamilyPipeline`), and `add_arguments` / `run` are `hallojax generate`.
"""

from __future__ import annotations

from pathlib import Path

import jax

from hallojax import generate_families
from hallojax.media import read_audio, read_image
from hallojax.pipeline import WanPipeline
from hallojax.sample import guidance as guidance_lib
from hallojax.sample import long_video
from hallojax.sample.solvers import SAMPLERS


class Pipeline(WanPipeline):
    """`Pipeline.load(checkpoint)`: the pipeline of any checkpoint's model kind (the Wan DiT's is this class)."""

    @classmethod
    def load(cls, checkpoint, **kw) -> WanPipeline:
        """A train workdir (or a step directory in it) or a converted directory; keyword arguments as
        `WanPipeline.load` (step, weights, codec, audio_features, text_encoder, tokenizer, fps, height, width,
        overrides, devices, image_encoder)."""
        if generate_families.family_kind(checkpoint) is not None:  # Hallo3 / LetsTalk / Avatar: their adapters
            return generate_families.FamilyPipeline.load(checkpoint, **kw)
        return super().load(checkpoint, **kw)


# --- command line --------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a `hallojax train` workdir (or a step directory in it), "
                   "or a converted directory")
    p.add_argument("--image", required=True, help="the portrait: png / jpg / webp, any size")
    p.add_argument("--audio", required=True, help="the speech: wav / flac / mp3 / m4a, any rate and channels")
    p.add_argument("--out", required=True, help="OUT.mp4 (and OUT.json beside it)")
    p.add_argument("--prompt", default=None, help="text prompt (needs --text-encoder and --tokenizer)")
    p.add_argument("--negative-prompt", default=None, help="the unconditional branches' prompt (default: null)")
    g = p.add_argument_group("sampling (defaults: the checkpoint's config.sample)")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="flow samplers for flow models; cogvideox-ddim / cogvideox-dpm / ddpm / ddim for VP (v or ε) "
                        "models (the model's config says which it is)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--shift", type=float, default=None,
                   help="flow shift of the σ schedule (cogvideox-*: the SNR shift; ddpm / ddim: 1)")
    g.add_argument("--guidance", default=None, help="e.g. text=4,audio=2.9 | text+audio=3.5 | a preset "
                   f"({', '.join(sorted(guidance_lib.PRESETS))}); see hallojax.sample.guidance")
    g.add_argument("--long-video", default=None, choices=["auto", *long_video.STRATEGIES, "shift"],
                   help="shift: HunyuanVideo-Avatar's time-aware position shift (its default)")
    g.add_argument("--overlap", type=int, default=None, help="latent frames shared by consecutive clips / windows")
    g.add_argument("--clip-frames", type=int, default=None, help="video frames per clip (1 + stride·k)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("media (defaults: what the model was trained on)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--fps", type=float, default=None)
    g.add_argument("--face-box", default=None, help="x0,y0,x1,y1 in image pixels (default: IMAGE.face.json "
                   "beside the image, else OpenCV's face detector, else a centre crop)")
    g.add_argument("--allow-silent", action="store_true", help="generate even if the audio is silent")
    g = p.add_argument_group("checkpoint and encoders")
    g.add_argument("--step", type=int, default=None, help="workdir: this checkpoint step (default: the latest)")
    g.add_argument("--weights", choices=["auto", "ema", "params"], default="auto",
                   help="workdir: EMA or raw weights (auto: EMA once it has warmed up)")
    g.add_argument("--codec", default=None, help="pixel:P | wan-vae:DIR | sd-vae:DIR | hunyuan-vae:DIR | "
                   "cogvideox-vae:DIR (default: the training run's)")
    g.add_argument("--audio-features", default=None, help="rms | wav2vec2:DIR (default: the training run's)")
    g.add_argument("--text-encoder", default=None, help="a converted umT5 / T5 directory")
    g.add_argument("--tokenizer", default=None, help="its local tokenizer directory")
    g.add_argument("--face-embedding", default=None, help="Hallo3: the portrait's InsightFace identity embedding, a "
                   ".npy of 512 float values (computed outside hallojax: README, Hallo3)")
    g.add_argument("--text-states", default=None, help="HunyuanVideo-Avatar: precomputed text states, an .npz "
                   "(text_states [L, D], optional text_mask / text_pooled and negative_*; README)")
    g.add_argument("--image-encoder", default=None, help="a `hallojax convert clip` directory (models with CLIP image "
                   "context: Wan I2V / Wan-Fun-InP / EchoMimicV3)")
    p.add_argument("--no-progress", action="store_true")


def run(args, overrides=()) -> int:
    """`hallojax generate`: errors in inputs are ValueError/OSError (the CLI prints one line, exits 2)."""
    for name in ("steps", "height", "width", "clip_frames"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: must be >= 0")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps}: must be positive")
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: the output is an mp4 file (name it .mp4)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory")
    read_image(args.image)  # unreadable inputs fail before a large model is loaded
    read_audio(args.audio)
    generate_families.preflight(args.checkpoint, args.face_embedding, args.text_states)
    pipe = Pipeline.load(args.checkpoint, step=args.step, weights=args.weights, codec=args.codec,
                         audio_features=args.audio_features, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         fps=args.fps, height=args.height, width=args.width, overrides=overrides,
                         image_encoder=args.image_encoder)
    extra = {} if args.face_embedding is None else {"face_embedding": args.face_embedding}
    if args.text_states is not None:
        extra["text_states"] = args.text_states
    result = pipe.generate(args.image, args.audio, prompt=args.prompt, negative_prompt=args.negative_prompt,
                           **extra, sampler=args.sampler, steps=args.steps, shift=args.shift, guidance=args.guidance,
                           long_video_strategy=args.long_video, overlap=args.overlap, clip_frames=args.clip_frames,
                           seed=args.seed, face_box=args.face_box, allow_silent=args.allow_silent,
                           progress=not args.no_progress)
    if jax.process_index() == 0:
        pipe.save(result, out)
        t = result.timings
        print(f"wrote {out} ({len(result.frames)} frames, {result.seconds:.2f} s at {result.fps:g} fps, "
              f"{result.settings['width']}x{result.settings['height']}, {len(result.plan.clips)} "
              f"{'windows' if result.plan.strategy == 'overlap' else 'clips'}) and {out.with_suffix('.json')}")
        print(f"encode {t['encode_s']:.2f} s / compile {t['compile_s']:.2f} s / denoise {t['denoise_s']:.2f} s / "
              f"decode {t['decode_s']:.2f} s / mux {t['mux_s']:.2f} s: {t['seconds_per_video_second']:.2f} s per "
              "second of video")
    return 0

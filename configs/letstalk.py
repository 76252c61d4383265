"""LetsTalk training presets (hallojax.models.letstalk; shared/research/hyavatar_letstalk.md C.3, C.6, C.7).

    hallojax train --config configs/letstalk.py:tiny --workdir runs/letstalk               # CI size, random batch
    hallojax train --config configs/letstalk.py:VDTcatlong-B,memory=2 --workdir runs/letstalk-long

    hallojax train --config configs/letstalk.py:lipsync-small --workdir runs/letstalk-lipsync   # learns lip sync

arg = MODEL[,memory=M][,objective=ddpm|flow][,mesh=MESH][,dtype=DTYPE][,remat=POLICY]. MODEL: a released model name
(VDTcat-{S,B,L,XL}/{2,4,8}, VDTcatlong-{S,B,L,XL}[/2|/4], at 256 px: latent 32 x 32 x 4, 16 frames),
tiny (VDTcatlong, memory bank of 2) or the recipe lipsync-small (below).
lipsync-small: a mini VDTcatlong (patch 2, 4-frame clips, memory bank of 1) trained from scratch on the
synthetic talking faces as configs/wan.py:lipsync-small is (24 people, `pixel:2` at 32 px -> 16 x 16 x 12
latents, per-frame RMS audio feature: 1 layer x 1 dim, face box x 1.2, batch 8, float32, EMA 0.99); prepared
clips hold M + F = 5 frames (the memory bank, then the clip). Unlike the release it trains with the Wan recipe's
flow-matching objective (model.prediction="flow", learn_sigma=False; sampled with UniPC, 25 steps, shift 3):
with the released DDPM objective (ε + learned variance) neither this model nor the Wan DiT learns lip sync at
this size (README "Does LetsTalk learn?"; `lipsync-small,objective=ddpm` trains it so).
It also trains the audio projector (its input, one RMS value per frame, is not wav2vec2's) and uses the Wan
recipe's optimizer (lr 3e-3, b2 0.99, grad clip 1.0).
memory: the memory bank's M latent frames (VDTcatlong; released train.yaml 0, sampling 2): with M > 0 the batch
carries the M frames before the clip, noised at DDPM t ~ U{0..49} and 25 %-masked in every step (as released).
As released: the ddpm objective (linear β 1e-4..0.02, ε + learned-range variance, hybrid loss), AdamW lr 1e-4,
betas (0.9, 0.999), weight decay 0, constant lr without warmup, grad clip 0.1 (released: only from step 20k),
EMA 0.9999, seed 3407, no condition dropout (sampled without guidance), and the audio projector not trained
(the released optimizer takes the backbone's parameters only).
"""

from pathlib import Path

from hallojax.config import load_config
from hallojax.models.letstalk import LetsTalkConfig


# objective= -> the model's output: the released ddpm (ε + learned variance) or flow (the lipsync-small default)
OBJECTIVES = {"ddpm": dict(prediction="epsilon", learn_sigma=True), "flow": dict(prediction="flow", learn_sigma=False)}

# the lipsync-small recipe's model (in_channels and the audio input sizes are then adopted from the prepared set)
LIPSYNC_SMALL = dict(variant="VDTcatlong", depth=2, hidden=64, num_heads=4, patch_size=2, latent_size=16,
                     num_frames=4, memory_frames=1, in_channels=12, audio_dim=16, audio_in_layers=1, audio_in_dim=1,
                     audio_window=2, audio_hidden=16, audio_tokens=4, dtype="float32", learn_sigma=False,
                     prediction="flow")


def get_config(arg: str = "tiny"):
    name, *opts = [s.strip() for s in (arg or "tiny").split(",")]
    opts = dict(o.split("=", 1) for o in opts if o)
    if set(opts) - {"mesh", "dtype", "remat", "memory", "objective"} or opts.get("objective", "ddpm") not in OBJECTIVES:
        raise ValueError(f"config arg {arg!r}: options are memory=, mesh=, dtype=, remat=, objective= "
                         f"({' or '.join(OBJECTIVES)})")
    model = {k: opts[k] for k in ("dtype", "remat") if k in opts}
    if "objective" in opts:
        model.update(OBJECTIVES[opts["objective"]])
    if "memory" in opts:
        model["memory_frames"] = int(opts["memory"])
    if name == "tiny":
        model.setdefault("dtype", "float32")
    if name == "lipsync-small":
        cfg = LetsTalkConfig(**{**LIPSYNC_SMALL, **model})
    else:
        cfg = LetsTalkConfig.named(name, **model)
    # the trainer's defaults (sharding rules, checkpoints, logging, the objective's sampling) from the Wan presets
    objective = "flow" if cfg.prediction == "flow" else "ddpm"
    config = load_config(f"{Path(__file__).with_name('wan.py')}:tiny,objective={objective},"
                         f"mesh={opts.get('mesh', 'fsdp')}")
    config.preset = f"letstalk-{name}"
    config.model = {"kind": "letstalk", **cfg.to_dict()}
    config.seed = 3407
    config.train.update(
        frames=cfg.num_frames, height=cfg.latent_size, width=cfg.latent_size, learning_rate=1e-4, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip=0.1, schedule="constant", warmup_steps=0, ema_decay=0.9999,
        objective=objective, shift=1.0, trainable=[r"^(?!audio_proj\.)"])
    if name == "lipsync-small":
        config.data.update(source="synthetic", workdir="runs/letstalk-lipsync", num_videos=24,
                           frames=cfg.num_frames + cfg.memory_frames, size=32, codec="pixel:2", audio_features="rms",
                           box_scale=1.2)
        config.train.update(steps=2600, batch_size=8, log_every=100, learning_rate=3e-3, b2=0.99, grad_clip=1.0,
                            ema_decay=0.99, trainable=[])
        config.checkpoint.update(every=650, keep=20)  # flow: sampled as the Wan recipe (UniPC, 25 steps, shift 3)
        if objective == "ddpm":
            config.sample.update(steps=50)
    elif name != "tiny":
        config.train.steps = 300_000
        config.checkpoint.every = 5000
    return config

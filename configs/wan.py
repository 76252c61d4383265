"""Wan2.1 DiT presets (model sizes as published; diffusers config names in hallojax.models.wan.DiTConfig).

    hallojax demo                                  # = configs/wan.py:demo (synthetic talking faces)
    hallojax demo  --config configs/wan.py:tiny,mesh=fsdp_tp --config.train.steps=20
    hallojax train --config configs/wan.py:lipsync-small --workdir runs/lipsync    # learns lip sync (~25 min)
    hallojax info  --config configs/wan.py:wan2.1-t2v-14b,mesh=fsdp

    hallojax info  --config configs/wan.py:hallo3-style,size=1.3b
    hallojax info  --config configs/wan.py:echomimic-v3-flash,size=1.3b

arg = PRESET[,size=SIZE][,mesh=MESH][,dtype=DTYPE][,remat=POLICY][,objective=OBJ]. PRESET is one of MODELS (backbones),
STYLES (portrait-animation presets on a backbone of SIZE: tiny or 1.3b), ECHOMIMIC (EchoMimicV3 as released,
SIZE tiny or 1.3b) or RECIPES (the mini portrait model on the synthetic talking faces: demo, lipsync-small);
MESH one of MESHES; OBJ one of OBJECTIVES (default flow: flow matching, as Wan; v: CogVideoX / Hallo3
v-prediction; ddpm: LetsTalk's ε + learned variance), which sets the model's prediction and the sampler.

    hallojax train --config configs/wan.py:hallo3-style,objective=v --workdir runs/v
"""

import dataclasses

import ml_collections

from hallojax.models.wan import DiTConfig
from hallojax.models.echomimic import VARIANTS
from hallojax.pipeline import SampleConfig
from hallojax.sharding import DEFAULT_RULES

# Only what differs from DiTConfig's defaults (Wan2.1-T2V-1.3B) is written here.
MODELS = {
    "tiny": dict(num_layers=2, num_heads=4, head_dim=16, ffn_dim=128, text_dim=32, freq_dim=64),
    "wan2.1-t2v-1.3b": dict(),
    "wan2.1-t2v-14b": dict(num_layers=40, num_heads=40, ffn_dim=13824),
    "wan2.1-i2v-14b": dict(num_layers=40, num_heads=40, ffn_dim=13824, in_channels=36, image_dim=1280,
                           added_kv_proj_dim=5120),
}

# Portrait-animation presets: each system's mechanisms as config choices on the Wan backbone.
# Audio sizes are the published ones at 1.3b and small at tiny (AUDIO_TINY).
STYLES = {
    # reference network + local audio cross-attention (window MLP, conv alignment) + motion frames
    "hallo3-style": dict(reference_net=True, audio="cross_attn", audio_align="conv", motion_frames=1,
                         motion_mode="channels"),
    # identity frame at t = -1 (+ additive identity path) + face-aware audio adapter every other block
    "hyavatar-style": dict(identity_tokens=True, identity_additive=True, audio="cross_attn", audio_every=2,
                           audio_align="group", audio_tokens=4, audio_face_mask=True),
    # masked multi-task input (36 channels) + decoupled cross-attention with frame-aligned local audio
    "echomimic-style": dict(in_channels=36, audio="decoupled", audio_align="group", audio_in_layers=1,
                            audio_window=0, audio_tokens=2, audio_neighbors=1, audio_face_mask=True),
    # symbiotic reference fusion + direct audio fusion
    "letstalk-style": dict(symbiotic=True, audio="cross_attn", audio_align="conv"),
}
# the guidance each system samples with (text terms drop out when no prompt is given)
STYLE_GUIDANCE = {"hallo3-style": "hallo3", "hyavatar-style": "hyavatar", "echomimic-style": "echomimic",
                  "letstalk-style": "audio=3"}
AUDIO_TINY = dict(audio_in_layers=2, audio_in_dim=8, audio_hidden=16, audio_tokens=2, audio_dim=16)
SIZES = {"tiny": "tiny", "1.3b": "wan2.1-t2v-1.3b"}

# EchoMimicV3 as released (hallojax.models.echomimic; shared/research/echomimic_v3.md): Wan2.1-Fun-1.3B-InP (36 input
# channels, CLIP image path) + decoupled audio K/V with the released projectors. `hallojax convert echomimic-v3`
# writes these configs; at size=tiny the widths shrink (2 tokens per frame stay: the preview's 50 Hz layout).
ECHOMIMIC = {f"echomimic-v3-{k}": v for k, v in VARIANTS.items()}
ECHOMIMIC_TINY = dict(image_dim=24, audio_in_dim=8, audio_hidden=16, audio_tokens=4)

# `make demo`: a mini portrait model (identity frame + audio cross-attention) trained from scratch on the
# synthetic talking faces, prepared with the lossless pixel codec (pixel:2 -> 12 channels, temporal
# stride 1) and the pipeline's per-frame RMS audio feature (1 layer x 1 dim). A token carries 2x2 latents
# x 12 channels = 48 values, fewer than the model's 64 dims: the velocity target ε − x0 is as wide as a
# token, so with pixel:4 (192 values per token through 64 dims) the loss stalls at ~0.7 and samples stay noise.
DEMO_MODEL = dict(MODELS["tiny"], in_channels=12, out_channels=12, identity_tokens=True, extra_gate_init=1.0,
                  audio="cross_attn", audio_align="group", audio_stride=1, audio_in_layers=1, audio_in_dim=1,
                  audio_window=2, audio_hidden=16, audio_tokens=4, audio_dim=16)

# Runs of the mini portrait model on the synthetic talking faces. lipsync-small: long enough to learn lip sync
# (README "Does it learn?"): 24 people, 5-frame clips (the mouth follows the audio frame by frame, so short
# clips teach it as well and cost less), a tighter crop around the face (box x 1.2: a bigger mouth), an EMA
# over ~100 steps (0.999's ~1000-step window lags a model still improving: r 0.74 against the weights' 0.92).
RECIPES = {
    "demo": {},
    "lipsync-small": {"data": dict(workdir="runs/lipsync", num_videos=24, frames=5, box_scale=1.2),
                      "train": dict(steps=3000, log_every=100, ema_decay=0.99),
                      "model": dict(dtype="float32")},  # a CPU recipe: float32 matmuls are the fast ones there
}

# train.objective -> what the model predicts and how `hallojax generate` samples it by default (hallojax.diffusion):
# v as Hallo3 (CogVideoX-5B: SNR shift 1, 50 steps of the stochastic DPM-Solver++(2M)), ddpm as LetsTalk
# (250 respaced ancestral steps)
OBJECTIVES = {
    "flow": dict(model={}, sample={}),
    "v": dict(model=dict(prediction="v"), sample=dict(sampler="cogvideox-dpm", steps=50, shift=1.0)),
    "ddpm": dict(model=dict(prediction="epsilon", learned_variance=True),
                 sample=dict(sampler="ddpm", steps=250, shift=1.0)),
}

# Mesh shapes over (data, fsdp, context, tensor); -1 fills the remaining devices.
MESHES = {
    "single": dict(data=1, fsdp=1, context=1, tensor=1),
    "dp": dict(data=-1),
    "fsdp": dict(fsdp=-1),
    "fsdp_tp": dict(fsdp=-1, tensor=2),
    "dp_context": dict(data=-1, context=2),
    "fsdp_context": dict(fsdp=-1, context=2),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    name, *opts = [s.strip() for s in (arg or "tiny").split(",")]
    opts = dict(o.split("=", 1) for o in opts if o)
    unknown = set(opts) - {"mesh", "dtype", "remat", "size", "objective"}
    known = name in MODELS or name in STYLES or name in ECHOMIMIC or name in RECIPES
    if not known or unknown or opts.get("size", "tiny") not in SIZES:
        presets = sorted(MODELS) + sorted(STYLES) + sorted(ECHOMIMIC) + sorted(RECIPES)
        raise ValueError(f"config arg {arg!r}: preset must be one of {presets}, "
                         f"options mesh=, dtype=, remat=, size= ({sorted(SIZES)}, styles only), objective= "
                         f"({sorted(OBJECTIVES)})")
    objective = opts.get("objective", "flow")
    if objective not in OBJECTIVES:
        raise ValueError(f"config arg {arg!r}: objective must be one of {sorted(OBJECTIVES)}")
    mesh = opts.get("mesh", "fsdp")
    if mesh not in MESHES:
        raise ValueError(f"config arg {arg!r}: mesh must be one of {sorted(MESHES)}")

    config = ml_collections.ConfigDict()
    config.preset = name
    if name in RECIPES:
        model = DiTConfig(**{**DEMO_MODEL, **RECIPES[name].get("model", {})}).to_dict()
    elif name in STYLES:
        size = opts.get("size", "tiny")
        style = dict(STYLES[name])
        if size == "tiny":
            style = {**style, **AUDIO_TINY, "audio_in_layers": min(style.get("audio_in_layers", 2), 2)}
        model = DiTConfig(**{**MODELS[SIZES[size]], **style}).to_dict()
    elif name in ECHOMIMIC:
        size = opts.get("size", "tiny")
        base = {**MODELS[SIZES[size]], **ECHOMIMIC[name], **(ECHOMIMIC_TINY if size == "tiny" else {})}
        dim = base.get("num_heads", DiTConfig.num_heads) * base.get("head_dim", DiTConfig.head_dim)
        if name.endswith("flash") and size == "tiny":
            base["audio_in_layers"] = 2
        model = DiTConfig(**base, added_kv_proj_dim=dim, audio_dim=dim).to_dict()
    else:
        model = DiTConfig(**MODELS[name]).to_dict()
    model.update({k: opts[k] for k in ("dtype", "remat") if k in opts}, **OBJECTIVES[objective]["model"])
    config.model = ml_collections.ConfigDict(model)

    config.mesh = ml_collections.ConfigDict({**dict(data=1, fsdp=1, context=1, tensor=1), **MESHES[mesh]})
    config.mesh_preset = mesh
    # logical axis -> mesh axes; one table serves every mesh shape (size-1 axes drop out)
    config.rules = [[k, v] for k, v in DEFAULT_RULES]

    config.seed = 0
    # training (hallojax train; frames/height/width/text_len: the batch of data.source=random)
    config.train = ml_collections.ConfigDict(dict(
        steps=8, batch_size=8, frames=3, height=8, width=8, text_len=16, learning_rate=3e-3, log_every=1,
        # optimizer (hallojax train): AdamW, warmup + cosine/constant, clipping, accumulation, EMA, freezing
        schedule="constant", warmup_steps=0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
        accum_steps=1, ema_decay=0.999,
        trainable=[],  # regexes over parameter paths; empty = train everything (e.g. ["audio"] for stage 2)
        init_from="",  # a converted directory or a train workdir whose weights start a fresh run
        init_weights="auto",  # init_from a workdir: auto (EMA once warmed up) / ema / params
        # flow (flow matching) | v (v-prediction, zero-terminal SNR) | ddpm (ε + learned variance, hybrid loss)
        objective=objective,
        # flow: σ from sigma_sampling, shifted by `shift`; v: `shift` is the SNR shift scale (CogVideoX-5B 1, -2B 3)
        sigma_sampling="logit_normal", shift=1.0,
        loss_weighting="none",  # none | sigma_sqrt | cosmap (per sample; see hallojax.flow)
        # per-sample tasks for the known-frame mask ([[task, probability], ...]; empty = all generated);
        # the loss covers generated frames only; masked-input models (2C + 4 channels) see the known frames
        mask_tasks=[],
        # condition dropout for classifier-free guidance (hallojax.conditioning.DropoutConfig)
        dropout=dict(p_text=0.0, p_audio=0.0, p_ref=0.0, phases=False, early_sigma=0.8, late_sigma=0.2,
                     late_drop=0.5),
        # a step whose loss or gradient is not finite: "skip" its update (parameters, optimizer state and EMA
        # stay; counted in the log) or "stop" with an error naming the step (nothing of it is saved)
        nonfinite="skip",
        inject_nonfinite=[],  # steps whose loss is made NaN on purpose (fault injection, for tests/drills)
    ))
    echomimic = name == "echomimic-style" or name in ECHOMIMIC
    # the published systems train with condition dropout (EchoMimicV3: phase-scheduled)
    if name in STYLES or name in ECHOMIMIC:
        config.train.dropout.update(p_text=0.1, p_audio=0.1, p_ref=0.05, phases=echomimic)
    if echomimic:  # masked multi-task training
        config.train.mask_tasks = [["t2v", 0.2], ["i2v", 0.5], ["continuation", 0.2], ["first_last", 0.1]]
    config.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, keep_every=0, async_save=True))
    # sampling defaults of `hallojax generate` for checkpoints of this preset (flags override); the style
    # presets guide as their system does (hallojax.sample.guidance.PRESETS); models trained without
    # condition dropout (the backbones, the demo) have no null branches to guide with
    sample = SampleConfig(guidance=STYLE_GUIDANCE.get(name, "none"), **OBJECTIVES[objective]["sample"])
    config.sample = ml_collections.ConfigDict(dataclasses.asdict(sample))
    # where batches come from (hallojax.data): "random" (a fixed random batch, for tests), "synthetic" (the
    # talking faces rendered and prepared into data.workdir) or "prepared" (a `hallojax prepare` directory:
    # data.prepared=DIR alone selects it, and the model's input sizes follow its manifest.json)
    config.data = ml_collections.ConfigDict(dict(
        source="synthetic" if name in RECIPES else "random", workdir="runs/demo", num_videos=6, frames=9, size=32,
        codec="pixel:2" if name in RECIPES else "pixel:4", audio_features="rms",
        box_scale=1.6,  # synthetic: the crop around the face box (prepare --box-scale)
        face_scale=3.0,  # face box scale for the face-aware audio mask
        prepared=""))
    config.overrides = []  # keys set on the command line (filled by hallojax.config.load_config)
    if name == "demo":
        config.train.steps = 200
        config.train.log_every = 20
        config.checkpoint.every = 100
    if name == "lipsync-small":
        config.data.update(RECIPES[name]["data"])
        config.train.update(RECIPES[name]["train"])
        config.checkpoint.update(every=500, keep=20)
    return config

"""Hallo3 training presets (hallojax.models.hallo3 on two CogVideoX-5B-I2V backbones; shared/research/hallo3.md §4).

    hallojax train --config configs/hallo3.py:stage2,size=tiny --workdir runs/hallo3-s2       # CI size, random batch
    hallojax compile --config configs/hallo3.py:stage2,mesh=fsdp,remat=full --topology v5p-16 --batch 8

arg = STAGE[,size=SIZE][,mesh=MESH][,dtype=DTYPE][,remat=POLICY]. STAGE: stage1 (both nets' self-attention
projections and post-attention norms + the face modules train) or stage2 (only the audio modules: projector and
per-layer audio cross-attention; the reference net frozen), as released. SIZE: hallo3 (the released model,
default) or tiny. The optimizer and dropouts are the released ones: AdamW lr 1e-5, betas (0.9, 0.95), eps 1e-8,
weight decay 1e-4, grad clip 0.1; v objective on the CogVideoX process (zero-terminal SNR, shift 1); condition
dropout to zeros per sample: text 0.1, audio 0.05 (stage 2; stage 1 has no audio: p 1), concat latent 0.05,
reference-net input 0.05. Batches: 49 frames at 480x720 -> latents 13 x 60 x 90 (hallojax.families).
The released stage 1 has no audio modules at all; here they exist, frozen, and see zero audio.
"""

from pathlib import Path

from hallojax.config import load_config
from hallojax.models.hallo3 import PRESETS, Hallo3Config

SIZES = {"hallo3": "hallo3", "tiny": "tiny"}
# trainable parameters by pattern (regexes over our paths; the released name-substring rule in brackets)
STAGES = {
    # ["attention" in both nets: query_key_value, dense, post_attention_layernorm] + ["face"]
    "stage1": dict(trainable=[r"^(denoiser|reference)\.blocks\.(attn1\.(to_q|to_k|to_v|to_out)|norm2\.norm)\.",
                              r"^cross\.face\.", r"^face_proj\."], p_audio=1.0),
    # ["audio"]: audio_proj, audio_attn, audio_input_layernorm
    "stage2": dict(trainable=[r"^audio_proj\.", r"^cross\.audio\."], p_audio=0.05),
}


def get_config(arg: str = "stage2,size=tiny"):
    name, *opts = [s.strip() for s in (arg or "stage2,size=tiny").split(",")]
    opts = dict(o.split("=", 1) for o in opts if o)
    if name not in STAGES or set(opts) - {"mesh", "dtype", "remat", "size"} or opts.get("size", "hallo3") not in SIZES:
        raise ValueError(f"config arg {arg!r}: expected one of {sorted(STAGES)}, options size= ({sorted(SIZES)}), "
                         "mesh=, dtype=, remat=")
    size = opts.get("size", "hallo3")
    # the trainer's defaults (sharding rules, checkpoints, logging, v-objective sampling) from the Wan presets
    config = load_config(f"{Path(__file__).with_name('wan.py')}:tiny,objective=v,mesh={opts.get('mesh', 'fsdp')}")
    model = {**PRESETS[SIZES[size]], **({"dtype": "float32"} if size == "tiny" else {})}
    model.update({k: opts[k] for k in ("dtype", "remat") if k in opts})
    cfg = Hallo3Config(**model)
    config.preset = f"hallo3-{name}"
    config.model = {"kind": "hallo3", **cfg.to_dict()}
    stage = STAGES[name]
    config.train.update(
        frames=cfg.sample_frames, height=cfg.sample_height, width=cfg.sample_width, text_len=cfg.text_len,
        learning_rate=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip=0.1, schedule="constant",
        warmup_steps=0, objective="v", shift=1.0, trainable=stage["trainable"])
    config.train.p_concat = 0.05  # the whole concat latent (reference + motion frames) zeroed
    config.train.dropout.update(p_text=0.1, p_audio=stage["p_audio"], p_ref=0.05)
    config.sample.guidance = "hallo3"
    if size != "tiny":
        config.train.steps = 30000
        config.train.batch_size = 8  # 8 GPUs x micro-batch 1 (ZeRO-2)
        config.checkpoint.every = 500
    return config

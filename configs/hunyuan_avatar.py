"""HunyuanVideo-Avatar training presets (hallojax.models.hunyuan_avatar; shared/research/hyavatar_letstalk.md B).

    hallojax train --config configs/hunyuan_avatar.py:tiny --workdir runs/hyavatar        # CI size, random batch

arg = MODEL[,mesh=MESH][,dtype=DTYPE][,remat=POLICY]. MODEL: hunyuan-avatar (the released 13B model; one window of
129 frames at 704 x 704 = 33 x 88 x 88 latents, 832 text tokens) or tiny. The rectified-flow objective, AdamW lr
1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, EMA 0.9999 (`hallojax compile` sizes this step).
The batch (hallojax.families): latents, ref latents, whisper windows, face mask, LLaVA text states + pooled.
"""

from pathlib import Path

from hallojax.config import load_config
from hallojax.models.hunyuan_avatar import preset


def get_config(arg: str = "tiny"):
    name, *opts = [s.strip() for s in (arg or "tiny").split(",")]
    opts = dict(o.split("=", 1) for o in opts if o)
    if set(opts) - {"mesh", "dtype", "remat"}:
        raise ValueError(f"config arg {arg!r}: options are mesh=, dtype=, remat=")
    model = {k: opts[k] for k in ("dtype", "remat") if k in opts}
    if name == "tiny":
        model.setdefault("dtype", "float32")
    cfg = preset(name, **model)
    config = load_config(f"{Path(__file__).with_name('wan.py')}:tiny,mesh={opts.get('mesh', 'fsdp')}")
    config.preset = f"hunyuan-avatar-{name}"
    config.model = {"kind": "hunyuan-avatar", **cfg.to_dict()}
    sizes = dict(frames=3, height=4, width=4, text_len=5) if name == "tiny" else dict(frames=33, height=88, width=88,
                                                                                        text_len=832)
    config.train.update(**sizes, learning_rate=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                        ema_decay=0.9999, objective="flow")
    if name != "tiny":
        config.train.steps = 100_000
    # the released sampling recipe (what `hallojax compile --sample` batches: the guidance's 2 live branches)
    config.sample.update(sampler="euler", steps=50, shift=5.0, guidance="hunyuan-avatar")
    return config

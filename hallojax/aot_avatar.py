"""Ahead-of-time TPU fit checks for HunyuanVideo-Avatar (`hallojax.aot`'s machinery: topology, mesh, compile,
memory and collective report), which `hallojax train` cannot build yet (its trainer builds the Wan DiT).

    python -m hallojax.aot_avatar train  --topology v5p-32 --batch 32 --remat offload_layer_input
    python -m hallojax.aot_avatar sample --topology v5e-8 --context 8

Training: the Avatar's forward + backward under the same sharding rules as `hallojax train` (DEFAULT_RULES:
FSDP over (data, fsdp), heads / MLP over tensor, tokens over context), a rectified-flow MSE (target
noise − x0) and an AdamW update with the trainer's state: float32 parameters, EMA and both moments (16 bytes
a parameter), donated. Sampling: one denoising step of one window, the released guidance's 2 branches
(cond / uncond) batched as 2 rows, bf16 weights. Sizes: 704x704 x 129 frames = 33x88x88 latents, 63,888
video tokens + 1,936 reference-frame tokens + the LLaVA text (831 tokens as released; 832 = 831 + 1 pad
so that the joint sequence splits over 8 context shards). Splash attention takes no text mask (the pad
token is attended: immaterial to memory).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax.aot import FitReport, _compile, _topology, fit_hints
from hallojax.models.hunyuan_avatar import HunyuanAvatar, HunyuanAvatarConfig, avatar_flops, preset
from hallojax.sharding import DEFAULT_RULES, batch_sharding, normalize_rules, state_shardings

LR, B1, B2, EPS, WD, EMA = 1e-5, 0.9, 0.999, 1e-8, 0.01, 0.9999


def _inputs(cfg, batch, frames, height, width, text_len, mesh, rules, dtype=jnp.float32):
    lat = (batch, frames, height, width, cfg.in_channels)
    shapes = dict(lat=lat, ref=lat, noise=lat, sigma=(batch,),
                  text=(batch, text_len, cfg.text_dim), pooled=(batch, cfg.pooled_dim),
                  audio=(batch, 4 * frames - 3, cfg.audio_window, cfg.audio_layers, cfg.audio_channels),
                  face=(batch, frames * (height // 2) * (width // 2)))
    return {k: jax.ShapeDtypeStruct(s, dtype, sharding=batch_sharding(mesh, s, rules)) for k, s in shapes.items()}


def _abstract(cfg, mesh, rules):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: HunyuanAvatar(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    sh = state_shardings(params, mesh, rules)
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(params),
                          nnx.to_pure_dict(sh))
    return graphdef, params


def _report(cfg, name, mesh, kind, spec, batch, shape, flops, **kw) -> FitReport:
    f, h, w = shape
    return FitReport(topology=name, chips=mesh.size, device_kind=kind, mesh=dict(mesh.shape), batch=batch, shape=shape,
                     tokens_per_sample=f * (h // 2) * (w // 2), fits=False, hbm_gib=spec[1] if spec else None,
                     flops_per_step=flops, **kw)


def _hints(hints):
    """`hallojax compile`'s levers, spelled as this module's flags."""
    return tuple(h.replace("--config.train.accum_steps", "--accum").replace("--config.model.remat", "--remat")
                 for h in hints if "attention" not in h)


def _config(mesh_shape: dict):
    import ml_collections

    return ml_collections.ConfigDict({"mesh": mesh_shape})


def compile_avatar_train(topology: str, *, batch: int = 32, frames: int = 33, height: int = 88, width: int = 88,
                         text_len: int = 832, remat: str = "full", accum: int = 1, mesh: dict | None = None,
                         cfg: HunyuanAvatarConfig | None = None) -> FitReport:
    if batch % accum:
        raise ValueError(f"--batch {batch} must divide by --accum {accum}")
    cfg = (cfg or preset("hunyuan-avatar")).replace(remat=remat, attention="splash", dtype="bfloat16",
                                                    param_dtype="float32")
    name, mesh, kind, spec = _topology(_config(mesh or {"fsdp": -1}), topology)
    rules = normalize_rules(DEFAULT_RULES)
    graphdef, params = _abstract(cfg, mesh, rules)
    state = dict(params=params, ema=params, mu=params, nu=params)
    data = _inputs(cfg, batch, frames, height, width, text_len, mesh, rules)
    report = _report(cfg, name, mesh, kind, spec, batch, (frames, height, width),
                     3 * avatar_flops(cfg, batch, frames, height, width, text_len) * (1 + (remat != "none") / 3))

    def step(state, b):
        def loss_fn(p, b=b):
            model = nnx.merge(graphdef, nnx.State(p))
            s = b["sigma"][:, None, None, None, None]
            x_t = (1 - s) * b["lat"] + s * b["noise"]
            v = model(x_t, b["sigma"] * 1000, b["text"], b["pooled"], b["ref"], b["audio"], face_mask=b["face"])
            return jnp.mean((v.astype(jnp.float32) - (b["noise"] - b["lat"])) ** 2)

        if accum == 1:
            loss, g = jax.value_and_grad(loss_fn)(state["params"])
        else:  # micro-batches: each chip's rows in `accum` slices, gradients summed (the same optimizer step)
            # micro-batch j = rows j, j + accum, ...: every chip's contiguous rows split locally, no traffic
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), b)

            def one(acc, mb):
                loss, g = jax.value_and_grad(loss_fn)(state["params"], mb)
                return jax.tree.map(jnp.add, acc, (loss / accum, jax.tree.map(lambda x: x / accum, g))), None

            zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss, g), _ = jax.lax.scan(one, zero, micro)
        mu = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g, state["mu"], g)
        nu = jax.tree.map(lambda n, g: B2 * n + (1 - B2) * g * g, state["nu"], g)
        p = jax.tree.map(lambda p, m, n: p - LR * (m / (jnp.sqrt(n) + EPS) + WD * p), state["params"], mu, nu)
        ema = jax.tree.map(lambda e, p: EMA * e + (1 - EMA) * p, state["ema"], p)
        return dict(params=p, ema=ema, mu=mu, nu=nu), loss

    shardings = jax.tree.map(lambda a: a.sharding, state)
    jitted = jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)
    hints = _hints(fit_hints(cfg, accum, batch / mesh.size))
    return _compile(report, lambda: jitted.lower(state, data), mesh, rules, hints)


def compile_avatar_sample(topology: str, *, branches: int = 2, frames: int = 33, height: int = 88, width: int = 88,
                          text_len: int = 832, mesh: dict | None = None,
                          cfg: HunyuanAvatarConfig | None = None) -> FitReport:
    cfg = (cfg or preset("hunyuan-avatar")).replace(attention="splash", dtype="bfloat16", param_dtype="bfloat16")
    name, mesh, kind, spec = _topology(_config(mesh or {"fsdp": 1, "context": -1}), topology)
    rules = normalize_rules(DEFAULT_RULES)
    graphdef, params = _abstract(cfg, mesh, rules)
    data = _inputs(cfg, branches, frames, height, width, text_len, mesh, rules)
    report = _report(cfg, name, mesh, kind, spec, 1, (frames, height, width),
                     avatar_flops(cfg, branches, frames, height, width, text_len), branches=branches)

    def step(p, b):  # one guided Euler step: v_u + w (v_c − v_u), x += v dσ
        v = nnx.merge(graphdef, nnx.State(p))(b["lat"], b["sigma"] * 1000, b["text"], b["pooled"], b["ref"],
                                               b["audio"], face_mask=b["face"], mask_scale=0.6)
        v = v.astype(jnp.float32)
        guided = v[1:] + 6.5 * (v[:1] - v[1:])
        return b["lat"][:1] + guided * (-0.02)

    return _compile(report, lambda: jax.jit(step).lower(params, data), mesh, rules,
                    ("tokens over more chips: --context N", "more chips"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hallojax.aot_avatar", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("train", "sample"))
    ap.add_argument("--topology", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=88)
    ap.add_argument("--width", type=int, default=88)
    ap.add_argument("--text-len", type=int, default=832)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    ap.add_argument("--fsdp", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--tensor", type=int, default=None)
    ap.add_argument("--preset", default="hunyuan-avatar")
    a = ap.parse_args(argv)
    mesh = {k: v for k, v in (("fsdp", a.fsdp), ("context", a.context), ("tensor", a.tensor)) if v is not None}
    if mesh and not any(v == -1 for v in mesh.values()) and "fsdp" not in mesh:
        mesh["fsdp"] = -1
    cfg = preset(a.preset)
    if a.what == "train":
        r = compile_avatar_train(a.topology, batch=a.batch, frames=a.frames, height=a.height, width=a.width,
                                 text_len=a.text_len, remat=a.remat, accum=a.accum, mesh=mesh or None, cfg=cfg)
    else:
        r = compile_avatar_sample(a.topology, frames=a.frames, height=a.height, width=a.width, text_len=a.text_len,
                                  mesh=mesh or None, cfg=cfg)
    print("\n".join(r.lines()))
    print(f"parameters {sum(int(np.prod(v.shape)) for v in jax.tree.leaves(_abstract_count(cfg))):,}")
    return 0 if r.fits else 1


def _abstract_count(cfg):
    return nnx.state(nnx.eval_shape(lambda: HunyuanAvatar(cfg, rngs=nnx.Rngs(0))), nnx.Param)


if __name__ == "__main__":
    raise SystemExit(main())

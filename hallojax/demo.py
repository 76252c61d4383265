"""The embedded default job.

`hallojax demo` (configs/wan.py:demo): synthetic talking-face videos (mp4, h264 + AAC) are rendered,
prepared by the data pipeline into ArrayRecord shards (lossless pixel codec, per-frame audio RMS
features), and a mini portrait model (tiny Wan DiT + identity frame + audio cross-attention) is sharded
over every device, checked against an unsharded copy on one batch, and trained with flow matching on
the clips. With `--config configs/wan.py:tiny` it trains on a fixed random batch instead (the tests).
The batches come from `hallojax.data`, the training from `hallojax.train`: the demo stands on both.

    hallojax demo
    hallojax demo --config configs/wan.py:tiny,mesh=fsdp_tp --config.train.steps=20
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hallojax import data, train
from hallojax.data import load_clips, synthetic_batch
from hallojax.models.wan import DiTConfig, WanDiT, param_count
from hallojax.sharding import batch_sharding, create_sharded, make_mesh, normalize_rules, use_rules

log = logging.getLogger("hallojax.demo")


def run(config) -> dict:
    if config.data.source != "random" or config.data.prepared:
        return run_synthetic(config)
    cfg = DiTConfig.from_dict(config.model)
    rules = normalize_rules(config.rules)
    mesh = make_mesh(dict(config.mesh))
    log.info("devices: %d x %s; mesh %s", jax.device_count(), jax.devices()[0].platform, dict(mesh.shape))

    model = create_sharded(lambda: WanDiT(cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
    log.info("model %s: %s parameters, %d layers, dim %d, compute %s, params %s", config.preset,
             f"{param_count(model):,}", cfg.num_layers, cfg.dim, cfg.dtype, cfg.param_dtype)
    kernels = [(p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if p[-1] == "kernel" and p[0] in ("blocks", "proj_out")]
    for path, arr in kernels[:3]:
        log.info("  %-28s global %-16s shard %s", ".".join(map(str, path)), arr.shape,
                 arr.addressable_shards[0].data.shape)

    lat, ctx = synthetic_batch(cfg, config.train, config.seed)
    lat_s = jax.device_put(lat, batch_sharding(mesh, lat.shape, rules))
    ctx_s = jax.device_put(ctx, batch_sharding(mesh, ctx.shape, rules))
    t = jnp.linspace(50.0, 950.0, lat.shape[0])

    @nnx.jit
    def forward(m, x, t, c):
        return m(x, t, c)

    with jax.set_mesh(mesh), use_rules(rules):
        y_sharded = np.asarray(forward(model, lat_s, t, ctx_s), np.float32)
    graphdef, state = nnx.split(model)
    single = nnx.merge(graphdef, jax.device_get(state))  # same weights, on one device, no rules
    y_single = np.asarray(forward(single, lat, t, ctx), np.float32)
    diff = float(np.max(np.abs(y_sharded - y_single)))
    log.info("sharded forward %s (max |y| %.3g) vs single-device forward: max |diff| = %.3g",
             y_sharded.shape, float(np.abs(y_single).max()), diff)

    losses = _train(config)["losses"]
    log.info("loss %.4f -> %.4f over %d steps", losses[0], losses[-1], len(losses))
    return {"forward_max_diff": diff, "forward_max_abs": float(np.abs(y_single).max()), "losses": losses,
            "mesh": dict(mesh.shape), "params": param_count(model)}


def _train(config) -> dict:
    """The real trainer, from scratch in <data.workdir>/train (a demo run does not resume)."""
    import shutil
    from pathlib import Path

    train_dir = Path(config.data.workdir) / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    return train.run(config, train_dir)


def run_synthetic(config) -> dict:
    """The synthetic talking-face demo (see the module docstring): data pipeline -> a sharded forward
    checked against one device -> `hallojax.train` for `train.steps` steps with checkpoints."""
    from pathlib import Path

    DiTConfig.from_dict(config.model)  # a bad model or mesh is refused before any data is prepared
    rules = normalize_rules(config.rules)
    mesh = make_mesh(dict(config.mesh))
    data.configure(config)  # renders and prepares the clips; the model's input sizes follow them
    cfg = DiTConfig.from_dict(config.model)
    clips = load_clips(config.data.prepared)
    n, f, h, w, c = clips["latents"].shape
    log.info("data: %d clips of %d frames, latents %s, audio features %s; mesh %s", n, f, (h, w, c),
             clips["audio"].shape[2:], dict(mesh.shape))

    # one sharded forward against the same weights on one device
    bs = min(config.train.batch_size, n)
    model = create_sharded(lambda: WanDiT(cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
    first = {k: v[:bs] for k, v in clips.items()}
    args = (first["latents"], np.linspace(50.0, 950.0, bs).astype(np.float32),
            np.zeros((bs, 1, cfg.text_dim), np.float32))  # no text encoder in the demo: the null prompt
    kw = dict(reference=first["reference"], audio=first["audio"])
    forward = nnx.jit(lambda m, a, k: m(*a, **k))
    with jax.set_mesh(mesh), use_rules(rules):
        put = lambda a: jax.device_put(a, batch_sharding(mesh, a.shape, rules))  # noqa: E731
        y_sharded = np.asarray(forward(model, tuple(put(a) for a in args), {k: put(v) for k, v in kw.items()}),
                               np.float32)
    graphdef, state = nnx.split(model)
    y_single = np.asarray(forward(nnx.merge(graphdef, jax.device_get(state)), args, kw), np.float32)
    diff = float(np.max(np.abs(y_sharded - y_single)))
    log.info("sharded forward vs single-device forward: max |diff| = %.3g (max |y| %.3g)", diff,
             float(np.abs(y_single).max()))

    result = _train(config)
    train_dir = Path(config.data.workdir) / "train"
    losses = result["losses"]
    k = max(1, len(losses) // 5)
    head, tail = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    log.info("loss over %d steps: first %d mean %.4f -> last %d mean %.4f; checkpoints in %s", len(losses), k,
             head, k, tail, train_dir / "checkpoints")
    out = {"forward_max_diff": diff, "forward_max_abs": float(np.abs(y_single).max()), "losses": losses,
           "loss_head": head, "loss_tail": tail, "clips": n, "mesh": dict(mesh.shape), "params": param_count(model)}
    out.update(generate_heldout(config, train_dir))
    return out


def heldout_person(workdir, seed: int):
    """A synthetic person and speech the demo never trained on (another seed): (portrait png with its face
    sidecar, the speech, the ground-truth mouth opening per frame)."""
    import json
    from pathlib import Path

    import av
    from PIL import Image

    from data_pipeline import synthetic

    out = Path(workdir) / "heldout"
    video = synthetic.make_video(out, 0, seed + 1000)
    with av.open(str(video)) as c:
        Image.fromarray(next(c.decode(video=0)).to_ndarray(format="rgb24")).save(out / "portrait.png")
    (out / "portrait.face.json").write_text((out / "talk_00000.face.json").read_text())
    truth = json.loads((out / "talk_00000.mouth.json").read_text())["mouth_open"]
    return out / "portrait.png", video, np.asarray(truth)


def lipsync(frames: np.ndarray, box, truth: np.ndarray) -> float:
    """Pearson r between the mouth opening measured on generated frames and the speech's true track."""
    from data_pipeline.synthetic import lipsync_correlation, measure_mouth_opening

    n = min(len(frames), len(truth))
    return lipsync_correlation(measure_mouth_opening(frames[:n], box), truth[:n])


def generate_heldout(config, train_dir) -> dict:
    """The end of the demo: a talking video from the model just trained, of a portrait and speech it never
    saw, with the lip-sync correlation of the result against that speech's ground-truth mouth track."""
    import time
    from pathlib import Path

    from hallojax.generate import Pipeline

    t0 = time.perf_counter()
    portrait, speech, truth = heldout_person(config.data.workdir, config.seed)
    pipe = Pipeline.load(train_dir)
    result = pipe.generate(portrait, speech, seed=config.seed)
    path = pipe.save(result, Path(config.data.workdir) / "talk.mp4")
    r = lipsync(result.frames, result.portrait.box, truth)
    seconds = time.perf_counter() - t0
    log.info("generated %s: %.2f s of video from an unseen portrait and unseen speech in %.1f s (%s)", path,
             result.seconds, seconds, ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in result.timings.items()
                                                if k in ("encode_s", "compile_s", "denoise_s", "decode_s")))
    log.info("lip sync: r = %.3f between the generated mouth opening and the speech's true track (1 = in sync, "
             "0 = unrelated; %d training steps are not expected to learn sync)", r, config.train.steps)
    return {"video": str(path), "lipsync_r": r, "generate_s": seconds}

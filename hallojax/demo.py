"""The embedded default job: a tiny Wan DiT, sharded over every device, one forward checked against an
unsharded copy, then a few flow-matching training steps on a fixed synthetic batch.

    hallojax demo                                   # configs/wan.py:tiny, FSDP over all devices
    hallojax demo --config configs/wan.py:tiny,mesh=fsdp_tp --config.train.steps=20
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hallojax.dit import DiTConfig, WanDiT, param_count
from hallojax.flow import flow_matching_loss
from hallojax.sharding import batch_sharding, create_sharded, make_mesh, normalize_rules, shard_module, use_rules

log = logging.getLogger("hallojax.demo")


def synthetic_batch(cfg: DiTConfig, train, seed: int):
    """A fixed batch of smooth latents (low-frequency patterns) and random text states."""
    rng = np.random.default_rng(seed)
    b, f, h, w = train.batch_size, train.frames, train.height, train.width
    grid = np.stack(np.meshgrid(np.linspace(0, 1, f), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij"))
    freqs = rng.normal(size=(b, cfg.in_channels, 3)) * 3
    phase = rng.uniform(0, 2 * np.pi, size=(b, cfg.in_channels))
    lat = np.sin(np.einsum("bcx,xfhw->bfhwc", freqs, grid) + phase[:, None, None, None, :])
    ctx = rng.normal(size=(b, train.text_len, cfg.text_dim))
    return lat.astype(np.float32), ctx.astype(np.float32)


def run(config) -> dict:
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

    tx = optax.adamw(config.train.learning_rate, b1=0.9, b2=0.99, weight_decay=0.0)
    # optimizer moments inherit the parameters' logical axes; place them (and the step count) on the mesh
    optimizer = shard_module(nnx.Optimizer(model, tx, wrt=nnx.Param), mesh, rules)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, x0, c, rng):
        loss, grads = nnx.value_and_grad(lambda m: flow_matching_loss(m, x0, c, rng))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    rng = jax.random.key(config.seed)  # one fixed noise draw: the curve then shows the model fitting it
    with jax.set_mesh(mesh), use_rules(rules):
        for step in range(config.train.steps):
            t0 = time.perf_counter()
            loss = float(train_step(model, optimizer, lat_s, ctx_s, rng))
            losses.append(loss)
            if step % config.train.log_every == 0 or step == config.train.steps - 1:
                log.info("step %3d  loss %.4f  (%.2fs)", step, loss, time.perf_counter() - t0)
    log.info("loss %.4f -> %.4f over %d steps", losses[0], losses[-1], len(losses))
    return {"forward_max_diff": diff, "forward_max_abs": float(np.abs(y_single).max()), "losses": losses, "mesh": dict(mesh.shape), "params": param_count(model)}

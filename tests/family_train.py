"""Shared checks of the trainer on a model family (hallojax.families): train steps of a config's tiny model
on one device and on 8 (FSDP), from the same random batch its source gives."""

import jax
import numpy as np

from hallojax import families
from hallojax.sharding import batch_sharding, make_mesh, normalize_rules, use_rules
from hallojax.train import create_state, jit_train_step


def source_batch(config) -> dict:
    cfg = families.model_config(config.model)
    return next(families.make_source(config, cfg, list(range(config.train.batch_size))))


def train_steps(config, batch: dict, devices, shape: dict, steps: int):
    """(initial state, [(loss, grad_norm, state)] after each step) as numpy, on a mesh of `shape`."""
    cfg = families.model_config(config.model)
    rules = normalize_rules(config.rules)
    mesh = make_mesh({**dict(data=1, fsdp=1, context=1, tensor=1), **shape},
                     devices[:1] if shape == {} else devices)
    graphdef, state, shardings, _ = create_state(cfg, config.train, config.seed, mesh, rules)
    init = jax.device_get(state)
    step = jit_train_step(graphdef, cfg, config.train, config.seed, shardings)
    out = []
    with jax.set_mesh(mesh), use_rules(rules):
        b = {k: jax.device_put(v, batch_sharding(mesh, v.shape, rules)) for k, v in batch.items()}
        for _ in range(steps):
            state, metrics = step(state, b)
            out.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state)))
    return init, out


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_step(one, eight, rtol=2e-4, atol=1e-6):
    """One step on 1 and on 8 devices: loss and gradient norm within 1e-5, every parameter's update within
    rtol/atol (Adam with eps = 1 makes the first update about lr·g: the deltas compare the gradients)."""
    (init, [(l1, g1, s1)]), (_, [(l8, g8, s8)]) = one, eight
    np.testing.assert_allclose([l8, g8], [l1, g1], rtol=1e-5)
    p0, p1, p8 = leaves(init["params"]), leaves(s1["params"]), leaves(s8["params"])
    for k in p0:
        np.testing.assert_allclose(p8[k] - p0[k], p1[k] - p0[k], rtol=rtol, atol=atol, err_msg=k)


def one_and_eight(spec: str, overrides, devices, steps: int):
    """(config, batch, `steps` steps on 1 device, 1 step with FSDP over 8) of a config and its source's batch."""
    from hallojax.config import load_config

    config = load_config(spec, overrides)
    batch = source_batch(config)
    return config, batch, train_steps(config, batch, devices, {}, steps), train_steps(config, batch, devices,
                                                                                       {"fsdp": 8}, 1)

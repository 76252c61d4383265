"""Adding conditioning onto a converted base model: the adapted model starts from the base weights.

`load_base(model, base)` copies every base parameter into the same path of `model` (a model of the
same backbone with conditioning mechanisms switched on), widens the patch embedding when the adapted
model takes more input channels (motion/mask channels; the new rows are set to zero), and
initialises Hallo3's reference network from the backbone (`reference_blocks` <- `blocks`,
`reference_embedding` <- `patch_embedding`). Everything else (audio adapters, identity projections,
attention gates) keeps its zero initialisation, so the adapted model's output equals the base model's
bit for bit until it trains (`tests/test_dit_conditioning.py` proves it).

    base, _ = load_pretrained("ckpt/wan2.1-t2v-1.3b", dtype="float32")
    model = WanDiT(cfg_with_audio, rngs=nnx.Rngs(0))
    load_base(model, base)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from hallojax.checkpoint import flat_params

# adapted-model path prefix -> base path prefix, for parts initialised from the backbone
FROM_BACKBONE = {"reference_blocks.": "blocks.", "reference_embedding.": "patch_embedding."}


def load_base(model: nnx.Module, base: nnx.Module | Mapping[str, Any]) -> dict[str, list[str]]:
    """Copy `base` (a module or {dotted path: array}) into `model` in place. Returns a report
    {"copied", "widened", "from_backbone", "kept_init"} of dotted paths; raises on a base parameter the
    model has no place for or whose shape cannot be matched."""
    base_params = flat_params(base) if isinstance(base, nnx.Module) else dict(base)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    by_name = {".".join(map(str, k)): v for k, v in flat.items()}
    report: dict[str, list[str]] = {"copied": [], "widened": [], "from_backbone": [], "kept_init": []}
    problems = []

    def put(path: str, value, kind: str):
        var = by_name[path]
        target = var.get_value()
        value = jnp.asarray(value, target.dtype)
        if value.shape == target.shape:
            var.set_value(value)
        elif (value.ndim == target.ndim and value.shape[:-2] == target.shape[:-2]
              and value.shape[-1] == target.shape[-1] and value.shape[-2] < target.shape[-2]):
            # more input channels in the adapted model (mask, masked video, motion): copy the base rows and
            # zero the new ones, so the added channels contribute nothing until trained
            var.set_value(jnp.zeros_like(target).at[..., : value.shape[-2], :].set(value))
            kind = "widened"
        else:
            problems.append(f"{path}: base {tuple(value.shape)} vs model {tuple(target.shape)}")
            return
        report[kind].append(path)

    for path, value in base_params.items():
        if path not in by_name:
            problems.append(f"{path}: not in the adapted model")
            continue
        put(path, value, "copied")
    for dst_prefix, src_prefix in FROM_BACKBONE.items():
        for path in by_name:
            if path.startswith(dst_prefix):
                src = src_prefix + path[len(dst_prefix):]
                if src in base_params:
                    put(path, base_params[src], "from_backbone")
    if problems:
        raise ValueError("cannot load the base model into the adapted model:\n  " + "\n  ".join(problems))
    done = set().union(*report.values())
    report["kept_init"] = sorted(set(by_name) - done)
    nnx.update(model, state)
    return report

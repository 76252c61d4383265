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

`merge_base` is the same on {dotted path: array} dicts (the trainer's `train.init_from`: a converted directory or
another run's weights into a fresh training state, sharded as the state is), with `BASE_MAPS` for a base of
another kind: CogVideoX into both of Hallo3's nets, the HunyuanVideo trunk into HunyuanVideo-Avatar.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from hallojax.checkpoint import flat_params

# adapted-model path prefix -> base path prefix, for parts initialised from the backbone
FROM_BACKBONE = {"reference_blocks.": "blocks.", "reference_embedding.": "patch_embedding."}


# (base kind, adapted kind) -> ((base prefix, adapted prefix) pairs: where the base's parameters go; base
# prefixes with no place in the adapted model, left out). Same kind (or a Wan DiT onto a Wan DiT): ("", "").
BASE_MAPS: dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    # Hallo3 stage 1 starts both nets from CogVideoX-5B-I2V (the released `ref_net_path` loads it twice)
    ("cogvideox", "hallo3"): ((("", "denoiser."), ("", "reference.")), ()),
    # HunyuanVideo-Avatar from the HunyuanVideo trunk (the Avatar has no guidance embedding)
    ("hunyuan-video", "hunyuan-avatar"): ((("", ""),), ("guidance_embedder.",)),
}


def base_map(base_kind: str, kind: str):
    if base_kind == kind:
        return (("", ""),), ()
    if (base_kind, kind) not in BASE_MAPS:
        raise ValueError(f"a {base_kind} model cannot initialise a {kind} model (known: same kind, "
                         f"{', '.join(f'{a} -> {b}' for a, b in BASE_MAPS)})")
    return BASE_MAPS[base_kind, kind]


def merge_base(params: Mapping[str, Any], base: Mapping[str, Any], *, pairs=(("", ""),), skip=()):
    """`params` ({dotted path: array}, the adapted model's) with `base` copied in: (new dict, report). Each base
    parameter goes to its path under `pairs` in the dtype and sharding of the value it replaces; a base input
    projection with fewer input channels is widened with zero rows; `FROM_BACKBONE` parts come from the
    backbone. Report {"copied", "widened", "from_backbone", "kept_init"}; raises, naming every problem, on a base
    parameter the model has no place for or whose shape cannot be matched."""
    out = dict(params)
    report: dict[str, list[str]] = {"copied": [], "widened": [], "from_backbone": [], "kept_init": []}
    problems = []

    def put(path: str, value, kind: str):
        target = params[path]
        value = jnp.asarray(value, target.dtype)
        if value.shape == target.shape:
            new = jnp.array(value, copy=True)  # its own buffer: one base tensor may fill two places
        elif (value.ndim == target.ndim and value.shape[:-2] == target.shape[:-2]
              and value.shape[-1] == target.shape[-1] and value.shape[-2] < target.shape[-2]):
            # more input channels in the adapted model (mask, masked video, motion): copy the base rows and
            # zero the new ones, so the added channels contribute nothing until trained
            new, kind = jnp.zeros(target.shape, target.dtype).at[..., : value.shape[-2], :].set(value), "widened"
        else:
            problems.append(f"{path}: base {tuple(value.shape)} vs model {tuple(target.shape)}")
            return
        out[path] = jax.device_put(new, target.sharding) if hasattr(target, "sharding") else new
        report[kind].append(path)

    for path, value in base.items():
        if any(path.startswith(s) for s in skip):
            continue
        for src, dst in pairs:
            if not path.startswith(src):
                continue
            if dst + path[len(src):] not in params:
                problems.append(f"{path}: not in the adapted model" + (f" (as {dst + path[len(src):]})" if dst else ""))
                continue
            put(dst + path[len(src):], value, "copied")
    for dst_prefix, src_prefix in FROM_BACKBONE.items():
        for path in params:
            if path.startswith(dst_prefix):
                src = src_prefix + path[len(dst_prefix):]
                if src in base:
                    put(path, base[src], "from_backbone")
    if problems:
        raise ValueError("cannot load the base model into the adapted model:\n  " + "\n  ".join(problems))
    done = set().union(*report.values())
    report["kept_init"] = sorted(set(params) - done)
    return out, report


def load_base(model: nnx.Module, base: nnx.Module | Mapping[str, Any]) -> dict[str, list[str]]:
    """Copy `base` (a module or {dotted path: array}) into `model` in place (`merge_base`). Returns its report."""
    base_params = flat_params(base) if isinstance(base, nnx.Module) else dict(base)
    state = nnx.state(model, nnx.Param)
    by_name = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    merged, report = merge_base({k: v.get_value() for k, v in by_name.items()}, base_params)
    for path in set().union(*(report[k] for k in ("copied", "widened", "from_backbone"))):
        by_name[path].set_value(merged[path])
    nnx.update(model, state)
    return report

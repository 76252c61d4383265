"""Tiny diffusers HunyuanVideo transformers for the parity tests: random weights with every norm weight
and bias and every modulation table (the adaLN Linears) perturbed away from its initial value."""

from __future__ import annotations

import re

import numpy as np
import torch

from encoder_reference import perturb_

TINY = dict(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, num_layers=2,
            num_single_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24,
            rope_theta=256.0, rope_axes_dim=(4, 6, 6))
MODULATION = re.compile(r"(^|\.)norm\w*\.linear\.(weight|bias)$")  # AdaLayerNorm* / refiner gate tables


def make_diffusers_hunyuan(config: dict, seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**config).eval()
    perturb_(model, seed + 1)  # norm weights ~ 1 + 0.2 N, norm biases ~ 0.1 N, linears ~ N(0, 1/fan_in)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # perturb_ takes the adaLN Linears for norms (their names hold "norm"): redraw them
        for name, p in model.named_parameters():
            if MODULATION.search(name):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(0.3 * noise if name.endswith("bias") else noise / np.sqrt(p.shape[1]))
    return model


def inputs(config: dict, *, batch=2, frames=3, height=4, width=6, text_len=7, valid=(7, 4), seed=0):
    """Channels-last latents, timesteps, text states, text mask (right-padded), pooled vector, guidance."""
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((batch, frames, height, width, config["in_channels"])).astype(np.float32)
    t = np.array([999.0, 321.5, 17.0, 640.0][:batch], np.float32)
    text = rng.standard_normal((batch, text_len, config["text_embed_dim"])).astype(np.float32)
    mask = (np.arange(text_len)[None] < np.array(valid[:batch])[:, None]).astype(np.int64)
    pooled = rng.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32)
    guidance = np.array([6000.0, 3500.0, 1000.0, 7500.0][:batch], np.float32)
    return dict(lat=lat, t=t, text=text, mask=mask, pooled=pooled, guidance=guidance)


def diffusers_forward(model, x: dict) -> np.ndarray:
    """diffusers on channels-last inputs; channels-last float64 output."""
    lat = torch.from_numpy(np.ascontiguousarray(x["lat"].transpose(0, 4, 1, 2, 3)))
    kw = {"guidance": torch.from_numpy(x["guidance"])} if model.config.guidance_embeds else {}
    with torch.no_grad():
        out = model(lat, torch.from_numpy(x["t"]), torch.from_numpy(x["text"]), torch.from_numpy(x["mask"]),
                    torch.from_numpy(x["pooled"]), return_dict=False, **kw)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1).astype(np.float64)


def ours_forward(model, x: dict, **kw):
    """Our model on the same inputs, jitted (one compile per model structure and input shapes); array
    keyword arguments are traced, others (dual_hook's module and layers) are static through the closure."""
    import jax
    from flax import nnx

    extra = {"guidance": x["guidance"]} if model.cfg.guidance_embeds else {}
    args = (x["lat"], x["t"], x["text"], x["pooled"])
    hook = kw.pop("dual_hook", None)
    hook_def, hook_state = nnx.split(hook[0]) if hook else (None, None)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, hook_state, args, mask, extra, kw):
        h = None if hook is None else (nnx.merge(hook_def, hook_state), hook[1])
        return nnx.merge(graphdef, state)(*args, text_mask=mask, dual_hook=h, **extra, **kw)

    return run(state, hook_state, args, x["mask"], extra, kw)

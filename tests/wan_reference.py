"""Tiny diffusers Wan models for the parity tests: random weights, every norm and modulation table
perturbed away from its initial value, saved as a diffusers directory."""

from __future__ import annotations

import numpy as np
import torch

from encoder_reference import perturb_

TINY_T2V = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=12,
                out_channels=8, text_dim=32, freq_dim=64, ffn_dim=96, num_layers=2, cross_attn_norm=True,
                eps=1e-6, rope_max_seq_len=1024)
TINY_I2V = dict(TINY_T2V, in_channels=20, image_dim=24, added_kv_proj_dim=64)


def make_diffusers_wan(config: dict, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    perturb_(model, seed + 1)  # norms away from 1/0, weights ~ N(0, 1/fan_in)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # the adaLN tables and image position embedding: well away from their init
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or "pos_embed" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def diffusers_forward(model, latents_cl: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
                      image_context: np.ndarray | None = None) -> np.ndarray:
    """Run diffusers on channels-last latents; return channels-last output (float64 numpy)."""
    x = torch.from_numpy(np.ascontiguousarray(latents_cl.transpose(0, 4, 1, 2, 3)))
    kw = {}
    if image_context is not None:
        kw["encoder_hidden_states_image"] = torch.from_numpy(image_context)
    with torch.no_grad():
        out = model(x, torch.from_numpy(timesteps), torch.from_numpy(context), return_dict=False, **kw)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1).astype(np.float64)


def inputs(config: dict, *, batch=2, frames=3, height=6, width=10, text_len=20, image_len=None, seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((batch, frames, height, width, config["in_channels"])).astype(np.float32)
    t = np.array([999.0, 321.5, 17.0, 640.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, text_len, config["text_dim"])).astype(np.float32)
    img = None
    if image_len is not None:
        img = rng.standard_normal((batch, image_len, config["image_dim"])).astype(np.float32)
    return lat, t, ctx, img

"""Tiny diffusers CogVideoX models for the parity tests: random weights, every norm weight/bias, every adaLN
(modulation) linear and the learned position table perturbed away from their initial values; the RoPE
tables built as the diffusers pipelines build them."""

from __future__ import annotations

import numpy as np
import torch

from encoder_reference import perturb_

_BASE = dict(num_attention_heads=4, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=32,
             text_embed_dim=24, num_layers=2, sample_width=6, sample_height=4, sample_frames=9,
             max_text_seq_length=5, norm_eps=1e-5)
TINY = {
    # 2B-style: fixed 3D sin-cos positions, no RoPE
    "2b": dict(_BASE, use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False),
    # 5B-I2V-style: RoPE + learned position table, 2·C input channels
    "5b-i2v": dict(_BASE, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
    # 1.5-I2V-style: temporal patch 2 (Linear patch embedding), RoPE "slice" grid, ofs embedding
    "1.5-i2v": dict(_BASE, use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                    ofs_embed_dim=32, sample_frames=13),
}


def make_diffusers_cogvideox(config: dict, seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**config).eval()
    perturb_(model, seed + 1)  # norms away from 1/0, weights ~ N(0, 1/fan_in)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".linear." in name and "norm" in name:  # the adaLN (modulation) linears, which perturb_ treats
                # as norm weights: weights ~ N(0, 1/fan_in), biases well away from 0
                scale = 0.3 if name.endswith("bias") else p.shape[-1] ** -0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name == "patch_embed.pos_embedding" and config.get("use_learned_positional_embeddings"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model


def rotary_emb(config: dict, frames: int, height: int, width: int):
    """(cos, sin) as the CogVideoX pipelines build them for latents [F, H, W] (diffusers' own functions)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not config.get("use_rotary_positional_embeddings"):
        return None
    p, p_t = config.get("patch_size", 2), config.get("patch_size_t")
    gh, gw = height // p, width // p
    base_w, base_h = config["sample_width"] // p, config["sample_height"] // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(config["attention_head_dim"], crops, (gh, gw), frames)
    return get_3d_rotary_pos_embed(config["attention_head_dim"], None, (gh, gw), (frames + p_t - 1) // p_t,
                                   grid_type="slice", max_size=(base_h, base_w))


def diffusers_forward(model, config: dict, latents_cl: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
                      ofs: np.ndarray | None = None, dtype=torch.float32) -> np.ndarray:
    """Run diffusers on channels-last latents [B, F, H, W, C]; return channels-last output (float64)."""
    b, f, h, w, _ = latents_cl.shape
    x = torch.from_numpy(np.ascontiguousarray(latents_cl.transpose(0, 1, 4, 2, 3))).to(dtype)  # [B, F, C, H, W]
    kw = {"image_rotary_emb": rotary_emb(config, f, h, w)}
    if ofs is not None:
        kw["ofs"] = torch.from_numpy(ofs)
    with torch.no_grad():
        out = model(x, torch.from_numpy(context).to(dtype), torch.from_numpy(timesteps), return_dict=False, **kw)[0]
    return out.float().numpy().transpose(0, 1, 3, 4, 2).astype(np.float64)


def inputs(config: dict, *, batch=2, frames=3, height=4, width=6, seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((batch, frames, height, width, config["in_channels"])).astype(np.float32)
    t = np.array([999.0, 321.5, 17.0, 640.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, config["max_text_seq_length"], config["text_embed_dim"])).astype(np.float32)
    ofs = np.full((batch,), 2.0, np.float32) if config.get("ofs_embed_dim") else None
    return lat, t, ctx, ofs

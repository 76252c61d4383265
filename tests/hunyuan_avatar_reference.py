"""An independent PyTorch reference of HunyuanVideo-Avatar's transformer (research/hyavatar_letstalk.md B.1, B.2,
B.4, B.5), written from the research facts, not from our JAX code: diffusers' HunyuanVideoTransformer3DModel
(no guidance embedder) supplies the trunk's modules and blocks; this file runs them in the Avatar's order with
the Avatar's modules (avatar_reference.py's audio projector and adapters, a Conv3d `ref_in`, `before_proj`,
the motion / fps timestep MLPs) and the reference frame prepended at RoPE t = −1.

The state dict is diffusers' names for the trunk plus the released Avatar names (`ref_in.proj`,
`before_proj`, `audio_proj.*`, `audio_adapter_blocks.{i}.*`, `motion_exp.mlp.{0,2}`, `motion_pose.*`,
`fps_proj.*`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import avatar_reference as aref
from encoder_reference import perturb_
from hunyuan_reference import TINY, make_diffusers_hunyuan

# tiny Avatar: the trunk of hunyuan_reference.TINY without guidance and with 4 dual blocks (adapters after 1, 3)
TRUNK = dict(TINY, guidance_embeds=False, num_layers=4)
DIM = TINY["num_attention_heads"] * TINY["attention_head_dim"]
AUDIO = dict(window=3, layers=2, channels=8, hidden=24, tokens=4, dim=DIM)
INNER = 16
ADAPTER_AFTER = (1, 3)


class TimestepEmbedder(nn.Module):
    """Tencent's TimestepEmbedder: cos-first sinusoid of 256 -> Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        from diffusers.models.embeddings import get_timestep_embedding

        return self.mlp(get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))


class AvatarExtras(nn.Module):
    def __init__(self):
        super().__init__()
        c, p = TRUNK["in_channels"], TRUNK["patch_size"]
        self.ref_in = nn.Module()
        self.ref_in.proj = nn.Conv3d(c, DIM, (TRUNK["patch_size_t"], p, p), stride=(TRUNK["patch_size_t"], p, p))
        self.before_proj = nn.Linear(DIM, DIM)
        self.audio_proj = aref.AudioProj(**AUDIO)
        self.audio_adapter_blocks = nn.ModuleList([aref.FaceAdapter(DIM, INNER) for _ in ADAPTER_AFTER])
        self.motion_exp = TimestepEmbedder(DIM // 4)
        self.motion_pose = TimestepEmbedder(DIM // 4)
        self.fps_proj = TimestepEmbedder(DIM)


def make_reference(seed: int = 0):
    """(diffusers trunk, Avatar modules), every weight random, every norm and modulation perturbed."""
    trunk = make_diffusers_hunyuan(TRUNK, seed=seed)
    torch.manual_seed(seed + 10)
    extras = perturb_(AvatarExtras().eval(), seed + 11)  # adapters' to_out non-zero, LayerNorms perturbed
    return trunk, extras


def state_dict(trunk, extras) -> dict[str, torch.Tensor]:
    return {**trunk.state_dict(), **extras.state_dict()}


def _rope(coords: torch.Tensor):
    """cos, sin [L, head_dim] for (t, h, w) coordinates per token, diffusers' get_1d_rotary_pos_embed per axis."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    parts = [get_1d_rotary_pos_embed(d, coords[:, i].float(), TRUNK["rope_theta"], use_real=True)
             for i, d in enumerate(TRUNK["rope_axes_dim"])]
    return torch.cat([c for c, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1)


def inputs(*, batch=2, frames=3, height=4, width=6, text_len=7, valid=(7, 4), seed=0):
    rng = np.random.default_rng(seed)
    c = TRUNK["in_channels"]
    t_video = 4 * frames - 3
    x = dict(
        lat=rng.standard_normal((batch, frames, height, width, c)).astype(np.float32),
        ref=np.repeat(rng.standard_normal((batch, 1, height, width, c)), frames, axis=1).astype(np.float32)
        + 0.1 * rng.standard_normal((batch, frames, height, width, c)).astype(np.float32),  # frames not identical
        t=np.array([999.0, 321.5, 17.0, 640.0][:batch], np.float32),
        text=rng.standard_normal((batch, text_len, TRUNK["text_embed_dim"])).astype(np.float32),
        mask=(np.arange(text_len)[None] < np.array(valid[:batch])[:, None]).astype(np.int64),
        pooled=rng.standard_normal((batch, TRUNK["pooled_projection_dim"])).astype(np.float32),
        audio=rng.standard_normal((batch, t_video, AUDIO["window"], AUDIO["layers"], AUDIO["channels"]))
        .astype(np.float32),
        face=np.clip(rng.uniform(-0.5, 1.5, (batch, frames * (height // 2) * (width // 2))), 0, 1).astype(np.float32),
        fps=np.array([25.0, 12.5, 25.0, 25.0][:batch], np.float32),
        exp=np.array([[30.0] * 4, [10.0, 20.0, 30.0, 40.0], [30.0] * 4, [5.0] * 4][:batch], np.float32),
        pose=np.array([[25.0] * 4, [7.0, 9.0, 11.0, 13.0], [25.0] * 4, [1.0] * 4][:batch], np.float32),
    )
    return x


@torch.no_grad()
def forward(trunk, extras, x: dict, mask_scale: float = 1.0) -> np.ndarray:
    """The Avatar forward (B.2) on channels-last numpy inputs; channels-last float64 output."""
    lat = torch.from_numpy(np.ascontiguousarray(x["lat"].transpose(0, 4, 1, 2, 3)))
    ref = torch.from_numpy(np.ascontiguousarray(x["ref"].transpose(0, 4, 1, 2, 3)))
    b, _, f, h, w = lat.shape
    p = TRUNK["patch_size"]
    gh, gw = h // p, w // p
    t = torch.from_numpy(x["t"])

    # 1. vec = time + motion_exp (4 -> concat) + motion_pose + fps + pooled text
    temb, _ = trunk.time_text_embed(t, torch.from_numpy(x["pooled"]), None)
    vec = temb + extras.motion_exp(torch.from_numpy(x["exp"]).reshape(-1)).reshape(b, -1)
    vec = vec + extras.motion_pose(torch.from_numpy(x["pose"]).reshape(-1)).reshape(b, -1)
    vec = vec + extras.fps_proj(torch.from_numpy(x["fps"]))

    # 2. audio tokens per latent frame
    audio = aref.group_latent(extras.audio_proj(torch.from_numpy(x["audio"])))  # [B, F, 16, D]

    # 3-4. video tokens + before_proj(ref_in(ref)); the reference frame through img_in, prepended
    img = trunk.x_embedder(lat)
    img = img + extras.before_proj(extras.ref_in.proj(ref).flatten(2).transpose(1, 2))
    first = trunk.x_embedder(ref[:, :, :1])
    img = torch.cat([first, img], dim=1)
    n_ref = first.shape[1]
    tt, hh, ww = torch.meshgrid(torch.arange(-1, f), torch.arange(gh), torch.arange(gw), indexing="ij")
    rope = _rope(torch.stack([tt, hh, ww], -1).reshape(-1, 3))  # t = -1 first, then 0..F-1

    # 5. text
    mask = torch.from_numpy(x["mask"])
    txt = trunk.context_embedder(torch.from_numpy(x["text"]), t, mask)
    n = img.shape[1] + txt.shape[1]
    valid = img.shape[1] + mask.sum(dim=1, dtype=torch.int)
    attn_mask = (torch.arange(n)[None] < valid[:, None])[:, None, None, :]

    # 6. dual blocks, adapters after 1, 3, ...
    face = torch.from_numpy(x["face"]) * mask_scale
    adapters = iter(extras.audio_adapter_blocks)
    for i, block in enumerate(trunk.transformer_blocks):
        img, txt = block(img, txt, vec, attn_mask, rope)
        if i in ADAPTER_AFTER:
            img = aref.apply_adapter(next(adapters), img, audio, face, f, n_ref)

    # 7. single blocks, drop text and reference tokens, head
    for block in trunk.single_transformer_blocks:
        img, txt = block(img, txt, vec, attn_mask, rope)
    out = trunk.proj_out(trunk.norm_out(img[:, n_ref:], vec))
    c = TRUNK["out_channels"]
    out = out.reshape(b, f, gh, gw, c, 1, p, p).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, f, h, w, c)
    return out.numpy().astype(np.float64)

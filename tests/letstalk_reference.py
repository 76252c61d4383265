"""An independent PyTorch reference of the LetsTalk backbone (no PyTorch package ships it), written from the
research facts (shared/research/hyavatar_letstalk.md C.1-C.5, C.9), functionally over a state dict in the
released key names and the released layout (latents [B, F, C, H, W]), in float64 (but for the timestep
frequencies and their products with t, float32 as the released code computes them).

Per block, in this order: temporal attention per spatial position over [memory; clip] frames (affine LN eps
1e-5, fused qkv with bias, proj, then temporal_fc; no modulation); audio cross-attention per frame (LN without
affine eps 1e-6; q/k/v without bias, proj with); spatial attention and MLP over [frame tokens, reference
tokens] with adaLN-Zero (shift, scale, gate) x 2 from SiLU(c). Reference tokens never enter the temporal or
audio attention; memory frames enter only the temporal attention. Also: synthetic released checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


# --- MAE's fixed tables, as the released code builds them ---
def mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d(dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)  # w goes first
    return np.concatenate([mae_1d(dim // 2, grid[0]), mae_1d(dim // 2, grid[1])], axis=1)


# --- synthetic released checkpoints ---
def released_shapes(*, depth, dim, patch, channels=4, learn_sigma=True, grid=4, time_len=16, long=False,
                    context_dim=768, mlp_ratio=4, audio=(2, 768, 16, 4, 32)) -> tuple[dict, dict]:
    """({model key: shape}, {audioproj key: shape}) of `torch.save({"model", "ema", "audioproj"})`.
    audio = (wav2vec2 layers, width, hidden, tokens, output width), window ±2."""
    out = channels * (2 if learn_sigma else 1)
    s = {"x_embedder.proj.weight": (dim, channels, patch, patch), "x_embedder.proj.bias": (dim,),
         "t_embedder.mlp.0.weight": (dim, 256), "t_embedder.mlp.0.bias": (dim,),
         "t_embedder.mlp.2.weight": (dim, dim), "t_embedder.mlp.2.bias": (dim,),
         "pos_embed": (1, grid * grid, dim), ("long_temp_embed" if long else "temp_embed"): (1, time_len, dim),
         "final_layer.linear.weight": (patch * patch * out, dim), "final_layer.linear.bias": (patch * patch * out,),
         "final_layer.adaLN_modulation.1.weight": (2 * dim, dim), "final_layer.adaLN_modulation.1.bias": (2 * dim,)}
    hidden = int(dim * mlp_ratio)
    for i in range(depth):
        p = f"blocks.{i}."
        for name, (o, n, bias) in {"attn.qkv": (3 * dim, dim, True), "attn.proj": (dim, dim, True),
                                   "mlp.fc1": (hidden, dim, True), "mlp.fc2": (dim, hidden, True),
                                   "adaLN_modulation.1": (6 * dim, dim, True),
                                   "temporal_attn.qkv": (3 * dim, dim, True), "temporal_attn.proj": (dim, dim, True),
                                   "temporal_fc": (dim, dim, True), "cross_attn.q_proj": (dim, dim, False),
                                   "cross_attn.k_proj": (dim, context_dim, False),
                                   "cross_attn.v_proj": (dim, context_dim, False),
                                   "cross_attn.proj": (dim, dim, True)}.items():
            s[p + name + ".weight"] = (o, n)
            if bias:
                s[p + name + ".bias"] = (o,)
        s[p + "temporal_norm1.weight"] = s[p + "temporal_norm1.bias"] = (dim,)
    layers, width, ah, tokens, adim = audio
    a = {"proj1.weight": (ah, 5 * layers * width), "proj1.bias": (ah,), "proj2.weight": (ah, ah), "proj2.bias": (ah,),
         "proj3.weight": (tokens * adim, ah), "proj3.bias": (tokens * adim,), "norm.weight": (adim,),
         "norm.bias": (adim,)}
    return s, a


def random_tensors(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """float32 tensors: norm weights 1 ± 0.2, norm biases and biases away from 0, every modulation and the
    final layer nonzero (released init zeros them), matrices ~ N(0, 1/fan_in); fixed tables exact."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    dim = shapes.get("x_embedder.proj.bias", (0,))[0]
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if name == "pos_embed":
            out[name] = torch.from_numpy(mae_2d(dim, int(math.isqrt(shape[1])))).float()[None]
        elif name.endswith("temp_embed"):
            out[name] = torch.from_numpy(mae_1d(dim, np.arange(shape[1]))).float()[None]
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.2 * noise
        elif "norm" in name or name.endswith("bias"):
            out[name] = (0.1 if "norm" in name else 0.05) * noise
        else:
            out[name] = noise / math.sqrt(int(np.prod(shape[1:])))
    return out


def released_checkpoint(seed: int, **sizes) -> dict:
    """{"model", "ema", "audioproj"} with distinct model / ema weights."""
    model_shapes, audio_shapes = released_shapes(**sizes)
    return {"model": random_tensors(model_shapes, seed), "ema": random_tensors(model_shapes, seed + 1),
            "audioproj": random_tensors(audio_shapes, seed + 2)}


# --- the forward pass ---
def _lin(x, sd, name, bias=True):
    return F.linear(x, sd[name + ".weight"].double(), sd[name + ".bias"].double() if bias else None)


def _attend(q, k, v, heads):
    """q [..., L, D], k/v [..., M, D] -> [..., L, D] by softmax(q kᵀ / √K) v per head."""
    def split(x):
        return x.unflatten(-1, (heads, -1)).transpose(-3, -2)  # [..., N, L, K]
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).transpose(-3, -2).flatten(-2)


def _self_attn(x, sd, prefix, heads):
    q, k, v = _lin(x, sd, prefix + ".qkv").chunk(3, dim=-1)
    return _lin(_attend(q, k, v, heads), sd, prefix + ".proj")


def _ln(x, sd=None, name=None, eps=1e-6):
    w = b = None
    if name is not None:
        w, b = sd[name + ".weight"].double(), sd[name + ".bias"].double()
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def audio_tokens(ap: dict, windows: torch.Tensor) -> torch.Tensor:
    """AudioProjModel: windows [B, F, 5, layers, C] -> [B, F, K, D]."""
    b, f = windows.shape[:2]
    x = torch.relu(_lin(windows.reshape(b * f, -1), ap, "proj1"))
    x = torch.relu(_lin(x, ap, "proj2"))
    d = ap["norm.weight"].shape[0]
    x = _lin(x, ap, "proj3").reshape(b * f, -1, d)
    return _ln(x, ap, "norm", 1e-5).reshape(b, f, -1, d)


def forward(sd: dict, ap: dict, x, t, cond, windows, heads: int, motion=None, trace: dict | None = None):
    """x [B, F, C, H, W], t [B], cond [B, C, H, W], windows [B, F, 5, layers, C_a], motion [B, M, C, H, W] | None
    (numpy or torch) -> [B, F, 2C, H, W] float64. `trace` (a dict) receives block 0's temporal / audio /
    spatial attention inputs."""
    x, t, cond, windows = (torch.as_tensor(np.asarray(a)).double() for a in (x, t, cond, windows))
    b, f, c, h, w = x.shape
    pw = sd["x_embedder.proj.weight"].double()
    p = pw.shape[-1]
    m = 0 if motion is None else motion.shape[1]

    def patchify(imgs):  # [n, C, H, W] -> [n, P, D] + the 2D table
        y = F.conv2d(imgs, pw, sd["x_embedder.proj.bias"].double(), stride=p)
        return y.flatten(2).transpose(1, 2) + sd["pos_embed"].double()

    temp = (sd["long_temp_embed"] if "long_temp_embed" in sd else sd["temp_embed"]).double()[0]
    tok = patchify(x.flatten(0, 1)).unflatten(0, (b, f)) + temp[m:m + f, None]  # [B, F, P, D]
    ref = patchify(cond)[:, None].expand(b, f, -1, -1)
    mem = None
    if m:
        mem = patchify(torch.as_tensor(np.asarray(motion)).double().flatten(0, 1)).unflatten(0, (b, m))
        mem = mem + temp[:m, None]
    ctx = audio_tokens(ap, windows)  # [B, F, K, D_a]

    half = 128  # frequencies and their products with t in float32, as the released TimestepEmbedder computes them
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float()[:, None] * freqs[None]).double()
    cvec = _lin(F.silu(_lin(torch.cat([torch.cos(args), torch.sin(args)], -1), sd, "t_embedder.mlp.0")),
                sd, "t_embedder.mlp.2")

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        pre = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = (v[:, None, None] for v in
                                      _lin(F.silu(cvec), sd, pre + "adaLN_modulation.1").chunk(6, dim=-1))
        # temporal attention: sequences over time, one per (sample, position)
        seq = tok if mem is None else torch.cat([mem, tok], dim=1)  # [B, M+F, P, D]
        hin = _ln(seq, sd, pre + "temporal_norm1", 1e-5)
        if trace is not None and i == 0:
            trace["temporal"] = hin.clone()
        res = _self_attn(hin.permute(0, 2, 1, 3), sd, pre + "temporal_attn", heads).permute(0, 2, 1, 3)
        seq = seq + _lin(res, sd, pre + "temporal_fc")
        mem, tok = (seq[:, :m], seq[:, m:]) if m else (None, seq)
        # audio cross-attention, one frame's tokens over that frame's audio tokens
        hin = _ln(tok)
        if trace is not None and i == 0:
            trace["audio"] = hin.clone()
        q = _lin(hin, sd, pre + "cross_attn.q_proj", bias=False)
        k = _lin(ctx, sd, pre + "cross_attn.k_proj", bias=False)
        v = _lin(ctx, sd, pre + "cross_attn.v_proj", bias=False)
        tok = tok + _lin(_attend(q, k, v, heads), sd, pre + "cross_attn.proj")
        # spatial attention + MLP over [frame, reference] per frame
        both = torch.cat([tok, ref], dim=2)  # [B, F, 2P, D]
        hin = _ln(both) * (1 + sc1) + sh1
        if trace is not None and i == 0:
            trace["spatial"] = hin.clone()
        both = both + g1 * _self_attn(hin, sd, pre + "attn", heads)
        hid = F.gelu(_lin(_ln(both) * (1 + sc2) + sh2, sd, pre + "mlp.fc1"), approximate="tanh")
        both = both + g2 * _lin(hid, sd, pre + "mlp.fc2")
        n = tok.shape[2]
        tok, ref = both[:, :, :n], both[:, :, n:]

    shift, scale = _lin(F.silu(cvec), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    y = _lin(_ln(tok) * (1 + scale[:, None, None]) + shift[:, None, None], sd, "final_layer.linear")
    co = y.shape[-1] // (p * p)
    y = y.reshape(b, f, h // p, w // p, p, p, co)
    return torch.einsum("bfhwpqc->bfchpwq", y).reshape(b, f, co, h, w)

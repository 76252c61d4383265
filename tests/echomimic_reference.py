"""A small, independent PyTorch reference of EchoMimicV3's audio path, written from the research facts
(shared/research/echomimic_v3.md §1.3-1.4), hooked into diffusers' Wan transformer as its cross-attention
processor: window building, both projectors, frame-local audio attention on the shared query, face mask,
audio scale, and the one output projection over text + image + audio. Weights in the released names."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def sdpa(q, k, v):  # [B, L, N, K] x [B, M, N, K]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def preview_tokens(feats: torch.Tensor, sd: dict) -> torch.Tensor:
    """feats [B, 2T, 768] (50 Hz) -> [B, F, 17, D]: audio2token on every token, then for latent frame i the
    inclusive range [8i − 11, 8i + 5]; positions outside the clip: zero tokens appended at the end."""
    x = F.linear(feats, sd["audio2token.proj.weight"])
    x = F.layer_norm(x, x.shape[-1:], sd["audio2token.norm.weight"], sd["audio2token.norm.bias"], eps=1e-5)
    n = x.shape[1]
    latent = (n // 2 - 1) // 4 + 1
    windows = []
    for i in range(latent):
        idx = [j for j in range(8 * i - 11, 8 * i + 6) if 0 <= j < n]
        w = x[:, idx]
        windows.append(torch.cat([w, x.new_zeros(x.shape[0], 17 - len(idx), x.shape[2])], dim=1))
    return torch.stack(windows, dim=1)


def flash_tokens(feats: torch.Tensor, sd: dict, tokens: int) -> torch.Tensor:
    """feats [B, T, layers, 768] -> [B, F, K, D]: 5-frame windows (clamped); frame 0 -> proj1; groups of 4
    frames (first: window 0..2, two middle: 2, last: 2..4) -> proj1_vf; ReLU, proj2 + ReLU, proj3, LayerNorm."""
    b, t = feats.shape[:2]
    idx = (torch.arange(t)[:, None] + torch.arange(-2, 3)[None]).clamp(0, t - 1)
    win = feats[:, idx]  # [B, T, 5, layers, C]
    first = torch.relu(F.linear(win[:, 0].reshape(b, 1, -1), sd["audio_injection.proj1.weight"],
                                sd["audio_injection.proj1.bias"]))
    rest = []
    for g in range((t - 1) // 4):
        f0 = 1 + 4 * g
        entries = [win[:, f0, p] for p in (0, 1, 2)] + [win[:, f0 + 1, 2], win[:, f0 + 2, 2]] + \
                  [win[:, f0 + 3, p] for p in (2, 3, 4)]
        flat = torch.stack(entries, dim=1).reshape(b, -1)
        rest.append(torch.relu(F.linear(flat, sd["audio_injection.proj1_vf.weight"],
                                        sd["audio_injection.proj1_vf.bias"])))
    x = torch.cat([first] + [r[:, None] for r in rest], dim=1)
    x = torch.relu(F.linear(x, sd["audio_injection.proj2.weight"], sd["audio_injection.proj2.bias"]))
    x = F.linear(x, sd["audio_injection.proj3.weight"], sd["audio_injection.proj3.bias"])
    x = x.reshape(b, x.shape[1], tokens, -1)
    return F.layer_norm(x, x.shape[-1:], sd["audio_injection.norm.weight"], sd["audio_injection.norm.bias"], eps=1e-5)


class EchoMimicCrossAttention:
    """diffusers attention processor for a block's attn2: shared query over text, image and audio K/V."""

    def __init__(self, sd: dict, block: int, state: dict):
        p = f"blocks.{block}.cross_attn."
        self.k_w, self.v_w = sd[p + "k_audio.weight"], sd[p + "v_audio.weight"]
        self.norm_w = sd[p + "norm_k_audio.weight"]
        self.k_b, self.v_b = sd.get(p + "k_audio.bias"), sd.get(p + "v_audio.bias")
        self.state = state  # {"tokens": [B, F, M, D], "face_mask": [B, L] | None, "scale": float}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        img, txt = encoder_hidden_states[:, :-512], encoder_hidden_states[:, -512:]
        n = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (n, -1))
        k = attn.norm_k(attn.to_k(txt)).unflatten(2, (n, -1))
        out = sdpa(q, k, attn.to_v(txt).unflatten(2, (n, -1)))
        k_img = attn.norm_added_k(attn.add_k_proj(img)).unflatten(2, (n, -1))
        out = out + sdpa(q, k_img, attn.add_v_proj(img).unflatten(2, (n, -1)))
        tokens = self.state["tokens"]  # [B, F, M, D]
        b, f = tokens.shape[:2]
        ka = rms(F.linear(tokens, self.k_w, self.k_b), self.norm_w).unflatten(3, (n, -1)).flatten(0, 1)
        va = F.linear(tokens, self.v_w, self.v_b).unflatten(3, (n, -1)).flatten(0, 1)
        qa = q.reshape(b * f, -1, *q.shape[2:])  # the queries of each latent frame
        audio = sdpa(qa, ka, va).reshape(q.shape)
        if self.state.get("face_mask") is not None:
            audio = audio * self.state["face_mask"][:, :, None, None]
        out = out + audio * self.state.get("scale", 1.0)
        return attn.to_out[0](out.flatten(2))


def forward(model, sd: dict, latents_cl, t, context, image, feats, *, variant: str, tokens: int = 32,
            face_mask=None, scale: float = 1.0) -> np.ndarray:
    """The diffusers model with EchoMimicV3's audio path in every block; channels-last in and out."""
    state = {"scale": scale, "face_mask": None if face_mask is None else torch.from_numpy(face_mask)}
    for i, block in enumerate(model.blocks):
        block.attn2.set_processor(EchoMimicCrossAttention(sd, i, state))
    feats = torch.from_numpy(feats)
    with torch.no_grad():
        if variant == "preview":
            state["tokens"] = preview_tokens(feats.flatten(1, 2), sd)
        else:
            state["tokens"] = flash_tokens(feats, sd, tokens)
        x = torch.from_numpy(np.ascontiguousarray(latents_cl.transpose(0, 4, 1, 2, 3)))
        out = model(x, torch.from_numpy(t), torch.from_numpy(context),
                    encoder_hidden_states_image=torch.from_numpy(image), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1).astype(np.float64)

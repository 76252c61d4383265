"""A small, independent PyTorch reference of Hallo3 as released (fudan-generative-vision/hallo3, SAT code), written
from the research facts (shared/research/hallo3.md §1-2) and reading the released key names directly: the SAT
CogVideoX-5B-I2V block with its 12-chunk expert adaLN, the reference bank appended to the joint attention (qk-norm,
no RoPE, outputs dropped), face then audio cross-attention per latent frame (the self-attention's qk-LayerNorms,
the query rotated with the t = 0 rows of the RoPE table), the audio projector with its shared stride-2 Conv1d
(first frame bypassed, applied twice), the face projector, and the reference network at t = 0 with zero text.

Layout as SAT: latents [B, F, C, H, W]; the callers transpose. Also: the released key set and shapes (§2.2) at any
size (`released_shapes`), and a state dict with exactly those names, every norm and modulation perturbed."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DENOISER, REFERENCE = "model.diffusion_model.", "ref_model.diffusion_model."

# the released sizes (§1.1, §1.5, §1.6) and a tiny set with every size distinct where it can be
FULL = dict(layers=42, heads=48, head_dim=64, text_dim=4096, text_len=226, time_dim=512, in_channels=32,
            out_channels=16, patch=2, frames=13, height=60, width=90, face_in=512, face_tokens=4, face_dim=1024,
            audio_window=2, audio_layers=12, audio_in=768, audio_hidden=512, audio_tokens=32, audio_dim=768)
TINY = dict(layers=2, heads=2, head_dim=16, text_dim=24, text_len=6, time_dim=16, in_channels=8, out_channels=4,
            patch=2, frames=3, height=4, width=6, face_in=20, face_tokens=4, face_dim=12, audio_window=2,
            audio_layers=3, audio_in=8, audio_hidden=14, audio_tokens=3, audio_dim=10)


# --- the released key set --------------------------------------------------------------------------
def _net_shapes(s: dict, hallo3: bool) -> dict[str, tuple[int, ...]]:
    d, p = s["heads"] * s["head_dim"], s["patch"]
    video = s["frames"] * (s["height"] // p) * (s["width"] // p)
    out = {"mixins.pos_embed.pos_embedding": (1, s["text_len"] + video, d),
           "mixins.pos_embed.freqs_sin": (video, s["head_dim"]), "mixins.pos_embed.freqs_cos": (video, s["head_dim"]),
           "mixins.patch_embed.proj.weight": (d, s["in_channels"], p, p), "mixins.patch_embed.proj.bias": (d,),
           "mixins.patch_embed.text_proj.weight": (d, s["text_dim"]), "mixins.patch_embed.text_proj.bias": (d,),
           "time_embed.0.weight": (s["time_dim"], d), "time_embed.0.bias": (s["time_dim"],),
           "time_embed.2.weight": (s["time_dim"], s["time_dim"]), "time_embed.2.bias": (s["time_dim"],),
           "transformer.final_layernorm.weight": (d,), "transformer.final_layernorm.bias": (d,),
           "mixins.final_layer.norm_final.weight": (d,), "mixins.final_layer.norm_final.bias": (d,),
           "mixins.final_layer.adaLN_modulation.1.weight": (2 * d, s["time_dim"]),
           "mixins.final_layer.adaLN_modulation.1.bias": (2 * d,),
           "mixins.final_layer.linear.weight": (p * p * s["out_channels"], d),
           "mixins.final_layer.linear.bias": (p * p * s["out_channels"],),
           "transformer.position_embeddings.weight": (64, d)}
    for n in range(s["layers"]):
        a, t = "mixins.adaln_layer.", f"transformer.layers.{n}."
        out[f"{a}adaLN_modulations.{n}.1.weight"] = (12 * d, s["time_dim"])
        out[f"{a}adaLN_modulations.{n}.1.bias"] = (12 * d,)
        for which in ("query", "key"):
            for wb in ("weight", "bias"):
                out[f"{a}{which}_layernorm_list.{n}.{wb}"] = (s["head_dim"],)
        for name, (o, i) in {"attention.query_key_value": (3 * d, d), "attention.dense": (d, d),
                             "mlp.dense_h_to_4h": (4 * d, d), "mlp.dense_4h_to_h": (d, 4 * d)}.items():
            out[f"{t}{name}.weight"], out[f"{t}{name}.bias"] = (o, i), (o,)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if hallo3:
            norms += ["face_input_layernorm", "audio_input_layernorm"]
            for kind, width in (("face", s["face_dim"]), ("audio", s["audio_dim"])):
                for name, (o, i) in {"query": (d, d), "key_value": (2 * d, width), "dense": (d, d)}.items():
                    out[f"{t}{kind}_attn.{name}.weight"], out[f"{t}{kind}_attn.{name}.bias"] = (o, i), (o,)
        for name in norms:
            out[f"{t}{name}.weight"], out[f"{t}{name}.bias"] = (d,), (d,)
    if hallo3:
        k = s["audio_tokens"] * s["audio_dim"]
        fan = (2 * s["audio_window"] + 1) * s["audio_layers"] * s["audio_in"]
        out.update({"transformer.face_proj.proj.weight": (s["face_tokens"] * s["face_dim"], s["face_in"]),
                    "transformer.face_proj.proj.bias": (s["face_tokens"] * s["face_dim"],),
                    "transformer.face_proj.norm.weight": (s["face_dim"],),
                    "transformer.face_proj.norm.bias": (s["face_dim"],),
                    "transformer.audio_proj.proj1.weight": (s["audio_hidden"], fan),
                    "transformer.audio_proj.proj1.bias": (s["audio_hidden"],),
                    "transformer.audio_proj.proj2.weight": (s["audio_hidden"], s["audio_hidden"]),
                    "transformer.audio_proj.proj2.bias": (s["audio_hidden"],),
                    "transformer.audio_proj.proj3.weight": (k, s["audio_hidden"]),
                    "transformer.audio_proj.proj3.bias": (k,),
                    "transformer.audio_proj.conv1.weight": (k, k, 2), "transformer.audio_proj.conv1.bias": (k,),
                    "transformer.audio_proj.norm.weight": (s["audio_dim"],),
                    "transformer.audio_proj.norm.bias": (s["audio_dim"],)})
    return out


def released_shapes(s: dict = FULL) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released `module` dict (§2.2) at sizes `s`: the denoiser under ``model.`` (with the
    face and audio modules), the reference net under ``ref_model.``."""
    out = {DENOISER + k: v for k, v in _net_shapes(s, True).items()}
    out.update({REFERENCE + k: v for k, v in _net_shapes(s, False).items()})
    return out


def sat_rope_table(frames: int, gh: int, gw: int, head_dim: int, theta: float = 10000.0):
    """SAT's freqs_cos / freqs_sin [F·gh·gw, K]: t/h/w dims K/4, 3K/8, 3K/8, each angle repeated for its pair."""
    def axis(n, d):  # float32 throughout, as SAT computes it
        inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
        return (torch.arange(n, dtype=torch.float32)[:, None] * inv[None]).repeat_interleave(2, dim=-1)

    dt, dh = head_dim // 4, head_dim // 8 * 3
    ft, fh, fw = axis(frames, dt), axis(gh, dh), axis(gw, dh)
    grid = torch.cat([ft[:, None, None].expand(frames, gh, gw, dt), fh[None, :, None].expand(frames, gh, gw, dh),
                      fw[None, None].expand(frames, gh, gw, dh)], dim=-1).reshape(-1, head_dim)
    return grid.cos(), grid.sin()


def released_state_dict(s: dict = TINY, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A state dict with exactly the released names and shapes at sizes `s`: weights ~ N(0, 1/fan_in), every
    norm weight ~ 1 ± 0.2, every bias (norm biases and adaLN tables included) ~ 0.05-0.1, learned positions 0.3,
    the RoPE buffers as SAT computes them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in released_shapes(s).items():
        noise = torch.randn(shape, generator=g)
        if name.endswith("freqs_cos") or name.endswith("freqs_sin"):
            cos, sin = sat_rope_table(s["frames"], s["height"] // s["patch"], s["width"] // s["patch"],
                                      s["head_dim"])
            t = cos if name.endswith("cos") else sin
        elif "layernorm" in name or "norm" in name.split(".")[-2]:
            t = 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
        elif "pos_embedding" in name or "position_embeddings" in name:
            t = 0.3 * noise
        elif name.endswith("bias"):
            t = 0.1 * noise if "adaLN" in name else 0.05 * noise
        else:
            t = noise / math.sqrt(int(np.prod(shape[1:])))
        out[name] = t.to(dtype).contiguous()
    return out


# --- the model ---------------------------------------------------------------------------------------
def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _rotate_half(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope(x, cos, sin):  # x [B, N, L, K], cos/sin [L, K]
    return x * cos + _rotate_half(x) * sin


def _heads(x, n):  # [B, L, N·K] -> [B, N, L, K]
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def _merge(x):  # [B, N, L, K] -> [B, L, N·K]
    return x.transpose(1, 2).flatten(2)


def face_tokens(sd, face_emb, s):
    """face_proj: Linear(512 -> 4·1024) -> [B, 4, 1024] -> LayerNorm (eps 1e-5)."""
    x = _lin(face_emb, sd, DENOISER + "transformer.face_proj.proj").reshape(-1, s["face_tokens"], s["face_dim"])
    return _ln(x, sd, DENOISER + "transformer.face_proj.norm", 1e-5)


def audio_tokens(sd, windows, s):
    """AudioProjModel on per-frame windows [B, T, 5, layers, C]: flatten (window, layer, channel), proj1/ReLU,
    proj2/ReLU, proj3 -> [B, T, K·D]; then twice: keep frame 0, conv1 (k 2, s 2) on the rest; LayerNorm."""
    p = DENOISER + "transformer.audio_proj."
    b, t = windows.shape[:2]
    x = torch.relu(_lin(windows.reshape(b, t, -1), sd, p + "proj1"))
    x = torch.relu(_lin(x, sd, p + "proj2"))
    x = _lin(x, sd, p + "proj3").transpose(1, 2)  # [B, K·D, T]
    for _ in range(2):
        x = torch.cat([x[..., :1], F.conv1d(x[..., 1:], sd[p + "conv1.weight"], sd[p + "conv1.bias"], stride=2)], -1)
    x = x.transpose(1, 2).reshape(b, x.shape[-1], s["audio_tokens"], s["audio_dim"])
    return _ln(x, sd, p + "norm", 1e-5)


def _cross(sd, t, kind, x, kv_tokens, qln, kln, cos, sin, n):
    """Face / audio cross-attention of one layer: x [B·F, P, D] over kv_tokens [B·F, M, C]; q and k through the
    self-attention's qk-LayerNorms, q rotated with the t = 0 table rows (the released hook chain)."""
    q = _heads(_lin(x, sd, f"{t}{kind}_attn.query"), n)
    k, v = _lin(kv_tokens, sd, f"{t}{kind}_attn.key_value").chunk(2, dim=-1)
    q = _ln(q, sd, qln, 1e-6)
    k = _ln(_heads(k, n), sd, kln, 1e-6)
    q = _rope(q, cos[: x.shape[1]], sin[: x.shape[1]])
    out = F.scaled_dot_product_attention(q, k, _heads(v, n))
    return _lin(_merge(out), sd, f"{t}{kind}_attn.dense")


def dit_forward(sd, prefix, s, x, t, ctx, *, bank=None, face=None, audio=None, collect=None):
    """One SAT DiffusionTransformer: x [B, F, C, H, W], t [B], ctx [B, text_len, text_dim]. `bank`: per-layer
    [B, P, D] reference features appended to the joint attention; `face` [B·F, 4, face_dim] / `audio`
    [B·F, K, audio_dim] tokens; `collect`: a list that receives every layer's modulated video attention input."""
    n, p, m = s["heads"], s["patch"], ctx.shape[1]
    b, f, c, h, w = x.shape
    gh, gw = h // p, w // p
    img = F.conv2d(x.flatten(0, 1), sd[prefix + "mixins.patch_embed.proj.weight"],
                   sd[prefix + "mixins.patch_embed.proj.bias"], stride=p)  # [B·F, D, gh, gw]
    img = img.flatten(2).transpose(1, 2).reshape(b, f * gh * gw, -1)
    hid = torch.cat([_lin(ctx, sd, prefix + "mixins.patch_embed.text_proj"), img], dim=1)
    hid = hid + sd[prefix + "mixins.pos_embed.pos_embedding"][:, : hid.shape[1]]
    half = sd[prefix + "time_embed.0.weight"].shape[1] // 2
    args = t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)[None]
    emb = _lin(F.silu(_lin(torch.cat([torch.cos(args), torch.sin(args)], -1), sd, prefix + "time_embed.0")), sd,
               prefix + "time_embed.2")
    cos, sin = sat_rope_table(f, gh, gw, s["head_dim"])
    lv = f * gh * gw
    for i in range(s["layers"]):
        tp, a = f"{prefix}transformer.layers.{i}.", f"{prefix}mixins.adaln_layer."
        qln, kln = f"{a}query_layernorm_list.{i}", f"{a}key_layernorm_list.{i}"
        (shift, scale, gate, shift_m, scale_m, gate_m, t_shift, t_scale, t_gate, t_shift_m, t_scale_m,
         t_gate_m) = [c[:, None] for c in _lin(F.silu(emb), sd, f"{a}adaLN_modulations.{i}.1").chunk(12, dim=1)]
        text, vid = hid[:, :m], hid[:, m:]
        v_in = _ln(vid, sd, tp + "input_layernorm", 1e-5) * (1 + scale) + shift
        t_in = _ln(text, sd, tp + "input_layernorm", 1e-5) * (1 + t_scale) + t_shift
        if collect is not None:
            collect.append(v_in)
        seq = [t_in, v_in] + ([bank[i]] if bank is not None else [])
        q, k, v = (_heads(z, n) for z in _lin(torch.cat(seq, 1), sd, tp + "attention.query_key_value").chunk(3, -1))
        q, k = _ln(q, sd, qln, 1e-6), _ln(k, sd, kln, 1e-6)
        q = torch.cat([q[:, :, :m], _rope(q[:, :, m:m + lv], cos, sin), q[:, :, m + lv:]], dim=2)
        k = torch.cat([k[:, :, :m], _rope(k[:, :, m:m + lv], cos, sin), k[:, :, m + lv:]], dim=2)
        out = _lin(_merge(F.scaled_dot_product_attention(q, k, v)), sd, tp + "attention.dense")
        vid = vid + gate * out[:, m:m + lv]  # outputs at the reference positions are dropped
        text = text + t_gate * out[:, :m]
        for kind, tokens in (("face", face), ("audio", audio)):
            if tokens is not None:
                xq = _ln(vid, sd, f"{tp}{kind}_input_layernorm", 1e-5).reshape(b * f, gh * gw, -1)
                vid = vid + _cross(sd, tp, kind, xq, tokens, qln, kln, cos, sin, n).reshape(b, lv, -1)
        v_m = _ln(vid, sd, tp + "post_attention_layernorm", 1e-5) * (1 + scale_m) + shift_m
        t_m = _ln(text, sd, tp + "post_attention_layernorm", 1e-5) * (1 + t_scale_m) + t_shift_m
        mlp = _lin(F.gelu(_lin(torch.cat([t_m, v_m], 1), sd, tp + "mlp.dense_h_to_4h"), approximate="tanh"), sd,
                   tp + "mlp.dense_4h_to_h")
        hid = torch.cat([text + t_gate_m * mlp[:, :m], vid + gate_m * mlp[:, m:]], dim=1)
    hid = _ln(hid, sd, prefix + "transformer.final_layernorm", 1e-5)[:, m:]
    shift, scale = _lin(F.silu(emb), sd, prefix + "mixins.final_layer.adaLN_modulation.1").chunk(2, dim=1)
    hid = _ln(hid, sd, prefix + "mixins.final_layer.norm_final", 1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = _lin(hid, sd, prefix + "mixins.final_layer.linear")  # [B, L, (c, p, q)]
    out = out.reshape(b, f, gh, gw, s["out_channels"], p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, f, s["out_channels"], h, w)


def reference_bank(sd, s, ref_latent):
    """The reference net at t = 0 on [ref, ref] (32 channels) with an all-zero text: per-layer [B, P, D]."""
    b = ref_latent.shape[0]
    bank = []
    ctx = torch.zeros(b, s["text_len"], s["text_dim"])
    dit_forward(sd, REFERENCE, s, torch.cat([ref_latent, ref_latent], dim=2), torch.zeros(b), ctx, collect=bank)
    return bank


def window5(feats, w=2):
    """[B, T, layers, C] -> [B, T, 2w+1, layers, C], frames clamped at the ends (inference)."""
    t = feats.shape[1]
    idx = (torch.arange(t)[:, None] + torch.arange(-w, w + 1)[None]).clamp(0, t - 1)
    return feats[:, idx]


def hallo3_forward(sd, s, x, t, ctx, face_emb, audio_windows, ref_latent):
    """The released denoiser on SAT-layout inputs: x [B, F, 2C, H, W], face_emb [B, face_in], audio windows
    [B, T, 5, layers, C] (T = 4F − 3), ref_latent [B, 1, C, H, W]. Returns [B, F, C, H, W]."""
    b, f = x.shape[:2]
    with torch.no_grad():
        bank = reference_bank(sd, s, ref_latent)
        face = face_tokens(sd, face_emb, s)[:, None].expand(b, f, -1, -1).reshape(b * f, s["face_tokens"], -1)
        audio = audio_tokens(sd, audio_windows, s).reshape(b * f, s["audio_tokens"], -1)
        return dit_forward(sd, DENOISER, s, x, t, ctx, bank=bank, face=face, audio=audio)

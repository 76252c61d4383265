"""EchoMimicV3 as released: `hallojax convert echomimic-v3` on state dicts with exactly the released key names
and shapes (983 base + 220 Flash / 93 preview tensors at full depth, tiny widths), both variants' forward
through the real converter against tests/echomimic_reference.py (a PyTorch reference of the audio path written
from the research facts, inside diffusers' Wan transformer), and bad files refused with every name."""

import numpy as np
import pytest
import torch

from encoder_reference import assert_parity
from hallojax import cli, load_pretrained
from hallojax.checkpoint import load_params_numpy, read_config
from hallojax.convert import ConversionError, convert_wan_diffusers
from hallojax.convert.echomimic import convert_echomimic_v3
from hallojax.convert.safetensors_io import TensorStore, save_file
from hallojax.convert.wan_original import export_wan_original
from echomimic_reference import forward as reference_forward
from wan_reference import TINY_I2V, make_diffusers_wan

DIM = TINY_I2V["num_attention_heads"] * TINY_I2V["attention_head_dim"]  # 64
WAV_LAYERS, HIDDEN, TOKENS = 2, 16, 4  # the Flash projector at tiny widths (wav2vec2 width stays 768)


def released_audio_tensors(variant: str, layers: int, seed: int) -> dict[str, np.ndarray]:
    """The EchoMimicV3 file's own tensors (names and shapes as released, §1.3-1.4 of the research note)."""
    rng = np.random.default_rng(seed)
    shapes = {}
    if variant == "preview":
        shapes.update({"audio2token.proj.weight": (DIM, 768), "audio2token.norm.weight": (DIM,),
                       "audio2token.norm.bias": (DIM,)})
    else:
        fan = WAV_LAYERS * 768
        for name, (o, i) in {"proj1": (HIDDEN, 5 * fan), "proj1_vf": (HIDDEN, 8 * fan), "proj2": (HIDDEN, HIDDEN),
                             "proj3": (TOKENS * DIM, HIDDEN)}.items():
            shapes[f"audio_injection.{name}.weight"], shapes[f"audio_injection.{name}.bias"] = (o, i), (o,)
        shapes.update({"audio_injection.norm.weight": (DIM,), "audio_injection.norm.bias": (DIM,)})
    for i in range(layers):
        p = f"blocks.{i}.cross_attn."
        for proj in (("q_audio", "k_audio", "v_audio") if variant == "flash" else ("k_audio", "v_audio")):
            shapes[p + proj + ".weight"] = (DIM, DIM)
            if variant == "flash":
                shapes[p + proj + ".bias"] = (DIM,)
        shapes[p + "norm_k_audio.weight"] = (DIM,)
    out = {}
    for name, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32)
        if "norm" in name:
            out[name] = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise
        elif name.endswith("bias"):
            out[name] = 0.05 * noise
        else:
            out[name] = noise / np.float32(np.sqrt(shape[1]))
    return out


def base_dir(tmp, layers: int, seed: int):
    """A tiny Wan2.1-Fun-InP-shaped base in the original names (via diffusers -> ours -> original)."""
    model = make_diffusers_wan(dict(TINY_I2V, num_layers=layers), seed=seed)
    model.save_pretrained(tmp / "diffusers")
    convert_wan_diffusers(tmp / "diffusers", tmp / "ours", progress=False)
    export_wan_original(tmp / "ours", tmp / "base", progress=False)
    return model, tmp / "base"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return base_dir(tmp_path_factory.mktemp("base2"), 2, seed=21)


@pytest.mark.parametrize("variant", ["preview", "flash"])
def test_forward_matches_reference(variant, tiny_base, tmp_path):
    model, base = tiny_base
    sd = released_audio_tensors(variant, 2, seed=4)
    echo = tmp_path / "echo.safetensors"
    save_file(sd, echo)
    assert cli.main(["convert", "echomimic-v3", str(base), str(echo), str(tmp_path / "out")]) == 0
    ours, cfg = load_pretrained(tmp_path / "out", dtype="float32")
    assert cfg.audio_projector == f"echomimic_{variant}" and cfg.time_proj_float32 and cfg.audio_dim == DIM
    assert cfg.audio_face_mask == (variant == "preview") and cfg.audio_kv_bias == (variant == "flash")

    rng = np.random.default_rng(9)
    b, f, h, w = 2, 3, 6, 10  # 3 latent frames = 9 video frames
    lat = rng.standard_normal((b, f, h, w, TINY_I2V["in_channels"])).astype(np.float32)
    t = np.array([999.0, 321.5], np.float32)
    ctx = rng.standard_normal((b, 512, TINY_I2V["text_dim"])).astype(np.float32)
    img = rng.standard_normal((b, 5, TINY_I2V["image_dim"])).astype(np.float32)
    feats = rng.standard_normal((b, 9, 2, 768)).astype(np.float32)  # preview: 2 tokens a frame; Flash: 2 layers
    kw, ref_kw = {}, {"tokens": TOKENS}
    if variant == "preview":
        mask = (rng.uniform(size=(b, f, h // 2, w // 2)) > 0.4).astype(np.float32)
        kw["face_mask"], ref_kw["face_mask"] = mask, mask.reshape(b, -1)
    sd_t = {k: torch.from_numpy(v) for k, v in sd.items()}
    ref = reference_forward(model, sd_t, lat, t, ctx, img, feats, variant=variant, **ref_kw)
    out = ours(lat, t, ctx, image_context=img, audio=feats, **kw)
    assert_parity(out, ref, f"({variant})")
    silent = reference_forward(model, sd_t, lat, t, ctx, img, np.zeros_like(feats), variant=variant, **ref_kw)
    assert np.abs(ref - silent).max() > 1e-2  # the audio path is live (and zero features are not a no-op input)


def test_released_key_sets_overlay_and_bad_files(tmp_path, capsys):
    """Full depth (30 blocks) at tiny widths: 983 base tensors, + 220 (Flash) / + 93 (preview); the EchoMimic
    file overrides the base where both have a tensor; one error names every missing/unexpected/mis-shaped key."""
    _, base = base_dir(tmp_path, 30, seed=5)
    base_keys = TensorStore(base).keys()
    assert len(base_keys) == 983
    for variant, added in (("flash", 220), ("preview", 93)):
        sd = released_audio_tensors(variant, 30, seed=6)
        assert len(sd) == added
        sd["blocks.3.self_attn.q.weight"] = np.full((DIM, DIM), 0.25, np.float32)  # a trained base tensor
        save_file(sd, tmp_path / f"{variant}.safetensors")
        out = convert_echomimic_v3(base, tmp_path / f"{variant}.safetensors", tmp_path / variant, progress=False)
        params = load_params_numpy(out)
        assert sum(v.size for v in params.values()) == sum(
            np.prod(TensorStore(base).shape(k)) for k in base_keys) + sum(v.size for k, v in sd.items()
                                                                           if not k.startswith("blocks.3.self_attn"))
        assert np.all(params["blocks.attn1.to_q.kernel"][3] == 0.25)  # overlaid
        base_q = TensorStore(base).get("blocks.2.self_attn.q.weight")
        assert np.array_equal(params["blocks.attn1.to_q.kernel"][2], base_q.T)
        cfg, meta = read_config(out)
        assert meta["source"]["variant"] == variant and meta["sample"]["steps"] == (8 if variant == "flash" else 25)

    sd = released_audio_tensors("flash", 30, seed=7)
    del sd["blocks.29.cross_attn.v_audio.bias"]
    sd["blocks.0.cross_attn.k_audio.weight"] = sd["blocks.0.cross_attn.k_audio.weight"][:, :8]
    sd["audio_injection.extra.weight"] = np.zeros((2,), np.float32)
    save_file(sd, tmp_path / "broken.safetensors")
    rc = cli.main(["convert", "echomimic-v3", str(base), str(tmp_path / "broken.safetensors"), str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "x").exists()
    text = "\n".join(err)
    for name in ("blocks.29.cross_attn.v_audio.bias", "blocks.0.cross_attn.k_audio.weight",
                 "audio_injection.extra.weight"):
        assert name in text, text
    save_file({"something.else": np.zeros(2, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(ConversionError, match="audio2token"):
        convert_echomimic_v3(base, tmp_path / "other.safetensors", tmp_path / "y", progress=False)
    assert cli.main(["convert", "echomimic-v3", str(base), str(tmp_path / "z")]) == 2  # one input missing
    assert "BASE_DIR ECHO_FILE OUT" in capsys.readouterr().err

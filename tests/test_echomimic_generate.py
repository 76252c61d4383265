"""EchoMimicV3's two inference recipes end to end through `hallojax generate` at tiny sizes (the recipe a converted
checkpoint carries: preview = Euler, dynamic-cosine text/audio guidance, cumulative negative scaling, chunks with
pixel cross-fades, 50 Hz wav2vec2 tokens, face mask; Flash = Wan's UniPC grid, audio-only guidance, -23 LUFS
speech), with a CLIP image encoder, the Wan VAE as codec and the masked clip as the released pipeline builds it;
and the recipe pieces against the released numbers (shared/research/echomimic_v3.md §2)."""

import json

import numpy as np
import pytest

from hallojax import cli
from hallojax.models.echomimic import RECIPES
from hallojax.pipeline import SampleConfig
from hallojax.sample import long_video
from hallojax.sample.guidance import parse_guidance
from hallojax.sample.schedules import flow_schedule
from test_generate import media, probe, tiny_wan_vae  # noqa: F401  (the portrait + speech fixture)

FPS = 25


def test_recipe_numbers_are_the_released_ones():
    # Flash: Wan's FlowUniPC grid, 8 steps, shift 5: integer timesteps as the transformer embeds them
    s = flow_schedule("wan-unipc", 8, 5.0)
    assert s.timesteps.tolist() == [999, 972, 937, 892, 833, 749, 624, 416]
    np.testing.assert_allclose(s.sigmas[:-1], [.9998, .9720, .9373, .8926, .8331, .7497, .6247, .4164], atol=6e-5)
    # preview: dynamic CFG g/2 + g/2·(1 − cos(π((N − i)/N)^5))/2 on both scales (25 steps, g = 4: 4.0, 3.84, 3.48 ...)
    g = parse_guidance(RECIPES["preview"]["sample"]["guidance"])
    text = g.terms[0][1].values(25)
    np.testing.assert_allclose(text[:5], [4.0, 3.836, 3.479, 3.087, 2.746], atol=1e-3)
    i = np.arange(25)
    np.testing.assert_allclose(g.terms[1][1].values(25), 1.45 + 1.45 * (1 - np.cos(np.pi * ((25 - i) / 25) ** 5)) / 2)
    # the negative prompt's embeddings x1.5 at steps 0, 1, 2, cumulatively: x3.375 from step 2 on
    sc = SampleConfig(steps=6, negative_scale=1.5, negative_steps=2)
    np.testing.assert_allclose(sc.negative_multipliers(), [1.5, 2.25, 3.375, 3.375, 3.375, 3.375])
    # chunks of 113 frames overlapping by 8: starts 0, 105, 210, ...
    plan = long_video.plan("chunks", 300, 113, 4, overlap_frames=8)
    assert [c.start for c in plan.clips] == [0, 105, 210] and plan.clips[1].known == 8


def test_loudness_normalisation_reaches_minus_23_lufs():
    import pyloudnorm

    from hallojax.media import normalize_loudness

    t = np.arange(48000) / 16000
    wave = (0.02 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    out = normalize_loudness(wave, 16000, -23.0)
    assert abs(pyloudnorm.Meter(16000).integrated_loudness(out.astype(np.float64)) + 23.0) < 0.05
    assert np.array_equal(normalize_loudness(np.zeros(16000, np.float32), 16000, -23.0), np.zeros(16000))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny converted Wan VAE (4 latent channels), CLIP (160 wide) and wav2vec2 (full conv stack: 50 Hz, 8 wide)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Wav2Vec2Config, Wav2Vec2Model

    from hallojax.convert.clip import convert_clip
    from hallojax.convert.wav2vec2 import convert_wav2vec2

    tmp = tmp_path_factory.mktemp("encoders")
    tiny_wan_vae(tmp)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=14, hidden_act="gelu")).save_pretrained(tmp / "clip_hf")
    convert_clip(tmp / "clip_hf", tmp / "clip", progress=False)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                 conv_dim=(8,) * 7, num_conv_pos_embeddings=4,
                                 num_conv_pos_embedding_groups=2)).save_pretrained(tmp / "w2v_hf")
    convert_wav2vec2(tmp / "w2v_hf", tmp / "w2v", progress=False)
    return tmp


def echomimic_dit(path, variant: str):
    """A tiny EchoMimicV3 DiT (the preset at size=tiny on 4 latent channels), weights perturbed, carrying its
    released recipe as `hallojax convert echomimic-v3` writes it."""
    from flax import nnx

    from hallojax.checkpoint import flat_params, save_pretrained
    from hallojax.config import load_config
    from hallojax.models.wan import DiTConfig, WanDiT

    model = dict(load_config(f"configs/wan.py:echomimic-v3-{variant},dtype=float32").model)
    model.update(num_layers=1, in_channels=12, out_channels=4, image_dim=32, audio_in_dim=8)
    cfg = DiTConfig.from_dict(model)
    rng = np.random.default_rng(0)
    params = {k: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in flat_params(WanDiT(cfg, rngs=nnx.Rngs(0))).items()}
    save_pretrained(path, params, cfg, source={"format": "echomimic-v3", "variant": variant}, extra=RECIPES[variant])
    return path


@pytest.mark.parametrize("variant", ["preview", "flash"])
def test_recipe_end_to_end(variant, media, encoders, tmp_path):  # noqa: F811
    dit = echomimic_dit(tmp_path / "dit", variant)
    feats = f"wav2vec2-tokens:{encoders / 'w2v'}" if variant == "preview" else f"wav2vec2:{encoders / 'w2v'}"
    out = tmp_path / "talk.mp4"
    rc = cli.main(["generate", "--checkpoint", str(dit), "--image", str(media["image"]), "--audio", str(media["audio"]),
                   "--out", str(out), "--codec", f"wan-vae:{encoders / 'vae'}", "--audio-features", feats,
                   "--image-encoder", str(encoders / "clip"), "--clip-frames", "9", "--height", "16", "--width", "32",
                   "--steps", "2", "--no-progress", *(["--overlap", "4"] if variant == "preview" else [])])
    assert rc == 0
    frames, fps, size, codecs, _ = probe(out)
    assert (frames, size, codecs) == (round(media["seconds"] * FPS), (32, 16), ("h264", "aac"))
    side = json.loads(out.with_suffix(".json").read_text())
    s = side["settings"]
    recipe = RECIPES[variant]["sample"]
    assert s["sampler"] == recipe["sampler"] and s["known_frames"] == "condition" and s["image_context"]
    if variant == "preview":  # no prompt: the text term drops out, the audio term keeps its cosine decay
        assert s["guidance"] == "audio=cos(2.9,1.45,5)" and s["long_video"] == "chunks" and s["clips"] >= 3
    else:
        assert s["guidance"] == "audio=3" and s["loudness"] == -23.0 and s["long_video"] == "continue"

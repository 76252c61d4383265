"""The data pipeline with the real models behind its hooks: the Wan VAE as codec ("wan-vae:DIR") and
wav2vec2 as audio features ("wav2vec2:DIR"), both from directories the converters wrote; the stored values
checked against the PyTorch models."""

import numpy as np
import torch

from data_pipeline import synthetic
from data_pipeline.clips import ClipConfig, extract_clips
from data_pipeline.features import get_audio_features, to_model_range
from data_pipeline.pipeline import PrepareConfig, prepare
from data_pipeline.reader import clip_dataset
from encoder_reference import hallo3_audio_features
from hallojax.codec import get_codec
from hallojax.convert.wan_vae import convert_wan_vae
from hallojax.convert.wav2vec2 import convert_wav2vec2


LATENTS_MEAN = [0.3, -0.7, 1.1, -0.2]  # non-trivial statistics: a normalisation bug cannot hide
LATENTS_STD = [0.5, 2.0, 1.5, 0.8]


def test_prepare_with_wan_vae_codec_and_wav2vec2_features(tmp_path):
    """The stored values are the PyTorch models' own: every clip's frames and reference frame re-encoded
    by diffusers' AutoencoderKLWan (posterior mean, normalised by its latents_mean/std), every clip's
    waveform by transformers' Wav2Vec2Model (Hallo3's resampling to the frame count, layers 1..L)."""
    from diffusers import AutoencoderKLWan
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                           latents_std=LATENTS_STD).eval()
    vae.save_pretrained(tmp_path / "vae_hf")
    convert_wan_vae(tmp_path / "vae_hf", tmp_path / "vae", progress=False)
    w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                       conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                       num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)).eval()
    w2v.save_pretrained(tmp_path / "w2v_hf")
    convert_wav2vec2(tmp_path / "w2v_hf", tmp_path / "w2v", progress=False)

    codec = get_codec(f"wan-vae:{tmp_path / 'vae'}")
    assert (codec.temporal_stride, codec.spatial_stride, codec.latent_channels) == (4, 8, 4)
    feats = get_audio_features(f"wav2vec2:{tmp_path / 'w2v'}")
    out = feats(np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32), 25.0, 25)
    assert out.shape == (1, 25, 2, 16)

    synthetic.generate(tmp_path / "videos", 1, 0, synthetic.SyntheticConfig(min_seconds=2.0, max_seconds=2.0),
                       progress=False)
    cfg = PrepareConfig(clip=ClipConfig(num_frames=9, height=16, width=24), codec=codec.name,
                        audio_features=f"wav2vec2:{tmp_path / 'w2v'}")
    summary = prepare([tmp_path / "videos"], tmp_path / "prepared", cfg, progress=False)
    assert summary["clips"] == 50 // 9 and summary["videos_skipped"] == 0
    records = list(clip_dataset(tmp_path / "prepared"))
    assert len(records) == summary["clips"]
    r = records[0]
    assert r["latents"].shape == (3, 2, 3, 4)  # 9 frames -> 1 + 2 latent frames, 16x24 -> 2x3, z = 4
    assert r["ref_latent"].shape == (1, 2, 3, 4)
    assert r["audio_features"].shape == (9, 2, 16)
    # the stored latents are what the VAE gives for the stored frames' clip: decode returns 9 frames
    assert codec.decode(r["latents"][None]).shape == (1, 9, 16, 24, 3)

    clips = extract_clips(tmp_path / "videos" / r["source"], r["source"], cfg.clip)
    mean, std = np.array(LATENTS_MEAN), np.array(LATENTS_STD)

    def torch_latents(frames_uint8):  # [T, H, W, 3] -> normalised posterior mean [F, h, w, z]
        video = torch.from_numpy(np.ascontiguousarray(to_model_range(frames_uint8[None]).transpose(0, 4, 1, 2, 3)))
        with torch.no_grad():
            z = vae.encode(video).latent_dist.mean[0].numpy().transpose(1, 2, 3, 0).astype(np.float64)
        return (z - mean) / std

    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    for r in records:
        assert r["source"] == clips.source
        i = int(r["clip_index"])
        expected = torch_latents(clips.clip_frames(i, 9))
        assert_close(r["latents"], expected, 1e-4, f"clip {i} latents")
        assert_close(r["ref_latent"], torch_latents(r["ref_frame"][None]), 1e-4, f"clip {i} reference latent")
        values = extractor(r["audio"], sampling_rate=16000, return_tensors="pt").input_values
        assert_close(r["audio_features"], hallo3_audio_features(w2v, values, 9)[0], 1e-5, f"clip {i} audio features")
    stored = np.stack([r["latents"] for r in records])
    assert np.abs(stored.mean(axis=(0, 1, 2, 3))).max() > 0.2  # normalised, yet far from mean 0 / std 1


def assert_close(ours, ref, rtol, what):
    """max |ours - ref| <= rtol * max(1, max |ref|): the VAE's (1e-4) and wav2vec2's (1e-5) parity bounds."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, bound = np.abs(ours - ref).max(), rtol * max(1.0, np.abs(ref).max())
    assert err <= bound, f"{what}: max |stored - PyTorch| = {err:.3g} > {bound:.3g}"

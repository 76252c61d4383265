"""The data pipeline with the real models behind its hooks: the Wan VAE as codec ("wan-vae:DIR") and
wav2vec2 as audio features ("wav2vec2:DIR"), both from directories the converters wrote."""

import numpy as np
import torch

from data_pipeline import synthetic
from data_pipeline.clips import ClipConfig
from data_pipeline.features import get_audio_features
from data_pipeline.pipeline import PrepareConfig, prepare
from data_pipeline.reader import clip_dataset
from hallojax.codec import get_codec
from hallojax.convert.wan_vae import convert_wan_vae
from hallojax.convert.wav2vec2 import convert_wav2vec2


def test_prepare_with_wan_vae_codec_and_wav2vec2_features(tmp_path):
    from diffusers import AutoencoderKLWan
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae_hf")
    convert_wan_vae(tmp_path / "vae_hf", tmp_path / "vae", progress=False)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                 num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)).save_pretrained(
        tmp_path / "w2v_hf")
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

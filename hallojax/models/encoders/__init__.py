"""Conditioning encoders: wav2vec 2.0 (audio -> per-video-frame features) and T5 / umT5 (text -> context)."""

from hallojax.models.encoders.t5 import T5Encoder, T5EncoderConfig, encode_text, load_tokenizer
from hallojax.models.encoders.wav2vec2 import Wav2Vec2, Wav2Vec2Config, encode_audio, interpolate_features

__all__ = ["T5Encoder", "T5EncoderConfig", "Wav2Vec2", "Wav2Vec2Config", "encode_audio", "encode_text",
           "interpolate_features", "load_tokenizer"]

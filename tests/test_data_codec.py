"""The codec interface: PixelCodec is exactly lossless (numpy and jitted JAX), its layout is the documented
space-to-depth order, and get_codec / register_codec build codecs from spec strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hallojax import codec as codec_mod
from hallojax.codec import (
    CODECS,
    Codec,
    PixelCodec,
    get_codec,
    latent_frames,
    register_codec,
)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pixel_codec_round_trips_bit_for_bit(patch):
    rng = np.random.default_rng(patch)
    video = rng.uniform(-1, 1, (2, 5, 8, 12, 3)).astype(np.float32)  # arbitrary floats, not just pixel levels
    c = PixelCodec(patch)
    lat = c.encode(video)
    assert isinstance(lat, np.ndarray) and lat.shape == (2, 5, 8 // patch, 12 // patch, 3 * patch**2)
    assert c.latent_channels == 3 * patch**2 and c.spatial_stride == patch and c.temporal_stride == 1
    back = c.decode(lat)
    assert back.dtype == video.dtype and np.array_equal(back, video)

    jlat = jax.jit(c.encode)(jnp.asarray(video))
    assert isinstance(jlat, jax.Array) and np.array_equal(np.asarray(jlat), lat)
    assert np.array_equal(np.asarray(jax.jit(c.decode)(jlat)), video)


def test_pixel_codec_layout_is_dy_dx_rgb():
    video = np.arange(1 * 1 * 4 * 6 * 3, dtype=np.float32).reshape(1, 1, 4, 6, 3)
    lat = PixelCodec(2).encode(video)
    # latent (i, j) holds the 2x2 block at rows 2i..2i+1, cols 2j..2j+1, flattened (dy, dx, rgb)
    assert np.array_equal(lat[0, 0, 1, 2], video[0, 0, 2:4, 4:6].reshape(-1))
    assert np.array_equal(PixelCodec(1).encode(video), video)


def test_pixel_codec_errors_name_the_shape():
    c = PixelCodec(4)
    with pytest.raises(ValueError, match=r"multiples of 4, got 6x8"):
        c.encode(np.zeros((1, 1, 6, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\], got shape \(1, 8, 8, 3\)"):
        c.encode(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, F, H', W', 48\], got shape \(1, 1, 2, 2, 12\)"):
        c.decode(np.zeros((1, 1, 2, 2, 12), np.float32))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            PixelCodec(bad)


def test_get_codec_specs_and_registry(monkeypatch):
    assert get_codec("pixel").patch == 1 and get_codec("pixel:4").patch == 4
    assert get_codec("pixel:4").name == "pixel:4" and get_codec("pixel").name == "pixel"
    assert isinstance(get_codec("pixel:2"), Codec)
    for spec, msg in [("vae", "unknown codec 'vae'"), ("pixel:x", "integer patch"), ("", "non-empty"),
                      ("pixel:0", "positive integer")]:
        with pytest.raises(ValueError, match=msg):
            get_codec(spec)

    class Strided:
        """A stand-in VAE: temporal stride 4, spatial stride 8, 16 channels."""

        name, temporal_stride, spatial_stride, latent_channels = "fake-vae", 4, 8, 16

        def __init__(self, path):
            self.path = path

        def encode(self, video):
            b, t, h, w, _ = video.shape
            return np.zeros((b, latent_frames(self, t), h // 8, w // 8, 16), np.float32)

        def decode(self, latents):
            raise NotImplementedError

    monkeypatch.setattr(codec_mod, "CODECS", dict(CODECS))
    register_codec("fake-vae", Strided)
    c = codec_mod.get_codec("fake-vae:/ckpt/vae")
    assert c.path == "/ckpt/vae" and c.encode(np.zeros((1, 17, 64, 64, 3))).shape == (1, 5, 8, 8, 16)
    with pytest.raises(ValueError, match=r"1 \+ 4·k video frames, got 16"):
        latent_frames(c, 16)
    with pytest.raises(ValueError, match="contain no ':'"):
        register_codec("a:b", Strided)
    register_codec("broken", lambda arg: object())
    with pytest.raises(ValueError, match="returned object without"):
        codec_mod.get_codec("broken")

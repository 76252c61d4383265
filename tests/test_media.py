"""Media edges of generation: images of any mode and orientation, a face found in a real photograph and
cropped with the data pipeline's rule, audio of any container / rate / channels, and the mp4 writer."""

import os

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from hallojax.pipeline import detect_face, prepare_portrait
from hallojax.media import MediaError, read_audio, read_image, speech_16k, write_mp4


def grace_hopper() -> str:
    """A real photograph that ships inside matplotlib (sample data): Grace Hopper's portrait."""
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def test_images_of_any_mode_come_back_rgb(tmp_path):
    rgb = (np.random.default_rng(0).uniform(0, 255, (20, 30, 3))).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")  # L mode
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, axis=2))
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)  # fully transparent: white
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png") == 255).all()
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")  # 16-bit grey
    np.testing.assert_allclose(read_image(tmp_path / "deep.png")[..., 0], rgb[..., 0], atol=1)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    assert read_image(tmp_path / "palette.gif").shape == (20, 30, 3)
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    np.testing.assert_array_equal(read_image(tmp_path / "a.webp"), rgb)


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = 255  # a white band on the left of the upright picture
    img = Image.fromarray(rgb).rotate(90, expand=True)  # stored turned (as a phone camera stores it)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "phone.jpg")
    assert out.shape == (20, 40, 3) and out[:, :8].mean() > 200 and out[:, 12:].mean() < 30


def test_face_in_a_real_photograph_is_found_and_centred():
    img = read_image(grace_hopper())  # 512 x 600
    box = detect_face(img)
    assert box is not None
    cx, cy, side = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0]
    assert 220 < cx < 310 and 170 < cy < 260 and 150 < side < 300, box  # her face, not the flag or the cap
    p = prepare_portrait(img, 64, 48, box=box, box_from="detector")
    assert p.frame.shape == (48, 64, 3) and p.box_from == "detector"
    ocx, ocy = (p.box[0] + p.box[2]) / 2, (p.box[1] + p.box[3]) / 2
    assert abs(ocx - 32) < 4 and abs(ocy - 24) < 4  # the crop is centred on the face
    assert detect_face(np.full((64, 64, 3), 128, np.uint8)) is None  # nothing to find in a flat image


def test_audio_of_any_rate_channels_and_container(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 220 * t)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.flac", stereo, 44100)
    wave, rate = read_audio(tmp_path / "s.flac")
    assert rate == 44100 and wave.shape == (44100, 2)
    np.testing.assert_allclose(wave, stereo, atol=1e-4)
    mono = speech_16k(wave, rate)
    assert abs(len(mono) - 16000) <= 1
    # an m4a (AAC in mp4) at 22.05 kHz, mono
    with av.open(str(tmp_path / "s.m4a"), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=22050, layout="mono")
        x = stereo[::2, :1].T.copy()
        for i in range(0, x.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + 1024]), format="fltp", layout="mono")
            f.sample_rate, f.pts = 22050, i
            out.mux(st.encode(f))
        out.mux(st.encode())
    wave, rate = read_audio(tmp_path / "s.m4a")
    assert rate == 22050 and wave.shape[1] == 1 and abs(wave.shape[0] - 22050) < 2048
    for name, data in (("empty.wav", b""), ("junk.mp3", b"ID3" + bytes(300))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError, match=name):
            read_audio(tmp_path / name)


def test_write_mp4_round_trip_any_rate_and_channels(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (10, 16, 24, 3), dtype=np.uint8)
    audio = np.random.default_rng(2).uniform(-0.5, 0.5, (int(0.4 * 37000), 2)).astype(np.float32)
    path = write_mp4(tmp_path / "x.mp4", frames, audio, 25, 37000)  # 37 kHz: not an AAC rate -> 48 kHz
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.audio[0].codec_context.sample_rate == 48000 and c.streams.audio[0].channels == 2
        assert sum(1 for _ in c.decode(video=0)) == 10
    with pytest.raises(ValueError, match="even sizes"):
        write_mp4(tmp_path / "odd.mp4", frames[:, :15], None, 25, 16000)
    assert not (tmp_path / "odd.mp4").exists() and not list(tmp_path.glob(".*tmp*"))

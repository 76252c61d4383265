"""`hallojax generate` end to end on tiny models: the mp4 it writes, each long-video strategy, 1 vs 8
devices, the real codec / audio / text encoders, and every bad input (exit 2, one line, no output)."""

import json
import re

import av
import jax
import numpy as np
import pytest
import soundfile as sf

from data_pipeline import synthetic
from hallojax import cli
from hallojax.config import load_config
from hallojax.models.wan import DiTConfig
from hallojax.generate import Pipeline
from hallojax.train import checkpoint_manager, init_state, save

FPS = 25


class _Position:
    def get_state(self):
        return {"count": 0}


def write_workdir(path, seed=0, **model):
    """A `hallojax train` checkpoint (step 0) of the demo model with `model` overrides, every weight
    perturbed so that each mechanism (zero-initialised adapters included) affects the output."""
    config = load_config("configs/wan.py:demo,mesh=fsdp,dtype=float32", ["--config.checkpoint.async_save=False"])
    # pixel:4 at 32x32 (16 tokens a frame) keeps these tests quick; the demo itself trains on pixel:2
    config.data.codec = "pixel:4"
    config.model.update({"in_channels": 48, "out_channels": 48, **model})
    cfg = DiTConfig.from_dict(config.model)
    state = init_state(cfg, config.train, seed)
    rng = np.random.default_rng(seed)
    state["params"] = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), state["params"])
    state["ema"] = state["params"]
    manager = checkpoint_manager(path, config.checkpoint)
    save(manager, state, _Position(), config)
    manager.wait_until_finished()
    manager.close()
    return path


def tiny_wan_vae(tmp):
    """diffusers' Wan VAE at a tiny width (4 latent channels, seed 0) in tmp/vae_hf, converted to tmp/vae."""
    import torch
    from diffusers import AutoencoderKLWan

    from hallojax.convert.wan_vae import convert_wan_vae

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(tmp / "vae_hf")
    convert_wan_vae(tmp / "vae_hf", tmp / "vae", progress=False)
    return tmp / "vae"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A synthetic person not in any training set: the portrait (png + face sidecar) and 1.2 s of their
    speech as stereo 44.1 kHz FLAC."""
    tmp = tmp_path_factory.mktemp("media")
    video = synthetic.make_video(tmp, 0, seed=97, cfg=synthetic.SyntheticConfig(min_seconds=1.2, max_seconds=1.2))
    with av.open(str(video)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    from PIL import Image

    Image.fromarray(first).save(tmp / "portrait.png")
    (tmp / "portrait.face.json").write_text((tmp / "talk_00000.face.json").read_text())
    from hallojax.media import read_audio

    wave, rate = read_audio(video)
    import soxr

    stereo = soxr.resample(np.concatenate([wave, 0.5 * wave], axis=1), rate, 44100)
    sf.write(tmp / "speech.flac", stereo, 44100)
    truth = json.loads((tmp / "talk_00000.mouth.json").read_text())
    return {"dir": tmp, "image": tmp / "portrait.png", "audio": tmp / "speech.flac",
            "seconds": len(stereo) / 44100, "truth": truth}


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    return write_workdir(tmp_path_factory.mktemp("demo"))


def probe(path):
    """(video frames, fps, (w, h), codecs, audio seconds) of an mp4, decoded with PyAV."""
    with av.open(str(path)) as c:
        vs, aus = c.streams.video, c.streams.audio
        codecs = (vs[0].codec_context.name, aus[0].codec_context.name) if vs and aus else None
        frames = sum(1 for _ in c.decode(video=0))
        fps = float(vs[0].average_rate)
        size = (vs[0].codec_context.width, vs[0].codec_context.height)
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
        rate = c.streams.audio[0].codec_context.sample_rate
    return frames, fps, size, codecs, samples / rate


def test_generate_cli_writes_a_talking_video(demo_ckpt, media, tmp_path, capsys):
    out = tmp_path / "talk.mp4"
    rc = cli.main(["generate", "--checkpoint", str(demo_ckpt), "--image", str(media["image"]), "--audio",
                   str(media["audio"]), "--out", str(out), "--steps", "3", "--seed", "5", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    frames, fps, size, codecs, audio_s = probe(out)
    n = round(media["seconds"] * FPS)
    assert (frames, fps, size, codecs) == (n, FPS, (32, 32), ("h264", "aac"))
    assert abs(frames / fps - media["seconds"]) <= 1 / FPS and abs(audio_s - media["seconds"]) <= 1 / FPS
    side = json.loads(out.with_suffix(".json").read_text())
    s = side["settings"]
    assert s["seed"] == 5 and s["steps"] == 3 and s["codec"] == "pixel:4" and s["frames"] == n
    assert s["face_box_from"] == "sidecar" and s["long_video"] == "overlap" and s["audio_channels"] == 2
    assert {"encode_s", "denoise_s", "decode_s", "seconds_per_video_second"} <= set(side["timings"])
    assert "wrote" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


STRATEGIES = {"motion": dict(motion_frames=1), "continue": dict(in_channels=2 * 48 + 4), "overlap": {}}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_long_video_strategies(strategy, media, tmp_path):
    ckpt = write_workdir(tmp_path / "ckpt", seed=1, **STRATEGIES[strategy])
    pipe = Pipeline.load(ckpt)
    r = pipe.generate(media["image"], media["audio"], steps=2, long_video_strategy=strategy, progress=False)
    n = round(media["seconds"] * FPS)
    assert r.frames.shape == (n, 32, 32, 3) and r.settings["long_video"] == strategy
    assert len(r.plan.clips) >= 3, r.plan.describe()
    decode = lambda lat: (np.clip((pipe.codec.decode(lat)[0] + 1) * 127.5, 0, 255).round()).astype(np.uint8)  # noqa: E731
    if strategy == "overlap":  # one sequence, decoded whole
        assert len(r.latents) == 1 and r.latents[0].shape[1] >= n
        np.testing.assert_array_equal(r.frames, decode(r.latents[0])[:n])
        return
    m = r.plan.overlap
    assert len(r.latents) == len(r.plan.clips)
    videos = [decode(lat) for lat in r.latents]
    for k, clip in enumerate(r.plan.clips):
        a, b = clip.emit
        np.testing.assert_array_equal(r.frames[a:b], videos[k][a - clip.start:b - clip.start])
        if k:  # the clip started from the previous clip's last m frames, pasted exactly
            np.testing.assert_array_equal(videos[k][:m], videos[k - 1][-m:])
    first = videos[0][:r.plan.clips[0].known]  # clip 0 starts from the portrait (motion frames / i2v frame)
    np.testing.assert_array_equal(first, np.repeat(r.portrait.frame[None], len(first), axis=0))
    # the known frames condition the clip: generated frames differ from the same clip without them
    assert np.abs(videos[1][m:].astype(int) - videos[0][m:].astype(int)).mean() > 0


def test_sharded_generation_equals_one_device(demo_ckpt, media, devices):
    kw = dict(steps=2, guidance="audio=2", progress=False)
    one = Pipeline.load(demo_ckpt, devices=devices[:1]).generate(media["image"], media["audio"], **kw)
    # FSDP x 8; FSDP x 4 with the tokens over context x 2: XLA's partitioning, then Ulysses and the ring
    context = ["--config.mesh.context=2"]
    for overrides in ([], context, context + ["--config.model.context_parallel=ulysses"],
                      context + ["--config.model.context_parallel=ring"]):
        pipe = Pipeline.load(demo_ckpt, overrides=overrides)
        assert pipe.mesh.size == 8 and pipe.mesh.shape["context"] == (2 if overrides else 1)
        many = pipe.generate(media["image"], media["audio"], **kw)
        ref = one.latents[0]
        err = np.abs(many.latents[0] - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, (overrides, err)
    # and the audio is live: other speech gives another video
    silent = Pipeline.load(demo_ckpt, devices=devices[:1]).generate(
        media["image"], (np.zeros((48000, 1), np.float32), 48000), allow_silent=True, **kw)
    assert np.abs(silent.latents[0][:, :10] - one.latents[0][:, :10]).max() > 1e-3


def test_real_codec_audio_and_text_encoders(media, tmp_path):
    """A converted DiT with the Wan VAE as codec, wav2vec2 features and a umT5 prompt, all from converted
    directories; three guidance passes (EchoMimicV3's chain)."""
    from flax import nnx
    from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    from hallojax.checkpoint import flat_params, save_pretrained
    from hallojax.convert.t5 import convert_umt5
    from hallojax.convert.wav2vec2 import convert_wav2vec2
    from hallojax.models.wan import WanDiT
    from test_t5 import TINY, make_tokenizer

    tiny_wan_vae(tmp_path)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                 num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)).save_pretrained(
        tmp_path / "w2v_hf")
    convert_wav2vec2(tmp_path / "w2v_hf", tmp_path / "w2v", progress=False)
    UMT5EncoderModel(UMT5Config(**dict(TINY, feed_forward_proj="gated-gelu"))).save_pretrained(tmp_path / "t5_hf")
    convert_umt5(tmp_path / "t5_hf", tmp_path / "t5", progress=False)
    make_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = DiTConfig(num_layers=2, num_heads=4, head_dim=16, ffn_dim=64, in_channels=4, out_channels=4, text_dim=32,
                    freq_dim=32, dtype="float32", audio="cross_attn", audio_align="group", audio_in_layers=2,
                    audio_in_dim=16, audio_window=1, audio_hidden=16, audio_tokens=2, audio_dim=16, audio_stride=4,
                    identity_tokens=True, extra_gate_init=1.0)
    params = flat_params(WanDiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = {k: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    save_pretrained(tmp_path / "dit", params, cfg)

    out = tmp_path / "talk.mp4"
    rc = cli.main(["generate", "--checkpoint", str(tmp_path / "dit"), "--image", str(media["image"]),
                   "--audio", str(media["audio"]), "--out", str(out), "--codec", f"wan-vae:{tmp_path / 'vae'}",
                   "--audio-features", f"wav2vec2:{tmp_path / 'w2v'}", "--text-encoder", str(tmp_path / "t5"),
                   "--tokenizer", str(tmp_path / "tok"), "--prompt", "a woman walks by the river",
                   "--guidance", "echomimic", "--clip-frames", "9", "--height", "16", "--width", "32",
                   "--steps", "2", "--no-progress"])
    assert rc == 0
    frames, fps, size, codecs, _ = probe(out)
    assert (frames, size, codecs) == (round(media["seconds"] * FPS), (32, 16), ("h264", "aac"))
    s = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert s["guidance"] == "text=4,audio=2.9" and s["prompt"] == "a woman walks by the river"


# --- bad input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, media):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp / "notes.png").write_text("this is text, not an image\n")
    (tmp / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(64))
    (tmp / "empty.wav").write_bytes(b"")
    sf.write(tmp / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp / "zero_length.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp / "tick.wav", 0.5 * np.ones(160, np.float32), 16000)  # 10 ms: shorter than one frame
    vae = tmp / "vae_dir"
    vae.mkdir()
    from hallojax.models.wan_vae import VAEConfig

    (vae / "config.json").write_text(json.dumps({"format": "hallojax-pretrained", "version": 1, "kind": "wan-vae",
                                                 "model": VAEConfig().to_dict()}))
    from flax import nnx

    from hallojax.checkpoint import flat_params, save_pretrained
    from hallojax.models.wan import WanDiT

    cfg = DiTConfig(num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, in_channels=12, out_channels=12, text_dim=8,
                    freq_dim=16, dtype="float32")
    save_pretrained(tmp / "bare_dit", {k: np.asarray(v) for k, v in flat_params(WanDiT(cfg, rngs=nnx.Rngs(0))).items()},
                    cfg)
    (tmp / "not_a_checkpoint").mkdir()
    return tmp


BAD = {
    "missing image": (["--image", "{bad}/nope.png"], "nope.png"),
    "corrupt image": (["--image", "{bad}/corrupt.png"], "corrupt.png"),
    "unsupported image": (["--image", "{bad}/notes.png"], "notes.png"),
    "missing audio": (["--audio", "{bad}/nope.wav"], "nope.wav"),
    "corrupt audio": (["--audio", "{bad}/corrupt.wav"], "corrupt.wav"),
    "empty audio file": (["--audio", "{bad}/empty.wav"], "empty.wav"),
    "audio without samples": (["--audio", "{bad}/zero_length.wav"], "zero_length.wav"),
    "silent audio": (["--audio", "{bad}/silent.wav"], "silent"),
    "audio shorter than a frame": (["--audio", "{bad}/tick.wav"], "shorter than one frame"),
    "checkpoint of the wrong kind": (["--checkpoint", "{bad}/vae_dir"], "not a DiT"),
    "not a checkpoint": (["--checkpoint", "{bad}/not_a_checkpoint"], "neither"),
    "missing checkpoint": (["--checkpoint", "{bad}/nowhere"], "no such directory"),
    "checkpoint without its codec": (["--checkpoint", "{bad}/bare_dit"], "--codec"),
    "codec of the wrong size": (["--codec", "pixel:2"], "latent channels"),
    "size the patch does not divide": (["--height", "30"], "--height 30"),
    "guidance the model lacks": (["--checkpoint", "{bad}/bare_dit", "--codec", "pixel:2",
                                  "--guidance", "audio=3"], "no audio condition"),
    "unknown guidance": (["--guidance", "lips=3"], "unknown condition"),
    "bad face box": (["--face-box", "1,2,3"], "--face-box"),
    "face box outside the image": (["--face-box", "500,500,600,600"], "outside"),
    "zero steps": (["--steps", "0"], "--steps 0"),
    "unknown step": (["--step", "7"], "--step 7"),
    "out is not mp4": (["--out", "{tmp}/talk.avi"], "mp4"),
    "shape-changing override": (["--config.model.num_layers=3"], "cannot be changed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_no_output(case, demo_ckpt, media, bad_files, tmp_path, capsys):
    extra, needle = BAD[case]
    out = tmp_path / "talk.mp4"
    args = {"--checkpoint": str(demo_ckpt), "--image": str(media["image"]), "--audio": str(media["audio"]),
            "--out": str(out)}
    extra = [a.format(bad=bad_files, tmp=tmp_path) for a in extra]
    rest = []
    i = 0
    while i < len(extra):
        if extra[i] in args:
            args[extra[i]] = extra[i + 1]
            i += 2
        else:
            rest.append(extra[i])
            i += 1
    argv = ["generate", *[x for kv in args.items() for x in kv], "--steps", "1", "--no-progress", *rest]
    rc = cli.main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d ", ln)]
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("hallojax generate: error:") and "Traceback" not in err[0], err
    assert needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*tmp*"))

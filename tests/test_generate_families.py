"""`hallojax generate` on tiny Hallo3 and LetsTalk directories (save_pretrained of perturbed random models, a tiny
converted wav2vec2 for the audio): videos over >= 2 clips with the motion frames / memory bank carried from clip
to clip, 1 vs 8 simulated devices equal within 1e-4, Hallo3's reference bank computed once per video, the
released recipes as defaults, and clear errors for a missing or mis-shaped face embedding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx
from PIL import Image

from hallojax import cli
from hallojax.checkpoint import flat_params, save_pretrained
from hallojax.codec import register_codec
from hallojax.generate import Pipeline
from hallojax.pipeline import to_uint8
from hallojax.nn.audio import window_features
from hallojax.generate_families import FamilyEngine, FamilyPipeline, Hallo3Family, LetsTalkFamily

FPS = 25
FACE_BOX = "4,2,12,10"  # in the 16 x 16 test portrait's pixels


class CausalPoolCodec:
    """A CogVideoX-VAE-shaped stand-in (tests only): 2 x 2 average pooling, CogVideoX's causal time pooling twice
    (an odd count keeps frame 0 and pools the rest in pairs, an even count pools pairs: 9 -> 5 -> 3 frames,
    Hallo3's 3 conditioning frames -> 2 -> 1), 4 channels (RGB and their mean); decode repeats."""

    name, temporal_stride, spatial_stride, latent_channels = "causal-pool", 4, 2, 4

    def encode(self, video):
        v = np.asarray(video, np.float32)
        b, t, h, w, _ = v.shape
        v = v.reshape(b, t, h // 2, 2, w // 2, 2, 3).mean((3, 5))
        for _ in range(2):
            if v.shape[1] > 1:
                head, rest = (v[:, :1], v[:, 1:]) if v.shape[1] % 2 else (v[:, :0], v)
                v = np.concatenate([head, rest.reshape(b, -1, 2, *rest.shape[2:]).mean(2)], axis=1)
        return np.concatenate([v, v.mean(-1, keepdims=True)], axis=-1)

    def decode(self, latents):
        x = np.asarray(latents, np.float32)[..., :3]
        x = np.concatenate([x[:, :1], np.repeat(x[:, 1:], 4, axis=1)], axis=1)
        return x.repeat(2, axis=2).repeat(2, axis=3)


register_codec("causal-pool", lambda arg: CausalPoolCodec())


def _save(model, cfg, path, generation, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in flat_params(model).items()}
    save_pretrained(path, params, cfg, extra={"generation": generation})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 16 x 16 portrait, 0.48 s of speech (12 frames at 25 fps), a tiny wav2vec2 (2 layers x 16) converted."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from hallojax.convert.wav2vec2 import convert_wav2vec2

    tmp = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "portrait.png")
    t = np.arange(int(0.48 * 16000)) / 16000
    sf.write(tmp / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(
        np.float32), 16000)
    np.save(tmp / "face.npy", rng.standard_normal(20).astype(np.float32))
    import torch

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                 num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)).save_pretrained(
        tmp / "w2v_hf")
    convert_wav2vec2(tmp / "w2v_hf", tmp / "w2v", progress=False)
    return {"dir": tmp, "image": tmp / "portrait.png", "audio": tmp / "speech.wav", "face": tmp / "face.npy",
            "w2v": f"wav2vec2:{tmp / 'w2v'}", "frames": 12}


def _one_device(path, run, patches):
    """(pipeline, run(pipeline)) of `path` loaded on one device, with (owner, name, value) patches applied."""
    mp = pytest.MonkeyPatch()
    for owner, name, value in patches:
        mp.setattr(owner, name, value)
    try:
        pipe = Pipeline.load(path, devices=jax.devices()[:1])
        return pipe, run(pipe)
    finally:
        mp.undo()


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --- Hallo3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hallo3_dir(inputs):
    from hallojax.models.hallo3 import Hallo3, preset

    # latents 4 x 6 (the tiny position table's 2 x 3 tokens) = 8 x 12 pixels; clips of 9 frames = 3 latent frames
    cfg = preset("tiny", audio_layers=2, audio_in_dim=16, dtype="float32")
    return _save(Hallo3(cfg, rngs=nnx.Rngs(0)), cfg, inputs["dir"] / "hallo3",
                 {"codec": "causal-pool", "audio_features": inputs["w2v"], "fps": FPS, "frames": 9, "height": 8,
                  "width": 12})


def _hallo3(pipe, inputs, **kw):
    return pipe.generate(inputs["image"], inputs["audio"], face_embedding=inputs["face"], steps=3, seed=4,
                         face_box=FACE_BOX, progress=False, **kw)


@pytest.fixture(scope="module")
def hallo3_one(hallo3_dir, inputs):
    """One device; counting the reference net's traces and the engine's bank calls, and the frames each clip's
    conditioning is built from."""
    from hallojax.models.hallo3 import Hallo3

    counts = {"trace": 0, "bank": 0}
    motions = []
    real_bank, real_engine_bank = Hallo3.reference_bank, FamilyEngine.reference_bank
    real_inputs = Hallo3Family.clip_inputs

    def bank(self, ref):
        counts["trace"] += 1
        return real_bank(self, ref)

    def engine_bank(self, ref):
        counts["bank"] += 1
        return real_engine_bank(self, ref)

    def clip_inputs(self, pipe, job, k, clip, prev_frames, prev_latents):
        full, null = real_inputs(self, pipe, job, k, clip, prev_frames, prev_latents)
        motions.append((None if prev_frames is None else prev_frames.copy(), full, null, job.feats))
        return full, null

    pipe, result = _one_device(hallo3_dir, lambda pipe: _hallo3(pipe, inputs), [
        (Hallo3, "reference_bank", bank), (FamilyEngine, "reference_bank", engine_bank),
        (Hallo3Family, "clip_inputs", clip_inputs)])
    return pipe, result, counts, motions


def test_hallo3_recipe_clips_motion_frames_and_one_bank(hallo3_one, inputs):
    pipe, r, counts, motions = hallo3_one
    assert isinstance(pipe, FamilyPipeline)
    d = pipe.sample_defaults  # the released recipe, 49-frame clips from the media the directory records
    assert (d.sampler, d.steps, d.shift, d.guidance) == ("cogvideox-dpm", 50, 1.0, "hallo3")
    assert Hallo3Family.media["frames"] == 49 and Hallo3Family.MOTION == 2
    n = inputs["frames"]
    assert r.frames.shape == (n, 8, 12, 3) and len(r.plan.clips) == 2, r.plan.describe()
    assert [c.start for c in r.plan.clips] == [-2, 5] and [c.emit for c in r.plan.clips] == [(0, 7), (7, 12)]
    # no prompt: the text branch is dropped from "text+audio=3.5" (zero text in both branches)
    assert r.settings["guidance"] == "audio=3.5" and r.settings["clips"] == 2
    assert counts == {"trace": 1, "bank": 1}  # the reference net ran once for the whole video
    decoded = [np.clip(pipe.codec.decode(lat)[0], -1, 1) for lat in r.latents]
    assert motions[0][0] is None and np.array_equal(motions[1][0], decoded[0])  # clip 1 from clip 0's frames
    decoded = [to_uint8(v) for v in decoded]
    for _, full, null, _ in motions:  # the unconditional branch: zero text and audio; face, bank, cond shared
        assert set(null) == {"context", "audio"} and not null["context"].any() and not null["audio"].any()
        assert full["cond"][:, 1:].max() == 0 and full["cond"][:, :1].any() and full["face"].shape == (1, 20)
    # windows of ±2 over the whole track's wav2vec2 frames (real neighbours across clip edges): clip 0 = 2 zero
    # frames + 0..6, clip 1 = 5..13
    feats = motions[0][3]
    windows = np.asarray(window_features(jnp.asarray(feats), 2))
    assert feats.shape[:3] == (1, 18, 2) and not motions[0][1]["audio"][:, :2].any()
    np.testing.assert_array_equal(motions[0][1]["audio"][:, 2:], windows[:, :7])
    np.testing.assert_array_equal(motions[1][1]["audio"], windows[:, 5:14])
    np.testing.assert_array_equal(r.frames[:7], decoded[0][2:])  # motion frames not re-emitted
    np.testing.assert_array_equal(r.frames[7:], decoded[1][2:7])
    assert all(np.isfinite(lat).all() for lat in r.latents)


def test_hallo3_8_devices_equal_one_and_cli(hallo3_one, hallo3_dir, inputs, devices, tmp_path, capsys):
    _, one, _, _ = hallo3_one
    pipe = Pipeline.load(hallo3_dir)
    assert pipe.mesh.devices.size == 8
    r = _hallo3(pipe, inputs)
    for a, b in zip(r.latents, one.latents):
        assert _rel(a, b) <= 1e-4, _rel(a, b)
    out = tmp_path / "talk.mp4"
    rc = cli.main(["generate", "--checkpoint", str(hallo3_dir), "--image", str(inputs["image"]), "--audio",
                   str(inputs["audio"]), "--face-embedding", str(inputs["face"]), "--face-box", FACE_BOX,
                   "--steps", "3", "--seed", "4", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert s["model"] == "hallo3" and s["sampler"] == "cogvideox-dpm" and s["frames"] == inputs["frames"]


def test_hallo3_face_embedding_errors(hallo3_one, hallo3_dir, inputs, tmp_path, capsys, monkeypatch):
    pipe = hallo3_one[0]
    with pytest.raises(ValueError, match="--face-embedding EMB.npy"):
        pipe.generate(inputs["image"], inputs["audio"], steps=3, progress=False)
    np.save(tmp_path / "bad.npy", np.zeros((2, 20), np.float32))
    with pytest.raises(ValueError, match=r"bad.npy: shape \(2, 20\).*expected 20"):
        pipe.generate(inputs["image"], inputs["audio"], face_embedding=tmp_path / "bad.npy", progress=False)
    base = ["generate", "--checkpoint", str(hallo3_dir), "--image", str(inputs["image"]), "--audio",
            str(inputs["audio"]), "--out", str(tmp_path / "x.mp4"), "--no-progress"]
    monkeypatch.setattr(FamilyPipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(base) == 2  # refused before the model is loaded
    assert "--face-embedding" in capsys.readouterr().err
    assert cli.main(base + ["--face-embedding", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy" in capsys.readouterr().err
    assert cli.main(base + ["--face-embedding", str(tmp_path / "bad.npy")]) == 2
    assert "shape (2, 20)" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_motion_plan_in_video_frames():
    from hallojax.sample.long_video import plan

    p = plan("motion", 100, 49, 4, motion_video_frames=2)  # Hallo3: 47 new frames a clip
    assert [(c.start, c.known, c.emit) for c in p.clips] == [(-2, 2, (0, 47)), (45, 2, (47, 94)), (92, 2, (94, 100))]
    p = plan("motion", 10, 4, 1, motion_video_frames=0)  # LetsTalk: clips end to end
    assert [(c.start, c.emit) for c in p.clips] == [(0, (0, 4)), (4, (4, 8)), (8, (8, 10))]
    with pytest.raises(ValueError, match="49 motion frames"):
        plan("motion", 100, 49, 4, motion_video_frames=49)


def test_hallo3_prompt_context(hallo3_one):
    """A prompt through a T5 encoder: [1, text_len, text_dim], the states after the prompt zero; the
    unconditional context zeros (Hallo3's negative); no encoder: a clear error."""
    from hallojax.models.encoders.t5 import T5Encoder, T5EncoderConfig
    from test_t5 import make_tokenizer

    pipe = hallo3_one[0]
    with pytest.raises(ValueError, match="--prompt needs a text encoder"):
        pipe._text("a cat", None)
    cfg = T5EncoderConfig(vocab_size=40, dim=24, head_dim=8, num_heads=3, ffn_dim=32, num_layers=1, num_buckets=8,
                          max_distance=16, dtype="float32")
    pipe.text = (T5Encoder(cfg, rngs=nnx.Rngs(0)), make_tokenizer())
    try:
        ctx, null = pipe._text("a cat", None)
    finally:
        pipe.text = None
    assert ctx.shape == null.shape == (1, 6, 24) and not null.any()
    assert np.abs(ctx[0, :3]).max(axis=-1).min() > 0 and not ctx[0, 3:].any()  # "a cat </s>", then padding


# --- LetsTalk -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def letstalk_dir(inputs):
    from hallojax.models.letstalk import LetsTalk, LetsTalkConfig

    # pixel:2 latents (12 channels) at 8 x 8 = 16 x 16 pixels; clips of 4 frames, a memory bank of 2
    cfg = LetsTalkConfig.named("tiny", in_channels=12, audio_in_layers=2, audio_in_dim=16)
    return _save(LetsTalk(cfg, rngs=nnx.Rngs(0)), cfg, inputs["dir"] / "letstalk",
                 {"codec": "pixel:2", "audio_features": inputs["w2v"], "fps": FPS, "height": 16, "width": 16})


def _letstalk(pipe, inputs):
    return pipe.generate(inputs["image"], inputs["audio"], steps=4, seed=2, face_box=FACE_BOX, progress=False)


@pytest.fixture(scope="module")
def letstalk_one(letstalk_dir, inputs):
    memories = []
    real = LetsTalkFamily.clip_inputs

    def clip_inputs(self, *a):
        full, null = real(self, *a)
        memories.append(np.asarray(full["memory"]))
        return full, null

    pipe, result = _one_device(letstalk_dir, lambda pipe: _letstalk(pipe, inputs),
                               [(LetsTalkFamily, "clip_inputs", clip_inputs)])
    return pipe, result, memories


def test_letstalk_ddpm_memory_bank_over_clips(letstalk_one, inputs):
    pipe, r, memories = letstalk_one
    d = pipe.sample_defaults
    assert (d.sampler, d.steps, d.guidance) == ("ddpm", 250, "none") and pipe.family.prediction == "epsilon"
    n = inputs["frames"]
    assert r.frames.shape == (n, 16, 16, 3) and len(r.plan.clips) == 3, r.plan.describe()
    assert [c.emit for c in r.plan.clips] == [(0, 4), (4, 8), (8, 12)]
    ref = pipe.codec.encode(((np.asarray(r.portrait.frame, np.float32) / 127.5) - 1)[None, None])
    np.testing.assert_array_equal(memories[0], np.repeat(ref, 2, axis=1))  # the first clip: the portrait twice
    for k in (1, 2):  # then the previous clip's last 2 generated latent frames
        np.testing.assert_array_equal(memories[k], r.latents[k - 1][:, -2:])
    for k, lat in enumerate(r.latents):  # per-frame codec: the emitted frames are each clip's decoded latents
        np.testing.assert_array_equal(r.frames[4 * k:4 * k + 4], to_uint8(pipe.codec.decode(lat))[0])
    assert all(np.isfinite(lat).all() for lat in r.latents)


def test_letstalk_8_devices_equal_one(letstalk_one, letstalk_dir, inputs, devices):
    one = letstalk_one[1]
    pipe = Pipeline.load(letstalk_dir)
    assert pipe.mesh.devices.size == 8
    r = _letstalk(pipe, inputs)
    for a, b in zip(r.latents, one.latents):
        assert _rel(a, b) <= 1e-4, _rel(a, b)
    with pytest.raises(ValueError, match="takes no text"):
        pipe.generate(inputs["image"], inputs["audio"], prompt="hello", progress=False)
    with pytest.raises(ValueError, match="only Hallo3"):
        pipe.generate(inputs["image"], inputs["audio"], face_embedding=inputs["face"], progress=False)

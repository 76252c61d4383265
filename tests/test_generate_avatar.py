"""`hallojax generate` on a tiny HunyuanVideo-Avatar directory (save_pretrained of a perturbed random model, a tiny
random whisper, the causal pooling stand-in codec of test_generate_families): one latent buffer of 7 latent
frames covered by 3 windows of 3 with the time-aware position shift, every latent frame stepped on every step,
the audio's frame count out, 1 vs 8 simulated devices equal within 1e-4, clear --text-states errors."""

import json

import numpy as np
import pytest
import soundfile as sf
from flax import nnx
from PIL import Image

from hallojax import cli
from hallojax.generate import Pipeline
from hallojax.generate_families import AvatarPipeline, HunyuanAvatarFamily
from test_generate_families import FACE_BOX, _one_device, _rel, _save  # noqa: F401 (registers causal-pool)

FRAMES, STEPS = 20, 12  # 0.8 s at 25 fps; 12 steps cross the guidance phase and mask-scale change at step 10


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    from hallojax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig
    from hallojax.models.hunyuan_avatar import HunyuanAvatar, preset

    tmp = tmp_path_factory.mktemp("avatar")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "portrait.png")
    t = np.arange(FRAMES * 640) / 16000
    sf.write(tmp / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(
        np.float32), 16000)
    # whisper: 1 layer x 8 (2 hidden states, as the tiny avatar's audio_layers), 1 s windows (50 positions)
    wcfg = WhisperEncoderConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, num_mel_bins=16,
                                max_source_positions=50)
    _save(WhisperEncoder(wcfg, rngs=nnx.Rngs(1)), wcfg, tmp / "whisper", {}, seed=1)
    cfg = preset("tiny", in_channels=4, out_channels=4, audio_window=10, dtype="float32")  # causal-pool: 4 ch
    path = _save(HunyuanAvatar(cfg, rngs=nnx.Rngs(0)), cfg, tmp / "hyavatar",
                 {"codec": "causal-pool", "audio_features": f"whisper:{tmp / 'whisper'}", "fps": 25, "frames": 9,
                  "height": 16, "width": 16})
    np.savez(tmp / "text.npz", text_states=rng.standard_normal((5, 32)).astype(np.float32),
             text_mask=np.array([1, 1, 1, 1, 0]), text_pooled=rng.standard_normal(24).astype(np.float32),
             negative_states=rng.standard_normal((3, 32)).astype(np.float32))
    return {"dir": tmp, "path": path, "image": tmp / "portrait.png", "audio": tmp / "speech.wav",
            "text": tmp / "text.npz"}


def _run(pipe, a):
    return pipe.generate(a["image"], a["audio"], text_states=a["text"], steps=STEPS, seed=3, face_box=FACE_BOX,
                         progress=False)


@pytest.fixture(scope="module")
def one(avatar):
    """One device; every step's window indices recorded."""
    calls = []
    real = AvatarPipeline._step_program

    def program(self, live):
        fn = real(self, live)

        def spy(state, buf, idx, aidx, *rest):
            calls.append((live, np.asarray(idx), np.asarray(aidx)))
            return fn(state, buf, idx, aidx, *rest)
        return spy

    pipe, result = _one_device(avatar["path"], lambda pipe: _run(pipe, avatar),
                               [(AvatarPipeline, "_step_program", program)])
    return pipe, result, calls


def test_recipe_windows_cover_every_frame_each_step(one):
    pipe, r, calls = one
    assert isinstance(pipe, AvatarPipeline)
    d = pipe.sample_defaults
    assert (d.sampler, d.steps, d.shift, d.guidance, d.long_video) == ("euler", 50, 5.0, "hunyuan-avatar", "shift")
    assert HunyuanAvatarFamily.media["frames"] == 129  # 33 latent frames per window
    plan = r.plan
    assert (plan.total_latent, plan.num_windows, plan.window, plan.audio_frames) == (7, 3, 3, 28)
    assert len(calls) == STEPS
    offsets = set()
    for i, (live, idx, aidx) in enumerate(calls):
        # hunyuan-avatar: equal text and audio scales (∅ + all) before step 10, then audio alone (−audio + all)
        assert live == ((0, 2) if i < 10 else (1, 2)), (i, live)
        assert np.array_equal(np.unique(idx), np.arange(7)), (i, idx)  # every latent frame, every step
        np.testing.assert_array_equal(idx, plan.latent_indices(i))
        np.testing.assert_array_equal(aidx, plan.audio_indices(i))
        assert aidx.shape == (3, 9)
        offsets.add(plan.offset(i))
    assert offsets == {0, 1, 2}  # the windows moved
    assert r.frames.shape == (FRAMES, 16, 16, 3) and r.latents[0].shape == (1, 7, 8, 8, 4)
    assert np.isfinite(r.latents[0]).all() and r.settings["windows"] == 3


def test_merge_matches_shift_plan():
    """The traced scatter in the step program is ShiftPlan.merge: checked on the plan with a wrap."""
    from hallojax.generate_families import ShiftRun

    p = ShiftRun(total_latent=7, audio_frames=28, window=3, shift=10, stride=4, frames=20)
    outs = np.random.default_rng(0).standard_normal((3, 3, 2)).astype(np.float32)
    import jax.numpy as jnp

    for i in range(3):
        idx = p.latent_indices(i)
        total = jnp.zeros((7, 2)).at[idx.reshape(-1)].add(outs.reshape(-1, 2)) / p.counts(i)[:, None]
        np.testing.assert_allclose(np.asarray(total), p.merge(i, outs), rtol=1e-6)
    assert [c.emit for c in p.clips] == [(0, 12), (12, 20), (20, 20)]


def test_8_devices_equal_one_and_cli(one, avatar, devices, tmp_path, capsys):
    r1 = one[1]
    pipe = Pipeline.load(avatar["path"])
    assert pipe.mesh.devices.size == 8
    r8 = _run(pipe, avatar)
    err = _rel(r8.latents[0], r1.latents[0])
    print(f"avatar generate 8 vs 1 devices: max rel {err:.2e}")
    assert err <= 1e-4, err
    out = tmp_path / "talk.mp4"
    rc = cli.main(["generate", "--checkpoint", str(avatar["path"]), "--image", str(avatar["image"]), "--audio",
                   str(avatar["audio"]), "--text-states", str(avatar["text"]), "--face-box", FACE_BOX, "--steps", "2",
                   "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert s["model"] == "hunyuan-avatar" and s["frames"] == FRAMES and s["long_video"] == "shift"


def test_text_states_errors(one, avatar, tmp_path, capsys, monkeypatch):
    pipe = one[0]
    np.savez(tmp_path / "wide.npz", text_states=np.zeros((4, 31), np.float32))
    with pytest.raises(ValueError, match=r"wide.npz: text_states has shape \(4, 31\); expected \[L, 32\]"):
        pipe.generate(avatar["image"], avatar["audio"], text_states=tmp_path / "wide.npz", progress=False)
    np.savez(tmp_path / "keys.npz", states=np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match=r"keys.npz: keys \['states'\]; expected text_states.*unknown"):
        pipe.generate(avatar["image"], avatar["audio"], text_states=tmp_path / "keys.npz", progress=False)
    np.savez(tmp_path / "pooled.npz", text_states=np.zeros((4, 32), np.float32), text_pooled=np.zeros(3))
    with pytest.raises(ValueError, match=r"text_pooled has shape \(3,\); expected \[24\]"):
        pipe.generate(avatar["image"], avatar["audio"], text_states=tmp_path / "pooled.npz", progress=False)
    base = ["generate", "--checkpoint", str(avatar["path"]), "--image", str(avatar["image"]), "--audio",
            str(avatar["audio"]), "--out", str(tmp_path / "x.mp4"), "--no-progress"]
    monkeypatch.setattr(AvatarPipeline, "generate", lambda *a, **k: pytest.fail("generated"))
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(base + ["--text-states", str(tmp_path / "missing.npz")]) == 2  # before the model is loaded
    assert "missing.npz" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()

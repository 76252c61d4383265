"""Hallo3 and HunyuanVideo-Avatar trained on prepared clips: `prepare` with the per-video files (face embeddings,
text states), the codec extras (`--extras hallo3` / `hunyuan-avatar`) and the audio features (wav2vec2 / whisper)
on synthetic videos with a tiny random CogVideoX VAE codec; the stored extras against an independent computation;
the family batches (`families.Hallo3Clips` / `AvatarClips`); one tiny train step on 1 and 8 devices equal; the
data position resumed exactly; a video without its face embedding skipped and reported; sets without the extras
or with a codec of the wrong stride refused in one line."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipeline import synthetic
from data_pipeline.clips import ClipConfig, SkipVideo, extract_clips
from data_pipeline.extras import VideoConditioning, hallo3_motion_draw
from data_pipeline.features import to_model_range
from data_pipeline.pipeline import PrepareConfig, prepare
from data_pipeline.reader import clip_dataset, load_manifest
from family_train import assert_same_step, train_steps
from hallojax import data, families
from hallojax.checkpoint import flat_params, save_pretrained
from hallojax.codec import get_codec
from hallojax.config import load_config

CLIP = ClipConfig(num_frames=9, height=32, width=48)  # tiny VAE (stride 8): latents [3, 4, 6, 4], tiny Hallo3's grid
VIDEOS = ["talk_00000.mp4", "talk_00001.mp4", "talk_00002.mp4"]  # 1.5 s each: 4 clips of 9 frames
# Adam eps = 1 makes an update about lr·g (the 1- vs 8-device deltas compare gradients), as test_train_hallo3
TINY = ["--config.train.learning_rate=1.0", "--config.train.eps=1.0"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three synthetic videos, a tiny random CogVideoX VAE (the codec) and a tiny random wav2vec2."""
    from hallojax.models.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig
    from hallojax.models.encoders.wav2vec2 import Wav2Vec2, Wav2Vec2Config

    tmp = tmp_path_factory.mktemp("famdata")
    synthetic.generate(tmp / "videos", 3, 0, synthetic.SyntheticConfig(min_seconds=1.5, max_seconds=1.5),
                       progress=False)
    vcfg = CogVideoXVAEConfig.preset("tiny", scaling_factor=0.7)
    save_pretrained(tmp / "vae", flat_params(CogVideoXVAE(vcfg, rngs=nnx.Rngs(0))), vcfg)
    # 3 layers x 8: the tiny Hallo3's audio sizes, so its train step is test_train_hallo3's (one compile, cached)
    wcfg = Wav2Vec2Config(hidden_size=8, num_layers=3, num_heads=2, intermediate_size=16, conv_dim=(8, 8),
                          conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                          num_conv_pos_embedding_groups=2)
    save_pretrained(tmp / "w2v", flat_params(Wav2Vec2(wcfg, rngs=nnx.Rngs(1))), wcfg)
    return tmp


@pytest.fixture(scope="module")
def hallo3_set(media):
    """Face embeddings for 2 of the 3 videos (the third is skipped), one text-states entry for every video."""
    rng = np.random.default_rng(0)
    np.savez(media / "faces.npz", **{VIDEOS[0]: rng.standard_normal(20), VIDEOS[1]: rng.standard_normal(20)})
    np.savez(media / "t5.npz", **{"*": rng.standard_normal((4, 24))})
    cfg = PrepareConfig(clip=CLIP, codec=f"cogvideox-vae:{media / 'vae'}", audio_features=f"wav2vec2:{media / 'w2v'}",
                        face_embeddings=str(media / "faces.npz"), text_states=str(media / "t5.npz"), extras="hallo3")
    summary = prepare([media / "videos"], media / "hallo3", cfg, progress=False)
    assert (summary["videos_ok"], summary["videos_skipped"], summary["clips"]) == (2, 1, 8)
    return media / "hallo3"


def assert_vae_close(stored, want, what):
    """The VAE bound (1e-4 of max(1, max |want|)): prepare encodes clips in batches, the check one at a time."""
    assert stored.shape == want.shape, (what, stored.shape, want.shape)
    err = np.abs(np.asarray(stored, np.float64) - want).max()
    print(f"{what}: max |stored - encoded| = {err:.3g}")
    assert err <= 1e-4 * max(1.0, np.abs(want).max()), f"{what}: max |stored - encoded| = {err:.3g}"


def prepared_config(spec: str, prepared, overrides=()):
    config = load_config(spec, [*TINY, f"--config.data.prepared={prepared}", *overrides])
    data.configure(config)
    return config


def test_hallo3_extras_match_an_independent_encoding(media, hallo3_set):
    report = json.loads((hallo3_set / "report.json").read_text())
    assert [(s["source"], s["reason"]) for s in report["skipped"]] == [
        (VIDEOS[2], f"no face embedding for {VIDEOS[2]!r} in --face-embeddings {media / 'faces.npz'}")]
    codec = get_codec(f"cogvideox-vae:{media / 'vae'}")
    records = sorted(clip_dataset(hallo3_set), key=lambda r: (r["source"], int(r["clip_index"])))
    faces = np.load(media / "faces.npz")
    for r in records[::3]:
        i = int(r["clip_index"])
        frames = to_model_range(extract_clips(media / "videos" / r["source"], r["source"], CLIP).clip_frames(i, 9))
        ref = to_model_range(r["ref_frame"])
        sigma, eps, zero = hallo3_motion_draw(CLIP.seed, r["source"], i, 32, 48)
        assert 0.01 < sigma < 0.2 and 0.05 < zero.mean() < 0.15  # exp(N(-3, 0.5²)); ~10 % of pixels
        motion = frames[:2] + sigma * eps
        motion[:, zero] = 0.0
        want = codec.encode(np.concatenate([ref[None], motion])[None])[0]  # [reference, motion₁, motion₂] -> 1 latent
        assert_vae_close(r["concat_latent"], want, "concat latent")
        masked = ref * r["face_mask"][:, :, None]
        assert 0 < r["face_mask"].mean() < 1
        assert_vae_close(r["masked_ref_latent"], codec.encode(masked[None, None])[0], "masked reference latent")
        np.testing.assert_array_equal(r["face_embedding"], faces[r["source"]].astype(np.float32))
        assert r["text_states"].shape == (4, 24) and "text_pooled" not in r


def train_one_and_eight(spec: str, prepared, devices, workdir):
    """(config, the prepared source's first global batch, one step on it on 1 device, `run` (what `hallojax train`
    calls) of one step on the set with the config's FSDP over 8 devices, checkpointed)."""
    from hallojax.train import run

    config = prepared_config(spec, prepared)
    batch = next(families.make_source(config, families.model_config(config.model), list(range(8))))
    one = train_steps(config, batch, devices, {}, 1)
    result = run(load_config(spec, [*TINY, f"--config.data.prepared={prepared}", "--config.train.steps=1",
                                    "--config.checkpoint.every=1", "--config.checkpoint.async_save=False"]), workdir)
    return config, batch, one, {**result, "workdir": workdir}


def assert_same_update(one, result):
    """One step on 1 device and `run`'s first step over 8: the loss and every parameter's update agree
    (`family_train.assert_same_step`; `run` reports no gradient norm: the update compares the gradients)."""
    init, [(_, grad_norm, _)] = one
    assert result["losses"] and np.isfinite(result["losses"]).all()
    assert_same_step(one, (init, [(result["losses"][0], grad_norm, jax.device_get(result["state"]))]))


@pytest.fixture(scope="module")
def hallo3_steps(hallo3_set, devices, tmp_path_factory):
    return train_one_and_eight("configs/hallo3.py:stage2,size=tiny", hallo3_set, devices,
                               tmp_path_factory.mktemp("hallo3-run"))


def test_hallo3_batches_and_step_on_1_and_8_devices(hallo3_set, hallo3_steps):
    config, batch, one, result = hallo3_steps
    m = config.model
    # from the manifest: wav2vec2 [T, 3, 8], face [20], T5 [4, 24]; the tiny VAE's 4 channels on a 4 x 6 grid
    assert (m.audio_layers, m.audio_in_dim, m.face_in, m.text_dim, m.out_channels, m.in_channels) == (3, 8, 20, 24,
                                                                                                     4, 8)
    assert {k: v.shape for k, v in batch.items()} == {
        "latents": (8, 3, 4, 6, 4), "image_latent": (8, 1, 4, 6, 4), "reference": (8, 1, 4, 6, 4), "face": (8, 20),
        "audio": (8, 9, 5, 3, 8), "context": (8, 6, 24)}
    # a 5-frame window per frame, clamped at the clip's ends; text padded with zeros to model.text_len = 6
    by_latents = {r["latents"].tobytes(): r for r in clip_dataset(hallo3_set)}
    r = by_latents[np.asarray(batch["latents"][0]).tobytes()]
    idx = np.clip(np.arange(9)[:, None] + np.arange(-2, 3)[None], 0, 8)
    np.testing.assert_array_equal(batch["audio"][0], r["audio_features"][idx])
    np.testing.assert_array_equal(batch["context"][0, :4], r["text_states"])
    assert not batch["context"][0, 4:].any()
    assert_same_update(one, result)


def test_hallojax_train_checkpoints_the_data_position_and_media(hallo3_set, hallo3_steps):
    """The run's checkpoint holds its data position (records consumed: resumable on any topology) and the
    clips' media (what `hallojax generate` feeds the model after the set is gone)."""
    ckpt = Path(hallo3_steps[3]["workdir"]) / "checkpoints" / "1"
    assert json.loads((ckpt / "data" / "metadata").read_text()) == {"position": 8}
    media = json.loads((ckpt / "config" / "metadata").read_text())["data"]["media"]
    assert media["codec"] == f"cogvideox-vae:{hallo3_set.parent / 'vae'}" and media["frames"] == 9


def test_data_position_resumes_exactly(hallo3_set):
    config = prepared_config("configs/hallo3.py:stage2,size=tiny", hallo3_set, ["--config.train.batch_size=2"])
    cfg = families.model_config(config.model)
    a = families.make_source(config, cfg, [0, 1])
    batches = [next(a) for _ in range(6)]  # 12 records: past the first epoch of 8
    b = families.make_source(config, cfg, [1])  # another process's row, resumed after 4 batches
    b.set_state({"position": 8})
    for k in (4, 5):
        got = next(b)
        assert set(got) == set(batches[k])
        for key in got:
            np.testing.assert_array_equal(got[key][0], batches[k][key][1], err_msg=key)
    assert b.get_state() == {"position": 12} == a.get_state()


def test_sets_without_extras_or_with_another_stride_are_refused(hallo3_set):
    manifest = load_manifest(hallo3_set)
    config = load_config("configs/hallo3.py:stage2,size=tiny", [f"--config.data.prepared={hallo3_set}"])
    bare = {**manifest, "record_shapes": {k: v for k, v in manifest["record_shapes"].items()
                                          if k not in ("concat_latent", "masked_ref_latent")}}
    with pytest.raises(ValueError, match=r"manifest.json: model.kind=hallo3 needs records with \['concat_latent', "
                                         r"'masked_ref_latent'\]: prepare the set with --extras hallo3"):
        data.adopt_prepared_sizes(config, bare)
    strided = {**manifest, "codec": {**manifest["codec"], "temporal_stride": 1}}
    with pytest.raises(ValueError, match="manifest.json: codec .* has temporal stride 1; model.kind=hallo3 groups 4"):
        data.adopt_prepared_sizes(config, strided)
    avatar = load_config("configs/hunyuan_avatar.py:tiny", [f"--config.data.prepared={hallo3_set}"])
    with pytest.raises(ValueError, match=r"needs records with \['audio_features', 'ref_video_latent'\]: prepare the "
                                         r"set with --audio-features whisper:DIR \(not wav2vec2:.*--extras hunyuan"):
        data.adopt_prepared_sizes(avatar, manifest)


def test_bad_conditioning_files_name_file_and_key(tmp_path):
    np.savez(tmp_path / "faces.npz", **{"a.mp4": np.zeros(4), "b.mp4": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"--face-embeddings .*faces.npz: key 'b.mp4' has shape \[2, 4\]"):
        VideoConditioning(face_embeddings=str(tmp_path / "faces.npz"))
    np.savez(tmp_path / "text.npz", **{"a.mp4": np.zeros((3, 4)), "a.mp4/mask": np.ones(2)})
    with pytest.raises(ValueError, match=r"text.npz: key 'a.mp4/mask' has shape \[2\]; expected \[3\]"):
        VideoConditioning(text_states=str(tmp_path / "text.npz"))
    np.savez(tmp_path / "text.npz", **{"a.mp4": np.zeros((3, 4)), "b.mp4": np.zeros((3, 4)),
                                       "a.mp4/pooled": np.ones(2)})
    with pytest.raises(ValueError, match=r"key 'b.mp4/pooled' is missing"):
        VideoConditioning(text_states=str(tmp_path / "text.npz"))
    with pytest.raises(ValueError, match=r"--text-states .*nothing.npz: not a readable .npz"):
        VideoConditioning(text_states=str(tmp_path / "nothing.npz"))
    np.savez(tmp_path / "text.npz", **{"a.mp4/mask": np.ones(2)})
    with pytest.raises(ValueError, match=r"text.npz: key 'a.mp4/mask' without states 'a.mp4'"):
        VideoConditioning(text_states=str(tmp_path / "text.npz"))
    # values are read per video (lazily): a non-finite one skips that video, with the key in its reason
    np.savez(tmp_path / "faces.npz", **{"a.mp4": np.zeros(4), "b.mp4": np.array([0, np.nan, 0, 0])})
    faces = VideoConditioning(face_embeddings=str(tmp_path / "faces.npz"))
    assert faces.fields("a.mp4")["face_embedding"].tolist() == [0, 0, 0, 0]
    with pytest.raises(SkipVideo, match=r"faces.npz: key 'b.mp4' holds non-finite values"):
        faces.fields("b.mp4")


# --- HunyuanVideo-Avatar ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def avatar_set(media):
    """A tiny random whisper (1 layer x 8: 2 hidden states), per-video LLaVA-like states of 7, 3 and 5 tokens with
    masks (right padding: the 5-token one has 4 valid) and pooled vectors; no face embeddings (the Avatar takes
    none): all 3 videos, 12 clips."""
    from hallojax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig

    wcfg = WhisperEncoderConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, num_mel_bins=16,
                                max_source_positions=50)
    save_pretrained(media / "whisper", flat_params(WhisperEncoder(wcfg, rngs=nnx.Rngs(2))), wcfg)
    rng, texts = np.random.default_rng(1), {}
    for video, n in zip(VIDEOS, (7, 3, 5)):
        texts.update({video: rng.standard_normal((n, 32)), f"{video}/mask": (np.arange(n) < min(n, 4)) * 1.0,
                      f"{video}/pooled": rng.standard_normal(24)})
    np.savez(media / "llava.npz", **texts)
    cfg = PrepareConfig(clip=CLIP, codec=f"cogvideox-vae:{media / 'vae'}",
                        audio_features=f"whisper:{media / 'whisper'}", text_states=str(media / "llava.npz"),
                        extras="hunyuan-avatar")
    summary = prepare([media / "videos"], media / "avatar", cfg, progress=False)
    assert (summary["videos_ok"], summary["videos_skipped"], summary["clips"]) == (3, 0, 12)
    return media / "avatar"


def test_avatar_records_match_an_independent_computation(media, avatar_set):
    from hallojax.checkpoint import load_pretrained
    from hallojax.models.encoders.whisper import encode_audio

    codec = get_codec(f"cogvideox-vae:{media / 'vae'}")
    whisper, _ = load_pretrained(media / "whisper")
    texts = np.load(media / "llava.npz")
    for r in list(clip_dataset(avatar_set))[::4]:
        ref = to_model_range(r["ref_frame"])
        assert_vae_close(r["ref_video_latent"], codec.encode(np.repeat(ref[None, None], 9, axis=1))[0], "ref latents")
        # the release's windows: 4 zero whisper frames in front, video frame f reads the 10 from 2f (25 fps)
        states = np.asarray(encode_audio(whisper, r["audio"][None], mel_dtype="float16"))[0]  # [50, 2, 8]
        padded = np.concatenate([np.zeros((4, 2, 8), np.float32), states])
        want = np.stack([padded[2 * f:2 * f + 10] for f in range(9)]).reshape(9, 20, 8)
        np.testing.assert_allclose(r["audio_features"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_array_equal(r["text_states"], texts[r["source"]].astype(np.float32))
        np.testing.assert_array_equal(r["text_pooled"], texts[r["source"] + "/pooled"].astype(np.float32))


def test_avatar_batches_and_step_on_1_and_8_devices(avatar_set, devices, tmp_path):
    config, batch, one, result = train_one_and_eight("configs/hunyuan_avatar.py:tiny", avatar_set, devices, tmp_path)
    m = config.model
    # whisper windows [T, 10 x 2, 8]; the tiny VAE's 4 channels
    assert (m.audio_window, m.audio_layers, m.audio_channels, m.in_channels, m.out_channels) == (10, 2, 8, 4, 4)
    assert {k: v.shape for k, v in batch.items()} == {
        "latents": (8, 3, 4, 6, 4), "ref_latents": (8, 3, 4, 6, 4), "audio": (8, 9, 10, 2, 8),
        "face_mask": (8, 3 * 2 * 3), "text": (8, 5, 32), "text_mask": (8, 5), "pooled": (8, 24)}
    by_latents = {r["latents"].tobytes(): r for r in clip_dataset(avatar_set)}
    for i in range(8):
        r = by_latents[np.asarray(batch["latents"][i]).tobytes()]
        n = min(5, r["text_states"].shape[0])  # 7 tokens cropped to train.text_len = 5; 3 padded with zeros
        np.testing.assert_array_equal(batch["text"][i, :n], r["text_states"][:n])
        assert not batch["text"][i, n:].any()
        assert batch["text_mask"][i].tolist() == [*r["text_mask"][:n], *[0] * (5 - n)]
        np.testing.assert_array_equal(batch["pooled"][i], r["text_pooled"])
        np.testing.assert_array_equal(batch["audio"][i].reshape(9, 20, 8), r["audio_features"])
    assert 0 < batch["face_mask"].min() and batch["face_mask"].max() <= 1
    assert_same_update(one, result)


def test_captions_are_encoded_by_the_t5_in_prepare(media, tmp_path):
    """--captions + --text-encoder + --tokenizer: text states [text_len, D] = the T5's final states of the caption's
    tokens (its closing </s> included), zeros after; a video without a caption skipped and reported."""
    from test_t5 import make_tokenizer

    from hallojax.models.encoders.t5 import T5Encoder, T5EncoderConfig

    tcfg = T5EncoderConfig(vocab_size=40, dim=24, head_dim=8, num_heads=3, ffn_dim=40, num_layers=2, num_buckets=16,
                           max_distance=24, act="relu", gated=False, per_layer_bias=False, dtype="float32")
    encoder = T5Encoder(tcfg, rngs=nnx.Rngs(3))
    save_pretrained(tmp_path / "t5", flat_params(encoder), tcfg)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    captions = {VIDEOS[0]: "a man walks by the river", VIDEOS[1]: "a young woman"}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    cfg = PrepareConfig(clip=CLIP, codec="pixel:8", captions=str(tmp_path / "captions.json"),
                        text_encoder=str(tmp_path / "t5"), tokenizer=str(tmp_path / "tokenizer"), text_len=8)
    summary = prepare([media / "videos"], tmp_path / "prepared", cfg, progress=False)
    assert (summary["videos_ok"], summary["videos_skipped"]) == (2, 1)
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert report["skipped"][0]["reason"] == f"no caption for {VIDEOS[2]!r} in --captions {tmp_path}/captions.json"
    seen = set()
    for r in clip_dataset(tmp_path / "prepared"):
        ids = tokenizer(captions[r["source"]])["input_ids"]  # the words and </s>
        want = np.asarray(encoder(np.asarray(ids)[None]).last_hidden_state)[0]
        assert r["text_states"].shape == (8, 24)
        np.testing.assert_allclose(r["text_states"][:len(ids)], want, rtol=1e-5, atol=1e-6)
        assert not r["text_states"][len(ids):].any()
        seen.add(r["source"])
    assert seen == set(captions)
    with pytest.raises(ValueError, match="--captions and --text-states both give the text states"):
        VideoConditioning(text_states=str(tmp_path / "any.npz"), captions=str(tmp_path / "captions.json"))


def test_whisper_features_refuse_clips_their_windows_cannot_cover(avatar_set, media, tmp_path):
    """Before any video is read: a frame rate the windows do not support, a clip longer than the encoder's window
    (here 50 positions = 1 s: 25 frames read whisper frames up to 54)."""
    spec = f"whisper:{media / 'whisper'}"
    for clip, match in ((ClipConfig(num_frames=9, fps=30.0, height=32, width=48), "fps=30.0: HunyuanVideo-Avatar"),
                        (ClipConfig(num_frames=25, height=32, width=48), "read whisper frames up to 54; the encoder "
                                                                          "gives 50 ")):
        with pytest.raises(ValueError, match=match):
            prepare([media / "videos"], tmp_path / "out", PrepareConfig(clip=clip, codec="pixel:8",
                                                                          audio_features=spec), progress=False)
        assert not (tmp_path / "out").exists()

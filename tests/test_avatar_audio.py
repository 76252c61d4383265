"""HunyuanVideo-Avatar's audio path (hallojax.models.avatar_audio) against the independent PyTorch reference
in avatar_reference.py (written from the research facts), fp32: windows, projector, latent grouping, face
mask and two stacked face-aware adapters, loaded through the released key names (`audio_rules`), on 1 and 8
simulated devices; the window and grouping indices on hand-worked examples.

Tolerance: max |ours - reference| <= 1e-5 * max(1, max |reference|) (encoder_reference.assert_parity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import avatar_reference as ref
from encoder_reference import assert_parity, perturb_
from hallojax.checkpoint import _nest, flat_params
from hallojax.convert.avatar_audio import audio_rules
from hallojax.convert.hf import DictSource
from hallojax.convert.table import import_tensors
from hallojax.models.avatar_audio import (
    AudioProjection,
    FaceAwareAudioAdapter,
    audio_windows,
    encode_avatar_audio,
    face_box_mask,
    face_mask_tokens,
    latent_audio_tokens,
    num_video_frames,
    pad_for_inference,
    window_indices,
)
from hallojax.nn.layers import stacked
from hallojax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, shard_module, use_rules

# tiny sizes: whisper states of 3 layers x 8 channels, projector hidden 24, 4 tokens x 32, adapter inner 16
LAYERS, CH, HIDDEN, TOKENS, DIM, INNER, ADAPTERS = 3, 8, 24, 4, 32, 16, 2
FRAMES, GRID = 3, (4, 6)  # latent frames, latent (h, w); tokens per frame (h/2)(w/2) = 6
T = 4 * FRAMES - 3  # 9 video frames


class AudioPath(nnx.Module):
    """The projector + adapters as the Avatar DiT holds them (adapters stacked), run back to back."""

    def __init__(self, rngs):
        self.audio_proj = AudioProjection(layers=LAYERS, channels=CH, hidden=HIDDEN, tokens=TOKENS, dim=DIM,
                                          rngs=rngs)
        self.audio_adapters = stacked(FaceAwareAudioAdapter, ADAPTERS, rngs, DIM, INNER)

    def __call__(self, windows, img, face_mask, ref_tokens, mask_scale):
        audio = latent_audio_tokens(self.audio_proj(windows))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(img, adapter):
            return adapter(img, audio, face_mask, frames=FRAMES, ref_tokens=ref_tokens, mask_scale=mask_scale)

        return run(img, self.audio_adapters)


def test_window_indices_hand_worked():
    # 25 fps: frame f starts at 2f of the sequence with 4 zero frames in front -> whisper frames 2f-4 .. 2f+5
    np.testing.assert_array_equal(window_indices(3), [list(range(0, 10)), list(range(2, 12)), list(range(4, 14))])
    np.testing.assert_array_equal(window_indices(2, fps=12.5), [list(range(0, 10)), list(range(4, 14))])
    assert window_indices(1000).shape == (400, 10)  # capped at 400 frames
    states = jnp.arange(1, 21, dtype=jnp.float32).reshape(1, 20, 1, 1)  # whisper frame a holds a + 1
    w = np.asarray(audio_windows(states, 3))[0, :, :, 0, 0]
    np.testing.assert_array_equal(w[0], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6])  # 4 zero frames, then frames 0..5
    np.testing.assert_array_equal(w[1], [0, 0, 1, 2, 3, 4, 5, 6, 7, 8])  # frames -2..7
    np.testing.assert_array_equal(w[2], np.arange(1, 11))  # frames 0..9
    np.testing.assert_array_equal(w, ref.windows(torch.from_numpy(np.array(states)), 3)[0, :, :, 0, 0].numpy())
    assert num_video_frames(16000) == 25 and num_video_frames(16639) == 25  # 640 samples per 25-fps frame
    with pytest.raises(ValueError, match="up to 23, but only 20"):
        audio_windows(states, 10)  # frame 9 needs whisper frames 2·9−4 .. 2·9+5 = 14..23
    with pytest.raises(ValueError, match="fps"):
        window_indices(3, fps=30)
    assert pad_for_inference(jnp.ones((1, 100, 10, 1, 1))).shape[1] == 129
    padded = pad_for_inference(jnp.ones((1, 200, 10, 1, 1)))
    assert padded.shape[1] == 205 and float(padded[:, 200:].max()) == 0.0


def test_latent_grouping_hand_worked():
    tokens = jnp.arange(5, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, 5, 2, 1))  # frame index
    lat = np.asarray(latent_audio_tokens(tokens))[0, :, :, 0]
    assert lat.shape == (2, 8)
    np.testing.assert_array_equal(lat[0], [0] * 8)  # latent frame 0: audio frame 0 four times
    np.testing.assert_array_equal(lat[1], [1, 1, 2, 2, 3, 3, 4, 4])  # latent frame 1: audio frames 1..4
    np.testing.assert_array_equal(lat, ref.group_latent(torch.from_numpy(np.array(tokens)))[0, :, :, 0].numpy())
    with pytest.raises(ValueError, match="4F"):
        latent_audio_tokens(jnp.zeros((1, 6, 2, 1)))


def test_face_mask_matches_torch_resizes():
    box = (21.0, 9.0, 10.0, 8.0)  # x, y, w, h in pixels; scaled x3 about the centre and clipped
    pix = face_box_mask(40, 56, box)
    ys, xs = np.nonzero(pix)
    # centre (26, 13) (floor division), half sides 15 and 12 -> rows 1..24, columns 11..40
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (1, 24, 11, 40)
    assert face_box_mask(40, 56, None).all()  # no face: the whole image
    masks = np.stack([pix, face_box_mask(40, 56, (0.0, 30.0, 9.0, 9.0))])
    ours = face_mask_tokens(masks, GRID, FRAMES)
    want = ref.face_mask_tokens(torch.from_numpy(masks), GRID, FRAMES).numpy()
    assert ours.shape == (2, FRAMES * 6) and 0 < ours.mean() < 1 and not np.isin(ours, (0, 1)).all()  # soft edges
    assert_parity(ours, want, "face mask tokens")


@pytest.fixture(scope="module")
def paths():
    torch.manual_seed(0)
    proj = perturb_(ref.AudioProj(layers=LAYERS, channels=CH, hidden=HIDDEN, tokens=TOKENS, dim=DIM), seed=1)
    adapters = [perturb_(ref.FaceAdapter(DIM, INNER), seed=2 + i) for i in range(ADAPTERS)]  # to_out non-zero
    sd = {f"audio_proj.{k}": v for k, v in proj.state_dict().items()}
    for i, a in enumerate(adapters):
        sd.update({f"audio_adapter_blocks.{i}.{k}": v for k, v in a.state_dict().items()})
    ours = AudioPath(nnx.Rngs(0))
    shapes = {k: tuple(v.shape) for k, v in flat_params(ours).items()}
    params = import_tensors(audio_rules(), DictSource(sd), shapes, ADAPTERS, what="reference", progress=False)
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, _nest({k: jnp.asarray(v) for k, v in params.items()}))
    nnx.update(ours, state)
    return dict(proj=proj, adapters=adapters, ours=ours)


def _inputs(batch, seed):
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((batch, 40, LAYERS, CH)).astype(np.float32)
    s = (GRID[0] // 2) * (GRID[1] // 2)
    img = rng.standard_normal((batch, s + FRAMES * s, DIM)).astype(np.float32)  # [ref frame ; video]
    masks = np.stack([face_box_mask(40, 56, (rng.uniform(5, 30), rng.uniform(5, 20), 10.0, 9.0))
                      for _ in range(batch)])
    return states, img, face_mask_tokens(masks, GRID, FRAMES), s


def _reference(paths, states, img, mask, s, scale):
    with torch.no_grad():
        w = ref.windows(torch.from_numpy(states), T)
        audio = ref.group_latent(paths["proj"](w))
        x = torch.from_numpy(img)
        for a in paths["adapters"]:
            x = ref.apply_adapter(a, x, audio, torch.from_numpy(mask) * scale, FRAMES, s)
    return x.numpy()


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_audio_path_matches_reference(paths, scale):
    states, img, mask, s = _inputs(2, seed=0)
    out = paths["ours"](audio_windows(jnp.asarray(states), T), jnp.asarray(img), jnp.asarray(mask), s, scale)
    want = _reference(paths, states, img, mask, s, scale)
    np.testing.assert_array_equal(np.asarray(out)[:, :s], img[:, :s])  # reference tokens untouched
    assert np.abs(want - img).max() > 0.1  # the adapters really add something
    err = assert_parity(out, want, f"audio path, mask scale {scale}")
    print(f"avatar audio path (scale {scale}): max error {err:.3g}")


def test_fresh_adapter_is_identity_and_shapes():
    adapter = nnx.eval_shape(lambda: FaceAwareAudioAdapter(rngs=nnx.Rngs(0)))  # released sizes: 3072, inner 1024
    shapes = {k: tuple(v.shape) for k, v in flat_params(adapter).items()}
    assert shapes == {"norm1.scale": (3072,), "norm1.bias": (3072,), "norm2.scale": (3072,), "norm2.bias": (3072,),
                      "to_q.kernel": (3072, 1024), "to_kv.kernel": (3072, 2048), "to_out.kernel": (1024, 3072)}
    proj = nnx.eval_shape(lambda: AudioProjection(rngs=nnx.Rngs(0)))
    assert {k: tuple(v.shape) for k, v in flat_params(proj).items()} == {
        "proj1.kernel": (19200, 1024), "proj1.bias": (1024,), "proj2.kernel": (1024, 1024), "proj2.bias": (1024,),
        "proj3.kernel": (1024, 12288), "proj3.bias": (12288,), "norm.scale": (3072,), "norm.bias": (3072,)}
    # the released module totals (research B.1): adapters 10 x 12.59M, audio_proj 33.31M
    def count(sh):
        return sum(int(np.prod(v)) for v in sh.values())
    assert 10 * count(shapes) == 125_952_000  # 125.95M
    assert count({k: v.shape for k, v in flat_params(proj).items()}) == 33_312_768  # 33.31M
    small = FaceAwareAudioAdapter(DIM, INNER, rngs=nnx.Rngs(1))
    assert not np.asarray(small.to_out.kernel[...]).any()  # zero-initialised: adding it changes nothing
    img = jnp.ones((1, 2 + FRAMES * 6, DIM))
    np.testing.assert_array_equal(small(img, jnp.ones((1, FRAMES, 16, DIM)), frames=FRAMES, ref_tokens=2), img)
    with pytest.raises(ValueError, match="whole frames"):
        small(img, jnp.ones((1, FRAMES, 16, DIM)), frames=FRAMES, ref_tokens=3)
    with pytest.raises(ValueError, match="face_mask"):
        small(img, jnp.ones((1, FRAMES, 16, DIM)), jnp.ones((1, 5)), frames=FRAMES, ref_tokens=2)


def test_sharded_equals_one_device(paths, devices):
    states, img, mask, s = _inputs(4, seed=1)
    windows = audio_windows(jnp.asarray(states), T)
    want = paths["ours"](windows, jnp.asarray(img), jnp.asarray(mask), s, 0.6)
    mesh = make_mesh(dict(fsdp=4, tensor=2))
    sharded = AudioPath(nnx.Rngs(0))
    nnx.update(sharded, nnx.state(paths["ours"]))
    shard_module(sharded, mesh, DEFAULT_RULES)
    kv = sharded.audio_adapters.to_kv.kernel.get_value()
    assert kv.addressable_shards[0].data.shape == (ADAPTERS, DIM // 4, 2 * INNER // 2)  # really split
    def put(x):
        return jax.device_put(jnp.asarray(x), batch_sharding(mesh, np.shape(x)))
    with jax.set_mesh(mesh), use_rules(DEFAULT_RULES):
        out = nnx.jit(lambda m, *a: m(*a, s, 0.6))(sharded, put(windows), put(img), put(mask))
    assert_parity(out, want, "sharded vs one device")
    assert_parity(out, _reference(paths, states, img, mask, s, 0.6), "sharded vs reference")


def test_waveform_to_windows_matches_the_release_pipeline():
    """16 kHz audio -> WhisperFeatureExtractor per window (the release's get_audio_feature) -> float16 log-mels
    -> transformers' whisper (float32), hidden states stacked -> windows -> zero windows up to 129 frames."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from encoder_reference import WHISPER_TINY_HF as HF_TINY
    from encoder_reference import speech_like
    from hallojax.convert.whisper import WHISPER_RULES
    from hallojax.models.encoders.whisper import PRESETS, WhisperEncoder

    torch.manual_seed(0)
    model = perturb_(WhisperModel(WhisperConfig(**HF_TINY)).eval(), seed=4)
    ours = WhisperEncoder(PRESETS["test"], rngs=nnx.Rngs(0))
    shapes = {k: tuple(v.shape) for k, v in flat_params(ours).items()}
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    params = import_tensors(WHISPER_RULES, DictSource(sd), shapes, HF_TINY["encoder_layers"], progress=False)
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, _nest({k: jnp.asarray(v) for k, v in params.items()}))
    nnx.update(ours, state)

    wav = speech_like(1.5, seed=7)[0]  # 24000 samples -> 37 video frames
    out = encode_avatar_audio(ours, wav)
    assert out.shape == (1, 129, 10, HF_TINY["encoder_layers"] + 1, HF_TINY["d_model"])
    feats = WhisperFeatureExtractor(chunk_length=2)(wav, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        states = torch.stack(model.encoder(feats.half().float(), output_hidden_states=True).hidden_states, dim=2)
    w = ref.windows(states, len(wav) // 640)
    want = torch.cat([w, torch.zeros_like(w[:, :1]).repeat(1, 129 - w.shape[1], 1, 1, 1)], dim=1)
    assert w.shape[1] == 37 and float(np.abs(np.asarray(out[:, 37:])).max()) == 0.0
    assert_parity(out, want.numpy(), "waveform -> windows")

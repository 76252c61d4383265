"""wav2vec 2.0 parity with transformers' Wav2Vec2Model (fp32, CPU), through the real converter and loader.

Tolerance: max |ours - transformers| <= 1e-5 * max(1, max |transformers|) on every hidden state.
Variants: "base" (group-norm feature extractor, post-norm layers, even positional kernel) saved as a
Wav2Vec2ForCTC checkpoint (``wav2vec2.`` prefix, LM head) with the legacy ``weight_g``/``weight_v``
names, like facebook/wav2vec2-base-960h; "large" (layer-norm extractor with conv biases, stable layer
norm, odd positional kernel) saved by Wav2Vec2Model with ``parametrizations.weight.original0/1``.
"""

import json
import math

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import Wav2Vec2Config as HFConfig
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from encoder_reference import assert_parity, param_count_torch, perturb_
from hallojax import cli, load_pretrained
from hallojax.checkpoint import load_params_numpy
from hallojax.convert.safetensors_io import TensorStore
from hallojax.convert.table import ConversionError
from hallojax.convert.wav2vec2 import config_from_hf, convert_wav2vec2, export_wav2vec2
from hallojax.models.encoders.wav2vec2 import Wav2Vec2, Wav2Vec2Config, encode_audio, interpolate_features
from hallojax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, use_rules

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16, 24), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embedding_groups=4)
VARIANTS = {
    "base": dict(TINY, feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                 num_conv_pos_embeddings=8, mask_time_prob=0.05, vocab_size=12),
    "large": dict(TINY, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                  num_conv_pos_embeddings=7, mask_time_prob=0.0, hidden_act="gelu_new"),
}
POS = "encoder.pos_conv_embed.conv."


def extractor(attention_mask=False):
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=attention_mask)


def waveforms(batch=2, samples=3000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400, (batch, 1)) * t)
            + 0.1 * rng.standard_normal((batch, samples))).astype(np.float32)


_BUILT: dict = {}


def _build(name, tmp_path_factory):
    if name not in _BUILT:
        _BUILT[name] = _make(name, tmp_path_factory.mktemp(f"w2v-{name}"))
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _build("base", tmp_path_factory)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return _build("large", tmp_path_factory)


def _make(name, tmp):
    torch.manual_seed(0)
    hf_cfg = HFConfig(**VARIANTS[name])
    if name == "base":
        full = perturb_(Wav2Vec2ForCTC(hf_cfg).eval(), seed=1)
        full.save_pretrained(tmp / "hf")
        path = tmp / "hf" / "model.safetensors"
        tensors = safetensors.numpy.load_file(str(path))
        for new, old in (("original0", "weight_g"), ("original1", "weight_v")):
            tensors[f"wav2vec2.{POS}{old}"] = tensors.pop(f"wav2vec2.{POS}parametrizations.weight.{new}")
        safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
        model = full.wav2vec2
    else:
        model = perturb_(Wav2Vec2Model(hf_cfg).eval(), seed=2)
        model.save_pretrained(tmp / "hf")
    convert_wav2vec2(tmp / "hf", tmp / "ours", progress=False)
    return dict(name=name, tmp=tmp, model=model)


def _reference(model, values, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(values), output_hidden_states=True, **kw)


def _check_all(out, ref, note=""):
    assert out.hidden_states.shape[0] == len(ref.hidden_states) == VARIANTS["base"]["num_hidden_layers"] + 1
    errs = [assert_parity(out.hidden_states[i], h.numpy(), f"hidden_states[{i}] {note}")
            for i, h in enumerate(ref.hidden_states)]
    errs.append(assert_parity(out.last_hidden_state, ref.last_hidden_state.numpy(), f"last {note}"))
    errs.append(assert_parity(out.extract_features, ref.extract_features.numpy(), f"extract {note}"))
    return max(errs)


def test_forward_matches_transformers(converted):
    ours, cfg = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    assert isinstance(ours, Wav2Vec2) and cfg.do_stable_layer_norm == (converted["name"] == "large")
    values = extractor()(list(waveforms()), sampling_rate=16000, return_tensors="np").input_values
    err = _check_all(ours(values), _reference(converted["model"], values), converted["name"])
    print(f"wav2vec2 {converted['name']}: max error {err:.3g}")


def test_padding_mask_matches_transformers(converted):
    """Two clips of different lengths, padded by the feature extractor, with its attention mask."""
    ours, _ = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    wav = waveforms(samples=3000, seed=3)
    inputs = extractor(True)([wav[0], wav[1, :1900]], sampling_rate=16000, padding=True, return_tensors="np")
    values, mask = inputs.input_values, inputs.attention_mask
    assert mask[1].sum() == 1900 and values.shape == (2, 3000)
    _check_all(ours(values, mask), _reference(converted["model"], values, mask), "masked")


def test_encode_audio_matches_hallo3_resampling(converted):
    """Hallo3: conv features -> linear resampling (align_corners) to the video frame count -> projection
    -> transformer; hidden_states[1:] stacked -> [B, T, layers, D]."""
    ours, _ = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    wav, fps = waveforms(samples=3500, seed=4), 25
    frames = math.ceil(3500 / 16000 * fps)
    values = extractor()(list(wav), sampling_rate=16000, return_tensors="pt").input_values

    from encoder_reference import hallo3_audio_features

    ref = hallo3_audio_features(converted["model"], values, frames)  # [B, T, layers, D]

    out = encode_audio(ours, wav, fps)
    assert out.shape == (2, frames, 2, 32)
    assert_parity(out, ref, "encode_audio")
    one = encode_audio(ours, wav[1], fps, num_frames=frames)  # a single 1-D clip
    assert one.shape == (1, frames, 2, 32)
    assert_parity(one[0], ref[1], "encode_audio 1-D")
    with pytest.raises(ValueError, match="samples"):
        encode_audio(ours, wav[:, :20], fps)  # shorter than the receptive field (30 samples)


def test_round_trip_is_bitwise(converted):
    out = converted["tmp"] / "exported"
    export_wav2vec2(converted["tmp"] / "ours", out, progress=False)
    original = {k: v.numpy() for k, v in converted["model"].state_dict().items()}
    exported = TensorStore(out, "model")
    assert sorted(exported.keys()) == sorted(original)
    for k, v in original.items():
        assert exported.get(k).dtype == v.dtype and np.array_equal(exported.get(k), v), k
    reloaded = Wav2Vec2Model.from_pretrained(out)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, converted["model"].state_dict()[k]), k
    new_cfg = json.loads((out / "config.json").read_text())
    for key, value in VARIANTS[converted["name"]].items():
        if key not in ("vocab_size", "mask_time_prob"):
            assert new_cfg[key] == (list(value) if isinstance(value, tuple) else value), key
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert Wav2Vec2FeatureExtractor(**pre).do_normalize


def test_sharded_forward_equals_one_device(converted, devices):
    shape = dict(fsdp=-1) if converted["name"] == "base" else dict(fsdp=4, tensor=2)
    mesh = make_mesh(shape)
    single, _ = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    ours, _ = load_pretrained(converted["tmp"] / "ours", mesh=mesh, rules=DEFAULT_RULES, dtype="float32")
    q = ours.layers.attn.q.kernel.get_value()
    want = (2, 32 // 8, 32) if converted["name"] == "base" else (2, 32 // 4, 32 // 2)
    assert q.addressable_shards[0].data.shape == want  # really split
    values = extractor()(list(waveforms(batch=4, seed=5)), sampling_rate=16000, return_tensors="np").input_values
    ref = single(values)
    with jax.set_mesh(mesh), use_rules(DEFAULT_RULES):
        out = nnx.jit(lambda m, x: m(x))(ours, jax.device_put(values, batch_sharding(mesh, values.shape)))
    for a, b in zip(out, ref):
        assert_parity(a, b, "sharded vs one device")
    _check_all(out, _reference(converted["model"], values), "sharded")


def test_interpolation_helper():
    x = np.random.default_rng(0).standard_normal((2, 50, 3)).astype(np.float32)
    for frames in (1, 7, 25, 50, 83):
        y = np.asarray(interpolate_features(x, frames))
        assert y.shape == (2, frames, 3)
        ref = F.interpolate(torch.from_numpy(x).transpose(1, 2), size=frames, mode="linear",
                            align_corners=True).transpose(1, 2).numpy()
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(y[:, 0], x[:, 0])  # first frame aligned
        if frames > 1:
            np.testing.assert_allclose(y[:, -1], x[:, -1], atol=1e-6)  # last frame aligned
    ramp = np.linspace(0.0, 49.0, 50, dtype=np.float32)[None, :, None]  # one step per 50 Hz frame
    y = np.asarray(interpolate_features(ramp, 25))[0, :, 0]
    assert np.all(np.diff(y) > 0)  # monotone
    np.testing.assert_allclose(y, np.linspace(0, 49, 25), atol=1e-4)  # a linear ramp is resampled exactly
    with pytest.raises(ValueError):
        interpolate_features(ramp, 0)


@pytest.mark.parametrize("name", ["base-960h", "large-lv60"])
def test_full_size_parameter_count_matches_transformers(name):
    published = {
        "base-960h": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          hidden_act="gelu", conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                          conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=False, feat_extract_norm="group",
                          num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=False,
                          mask_time_prob=0.05, vocab_size=32),
        "large-lv60": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
    }[name]
    with torch.device("meta"):
        ref = Wav2Vec2Model(HFConfig(**published))
    cfg = config_from_hf(dict(HFConfig(**published).to_dict()))
    if name == "base-960h":
        assert cfg == Wav2Vec2Config()  # our defaults are base-960h
    abstract = nnx.eval_shape(lambda: Wav2Vec2(cfg, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == param_count_torch(ref), (ours, param_count_torch(ref))


def test_converter_errors_are_listed_together(large, tmp_path):
    src = large["tmp"] / "hf"
    tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
    del tensors["encoder.layers.1.attention.k_proj.weight"]
    tensors["encoder.extra.weight"] = np.zeros((3,), np.float32)
    tensors["feature_projection.projection.weight"] = np.zeros((32, 23), np.float32)
    tensors[f"{POS}weight_g"] = tensors[f"{POS}parametrizations.weight.original0"]  # both namings at once
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError, match="both"):
        convert_wav2vec2(bad, tmp_path / "out", progress=False)
    del tensors[f"{POS}weight_g"]
    safetensors.numpy.save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_wav2vec2(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "1 missing" in msg and "encoder.layers.1.attention.k_proj.weight (expected (32, 32))" in msg
    assert "1 unexpected" in msg and "encoder.extra.weight (3,)" in msg
    assert "1 mis-shaped" in msg and "feature_projection.projection.weight: (32, 23)" in msg
    assert not (tmp_path / "out").exists()

    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, add_adapter=True)))
    with pytest.raises(ConversionError, match="add_adapter"):
        convert_wav2vec2(bad, tmp_path / "out", progress=False)
    (bad / "config.json").write_text(json.dumps(dict(cfg, feat_extract_norm="batch")))
    with pytest.raises(ConversionError, match="feat_extract_norm"):
        convert_wav2vec2(bad, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="config.json"):
        convert_wav2vec2(tmp_path, tmp_path / "out", progress=False)


def _pickled(base, tmp_path, zipfile: bool, extra=None):
    """The base checkpoint as pytorch_model.bin, in torch's zip container or the legacy plain pickle."""
    src = base["tmp"] / "hf"
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "config.json").write_text((src / "config.json").read_text())
    store = TensorStore(src, "model")
    sd = {k: torch.from_numpy(np.array(store.get(k))) for k in store.keys()}
    torch.save({**sd, **(extra or {})}, pt / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    return pt


class _CodePayload:
    """Pickles to a call of Path.touch(marker): what loading it would run, were it allowed to."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickled_checkpoint_converts_like_safetensors(base, tmp_path, zipfile):
    pt = _pickled(base, tmp_path, zipfile)
    assert cli.main(["convert", "wav2vec2", str(pt), str(tmp_path / "ours")]) == 0
    a, b = load_params_numpy(tmp_path / "ours"), load_params_numpy(base["tmp"] / "ours")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickled_checkpoint_with_code_is_refused(base, tmp_path, zipfile):
    marker = tmp_path / "payload-ran"
    pt = _pickled(base, tmp_path, zipfile, extra={"evil": _CodePayload(marker)})
    with pytest.raises(ConversionError, match="Weights only load failed") as err:
        convert_wav2vec2(pt, tmp_path / "ours", progress=False)
    assert "pytorch_model.bin" in str(err.value)
    assert not marker.exists() and not (tmp_path / "ours").exists()

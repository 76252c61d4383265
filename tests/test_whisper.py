"""Whisper encoder parity with transformers' WhisperModel encoder (fp32, CPU), through the real converter and
loader; the log-mel front end through transformers' WhisperFeatureExtractor.

Tolerance: max |ours - transformers| <= 1e-5 * max(1, max |transformers|) on every hidden state.
The tiny model (the "test" preset's sizes: 2 layers x 32, 4 heads, 80 mels, 100 positions = 2 s windows)
is saved as a WhisperForConditionalGeneration (``model.`` prefix, decoder and tied LM head present), as
openai/whisper-tiny is, with every norm weight/bias, every bias and the positional table perturbed.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel

from encoder_reference import WHISPER_TINY_HF as HF_TINY
from encoder_reference import assert_parity, bad_copy, param_count_torch, perturb_, speech_like
from hallojax import cli, load_pretrained
from hallojax.checkpoint import load_params_numpy
from hallojax.convert.safetensors_io import TensorStore
from hallojax.convert.table import ConversionError
from hallojax.convert.whisper import config_from_hf, convert_whisper
from hallojax.models.encoders.whisper import (
    PRESETS,
    WhisperEncoder,
    WhisperEncoderConfig,
    encode_audio,
    feature_extractor,
    log_mel,
    sinusoids,
)
from hallojax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, use_rules

TEST = PRESETS["test"]
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    full = perturb_(WhisperForConditionalGeneration(WhisperConfig(**HF_TINY)).eval(), seed=1)
    with torch.no_grad():  # the stored positional table away from its sinusoidal init
        table = full.model.encoder.embed_positions.weight
        table.add_(0.1 * torch.randn_like(table))
    full.save_pretrained(tmp / "hf")
    WhisperFeatureExtractor(chunk_length=2).save_pretrained(tmp / "hf")
    assert cli.main(["convert", "whisper", str(tmp / "hf"), str(tmp / "ours")]) == 0
    ours, cfg = load_pretrained(tmp / "ours")
    return dict(tmp=tmp, encoder=full.model.encoder, ours=ours, cfg=cfg)


def _reference(encoder, feats_channels_last):
    with torch.no_grad():
        out = encoder(torch.from_numpy(np.ascontiguousarray(feats_channels_last.transpose(0, 2, 1))),
                      output_hidden_states=True)
    return out


def _check(out, ref, note=""):
    assert out.hidden_states.shape[0] == len(ref.hidden_states) == TEST.num_layers + 1
    errs = [assert_parity(out.hidden_states[i], h.numpy(), f"hidden_states[{i}] {note}")
            for i, h in enumerate(ref.hidden_states)]
    errs.append(assert_parity(out.last_hidden_state, ref.last_hidden_state.numpy(), f"last {note}"))
    return max(errs)


def test_config_and_presets(built):
    assert built["cfg"] == TEST and isinstance(built["ours"], WhisperEncoder)  # WHISPER_TINY_HF is the test preset
    assert PRESETS["tiny"] == WhisperEncoderConfig(hidden_size=384, num_layers=4, num_heads=6, intermediate_size=1536,
                                                   num_mel_bins=80, max_source_positions=1500)
    assert PRESETS["tiny"].num_frames == 3000 and PRESETS["tiny"].chunk_samples == 480_000
    assert config_from_hf(WhisperConfig().to_dict()) == PRESETS["tiny"]  # transformers' defaults: whisper-tiny
    # transformers' init (checkpoints store the table; this is only a fresh model's start): equal to the
    # float32 rounding of arguments up to 1500 rad (torch's exp/sin differ from numpy's by an ulp)
    t = torch.arange(1500).view(-1, 1) * torch.exp(-(np.log(10000) / 191) * torch.arange(192))
    np.testing.assert_allclose(sinusoids(1500, 384), torch.cat([t.sin(), t.cos()], dim=1).numpy(), rtol=0, atol=3e-4)


def test_forward_matches_transformers(built):
    """All 3 hidden states on a real 16 kHz waveform through transformers' WhisperFeatureExtractor."""
    wav = speech_like(2.5, batch=2)  # longer than the 2 s window: the tail is cut, as the extractor does
    feats = log_mel(built["cfg"], wav)
    hf = WhisperFeatureExtractor(chunk_length=2)(list(wav), sampling_rate=16000, return_tensors="np").input_features
    np.testing.assert_array_equal(feats, hf.transpose(0, 2, 1))
    assert feats.shape == (2, 200, 80) and feats.std() > 0.1  # a real spectrogram, not padding
    err = _check(built["ours"](feats), _reference(built["encoder"], feats))
    print(f"whisper: max error {err:.3g}")


def test_encode_audio_stacks_every_state(built):
    ours, cfg = built["ours"], built["cfg"]
    wav = speech_like(1.3, seed=3)  # shorter than the window: zero-padded by the extractor
    states = encode_audio(ours, wav[0])
    assert states.shape == (1, cfg.max_source_positions, cfg.num_layers + 1, cfg.hidden_size)
    feats = WhisperFeatureExtractor(chunk_length=2)(list(wav), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ref = torch.stack(built["encoder"](feats, output_hidden_states=True).hidden_states, dim=2)
    assert_parity(states, ref.numpy(), "encode_audio")
    # HunyuanVideo-Avatar's dataset stores the log-mels as float16, then runs the encoder in float32
    half = encode_audio(ours, wav, mel_dtype="float16")
    with torch.no_grad():
        ref16 = torch.stack(built["encoder"](feats.half().float(), output_hidden_states=True).hidden_states, dim=2)
    assert_parity(half, ref16.numpy(), "encode_audio float16 mels")
    assert not np.allclose(np.asarray(half), np.asarray(states), rtol=0, atol=1e-6)  # the rounding is there
    with pytest.raises(ValueError, match="expected \\[B, 200, 80\\]"):
        ours(np.zeros((1, 80, 200), np.float32))  # transformers' channels-first layout
    with pytest.raises(ValueError, match="waveform"):
        encode_audio(ours, np.zeros((1, 1, 5), np.float32))


def test_sharded_forward_equals_one_device(built, devices):
    mesh = make_mesh(dict(fsdp=4, tensor=2))
    ours, _ = load_pretrained(built["tmp"] / "ours", mesh=mesh, rules=DEFAULT_RULES)
    q = ours.layers.q.kernel.get_value()
    assert q.addressable_shards[0].data.shape == (TEST.num_layers, 32 // 4, 32 // 2)  # really split
    feats = log_mel(built["cfg"], speech_like(2.0, seed=5, batch=4))
    ref = built["ours"](feats)
    with jax.set_mesh(mesh), use_rules(DEFAULT_RULES):
        out = nnx.jit(lambda m, x: m(x))(ours, jax.device_put(feats, batch_sharding(mesh, feats.shape)))
    for a, b in zip(out, ref):
        assert_parity(a, b, "sharded vs one device")
    _check(out, _reference(built["encoder"], feats), "sharded")


def test_round_trip_is_bitwise(built):
    out = built["tmp"] / "exported"
    assert cli.main(["export", "whisper", str(built["tmp"] / "ours"), str(out)]) == 0
    original = {f"encoder.{k}": v.numpy() for k, v in built["encoder"].state_dict().items()}
    exported = TensorStore(out, "model")
    assert sorted(exported.keys()) == sorted(original)
    for k, v in original.items():
        assert exported.get(k).dtype == v.dtype and np.array_equal(exported.get(k), v), k
    reloaded = WhisperModel.from_pretrained(out).encoder
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, built["encoder"].state_dict()[k]), k
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert WhisperFeatureExtractor(**pre).nb_max_frames == 200
    # and the export converts back to the same parameters (a WhisperModel without prefix or decoder)
    convert_whisper(out, built["tmp"] / "again", progress=False)
    a, b = load_params_numpy(built["tmp"] / "again"), load_params_numpy(built["tmp"] / "ours")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_converter_errors_are_listed_together(built, tmp_path):
    src = built["tmp"] / "hf"
    tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
    del tensors["model.encoder.layers.1.self_attn.q_proj.weight"]
    tensors["model.encoder.layers.0.self_attn.k_proj.bias"] = np.zeros((32,), np.float32)  # whisper has none
    tensors["model.encoder.embed_positions.weight"] = np.zeros((90, 32), np.float32)
    tensors["classifier.weight"] = np.zeros((3, 32), np.float32)
    bad = bad_copy(src, tensors, tmp_path / "bad")
    with pytest.raises(ConversionError) as err:
        convert_whisper(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "1 missing" in msg and "encoder.layers.1.self_attn.q_proj.weight (expected (32, 32))" in msg
    assert "2 unexpected" in msg and "encoder.layers.0.self_attn.k_proj.bias (32,)" in msg
    assert "classifier.weight (3, 32)" in msg
    assert "1 mis-shaped" in msg and "encoder.embed_positions.weight: (90, 32)" in msg
    assert str(bad) in msg and not (tmp_path / "out").exists()

    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="wav2vec2")))
    with pytest.raises(ConversionError, match="model_type"):
        convert_whisper(bad, tmp_path / "out", progress=False)
    (bad / "config.json").write_text(json.dumps(dict(cfg, encoder_attention_heads=5)))
    with pytest.raises(ConversionError, match="num_heads=5"):
        convert_whisper(bad, tmp_path / "out", progress=False)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "preprocessor_config.json").write_text(json.dumps(WhisperFeatureExtractor(chunk_length=30).to_dict()))
    with pytest.raises(ConversionError, match="3000 frames"):
        convert_whisper(bad, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="config.json"):
        convert_whisper(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_full_size_parameter_count_matches_transformers():
    with torch.device("meta"):
        ref = WhisperModel(WhisperConfig()).encoder
    abstract = nnx.eval_shape(lambda: WhisperEncoder(PRESETS["tiny"], rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == param_count_torch(ref) == 8_208_384, (ours, param_count_torch(ref))
    assert feature_extractor(PRESETS["tiny"]).nb_max_frames == 3000

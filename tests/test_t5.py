"""T5 / umT5 encoder parity with transformers' T5EncoderModel / UMT5EncoderModel (fp32, CPU), through
the real converter and loader, and `encode_text` against the Wan pipeline's recipe.

Tolerance: max |ours - transformers| <= 1e-5 * max(1, max |transformers|) on every hidden state.
Variants: "umt5" (gated tanh-GELU FFN, a position-bias table per layer) and "t5" (original T5: ReLU
FFN, one table in layer 0 shared by all layers). Tiny bucket settings (16 buckets, max distance 24)
put most relative distances of the test prompts in the logarithmic buckets.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, T5ForConditionalGeneration, UMT5Config
from transformers import UMT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from encoder_reference import assert_parity, param_count_torch, perturb_
from hallojax import load_pretrained
from hallojax.checkpoint import load_params_numpy
from hallojax.convert.safetensors_io import TensorStore
from hallojax.convert.t5 import config_from_hf, convert_t5, convert_umt5, export_t5, export_umt5
from hallojax.convert.table import ConversionError
from hallojax.models.encoders.t5 import T5Encoder, T5EncoderConfig, encode_text, load_tokenizer, relative_position_buckets
from hallojax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, use_rules

TINY = dict(vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
            relative_attention_num_buckets=16, relative_attention_max_distance=24)
VARIANTS = {
    "umt5": (UMT5EncoderModel, UMT5Config, dict(TINY, feed_forward_proj="gated-gelu")),
    "t5": (T5EncoderModel, T5Config, dict(TINY, feed_forward_proj="relu")),
}
WORDS = ("a cat dog sits on the mat in sun red blue big small runs jumps over under tree house green "
         "old young man woman walks slowly fast by river").split()
PROMPTS = ["a cat sits on the mat",
           "a big red dog runs over the small blue house under the old tree in the sun by the river fast"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: <pad>=0, </s>=1 (appended), <unk>=2, as T5's ids."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right")


_BUILT: dict = {}


def _build(name, tmp_path_factory):
    if name not in _BUILT:
        cls, config_cls, kw = VARIANTS[name]
        tmp = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model = perturb_(cls(config_cls(**kw)).eval(), seed=len(name))
        model.save_pretrained(tmp / "hf")
        convert_t5(tmp / "hf", tmp / "ours", progress=False)
        _BUILT[name] = dict(name=name, tmp=tmp, model=model)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
    return _build("umt5", tmp_path_factory)


def _reference(model, ids, mask):
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask), output_hidden_states=True)


def _check_all(out, ref, note=""):
    """transformers' hidden_states: the embeddings, each block's output, the last replaced by the final
    norm's output (= last_hidden_state)."""
    n = len(ref.hidden_states) - 1
    errs = [assert_parity(out.hidden_states[i], ref.hidden_states[i].numpy(), f"hidden_states[{i}] {note}")
            for i in range(n)]
    errs.append(assert_parity(out.last_hidden_state, ref.hidden_states[n].numpy(), f"final {note}"))
    errs.append(assert_parity(out.last_hidden_state, ref.last_hidden_state.numpy(), f"last {note}"))
    return max(errs)


def _tokens(max_length=28):
    enc = make_tokenizer()(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[0].sum() == 7 and mask[1].sum() == 22  # two prompts of different lengths
    return ids, mask


def test_forward_with_padding_mask_matches_transformers(converted):
    ours, cfg = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    assert isinstance(ours, T5Encoder) and cfg.per_layer_bias == (converted["name"] == "umt5")
    ids, mask = _tokens()
    err = _check_all(ours(ids, mask, output_hidden_states=True), _reference(converted["model"], ids, mask),
                     converted["name"])
    print(f"{converted['name']}: max error {err:.3g}")
    # without a mask every token attends to every other
    _check_all(ours(ids[:1, :9], output_hidden_states=True),
               _reference(converted["model"], ids[:1, :9], np.ones((1, 9), np.int64)), "no mask")


def test_encode_text_zero_pads_like_wan(converted, tmp_path):
    """Wan: tokenize with padding to 512, run with the mask, keep each prompt's first seq_len states,
    zero the rest. Ours runs only the first 64 tokens (padding is masked out) and must agree."""
    ours, _ = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")  # from local files, as in a pipeline
    enc = tokenizer(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="np")
    ref = _reference(converted["model"], enc["input_ids"], enc["attention_mask"]).last_hidden_state.numpy()
    lens = enc["attention_mask"].sum(1)
    for b, n in enumerate(lens):
        ref[b, n:] = 0

    messy = ["  a cat\n sits   on the mat ", PROMPTS[1]]  # whitespace is collapsed as Wan's prompt_clean does
    out = np.asarray(encode_text(ours, tokenizer, messy))
    assert out.shape == (2, 512, 32)
    assert_parity(out, ref, "encode_text")
    for b, n in enumerate(lens):
        assert np.all(out[b, n:] == 0) and np.all(np.abs(out[b, :n]).max(-1) > 0)
    short = np.asarray(encode_text(ours, tokenizer, PROMPTS[0], max_length=5))  # truncation keeps max_length
    assert short.shape == (1, 5, 32) and np.all(short != 0)


def test_round_trip_is_bitwise(converted):
    out = converted["tmp"] / "exported"
    (export_umt5 if converted["name"] == "umt5" else export_t5)(converted["tmp"] / "ours", out, progress=False)
    saved = TensorStore(converted["tmp"] / "hf", "model")
    exported = TensorStore(out, "model")
    assert sorted(exported.keys()) == sorted(saved.keys())
    for k in saved.keys():
        assert exported.get(k).dtype == saved.get(k).dtype and np.array_equal(exported.get(k), saved.get(k)), k
    cls = VARIANTS[converted["name"]][0]
    reloaded = cls.from_pretrained(out)
    assert type(reloaded) is cls
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, converted["model"].state_dict()[k]), k
    new_cfg = json.loads((out / "config.json").read_text())
    for key, value in VARIANTS[converted["name"]][2].items():
        assert new_cfg[key] == value, key


def test_sharded_forward_equals_one_device(converted, devices):
    shape = dict(fsdp=-1) if converted["name"] == "t5" else dict(fsdp=4, tensor=2)
    mesh = make_mesh(shape)
    single, _ = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    ours, _ = load_pretrained(converted["tmp"] / "ours", mesh=mesh, rules=DEFAULT_RULES, dtype="float32")
    q = ours.blocks.attn.q.kernel.get_value()
    want = (2, 32 // 8, 32) if converted["name"] == "t5" else (2, 32 // 4, 32 // 2)
    assert q.addressable_shards[0].data.shape == want  # really split
    ids, mask = _tokens()
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])  # batch 4
    ref = single(ids, mask, output_hidden_states=True)
    with jax.set_mesh(mesh), use_rules(DEFAULT_RULES):
        put = lambda a: jax.device_put(a, batch_sharding(mesh, a.shape))
        out = nnx.jit(lambda m, i, k: m(i, k, output_hidden_states=True))(ours, put(ids), put(mask))
    assert_parity(out.hidden_states, ref.hidden_states, "sharded vs one device")
    assert_parity(out.last_hidden_state, ref.last_hidden_state, "sharded vs one device")
    _check_all(out, _reference(converted["model"], ids, mask), "sharded")


def test_position_buckets_match_transformers():
    n = 700
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    for buckets, distance in ((32, 128), (16, 24), (8, 20), (64, 512)):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets,
                                                    max_distance=distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(n, n, buckets, distance), ref)
    umt5 = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128),
                         has_relative_attention_bias=True)
    np.testing.assert_array_equal(relative_position_buckets(n, n, 32, 128),
                                  umt5._relative_position_bucket(rel).numpy())


def test_full_size_parameter_count_matches_transformers():
    published = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # umT5-XXL (Wan 2.1 text encoder)
    with torch.device("meta"):
        ref = UMT5EncoderModel(UMT5Config(**published))
    cfg = config_from_hf(dict(published, model_type="umt5"))
    assert cfg == T5EncoderConfig()  # our defaults are the umT5-XXL encoder
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == param_count_torch(ref) == 5_680_910_336, (ours, param_count_torch(ref))


def test_full_t5_checkpoint_and_bf16_bin(tmp_path):
    """A whole T5ForConditionalGeneration saved as a bf16 pytorch_model.bin: the decoder and LM head are
    ignored, the encoder converts bit for bit in bf16 and exports back bit for bit."""
    torch.manual_seed(0)
    full = perturb_(T5ForConditionalGeneration(T5Config(**dict(TINY, feed_forward_proj="gated-gelu"))), seed=3)
    full = full.to(torch.bfloat16)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(full.config.to_json_string())
    torch.save(full.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="expected 'umt5'"):
        convert_umt5(src, tmp_path / "ours", progress=False)
    convert_t5(src, tmp_path / "ours", progress=False)
    params = load_params_numpy(tmp_path / "ours")
    sd = full.state_dict()
    emb = params["embedding"]
    assert emb.dtype.name == "bfloat16"
    assert np.array_equal(emb.view(np.uint16), sd["shared.weight"].view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(ConversionError, match="not umt5"):
        export_umt5(tmp_path / "ours", tmp_path / "back", progress=False)
    export_t5(tmp_path / "ours", tmp_path / "back", progress=False)
    back = TensorStore(tmp_path / "back", "model")
    want = {k for k in sd if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"} | {"shared.weight"}
    assert set(back.keys()) == want
    for k in want:
        assert np.array_equal(back.get(k).view(np.uint16), sd[k].view(torch.int16).numpy().view(np.uint16)), k


def test_converter_errors_are_listed_together(umt5, tmp_path):
    src = umt5["tmp"] / "hf"
    tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
    del tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    tensors["encoder.block.0.layer.2.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] = np.zeros((47, 32), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_t5(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "1 missing" in msg and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight " \
                                  "(expected (16, 4))" in msg
    assert "1 unexpected" in msg and "encoder.block.0.layer.2.extra.weight (2, 2)" in msg
    assert "1 mis-shaped" in msg and "DenseReluDense.wi_1.weight: (47, 32)" in msg
    assert not (tmp_path / "out").exists()

    cfg = json.loads((src / "config.json").read_text())
    for edit, match in ((dict(model_type="bert"), "model_type"), (dict(feed_forward_proj="gelu-gated-x"), "feed_forward"),
                        (dict(d_kv=0), "head_dim")):
        (bad / "config.json").write_text(json.dumps(dict(cfg, **edit)))
        with pytest.raises(ConversionError, match=match):
            convert_t5(bad, tmp_path / "out", progress=False)
    (bad / "model.safetensors").unlink()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="model.safetensors"):
        convert_t5(bad, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        T5Encoder(T5EncoderConfig(**dict(config_from_hf(cfg).to_dict())), rngs=nnx.Rngs(0))(np.zeros((3,), np.int32))

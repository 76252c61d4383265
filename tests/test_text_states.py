"""`python -m data_pipeline.text_states`: HunyuanVideo-Avatar's LLaVA / CLIP-L text states, checked against
tiny random transformers models saved to folders (LLaVA = a tiny Llama + a tiny CLIP vision tower; CLIP-L = a
tiny CLIPTextModel) with word-level tokenizers built offline. The expected LLaVA states are computed here the
way transformers 4.45's LLaVA merged the image (the patch features in place of `<image>`, padding embeddings
zeroed, positions cumsum(mask) − 1) on the language model directly: hidden_states[-3], template cropped."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data_pipeline import text_states as ts  # noqa: E402

WIDTH, TEXT_LEN, PROMPT = 32, 48, "A woman talks calmly to the camera."
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>", "<pad>"]


def _tokenizer(path, specials, words_from, single, pad):
    """A word-level fast tokenizer (no network): every word of `words_from`, the special tokens, `single` the
    post-processor template ($A the text), padded with `pad`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in words_from for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["[UNK]", *specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[
        (t, vocab[t]) for t in specials if t in single])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token=pad)
    fast.save_pretrained(path)
    return vocab


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every weight, norm and bias away from its init
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    texts = [ts.TEMPLATE, ts.PREFIX, ts.NEGATIVE, ts.IMAGE_SUFFIX, PROMPT, "A man sings."]
    vocab = _tokenizer(root / "llava", SPECIALS, texts, "<|begin_of_text|> $A", "<pad>")
    text_cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=64,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, rms_norm_eps=1e-5)
    vision_cfg = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16)
    cfg = transformers.LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=vocab["<image>"],
                                   pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    _perturb(transformers.LlavaForConditionalGeneration(cfg), 1).save_pretrained(root / "llava")
    clip_specials = ["<|startoftext|>", "<|endoftext|>"]
    clip_vocab = _tokenizer(root / "clip", clip_specials, texts, "<|startoftext|> $A <|endoftext|>", "<|endoftext|>")
    clip_cfg = transformers.CLIPTextConfig(vocab_size=len(clip_vocab), hidden_size=WIDTH, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                           bos_token_id=clip_vocab["<|startoftext|>"],
                                           eos_token_id=clip_vocab["<|endoftext|>"],
                                           pad_token_id=clip_vocab["<|endoftext|>"])
    _perturb(transformers.CLIPTextModel(clip_cfg), 2).save_pretrained(root / "clip")
    # the tiny tokenizer's template prefix (the released 95 is Llama-3's): BOS + the template before the prompt
    tok = transformers.AutoTokenizer.from_pretrained(root / "llava")
    crop = len(tok(ts.TEMPLATE.split("{}")[0])["input_ids"])
    enc = ts.TextEncoders(root / "llava", root / "clip", crop_start=crop, text_len=TEXT_LEN)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)
    return enc, root, crop, image


def _expected_llava(enc, text, image, crop):
    """transformers 4.45's LLaVA merge by hand, the language model run directly."""
    model, tok = enc.llava, enc.llava_tok
    b = tok(ts.TEMPLATE.format(text) + ts.IMAGE_SUFFIX, padding="max_length", truncation=True,
            max_length=crop + TEXT_LEN, return_tensors="pt")
    ids, mask = b["input_ids"][0], b["attention_mask"][0]
    p = int(torch.nonzero(ids == model.config.image_token_id)[0, 0])
    pixels = torch.as_tensor(ts.llava_pixels(image, 28))
    with torch.no_grad():
        vision = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # no CLS
        feats = model.model.multi_modal_projector(vision)[0]  # [16, D]
        emb = model.get_input_embeddings()(ids)
        emb = torch.where((ids == model.config.pad_token_id)[:, None], 0.0, emb)
        full = torch.cat([emb[:p], feats, emb[p + 1:]])[None]
        real = torch.cat([mask[:p], torch.ones(len(feats), dtype=mask.dtype), mask[p + 1:]])[None]
        positions = (real.cumsum(-1) - 1).masked_fill(real == 0, 1)
        hidden = model.model.language_model(inputs_embeds=full, attention_mask=real, position_ids=positions,
                                            output_hidden_states=True).hidden_states
    released = torch.cat([mask, torch.ones(len(feats) - 1, dtype=mask.dtype)])[crop:]
    return [h[0, crop:].numpy() for h in hidden], released.numpy(), int(mask.sum()) - 1 - crop + len(feats)


def _expected_pooled(enc, text):
    b = enc.clip_tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc.clip(**b).pooler_output[0].numpy()


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_single_prompt_matches_the_encoders_and_feeds_the_avatar_pipeline(encoders, tmp_path):
    from hallojax.generate_families import TEXT_KEYS, HunyuanAvatarFamily
    from hallojax.models.hunyuan_avatar import preset

    enc, root, crop, image = encoders
    img = tmp_path / "portrait.png"
    from PIL import Image

    Image.fromarray(image).save(img)
    out = tmp_path / "prompt.npz"
    assert ts.main(["--llava", str(root / "llava"), "--clip", str(root / "clip"), "--image", str(img), "--prompt",
                    PROMPT, "-o", str(out), "--crop-start", str(crop), "--text-len", str(TEXT_LEN)]) == 0
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(TEXT_KEYS)
    for name, text in (("text", ts.PREFIX + PROMPT), ("negative", ts.NEGATIVE)):
        hidden, mask, valid = _expected_llava(enc, text, image, crop)
        states = got[f"{name}_states"]
        assert states.shape == (TEXT_LEN + 15, WIDTH) and states.dtype == np.float32  # L = 40 + 16 − 1
        assert _rel(states, hidden[-3]) < 1e-5, _rel(states, hidden[-3])
        assert _rel(states, hidden[-2]) > 1e-2 and _rel(states, hidden[-1]) > 1e-2  # the layer matters
        np.testing.assert_array_equal(got[f"{name}_mask"], mask)
        assert got[f"{name}_mask"].sum() == valid  # prompt + image tokens: the valid prefix
        assert 0 in got[f"{name}_mask"][:TEXT_LEN]  # the tiny prompt leaves padding
        pooled = _expected_pooled(enc, text)
        assert _rel(got[f"{name}_pooled"], pooled) < 1e-6
    assert _rel(got["text_states"], got["negative_states"]) > 1e-2
    family = HunyuanAvatarFamily(preset("tiny", text_dim=WIDTH, pooled_dim=WIDTH))
    texts = family.text_states(out)
    assert texts["full"]["text"].shape == (1, TEXT_LEN + 15, WIDTH)
    np.testing.assert_array_equal(texts["null"]["text"][0], got["negative_states"])
    np.testing.assert_array_equal(texts["full"]["mask"][0], got["text_mask"])


def test_batch_form_writes_per_source_states(encoders, tmp_path):
    from data_pipeline.synthetic import make_video

    enc, root, crop, image = encoders
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "ref.png")
    video = make_video(tmp_path, 0, seed=0)
    table = {video.name: "A man sings.", "clips/b.mp4": {"prompt": PROMPT, "image": "ref.png"}}
    (tmp_path / "prompts.json").write_text(json.dumps(table))
    out = tmp_path / "texts.npz"
    rows = ts.read_batch(tmp_path / "prompts.json")
    ts.batch_states(enc, rows, out, progress=False)
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(f"{s}{k}" for s in table for k in ("", "/mask", "/pooled"))
    one = enc.encode(PROMPT, image)
    np.testing.assert_array_equal(got["clips/b.mp4"], one["states"])
    np.testing.assert_array_equal(got["clips/b.mp4/mask"], one["mask"])
    np.testing.assert_array_equal(got["clips/b.mp4/pooled"], one["pooled"])
    first = ts.first_frame(video)
    np.testing.assert_array_equal(got[video.name], enc.encode("A man sings.", first)["states"])


def test_bad_inputs_name_the_file_or_key_and_write_nothing(encoders, tmp_path, capsys):
    enc, root, crop, image = encoders
    out = tmp_path / "x.npz"
    base = ["--llava", str(root / "llava"), "--clip", str(root / "clip"), "-o", str(out)]
    assert ts.main([*base[:1], str(tmp_path), *base[2:], "--prompt", "hi", "--image", str(tmp_path)]) == 2
    assert "--image" in capsys.readouterr().err  # checked before the models load
    (tmp_path / "p.png").write_bytes(b"")
    assert ts.main(["--llava", str(tmp_path), *base[2:], "--prompt", "hi", "--image", str(tmp_path / "p.png")]) == 2
    assert f"--llava {tmp_path}: not a transformers model directory" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for table, words in (([1], "expected a JSON object"), ({"a.mp4": 3}, "source 'a.mp4': expected a prompt"),
                         ({"a.mp4": "hi"}, "video " + str(tmp_path / "a.mp4") + " not found"),
                         ({"a/mask": "hi"}, "ending in /mask")):
        bad.write_text(json.dumps(table))
        assert ts.main([*base, "--batch", str(bad)]) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(ValueError, match="image tokens after tokenizing"):  # '<image>' cut off by a long prompt
        enc.encode(" ".join(["talks"] * (TEXT_LEN + 5)), image)
    assert not out.exists() and not list(tmp_path.glob(".x.tmp*"))


def test_released_bucket_and_missing_torch(monkeypatch):
    assert ts.bucket_size(1080, 1920) == (704, 1216)  # 704 x 1280 is over 704 x 1216: rescaled to the area
    assert ts.bucket_size(704, 704) == (704, 704) and ts.bucket_size(1000, 800) == (896, 704)
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="install torch and transformers"):
        ts.TextEncoders("a", "b")

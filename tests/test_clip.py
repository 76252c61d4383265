"""The CLIP image encoder (Wan I2V / EchoMimicV3's open-clip ViT-H/14 visual tower to its penultimate block):
parity with transformers' CLIPVisionModel ``hidden_states[-2]`` at a tiny config, the same parameters from
Wan's original open-clip names, and the Wan pipelines' preprocessing against torch's bicubic resize."""

import numpy as np
import torch
import torch.nn.functional as F

from encoder_reference import assert_parity, perturb_
from hallojax import cli, load_pretrained
from hallojax.checkpoint import load_params_numpy
from hallojax.models.encoders.clip import MEAN, STD, encode_image, preprocess

TINY = dict(hidden_size=160, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
            patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


def _tiny_hf(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = perturb_(CLIPVisionModel(CLIPVisionConfig(**TINY)).eval(), 1)
    tower = getattr(model, "vision_model", model)  # transformers 5 has no vision_model level
    with torch.no_grad():  # the class token and positions well away from their init
        tower.embeddings.class_embedding.normal_()
        tower.embeddings.position_embedding.weight.normal_()
    model.save_pretrained(tmp_path / "hf")
    return model


def test_clip_matches_transformers_and_wan_names(tmp_path):
    model = _tiny_hf(tmp_path)
    assert cli.main(["convert", "clip", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours, cfg = load_pretrained(tmp_path / "ours")
    assert cfg.num_layers == TINY["num_hidden_layers"] - 1  # the penultimate block's output

    frame = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pixels = preprocess(frame, TINY["image_size"])
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states[-2]
    assert_parity(encode_image(ours, frame), ref.numpy())

    # Wan's own names (fused q/k/v, [1, 1, D] class token, [1, P + 1, D] positions, plus what it drops)
    sd = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    wan = {"visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": sd["embeddings.class_embedding"][None, None],
           "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
           "visual.pre_norm.weight": sd["pre_layrnorm.weight"], "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
           "visual.post_norm.weight": sd["post_layernorm.weight"], "visual.post_norm.bias": sd["post_layernorm.bias"],
           "visual.head": torch.zeros(TINY["hidden_size"], 8), "log_scale": torch.zeros(()),
           "textual.head.0.weight": torch.zeros(4, 4)}
    for i in range(TINY["num_hidden_layers"]):
        p, q = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for kind in ("weight", "bias"):
            wan[q + f"attn.to_qkv.{kind}"] = torch.cat([sd[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for theirs, mine in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                                 ("attn.proj", "self_attn.out_proj"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                wan[q + f"{theirs}.{kind}"] = sd[p + f"{mine}.{kind}"]
    torch.save(wan, tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    assert cli.main(["convert", "clip", str(tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
                     str(tmp_path / "from_wan")]) == 0
    a, b = load_params_numpy(tmp_path / "ours"), load_params_numpy(tmp_path / "from_wan")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_preprocess_is_the_wan_pipeline_resize():
    """[−1, 1] frame -> torch bicubic (align_corners=False, no antialias) to 224 -> [0, 1] -> CLIP mean/std.
    torch resamples in float64 here: in float32 its own sampling positions are off by up to ~1e-5 pixels,
    which on pixel noise moves values by 1e-4 (its float32 and float64 results differ that much)."""
    for shape in ((480, 832, 3), (97, 61, 3)):  # down and up
        frame = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
        x = torch.from_numpy(frame.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None]
        ref = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
        ref = (ref - torch.from_numpy(MEAN).double()[:, None, None]) / torch.from_numpy(STD).double()[:, None, None]
        assert_parity(preprocess(frame), ref.permute(0, 2, 3, 1).numpy())

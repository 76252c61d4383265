"""Original-format Wan checkpoints (Wan / VideoX-Fun names): diffusers' own original -> diffusers renaming
(`convert_wan_transformer_to_diffusers`, shipped as data in diffusers) takes our exported names to exactly
the diffusers state dict; converting the original names gives bitwise the parameters the diffusers path
gives; export -> convert -> export is bitwise; single files, pickles, prefixes, shards, no config.json."""

import json

import numpy as np
import pytest
import torch

from hallojax import cli
from hallojax.checkpoint import load_params_numpy, read_config
from hallojax.convert import ConversionError, convert_wan_diffusers
from hallojax.convert.safetensors_io import TensorStore, save_file
from hallojax.convert.wan_original import convert_wan_original, export_wan_original
from wan_reference import TINY_I2V, TINY_T2V, make_diffusers_wan

VARIANTS = {"t2v": TINY_T2V, "fun-inp": TINY_I2V, "flf2v": dict(TINY_I2V, pos_embed_seq_len=10)}


def _assert_same_params(a, b):
    pa, pb = load_params_numpy(a), load_params_numpy(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k
    assert read_config(a)[0] == read_config(b)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_names_match_diffusers_and_round_trip(variant, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = make_diffusers_wan(VARIANTS[variant], seed=3)
    model.save_pretrained(tmp_path / "diffusers")
    convert_wan_diffusers(tmp_path / "diffusers", tmp_path / "via_diffusers", progress=False)
    export_wan_original(tmp_path / "via_diffusers", tmp_path / "original", progress=False)
    original = TensorStore(tmp_path / "original")
    assert "blocks.0.self_attn.q.weight" in original.keys() and "head.modulation" in original.keys()
    cfg = json.loads((tmp_path / "original" / "config.json").read_text())
    assert cfg["model_type"] == {"t2v": "t2v", "fun-inp": "i2v", "flf2v": "flf2v"}[variant]

    # diffusers' renaming table, applied to our original names, gives back exactly the diffusers tensors
    # (its table has no entry for FLF2V's image position embedding: that one name is checked by hand)
    checkpoint = {k: torch.from_numpy(np.array(original.get(k))) for k in original.keys()}
    pos = checkpoint.pop("img_emb.emb_pos", None)
    renamed = convert_wan_transformer_to_diffusers(checkpoint)
    reference = model.state_dict()
    if pos is not None:
        assert torch.equal(pos, reference.pop("condition_embedder.image_embedder.pos_embed"))
    assert sorted(renamed) == sorted(reference)
    for k, v in reference.items():
        assert torch.equal(renamed[k], v), k

    convert_wan_original(tmp_path / "original", tmp_path / "via_original", progress=False)
    _assert_same_params(tmp_path / "via_original", tmp_path / "via_diffusers")
    export_wan_original(tmp_path / "via_original", tmp_path / "back", progress=False)
    back = TensorStore(tmp_path / "back")
    assert sorted(back.keys()) == sorted(original.keys())
    for k in original.keys():
        assert np.array_equal(back.get(k), original.get(k)), k


def test_pth_file_with_prefix_and_sharded_bf16_without_config(tmp_path):
    """A bare .pth (state_dict wrapper, ComfyUI prefix, no config: sizes from shapes) and a bf16 index-sharded
    directory without config.json through `hallojax convert wan`, both equal to the diffusers path."""
    model = make_diffusers_wan(TINY_I2V, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(tmp_path / "diffusers")
    convert_wan_diffusers(tmp_path / "diffusers", tmp_path / "ref", progress=False)
    export_wan_original(tmp_path / "ref", tmp_path / "original", progress=False)
    original = TensorStore(tmp_path / "original")
    # a head size of 128 is assumed without config.json; this tiny model's is 16, so its config stays for .pth
    sd = {"model.diffusion_model." + k: torch.from_numpy(np.array(original.get(k))) for k in original.keys()}
    (tmp_path / "pth").mkdir()
    torch.save({"state_dict": sd}, tmp_path / "pth" / "model.pth")
    (tmp_path / "pth" / "config.json").write_text((tmp_path / "original" / "config.json").read_text())
    assert cli.main(["convert", "wan", str(tmp_path / "pth"), str(tmp_path / "from_pth")]) == 0
    _assert_same_params(tmp_path / "from_pth", tmp_path / "ref")

    # bf16, sharded, no config.json, head size 128 (read off the shapes)
    big = make_diffusers_wan(dict(TINY_T2V, num_attention_heads=1, attention_head_dim=128), seed=6)
    big.to(torch.bfloat16).save_pretrained(tmp_path / "d128")
    convert_wan_diffusers(tmp_path / "d128", tmp_path / "ref128", progress=False)
    export_wan_original(tmp_path / "ref128", tmp_path / "o128", max_shard_bytes=200_000, progress=False)
    (tmp_path / "o128" / "config.json").unlink()
    assert (tmp_path / "o128" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert cli.main(["convert", "wan", str(tmp_path / "o128"), str(tmp_path / "from_shards")]) == 0
    _assert_same_params(tmp_path / "from_shards", tmp_path / "ref128")


def test_bad_original_checkpoints_are_refused_with_every_name(tmp_path, capsys):
    model = make_diffusers_wan(TINY_T2V, seed=7)
    model.save_pretrained(tmp_path / "diffusers")
    with pytest.raises(ConversionError, match="diffusers naming"):
        convert_wan_original(tmp_path / "diffusers", tmp_path / "x", progress=False)
    convert_wan_diffusers(tmp_path / "diffusers", tmp_path / "ours", progress=False)
    export_wan_original(tmp_path / "ours", tmp_path / "original", progress=False)
    store = TensorStore(tmp_path / "original")
    tensors = {k: np.array(store.get(k)) for k in store.keys() if k != "blocks.1.ffn.2.bias"}
    tensors["blocks.0.cross_attn.q.weight"] = tensors["blocks.0.cross_attn.q.weight"][:, :8]
    tensors["blocks.0.extra.weight"] = np.zeros((2, 2), np.float32)
    (tmp_path / "broken").mkdir()
    save_file(tensors, tmp_path / "broken" / "weights.safetensors")
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "original" / "config.json").read_text())
    rc = cli.main(["convert", "wan", str(tmp_path / "broken"), str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "blocks.1.ffn.2.bias" in err and "blocks.0.extra.weight" in err
    assert "blocks.0.cross_attn.q.weight" in err and not (tmp_path / "y").exists()

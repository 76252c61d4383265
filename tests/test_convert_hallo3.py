"""`hallojax convert hallo3` / `hallojax export hallo3` on the released layout: the full-size key set and element
count from shapes alone against the released list (research/hallo3.md §2.2, written out independently in
tests/hallo3_reference.py); a bf16 `module` dict with EXACTLY the 2,238 released names (42 layers, tiny width)
converted and exported back bitwise, from the .pt folder and from safetensors; truncated files, wrong prefixes
and wrong/missing/unexpected tensors refused with one error naming every key, nothing written."""

import numpy as np
import pytest
import torch

from hallo3_reference import DENOISER, FULL, REFERENCE, TINY, released_shapes, released_state_dict
from hallojax import cli
from hallojax.checkpoint import load_params_numpy, read_config
from hallojax.convert import ConversionError
from hallojax.convert.hallo3 import STATES, convert_hallo3, released_shapes as our_shapes
from hallojax.convert.safetensors_io import save_file
from hallojax.models.hallo3 import preset

TINY42 = dict(TINY, layers=42)


def test_full_size_key_set_and_count_from_shapes():
    ours = our_shapes(preset("hallo3"))
    theirs = released_shapes(FULL)
    assert len(theirs) == 2238
    assert sum(k.startswith(DENOISER) for k in theirs) == 1462 and sum(k.startswith(REFERENCE) for k in theirs) == 776
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == 14_551_030_912


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released folder layout: latest + 1/mp_rank_00_model_states.pt, bf16, all 2,238 names."""
    tmp = tmp_path_factory.mktemp("released")
    sd = released_state_dict(TINY42, seed=2, dtype=torch.bfloat16)
    assert len(sd) == 2238
    (tmp / "hallo3" / "1").mkdir(parents=True)
    (tmp / "hallo3" / "latest").write_text("1\n")
    torch.save({"module": sd, "iteration": 30000, "dp_world_size": 8}, tmp / "hallo3" / "1" / STATES)
    return sd, tmp


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_released_layout_round_trip_is_bitwise(released, tmp_path):
    sd, tmp = released
    assert cli.main(["convert", "hallo3", str(tmp / "hallo3"), str(tmp_path / "ours")]) == 0
    cfg, meta = read_config(tmp_path / "ours")
    assert cfg == preset("tiny", num_layers=42) and meta["kind"] == "hallo3"
    params = load_params_numpy(tmp_path / "ours")
    assert all(str(v.dtype) == "bfloat16" for v in params.values())  # stored dtype kept
    assert sum(v.size for v in params.values()) == sum(t.numel() for t in sd.values())
    # one fused tensor, checked by hand: rows [D, 2D) of layer 5's query_key_value are our to_k kernel
    qkv = sd[f"{DENOISER}transformer.layers.5.attention.query_key_value.weight"].float().numpy()
    np.testing.assert_array_equal(params["denoiser.blocks.attn1.to_k.kernel"][5].astype(np.float32), qkv[32:64].T)

    assert cli.main(["export", "hallo3", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "latest").read_text().strip() == "1"
    back = torch.load(tmp_path / "back" / "1" / STATES, weights_only=True)["module"]
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(_bits(back[k]), _bits(v)), k

    # torch-free reading: the same names in a safetensors file give the same parameters
    save_file({k: v.float().numpy() for k, v in sd.items()}, tmp_path / "module.safetensors")
    convert_hallo3(tmp_path / "module.safetensors", tmp_path / "from_st", progress=False)
    again = load_params_numpy(tmp_path / "from_st")
    for k, v in params.items():
        assert np.array_equal(again[k], v.astype(np.float32)), k


def test_bad_files_are_refused_with_every_name(released, tmp_path, capsys):
    sd, tmp = released
    good = (tmp / "hallo3" / "1" / STATES).read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConversionError, match="cut.pt"):
        convert_hallo3(tmp_path / "cut.pt", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()

    prefixed = {"module." + k: v for k, v in sd.items()}  # a wrapper's prefix left on every name
    torch.save({"module": prefixed}, tmp_path / "prefixed.pt")
    with pytest.raises(ConversionError, match="model.diffusion_model.*ref_model.diffusion_model.*module.model"):
        convert_hallo3(tmp_path / "prefixed.pt", tmp_path / "x", progress=False)
    only_denoiser = {k: v for k, v in sd.items() if k.startswith(DENOISER)}
    torch.save(only_denoiser, tmp_path / "denoiser.pt")
    with pytest.raises(ConversionError, match="reference net"):
        convert_hallo3(tmp_path / "denoiser.pt", tmp_path / "x", progress=False)

    broken = dict(sd)
    del broken[f"{REFERENCE}transformer.layers.41.mlp.dense_4h_to_h.bias"]
    del broken[f"{DENOISER}transformer.audio_proj.conv1.bias"]
    qkv = f"{DENOISER}transformer.layers.3.attention.query_key_value.weight"
    broken[qkv] = broken[qkv][:90]
    conv = f"{DENOISER}transformer.audio_proj.conv1.weight"
    broken[conv] = broken[conv][..., :1]
    broken[f"{DENOISER}transformer.layers.0.face_attn.extra.weight"] = torch.zeros(2)
    torch.save({"module": broken}, tmp_path / "broken.pt")
    rc = cli.main(["convert", "hallo3", str(tmp_path / "broken.pt"), str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "y").exists()
    assert "2 missing" in err and "2 mis-shaped" in err and "1 unexpected" in err, err
    for name in (f"{REFERENCE}transformer.layers.41.mlp.dense_4h_to_h.bias",
                 f"{DENOISER}transformer.audio_proj.conv1.bias", qkv, conv,
                 f"{DENOISER}transformer.layers.0.face_attn.extra.weight"):
        assert name in err, name

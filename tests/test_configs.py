"""Every preset builds (under eval_shape, no memory), full-size parameter counts equal diffusers'."""

import pytest
import torch

from hallojax.config import ConfigError, apply_overrides, load_config
from hallojax.convert.wan import config_to_diffusers
from hallojax.models.wan import DiTConfig, abstract_model, param_count
from hallojax.sharding import make_mesh

PRESETS = ["tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "hallo3-style,size=1.3b",
           "hyavatar-style,size=1.3b", "echomimic-style,size=1.3b", "letstalk-style,size=1.3b",
           "echomimic-v3-preview,size=1.3b", "echomimic-v3-flash,size=1.3b", "echomimic-v3-preview",
           "echomimic-v3-flash"]
MESHES = ["single", "dp", "fsdp", "fsdp_tp", "dp_context", "fsdp_context"]
# published sizes (the Wan2.1 configs as released on the diffusers hub)
# the counts the README table states (a test below proves them equal to diffusers')
README_COUNTS = {"tiny": 149_248, "wan2.1-t2v-1.3b": 1_418_996_800, "wan2.1-t2v-14b": 14_288_491_584,
                 "wan2.1-i2v-14b": 16_394_878_784,
                 "hallo3-style,size=1.3b": 3_065_223_774, "hyavatar-style,size=1.3b": 1_553_243_742,
                 "echomimic-style,size=1.3b": 1_491_390_528, "letstalk-style,size=1.3b": 1_671_706_206,
                 # EchoMimicV3 as released, Wan2.1-Fun-1.3B-InP base included (research note §4: 1,564,428,608
                 # base + 142,786,560 preview / + 299,344,384 Flash, of which 70,824,960 the unapplied q_audio)
                 "echomimic-v3-preview,size=1.3b": 1_707_215_168, "echomimic-v3-flash,size=1.3b": 1_863_772_992,
                 "echomimic-v3-preview": 190_664, "echomimic-v3-flash": 206_712}
PUBLISHED = {"wan2.1-t2v-1.3b": (30, 1536, 12, 8960, 16), "wan2.1-t2v-14b": (40, 5120, 40, 13824, 16),
             "wan2.1-i2v-14b": (40, 5120, 40, 13824, 36)}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_under_eval_shape(preset):
    config = load_config(f"configs/wan.py:{preset}")
    cfg = DiTConfig.from_dict(config.model)
    model = abstract_model(cfg)
    assert param_count(model) == README_COUNTS[preset]
    if preset in PUBLISHED:
        assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.in_channels) == PUBLISHED[preset]


MESH_SHAPES_8 = {"single": None, "dp": (8, 1, 1, 1), "fsdp": (1, 8, 1, 1), "fsdp_tp": (1, 4, 1, 2),
                 "dp_context": (4, 1, 2, 1), "fsdp_context": (1, 4, 2, 1)}


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_presets_resolve_on_8_devices(mesh, devices):
    config = load_config(f"tiny,mesh={mesh}")
    if MESH_SHAPES_8[mesh] is None:  # the single-device mesh needs exactly one device
        assert tuple(make_mesh(dict(config.mesh), devices[:1]).shape.values()) == (1, 1, 1, 1)
    else:
        assert tuple(make_mesh(dict(config.mesh)).shape.values()) == MESH_SHAPES_8[mesh]


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"])
def test_full_size_parameter_count_equals_diffusers(preset):
    from diffusers import WanTransformer3DModel

    cfg = DiTConfig.from_dict(load_config(preset).model)
    kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = WanTransformer3DModel(**kwargs)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert param_count(abstract_model(cfg)) == n_ref
    if preset == "wan2.1-t2v-1.3b":
        assert 1.3e9 < n_ref < 1.5e9


def test_overrides_are_typed_and_checked():
    config = load_config("configs/wan.py:tiny,dtype=float32", ["--config.model.remat=full", "--config.train.steps=3"])
    assert config.model.dtype == "float32" and config.model.remat == "full" and config.train.steps == 3
    with pytest.raises(ConfigError, match="model.nope"):
        apply_overrides(config, ["--config.model.nope=1"])
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(config, ["--config.train.steps=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/missing.py:tiny")
    with pytest.raises(ValueError, match="preset must be one of"):
        load_config("tiny-typo")
    with pytest.raises(ValueError, match="remat"):
        DiTConfig.from_dict({**load_config("tiny").model, "remat": "sometimes"})

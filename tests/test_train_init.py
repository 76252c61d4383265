"""`train.init_from`: a fresh run starts from a converted directory or another run's weights, sharded as the
state is. A Wan DiT base into a conditioned Wan run (copied, the patch embedding widened with zero rows, the
reference net from the backbone, the adapters at their initialisation); CogVideoX into both of Hallo3's nets;
a workdir's weights; 1 device and 8 (FSDP) equal; a base with no place in the run refused naming it."""

import jax
import numpy as np
import pytest
from flax import nnx

from hallojax import families
from hallojax.checkpoint import flat_params, save_pretrained
from hallojax.config import load_config
from hallojax.sharding import make_mesh, normalize_rules
from hallojax.train import create_state, initialize_from
from test_generate import write_workdir


def _dotted(tree) -> dict:
    return {jax.tree_util.keystr(kp, simple=True, separator="."): np.asarray(v)
            for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def _save_base(model, cfg, path, seed=1):
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in flat_params(model).items()}
    save_pretrained(path, params, cfg)
    return params


def _init(config, path, devices, weights="auto"):
    """(initialised state, fresh state) of `config`'s run on `devices` devices, as flat numpy dicts."""
    cfg = families.model_config(config.model)
    mesh = make_mesh(dict(config.mesh), jax.devices()[:devices])
    rules = normalize_rules(config.rules)
    _, state, shardings, _ = create_state(cfg, config.train, config.seed, mesh, rules)
    fresh = {g: _dotted(state[g]) for g in state if g in ("params", "buffers")}
    out = initialize_from(state, path, cfg, mesh, rules, weights)
    for got, want in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(shardings["params"])):
        assert got.sharding.is_equivalent_to(want, got.ndim)  # placed as the state is
    # the train step donates the state: no two leaves may share a buffer (EMA = params, a base tensor in two nets)
    buffers = [s.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(out) for s in leaf.addressable_shards]
    assert len(buffers) == len(set(buffers))
    return {g: _dotted(out[g]) for g in out if g in ("params", "ema", "buffers")}, fresh


@pytest.fixture(scope="module")
def wan_base(tmp_path_factory):
    from hallojax.models.wan import DiTConfig, WanDiT

    config = load_config("configs/wan.py:tiny,dtype=float32")
    cfg = DiTConfig.from_dict(config.model)
    path = tmp_path_factory.mktemp("init") / "wan"
    return path, _save_base(WanDiT(cfg, rngs=nnx.Rngs(0)), cfg, path)


@pytest.fixture(scope="module")
def wan_runs(wan_base):
    config = load_config("configs/wan.py:hallo3-style,size=tiny,dtype=float32")
    return {n: _init(config, wan_base[0], n) for n in (1, 8)}


def test_wan_base_starts_a_conditioned_run(wan_base, wan_runs):
    _, base = wan_base
    (got, fresh) = wan_runs[1]
    params = got["params"]
    assert set(base) < set(params)
    widened = 0
    for k, v in base.items():
        if v.shape == params[k].shape:
            np.testing.assert_array_equal(params[k], v, err_msg=k)
        else:  # more input channels (motion frames): the base rows, then zeros
            n = v.shape[-2]
            np.testing.assert_array_equal(params[k][..., :n, :], v, err_msg=k)
            assert not params[k][..., n:, :].any(), k
            widened += 1
    assert widened >= 1
    refs = [k for k in params if k.startswith("reference_blocks.")]
    assert refs
    for k in refs:  # Hallo3-style reference net: from the backbone's blocks
        np.testing.assert_array_equal(params[k], base["blocks." + k[len("reference_blocks."):]], err_msg=k)
    added = [k for k in params if k not in base and not k.startswith(("reference_blocks.", "reference_embedding."))]
    assert any("audio" in k for k in added)
    for k in added:  # the conditioning keeps its initialisation
        np.testing.assert_array_equal(params[k], fresh["params"][k], err_msg=k)
    for k in params:
        np.testing.assert_array_equal(got["ema"][k], params[k], err_msg=k)


def test_init_from_is_the_same_on_8_devices(wan_runs):
    one, eight = wan_runs[1][0], wan_runs[8][0]
    for g in one:
        assert one[g].keys() == eight[g].keys()
        for k in one[g]:
            np.testing.assert_array_equal(eight[g][k], one[g][k], err_msg=f"{g}/{k}")


def test_cogvideox_starts_both_hallo3_nets(tmp_path):
    from hallojax.models.cogvideox import CogVideoXTransformer

    config = load_config("configs/hallo3.py:stage1,size=tiny")
    cfg = families.model_config(config.model)
    base = _save_base(CogVideoXTransformer(cfg.backbone(), rngs=nnx.Rngs(0)), cfg.backbone(), tmp_path / "cogvideox")
    got, fresh = _init(config, tmp_path / "cogvideox", 8)
    params = got["params"]
    for k, v in base.items():
        for net in ("denoiser.", "reference."):
            np.testing.assert_array_equal(params[net + k], v, err_msg=net + k)
    for k in params:
        if k.startswith(("cross.", "face_proj.", "audio_proj.")):
            np.testing.assert_array_equal(params[k], fresh["params"][k], err_msg=k)


def test_a_workdir_starts_a_run(tmp_path):
    path = write_workdir(tmp_path / "run", seed=2)
    config = load_config("configs/wan.py:demo,mesh=fsdp,dtype=float32")
    config.model.update(in_channels=48, out_channels=48)
    got, fresh = _init(config, path, 8, weights="params")
    from hallojax.pipeline import load_checkpoint

    want = flat_params(load_checkpoint(path, weights="params").model)
    assert got["params"].keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got["params"][k], np.asarray(v), err_msg=k)
    assert any(not np.array_equal(got["params"][k], fresh["params"][k]) for k in want)


def test_a_base_that_does_not_fit_is_refused_by_name(tmp_path, wan_base):
    config = load_config("configs/wan.py:tiny,dtype=float32")
    config.model.update(num_heads=2, head_dim=32)  # same width, other head split: every shape still fits
    config.model.update(ffn_dim=64)  # the MLP does not
    fc1 = r"blocks.ffn.fc1.bias: base \(2, 128\) vs model \(2, 64\)"
    with pytest.raises(ValueError, match=r"(?s)train.init_from=.*" + fc1):
        _init(config, wan_base[0], 1)
    with pytest.raises(ValueError, match="a wan-dit model cannot initialise a hallo3 model"):
        _init(load_config("configs/hallo3.py:stage1,size=tiny"), wan_base[0], 1)
    with pytest.raises(ValueError, match=r"train.init_from=.*no_such_dir.*no such directory"):
        _init(config, tmp_path / "no_such_dir", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train.init_from=.*empty.*neither a `hallojax train` workdir"):
        _init(config, tmp_path / "empty", 1)


def test_a_hallo3_workdir_loads_with_its_buffers(tmp_path):
    """A trainer checkpoint keeps Hallo3's buffers (RoPE tables, the dead position table) apart from the
    parameters: `hallojax generate`'s loader and init_from restore both, not just the parameters."""
    from hallojax.pipeline import load_checkpoint
    from hallojax.train import checkpoint_manager, init_state, save

    config = load_config("configs/hallo3.py:stage2,size=tiny", ["--config.checkpoint.async_save=False"])
    cfg = families.model_config(config.model)
    state = init_state(cfg, config.train, 0)
    rng = np.random.default_rng(0)
    state["params"] = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), state["params"])

    class Position:
        def get_state(self):
            return {"position": 0}

    manager = checkpoint_manager(tmp_path / "run", config.checkpoint)
    save(manager, state, Position(), config)
    manager.wait_until_finished()
    manager.close()
    loaded = flat_params(load_checkpoint(tmp_path / "run", weights="params").model)
    want = {**_dotted(state["params"]), **_dotted(state["buffers"])}
    assert loaded.keys() == want.keys() and any("buffers" in k for k in want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(loaded[k]), v, err_msg=k)
    got, _ = _init(config, tmp_path / "run", 8, weights="params")
    for g in ("params", "buffers"):
        for k, v in _dotted(state[g]).items():
            np.testing.assert_array_equal(got[g][k], v, err_msg=f"{g}/{k}")

"""HunyuanVideo-Avatar transformer (hallojax.models.hunyuan_avatar) against the independent PyTorch reference in
hunyuan_avatar_reference.py (diffusers' HunyuanVideo blocks run in the Avatar's order with the Avatar modules
written from the research facts), fp32, every norm / modulation / adapter weight perturbed, on 1 and 8
simulated devices; full-size counts from shapes alone.

Tolerance: max |ours - reference| <= 1e-5 * max(1, max |reference|) (encoder_reference.assert_parity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hunyuan_avatar_reference as ref
from encoder_reference import assert_parity
from hallojax.checkpoint import _nest, flat_params, param_shapes
from hallojax.convert.hf import DictSource
from hallojax.convert.hunyuan import DIFFUSERS_RULES
from hallojax.convert.hunyuan_avatar import avatar_layer_counts, extra_rules
from hallojax.convert.table import import_tensors
from hallojax.models.hunyuan import preset as trunk_preset
from hallojax.models.hunyuan_avatar import HunyuanAvatar, preset
from hallojax.registry import abstract
from hallojax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, shard_module, use_rules

CFG = preset("tiny", dtype="float32")


def load(sd, cfg=CFG) -> HunyuanAvatar:
    """Our tiny model with the reference's weights (diffusers trunk names + the released Avatar names)."""
    model = HunyuanAvatar(cfg, rngs=nnx.Rngs(0))
    params = import_tensors(list(DIFFUSERS_RULES) + extra_rules(), DictSource(sd), param_shapes(cfg),
                            avatar_layer_counts(cfg), what="reference", progress=False)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, _nest({k: jnp.asarray(v) for k, v in params.items()}))
    nnx.update(model, state)
    return model


@nnx.jit
def run(model, x, mask_scale):
    return model(x["lat"], x["t"], x["text"], x["pooled"], x["ref"], x["audio"], text_mask=x["mask"],
                 face_mask=x["face"], mask_scale=mask_scale, fps=x["fps"], motion_exp=x["exp"], motion_pose=x["pose"])


def _arrays(x):
    return {k: jnp.asarray(v) for k, v in x.items()}


@pytest.fixture(scope="module")
def models():
    trunk, extras = ref.make_reference(seed=3)
    return dict(trunk=trunk, extras=extras, ours=load(ref.state_dict(trunk, extras)))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_forward_matches_reference(models, scale):
    x = ref.inputs(valid=(7, 4))  # sample 1: 3 padded text tokens; per-sample fps and motion scalars
    want = ref.forward(models["trunk"], models["extras"], x, scale)
    out = run(models["ours"], _arrays(x), jnp.float32(scale))
    err = assert_parity(out, want, f"mask scale {scale}")
    assert err > 0  # a real comparison
    print(f"hunyuan-avatar tiny forward (mask scale {scale}): max error {err:.3g}, max |ref| {np.abs(want).max():.3g}")
    # each Avatar input matters (so the parity above covers it): the face mask, the reference, the motion
    off = np.asarray(run(models["ours"], _arrays(dict(x, face=np.zeros_like(x["face"]))), jnp.float32(scale)))
    assert np.abs(off - want).max() > 1e-3
    other_ref = np.asarray(run(models["ours"], _arrays(dict(x, ref=x["ref"][:, ::-1].copy())), jnp.float32(scale)))
    assert np.abs(other_ref - want).max() > 1e-3
    still = np.asarray(run(models["ours"], _arrays(dict(x, exp=x["exp"] + 3.0)), jnp.float32(scale)))
    assert np.abs(still - want).max() > 1e-4


def test_sharded_matches_reference(models, devices):
    mesh = make_mesh(dict(fsdp=4, tensor=2))
    sharded = HunyuanAvatar(CFG, rngs=nnx.Rngs(0))
    nnx.update(sharded, nnx.state(models["ours"]))
    shard_module(sharded, mesh, DEFAULT_RULES)
    kv = sharded.audio_adapters.to_kv.kernel.get_value()
    assert kv.addressable_shards[0].data.shape == (2, 64 // 4, 32 // 2)  # really split: fsdp 4, tensor 2
    q = sharded.double_blocks.img_attn.to_q.kernel.get_value()
    assert q.addressable_shards[0].data.shape == (4, 64 // 4, 64 // 2)
    x = ref.inputs(batch=4, valid=(7, 4, 1, 6), seed=1)
    want = ref.forward(models["trunk"], models["extras"], x, 0.6)
    with jax.set_mesh(mesh), use_rules(DEFAULT_RULES):
        put = {k: jax.device_put(jnp.asarray(v), batch_sharding(mesh, np.shape(v))) for k, v in x.items()}
        out = run(sharded, put, jnp.float32(0.6))
    err = assert_parity(out, want, "8 devices")
    print(f"hunyuan-avatar tiny forward on 8 devices (fsdp 4 x tensor 2): max error {err:.3g}")


def test_full_size_count_from_shapes():
    def count(cfg):
        return sum(int(np.prod(v.shape)) for v in flat_params(abstract(cfg)).values())

    full = preset("hunyuan-avatar")
    assert full.adapter_layers == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19) and not full.guidance_embeds
    total = count(full)
    # research B.1: the trunk without guidance (A.8) + the Avatar modules 180,710,400 = "~12.99B"
    assert total == 12_810_782_784 + 180_710_400 == 12_991_493_184
    assert count(trunk_preset("full-no-guidance")) == 12_810_782_784
    trunk, extras = ref.make_reference()
    assert count(CFG) == sum(p.numel() for p in trunk.parameters()) + sum(p.numel() for p in extras.parameters())


def test_bad_inputs_named():
    model = nnx.eval_shape(lambda: HunyuanAvatar(CFG, rngs=nnx.Rngs(0)))
    x = ref.inputs()
    args = (x["lat"], x["t"], x["text"], x["pooled"])
    with pytest.raises(ValueError, match="ref_latents have shape"):
        model(*args, x["ref"][:, :2], x["audio"])
    with pytest.raises(ValueError, match=r"audio_windows have shape .*4F − 3 video"):
        model(*args, x["ref"], x["audio"][:, :8])
    with pytest.raises(ValueError, match="motion_exp has shape"):
        model(*args, x["ref"], x["audio"], motion_exp=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="guidance embedder"):
        preset("tiny", guidance_embeds=True)


# --- the released checkpoint format (hallojax convert / export hunyuan-avatar) ---
FP8_MAX = 448.0  # float8_e4m3fn


@pytest.fixture(scope="module")
def released(models, tmp_path_factory):
    """Our tiny model saved, exported to the released names, and written as the released `.pt` ({"module": sd})
    in a directory with our config (tiny head size: RoPE axes are not the release's)."""
    import torch

    from hallojax.checkpoint import save_pretrained
    from hallojax.convert.hunyuan_avatar import export_hunyuan_avatar
    from hallojax.convert.safetensors_io import TensorStore

    tmp = tmp_path_factory.mktemp("avatar")
    ours = {k: np.asarray(v) for k, v in flat_params(models["ours"]).items()}
    save_pretrained(tmp / "ours", ours, CFG)
    export_hunyuan_avatar(tmp / "ours", tmp / "orig", progress=False)
    store = TensorStore(tmp / "orig")
    sd = {k: torch.from_numpy(np.array(store.get(k))) for k in store.keys()}
    (tmp / "pt").mkdir()
    torch.save({"module": sd}, tmp / "pt" / "mp_rank_00_model_states.pt")
    (tmp / "pt" / "config.json").write_text((tmp / "orig" / "config.json").read_text())
    return dict(tmp=tmp, ours=ours, sd=sd)


def test_released_names_match_diffusers_and_the_reference(models, released):
    """The exported trunk keys are what diffusers' own Tencent -> diffusers converter maps onto the reference's
    trunk (single blocks: its split is hard-wired to width 3072, checked by our import below); the Avatar keys
    are the reference's, bit for bit; no guidance_in."""
    import torch
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    sd = released["sd"]
    extras = models["extras"].state_dict()
    assert "double_blocks.3.img_attn_qkv.weight" in sd and not any(k.startswith("guidance_in") for k in sd)
    for k, v in extras.items():
        assert torch.equal(sd[k], v), k
    trunk = {k: v for k, v in sd.items() if k not in extras and not k.startswith("single_blocks.")}
    theirs = convert_hunyuan_video_transformer_to_diffusers(trunk)
    want = {k: v for k, v in models["trunk"].state_dict().items() if not k.startswith("single_transformer")}
    assert sorted(theirs) == sorted(want)
    for k, v in want.items():
        assert torch.equal(theirs[k], v), k


def test_convert_released_pt_round_trips(released):
    from hallojax import cli
    from hallojax.checkpoint import load_params_numpy, read_config

    out = released["tmp"] / "back"
    assert cli.main(["convert", "hunyuan-avatar", str(released["tmp"] / "pt"), str(out)]) == 0
    back = load_params_numpy(out)
    assert sorted(back) == sorted(released["ours"])
    for k, v in released["ours"].items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    assert read_config(out)[0].replace(dtype="float32") == CFG  # sizes from the shapes (+ the saved RoPE axes)


def _fp8(sd):
    """The released fp8 layout: every Linear weight under double_blocks / single_blocks as float8_e4m3fn with one
    scale per module (amax / 448) in the map."""
    import torch

    q, scales = dict(sd), {}
    for k, v in sd.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / FP8_MAX
            q[k] = (v / scale).to(torch.float8_e4m3fn)
            scales[k[:-len(".weight")]] = scale.reshape(())
    return q, scales


def test_convert_fp8_variant_dequantises_exactly(released, tmp_path):
    import torch

    from hallojax.checkpoint import load_params_numpy
    from hallojax.convert.hunyuan_avatar import convert_hunyuan_avatar

    q, scales = _fp8(released["sd"])
    assert len(scales) == 4 * 10 + 2 * 3  # 10 Linears per dual block, 3 per single block
    torch.save({"module": q}, tmp_path / "mp_rank_00_model_states_fp8.pt")
    torch.save({"module": scales}, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    (tmp_path / "config.json").write_text((released["tmp"] / "orig" / "config.json").read_text())
    # the released loader looks up the config beside the weights the same way: give the file itself
    convert_hunyuan_avatar(tmp_path / "mp_rank_00_model_states_fp8.pt", tmp_path / "ours", progress=False)
    back = load_params_numpy(tmp_path / "ours")
    k_qkv = back["double_blocks.img_attn.to_q.kernel"][2]  # block 2's q rows of img_attn_qkv, transposed
    w = q["double_blocks.2.img_attn_qkv.weight"].float() * scales["double_blocks.2.img_attn_qkv"].float()
    np.testing.assert_array_equal(k_qkv, w[:64].numpy().T)  # exactly fp8 value x scale
    orig = released["ours"]["double_blocks.img_attn.to_q.kernel"][2]
    assert 0 < np.abs(k_qkv - orig).max() <= 0.07 * np.abs(orig).max()  # really quantised, and close
    for k in ("audio_adapters.to_kv.kernel", "ref_in.kernel", "double_blocks.img_attn.norm_q.scale"):
        assert np.array_equal(back[k], released["ours"][k]), k  # not quantised: unchanged


def test_bad_checkpoints_named_in_one_error(released, tmp_path):
    import torch

    from hallojax.convert import ConversionError
    from hallojax.convert.hunyuan_avatar import convert_hunyuan_avatar

    cfg_json = (released["tmp"] / "orig" / "config.json").read_text()
    bad = dict(released["sd"])
    del bad["audio_adapter_blocks.1.to_out.weight"]
    bad["before_proj.weight"] = bad["before_proj.weight"][:, :-1]
    bad["motion_exp.mlp.1.weight"] = torch.zeros(3)
    (tmp_path / "src").mkdir()
    torch.save({"module": bad}, tmp_path / "src" / "mp_rank_00_model_states.pt")
    (tmp_path / "src" / "config.json").write_text(cfg_json)
    with pytest.raises(ConversionError) as e:
        convert_hunyuan_avatar(tmp_path / "src", tmp_path / "out", progress=False)
    msg = str(e.value)
    for key in ("audio_adapter_blocks.1.to_out.weight", "before_proj.weight", "motion_exp.mlp.1.weight"):
        assert key in msg, msg
    assert "1 missing" in msg and "1 unexpected" in msg and "mis-shaped" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))

    # fp8: a scale missing, a stray scale and a missing key, all in one error
    q, scales = _fp8(released["sd"])
    del scales["single_blocks.1.linear2"]
    scales["double_blocks.0.nothing"] = torch.tensor(1.0)
    del q["fps_proj.mlp.2.bias"]
    (tmp_path / "fp8").mkdir()
    torch.save({"module": q}, tmp_path / "fp8" / "w_fp8.pt")
    torch.save({"module": scales}, tmp_path / "fp8" / "w_fp8_map.pt")
    (tmp_path / "fp8" / "config.json").write_text(cfg_json)
    with pytest.raises(ConversionError) as e:
        convert_hunyuan_avatar(tmp_path / "fp8" / "w_fp8.pt", tmp_path / "out8", progress=False)
    msg = str(e.value)
    for key in ("single_blocks.1.linear2", "double_blocks.0.nothing", "fps_proj.mlp.2.bias"):
        assert key in msg, msg
    assert not list(tmp_path.glob("out8*"))
    (tmp_path / "fp8" / "w_fp8_map.pt").unlink()
    with pytest.raises(ConversionError, match="w_fp8_map.pt"):
        convert_hunyuan_avatar(tmp_path / "fp8" / "w_fp8.pt", tmp_path / "out8", progress=False)


def test_released_key_set_at_full_size():
    """From shapes alone: the released file's keys and element count, and the fp8 file's quantised Linears."""
    from hallojax.convert.hunyuan_avatar import avatar_rules
    from hallojax.convert.table import _torch_shape, select

    cfg = preset("hunyuan-avatar")
    shapes = param_shapes(cfg)
    counts = avatar_layer_counts(cfg)
    rules = select(avatar_rules(cfg), shapes)
    assert {r.ours for r in rules} == set(shapes)  # every parameter has a released key
    keys: dict[str, int] = {}
    for r in rules:
        n = next((v for p, v in counts.items() if r.ours.startswith(p + ".")), 0) if "{i}" in r.torch else 1
        for i in range(n):
            keys[r.torch.format(i=i)] = keys.get(r.torch.format(i=i), 0) + int(np.prod(_torch_shape(r, shapes)))
    assert sum(keys.values()) == 12_991_493_184
    assert len(keys) == len(set(keys))
    fp8 = [k for k in keys if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight")
           and "norm" not in k]
    assert len(fp8) == 20 * 10 + 40 * 3  # 320 float8 weights, 320 scales in the map
    print(f"released Avatar keys: {len(keys)}, elements {sum(keys.values()):,}, fp8 weights {len(fp8)}")


# --- the released feature cache (off by default) ---
@nnx.jit(static_argnames="mode")
def run_cache(model, x, t, mode, cache=None):
    return model(x["lat"], t, x["text"], x["pooled"], x["ref"], x["audio"], text_mask=x["mask"], face_mask=x["face"],
                 fps=x["fps"], motion_exp=x["exp"], motion_pose=x["pose"],
                 single_cache="store" if mode == "store" else cache)


def test_feature_cache(models):
    """A storing forward is the forward (parity with the reference) plus the last single block's input; reusing
    it with the same inputs gives the same output; at the next step's timestep it is the released approximation
    (the measured error is printed); the released schedule reuses 20 of 50 steps."""
    from hallojax.models.hunyuan_avatar import feature_cache_schedule

    x = ref.inputs(valid=(7, 4))
    want = ref.forward(models["trunk"], models["extras"], x, 1.0)
    a = _arrays(x)
    out, cache = run_cache(models["ours"], a, a["t"], "store")
    assert_parity(out, want, "storing forward")
    assert cache.shape == (2, 6 + 18 + 7, 64)  # [ref frame ; video ; text] tokens
    again = run_cache(models["ours"], a, a["t"], "reuse", cache)
    assert_parity(again, out, "reused cache, same step")
    t_next = a["t"] - 20.0
    full = np.asarray(run_cache(models["ours"], dict(a, lat=a["lat"] * 0.98), t_next, "store")[0])
    reused = np.asarray(run_cache(models["ours"], dict(a, lat=a["lat"] * 0.98), t_next, "reuse", cache))
    rel = np.abs(reused - full).max() / np.abs(full).max()
    assert 0 < rel < 0.5  # an approximation, not the full forward, and not unrelated to it
    print(f"feature cache, next step (t - 20, latents x 0.98): max relative error vs a full step {rel:.3g}")
    with pytest.raises(ValueError, match="single_cache has shape"):
        run_cache(models["ours"], a, a["t"], "reuse", cache[:, :-1])

    reuse = feature_cache_schedule(50)
    assert reuse.sum() == 20
    assert list(np.flatnonzero(reuse)) == [*range(16, 20), *range(21, 25), *range(26, 30), *range(31, 35),
                                           *range(36, 40)]

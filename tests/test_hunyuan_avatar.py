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

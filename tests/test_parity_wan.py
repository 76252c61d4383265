"""Parity with diffusers' WanTransformer3DModel (fp32, CPU), through the real converter and loader.

Tolerance: max |ours - diffusers| <= 1e-5 * max(1, max |diffusers|). Never loosen it: find the bug.
No process-wide matmul precision is set (conftest): the model runs at its own `precision`.
"""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hallojax import cli, load_pretrained
from hallojax.config import load_config
from hallojax.convert import convert_wan_diffusers, export_wan_diffusers
from hallojax.convert.safetensors_io import TensorStore
from hallojax.sharding import make_mesh, use_rules
from wan_reference import TINY_I2V, TINY_T2V, diffusers_forward, inputs, make_diffusers_wan

TINY_FLF2V = dict(TINY_I2V, pos_embed_seq_len=10)  # two frames x 5 image tokens
VARIANTS = {"t2v": (TINY_T2V, None, 20), "i2v": (TINY_I2V, 5, 512), "flf2v": (TINY_FLF2V, 10, 512)}


def assert_parity(ours, ref, note=""):
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    bound = 1e-5 * max(1.0, np.abs(ref).max())
    assert err <= bound, f"max |ours - diffusers| = {err:.3g} > {bound:.3g} {note}"


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request, tmp_path_factory):
    config, image_len, text_len = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model = make_diffusers_wan(config, seed=len(request.param))
    model.save_pretrained(tmp / "diffusers")
    convert_wan_diffusers(tmp / "diffusers", tmp / "ours", progress=False)
    return dict(name=request.param, config=config, model=model, tmp=tmp, image_len=image_len, text_len=text_len)


def _run_both(c, ours, **shape):
    lat, t, ctx, img = inputs(c["config"], image_len=c["image_len"], text_len=c["text_len"], **shape)
    ref_img = img
    if img is not None and c["config"].get("pos_embed_seq_len"):
        # ours takes both frames' image tokens concatenated [B, 2M, D]; diffusers takes them as
        # 2B rows [2B, M, D] and folds them pairwise back into [B, 2M, D]
        ref_img = img.reshape(2 * img.shape[0], -1, img.shape[-1])
    ref = diffusers_forward(c["model"], lat, t, ctx, ref_img)
    kw = {} if img is None else {"image_context": img}
    return ours(lat, t, ctx, **kw), ref


def program_dots(model, *args, **kw) -> list[str]:
    """The StableHLO dot_general / convolution lines of the model's forward program."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    text = jax.jit(lambda s, a, k: nnx.merge(graphdef, s)(*a, **k)).lower(state, args, kw).as_text()
    return [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln or "stablehlo.convolution" in ln]


def test_forward_matches_diffusers(converted):
    """fp32 parity at the library's own precision, with the process-wide default left at "default" (what
    TPUs and TF32 GPUs round fp32 dots with): float32 compute puts every dot of the program at HIGHEST
    itself (on CPU fp32 dots are exact at any setting, so the program is what shows it)."""
    import jax

    ours, cfg = load_pretrained(converted["tmp"] / "ours", dtype="float32")
    assert cfg.num_layers == converted["config"]["num_layers"] and cfg.precision == "auto"
    with jax.default_matmul_precision("default"):
        out, ref = _run_both(converted, ours)
        lat, t, ctx, img = inputs(converted["config"], image_len=converted["image_len"], text_len=converted["text_len"])
        dots = program_dots(ours, lat, t, ctx, **({} if img is None else {"image_context": img}))
    assert_parity(out, ref)
    assert len(dots) > 10 and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots


def test_sharded_forward_matches_diffusers(converted, devices):
    config = load_config("configs/wan.py:tiny,mesh=fsdp_tp")
    mesh = make_mesh(dict(config.mesh))
    ours, _ = load_pretrained(converted["tmp"] / "ours", mesh=mesh, rules=config.rules, dtype="float32")
    kernel = ours.blocks.attn1.to_q.kernel.get_value()
    assert kernel.addressable_shards[0].data.shape == (2, 64 // 4, 64 // 2)  # really split: fsdp 4, tensor 2
    with torch.no_grad(), use_rules(config.rules):
        import jax

        with jax.set_mesh(mesh):
            out, ref = _run_both(converted, ours, batch=4)
    assert_parity(out, ref)


def test_round_trip_is_bitwise(converted):
    out = converted["tmp"] / "exported"
    export_wan_diffusers(converted["tmp"] / "ours", out, progress=False)
    original = {k: v.numpy() for k, v in converted["model"].state_dict().items()}
    exported = TensorStore(out)
    assert sorted(exported.keys()) == sorted(original)
    for k, v in original.items():
        assert exported.get(k).dtype == v.dtype and np.array_equal(exported.get(k), v), k

    from diffusers import WanTransformer3DModel

    reloaded = WanTransformer3DModel.from_pretrained(out)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, converted["model"].state_dict()[k]), k
    ref_cfg = converted["model"].config
    new_cfg = json.loads((out / "config.json").read_text())
    for key in converted["config"]:
        assert list(np.atleast_1d(new_cfg[key])) == list(np.atleast_1d(ref_cfg[key])), key


def test_cli_convert_of_index_sharded_bf16_model_on_fresh_inputs(tmp_path):
    """`hallojax convert` on a saved model the tests did not shape-fit: bf16 weights, index-sharded
    safetensors, inputs drawn from a fresh seed with other shapes."""
    model = make_diffusers_wan(TINY_T2V, seed=11)
    with torch.no_grad():  # round the weights to bf16 but keep the fp32 reference's RoPE buffers exact
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert (tmp_path / "src" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert cli.main(["convert", "wan-diffusers", str(tmp_path / "src"), str(tmp_path / "ours")]) == 0
    ours, _ = load_pretrained(tmp_path / "ours", dtype="float32")

    seed = int.from_bytes(os.urandom(4), "little")
    lat, t, ctx, _ = inputs(TINY_T2V, batch=3, frames=2, height=4, width=8, text_len=9, seed=seed)
    t = np.random.default_rng(seed).uniform(0, 1000, 3).astype(np.float32)
    ref = diffusers_forward(model, lat, t, ctx)
    assert_parity(ours(lat, t, ctx), ref, note=f"(fresh input seed {seed})")

    # bf16 in, bf16 out, bit for bit
    assert cli.main(["export", "wan-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = TensorStore(tmp_path / "back")
    for k, v in model.to(torch.bfloat16).state_dict().items():
        assert np.array_equal(back.get(k).view(np.uint16), v.view(torch.int16).numpy().view(np.uint16)), k


def test_bf16_compute_tracks_diffusers_bf16(converted):
    """bf16 is not bitwise: the bound is diffusers' own bf16 error. Ours in bf16 must be no further
    from diffusers in bf16 (loaded with torch_dtype, fp32 modules kept) than that is from fp32."""
    from diffusers import WanTransformer3DModel

    ref_bf16 = WanTransformer3DModel.from_pretrained(converted["tmp"] / "diffusers", torch_dtype=torch.bfloat16)
    lat, t, ctx, img = inputs(converted["config"], image_len=converted["image_len"], text_len=converted["text_len"])
    ref_img = img if img is None or not converted["config"].get("pos_embed_seq_len") else \
        img.reshape(2 * img.shape[0], -1, img.shape[-1])
    ref32 = diffusers_forward(converted["model"], lat, t, ctx, ref_img)
    kw = {} if img is None else {"encoder_hidden_states_image": torch.from_numpy(ref_img).to(torch.bfloat16)}
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(lat.transpose(0, 4, 1, 2, 3))).to(torch.bfloat16)
        refb = ref_bf16(x, torch.from_numpy(t), torch.from_numpy(ctx).to(torch.bfloat16), return_dict=False, **kw)[0]
    refb = refb.float().numpy().transpose(0, 2, 3, 4, 1)
    ours, _ = load_pretrained(converted["tmp"] / "ours", dtype="bfloat16")
    kw = {} if img is None else {"image_context": img}
    out = ours(lat, t, ctx, **kw)
    # really bf16 compute: the output, and every matmul but the timestep MLP's two (float32, as diffusers keeps
    # its time embedder in fp32), takes bf16 operands
    assert out.dtype == jnp.bfloat16
    dots = [d for d in program_dots(ours, lat, t, ctx, **kw) if "dot_general" in d]
    operands = [d.rsplit(" : (", 1)[1].split(") -> ")[0].split(", ") for d in dots]
    fp32 = [d for d, ops in zip(dots, operands) if not all(o.endswith("xbf16>") for o in ops)]
    assert len(dots) > 10 and len(fp32) == 2, fp32
    out = np.asarray(out, np.float32)
    own = np.abs(refb - ref32)
    ours_err = np.abs(out - refb)
    assert ours_err.max() <= 2 * own.max(), (ours_err.max(), own.max())
    assert ours_err.mean() <= own.mean(), (ours_err.mean(), own.mean())

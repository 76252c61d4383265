"""Parity with diffusers' CogVideoXTransformer3DModel (fp32, CPU) through the real converter and loader:
2B-style (sin-cos positions), 5B-I2V-style (RoPE + learned table) and 1.5-I2V-style (temporal patch, ofs)
tiny models, on 1 device and on 8 (FSDP 4 x TP 2); bf16 against diffusers' own bf16 error; the converter
round trip; the full-size parameter counts from shapes; bad checkpoints; the Hallo3 extension points.

Tolerance: max |ours - diffusers| <= 1e-5 * max(1, max |diffusers|) (`assert_parity`). Never loosen it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from cogvideox_reference import TINY, diffusers_forward, inputs, make_diffusers_cogvideox, rotary_emb
from hallojax import cli, load_pretrained, registry
from hallojax.convert import ConversionError
from hallojax.convert.cogvideox import convert_cogvideox, export_cogvideox
from hallojax.convert.safetensors_io import TensorStore
from hallojax.models.cogvideox import PRESETS, LayerHook, param_count, preset
from hallojax.nn.layers import Dense, stacked
from hallojax.sharding import DEFAULT_RULES, make_mesh, use_rules
from encoder_reference import assert_parity
from test_parity_wan import program_dots

FRAMES = {"2b": 3, "5b-i2v": 3, "1.5-i2v": 4}  # latent frames of the test inputs (1.5: divisible by patch_t 2)


_BUILT: dict[str, dict] = {}


def _build(name, tmp_path_factory):
    """The tiny diffusers model `name`, saved, converted and loaded: built once per test module."""
    if name not in _BUILT:
        tmp = tmp_path_factory.mktemp(name)
        model = make_diffusers_cogvideox(TINY[name], seed=len(name))
        model.save_pretrained(tmp / "diffusers")
        convert_cogvideox(tmp / "diffusers", tmp / "ours", progress=False)
        ours, cfg = load_pretrained(tmp / "ours", dtype="float32")
        _BUILT[name] = dict(name=name, config=TINY[name], model=model, tmp=tmp, ours=ours, cfg=cfg)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(TINY))
def converted(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """The 5B-I2V-style model (Hallo3's base): the checks that need only one variant."""
    yield _build("5b-i2v", tmp_path_factory)
    _BUILT.clear()


def _inputs(c, **kw):
    return inputs(c["config"], frames=FRAMES[c["name"]], **kw)


def forward(model, *args, method="__call__", **kw):
    """A model method, jitted (one compile instead of op-by-op dispatch: the tests' time budget)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, a, k: getattr(nnx.merge(graphdef, s), method)(*a, **k))(state, args, kw)


def test_forward_matches_diffusers(converted):
    """fp32 parity at the model's own precision (every dot HIGHEST even under a "default" process setting)."""
    lat, t, ctx, ofs = _inputs(converted)
    ref = diffusers_forward(converted["model"], converted["config"], lat, t, ctx, ofs)
    with jax.default_matmul_precision("default"):
        out = forward(converted["ours"], lat, t, ctx, ofs=ofs)
        dots = program_dots(converted["ours"], lat, t, ctx, ofs=ofs)
    assert_parity(out, ref)
    assert len(dots) > 10 and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots


def test_sharded_forward_matches_diffusers(converted, devices):
    mesh = make_mesh(dict(fsdp=4, tensor=2))
    ours, _ = load_pretrained(converted["tmp"] / "ours", mesh=mesh, rules=DEFAULT_RULES, dtype="float32")
    kernel = ours.blocks.attn1.to_q.kernel.get_value()
    assert kernel.addressable_shards[0].data.shape == (2, 64 // 4, 64 // 2)  # really split: fsdp 4, tensor 2
    lat, t, ctx, ofs = _inputs(converted, batch=4)
    ref = diffusers_forward(converted["model"], converted["config"], lat, t, ctx, ofs)
    with use_rules(DEFAULT_RULES), jax.set_mesh(mesh):
        out = forward(ours, lat, t, ctx, ofs=ofs)
    assert_parity(out, ref)


def test_round_trip_is_bitwise(converted):
    out = converted["tmp"] / "exported"
    export_cogvideox(converted["tmp"] / "ours", out, progress=False)
    original = {k: v.numpy() for k, v in converted["model"].state_dict().items()}
    exported = TensorStore(out)
    assert sorted(exported.keys()) == sorted(original)
    for k, v in original.items():
        assert exported.get(k).dtype == v.dtype and np.array_equal(exported.get(k), v), k

    from diffusers import CogVideoXTransformer3DModel

    reloaded = CogVideoXTransformer3DModel.from_pretrained(out)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, converted["model"].state_dict()[k]), k
    new_cfg = json.loads((out / "config.json").read_text())
    for key, value in converted["model"].config.items():
        if not key.startswith("_"):
            assert new_cfg[key] == value, key


def test_bf16_compute_tracks_diffusers_bf16(i2v):
    """bf16 is not bitwise: ours in bf16 must be no further from diffusers in bf16 than that is from fp32
    (the Hallo3 base only: test time)."""
    from diffusers import CogVideoXTransformer3DModel

    c = i2v
    ref_bf16 = CogVideoXTransformer3DModel.from_pretrained(c["tmp"] / "diffusers", torch_dtype=torch.bfloat16)
    lat, t, ctx, ofs = _inputs(c)
    ref32 = diffusers_forward(c["model"], c["config"], lat, t, ctx, ofs)
    refb = diffusers_forward(ref_bf16, c["config"], lat, t, ctx, ofs, dtype=torch.bfloat16)
    ours, _ = load_pretrained(c["tmp"] / "ours", dtype="bfloat16")
    out = forward(ours, lat, t, ctx, ofs=ofs)
    # really bf16 compute: the output and every matmul's operands (diffusers keeps no fp32 module here)
    assert out.dtype == jnp.bfloat16
    dots = [d for d in program_dots(ours, lat, t, ctx, ofs=ofs) if "dot_general" in d]
    operands = [d.rsplit(" : (", 1)[1].split(") -> ")[0].split(", ") for d in dots]
    assert len(dots) > 10 and all(o.endswith("xbf16>") for ops in operands for o in ops), dots
    out = np.asarray(out, np.float32)
    own, ours_err = np.abs(refb - ref32), np.abs(out - refb)
    assert ours_err.max() <= 2 * own.max(), (ours_err.max(), own.max())
    assert ours_err.mean() <= own.mean(), (ours_err.mean(), own.mean())


# --- position tables ---


def test_learned_table_is_sliced_for_fewer_frames(i2v):
    """5B-I2V at fewer latent frames adds the first rows of its learned table (SAT's behaviour; diffusers
    would swap in a sin-cos table). Reference: diffusers built for 2 frames with the table's first rows."""
    from diffusers import CogVideoXTransformer3DModel

    config, full, ours = i2v["config"], i2v["model"], i2v["ours"]
    short_cfg = dict(config, sample_frames=5)  # (5 - 1) // 4 + 1 = 2 latent frames
    short = CogVideoXTransformer3DModel(**short_cfg).eval()
    sd = full.state_dict()
    rows = short.patch_embed.pos_embedding.shape[1]
    short.load_state_dict({**sd, "patch_embed.pos_embedding": sd["patch_embed.pos_embedding"][:, :rows]})
    lat, t, ctx, _ = inputs(config, frames=2, seed=5)
    assert_parity(forward(ours, lat, t, ctx), diffusers_forward(short, short_cfg, lat, t, ctx))
    with pytest.raises(ValueError, match="does not fit the learned position table"):
        ours(np.zeros((1, 2, 6, 6, 8), np.float32), t[:1], ctx[:1])
    with pytest.raises(ValueError, match="learned position table has 5 text rows"):
        ours(lat, t, ctx[:, :4])


def test_rope_tables_equal_diffusers_at_full_size():
    """The RoPE tables at CogVideoX's real grids (positions up to 44): 1.0 at 480x720x49 (the pipeline's
    resize-crop linspace grid, integers there) and 1.5's slice grid, within one float32 ulp of diffusers'."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    from hallojax.nn.rope import grid_coords, rope_cos_sin

    crops = get_resize_crop_region_for_grid((30, 45), 45, 30)
    for grid, ref in (((13, 30, 45), get_3d_rotary_pos_embed(64, crops, (30, 45), 13)),
                      ((11, 48, 85), get_3d_rotary_pos_embed(64, None, (48, 85), 11, grid_type="slice",
                                                             max_size=(150, 150)))):
        ours = jax.jit(lambda c: rope_cos_sin(c, 64, split="cogvideox"))(grid_coords(*grid))  # one compile
        for o, r in zip(ours, ref):
            assert np.abs(np.repeat(np.asarray(o), 2, axis=-1) - r.numpy()).max() <= 6e-8, grid


# --- full-size shapes ---


def test_full_size_parameter_counts_from_shapes():
    """5B-I2V from shapes alone: diffusers' 5,570,479,680 parameters + the 54,607,872-element learned table;
    every preset equals diffusers built on the meta device (parameters + the persistent table)."""
    from diffusers import CogVideoXTransformer3DModel

    from hallojax.convert.cogvideox import config_to_diffusers

    model = registry.abstract(preset("5b-i2v"))
    assert model.pos_embedding.shape == (1, 226 + 13 * 30 * 45, 3072)
    assert param_count(model) == 5_570_479_680 + 54_607_872
    for name in PRESETS:
        d = {k: v for k, v in config_to_diffusers(preset(name)).items() if not k.startswith("_")}
        with torch.device("meta"):
            ref = CogVideoXTransformer3DModel(**d)
        want = sum(p.numel() for p in ref.parameters()) + sum(
            b.numel() for k, b in ref.state_dict().items() if k == "patch_embed.pos_embedding")
        assert param_count(registry.abstract(preset(name))) == want, name


# --- bad checkpoints ---


def test_bad_checkpoint_lists_every_problem_and_writes_nothing(i2v, tmp_path):
    src = i2v["tmp"] / "diffusers"
    tensors = safetensors.numpy.load_file(str(src / "diffusion_pytorch_model.safetensors"))
    del tensors["transformer_blocks.1.attn1.norm_k.bias"]
    tensors["patch_embed.pos_embedding"] = np.zeros((1, 22, 64), np.float32)
    tensors["transformer_blocks.0.ff.net.2.weight"] = np.zeros((64, 255), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_cogvideox(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "1 missing" in msg and "transformer_blocks.1.attn1.norm_k.bias (expected (16,))" in msg
    assert "2 mis-shaped" in msg and "patch_embed.pos_embedding: (1, 22, 64)" in msg
    assert "transformer_blocks.0.ff.net.2.weight: (64, 255)" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    # through the CLI: the same error, no traceback, exit 2
    assert cli.main(["convert", "cogvideox", str(bad), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# --- Hallo3 extension points ---


def _diffusers_block_forward(block, hook_fn):
    """diffusers' CogVideoXBlock.forward with `hook_fn(video) -> video` after the attention residual."""

    def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        m = encoder_hidden_states.size(1)
        h, e, gate, e_gate = block.norm1(hidden_states, encoder_hidden_states, temb)
        a, ae = block.attn1(hidden_states=h, encoder_hidden_states=e, image_rotary_emb=image_rotary_emb)
        hidden_states, encoder_hidden_states = hidden_states + gate * a, encoder_hidden_states + e_gate * ae
        hidden_states = hook_fn(hidden_states)
        h, e, gate_ff, e_gate_ff = block.norm2(hidden_states, encoder_hidden_states, temb)
        f = block.ff(torch.cat([e, h], dim=1))
        return hidden_states + gate_ff * f[:, m:], encoder_hidden_states + e_gate_ff * f[:, :m]

    return forward


def test_layer_hook_runs_after_attention_with_per_layer_modules(i2v, monkeypatch):
    """A stacked per-layer module applied by `LayerHook` (v + tanh(Dense_l(v)) * scale) equals diffusers with
    the same op inserted after each block's attention residual."""
    c, model = i2v, i2v["model"]
    hooks = stacked(Dense, 2, nnx.Rngs(7), 64, 64, ("embed", "mlp"))
    scale = np.float32(0.5)

    def fn(block, dense, video, text, inputs):
        return video + jnp.tanh(dense(video)) * inputs

    lat, t, ctx, _ = _inputs(c)
    (graphdef, state), (hook_def, hook_state) = nnx.split(c["ours"]), nnx.split(hooks)

    @jax.jit
    def run(state, hook_state, lat, t, ctx):  # the hook module's state enters the program like the model's
        hook = LayerHook(fn, nnx.merge(hook_def, hook_state), jnp.asarray(scale))
        return nnx.merge(graphdef, state)(lat, t, ctx, hook=hook)

    out = run(state, hook_state, lat, t, ctx)
    for i, block in enumerate(model.transformer_blocks):
        w = torch.tensor(np.asarray(hooks.kernel[...][i]))
        b = torch.tensor(np.asarray(hooks.bias[...][i]))
        monkeypatch.setattr(block, "forward", _diffusers_block_forward(
            block, lambda v, w=w, b=b: v + torch.tanh(v @ w + b) * float(scale)))
    assert_parity(out, diffusers_forward(model, c["config"], lat, t, ctx))
    monkeypatch.undo()
    base = diffusers_forward(model, c["config"], lat, t, ctx)
    assert np.abs(np.asarray(out, np.float64) - base).max() > 1e-2  # the hook really changed the output


def test_extra_tokens_and_attention_inputs_match_diffusers(i2v):
    """Hallo3's reference bank: `attention_inputs` equals every diffusers layer's norm1 video output, and
    attention with extra tokens (own K/V + k-norm, no RoPE) equals diffusers' attention with them appended
    after the text (keys are order-free, RoPE reaches only the video tokens)."""
    c, model, ours = i2v, i2v["model"], i2v["ours"]
    lat, t, ctx, _ = _inputs(c)
    seen = []
    handles = [blk.norm1.register_forward_hook(lambda mod, args, out: seen.append(out[0].numpy().copy()))
               for blk in model.transformer_blocks]
    try:
        diffusers_forward(model, c["config"], lat, t, ctx)
    finally:
        for h in handles:
            h.remove()
    bank = forward(ours, lat, t, ctx, method="attention_inputs")
    assert bank.shape == (2, 2, 3 * 2 * 3, 64)
    for i in range(2):
        assert_parity(bank[i], seen[i].astype(np.float64), note=f"layer {i}")

    # one block's attention with 7 extra tokens
    rng = np.random.default_rng(3)
    video, text = (rng.standard_normal((2, n, 64)).astype(np.float32) for n in (18, 5))
    extra = rng.standard_normal((2, 7, 64)).astype(np.float32)
    cos, sin = rotary_emb(c["config"], 3, 4, 6)
    with torch.no_grad():
        a, ae = model.transformer_blocks[1].attn1(
            hidden_states=torch.from_numpy(video), encoder_hidden_states=torch.from_numpy(np.concatenate(
                [text, extra], axis=1)), image_rotary_emb=(cos, sin))
    ref = np.concatenate([ae.numpy()[:, :5], a.numpy()], axis=1).astype(np.float64)
    graphdef, state = nnx.split(ours.blocks)  # layer 1 of the stacked blocks
    layer1 = nnx.merge(graphdef, jax.tree.map(lambda x: x[1], state))
    rope = ours.rope((3, 2, 3))

    @jax.jit
    def attend(x, extra):
        with jax.default_matmul_precision("highest"):
            return layer1.attn1(x, 5, rope, extra), layer1.attn1(x, 5, rope)

    got, without = attend(jnp.concatenate([text, video], axis=1), jnp.asarray(extra))
    assert_parity(got, ref)
    assert np.abs(np.asarray(without) - ref).max() > 1e-3  # the extra tokens matter

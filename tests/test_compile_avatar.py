"""`hallojax compile` on HunyuanVideo-Avatar (configs/hunyuan_avatar.py), ahead of time for TPU topologies on this
CPU host at tiny width: the trainer's step (hallojax.families) with the config's remat / offload and gradient
accumulation levers, and `--sample`: one Euler step of one window over the released guidance's 2 live
branches, the step generation runs (`generate_families.avatar_step`)."""

import pytest

from hallojax.aot import compile_sample_step
from hallojax.cli import main
from hallojax.config import load_config
from hallojax.models.hunyuan_avatar import avatar_flops, preset

TINY = ["--frames", "3", "--height", "8", "--width", "8", "--text-len", "16"]


def test_train_step_with_offload_and_micro_batches_compiles_for_v5p(capsys):
    """Forward + backward over 2 micro-batches of 4 rows (1 per chip), layer inputs offloaded, AdamW and EMA,
    FSDP over 4 chips."""
    args = ["compile", "--config", "configs/hunyuan_avatar.py:tiny,remat=offload_layer_input",
            "--config.train.accum_steps=2", "--topology", "v5p:2x2x1", "--batch", "8", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'fsdp': 4" in out and "global batch 8 (2 per chip)" in out
    assert "per chip: arguments" in out and "collectives per chip per step" in out
    assert "pinned host memory per chip (offloaded activations)" in out  # the offload lever reached the model
    assert f"FLOPs per step: {3 * avatar_flops(preset('tiny'), 8, 3, 8, 8, 16) / 1e9:.2f} GFLOP" in out
    assert main([*args[:3], "--config.train.accum_steps=3", *args[4:]]) == 2
    assert "must divide by train.accum_steps=3" in capsys.readouterr().err


def test_sample_step_of_one_window_compiles_for_v5e_over_context():
    """The released recipe's widest phase (2 branches: full, and without text + audio) as 2 rows of one window,
    bf16 weights, the tokens and the weights over context 2 x FSDP 2."""
    config = load_config("configs/hunyuan_avatar.py:tiny,mesh=fsdp_context", ["--config.model.param_dtype=bfloat16"])
    report = compile_sample_step(config, "v5e:2x2", frames=3, height=8, width=8, text_len=16)
    assert report.fits and report.mesh["context"] == 2 and report.mesh["fsdp"] == 2 and report.branches == 2
    assert 0 < report.total_gib < 0.1 and report.collectives["all-gather"] > 0
    assert report.flops_per_step == avatar_flops(preset("tiny"), 2, 3, 8, 8, 16)
    assert "2 guidance branches x 1 window = 2 model rows (0.5 per chip)" in "\n".join(report.lines())
    with pytest.raises(ValueError, match="windows per step"):
        compile_sample_step(config, "v5e:2x2", batch=3, frames=2, height=8, width=8, text_len=16)
    with pytest.raises(ValueError, match="--height 7: must be a multiple of the patch size 2"):
        compile_sample_step(config, "v5e:2x2", frames=3, height=7, width=8, text_len=16)


def test_flops_count_grows_with_tokens():
    cfg = preset("hunyuan-avatar")
    one = avatar_flops(cfg, 1, 33, 88, 88, 832)
    assert 2 * avatar_flops(cfg, 1, 33, 88, 88, 832) == avatar_flops(cfg, 2, 33, 88, 88, 832)
    # joint attention 4·L²·D over 60 blocks at L = 66,656: 3.28 PFLOP, plus the token-wise matmuls (~0.9 PFLOP:
    # the modulation tables, a large share of the 13B weights, act on the vector, not on every token)
    attention = 60 * 4 * 66_656 ** 2 * 3072
    assert attention < one < attention + 1.0e15

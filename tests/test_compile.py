"""`hallojax compile`: the training step (or with --sample one denoising step of generation) compiled ahead
of time for a TPU topology on this CPU host (libtpu from the tpu extra), with per-chip memory, FLOPs and
collective bytes, and a clear verdict when it does not fit."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from hallojax.aot import (FitReport, collective_bytes, compile_sample_step, compile_train_step, fit_hints,
                          parse_topology, sample_fit_hints)
from hallojax.cli import main
from hallojax.config import load_config
from hallojax.models.wan import DiTConfig
from hallojax.flops import train_flops
from hallojax.sharding import make_mesh


def test_topology_names():
    assert parse_topology("v5p:2x2x2") == ("v5p:2x2x2", 8)
    assert parse_topology("v5p-16") == ("v5p:2x2x2", 8)  # Cloud TPU names count TensorCores on v4/v5p
    assert parse_topology("v5p-64") == ("v5p:2x4x4", 32)
    assert parse_topology("v6e-8") == ("v6e:2x4", 8)  # ... and chips on v5e/v6e
    for bad in ("v5p", "h100:8", "v5p-12", "v5p:2xx2"):
        with pytest.raises(ValueError, match="topology"):
            parse_topology(bad)


def test_style_train_step_compiles_for_v5p_with_memory_and_flops():
    config = load_config("configs/wan.py:hyavatar-style,remat=full")  # conditioning inputs included
    report = compile_train_step(config, "v5p:2x2x1", batch=8, frames=3, height=8, width=8, text_len=16)
    assert report.fits and report.chips == 4 and report.device_kind.startswith("TPU v5")
    assert report.mesh["fsdp"] == 4 and report.hbm_gib == pytest.approx(95.74)
    assert 0 < report.argument_gib < report.total_gib < 1.0 and report.temp_gib > 0
    assert report.host_gib == 0  # nothing offloaded under full remat
    cfg = DiTConfig.from_dict(config.model)
    assert report.flops_per_step == train_flops(cfg, batch=8, frames=3, height=8, width=8, text_len=16)
    assert report.xla_flops_per_chip > 0


def test_offloaded_layer_inputs_go_to_host_memory():
    # remat=offload_layer_input: each layer's input (the scan carry, [per-chip batch, tokens, dim] bf16)
    # lives in pinned host memory (under remat=full nothing does: the test above)
    config = load_config("configs/wan.py:tiny,remat=offload_layer_input", ["--config.model.num_layers=3"])
    report = compile_train_step(config, "v5p:2x2x1", batch=8, frames=3, height=32, width=32, text_len=16)
    assert report.fits
    stream = 2 * (3 * 16 * 16) * DiTConfig.from_dict(config.model).dim * 2 / 2**30  # 2 per chip, 768 tokens
    # XLA may keep two host copies of the stacked carries (it does at this size; at 14B scale one)
    assert 3 * stream * (1 - 1e-6) <= report.host_gib <= 6 * stream * (1 + 1e-6), report.host_gib / stream


def test_cli_prints_the_fit_and_fails_when_it_does_not_fit(capsys):
    args = ["compile", "--config", "configs/wan.py:tiny", "--topology", "v5p-8", "--batch", "4",
            "--frames", "3", "--height", "8", "--width", "8", "--text-len", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "$ hallojax compile" in out and "v5p:2x2x1 (4 chips" in out and "total" in out and "of 95.7 GiB" in out
    assert "collectives per chip per step:" in out and "all-gather" in out  # FSDP gathers the weights
    # 21 x 240 x 416 latents with XLA attention: the [L, L] logits alone are terabytes per chip
    assert main([*args[:5], "--batch", "4", "--frames", "21", "--height", "240", "--width", "416"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "try: --config.model.attention=splash" in out and "remat=full" in out
    assert "accum_steps" not in out  # 1 sample per chip: nothing to split into micro-batches
    hints = fit_hints(DiTConfig(attention="splash", remat="offload_layer_input"), accum_steps=1, per_chip_batch=2)
    assert hints == ("--config.train.accum_steps=2 (the batch in micro-batches: the activations of one at a time; "
                     "the same optimizer step)", "a smaller --batch, or more chips")
    assert main([*args[:3], "--topology", "v5p-7"]) == 2
    assert "no standard slice shape" in capsys.readouterr().err


def test_collective_bytes_count_every_loop_trip(devices):
    """Per-chip bytes of each collective kind in a compiled SPMD program, times the trips of its loop."""
    mesh = make_mesh({"fsdp": 8})

    def local(x):  # [4, 16] float32 per chip: 256 bytes
        def body(i, c):
            c = jax.lax.psum(c, "fsdp") * 0.5
            gathered = jax.lax.all_gather(c, "fsdp", tiled=True)  # [32, 16]: 2048 bytes
            return c + gathered[:4] + jax.lax.ppermute(c, "fsdp", [(j, (j + 1) % 8) for j in range(8)])
        return jax.lax.fori_loop(0, 5, body, x)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp")))
    hlo = f.lower(jnp.ones((32, 16))).compile().as_text()
    assert collective_bytes(hlo) == {"all-reduce": 5 * 256, "all-gather": 5 * 2048, "collective-permute": 5 * 256}


def test_sample_step_compiles_for_v5e_with_context_parallelism():
    """One denoising step of hyavatar-style generation (its 2 guidance branches batched), the tokens split
    over context by Ulysses, FSDP over the rest, bf16 weights, on a 4-chip v5e slice."""
    config = load_config("configs/wan.py:hyavatar-style,mesh=fsdp_context",
                         ["--config.model.context_parallel=ulysses", "--config.model.param_dtype=bfloat16"])
    report = compile_sample_step(config, "v5e:2x2", frames=3, height=8, width=8, text_len=16)
    assert report.fits and report.chips == 4 and report.device_kind.startswith("TPU v5 lite")
    assert report.mesh["fsdp"] == 2 and report.mesh["context"] == 2 and report.hbm_gib == pytest.approx(16.0)
    assert report.branches == 2 and 0 < report.total_gib < 0.1 and report.xla_flops_per_chip > 0
    assert report.collectives["all-to-all"] > 0 and report.collectives["all-gather"] > 0
    text = "\n".join(report.lines())
    assert "one denoising step: 2 guidance branches x 1 video = 2 model rows (0.5 per chip)" in text


def test_cli_sample_names_the_levers_not_yet_used_when_it_does_not_fit(capsys):
    # 21 x 60 x 104 latents (480p x 81 frames) with XLA attention on one v5e chip: [L, L] logits of 32,760 tokens
    args = ["compile", "--sample", "--config", "configs/wan.py:tiny", "--topology", "v5e-1", "--guidance", "text=5",
            "--frames", "21", "--height", "60", "--width", "104", "--text-len", "16"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "one denoising step: 2 guidance branches" in out and "DOES NOT FIT per-chip HBM (16.0 GiB)" in out
    for lever in ("param_dtype=bfloat16", "attention=splash", "mesh.context=N", "more chips"):
        assert f"try: --config.model.{lever}" in out or f"try: --config.{lever}" in out or f"try: {lever}" in out
    # the levers already pulled are not offered again
    cfg = DiTConfig.from_dict(load_config("configs/wan.py:tiny").model).replace(param_dtype="bfloat16",
                                                                               attention="splash")
    hints = " ".join(sample_fit_hints(cfg, {"context": 2}))
    assert "param_dtype" not in hints and "attention" not in hints and "mesh.context" not in hints
    assert "context_parallel=ulysses or ring" in hints
    assert "context_parallel" not in " ".join(sample_fit_hints(cfg.replace(context_parallel="ring"), {"context": 2}))
    assert main([a for a in args if a != "--sample"]) == 2
    assert "--guidance is for --sample" in capsys.readouterr().err


def test_ring_attention_with_splash_compiles_for_tpu():
    """The ring's splash blocks (the kernel's forward with residuals, its dkv/dq passes fed the ring's
    statistics) lower through Mosaic for a real TPU in a training step (CPU tests run them interpreted)."""
    config = load_config("configs/wan.py:tiny,mesh=fsdp_context,remat=full",
                         ["--config.model.context_parallel=ring", "--config.model.attention=splash",
                          "--config.model.num_layers=1"])
    report = compile_train_step(config, "v5p:2x2x1", batch=4, frames=3, height=16, width=16, text_len=16)
    assert report.fits and report.mesh["context"] == 2
    # the K/V blocks go round by collective-permute (XLA's own resharding adds a few hundred bytes of all-to-all)
    assert report.collectives["collective-permute"] > 100 * report.collectives.get("all-to-all", 0)


def test_a_step_over_the_chips_hbm_prints_its_memory_then_the_levers():
    """A program that compiled but needs more than the chip has (the 14B 720p x 129-frame step at 2 samples
    per chip, measured): its memory breakdown is printed, then the levers not yet pulled."""
    cfg = DiTConfig(attention="splash", remat="offload_layer_input")
    report = FitReport(topology="v5p:2x4x4", chips=32, device_kind="TPU v5", mesh={"fsdp": 16, "context": 2},
                       batch=64, shape=(33, 90, 160), tokens_per_sample=118_800, fits=False, hbm_gib=95.74,
                       argument_gib=6.88, temp_gib=94.2, total_gib=101.17, host_gib=90.6,
                       error="101.17 GiB needed", hints=fit_hints(cfg, 1, 2.0), collectives={"all-to-all": 2**40})
    lines = report.lines()
    assert lines[2] == "DOES NOT FIT per-chip HBM (95.7 GiB): 101.17 GiB needed"
    assert "total 101.17 GiB of 95.7 GiB" in lines[3] and "90.60 GiB" in lines[4]
    assert lines[-3].startswith("collectives per chip per step: 1024.00 GiB (all-to-all 1024.00 GiB)")
    assert lines[-2].startswith("  try: --config.train.accum_steps=2") and lines[-1].startswith("  try: a smaller")

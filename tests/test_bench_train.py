"""`hallojax bench train` / `bench sample`: figures of our training step (8 devices and 1) and of our
sampling loop, and of diffusers' beside them.

Tiny shapes and two timed steps: this checks the figures' bookkeeping (FLOPs from `train_flops`, tokens/s
from the median step), the PyTorch row and its skip for styles, input errors, and the CLI end to end,
never speed.
"""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest

from hallojax import cli
from hallojax.bench import bench_train
from hallojax.config import load_config
from hallojax.models.wan import DiTConfig
from hallojax.flops import train_flops
from conftest import sim_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(frames=3, height=8, width=8, text_len=16)
HAVE_DIFFUSERS = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))


def _check_figures(r, cfg, batch, n_devices):
    assert r["n_devices"] == n_devices and math.prod(r["mesh"].values()) == n_devices and r["dtype"] == "float32"
    assert r["shape"] == dict(batch=batch, **SHAPE)
    assert r["flops_per_step"] == train_flops(cfg, batch=batch, **SHAPE)
    assert r["tokens_per_step"] == batch * 3 * 8 * 8 // cfg.patch_volume
    assert len(r["step_times"]) == 2
    for key in ("compile_s", "step_s", "tokens_per_s", "tflops_per_device", "flops_per_step"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert all(math.isfinite(s) and s > 0 for s in r["step_times"])
    assert math.isfinite(r["loss"])
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
    assert r["tflops_per_device"] == pytest.approx(r["flops_per_step"] / r["step_s"] / n_devices / 1e12)
    assert r["mfu"] is None  # no peak for CPU
    assert r["xla_bytes"] is None or r["xla_bytes"] > 0


@pytest.mark.parametrize("mesh, n_devices", [("fsdp", 8), ("single", 1)])
def test_bench_train_figures_and_diffusers_row(devices, capsys, mesh, n_devices):
    config = load_config(f"configs/wan.py:tiny,mesh={mesh},dtype=float32")
    cfg = DiTConfig.from_dict(config.model)
    r = bench_train(config, steps=2, warmup=1, **SHAPE)  # default batch: the mesh's device count
    _check_figures(r, cfg, n_devices, n_devices)
    out = capsys.readouterr().out
    assert out.startswith("command: ") and "| hallojax (JAX)" in out and "n/a (no peak for cpu)" in out
    if HAVE_DIFFUSERS:
        t = r["torch"]
        assert r["torch_skipped"] is None and t["params"] == r["params"]  # the same model size
        assert t["step_s"] > 0 and math.isfinite(t["step_s"]) and math.isfinite(t["loss"])
        assert t["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / t["step_s"])
        assert r["ratio"] == pytest.approx(t["step_s"] / r["step_s"]) and r["ratio"] > 0
        assert "| diffusers " in out and "ratio: diffusers step time / ours" in out
    else:
        assert r["torch"] is None and r["ratio"] is None and "do not import" in r["torch_skipped"]


def test_bench_train_style_preset_skips_pytorch(devices, capsys):
    config = load_config("configs/wan.py:echomimic-style,mesh=single,dtype=float32")  # the quickest to compile
    r = bench_train(config, steps=1, warmup=0, batch=1, **SHAPE)
    assert r["torch"] is None and r["ratio"] is None
    assert "diffusers has no such model" in r["torch_skipped"] and "model.audio='decoupled'" in r["torch_skipped"]
    assert r["step_s"] > 0 and r["flops_per_step"] == train_flops(DiTConfig.from_dict(config.model), batch=1,
                                                                  **SHAPE)
    out = capsys.readouterr().out
    assert "PyTorch side skipped: diffusers has no such model" in out and "| diffusers " not in out


@pytest.mark.parametrize("args, message", [
    (["--batch", "3"], "--batch 3: must be a multiple of 8, the devices of the mesh's batch axes ['fsdp']"),
    (["--height", "7"], "--height 7: must be a multiple of the patch size 2"),
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--config.mesh.tensor=3"], "8 devices do not divide by 3"),
])
def test_bench_train_input_errors(devices, capsys, args, message):
    assert cli.main(["bench", "train", "--config", "tiny,mesh=fsdp", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_train_cli_end_to_end(devices):
    # the conftest's compilation cache: the step compiled above is a cache hit here
    env = dict(os.environ, XLA_FLAGS=sim_flags(8), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    argv = ["bench", "train", "--config", "configs/wan.py:tiny,dtype=float32", "--steps", "1", "--warmup", "1"]
    proc = subprocess.run([sys.executable, "-m", "hallojax.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("command: ") and lines[0].endswith("python -m hallojax.cli " + " ".join(argv))
    assert "devices: 8 x cpu" in proc.stdout and "dtype float32" in proc.stdout
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| implementation") and table[1].startswith("| hallojax (JAX)")
    assert len(table) == (3 if HAVE_DIFFUSERS else 2)


def test_bench_sample_figures_and_diffusers_row(capsys):
    from hallojax.bench import bench_sample

    config = load_config("configs/wan.py:tiny,mesh=single,dtype=float32")
    r = bench_sample(config, steps=3, repeats=1, guidance="text=5", **SHAPE)
    assert r["steps_per_s"] == pytest.approx(3 / r["clip_s"]) and r["clip_s"] > 0 and r["compile_s"] > 0
    assert r["branches"] == 2 and r["guidance"] == "text=5"
    out = capsys.readouterr().out
    assert out.startswith("command: ") and "| hallojax (JAX)" in out and "2 branches in 1 call" in out
    if HAVE_DIFFUSERS:
        assert r["torch_skipped"] is None and r["torch"]["clip_s"] > 0
        assert r["ratio"] == pytest.approx(r["torch"]["clip_s"] / r["clip_s"])
        assert "ratio: diffusers seconds per clip / ours" in out
    # a style preset has no diffusers twin: our row only, and the reason
    style = load_config("configs/wan.py:hyavatar-style,mesh=single,dtype=float32")
    r = bench_sample(style, steps=2, repeats=1, guidance="audio=3", frames=2, height=8, width=8, text_len=4)
    assert r["torch"] is None and "diffusers has no such model" in r["torch_skipped"] and r["branches"] == 2
    with pytest.raises(ValueError, match="no audio condition"):
        bench_sample(config, steps=2, guidance="audio=3", **SHAPE)

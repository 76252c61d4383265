"""The trainer: loss falls, exact (bitwise) resume after kill -9, SIGTERM saves and exits 0, frozen
parameters stay bitwise, microbatch accumulation equals one batch, EMA update."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hallojax.config import load_config
from hallojax.data import prepare_synthetic
from hallojax.dit import DiTConfig
from hallojax.train import init_state, make_train_step, run

STEPS = 20
# the spawned runs also cache their small compiles (Orbax's per-device slices at the first save): the
# runs after the first then load them
SUBPROCESS_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = load_config("configs/wan.py:demo", ["--config.data.num_videos=2",
                                                 f"--config.data.workdir={tmp_path_factory.mktemp('data')}"])
    return str(prepare_synthetic(config.data, 0))


def overrides(prepared, steps=STEPS, every=5):
    return [f"--config.data.prepared={prepared}", f"--config.train.steps={steps}", "--config.train.batch_size=4",
            f"--config.checkpoint.every={every}", "--config.checkpoint.async_save=False", "--config.train.log_every=5"]


def final_params(workdir, step):
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as m:
        assert m.latest_step() == step
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.leaves(jax.device_get(restored["state"]["params"]))


def read_scalars(logdir):
    """{tag: {step: value}} from TensorBoard event files (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _spawn(workdir, args):
    cmd = [sys.executable, "-m", "hallojax.cli", "train", "--config", "configs/wan.py:demo,mesh=fsdp,dtype=float32",
           "--workdir", str(workdir), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **SUBPROCESS_ENV,
                                 "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})


def _wait_for_checkpoint(proc, workdir, min_step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


def test_loss_falls_and_kill9_sigterm_resume_is_bitwise(prepared, tmp_path, devices):
    # uninterrupted reference run, in process
    config = load_config("configs/wan.py:demo,mesh=fsdp,dtype=float32", overrides(prepared))
    result = run(config, tmp_path / "a")
    losses = result["losses"]
    assert result["step"] == STEPS and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    expected = final_params(tmp_path / "a", STEPS)
    events = read_scalars(tmp_path / "a" / "tensorboard")
    assert sorted(events["loss"]) == list(range(5, STEPS + 1, 5))
    np.testing.assert_allclose([events["loss"][s] for s in (5, STEPS)], [losses[4], losses[-1]], rtol=1e-6)
    assert all(v > 0 for v in events["tokens_per_s"].values()) and "tflops_per_device" in events
    assert "mfu" not in events  # no known peak for CPU devices

    b = tmp_path / "b"
    proc = _spawn(b, overrides(prepared))  # killed hard after its first checkpoint
    _wait_for_checkpoint(proc, b, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in (b / "checkpoints").glob("*") if p.name.isdigit())
    assert killed_at <= 10  # (so the preemption below lands before the last step)

    proc = _spawn(b, overrides(prepared))  # resumes; preempted with SIGTERM: saves at the step boundary, exits 0
    _wait_for_checkpoint(proc, b, killed_at + 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert f"resumed from step {killed_at}" in out and "SIGTERM: saved step" in out, out

    proc = _spawn(b, overrides(prepared))  # resumes again and finishes
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"trained to step {STEPS}" in out, out
    got = final_params(b, STEPS)
    assert all(np.array_equal(x, y) for x, y in zip(got, expected))


def _step_setup(**train_kw):
    from flax import nnx

    from hallojax.dit import WanDiT

    config = load_config("configs/wan.py:demo,mesh=fsdp,dtype=float32")
    for k, v in train_kw.items():
        config.train[k] = v
    cfg = DiTConfig.from_dict(config.model)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((4, 3, 4, 4, 48)).astype(np.float32),
             "reference": rng.standard_normal((4, 1, 4, 4, 48)).astype(np.float32),
             "audio": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
             "context": np.zeros((4, 1, cfg.text_dim), np.float32)}
    graphdef = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    step = jax.jit(make_train_step(graphdef, cfg, config.train, 0))
    return config, cfg, batch, init_state(cfg, config.train, 0), step


def _names(tree):
    return [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_frozen_parameters_stay_bitwise():
    config, cfg, batch, state, step = _step_setup(trainable=["audio_adapters"])
    new, _ = step(state, batch)
    new, _ = step(new, batch)
    moved = 0
    for name, a, b in zip(_names(state["params"]), jax.tree.leaves(state["params"]), jax.tree.leaves(new["params"])):
        if "audio_adapters" in name:
            moved += not np.array_equal(a, b)
        else:
            assert np.array_equal(a, b), name
    assert moved > 0
    config.train.trainable = ["no_such_parameter"]
    with pytest.raises(ValueError, match="matches no parameter"):
        init_state(cfg, config.train, 0)


def test_accumulation_equals_one_batch_and_ema_update():
    # eps = 1 makes Adam's first update ~ lr * g (linear in the gradient): with the default eps, a
    # near-zero gradient's update is ~ lr * g / |g| and amplifies summation-order noise to a full lr
    _, _, batch, state, one = _step_setup(ema_decay=0.9, eps=1.0)
    _, _, _, _, two = _step_setup(ema_decay=0.9, eps=1.0, accum_steps=2)
    s1, m1 = one(state, batch)
    s2, m2 = two(state, batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # EMA: ema = 0.9 * previous ema (= the initial params) + 0.1 * new params, leaf by leaf
    for e, p0, p1 in zip(jax.tree.leaves(s1["ema"]), jax.tree.leaves(state["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(e, 0.9 * np.asarray(p0) + 0.1 * np.asarray(p1), rtol=1e-6, atol=1e-7)
    assert int(s1["step"]) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(state["params"])))


def test_restore_onto_a_different_mesh(prepared, tmp_path, devices):
    args = overrides(prepared, steps=4, every=4)
    run(load_config("configs/wan.py:demo,mesh=fsdp,dtype=float32", args), tmp_path)
    saved = final_params(tmp_path, 4)
    # same workdir, another mesh: FSDP x TP instead of FSDP x 8; nothing left to train, only the restore
    result = run(load_config("configs/wan.py:demo,mesh=fsdp_tp,dtype=float32", args), tmp_path)
    assert result["step"] == 4
    params = result["state"]["params"]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(params), saved))
    q = params["blocks"]["attn1"]["to_q"]["kernel"]
    assert q.sharding.mesh.shape["tensor"] == 2
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2)


def _spawn_pair(workdir, args, port):
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "hallojax.cli", "train", "--config", "configs/wan.py:demo,mesh=fsdp,dtype=float32",
               "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(i), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, **SUBPROCESS_ENV,
                                           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
    return procs


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_checkpoint_kill_resume(prepared, tmp_path):
    """2 processes x 4 CPU devices over 127.0.0.1 (gloo): train, checkpoint, kill -9, resume."""
    args = overrides(prepared, steps=12, every=2) + ["--config.train.batch_size=8"]
    procs = _spawn_pair(tmp_path, args, _free_port())
    killed_at = _wait_for_checkpoint(procs[0], tmp_path, 2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the resume goes through the launch script (environment-variable initialisation)
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.run(["bash", "launch/local.sh", "2", "4", "--", "--config",
                           "configs/wan.py:demo,mesh=fsdp,dtype=float32", "--workdir", str(tmp_path), *args],
                          env={**os.environ, **SUBPROCESS_ENV, "PYTHON": sys.executable, "LOG_DIR": str(logs),
                               "HALLOJAX_PORT": str(_free_port())}, capture_output=True, text=True, timeout=300)
    outs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, outs
    for out in outs:
        assert "process" in out and "of 2" in out and "trained to step 12" in out, out
        assert "resumed from step" in out
    # both processes saw the same global batches: identical loss lines
    lines = [[ln.split("loss")[1].split()[0] for ln in out.splitlines() if " loss " in ln] for out in outs]
    assert lines[0] == lines[1] and len(lines[0]) >= 2, lines
    assert killed_at < 12
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute()) as m:
        assert m.latest_step() == 12

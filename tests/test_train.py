"""The trainer: loss falls; exact (bitwise, every leaf of the saved state) resume after kill -9 and SIGTERM;
2 processes x 4 devices train like 1 process x 8 and their checkpoints resume on the other topology
(elastic); the README's prepared-set command; frozen parameters stay bitwise; microbatch accumulation
equals one batch; EMA update.

One uninterrupted 1-process run (`reference`, checkpoints every 5 steps, all kept) is what every other run
is compared with."""

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from data_pipeline import bench
from hallojax import cli
from hallojax.checkpoint import restore_numpy
from hallojax.config import load_config
from hallojax.data import make_dataset, prepare_synthetic
from hallojax.models.wan import DiTConfig
from hallojax.train import init_state, make_train_step, run
from conftest import TEST_XLA_FLAGS, sim_flags

ROOT = Path(__file__).resolve().parents[1]
DEMO = "configs/wan.py:demo,mesh=fsdp,dtype=float32"
STEPS = 20
# the spawned runs also cache their small compiles (Orbax's per-device slices at the first save): the
# runs after the first then load them
SUBPROCESS_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
# 2 processes (gloo collectives) vs 1 (in-process collectives) differ only in the float summation order of
# the collectives (gloo's is not even the same from run to run): max |a - b| per leaf relative to the
# leaf's max |b| (params, optimizer state, EMA). Measured: the demo <= 1.4e-4 at steps 2-5, <= 2.2e-5 at
# step 20; hallo3-style at step 3 up to 1.6e-3, in its zero-initialised audio output projection (Adam's
# first steps divide each gradient element by its own size + eps: elements whose gradient is at the
# rounding level move by rounding-driven amounts). The same runs on 1 process with mesh dp instead of fsdp,
# nothing but another reduction order: 3.2e-4 (demo, step 2) and 6.7e-4 (hallo3-style, step 3, the same
# leaf). A wrong data order or a process reading another's rows differs by ~2x a leaf's scale.
TOPOLOGY_RTOL = 1e-2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # pixel:4 (16 tokens a frame) keeps the trainer's tests quick; the model's sizes follow the set's manifest
    config = load_config("configs/wan.py:demo", ["--config.data.num_videos=2", "--config.data.codec=pixel:4",
                                                 f"--config.data.workdir={tmp_path_factory.mktemp('data')}"])
    return str(prepare_synthetic(config.data, 0))


def overrides(prepared, steps=STEPS, every=5):
    return [f"--config.data.prepared={prepared}", f"--config.train.steps={steps}", "--config.train.batch_size=8",
            f"--config.checkpoint.every={every}", "--config.checkpoint.keep=20", "--config.checkpoint.async_save=False",
            "--config.train.log_every=5"]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """The uninterrupted run: 1 process x 8 devices, a checkpoint every 5 steps (all kept)."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, run(load_config(DEMO, overrides(prepared)), workdir)


def saved(workdir, step):
    """Checkpoint `step` of a run, whatever topology wrote it: (state as numpy {params, opt_state, ema, step},
    data state)."""
    path = workdir / "checkpoints" / str(step)
    return restore_numpy(path / "state"), json.loads((path / "data" / "metadata").read_text())


def assert_same_state(got, expected, rtol=0.0):
    """Same tree, same data position and step; every leaf bitwise (rtol 0) or within rtol of its max."""
    (state, data), (ref_state, ref_data) = got, expected
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    assert data == ref_data and int(state["step"]) == int(ref_state["step"]), (data, ref_data)
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref_state)):
        name = jax.tree_util.keystr(path)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if rtol == 0.0:
            assert np.array_equal(a, b), name
        else:
            err = float(np.abs(a.astype(np.float64) - b).max(initial=0.0))
            worst = max(worst, err / max(float(np.abs(b).max(initial=0.0)), 1e-30))
            assert err <= rtol * np.abs(b).max(initial=0.0), (name, err, np.abs(b).max())
    return worst


def copy_checkpoint(src, step, dst):
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))


def assert_resumed(out, start, end=STEPS):
    """The run resumed from exactly `start` and ran exactly the steps to `end`."""
    assert [int(s) for s in re.findall(r"resumed from step (\d+)", out)] == [start], out
    done = re.findall(r"ran (\d+) steps, from step (\d+) to step (\d+)", out)
    assert [tuple(map(int, d)) for d in done] == [(end - start, start, end)], out


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


def _spawn(workdir, args, config=DEMO, devices=8, multi=()):
    cmd = [sys.executable, "-m", "hallojax.cli", "train", "--config", config, "--workdir", str(workdir), *multi, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **SUBPROCESS_ENV,
                                 "XLA_FLAGS": sim_flags(devices)})


def _spawn_pair(workdir, args, config=DEMO):
    port = _free_port()
    return [_spawn(workdir, args, config, 4, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                              "--process-id", str(i)]) for i in range(2)]


def _launch_local(workdir, args):
    """`hallojax train ARGS` on 2 processes x 4 devices through launch/local.sh (environment-variable
    initialisation); the processes' logs."""
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    proc = subprocess.run(["bash", "launch/local.sh", "2", "4", "--", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **SUBPROCESS_ENV, "PYTHON": sys.executable,
                                                       "XLA_EXTRA_FLAGS": TEST_XLA_FLAGS, "LOG_DIR": str(logs),
                                                       "HALLOJAX_PORT": str(_free_port())})
    outs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, outs
    for out in outs:
        assert "process" in out and "of 2" in out, out
    return outs


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_checkpoint(proc, workdir, min_step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


def test_loss_falls_and_kill9_sigterm_resume_is_bitwise(reference, prepared, tmp_path, devices):
    ref_dir, result = reference
    losses = result["losses"]
    assert result["step"] == STEPS and result["steps_run"] == STEPS and result["start_step"] == 0
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    events = read_scalars(ref_dir / "tensorboard")
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
    assert proc.returncode == 0 and "(preempted, saved)" in out, out
    preempted_at = int(re.search(r"SIGTERM: saved step (\d+)", out).group(1))
    assert killed_at < preempted_at < STEPS
    assert_resumed(out, killed_at, preempted_at)
    if preempted_at % 5 == 0:  # the reference saved every 5 steps
        assert_same_state(saved(b, preempted_at), saved(ref_dir, preempted_at))

    proc = _spawn(b, overrides(prepared))  # resumes again and finishes
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert_resumed(out, preempted_at)
    assert_same_state(saved(b, STEPS), saved(ref_dir, STEPS))


def test_two_processes_equal_one_and_resume_elastically(reference, prepared, tmp_path, devices):
    """2 processes x 4 CPU devices over 127.0.0.1 (gloo): the same global batches as 1 process x 8, so the
    same state; a checkpoint of either topology resumes on the other and ends where the uninterrupted
    1-process run ends (within the collectives' float summation order)."""
    ref_dir, _ = reference
    # 2 processes from scratch, killed with kill -9 after a checkpoint: that checkpoint equals the 1-process one
    p = tmp_path / "two"
    procs = _spawn_pair(p, overrides(prepared))
    _wait_for_checkpoint(procs[0], p, 5)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(int(d.name) for d in (p / "checkpoints").glob("*") if d.name.isdigit())
    assert killed_at < STEPS
    bounds = {"2 vs 1 process": assert_same_state(saved(p, killed_at), saved(ref_dir, killed_at), TOPOLOGY_RTOL)}

    # 2 -> 1: the killed 2-process run's checkpoint resumes on 1 process x 8 devices
    e1 = tmp_path / "two_to_one"
    copy_checkpoint(p, killed_at, e1)
    result = run(load_config(DEMO, overrides(prepared)), e1)
    assert (result["start_step"], result["steps_run"]) == (killed_at, STEPS - killed_at)
    bounds["2 -> 1 resume"] = assert_same_state(saved(e1, STEPS), saved(ref_dir, STEPS), TOPOLOGY_RTOL)

    # 1 -> 2: the 1-process run's checkpoint at step 10 resumes on 2 processes x 4 devices (launch script)
    e2 = tmp_path / "one_to_two"
    copy_checkpoint(ref_dir, 10, e2)
    for out in _launch_local(e2, ["--config", DEMO, "--workdir", str(e2), *overrides(prepared)]):
        assert_resumed(out, 10)
    bounds["1 -> 2 resume"] = assert_same_state(saved(e2, STEPS), saved(ref_dir, STEPS), TOPOLOGY_RTOL)
    print("max |difference| / max |value| over every leaf:", bounds)


def _readme_command(start):
    """The README's command line starting with `start` (continuation lines joined), without `hallojax`."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(start))
    return shlex.split(line.split("#")[0])[1:]


@pytest.fixture
def restore_logging():
    """cli.main points logging at the (captured) stderr: the handlers go back after the test."""
    handlers = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = handlers


def test_readme_prepared_set_command_on_one_and_two_processes(prepared, tmp_path, devices, capsys, restore_logging):
    """The README's tiny Hallo3-style command on a set `hallojax prepare` wrote (--codec pixel:4
    --audio-features rms): data.prepared alone picks the source and the model's sizes (from the manifest);
    a conflicting size set by hand is refused in one line; the style preset on 2 processes x 4 devices
    equals 1 process x 8."""
    argv = _readme_command("hallojax train --config configs/wan.py:hallo3-style,size=tiny ")
    assert "--config.data.prepared=data/prepared" in argv
    argv = [a.replace("data/prepared", prepared).replace("runs/hallo3-tiny", str(tmp_path / "one")) for a in argv]
    extra = ["--config.train.steps=3", "--config.model.dtype=float32"]
    assert cli.main(argv + extra) == 0
    assert "trained to step 3" in capsys.readouterr().out
    config = json.loads((tmp_path / "one" / "checkpoints" / "3" / "config" / "metadata").read_text())
    model = config["model"]
    assert config["data"]["source"] == "prepared"
    assert (model["in_channels"], model["out_channels"], model["audio_in_layers"], model["audio_in_dim"],
            model["audio_stride"]) == (48, 48, 1, 1, 1)  # pixel:4 latents, the RMS feature, temporal stride 1

    assert cli.main(argv + extra + ["--config.model.in_channels=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the log lines)
    assert err.startswith("hallojax train: error: model.in_channels=16 was set on the command line, but ") and \
        err.endswith("manifest.json gives 48 (codec pixel:4: 48 latent channels)"), err

    two = [a.replace(str(tmp_path / "one"), str(tmp_path / "two")) for a in argv[1:]]
    for out in _launch_local(tmp_path / "two", two + extra):
        assert "ran 3 steps, from step 0 to step 3" in out and "trained to step 3" in out
    bound = assert_same_state(saved(tmp_path / "two", 3), saved(tmp_path / "one", 3), TOPOLOGY_RTOL)
    print("hallo3-style, 2 vs 1 process: max |difference| / max |value|", bound)


def test_global_batches_depend_on_seed_and_step_only(prepared, capsys):
    """The prepared source's global batch s is the same whichever process reads which rows, from a fresh
    start or from a saved position; every epoch is a new permutation of the records."""
    import grain

    config = load_config(DEMO, [f"--config.data.prepared={prepared}"])
    cfg = DiTConfig.from_dict(config.model)
    source = lambda rows=None: make_dataset(config.data, 8, 0, cfg, rows, grain.ReadOptions(2, 2))  # noqa: E731
    whole, later = source(), source([1, 5])
    halves = [source([0, 1, 2, 3]), source([4, 5, 6, 7])]
    n = whole.num_records
    epochs = [[], []]
    for step in range(2 * n // 8):
        batch = next(whole)["latents"]
        if step == 3:
            later.set_state(whole.get_state())
            assert whole.get_state() == {"position": 32}
        if step > 3:
            np.testing.assert_array_equal(next(later)["latents"], batch[[1, 5]])
        np.testing.assert_array_equal(np.concatenate([next(h)["latents"] for h in halves]), batch)
        epochs[step * 8 // n].extend(batch.reshape(8, -1).sum(axis=1).tolist())  # a fingerprint per clip
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == n  # each epoch: every clip once
    assert epochs[0] != epochs[1]  # ... in a new order
    assert bench.main(["--train-input", prepared, "--batches", "4", "--processes", "2", "--no-pin"]) == 0
    assert "over 2 process(es): 4 rows here" in capsys.readouterr().out


def _step_setup(**train_kw):
    from flax import nnx

    from hallojax.models.wan import WanDiT

    config = load_config(DEMO)
    for k, v in train_kw.items():
        config.train[k] = v
    cfg = DiTConfig.from_dict(config.model)
    rng = np.random.default_rng(0)
    c = cfg.out_channels
    batch = {"latents": rng.standard_normal((4, 3, 4, 4, c)).astype(np.float32),
             "reference": rng.standard_normal((4, 1, 4, 4, c)).astype(np.float32),
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
    # Adam eps = 1 makes the first update lr * g / (|g| + 1) elementwise, about lr * g: the update (new - old)
    # compares the gradients. lr = 1e3 makes it dwarf the parameters' fp32 spacing (at lr = 1 the rounding of
    # p + u alone is 1e-5 of a small leaf's update). No clipping: it would hide a gradient off by a factor.
    kw = dict(ema_decay=0.9, eps=1.0, learning_rate=1e3, grad_clip=0.0)
    _, _, batch, state, one = _step_setup(**kw)
    _, _, _, _, two = _step_setup(**kw, accum_steps=2)
    s1, m1 = one(state, batch)
    s2, m2 = two(state, batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    moved = 0
    for name, p0, a, b in zip(_names(state["params"]), jax.tree.leaves(state["params"]),
                              jax.tree.leaves(s2["params"]), jax.tree.leaves(s1["params"])):
        p0 = np.asarray(p0, np.float64)
        u1, u2 = np.asarray(b, np.float64) - p0, np.asarray(a, np.float64) - p0  # exact differences of fp32 values
        size = np.abs(u1).max()
        assert np.abs(u2 - u1).max() <= 1e-5 * size, (name, np.abs(u2 - u1).max(), size)
        moved += size > 0
    assert moved > len(jax.tree.leaves(state["params"])) // 2
    # EMA: ema = 0.9 * previous ema (= the initial params) + 0.1 * new params, leaf by leaf
    for e, p0, p1 in zip(jax.tree.leaves(s1["ema"]), jax.tree.leaves(state["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(e, 0.9 * np.asarray(p0) + 0.1 * np.asarray(p1), rtol=1e-6, atol=1e-7)
    assert int(s1["step"]) == 1


def test_restore_onto_a_different_mesh(reference, prepared, tmp_path, devices):
    ref_dir, _ = reference
    copy_checkpoint(ref_dir, STEPS, tmp_path)
    state, _ = saved(ref_dir, STEPS)
    # the finished run's last checkpoint on another mesh: FSDP x TP instead of FSDP x 8; only the restore
    result = run(load_config("configs/wan.py:demo,mesh=fsdp_tp,dtype=float32", overrides(prepared)), tmp_path)
    assert result["step"] == STEPS and result["steps_run"] == 0
    params = result["state"]["params"]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(params),
                                                                jax.tree.leaves(state["params"])))
    q = params["blocks"]["attn1"]["to_q"]["kernel"]
    assert q.sharding.mesh.shape["tensor"] == 2
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2)

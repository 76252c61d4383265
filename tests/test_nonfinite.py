"""Non-finite steps: a NaN loss or gradient skips the update (parameters, optimizer state and EMA bitwise
unchanged, the count logged) or stops the run naming the step with nothing of it saved; on 1 and 8
devices alike, and a resume around a skipped step stays exact."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hallojax import cli
from hallojax.config import load_config
from hallojax.models.wan import DiTConfig
from hallojax.sharding import make_mesh, normalize_rules
from hallojax.train import NonFiniteStep, create_state, jit_train_step, run

TINY = "configs/wan.py:tiny,mesh=fsdp,dtype=float32"


def _args(steps, inject, policy="skip", every=1):
    return [f"--config.train.steps={steps}", f"--config.train.inject_nonfinite={inject}",
            f"--config.train.nonfinite={policy}", f"--config.checkpoint.every={every}",
            "--config.checkpoint.async_save=False", "--config.checkpoint.keep=10", "--config.train.batch_size=8"]


def _saved(workdir, step):
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as m:
        return jax.device_get(m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"])


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_skip_keeps_the_state_and_resume_stays_exact(tmp_path, devices, caplog):
    result = run(load_config(TINY, _args(5, [2])), tmp_path / "a")
    assert result["skipped"] == [2] and result["step"] == 5
    before, after, later = _saved(tmp_path / "a", 2), _saved(tmp_path / "a", 3), _saved(tmp_path / "a", 4)
    for part in ("params", "opt_state", "ema"):
        assert _equal(before[part], after[part]), part  # the skipped step changed nothing ...
        assert not _equal(after[part], later[part]), part  # ... and training goes on after it
    assert int(after["step"]) == 3
    assert "step 2: non-finite loss" in caplog.text
    # the same run interrupted right after the skipped step and resumed ends bitwise the same
    run(load_config(TINY, _args(3, [2])), tmp_path / "b")
    resumed = run(load_config(TINY, _args(5, [2])), tmp_path / "b")
    assert resumed["start_step"] == 3 and resumed["steps_run"] == 2
    assert _equal(_saved(tmp_path / "b", 5), _saved(tmp_path / "a", 5))


def test_stop_names_the_step_and_saves_nothing_of_it(tmp_path, capsys, devices):
    with pytest.raises(NonFiniteStep, match="step 2: the loss"):
        run(load_config(TINY, _args(5, [2], "stop")), tmp_path / "a")
    with ocp.CheckpointManager((tmp_path / "a" / "checkpoints").absolute()) as m:
        assert m.latest_step() == 2  # steps 1 and 2 finished; nothing after the bad step
    rc = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "b"), *_args(5, [1], "stop")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hallojax train: error:")]
    assert rc == 1 and len(err) == 1 and "step 1:" in err[0] and "train.nonfinite='stop'" in err[0]
    with pytest.raises(ValueError, match="train.nonfinite='ignore'"):
        run(load_config(TINY, ["--config.train.nonfinite=ignore"]), tmp_path / "c")


def test_the_skip_is_the_same_on_one_and_eight_devices(devices):
    # Adam with eps = 1: the first update is ~lr·g, so it compares the gradients (not their signs) across devices
    config = load_config(TINY, _args(3, [0]) + ["--config.train.eps=1.0"])
    cfg = DiTConfig.from_dict(config.model)
    rules = normalize_rules(config.rules)
    from hallojax.data import synthetic_batch

    lat, ctx = synthetic_batch(cfg, config.train, 0)
    batch = {"latents": lat, "context": ctx}
    out = {}
    for name, mesh in (("1", make_mesh({"fsdp": 1}, devices[:1])), ("8", make_mesh({"fsdp": -1}))):
        graphdef, state, shardings, _ = create_state(cfg, config.train, 0, mesh, rules)
        first = jax.device_get(state)
        step = jit_train_step(graphdef, cfg, config.train, 0, shardings)
        with jax.set_mesh(mesh):
            state, m0 = step(state, batch)  # step 0: poisoned
            assert int(m0["nonfinite"]) == 1 and not np.isfinite(float(m0["loss"]))
            skipped = jax.device_get(state)
            state, m1 = step(state, batch)  # step 1: a normal update
        assert int(m1["nonfinite"]) == 0
        for part in ("params", "opt_state", "ema"):
            assert _equal(skipped[part], first[part]), (name, part)
        out[name] = jax.device_get(state["params"])
    for a, b in zip(jax.tree.leaves(out["8"]), jax.tree.leaves(out["1"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

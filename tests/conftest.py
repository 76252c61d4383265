"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

No process-wide matmul precision is set: every model runs at its own config's `precision` (float32
compute: "highest"), as it does for users, and the fp32 parity tests hold under it."""

import os
from pathlib import Path

# The suite's time is mostly XLA compiling small CPU programs: LLVM at -O0 halves it (measured: the echomimic
# style train steps 62 -> 32 s of CPU, test_hallo3 28 -> 18 s). Float semantics are IEEE at every level (XLA
# enables no fast-math on CPU), so every parity bound holds as it does at the default level; users and the
# benchmarks run at the default. Spawned test processes take the same flags (`sim_flags`), so they share
# the compilation cache with the test that spawned them.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def sim_flags(devices: int) -> str:
    """XLA_FLAGS for a test subprocess on `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} {TEST_XLA_FLAGS}"
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TPU ahead-of-time compiles (libtpu, no chips) in parallel test workers: skip libtpu's one-process lock
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = Path(__file__).resolve().parents[1]
# set through the environment so that the `hallojax train` subprocesses the tests spawn share the cache
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("HALLOJAX_JAX_CACHE", str(ROOT / ".cache" / "jax"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import jax  # noqa: E402
import pytest  # noqa: E402

try:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
except ImportError:  # the parity tests need it; they fail with a clear import error
    pass


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, f"tests expect 8 simulated CPU devices, got {jax.devices()}"
    return jax.devices()


# `make test` runs two xdist workers, a file per worker at a time (--dist loadfile --no-loadscope-reorder):
# the slowest files go first so that no long file is drawn last while the other worker sits idle
SLOW_FIRST = ("test_train.py", "test_train_conditioning.py", "test_demo_and_cli.py", "test_dit_conditioning.py",
              "test_sharding.py", "test_compile.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept otherwise


# the time each test file took (setup + call + teardown of its tests, summed over the worker that ran it):
# with a file per worker, the longest file bounds the wall time, so the budget is visible per file too
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + float(getattr(report, "duration", 0.0) or 0.0)


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.write_sep("=", f"slowest test files ({total:.0f} s summed over workers)")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}s  {path}")

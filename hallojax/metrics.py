"""Training observability: TensorBoard event files and the console progress line.

Scalars per logged step: loss, grad_norm, lr, step_time (s, mean over the steps since the last log line,
the compiling first step excluded), tokens_per_s, tflops_per_device (analytic model FLOPs,
`hallojax.flops`) and mfu when the device's peak is known. Events go to <workdir>/tensorboard
(process 0 only): ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import time
from pathlib import Path


class MetricWriter:
    """TensorBoard scalars through tensorboardX (no TensorFlow needed); a no-op when disabled."""

    def __init__(self, logdir: str | Path | None):
        self._writer = None
        if logdir is not None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(logdir), flush_secs=30)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(name, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class StepTimer:
    """Mean step time over a logging interval; the first step of a process (compilation) is reported
    apart and left out of the means."""

    def __init__(self):
        self.first = True
        self.compile_seconds = None
        self._times: list[float] = []
        self.started = time.perf_counter()

    def add(self, seconds: float) -> None:
        if self.first:
            self.first, self.compile_seconds = False, seconds
        else:
            self._times.append(seconds)

    def interval_mean(self) -> float | None:
        """Mean of the steps since the last call (None when only the compiling step ran)."""
        times, self._times = self._times, []
        return sum(times) / len(times) if times else None


def progress_line(step: int, total: int, m: dict[str, float | None]) -> str:
    """`step   40/200 (20%)  loss 0.8123  grad 0.412  lr 3.0e-03  0.052 s/step  12,345 tok/s  0.41 TFLOP/s/dev
    MFU 12.3%  eta 8s`."""
    parts = [f"step {step:>{len(str(total))}}/{total} ({100 * step / max(total, 1):3.0f}%)",
             f"loss {m['loss']:.4f}", f"grad {m['grad_norm']:.3f}", f"lr {m['lr']:.1e}"]
    if m.get("step_time") is not None:
        parts += [f"{m['step_time']:.3f} s/step", f"{m['tokens_per_s']:,.0f} tok/s",
                  f"{m['tflops_per_device']:.3g} TFLOP/s/dev"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        eta = (total - step) * m["step_time"]
        parts.append(f"eta {_duration(eta)}")
    else:
        parts.append("(compiling step)")
    if m.get("skipped_steps"):
        parts.append(f"skipped {int(m['skipped_steps'])} non-finite")
    return "  ".join(parts)


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    mnt, sec = divmod(rem, 60)
    return f"{h}h{mnt:02d}m" if h else (f"{mnt}m{sec:02d}s" if mnt else f"{sec}s")

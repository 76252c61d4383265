"""Classifier-free guidance over several conditions (text, audio, reference), with per-step scales.

A guidance spec is a *chain* of terms, each a set of conditions with a scale schedule:

    text=4,audio=2.9          EchoMimicV3: branches ∅, {text}, {text, audio};
                              out = o_∅ + 4·(o_text − o_∅) + 2.9·(o_text+audio − o_text)
    text+audio=3.5            Hallo3: one pair, text and audio dropped together; out = o_∅ + 3.5·(o_ta − o_∅)
    none                      no guidance: one branch with every condition

Branch k keeps the conditions of terms 1..k (and every condition no term names, e.g. the reference in
both examples above); the dropped ones are replaced by the model's null input (zeros, as the trainer's
condition dropout makes them). With scales s_k, the output is Σ_b w_b·o_b with w_∅ = 1 − s_1,
w_k = s_k − s_{k+1}, w_n = s_n: an affine combination (Σ w = 1), so it is the same on velocities and on
x̂0. A branch whose weight is 0 on a step is not run on that step: the sampling loop is cut into phases
with a fixed set of live branches, and every step of a phase is ONE model call over those branches
stacked along the batch axis (sharded over the mesh's batch axes). HunyuanVideo-Avatar's guidance (text
and audio dropped for the first 10 steps, then audio only, scale decaying linearly) is the chain
`text=lin(7.5,2)@:10;1@10:, audio=lin(7.5,2)@:10;lin(6.5,3.5)@10:`: two live branches on every step.

Scale schedules: `4` (constant), `lin(a,b)` (a at step 0 to b at step N, evaluated at each step),
`cos(a,b[,p])` (cosine decay from a at step 0 towards b: b + (a − b)·(1 − cos(π·((N − i)/N)^p))/2, p = 1
by default; EchoMimicV3's dynamic CFG is `cos(g,g/2,5)`: g at step 0, ≈ g/2 from mid-schedule on),
`VALUE@START:STOP` (only on steps START..STOP-1; integers are step indices, decimals like `0.8` are
fractions of N), several pieces joined by `;` (later pieces win). Steps no piece covers get scale 1
(the term is on, without extrapolation).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

CONDITIONS = ("text", "audio", "ref")

# the published systems' guidance, as chains (see research notes: EchoMimicV3 preview 4.0 / 2.9,
# Hallo3 3.5 with text and audio dropped together, HunyuanVideo-Avatar 7.5 with audio-only guidance late)
PRESETS = {
    "none": "none",
    "echomimic": "text=4,audio=2.9",
    "hallo3": "text+audio=3.5",
    "hyavatar": "text=lin(7.5,2)@:10;1@10:,audio=lin(7.5,2)@:10;lin(6.5,3.5)@10:",
    "audio": "audio=3",  # audio-only guidance (EchoMimicV3 Flash): branches {everything but audio}, {all}
    # EchoMimicV3 preview as released: text 4 / audio 2.9 with its dynamic (cosine) decay of both scales
    "echomimic-v3-preview": "text=cos(4,2,5),audio=cos(2.9,1.45,5)",
}

PRESETS["hunyuan-avatar"] = PRESETS["hyavatar"]  # the model kind's name; checked against research B.7 in tests

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclasses.dataclass(frozen=True)
class ScaleSchedule:
    """Pieces (start, stop, a, b, p): on steps start <= i < stop (stop None = N; float bounds are fractions of
    N) the scale a + (b − a)·i/N (p None: linear), or b + (a − b)·(1 − cos(π·((N − i)/N)^p))/2 (cosine decay).
    Built by `parse_scale`."""

    pieces: tuple[tuple[float | int | None, float | int | None, float, float, float | None], ...]
    text: str = ""

    def values(self, steps: int) -> np.ndarray:
        out = np.ones(steps)
        i = np.arange(steps)
        for start, stop, a, b, p in self.pieces:
            lo = _bound(start, steps, 0)
            hi = _bound(stop, steps, steps)
            sel = (i >= lo) & (i < hi)
            if p is None:
                out[sel] = a + (b - a) * i[sel] / steps
            else:
                out[sel] = b + (a - b) * (1 - np.cos(np.pi * ((steps - i[sel]) / steps) ** p)) / 2
        return out


def _bound(v, steps, default):
    if v is None:
        return default
    return int(round(v * steps)) if isinstance(v, float) else int(v)


def parse_scale(text: str) -> ScaleSchedule:
    pieces = []
    for piece in text.split(";"):
        piece = piece.strip()
        value, _, rng = piece.partition("@")
        value = value.strip()
        p = None
        if m := re.fullmatch(rf"lin\(\s*({_NUM})\s*,\s*({_NUM})\s*\)", value):
            a, b = float(m[1]), float(m[2])
        elif m := re.fullmatch(rf"cos\(\s*({_NUM})\s*,\s*({_NUM})\s*(?:,\s*({_NUM})\s*)?\)", value):
            a, b, p = float(m[1]), float(m[2]), float(m[3] or 1)
        elif re.fullmatch(_NUM, value):
            a = b = float(value)
        else:
            raise ValueError(f"guidance scale {text!r}: {value!r} is not a number, lin(a,b) or cos(a,b[,p])")
        start = stop = None
        if rng:
            m = re.fullmatch(rf"\s*({_NUM})?\s*:\s*({_NUM})?\s*", rng)
            if not m:
                raise ValueError(f"guidance scale {text!r}: step range {rng!r} must be START:STOP")
            start, stop = (None if g is None else float(g) if "." in g else int(g) for g in (m[1], m[2]))
        for v in (a, b, 1.0 if p is None else p):
            if not math.isfinite(v):
                raise ValueError(f"guidance scale {text!r}: {v} is not finite")
        if p is not None and p <= 0:
            raise ValueError(f"guidance scale {text!r}: the cosine power {p} must be > 0")
        pieces.append((start, stop, a, b, p))
    return ScaleSchedule(tuple(pieces), text)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A chain of (conditions, scale schedule) terms; empty = no guidance."""

    terms: tuple[tuple[frozenset, ScaleSchedule], ...] = ()
    spec: str = "none"

    @property
    def guided(self) -> frozenset:
        return frozenset().union(*(c for c, _ in self.terms)) if self.terms else frozenset()

    def branches(self) -> list[frozenset]:
        """The conditions each branch drops: branch 0 drops every guided condition, the last drops none."""
        guided, kept, out = self.guided, frozenset(), []
        out.append(guided)
        for conds, _ in self.terms:
            kept = kept | conds
            out.append(guided - kept)
        return out

    def weights(self, steps: int) -> np.ndarray:
        """[steps, branches] combination weights; rows sum to 1."""
        if not self.terms:
            return np.ones((steps, 1))
        s = np.stack([sched.values(steps) for _, sched in self.terms], axis=1)  # [N, n]
        w = np.zeros((steps, len(self.terms) + 1))
        w[:, 0] = 1 - s[:, 0]
        w[:, 1:-1] = s[:, :-1] - s[:, 1:]
        w[:, -1] = s[:, -1]
        w[np.abs(w) < 1e-12] = 0.0
        return w

    def phases(self, steps: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """Maximal runs of steps with the same live branches: [(start, stop, branch indices)]."""
        live = self.weights(steps) != 0
        out = []
        for i in range(steps):
            key = tuple(np.flatnonzero(live[i]).tolist())
            if out and out[-1][2] == key:
                out[-1] = (out[-1][0], i + 1, key)
            else:
                out.append((i, i + 1, key))
        return out

    def describe(self, steps: int) -> str:
        names = ["∅" if not d else "−" + "−".join(sorted(d)) for d in self.branches()]
        names[-1] = "all"
        parts = [f"steps {a}-{b - 1}: " + " + ".join(names[k] for k in live) for a, b, live in self.phases(steps)]
        return f"guidance {self.spec!r}: " + "; ".join(parts)

    def check(self, available: set[str], where: str = "--guidance") -> None:
        """Refuse conditions the model (or this call) does not have."""
        missing = sorted(self.guided - set(available))
        if missing:
            raise ValueError(f"{where} {self.spec!r}: this model/call has no {', '.join(missing)} condition "
                             f"(it has {sorted(available) or 'none'}); drop those terms")


def parse_guidance(spec: str | None) -> Guidance:
    """'text=4,audio=2.9' / 'text+audio=3.5' / a preset name (PRESETS) / 'none' or '' → Guidance."""
    spec = (spec or "none").strip()
    spec = PRESETS.get(spec, spec)
    if spec in ("none", ""):
        return Guidance((), "none")
    terms, seen = [], set()
    for item in _split_terms(spec):
        name, sep, value = item.partition("=")
        conds = frozenset(c.strip() for c in name.split("+"))
        if not sep or not value.strip():
            raise ValueError(f"guidance {spec!r}: term {item!r} must be CONDITIONS=SCALE (e.g. text=4, audio=2.9)")
        if bad := sorted(conds - set(CONDITIONS)):
            raise ValueError(f"guidance {spec!r}: unknown condition(s) {bad}; conditions are {list(CONDITIONS)} "
                             f"(or a preset: {sorted(PRESETS)})")
        if conds & seen:
            raise ValueError(f"guidance {spec!r}: {sorted(conds & seen)} appear in more than one term")
        seen |= conds
        terms.append((conds, parse_scale(value)))
    return Guidance(tuple(terms), spec)


def _split_terms(spec: str) -> list[str]:
    """Split on commas outside parentheses (lin(a,b) holds one)."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [t for t in out if t]

"""The converter framework: one declarative table of `torch name -> our path` with a transform per
entry drives import, export and the tests.

A rule whose torch name contains ``{i}`` is per layer: import stacks layers 0..L-1 along a new
leading axis (the ``layers`` axis that `nnx.scan` runs over); export splits it again. A model with
several stacks gives `num_layers` as {our path prefix: count}. A rule with `rows` reads rows [a, b)
of a fused torch tensor (e.g. one qkv Linear into separate q, k, v); export concatenates the parts
back. Every check happens before any tensor is read, and all problems are reported together in one error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of inverse array maps: torch layout -> ours, ours -> torch."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]

    def our_shape(self, torch_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.to_ours(_shaped(torch_shape)).shape)

    def torch_shape(self, our_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.to_torch(_shaped(our_shape)).shape)


def _shaped(shape: Sequence[int]) -> np.ndarray:
    """A zero-stride view has any shape for free: run a transform on it and read the shape."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(shape), (0,) * len(shape))


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight [out, in] <-> our kernel [in, out]
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T)
# torch Conv3d weight [D, C, pt, ph, pw] <-> our patch kernel [pt, ph, pw, C, D]
CONV3D = Transform("conv3d", lambda x: x.transpose(2, 3, 4, 1, 0), lambda x: x.transpose(4, 3, 0, 1, 2))


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str  # e.g. "blocks.{i}.attn1.to_q.weight"
    ours: str  # dotted path in our parameter tree, e.g. "blocks.attn1.to_q.kernel"
    transform: Transform = IDENTITY
    rows: tuple[int, int] | None = None  # rows [a, b) (axis 0, torch layout) of a fused torch tensor

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch


def linear(torch_prefix: str, our_prefix: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_prefix}.weight", f"{our_prefix}.kernel", LINEAR)]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{our_prefix}.bias"))
    return rules


def norm(torch_prefix: str, our_prefix: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_prefix}.weight", f"{our_prefix}.scale")]
    if bias:
        rules.append(Rule(f"{torch_prefix}.bias", f"{our_prefix}.bias"))
    return rules


class ConversionError(ValueError):
    """Raised with every missing, unexpected and mis-shaped tensor listed by name and shape."""


class Source(Protocol):
    def keys(self) -> Iterable[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


def select(rules: Sequence[Rule], our_shapes: Mapping[str, tuple[int, ...]]) -> list[Rule]:
    """The rules that apply to a model: those whose target exists. Every model parameter must be covered."""
    chosen = [r for r in rules if r.ours in our_shapes]
    uncovered = set(our_shapes) - {r.ours for r in chosen}
    if uncovered:
        raise ConversionError(f"no conversion rule for our parameters: {sorted(uncovered)}")
    return chosen


def _layers(rule: Rule, num_layers: int | Mapping[str, int]) -> int:
    """The layer count of `rule`'s stack: `num_layers`, or the entry of the longest matching path prefix."""
    if not isinstance(num_layers, Mapping):
        return num_layers
    prefixes = [p for p in num_layers if rule.ours.startswith(p + ".")]
    if not prefixes:
        raise ConversionError(f"no layer count for the stacked parameter {rule.ours} (have {sorted(num_layers)})")
    return num_layers[max(prefixes, key=len)]


def _expand(rule: Rule, num_layers) -> list[str]:
    return [rule.torch.format(i=i) for i in range(_layers(rule, num_layers))] if rule.per_layer else [rule.torch]


def _read(rule: Rule, source: Source, name: str) -> np.ndarray:
    x = source.get(name)
    return rule.transform.to_ours(x if rule.rows is None else x[rule.rows[0]:rule.rows[1]])


def _rows_total(rules: Sequence[Rule]) -> dict[str, int]:
    """{torch name pattern: rows of the whole fused tensor} for the rules that read row ranges."""
    total: dict[str, int] = {}
    for r in rules:
        if r.rows is not None:
            total[r.torch] = max(total.get(r.torch, 0), r.rows[1])
    return total


def import_tensors(rules: Sequence[Rule], source: Source, our_shapes: Mapping[str, tuple[int, ...]],
                   num_layers: int | Mapping[str, int], *, ignore: Sequence[str] = (), what: str = "checkpoint",
                   progress: bool = True) -> dict[str, np.ndarray]:
    """Torch-named tensors from `source` -> {our dotted path: array} in the source's dtype.

    `our_shapes` are the target shapes (per-layer rules include the leading layers axis). `ignore`
    holds fnmatch patterns of source keys that are dropped silently.
    """
    rules = select(rules, our_shapes)
    present = set(source.keys())
    pairs = [(name, rule) for rule in rules for name in _expand(rule, num_layers)]
    expected = {name: rule for name, rule in pairs}  # a fused name: any one of its parts' rules
    total = _rows_total(rules)
    missing = sorted(set(expected) - present)
    unexpected = sorted(k for k in present - set(expected)
                        if not any(fnmatch.fnmatchcase(k, pat) for pat in ignore))
    mis_shaped = []
    for name, rule in pairs:
        if name not in present:
            continue
        shape = tuple(source.shape(name))
        if rule.rows is not None:
            if not shape or shape[0] != total[rule.torch]:
                if rule.rows[0] == 0:  # reported once per fused tensor
                    mis_shaped.append(f"{name}: {shape}, expected {total[rule.torch]} rows (fused parts)")
                continue
            shape = (rule.rows[1] - rule.rows[0], *shape[1:])
        want = tuple(our_shapes[rule.ours])[1 if rule.per_layer else 0:]
        got = rule.transform.our_shape(shape)
        if got != want:
            part = "" if rule.rows is None else f" rows {rule.rows[0]}:{rule.rows[1]}"
            mis_shaped.append(f"{name}{part}: {shape} -> {got} via {rule.transform.name}, "
                              f"expected {want} for {rule.ours}")
    if missing or unexpected or mis_shaped:
        lines = [f"cannot convert {what}:"]
        for title, items in (("missing", [f"{k} (expected {_torch_shape(expected[k], our_shapes)})"
                                          for k in missing]),
                             ("unexpected", [f"{k} {tuple(source.shape(k))}" for k in unexpected]),
                             ("mis-shaped", mis_shaped)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {s}" for s in items)
        raise ConversionError("\n".join(lines))

    out: dict[str, np.ndarray] = {}
    for rule in tqdm(rules, desc=f"converting {what}", unit="tensor", disable=not progress):
        names = _expand(rule, num_layers)
        first = _read(rule, source, names[0])
        if not rule.per_layer:
            out[rule.ours] = np.array(first)
            continue
        stacked = np.empty((len(names), *first.shape), first.dtype)  # one buffer, filled layer by layer
        for i, name in enumerate(names):
            stacked[i] = _read(rule, source, name)
        out[rule.ours] = stacked
    return out


def _torch_shape(rule: Rule, our_shapes) -> tuple[int, ...]:
    return rule.transform.torch_shape(tuple(our_shapes[rule.ours])[1 if rule.per_layer else 0:])


def export_tensors(rules: Sequence[Rule], params: Mapping[str, np.ndarray], num_layers: int | Mapping[str, int], *,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """{our dotted path: array} -> torch-named, torch-layout tensors (contiguous); row parts concatenated."""
    rules = select(rules, {k: v.shape for k, v in params.items()})
    out: dict[str, np.ndarray] = {}
    parts: dict[str, list[tuple[tuple[int, int], np.ndarray]]] = {}
    for rule in tqdm(rules, desc="exporting", unit="tensor", disable=not progress):
        arr = np.asarray(params[rule.ours])
        n = _layers(rule, num_layers) if rule.per_layer else 1
        if rule.per_layer and arr.shape[0] != n:
            raise ConversionError(f"{rule.ours}: leading axis {arr.shape[0]} != num_layers {n}")
        items = ([(rule.torch.format(i=i), arr[i]) for i in range(n)] if rule.per_layer else [(rule.torch, arr)])
        for name, a in items:
            if rule.rows is None:
                out[name] = np.ascontiguousarray(rule.transform.to_torch(a))
            else:
                parts.setdefault(name, []).append((rule.rows, rule.transform.to_torch(a)))
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        if [p[0][0] for p in pieces] != [0] + [p[0][1] for p in pieces[:-1]]:
            raise ConversionError(f"{name}: row parts {[p[0] for p in pieces]} do not tile the fused tensor")
        out[name] = np.ascontiguousarray(np.concatenate([p[1] for p in pieces], axis=0))
    return out

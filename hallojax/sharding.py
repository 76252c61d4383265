"""Meshes, logical-axis rules and the placement of parameters and activations.

Parameters and activations carry *logical* axis names (``embed``, ``heads``, ``mlp``, ``layers``,
``act_batch``, ``act_len``, ...). One short rules table per preset maps each logical name to zero or more
mesh axes of the fixed mesh (data, fsdp, context, tensor). A dimension that does not divide evenly
by its mesh axes stays replicated on that dimension, so tiny test models shard on any mesh.

Without rules (the default) every helper here is a no-op: single-device code needs no mesh knowledge.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import types
from typing import Iterable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# The default table: batch over (data, fsdp); weights' model dim over fsdp and context (ZeRO-3 style: the
# chips that split a sample's tokens split its weights too, as MaxText does); heads and MLP hidden over
# tensor; the token axis of activations over context.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", "context"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_embed", None),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
)

Rules = Sequence[tuple[str, "str | Sequence[str] | None"]]

_RULES: contextvars.ContextVar[Mapping[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "hallojax_rules", default=None)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, context, tensor) for `num_devices`; one size may be -1 (fill the rest)."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
    if any(s < 1 for i, s in enumerate(sizes) if i not in fills):
        raise ValueError(f"mesh {dict(shape)}: sizes must be positive (or -1 to fill)")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if num_devices % known:
            raise ValueError(f"mesh {dict(shape)}: {num_devices} devices do not divide by {known}")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} present")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, context, tensor) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def normalize_rules(rules: Rules | Mapping | None) -> dict[str, tuple[str, ...]]:
    if rules is None:
        return {}
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = {}
    for name, axes in items:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
        for a in out[name]:
            if a not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {axes!r}: {a!r} is not a mesh axis {MESH_AXES}")
    return out


@contextlib.contextmanager
def use_rules(rules: Rules | Mapping | None):
    """Activate a logical-axis rules table for `constrain` (inside `jax.set_mesh(mesh)`)."""
    token = _RULES.set(types.MappingProxyType(normalize_rules(rules)))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Mapping[str, tuple[str, ...]] | None:
    return _RULES.get()


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int], rules: Mapping[str, tuple[str, ...]],
                    mesh_shape: Mapping[str, int]) -> P:
    """PartitionSpec for `shape` with logical `axes`. Each mesh axis is used at most once; mesh axes of
    size 1 are dropped; a dimension not divisible by its mesh axes' product is left replicated."""
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = [a for a in rules.get(name, ()) if name is not None and a not in used
                     and mesh_shape.get(a, 1) > 1]
        # drop trailing axes until the dimension divides evenly
        while mesh_axes and dim % math.prod(mesh_shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without active rules or mesh."""
    rules = current_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def _variable_axes(v: nnx.Variable) -> tuple | None:
    return v.get_metadata().get("out_sharding")


def shard_shape(shape: Sequence[int], spec: P, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` laid out by `spec` on a mesh of `mesh_shape`."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(dim // math.prod(mesh_shape[a] for a in axes))
    return tuple(out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | Mapping | None) -> nnx.State:
    """NamedSharding per variable of `state` (abstract or concrete), from its logical axes."""
    rules = normalize_rules(rules)
    mesh_shape = dict(mesh.shape)

    def one(v):
        axes = _variable_axes(v) or (None,) * len(v.shape)
        return NamedSharding(mesh, logical_to_spec(axes, v.shape, rules, mesh_shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_module, mesh: Mesh, rules: Rules | Mapping | None):
    """Build `make_module()` directly sharded: `eval_shape` for the layout, then a jitted init with
    `out_shardings`, so no full host copy of the parameters ever exists."""
    abstract = nnx.eval_shape(make_module)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    def init():
        return nnx.state(make_module())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(module, mesh: Mesh, rules: Rules | Mapping | None):
    """Place an existing module's variables onto `mesh` according to their logical axes (in place)."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
    return module


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules | Mapping | None = None) -> NamedSharding:
    """Sharding for a batch-leading input of `shape`: batch over the `act_batch` mesh axes."""
    rules = normalize_rules(DEFAULT_RULES if rules is None else rules)
    axes = ("act_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, rules, dict(mesh.shape)))

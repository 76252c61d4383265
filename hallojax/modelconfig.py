"""What every model config shares: the dtype names, the matmul precision, dict round trips and `replace`.

Model configs are frozen dataclasses inheriting `ModelConfig`; `NUMERIC_FIELDS` names the fields that
change numerics but no parameter shape (safe to override when loading a checkpoint).

Matmul precision is the model's own choice (`precision` in every config, saved with it), not the
process-wide `jax_default_matmul_precision`: the model's entry points (`with_precision`) trace their dots
and convolutions under it, and the backward pass inherits it. "auto" (the default) is "highest" for
float32 compute (true fp32 products, as PyTorch computes them without TF32: what fp32 parity needs; on
TPU/GPU the fp32 dots then cost several bf16 passes) and "default" otherwise (16-bit inputs are exact in
one pass; the splash kernel's Mosaic compile refuses "highest" with bfloat16 inputs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PRECISIONS = ("auto", "default", "high", "highest")


class ModelConfig:
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a dict (e.g. JSON or an ml_collections ConfigDict); unknown keys are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def check_dtypes(cfg, where: str) -> None:
    """The compute and parameter dtypes and the matmul precision name known values."""
    for name in ("param_dtype", "dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise ValueError(f"{where}.{name}={getattr(cfg, name)!r}: expected one of {sorted(DTYPES)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"{where}.precision={cfg.precision!r}: expected one of {PRECISIONS}")


def matmul_precision(cfg) -> str:
    """The precision the model's dots and convolutions run at ("auto" resolved by the compute dtype)."""
    if cfg.precision == "auto":
        return "highest" if cfg.dtype == "float32" else "default"
    return cfg.precision


def with_precision(method):
    """Decorate a model method: everything it traces runs at `matmul_precision(self.cfg)`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with jax.default_matmul_precision(matmul_precision(self.cfg)):
            return method(self, *args, **kwargs)

    return wrapper

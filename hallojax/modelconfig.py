"""What every model config shares: the dtype names, dict round trips and `replace`.

Model configs are frozen dataclasses inheriting `ModelConfig`; `NUMERIC_FIELDS` names the fields that
change numerics but no parameter shape (safe to override when loading a checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    for name in ("param_dtype", "dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise ValueError(f"{where}.{name}={getattr(cfg, name)!r}: expected one of {sorted(DTYPES)}")

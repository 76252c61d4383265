"""TPU fit check: compile the real training step ahead of time for a TPU topology, on any host.

    hallojax compile --config configs/wan.py:wan2.1-t2v-1.3b,remat=full --config.model.attention=splash \\
        --topology v5p:2x2x2 --batch 32 --frames 21 --height 60 --width 104

libtpu (the `tpu` extra: `pip install -e .[tpu]`) compiles for a described topology without the chips:
the state (fp32 params, AdamW moments, EMA) and the batch are laid out on the config's mesh over the
topology's devices exactly as `hallojax train` lays them out, and `jit(...).lower(...).compile()` either
succeeds (then XLA reports the per-chip memory: arguments, outputs, temporaries) or fails with
RESOURCE_EXHAUSTED when the step does not fit the chip's HBM. FLOPs per step are the analytic model
FLOPs (`hallojax.flops`); XLA's own count is printed beside them but counts the layer loop's body once.

Topologies: ``v5p:2x2x2`` (a `get_topology_desc` name: chip grid) or ``v5p-16`` (the Cloud TPU name:
TensorCores for v4/v5p = 2 per chip, chips for v5e/v6e).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax

# Cloud TPU names -> chip grids (v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips)
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GENERATION = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}


def parse_topology(name: str) -> tuple[str, int]:
    """'v5p:2x2x2' or 'v5p-16' -> ('v5p:2x2x2', 8 chips)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)[:-](\w+)", name.strip())
    if not m:
        raise ValueError(f"--topology {name!r}: expected e.g. v5p:2x2x2 (chip grid) or v5p-16 (Cloud TPU name); "
                         f"generations {sorted(_GENERATION)}")
    gen, rest = _GENERATION[m.group(1)], m.group(2)
    if "x" in rest:
        dims = rest.split("x")
        if not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"--topology {name!r}: the chip grid must be positive integers like 2x2x2")
        return f"{gen}:{rest}", math.prod(int(d) for d in dims)
    if not rest.isdigit():
        raise ValueError(f"--topology {name!r}: expected a number after '-' (e.g. v5p-16)")
    cores = int(rest)
    chips, grids = (cores // 2, _GRID_3D) if gen in ("v4", "v5p") else (cores, _GRID_2D)
    if chips not in grids:
        raise ValueError(f"--topology {name!r}: {chips} chips has no standard slice shape; pass the chip grid "
                         f"instead (e.g. {gen}:{next(iter(grids.values()))})")
    return f"{gen}:{grids[chips]}", chips


@dataclasses.dataclass
class FitReport:
    topology: str
    chips: int
    device_kind: str
    mesh: dict
    batch: int
    shape: tuple[int, int, int]
    tokens_per_sample: int
    fits: bool
    hbm_gib: float | None  # capacity per chip
    argument_gib: float = 0.0
    output_gib: float = 0.0
    alias_gib: float = 0.0
    temp_gib: float = 0.0
    code_gib: float = 0.0
    total_gib: float = 0.0  # arguments + outputs - aliased (donated) + temporaries + code
    host_gib: float = 0.0  # pinned host memory per chip (remat offloading), beside the HBM total
    flops_per_step: float = 0.0  # analytic model FLOPs, all chips
    xla_flops_per_chip: float = 0.0
    compile_seconds: float = 0.0
    error: str = ""
    hints: tuple[str, ...] = ()  # what to try when it does not fit

    def lines(self) -> list[str]:
        from hallojax.flops import device_spec, format_flops

        f, h, w = self.shape
        out = [f"topology {self.topology} ({self.chips} chips, {self.device_kind}), mesh {self.mesh}",
               f"global batch {self.batch} ({self.batch / self.chips:g} per chip), latents {f}x{h}x{w} "
               f"= {self.tokens_per_sample:,} tokens per sample; compiled in {self.compile_seconds:.0f} s"]
        cap = f"{self.hbm_gib:.1f} GiB" if self.hbm_gib else "unknown"
        if not self.fits:
            out.append(f"DOES NOT FIT per-chip HBM ({cap}): {self.error}")
            out += [f"  try: {h}" for h in self.hints]
            return out
        out.append(f"per chip: arguments {self.argument_gib:.2f} GiB, outputs {self.output_gib:.2f} (aliased "
                   f"{self.alias_gib:.2f}), temporaries {self.temp_gib:.2f}, code {self.code_gib:.2f} -> "
                   f"total {self.total_gib:.2f} GiB of {cap}")
        if self.host_gib:
            out.append(f"pinned host memory per chip (offloaded activations): {self.host_gib:.2f} GiB")
        per_chip = self.flops_per_step / self.chips
        out.append(f"FLOPs per step: {format_flops(self.flops_per_step)} model ({format_flops(per_chip)} per chip); "
                   f"XLA per chip {format_flops(self.xla_flops_per_chip)} (loop bodies counted once)")
        spec = device_spec(self.device_kind)
        if spec:
            t = per_chip / (spec[0] * 1e12)
            out.append(f"step time at 100% / 50% MFU: {t:.3g} s / {2 * t:.3g} s")
        return out


def fit_hints(cfg) -> tuple[str, ...]:
    """The memory levers not yet pulled in this model config, in the order to try them."""
    hints = []
    if cfg.attention != "splash":
        hints.append("--config.model.attention=splash (flash attention: no [L, L] logits in HBM)")
    if cfg.remat == "none":
        hints.append("--config.model.remat=full (recompute each layer in the backward pass)")
    if cfg.remat != "offload_layer_input":
        hints.append("--config.model.remat=offload_layer_input (layer inputs in pinned host memory)")
    hints.append("a smaller --batch, or more chips")
    return tuple(hints)


def compile_train_step(config, topology: str, *, batch: int, frames: int, height: int, width: int,
                       text_len: int = 512) -> FitReport:
    """Lower and compile `hallojax train`'s step for `topology`; returns the fit report."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips are opened: no exclusive lock needed
    from jax.experimental import topologies

    from hallojax.dit import DiTConfig
    from hallojax.flops import device_spec, train_flops
    from hallojax.sharding import batch_sharding, make_mesh, normalize_rules, use_rules
    from hallojax.train import example_batch, jit_train_step, state_layout

    name, chips = parse_topology(topology)
    try:
        topo = topologies.get_topology_desc(name, "tpu")
    except Exception as e:  # no libtpu, or a topology it does not know
        raise ValueError(f"cannot describe TPU topology {name!r} ({type(e).__name__}: {e}); the TPU compiler "
                         "comes with the tpu extra: pip install -e .[tpu]") from e
    devices = list(topo.devices)
    cfg = DiTConfig.from_dict(config.model)
    t = config.train
    rules = normalize_rules(config.rules)
    mesh = make_mesh(dict(config.mesh), devices)
    kind = devices[0].device_kind
    spec = device_spec(kind)
    pt, ph, pw = cfg.patch_size
    tokens = (frames // pt) * (height // ph) * (width // pw)
    report = FitReport(topology=name, chips=len(devices), device_kind=kind, mesh=dict(mesh.shape), batch=batch,
                       shape=(frames, height, width), tokens_per_sample=tokens, fits=False,
                       hbm_gib=spec[1] if spec else None,
                       flops_per_step=train_flops(cfg, batch=batch, frames=frames, height=height, width=width,
                                                  text_len=text_len))
    if batch % t.accum_steps:
        raise ValueError(f"--batch {batch} must divide by train.accum_steps={t.accum_steps}")
    graphdef, shardings, abstract = state_layout(cfg, t, config.seed, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    spec_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.shape, rules))
                  for k, v in example_batch(cfg, batch, frames, height, width, text_len=text_len, seed=None).items()}
    t0 = time.perf_counter()
    cache_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # TPU executables would poison a host's cache
    try:
        with jax.set_mesh(mesh), use_rules(rules):
            compiled = jit_train_step(graphdef, cfg, t, config.seed, shardings).lower(state, spec_batch).compile()
    except Exception as e:  # XlaRuntimeError / ValueError carrying RESOURCE_EXHAUSTED
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "exceeds" not in msg:
            raise
        report.error = next((ln.strip() for ln in msg.splitlines() if "exceeds" in ln or "RESOURCE" in ln), msg[:300])
        report.hints = fit_hints(cfg)
        report.compile_seconds = time.perf_counter() - t0
        return report
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_on)
    report.compile_seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    gib = 2.0**30
    report.argument_gib = mem.argument_size_in_bytes / gib
    report.output_gib = mem.output_size_in_bytes / gib
    report.alias_gib = mem.alias_size_in_bytes / gib
    report.temp_gib = mem.temp_size_in_bytes / gib
    report.code_gib = mem.generated_code_size_in_bytes / gib
    report.total_gib = (report.argument_gib + report.output_gib - report.alias_gib + report.temp_gib
                        + report.code_gib)
    report.host_gib = (mem.host_argument_size_in_bytes + mem.host_output_size_in_bytes - mem.host_alias_size_in_bytes
                       + mem.host_temp_size_in_bytes) / gib
    report.fits = report.hbm_gib is None or report.total_gib <= report.hbm_gib
    if not report.fits:
        report.error = f"{report.total_gib:.2f} GiB needed"
        report.hints = fit_hints(cfg)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.xla_flops_per_chip = float((cost or {}).get("flops", 0.0))
    return report

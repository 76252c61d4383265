"""TPU fit check: compile the real training step ahead of time for a TPU topology, on any host.

    hallojax compile --config configs/wan.py:wan2.1-t2v-1.3b,remat=full --config.model.attention=splash \\
        --topology v5p:2x2x2 --batch 32 --frames 21 --height 60 --width 104

libtpu (the `tpu` extra: `pip install -e .[tpu]`) compiles for a described topology without the chips:
the state (fp32 params, AdamW moments, EMA) and the batch are laid out on the config's mesh over the
topology's devices exactly as `hallojax train` lays them out, and `jit(...).lower(...).compile()` either
succeeds (then XLA reports the per-chip memory: arguments, outputs, temporaries) or fails with
RESOURCE_EXHAUSTED when the step does not fit the chip's HBM. FLOPs per step are the analytic model
FLOPs (`hallojax.flops`); XLA's own count is printed beside them but counts the layer loop's body once.

Any model family the trainer trains (`config.model.kind`, hallojax.families) compiles its training step;
`--sample` compiles the Wan DiT's guided step (`SamplingEngine.guided`) or HunyuanVideo-Avatar's
(`generate_families.avatar_step`: one Euler step of the windows of one latent buffer):

    hallojax compile --sample --config configs/hunyuan_avatar.py:hunyuan-avatar --config.mesh.fsdp=1 \\
        --config.mesh.context=8 --config.model.param_dtype=bfloat16 --config.model.attention=splash \\
        --topology v6e-8 --frames 33 --height 88 --width 88 --text-len 832

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
import numpy as np

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
    branches: int = 0  # sampling: guidance branches batched into the step's one model call (0: training)
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> bytes per chip per step (HLO)
    unit: str = "video"  # what a sampling step's batch counts (HunyuanVideo-Avatar: windows of one buffer)

    def lines(self) -> list[str]:
        from hallojax.flops import device_spec, format_flops

        f, h, w = self.shape
        rows = self.batch * max(self.branches, 1)
        plural = lambda n, word, suffix="s": f"{n} {word}{suffix if n > 1 else ''}"  # noqa: E731
        what = (f"one denoising step: {plural(self.branches, 'guidance branch', 'es')} x "
                f"{plural(self.batch, self.unit)} = {rows} model rows ({rows / self.chips:g} per chip)"
                if self.branches else f"global batch {self.batch} ({self.batch / self.chips:g} per chip)")
        out = [f"topology {self.topology} ({plural(self.chips, 'chip')}, {self.device_kind}), mesh {self.mesh}",
               f"{what}, latents {f}x{h}x{w} = {self.tokens_per_sample:,} tokens per sample; compiled in "
               f"{self.compile_seconds:.0f} s"]
        cap = f"{self.hbm_gib:.1f} GiB" if self.hbm_gib else "unknown"
        tries = [f"  try: {h}" for h in self.hints]
        if not self.fits:
            out.append(f"DOES NOT FIT per-chip HBM ({cap}): {self.error}")
            if not self.total_gib:  # the compiler stopped: no memory breakdown
                return out + tries
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
        if self.collectives:
            kinds = ", ".join(f"{k} {format_bytes(v)}"
                              for k, v in sorted(self.collectives.items(), key=lambda kv: -kv[1]))
            out.append(f"collectives per chip per step: {format_bytes(sum(self.collectives.values()))} ({kinds})")
        return out + tries


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fit_hints(cfg, accum_steps: int = 1, per_chip_batch: float = 0.0) -> tuple[str, ...]:
    """The memory levers of a training step not yet pulled, in the order to try them."""
    hints = []
    if cfg.attention != "splash":
        hints.append("--config.model.attention=splash (flash attention: no [L, L] logits in HBM)")
    if cfg.remat == "none":
        hints.append("--config.model.remat=full (recompute each layer in the backward pass)")
    if cfg.remat != "offload_layer_input":
        hints.append("--config.model.remat=offload_layer_input (layer inputs in pinned host memory)")
    if per_chip_batch / accum_steps > 1:
        hints.append(f"--config.train.accum_steps={2 * accum_steps} (the batch in micro-batches: the activations "
                     "of one at a time; the same optimizer step)")
    hints.append("a smaller --batch, or more chips")
    return tuple(hints)


def sample_fit_hints(cfg, mesh_shape) -> tuple[str, ...]:
    """The memory levers of a sampling step not yet pulled, in the order to try them."""
    hints = []
    if cfg.param_dtype != "bfloat16":
        hints.append("--config.model.param_dtype=bfloat16 (inference weights in bf16: half their memory)")
    if cfg.attention != "splash":
        hints.append("--config.model.attention=splash (flash attention: no [L, L] logits in HBM)")
    cp = getattr(cfg, "context_parallel", None)  # None: the model attends over context by XLA's gathers only
    if mesh_shape.get("context", 1) == 1:
        hints.append("--config.mesh.context=N --config.model.context_parallel=ulysses (each branch's tokens, and "
                     "the weights, split over N chips; ring when the heads do not divide)" if cp is not None else
                     "--config.mesh.context=N (each branch's tokens, and the weights, split over N chips)")
    elif cp == "none":
        hints.append("--config.model.context_parallel=ulysses or ring (no key/value all-gather over context)")
    hints.append("more chips")
    return tuple(hints)


# --- collectives: bytes per chip per step, from the compiled HLO ----------------------------------------
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")


def _arrays(shape_text: str) -> list[int]:
    """Byte sizes of the arrays in an HLO shape (a tuple gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _DTYPE_BYTES:
            out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return out


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each chip's collectives move per execution of a compiled (SPMD-partitioned) HLO module, by kind:
    every collective counts the larger of its operands and its result (all-gather: the gathered result;
    reduce-scatter, all-reduce, all-to-all, collective-permute: the operands), times the trip counts of
    the loops around it (a while loop's `known_trip_count`, else the bound of its condition's
    `counter < N`); a conditional counts its largest branch. Async pairs count once (at -start)."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    sizes: dict[str, list[int]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and "%" in line.split("(")[0]:
            current = line.split("%", 1)[1].split(" ", 1)[0]
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTR.match(line) if current else None
        if m:
            name, shape, op, rest = m.groups()
            sizes[name] = _arrays(shape)
            comps[current].append((name, shape, op, rest))

    def trip_count(rest: str) -> int:
        if m := re.search(r'known_trip_count[^0-9]*([0-9]+)', rest):
            return int(m.group(1))
        cond = re.search(r"condition=%([\w.\-]+)", rest)
        instrs = comps.get(cond.group(1), []) if cond else []
        consts = {n: r for n, _, op, r in instrs if op == "constant"}
        for _, _, op, r in instrs:
            if op == "compare" and "direction=LT" in r:
                for operand in re.findall(r"%([\w.\-]+)", r.split(")")[0]):
                    if operand in consts and (m := re.match(r"(-?[0-9]+)\)", consts[operand])):
                        return int(m.group(1))
        return 1

    memo: dict[str, dict[str, int]] = {}

    def total(comp: str) -> dict[str, int]:
        if comp in memo:
            return memo[comp]
        memo[comp] = acc = {}
        for _, shape, op, rest in comps.get(comp, []):
            kind = op.removesuffix("-start")
            if kind in _COLLECTIVES and not op.endswith("-done"):
                operands = sum(sum(sizes.get(o, [])) for o in re.findall(r"%([\w.\-]+)", rest.split(")")[0]))
                acc[kind] = acc.get(kind, 0) + max(operands, max(_arrays(shape), default=0))
            called = re.findall(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)",
                                rest)
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                for k, v in total(body).items():
                    acc[k] = acc.get(k, 0) + trip_count(rest) * v
            elif branches or op == "conditional":
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else called
                subs = [total(b) for b in names]
                biggest = max(subs, key=lambda d: sum(d.values()), default={})
                for k, v in biggest.items():
                    acc[k] = acc.get(k, 0) + v
            elif not op.endswith(("-done", "-update")):  # an async pair's computation runs once
                for c in called:
                    for k, v in total(c).items():
                        acc[k] = acc.get(k, 0) + v
        return acc

    return total(entry) if entry else {}


def check_step_shape(cfg, *, batch, frames, height, width, text_len, image_len=None, steps=1,
                     warmup=0) -> None:
    """The sizes of a training step given on the command line (latent grid, text tokens, step counts):
    ValueError naming the flag unless they fit the model (`hallojax compile`, `hallojax bench train`)."""
    image_len = (cfg.pos_embed_seq_len or 257) if image_len is None else image_len
    for name, value, low in (("--batch", batch, 1), ("--frames", frames, 1), ("--height", height, 1),
                             ("--width", width, 1), ("--text-len", text_len, 1), ("--steps", steps, 1),
                             ("--warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} {value}: must be an integer >= {low}")
    for name, value, p in zip(("--frames", "--height", "--width"), (frames, height, width), cfg.patch_size):
        if value % p:
            raise ValueError(f"{name} {value}: must be a multiple of the patch size {p} "
                             f"(model.patch_size={tuple(cfg.patch_size)}; latent-grid sizes)")
    if cfg.motion_frames >= frames:
        raise ValueError(f"--frames {frames}: must exceed model.motion_frames={cfg.motion_frames}")
    if cfg.image_dim is not None and (image_len < 1 or (cfg.pos_embed_seq_len is not None
                                                        and image_len != cfg.pos_embed_seq_len)):
        raise ValueError(f"--image-len {image_len}: this I2V model takes "
                         f"{cfg.pos_embed_seq_len or '>= 1'} image tokens")


def _topology(config, topology: str):
    """(topology name, mesh over its devices, device kind, (peak TFLOP/s, HBM GiB) | None)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips are opened: no exclusive lock needed
    from jax.experimental import topologies

    from hallojax.flops import device_spec
    from hallojax.sharding import make_mesh

    name, chips = parse_topology(topology)
    grid = tuple(int(d) for d in name.split(":")[1].split("x"))
    # a slice smaller than one host (4 chips): the host is the slice (e.g. a single v5e chip)
    kw = {"chips_per_host_bounds": grid + (1,) * (3 - len(grid))} if chips < 4 else {}
    try:
        topo = topologies.get_topology_desc(name, "tpu", **kw)
    except Exception as e:  # no libtpu, or a topology it does not know
        raise ValueError(f"cannot describe TPU topology {name!r} ({type(e).__name__}: {e}); the TPU compiler "
                         "comes with the tpu extra: pip install -e .[tpu]") from e
    devices = list(topo.devices)
    kind = devices[0].device_kind
    return name, make_mesh(dict(config.mesh), devices), kind, device_spec(kind)


def _compile(report: FitReport, lower, mesh, rules, hints) -> FitReport:
    """Compile `lower()` (a Lowered) on the mesh and fill the report: memory per chip, XLA's FLOPs,
    collective bytes; or the RESOURCE_EXHAUSTED line and `hints` when it does not fit."""
    from hallojax.sharding import use_rules

    t0 = time.perf_counter()
    cache_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # TPU executables would poison a host's cache
    try:
        with jax.set_mesh(mesh), use_rules(rules):
            compiled = lower().compile()
    except Exception as e:  # XlaRuntimeError / ValueError carrying RESOURCE_EXHAUSTED
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "exceeds" not in msg:
            raise
        report.error = next((ln.strip() for ln in msg.splitlines() if "exceeds" in ln or "RESOURCE" in ln), msg[:300])
        report.hints = hints
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
        report.hints = hints
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.xla_flops_per_chip = float((cost or {}).get("flops", 0.0))
    report.collectives = collective_bytes(compiled.as_text())
    return report


def _report(cfg, name, mesh, kind, spec, batch, shape, flops, **kw) -> FitReport:
    from hallojax.families import family

    return FitReport(topology=name, chips=mesh.size, device_kind=kind, mesh=dict(mesh.shape), batch=batch,
                     shape=shape, tokens_per_sample=family(cfg).tokens(cfg, *shape), fits=False,
                     hbm_gib=spec[1] if spec else None, flops_per_step=flops, **kw)


def compile_train_step(config, topology: str, *, batch: int, frames: int, height: int, width: int,
                       text_len: int = 512) -> FitReport:
    """Lower and compile `hallojax train`'s step for `topology` (any model family: hallojax.families); returns
    the fit report."""
    from hallojax import families
    from hallojax.families import example_batch, train_flops
    from hallojax.sharding import batch_sharding, normalize_rules
    from hallojax.train import jit_train_step, state_layout

    cfg = families.model_config(config.model)
    if families.family(cfg).kind == "wan-dit":
        check_step_shape(cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len)
    elif families.family(cfg).kind == "hunyuan-avatar":
        check_avatar_shape(cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len)
    name, mesh, kind, spec = _topology(config, topology)
    t = config.train
    rules = normalize_rules(config.rules)
    if batch % t.accum_steps:
        raise ValueError(f"--batch {batch} must divide by train.accum_steps={t.accum_steps}")
    report = _report(cfg, name, mesh, kind, spec, batch, (frames, height, width),
                     train_flops(cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len))
    graphdef, shardings, abstract = state_layout(cfg, t, config.seed, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    spec_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.shape, rules))
                  for k, v in example_batch(cfg, batch, frames, height, width, text_len=text_len, seed=None).items()}
    step = jit_train_step(graphdef, cfg, t, config.seed, shardings)
    return _compile(report, lambda: step.lower(state, spec_batch), mesh, rules,
                    fit_hints(cfg, t.accum_steps, batch / mesh.size))


def compile_sample_step(config, topology: str, *, batch: int = 1, frames: int, height: int, width: int,
                        text_len: int = 512, guidance: str | None = None, steps: int = 50) -> FitReport:
    """Lower and compile one denoising step of `hallojax generate` for `topology`: the model call over the live
    guidance branches of the guidance's widest phase (over `steps`), stacked on the batch axis exactly as
    generation runs them, with the weights laid out by the config's mesh and rules (set
    `model.param_dtype=bfloat16` for inference weights). The Wan DiT: `SamplingEngine.guided` on `batch`
    videos; HunyuanVideo-Avatar: `generate_families.avatar_step` on one window (`batch` windows)."""
    from hallojax import families
    from hallojax.sample import parse_guidance
    from hallojax.sharding import normalize_rules

    cfg = families.model_config(config.model)
    avatar = families.family(cfg).kind == "hunyuan-avatar"
    if not avatar and families.family(cfg).kind != "wan-dit":
        raise ValueError(f"--sample: model.kind={families.family(cfg).kind!r}; the sampling step is sized for the "
                         "Wan DiT and HunyuanVideo-Avatar")
    if avatar:
        check_avatar_shape(cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len)
    else:
        check_step_shape(cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len)
    g = parse_guidance(config.sample.guidance if guidance is None else guidance)
    live = max((live for _, _, live in g.phases(steps)), key=len)
    name, mesh, kind, spec = _topology(config, topology)
    rules = normalize_rules(config.rules)
    flops = families.family(cfg).forward_flops(cfg, batch=batch * len(live), frames=frames, height=height,
                                               width=width, text_len=text_len, reference_cached=True)
    report = _report(cfg, name, mesh, kind, spec, batch, (frames, height, width), flops, branches=len(live),
                     unit="window" if avatar else "video")
    build = _avatar_sample_step if avatar else _wan_sample_step
    lower = build(config, cfg, mesh, rules, g, live, batch=batch, frames=frames, height=height, width=width,
                  text_len=text_len)
    return _compile(report, lower, mesh, rules, sample_fit_hints(cfg, dict(mesh.shape)))


def check_avatar_shape(cfg, *, batch, frames, height, width, text_len) -> None:
    """A HunyuanVideo-Avatar window's sizes (latent grid, text tokens): ValueError naming the flag."""
    for flag, value in (("--batch", batch), ("--frames", frames), ("--height", height), ("--width", width),
                        ("--text-len", text_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} {value}: must be an integer >= 1")
    for flag, value, p in zip(("--height", "--width"), (height, width), cfg.patch_size[1:]):
        if value % p:
            raise ValueError(f"{flag} {value}: must be a multiple of the patch size {p} (latent-grid sizes)")


def _abstract_engine_state(engine, mesh, rules):
    """The engine's (abstract) state as ShapeDtypeStructs laid out by the rules."""
    from flax import nnx

    from hallojax.sharding import state_shardings

    return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), engine.state,
                        state_shardings(engine.state, mesh, rules), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _replicated(mesh, tree):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)


def _wan_sample_step(config, cfg, mesh, rules, g, live, *, batch, frames, height, width, text_len):
    """`SamplingEngine.guided` over the live branches on `batch` videos -> a thunk returning the Lowered."""
    from flax import nnx

    from hallojax.data import sample_inputs
    from hallojax.pipeline import SamplingEngine
    from hallojax.models.wan import WanDiT

    drops = g.branches()
    engine = SamplingEngine(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(config.seed))), mesh, rules)
    state = _abstract_engine_state(engine, mesh, rules)
    full, null, reference = sample_inputs(cfg, frames, height, width, text_len, seed=None, batch=batch)
    if cfg.reference_net:  # Hallo3: the reference network's per-layer features, computed once per video
        cache = jax.eval_shape(lambda st, r: nnx.merge(engine.graphdef, st).encode_reference(r).features,
                               engine.state, reference)
        full["reference_cache"] = null["reference_cache"] = cache
    lat = jax.ShapeDtypeStruct((batch, frames, height, width, cfg.out_channels), jax.numpy.float32)
    masked = (jax.ShapeDtypeStruct(lat.shape[:4] + (4,), lat.dtype), lat) if engine.masked_input else None
    scalar = jax.ShapeDtypeStruct((), jax.numpy.float32)
    weights = jax.ShapeDtypeStruct((1, len(live)), jax.numpy.float32)
    live_drops = [drops[k] for k in live]

    def step(state, x, t, full, null, weights, masked):
        return engine.guided(state, x, t, 0, full, null, live_drops, weights, masked)

    args = (state, *_replicated(mesh, (lat, scalar, full, null, weights, masked)))
    return lambda: jax.jit(step).lower(*args)


def _avatar_sample_step(config, cfg, mesh, rules, g, live, *, batch, frames, height, width, text_len):
    """`generate_families.avatar_step` (one Euler step of `batch` windows of `frames` latent frames over one
    buffer, the live branches batched as generation runs them) -> a thunk returning the Lowered. The text
    carries a mask unless the attention is splash (which takes none: every text token attended)."""
    from flax import nnx

    from hallojax.families import model_class
    from hallojax.generate_families import FamilyEngine, HunyuanAvatarFamily, avatar_step
    from hallojax.sample import long_video

    f32 = jax.numpy.float32
    family = HunyuanAvatarFamily(cfg)
    engine = FamilyEngine(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(config.seed))), mesh, rules,
                          family)
    state = _abstract_engine_state(engine, mesh, rules)
    stride = 4  # the HunyuanVideo VAE's frames per latent frame: 4F − 3 audio frames per window
    plan = long_video.shift_plan(batch * stride * (frames - 1) - 1, window=frames, stride=stride)
    if plan.num_windows != batch:
        raise ValueError(f"--batch {batch}: a latent buffer of {plan.total_latent} frames holds {plan.num_windows} "
                         f"windows of {frames}; use --batch {plan.num_windows} (windows per step)")
    sds = lambda shape, dtype=f32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    idx, aidx = (sds(np.shape(a), jax.numpy.int32) for a in (plan.latent_indices(0), plan.audio_indices(0)))
    text = {"text": sds((1, text_len, cfg.text_dim)), "pooled": sds((1, cfg.pooled_dim))}
    if cfg.attention != "splash":
        text["mask"] = sds((1, text_len), jax.numpy.int32)
    _, ph, pw = cfg.patch_size
    fixed = {"audio": sds((1, plan.audio_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_channels)),
             "ref": sds((1, frames, height, width, family.channels)),
             "face_mask": sds((1, frames * (height // ph) * (width // pw))), "text": text, "null_text": text}
    buf = sds((1, plan.total_latent, height, width, family.channels))
    step = avatar_step(family, engine.graphdef, g.branches(), tuple(live))
    args = (state, *_replicated(mesh, (buf, idx, aidx, sds((plan.total_latent,)), fixed, sds(()), sds(()),
                                       sds((len(live),)), sds(()))))
    return lambda: jax.jit(step).lower(*args)

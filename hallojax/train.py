"""Training of the DiT (flow matching, or hallojax.diffusion's VP objectives): sharded state, Grain input,
Orbax checkpoints with exact resume.

    hallojax train --config configs/wan.py:demo --workdir runs/train [--config.train.steps=200]

Sections: optimizer (AdamW, warmup + cosine/constant, global-norm clipping, freezing by regex, EMA) ·
state (built directly sharded: `eval_shape` -> `jit(out_shardings=...)`, never a full host copy) ·
step (gradient accumulation over microbatches with `lax.scan`, donated state) · input (`hallojax.data`:
random, synthetic or prepared clips; each process loads the rows of the global batch its devices hold) ·
checkpoints (Orbax `CheckpointManager`: params, optimizer state, EMA, step and the global data position;
a save is committed atomically by Orbax, so an interrupted one is never restored; SIGTERM saves at the
next step boundary and exits 0) · loop (progress lines with loss, grad norm, lr, step time, tokens/s,
TFLOP/s per device and MFU from the analytic FLOP count; TensorBoard events in <workdir>/tensorboard).

Training is a pure function of (seed, step) on any topology: randomness is drawn per global batch from
fold_in(seed, step), and the global batch at step s is a function of (seed, s) alone (`hallojax.data`). So
a run killed with `kill -9` and resumed from its last checkpoint ends with bitwise the same state as an
uninterrupted run, and a checkpoint written by 2 processes resumes on 1 (and the reverse) to the same
state up to the float reduction order of the collectives (tested).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from hallojax import data, families
from hallojax.data import example_batch  # noqa: F401  (the trainer's batch; aot and bench take it from here)
from hallojax.models.wan import DiTConfig, param_count
from hallojax.flops import device_peak, format_flops, mfu
from hallojax.flow import sample_noise
from hallojax.metrics import MetricWriter, StepTimer, progress_line
from hallojax.sharding import make_mesh, normalize_rules, state_shardings, use_rules

log = logging.getLogger("hallojax.train")


# --- optimizer -----------------------------------------------------------------------------------
def learning_rate_schedule(t) -> optax.Schedule:
    if t.schedule == "constant":
        if t.warmup_steps == 0:
            return optax.constant_schedule(t.learning_rate)
        return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps),
                                     optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1),
                                                  max(t.steps, t.warmup_steps + 1), end_value=0.0)
    raise ValueError(f"train.schedule={t.schedule!r}: expected 'cosine' or 'constant'")


def trainable_mask(params, patterns) -> Any:
    """True for parameters whose dotted path matches one of the regexes (all when `patterns` is empty)."""
    regexes = [re.compile(p) for p in patterns]

    def name(path):
        return ".".join(str(getattr(k, "key", k)) for k in path)

    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: not regexes or any(r.search(name(path)) for r in regexes), params)
    if regexes and not any(jax.tree.leaves(mask)):
        raise ValueError(f"train.trainable={list(patterns)} matches no parameter")
    return mask


def make_optimizer(t, params) -> optax.GradientTransformation:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
                     optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))
    mask = trainable_mask(params, t.trainable)
    return optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)


def partition(tree, mask) -> tuple[Any, Any]:
    """(trainable, frozen): `tree` split by a boolean `mask` of its structure, None where a leaf went to the other."""
    return (jax.tree.map(lambda m, p: p if m else None, mask, tree),
            jax.tree.map(lambda m, p: None if m else p, mask, tree))


def combine(trainable, frozen) -> Any:
    """The inverse of `partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


# --- state ---------------------------------------------------------------------------------------
def build_model(cfg, seed: int) -> nnx.Module:
    """The model of a config of any family (hallojax.families: the Wan DiT, Hallo3, LetsTalk)."""
    return families.model_class(cfg)(cfg, rngs=nnx.Rngs(seed))


def split_model(model: nnx.Module):
    """(graphdef, params, buffers): the trainer's parameters and, apart, the `Buffer` variables (Hallo3's released
    RoPE tables and dead position table): kept in the state and checkpoints, never trained, decayed or averaged."""
    from hallojax.models.hallo3 import Buffer

    graphdef, params, buffers = nnx.split(model, nnx.All(nnx.Param, nnx.Not(Buffer)), Buffer)
    return graphdef, params, buffers


def init_state(cfg, t, seed: int):
    """The training state as a pure pytree {params, opt_state, ema, step} (+ buffers, for models with any)."""
    _, params, buffers = split_model(build_model(cfg, seed))
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    opt_state = make_optimizer(t, params).init(params)
    state = {"params": params, "opt_state": opt_state, "ema": params, "step": jnp.zeros((), jnp.int32)}
    return {**state, "buffers": buffers} if buffers else state


def state_layout(cfg, t, seed: int, mesh, rules):
    """(graphdef, shardings, abstract state): the state's shapes and placement, nothing allocated."""
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, seed))
    graphdef, abs_params, abs_buffers = split_model(abstract_model)
    param_sh = nnx.to_pure_dict(state_shardings(abs_params, mesh, rules))
    abstract = jax.eval_shape(lambda: init_state(cfg, t, seed))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    flat_p = dict(jax.tree_util.tree_leaves_with_path(param_sh))

    def like_params(tree):
        """Sharding of an optimizer leaf: that of the parameter it mirrors (the longest path it ends with:
        `single_blocks.proj_out.kernel` is not the top-level `proj_out.kernel`), else replicated."""
        def one(path, leaf):
            hits = [p for p in flat_p if path[-len(p):] == p] if leaf.shape else []
            return flat_p[max(hits, key=len)] if hits else replicated

        return jax.tree_util.tree_map_with_path(one, tree)

    shardings = {"params": param_sh, "ema": param_sh, "opt_state": like_params(abstract["opt_state"]),
                 "step": replicated}
    if "buffers" in abstract:
        shardings["buffers"] = nnx.to_pure_dict(state_shardings(abs_buffers, mesh, rules))
    return graphdef, shardings, abstract


def create_state(cfg: DiTConfig, t, seed: int, mesh, rules):
    """Build the state directly sharded (no host copy); shardings from the parameters' logical axes."""
    graphdef, shardings, abstract = state_layout(cfg, t, seed, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: init_state(cfg, t, seed), out_shardings=shardings)()
    return graphdef, state, shardings, abstract


def _dotted(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator=".")


def initialize_from(state: dict, path: str, cfg, mesh, rules, weights: str = "auto") -> dict:
    """The fresh training state with `path`'s weights in its parameters, EMA (and buffers): a converted directory
    (`hallojax convert`, any kind `hallojax.adapt.BASE_MAPS` maps onto this model) or another `hallojax train`
    workdir (its latest step: `weights` auto / ema / params, as `hallojax generate` picks them). Parameters the
    source lacks keep their initialisation (the conditioning added onto a base); optimizer moments start at 0.
    Every source parameter with no place or an unmatched shape is named in one error."""
    from hallojax import adapt, registry
    from hallojax.checkpoint import flat_params, load_pretrained

    from hallojax.checkpoint import CheckpointError

    where = Path(path).absolute()
    try:
        if (where / "config.json").is_file():
            model, base_cfg = load_pretrained(where, mesh=mesh, rules=rules)
            source = f"converted {registry.kind_of(base_cfg)} directory {where}"
        else:
            from hallojax.pipeline import load_checkpoint

            loaded = load_checkpoint(where, weights=weights, devices=list(mesh.devices.flat))
            model, base_cfg = loaded.model, loaded.cfg
            source = f"workdir {where} step {loaded.source['step']} ({loaded.source['weights']} weights)"
        pairs, skip = adapt.base_map(registry.kind_of(base_cfg), registry.kind_of(cfg))
    except (CheckpointError, ValueError) as e:  # the loaders name --checkpoint / --weights: say where it came from
        raise ValueError(f"train.init_from={path} (train.init_weights={weights}): {e}") from None
    groups = ("params", "buffers") if "buffers" in state else ("params",)
    current = {f"{g}/{_dotted(kp)}": v for g in groups for kp, v in jax.tree_util.tree_leaves_with_path(state[g])}
    by_path = {k.split("/", 1)[1]: k for k in current}
    try:
        merged, report = adapt.merge_base({k.split("/", 1)[1]: v for k, v in current.items()}, flat_params(model),
                                          pairs=pairs, skip=skip)
    except ValueError as e:
        raise ValueError(f"train.init_from={path}: {e}") from None
    del model
    out = dict(state)
    for g in groups:
        out[g] = jax.tree_util.tree_map_with_path(
            lambda kp, v: merged[_dotted(kp)], state[g])
    out["ema"] = jax.tree.map(jnp.copy, out["params"])  # own buffers: the step donates the state
    loaded_n = sum(len(report[k]) for k in ("copied", "widened", "from_backbone"))
    kept = sorted({".".join(p.split(".")[:2]) for p in report["kept_init"] if by_path[p].startswith("params/")})
    log.info("initialised from the %s: %d tensors loaded (%d widened, %d from the backbone); kept their "
             "initialisation: %d tensors (%s)", source, loaded_n, len(report["widened"]),
             len(report["from_backbone"]), len(report["kept_init"]), ", ".join(kept) or "none")
    return out


def jit_train_step(graphdef, cfg: DiTConfig, t, seed: int, shardings):
    """The step jitted with the state's shardings in and out and the state donated (batches arrive as
    global arrays already sharded over the batch axes)."""
    return jax.jit(make_train_step(graphdef, cfg, t, seed), in_shardings=(shardings, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))


# --- step ----------------------------------------------------------------------------------------
# The trainer's batch: latents [B, F, h, w, C] (clean codec latents), context [B, M, text_dim] and, as
# the model's mechanisms need them, reference [B, 1, h, w, C], audio [B, T, layers, D], face_mask
# [B, F, h', w'] on the token grid, image_context [B, M', image_dim] (I2V). Everything random (σ, ε,
# condition dropout, the task's known frames, motion-frame noise) is drawn per global batch inside the
# step from fold_in(seed, step).
MASK_TASKS = ("t2v", "i2v", "first_last", "continuation")


def check_channels(cfg: DiTConfig) -> None:
    if isinstance(cfg, DiTConfig) and cfg.in_channels != cfg.out_channels and not families.masked_input(cfg):
        raise ValueError(f"model.in_channels={cfg.in_channels}: the trainer feeds C = out_channels "
                         f"({cfg.out_channels}) latent channels, or 2C + 4 (masked multi-task input)")


def known_frames(key, t, batch: int, frames: int, motion: int) -> jax.Array:
    """float32 [B, F], 1 = known (excluded from the loss): a task per sample drawn from
    `train.mask_tasks` ([[task, probability], ...]; t2v: none known, i2v: frame 0, first_last: the first
    and last, continuation: 1..F/2 first frames), and always the first `motion` frames (motion frames)."""
    f = jnp.arange(frames)[None, :]
    known = jnp.broadcast_to(f < motion, (batch, frames))
    if not t.mask_tasks:
        return known.astype(jnp.float32)
    names = [str(n) for n, _ in t.mask_tasks]
    if bad := [n for n in names if n not in MASK_TASKS]:
        raise ValueError(f"train.mask_tasks: unknown task(s) {bad}; expected {MASK_TASKS}")
    probs = jnp.array([float(p) for _, p in t.mask_tasks], jnp.float32)
    k_task, k_len = jax.random.split(key)
    task = jax.random.categorical(k_task, jnp.log(probs), shape=(batch,))[:, None]
    length = jax.random.randint(k_len, (batch, 1), 1, max(frames // 2, 1) + 1)
    is_task = lambda n: (task == names.index(n)) if n in names else jnp.zeros_like(task, bool)  # noqa: E731
    known |= is_task("i2v") & (f == 0)
    known |= is_task("first_last") & ((f == 0) | (f == frames - 1))
    known |= is_task("continuation") & (f < length)
    return known.astype(jnp.float32)


# the trainer's objectives (train.objective) and the prediction each trains the model to make
OBJECTIVES = {"flow": "flow", "v": "v", "ddpm": "epsilon"}


def objective_of(cfg: DiTConfig, t) -> str:
    """train.objective (default "flow"), checked against what the model is configured to predict."""
    objective = t.get("objective", "flow")
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective={objective!r}: expected one of {sorted(OBJECTIVES)}")
    prediction, learned_variance = families.family(cfg).prediction(cfg)
    if prediction != OBJECTIVES[objective] or (learned_variance and objective != "ddpm"):
        raise ValueError(f"train.objective={objective!r} trains a model with prediction={OBJECTIVES[objective]!r}"
                         f"{'' if objective == 'ddpm' else ' and no learned variance'}; this model has "
                         f"prediction={prediction!r}, learned_variance={learned_variance} "
                         f"(configs/wan.py:PRESET,objective={objective} sets both for the Wan DiT)")
    if objective == "ddpm" and t.shift != 1:
        raise ValueError(f"train.shift={t.shift}: the ddpm objective's linear-beta process has no shift; use 1")
    if objective != "flow" and t.loss_weighting != "none":
        raise ValueError(f"train.loss_weighting={t.loss_weighting!r} weights the flow objective by σ; the {objective} "
                         "objective has its own (uniform t, the loss as its reference computes it): use 'none'")
    return objective


def step_randomness(cfg: DiTConfig, t, batch: dict, key) -> dict:
    """What the step draws once per global batch: the noise level (σ; integer t for the VP objectives, and
    σ = t/1000 as the level condition dropout reads), ε, keep flags, known frames, motion latents."""
    from hallojax.conditioning import DropoutConfig, condition_dropout, motion_from_clip
    from hallojax.diffusion import sample_timesteps

    k_noise, k_drop, k_mask, k_motion = jax.random.split(key, 4)
    x0 = batch["latents"]
    if objective_of(cfg, t) == "flow":
        sigma, noise = sample_noise(k_noise, x0, shift=t.shift, mode=t.sigma_sampling)
        out = {"sigma": sigma, "noise": noise}
    else:
        k_t, k_eps = jax.random.split(k_noise)
        steps = sample_timesteps(k_t, x0.shape[0])
        out = {"timestep": steps, "sigma": steps.astype(jnp.float32) / 1000.0,
               "noise": jax.random.normal(k_eps, x0.shape, jnp.float32)}
    keep = condition_dropout(k_drop, out["sigma"], DropoutConfig(**t.dropout))
    out.update({f"keep_{k}": v for k, v in keep.items()})
    motion = cfg.motion_frames if isinstance(cfg, DiTConfig) else 0
    out["known"] = known_frames(k_mask, t, x0.shape[0], x0.shape[1], motion)
    if motion:
        out["motion"] = motion_from_clip(k_motion, x0, motion)
    return {**out, **families.family(cfg).randomness(cfg, t, batch, key)}


def flow_loss(model, cfg: DiTConfig, t, b: dict) -> jax.Array:
    """Velocity loss of one (micro)batch with its drawn randomness (see `step_randomness`)."""
    from hallojax.flow import interpolate, loss_weight, masked_mse

    x0 = b["latents"].astype(jnp.float32)
    v = families.family(cfg).predict(model, cfg, b, interpolate(x0, b["noise"], b["sigma"]), 1000.0 * b["sigma"])
    return masked_mse(v, b["noise"] - x0, 1.0 - b["known"], loss_weight(b["sigma"], t.loss_weighting))


def vp_loss(model, cfg: DiTConfig, t, b: dict) -> jax.Array:
    """The v (CogVideoX / Hallo3) or ddpm (LetsTalk) objective's loss of one (micro)batch (hallojax.diffusion):
    the model sees x_t = √ᾱ·x0 + √(1 − ᾱ)·ε at its integer t; the loss covers the generated frames."""
    from hallojax import diffusion

    objective = objective_of(cfg, t)
    tables = diffusion.training_tables(diffusion.OBJECTIVE_PROCESS[objective], t.shift)
    x0, steps = b["latents"].astype(jnp.float32), b["timestep"]
    x_t = diffusion.noised(tables, x0, b["noise"], steps)
    out = families.family(cfg).predict(model, cfg, b, x_t, steps.astype(jnp.float32))
    loss = diffusion.v_loss if objective == "v" else diffusion.ddpm_loss
    return loss(tables, out, x0, b["noise"], steps, 1.0 - b["known"])


def objective_loss(model, cfg: DiTConfig, t, b: dict) -> jax.Array:
    """The loss of train.objective: flow matching, v-prediction or the DDPM hybrid."""
    return flow_loss(model, cfg, t, b) if objective_of(cfg, t) == "flow" else vp_loss(model, cfg, t, b)


NONFINITE = ("skip", "stop")


class NonFiniteStep(RuntimeError):
    """train.nonfinite = "stop" and a step's loss or gradient was not finite."""


def make_train_step(graphdef, cfg: DiTConfig, t, seed: int):
    """(state, batch) -> (state, metrics). The randomness is drawn once for the global batch from
    fold_in(seed, step), then the batch is split into `accum_steps` equal microbatches whose gradients
    are averaged: the same loss as one batch, in less memory."""
    check_channels(cfg)
    objective_of(cfg, t)
    if t.nonfinite not in NONFINITE:
        raise ValueError(f"train.nonfinite={t.nonfinite!r}: expected one of {NONFINITE}")
    inject = [int(s) for s in t.get("inject_nonfinite", [])]

    def loss_fn(trainable, frozen, buffers, micro):
        model = nnx.merge(graphdef, combine(trainable, frozen), *([buffers] if buffers else []))
        return objective_loss(model, cfg, t, micro)

    def step(state, batch):
        k = t.accum_steps
        key = jax.random.fold_in(jax.random.key(seed), state["step"])  # traced: no eager device work
        batch = {**batch, **step_randomness(cfg, t, batch, key)}
        micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)
        # gradients of the trainable parameters only (frozen ones: no backward pass through what only they feed)
        trainable, frozen = partition(state["params"], trainable_mask(state["params"], t.trainable))

        def accumulate(carry, mb):
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, state.get("buffers"), mb)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
        (loss, grads), _ = jax.lax.scan(accumulate, zero, micro)
        loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
        grads = combine(grads, jax.tree.map(jnp.zeros_like, frozen))  # the optimizer leaves frozen ones as they are
        if inject:  # fault injection: this step's loss and gradients become NaN
            poison = jnp.where(jnp.isin(state["step"], jnp.asarray(inject)), jnp.nan, 1.0)
            loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # one scalar: the norm is NaN/inf if any leaf is
        tx = make_optimizer(t, state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: t.ema_decay * e + (1.0 - t.ema_decay) * p, state["ema"], params)
        # a non-finite step changes nothing but the step counter (the data moves on): selected in the update's
        # own pass over the parameters, and reported through the metrics the loop reads anyway (no extra sync)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state, ema = (keep(params, state["params"]), keep(opt_state, state["opt_state"]),
                                  keep(ema, state["ema"]))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate_schedule(t)(state["step"]),
                   "nonfinite": (~finite).astype(jnp.int32)}
        return {**state, "params": params, "opt_state": opt_state, "ema": ema, "step": state["step"] + 1}, metrics

    return step


# --- checkpoints ---------------------------------------------------------------------------------
def checkpoint_manager(workdir: Path, ckpt) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=ckpt.keep, keep_period=ckpt.keep_every or None,
                                           enable_async_checkpointing=ckpt.async_save, create=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def save(manager, state, data_iter, config) -> None:
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iter.get_state()),
        config=ocp.args.JsonSave(json.loads(config.to_json()))))


def restore(manager, abstract, shardings, data_iter, batch_size: int):
    """The latest checkpoint onto this run's mesh (any process count) and its data position."""
    step = manager.latest_step()
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    position = restored["data"]
    if "position" not in position:  # an older checkpoint: a per-process iterator state, not a global position
        log.warning("checkpoint %d holds no global data position (%s): continuing at step x batch size", step,
                    position)
        position = {"position": step * batch_size}
    data_iter.set_state(position)
    return restored["state"], step


# --- multi-host ----------------------------------------------------------------------------------
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize` from flags, else from HALLOJAX_COORDINATOR / HALLOJAX_NUM_PROCESSES /
    HALLOJAX_PROCESS_ID, else auto-detected on TPU VMs and under SLURM; single-process otherwise.
    CPU-only hosts use gloo collectives."""
    import os

    coordinator = coordinator or os.environ.get("HALLOJAX_COORDINATOR")
    if num_processes is None and "HALLOJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["HALLOJAX_NUM_PROCESSES"])
    if process_id is None and "HALLOJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["HALLOJAX_PROCESS_ID"])
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if not all(v is not None for v in explicit):
            raise ValueError("multi-host needs all of coordinator, num_processes and process_id "
                             f"(got {dict(zip(('coordinator', 'num_processes', 'process_id'), explicit))})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif "SLURM_JOB_ID" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()  # cluster auto-detection
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


# --- loop ----------------------------------------------------------------------------------------
class _Preempted:
    """SIGTERM (preemption) -> save at the next step boundary and exit 0."""

    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.flag = True

    def close(self):
        signal.signal(signal.SIGTERM, self._old)


def run(config, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    t, ckpt = config.train, config.checkpoint
    families.model_config(config.model)  # a bad model, mesh or batch is refused before any data is prepared
    rules = normalize_rules(config.rules)
    mesh = make_mesh(dict(config.mesh))
    if t.batch_size % t.accum_steps:
        raise ValueError(f"train.batch_size={t.batch_size} must divide by train.accum_steps={t.accum_steps}")
    data.configure(config)  # the source; with a prepared set, the model's input sizes from its manifest
    cfg = families.model_config(config.model)

    graphdef, state, shardings, abstract = create_state(cfg, t, config.seed, mesh, rules)
    log.info("model %s: %s parameters; mesh %s; workdir %s", config.preset,
             f"{param_count(state['params']):,}", dict(mesh.shape), workdir)
    # this process loads only the rows of every global batch its devices hold: the global batch at a step
    # is the same whatever the number of processes (see hallojax.data)
    rows = data.local_rows(mesh, rules, t.batch_size)
    data_iter = families.make_source(config, cfg, rows)
    manager = checkpoint_manager(workdir, ckpt)
    start = 0
    if manager.latest_step() is not None:
        state, start = restore(manager, abstract, shardings, data_iter, t.batch_size)
        log.info("resumed from step %d%s", start, " (train.init_from applies to a fresh run only)"
                 if t.get("init_from") else "")
    elif t.get("init_from"):
        state = initialize_from(state, t.init_from, cfg, mesh, rules, t.get("init_weights", "auto"))

    step_fn = jit_train_step(graphdef, cfg, t, config.seed, shardings)
    kind = jax.devices()[0].device_kind
    writer = MetricWriter(workdir / "tensorboard" if jax.process_index() == 0 else None)
    timer = StepTimer()
    flops_per_step = tokens_per_step = None
    preempted = _Preempted()
    history = []
    skipped = []  # steps whose update was skipped (non-finite loss or gradient)
    try:
        with jax.set_mesh(mesh), use_rules(rules):
            while int(jax.device_get(state["step"])) < t.steps:
                batch = data.global_batch(next(data_iter), rows, mesh, rules, t.batch_size)
                if tokens_per_step is None:
                    f, h, w = batch["latents"].shape[1:4]
                    tokens_per_step = t.batch_size * families.family(cfg).tokens(cfg, f, h, w)
                    flops_per_step = families.train_flops(cfg, batch=t.batch_size, frames=f, height=h, width=w,
                                                          text_len=batch["context"].shape[1] if "context" in batch
                                                          else 0)
                    log.info("%s model FLOPs per step (%s tokens); device %s, peak %s", format_flops(flops_per_step),
                             f"{tokens_per_step:,}", kind,
                             f"{device_peak(kind) / 1e12:.0f} TFLOP/s" if device_peak(kind) else "unknown (no MFU)")
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                timer.add(time.perf_counter() - t0)
                step = int(jax.device_get(state["step"]))
                if metrics.pop("nonfinite"):
                    if t.nonfinite == "stop":
                        raise NonFiniteStep(
                            f"step {step - 1}: the loss ({metrics['loss']}) or the gradient norm "
                            f"({metrics['grad_norm']}) is not finite; stopped (train.nonfinite='stop'). Nothing of "
                            f"this step was saved: the last checkpoint is step {manager.latest_step()}")
                    skipped.append(step - 1)
                    log.warning("step %d: non-finite loss (%s) or gradient norm (%s): update skipped (parameters, "
                                "optimizer state and EMA unchanged; %d skipped so far)", step - 1, metrics["loss"],
                                metrics["grad_norm"], len(skipped))
                metrics["skipped_steps"] = float(len(skipped))
                history.append(metrics["loss"])
                if len(history) == 1:
                    log.info("first step (compilation included): %.1f s", timer.compile_seconds)
                if step % t.log_every == 0 or step == t.steps:
                    dt = timer.interval_mean()
                    if dt is not None:
                        metrics.update(step_time=dt, tokens_per_s=tokens_per_step / dt,
                                       tflops_per_device=flops_per_step / dt / jax.device_count() / 1e12,
                                       mfu=mfu(flops_per_step, dt, jax.device_count(), kind))
                    log.info(progress_line(step, t.steps, metrics))
                    writer.scalars(step, metrics)
                if step % ckpt.every == 0 or step == t.steps or preempted.flag:
                    save(manager, state, data_iter, config)
                if preempted.flag:
                    log.info("SIGTERM: saved step %d, exiting", step)
                    break
        manager.wait_until_finished()
    finally:
        writer.close()
        preempted.close()
        manager.close()
    step = int(jax.device_get(state["step"]))
    log.info("ran %d steps, from step %d to step %d%s", len(history), start, step,
             f"; {len(skipped)} non-finite steps skipped ({skipped})" if skipped else "")
    return {"state": state, "losses": history, "step": step, "start_step": start, "steps_run": len(history),
            "preempted": preempted.flag, "skipped": skipped}

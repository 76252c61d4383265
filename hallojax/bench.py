"""Benchmarks that print their figures and the command that produced them (never timed tests).

    hallojax bench sample [--config configs/wan.py:tiny] [--frames 3 --height 8 --width 8 --text-len 16]
                          [--sampler unipc --steps 10 --shift 3 --guidance text=5 --repeats 2] [--no-torch]

One clip's whole denoising loop as `hallojax generate` runs it (one jitted program, every guidance branch
of a step in one batched model call) beside diffusers' eager loop (WanTransformer3DModel + the same
scheduler, steps and guidance passes, one call per branch as WanPipeline does): seconds per clip,
denoise steps/s and the ratio.

    hallojax bench vae [--height 480 --width 832 --frames 17 --batch 1 --dtype bfloat16 --tile 0] [--vae DIR]

Random weights at the published Wan2.1 VAE size (throughput does not depend on the values), or the VAE
of a `hallojax convert wan-vae` directory (`--vae DIR`, its own architecture); reports
encode and decode frames/s after one warm-up call, and peak memory: the device's own counter where
it has one (GPU/TPU), otherwise XLA's compiled estimate (arguments + outputs + temporaries).

    hallojax bench train [--config configs/wan.py:tiny] [--batch N --frames 3 --height 8 --width 8
                         --text-len 16 --steps 5 --warmup 2] [--no-torch] [--config.key=value ...]

One flow-matching training step of the DiT (`hallojax.train`'s step: AdamW, clipping, EMA) on the
config's mesh over the devices present, on a random batch of latent-grid shape [batch, frames, height,
width] with `text_len` text tokens: compile time, median step time, video tokens/s, model TFLOP/s per
device (`hallojax.flops.train_flops`), MFU where the device's peak is known, and peak memory. Beside it,
when torch and diffusers import, the same step in eager PyTorch on diffusers' `WanTransformer3DModel`
of the same sizes (plain T2V/I2V configs only). The defaults fit a CPU on the `tiny` preset; the real
measurement is on accelerators, e.g.

    hallojax bench train --config configs/wan.py:wan2.1-t2v-1.3b --batch 8 --frames 21 --height 60 \
        --width 104 --text-len 512
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from hallojax.aot import check_step_shape as _check_shape  # shared with `hallojax compile`
from hallojax.usage import ArgumentParser, UsageError


def _timed(fn, *args, repeats: int):
    out = jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t0) / repeats


def _xla_bytes(fn, *args) -> int:
    m = fn.lower(*args).compile().memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_vae(argv) -> dict:
    from hallojax.models.wan_vae import VAEConfig, WanVAE

    p = ArgumentParser(prog="hallojax bench vae")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=17, help="1 + 4k video frames")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tile", type=int, default=0, help="spatial decode tile in pixels (0: untiled)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vae", default=None, help="a `hallojax convert wan-vae` directory (default: random weights "
                   "at the published size)")
    args = p.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) < 8 or getattr(args, name) % 8:
            raise ValueError(f"--{name} {getattr(args, name)}: must be a positive multiple of 8 (the VAE's stride)")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise ValueError(f"--frames {args.frames}: must be 1 + 4k (the VAE's temporal stride is 4)")
    for name, low in (("batch", 1), ("repeats", 1), ("tile", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} {getattr(args, name)}: must be an integer >= {low}")

    if args.vae:
        from hallojax.checkpoint import load_pretrained

        vae, _ = load_pretrained(args.vae, dtype=args.dtype)
        if not isinstance(vae, WanVAE):
            raise ValueError(f"--vae {args.vae}: holds a {type(vae).__name__}, not a Wan VAE")
    else:
        vae = WanVAE(VAEConfig(dtype=args.dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    video = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.frames, args.height, args.width, 3))
    video = video.astype(np.float32)

    encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v))
    tile = args.tile or None
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, tile=tile))
    latents, t_enc = _timed(encode, state, video, repeats=args.repeats)
    _, t_dec = _timed(decode, state, latents, repeats=args.repeats)
    frames = args.batch * args.frames
    dev = jax.devices()[0]
    result = {
        "device": f"{jax.device_count()} x {dev.device_kind}",
        "encode_frames_per_s": frames / t_enc, "decode_frames_per_s": frames / t_dec,
        "encode_xla_bytes": _xla_bytes(encode, state, video), "decode_xla_bytes": _xla_bytes(decode, state, latents),
        "device_peak_bytes": _peak(dev),
    }
    print(f"command: hallojax bench vae {shlex.join(argv)}")
    print(f"device: {result['device']}; video {args.batch}x{args.frames}x{args.height}x{args.width}, "
          f"latents {tuple(latents.shape)}, {args.dtype}, tile {tile}")
    print(f"encode: {result['encode_frames_per_s']:.2f} frames/s ({t_enc:.2f} s/call), "
          f"XLA memory {result['encode_xla_bytes'] / 2**30:.2f} GiB")
    print(f"decode: {result['decode_frames_per_s']:.2f} frames/s ({t_dec:.2f} s/call), "
          f"XLA memory {result['decode_xla_bytes'] / 2**30:.2f} GiB")
    if result["device_peak_bytes"] is not None:
        print(f"device peak memory: {result['device_peak_bytes'] / 2**30:.2f} GiB")
    return result


# --- bench train ---------------------------------------------------------------------------------
# mechanisms that diffusers' WanTransformer3DModel does not have: with any of them on there is no PyTorch row
STYLE_FIELDS = ("identity_tokens", "identity_additive", "reference_net", "symbiotic", "motion_frames", "audio")


def torch_skip_reason(cfg) -> str | None:
    """Why the diffusers/PyTorch side cannot run this model config, or None (plain T2V/I2V Wan)."""
    on = [f"model.{f}={getattr(cfg, f)!r}" for f in STYLE_FIELDS if getattr(cfg, f) not in (False, 0, "none")]
    if on:
        return (f"PyTorch side skipped: diffusers has no such model ({', '.join(on)}; "
                "WanTransformer3DModel is plain T2V/I2V Wan)")
    return None


def diffusers_kwargs(cfg) -> dict:
    """WanTransformer3DModel(**kwargs) of the same sizes as our DiTConfig."""
    return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps, image_dim=cfg.image_dim,
                added_kv_proj_dim=cfg.added_kv_proj_dim, rope_max_seq_len=cfg.rope_max_seq_len,
                pos_embed_seq_len=cfg.pos_embed_seq_len)


def bench_mesh(mesh_config):
    """The config's mesh; a mesh of fixed sizes (no -1 axis) needing fewer devices than present takes the
    first ones (mesh=single: one device)."""
    from hallojax.sharding import make_mesh

    shape = {k: int(v) for k, v in dict(mesh_config).items()}
    devices = jax.devices()
    if -1 not in shape.values() and math.prod(shape.values()) < len(devices):
        devices = devices[:math.prod(shape.values())]
    return make_mesh(shape, devices)


def print_table(lines) -> None:
    """Rows of strings (the first the header) as a markdown table with aligned columns."""
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    print(fmt(lines[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in lines[1:]:
        print(fmt(row))


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _command_line(argv, bench: str = "train") -> str:
    """The command as typed (sys.argv, with the environment variables that decide the devices)."""
    tail = ["bench", bench, *argv]
    if sys.argv[1:] == tail:
        prog = os.path.basename(sys.argv[0])
        words = ["python", "-m", "hallojax.cli"] if prog in ("cli.py", "__main__.py") else [prog]
        words += sys.argv[1:]
    else:  # hallojax.cli.main([...]) from Python
        words = ["hallojax", *tail]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")
           if os.environ.get(k)]
    return " ".join(env + [shlex.join(words)])


def _run_ours(cfg, config, mesh, rules, np_batch, steps: int, warmup: int) -> dict:
    from hallojax.models.wan import param_count
    from hallojax.sharding import batch_sharding, use_rules
    from hallojax.train import create_state, jit_train_step

    t = config.train
    graphdef, state, shardings, _ = create_state(cfg, t, config.seed, mesh, rules)
    out = {"params": param_count(state["params"])}
    with jax.set_mesh(mesh), use_rules(rules):
        batch = {k: jax.device_put(v, batch_sharding(mesh, v.shape, rules)) for k, v in np_batch.items()}
        jax.block_until_ready((state, batch))
        t0 = time.perf_counter()
        compiled = jit_train_step(graphdef, cfg, t, config.seed, shardings).lower(state, batch).compile()
        out["compile_s"] = time.perf_counter() - t0
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    memory = compiled.memory_analysis()
    out["xla_bytes"] = None if memory is None else int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)
    peaks = [p for p in (_peak(d) for d in mesh.devices.flat) if p is not None]
    out.update(step_times=times, step_s=statistics.median(times), loss=float(metrics["loss"]),
               peak_bytes=max(peaks) if peaks else None)
    return out


def _torch_wan(cfg, seed: int, device: str):
    """(diffusers' WanTransformer3DModel of our config's sizes on `device`, the torch device, the autocast
    dtype on CUDA or None), with torch's threads and seed set."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    dev = torch.device(device)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype) if device == "cuda" else None
    return WanTransformer3DModel(**diffusers_kwargs(cfg)).to(dev), dev, amp


def _run_torch(cfg, t, np_batch, steps: int, warmup: int, seed: int, device: str) -> dict:
    """Our training step in eager PyTorch on diffusers' WanTransformer3DModel: flow-matching MSE to ε − x0 at
    σ drawn as ours draws it, global-norm clipping, AdamW with our hyper-parameters and the EMA update."""
    import diffusers
    import torch

    model, device, amp = _torch_wan(cfg, seed, device)
    cuda = device.type == "cuda"
    model = model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
    ema = [p.detach().clone() for p in params]

    x0 = torch.from_numpy(np_batch["latents"].transpose(0, 4, 1, 2, 3).copy()).to(device)  # [B, C, F, H, W]
    context = torch.from_numpy(np_batch["context"]).to(device)
    image = None
    if cfg.image_dim is not None:
        image = torch.from_numpy(np_batch["image_context"]).to(device)
        if cfg.pos_embed_seq_len is not None:  # FLF2V: diffusers takes the two frames' tokens as 2B rows
            image = image.reshape(2 * image.shape[0], image.shape[1] // 2, image.shape[2])
    masked = cfg.in_channels == 2 * cfg.out_channels + 4
    b = x0.shape[0]

    def step():
        if t.sigma_sampling == "uniform":
            sigma = torch.rand(b, device=device)
        else:
            sigma = torch.sigmoid(torch.randn(b, device=device))
        sigma = t.shift * sigma / (1.0 + (t.shift - 1.0) * sigma)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_in = (1.0 - s) * x0 + s * noise
        if masked:  # [noisy, latent mask (4), masked latent]: no known frames (the same work)
            x_in = torch.cat([x_in, torch.zeros_like(x_in[:, :4]), torch.zeros_like(x0)], dim=1)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            v = model(x_in, 1000.0 * sigma, context, encoder_hidden_states_image=image, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - t.ema_decay)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize(device)
        loss = float(loss.detach())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return dict(name=f"diffusers {diffusers.__version__} (torch {torch.__version__})",
                device=torch.cuda.get_device_name(device) if cuda else "cpu",
                dtype=str(amp or torch.float32).removeprefix("torch."), threads=torch.get_num_threads(),
                params=sum(p.numel() for p in params), step_times=times, step_s=statistics.median(times), loss=loss,
                peak_bytes=torch.cuda.max_memory_allocated(device) if cuda else None)


def _torch_import_error() -> str | None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        from diffusers import WanTransformer3DModel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import means no PyTorch row
        return f"PyTorch side skipped: torch/diffusers do not import ({type(e).__name__}: {e})"
    return None


def bench_train(config, *, batch: int | None = None, frames: int = 3, height: int = 8, width: int = 8,
                text_len: int = 16, image_len: int | None = None, steps: int = 5, warmup: int = 2,
                torch: bool = True, command: str | None = None, overrides=()) -> dict:
    """Time our training step (and diffusers' in PyTorch beside it) and print the figures; see the module
    docstring. `config`: a loaded ConfigDict or a spec for `load_config` (with `overrides`). Returns the
    figures: step_s (median), tokens_per_s, flops_per_step, tflops_per_device, mfu, ..., and under
    "torch" diffusers' row (None with the reason in "torch_skipped"), "ratio" = its step time / ours.
    On a GPU, start Python with XLA_PYTHON_CLIENT_PREALLOCATE=false (the CLI does) so both sides fit."""
    from hallojax.config import load_config
    from hallojax.models.wan import DiTConfig
    from hallojax.flops import format_flops, mfu, train_flops
    from hallojax.sharding import normalize_rules
    from hallojax.train import check_channels, example_batch

    spec = config if isinstance(config, str) else None
    if spec is not None:
        config = load_config(spec, overrides)
    cfg = DiTConfig.from_dict(config.model)
    check_channels(cfg)
    t = config.train
    rules = normalize_rules(config.rules)
    mesh = bench_mesh(config.mesh)
    n_dev = mesh.size
    kind = mesh.devices.flat[0].device_kind
    batch_axes = [a for a in rules.get("act_batch", ()) if mesh.shape[a] > 1]
    split = math.prod(mesh.shape[a] for a in batch_axes) * t.accum_steps
    if batch is None:  # the device count, rounded up to what the batch axes (x microbatches) split evenly
        batch = -(-n_dev // split) * split
    if image_len is None:
        image_len = cfg.pos_embed_seq_len or 257
    _check_shape(cfg, batch=batch, frames=frames, height=height, width=width, text_len=text_len,
                 image_len=image_len, steps=steps, warmup=warmup)
    if batch % split:
        raise ValueError(f"--batch {batch}: must be a multiple of {split}, the devices of the mesh's batch axes "
                         f"{batch_axes} (mesh {dict(mesh.shape)}) x train.accum_steps={t.accum_steps}")

    shape = dict(batch=batch, frames=frames, height=height, width=width, text_len=text_len)
    if cfg.image_dim is not None:
        shape["image_len"] = image_len
    flops = train_flops(cfg, **shape)
    tokens = batch * frames * height * width // cfg.patch_volume
    np_batch = example_batch(cfg, batch, frames, height, width, text_len=text_len, image_len=image_len,
                             seed=config.seed)

    if command is None:
        args = ", ".join(f"{k}={v!r}" for k, v in dict(shape, steps=steps, warmup=warmup, torch=torch).items())
        command = f"python: hallojax.bench.bench_train({spec or config.get('preset', '<config>')!r}, {args})"
    print(f"command: {command}")
    print(f"devices: {n_dev} x {kind} (of {jax.device_count()} {jax.default_backend()}); mesh {dict(mesh.shape)} "
          f"({config.get('mesh_preset', 'custom')}); dtype {cfg.dtype}, params {cfg.param_dtype}; remat {cfg.remat}, "
          f"attention {cfg.attention}; jax {jax.__version__}")
    latent = [batch, frames, height, width, cfg.out_channels]
    print(f"model {config.get('preset', '?')}: latents {latent}, text {[batch, text_len, cfg.text_dim]}"
          + (f", image {[batch, image_len, cfg.image_dim]}" if cfg.image_dim is not None else "")
          + f"; {tokens:,} video tokens/step; {format_flops(flops)}/step (train_flops); "
          f"{warmup} warm-up + {steps} timed steps, median")

    skipped = "PyTorch side skipped: --no-torch" if not torch else None
    skipped = skipped or torch_skip_reason(cfg) or _torch_import_error()
    device = None
    if skipped is None:
        device, skipped = _torch_device(mesh.devices.flat[0].platform)
    theirs = None

    def run_torch():
        try:
            return _run_torch(cfg, t, np_batch, steps, warmup, config.seed, device), None
        except RuntimeError as e:  # e.g. out of memory: the row says so, our figures stand
            return None, f"PyTorch side failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        finally:  # the model and optimizer went with _run_torch's frame: hand their memory back
            if device == "cuda":
                import torch as _torch

                _torch.cuda.empty_cache()

    # on a GPU, PyTorch runs first and empties its cache, so that JAX (not preallocating: see the CLI) has
    # the memory after it; on CPU ours runs first (no torch worker threads spinning beside XLA's)
    if device == "cuda":
        theirs, skipped = run_torch()
    ours = _run_ours(cfg, config, mesh, rules, np_batch, steps, warmup)
    if device == "cpu":
        theirs, skipped = run_torch()

    result = dict(command=command, preset=config.get("preset"), n_devices=n_dev, device_kind=kind,
                  mesh=dict(mesh.shape), dtype=cfg.dtype, shape=shape, steps=steps, warmup=warmup,
                  tokens_per_step=tokens, flops_per_step=flops, **ours)
    result["tokens_per_s"] = tokens / ours["step_s"]
    result["tflops_per_device"] = flops / ours["step_s"] / n_dev / 1e12
    result["mfu"] = mfu(flops, ours["step_s"], n_dev, kind)
    result["torch"], result["torch_skipped"], result["ratio"] = theirs, skipped, None
    if theirs is not None:
        theirs["tokens_per_s"] = tokens / theirs["step_s"]
        theirs["tflops_per_device"] = flops / theirs["step_s"] / 1e12
        theirs["mfu"] = mfu(flops, theirs["step_s"], 1, theirs["device"])
        result["ratio"] = theirs["step_s"] / ours["step_s"]

    print(f"compile: {ours['compile_s']:.2f} s (lower + compile); parameters {ours['params']:,}; XLA memory "
          f"estimate {_gib(ours['xla_bytes'])}/device; final loss {ours['loss']:.4f}")

    def mfu_text(value, device):
        return f"{100 * value:.1f} %" if value is not None else f"n/a (no peak for {device})"

    rows = [("hallojax (JAX)", f"{n_dev} x {kind}, {cfg.dtype}", ours, result, kind,
             f"{ours['compile_s']:.2f}")]
    if theirs is not None:
        where = f"{theirs['device']}, {theirs['dtype']}" + ("" if theirs["peak_bytes"] is not None
                                                             else f", {theirs['threads']} threads")
        rows.append((theirs["name"], where, theirs, theirs, theirs["device"], "eager"))
    header = ("implementation", "devices, dtype", "step ms (median)", "tokens/s", "TFLOP/s/device", "MFU",
              "peak memory", "compile s")
    lines = [header] + [(name, where, f"{run['step_s'] * 1e3:.1f}", f"{fig['tokens_per_s']:,.0f}",
                         f"{fig['tflops_per_device']:.4f}", mfu_text(fig["mfu"], device),
                         _gib(run["peak_bytes"]) if run["peak_bytes"] is not None else "n/a (not reported)", comp)
                        for name, where, run, fig, device, comp in rows]
    print_table(lines)
    if theirs is not None:
        print(f"ratio: diffusers step time / ours = {result['ratio']:.2f} (>1: hallojax is faster); "
              f"diffusers parameters {theirs['params']:,}, final loss {theirs['loss']:.4f}")
        if theirs["dtype"] != cfg.dtype:
            print(f"note: PyTorch runs {theirs['dtype']} on {theirs['device']}, ours {cfg.dtype}")
    else:
        print(skipped)
    return result


def _torch_device(platform: str) -> tuple[str | None, str | None]:
    """PyTorch's device for JAX's platform (CPU beside CPU, CUDA beside GPU), or None and the reason."""
    import torch

    if platform == "cpu":
        return "cpu", None
    if platform == "gpu" and torch.cuda.is_available():
        return "cuda", None
    return None, f"PyTorch side skipped: no PyTorch device beside JAX's {platform} (CUDA available: " \
                 f"{torch.cuda.is_available()}); pass --no-torch to silence"


def bench_train_cli(argv) -> dict:
    from hallojax.config import load_config

    p = ArgumentParser(prog="hallojax bench train", allow_abbrev=False,
                       description="Training-step throughput of the DiT (and diffusers' beside it). "
                       "Sizes are latent-grid sizes; extra --config.key=value overrides apply.")
    p.add_argument("--config", default="configs/wan.py:tiny", help="FILE.py[:ARG], or a preset name")
    p.add_argument("--batch", type=int, default=None,
                   help="default: the mesh's device count (a multiple of its batch axes)")
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=8, help="latent height")
    p.add_argument("--width", type=int, default=8, help="latent width")
    p.add_argument("--text-len", type=int, default=16, help="text tokens (Wan: 512)")
    p.add_argument("--image-len", type=int, default=None, help="I2V image tokens (default 257)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="also time diffusers' WanTransformer3DModel in PyTorch (when importable)")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    if len(overrides) != len(rest):
        p.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")
    command = _command_line(argv)
    if args.torch:  # JAX grows its GPU memory as needed, leaving room for PyTorch's side
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    config = load_config(args.config, overrides)
    return bench_train(config, batch=args.batch, frames=args.frames, height=args.height, width=args.width,
                       text_len=args.text_len, image_len=args.image_len, steps=args.steps, warmup=args.warmup,
                       torch=args.torch, command=command)


# --- bench sample --------------------------------------------------------------------------------
def _run_ours_sample(cfg, config, mesh, rules, shape, sampler_name, steps, shift, guidance, repeats) -> dict:
    from hallojax.models.wan import WanDiT, param_count
    from hallojax.data import sample_inputs
    from hallojax.pipeline import SamplingEngine
    from hallojax.sample import flow_schedule, get_sampler, parse_guidance, schedule_arrays
    from hallojax.sharding import create_sharded

    frames, height, width, text_len = shape
    model = create_sharded(lambda: WanDiT(cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
    engine = SamplingEngine(model, mesh, rules)
    g = parse_guidance(guidance)
    sampler = get_sampler(sampler_name)
    arrays = schedule_arrays(sampler, flow_schedule(sampler_name, steps, shift))
    weights = jax.numpy.asarray(g.weights(steps), jax.numpy.float32)
    full, null, reference = sample_inputs(cfg, frames, height, width, text_len, config.seed)
    if cfg.reference_net:
        with engine.on_mesh():
            full["reference_cache"], null["reference_cache"] = engine.reference_caches(reference, True)
    lat_shape = (1, frames, height, width, cfg.out_channels)
    x = np.random.default_rng(config.seed).standard_normal(lat_shape).astype(np.float32)
    known = (np.zeros(lat_shape, np.float32), np.zeros((1, frames, 1, 1, 1), bool), np.zeros(lat_shape, np.float32))
    fn = engine.program("clip", sampler, g, steps, progress=False)
    args = (engine.state, x, full, null, known, arrays, weights)
    compiled, compile_s = engine.compile(fn, *args)
    engine.run(compiled, args, steps=steps, desc="", progress=False)  # warm-up
    times = [engine.run(compiled, args, steps=steps, desc="", progress=False)[1] for _ in range(repeats)]
    memory = compiled.memory_analysis()
    return dict(params=param_count(model), compile_s=compile_s, clip_s=statistics.median(times),
                branches=max(len(live) for _, _, live in g.phases(steps)), guidance=g,
                xla_bytes=None if memory is None else int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                                          + memory.temp_size_in_bytes),
                peak_bytes=max([p for p in (_peak(d) for d in mesh.devices.flat) if p is not None], default=None))


def diffusers_scheduler(name: str, shift: float):
    """diffusers' scheduler for our sampler `name` (the configuration our schedules reproduce)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if name == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def _run_torch_sample(cfg, shape, sampler_name, steps, shift, guidance, repeats, seed, device) -> dict:
    """The Wan pipeline's denoising loop in eager PyTorch: diffusers' transformer and scheduler, one
    transformer call per guidance branch per step (WanPipeline calls cond and uncond separately),
    combined with the same weights, then `scheduler.step`."""
    import diffusers
    import torch

    model, dev, amp = _torch_wan(cfg, seed, device)
    cuda = dev.type == "cuda"
    model = model.eval()
    if amp is not None:
        model = model.to(amp)
    frames, height, width, text_len = shape
    rng = np.random.default_rng(seed)
    x0 = torch.from_numpy(rng.standard_normal((1, cfg.out_channels, frames, height, width)).astype(np.float32)).to(dev)
    ctx = torch.from_numpy(rng.standard_normal((1, text_len, cfg.text_dim)).astype(np.float32)).to(dev)
    null = torch.zeros_like(ctx)
    weights = guidance.weights(steps)
    drops = guidance.branches()
    dtype = amp or torch.float32

    def clip():
        sched = diffusers_scheduler(sampler_name, shift)
        sched.set_timesteps(steps, device=dev)
        x = x0.clone()
        for i, t in enumerate(sched.timesteps):
            out = 0
            for b in np.flatnonzero(weights[i]):
                c = null if "text" in drops[b] else ctx
                v = model(x.to(dtype), t.expand(1), c.to(dtype), return_dict=False)[0].float()
                out = out + float(weights[i, b]) * v
            x = sched.step(out, t, x, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize(dev)
        return x

    with torch.no_grad():
        clip()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            clip()
            times.append(time.perf_counter() - t0)
    return dict(name=f"diffusers {diffusers.__version__} (torch {torch.__version__})",
                device=torch.cuda.get_device_name(dev) if cuda else "cpu",
                dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                clip_s=statistics.median(times), peak_bytes=torch.cuda.max_memory_allocated(dev) if cuda else None)


def bench_sample(config, *, frames: int = 3, height: int = 8, width: int = 8, text_len: int = 16,
                 sampler: str = "unipc", steps: int = 10, shift: float = 3.0, guidance: str = "text=5",
                 repeats: int = 2, torch: bool = True, command: str | None = None) -> dict:
    """Time one clip's whole denoising loop (our jitted program, every guidance branch of a step in one
    batched call) and diffusers' eager loop on the same transformer sizes, scheduler, steps and guidance
    passes; print denoise steps/s, seconds per clip and the ratio. Sizes are latent-grid sizes."""
    from hallojax.models.wan import DiTConfig
    from hallojax.sample import parse_guidance
    from hallojax.sample.solvers import SAMPLERS
    from hallojax.sharding import normalize_rules

    cfg = DiTConfig.from_dict(config.model)
    rules = normalize_rules(config.rules)
    mesh = bench_mesh(config.mesh)
    _check_shape(cfg, batch=1, frames=frames, height=height, width=width, text_len=text_len, image_len=257,
                 steps=steps, warmup=0)
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    if cfg.in_channels not in (cfg.out_channels, 2 * cfg.out_channels + 4) or cfg.image_dim is not None:
        raise ValueError("bench sample takes T2V / masked-input DiTs (no I2V image tokens)")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be >= 1")
    g = parse_guidance(guidance)
    available = {"text"} | ({"audio"} if cfg.audio != "none" else set()) | (
        {"ref"} if cfg.identity_tokens or cfg.identity_additive or cfg.symbiotic or cfg.reference_net else set())
    g.check(available)
    shape = (frames, height, width, text_len)
    tokens = frames * height * width // cfg.patch_volume
    n_dev = mesh.size
    kind = mesh.devices.flat[0].device_kind
    command = command or f"python: hallojax.bench.bench_sample({config.get('preset')!r}, ...)"
    print(f"command: {command}")
    print(f"devices: {n_dev} x {kind}; mesh {dict(mesh.shape)}; dtype {cfg.dtype}, params {cfg.param_dtype}; "
          f"attention {cfg.attention}; jax {jax.__version__}")
    print(f"model {config.get('preset', '?')}: latents {[1, frames, height, width, cfg.out_channels]}, text "
          f"{text_len} tokens; {tokens:,} video tokens; sampler {sampler}, {steps} steps, shift {shift:g}; "
          f"{g.describe(steps)}")
    skipped = "PyTorch side skipped: --no-torch" if not torch else None
    skipped = skipped or torch_skip_reason(cfg) or _torch_import_error()
    if skipped is None and cfg.in_channels != cfg.out_channels:
        skipped = "PyTorch side skipped: masked-input model (diffusers' loop would need the mask channels)"
    if skipped is None and not g.guided <= {"text"}:
        skipped = "PyTorch side skipped: diffusers' Wan has no audio/reference conditions to guide"
    device = None
    if skipped is None:
        device, skipped = _torch_device(mesh.devices.flat[0].platform)
    theirs = None
    if device == "cuda":
        theirs = _run_torch_sample(cfg, shape, sampler, steps, shift, g, repeats, config.seed, device)
    ours = _run_ours_sample(cfg, config, mesh, rules, shape, sampler, steps, shift, guidance, repeats)
    if device == "cpu":
        theirs = _run_torch_sample(cfg, shape, sampler, steps, shift, g, repeats, config.seed, device)
    result = dict(command=command, preset=config.get("preset"), n_devices=n_dev, device_kind=kind, steps=steps,
                  sampler=sampler, guidance=g.spec, shape=dict(frames=frames, height=height, width=width,
                                                               text_len=text_len),
                  clip_s=ours["clip_s"], steps_per_s=steps / ours["clip_s"], compile_s=ours["compile_s"],
                  branches=ours["branches"], params=ours["params"], torch=theirs, torch_skipped=skipped, ratio=None)
    rows = [("hallojax (JAX)", f"{n_dev} x {kind}, {cfg.dtype}", ours["clip_s"],
             f"{ours['branches']} branches in 1 call", _gib(ours["peak_bytes"] or ours["xla_bytes"]),
             f"{ours['compile_s']:.2f}")]
    if theirs is not None:
        result["ratio"] = theirs["clip_s"] / ours["clip_s"]
        rows.append((theirs["name"], f"{theirs['device']}, {theirs['dtype']}, {theirs['threads']} threads",
                     theirs["clip_s"], f"{ours['branches']} calls", _gib(theirs["peak_bytes"]), "eager"))
    header = ("implementation", "devices, dtype", "s per clip", "denoise steps/s", "model calls per step",
              "memory", "compile s")
    lines = [header] + [(n, w, f"{c:.3f}", f"{steps / c:.2f}", b, m, comp) for n, w, c, b, m, comp in rows]
    print_table(lines)
    if theirs is not None:
        print(f"ratio: diffusers seconds per clip / ours = {result['ratio']:.2f} (>1: hallojax is faster)")
    else:
        print(skipped)
    return result


def bench_sample_cli(argv) -> dict:
    from hallojax.config import load_config

    p = ArgumentParser(prog="hallojax bench sample", allow_abbrev=False,
                       description="One clip's denoising loop: ours beside diffusers'. Sizes are latent-grid "
                       "sizes; extra --config.key=value overrides apply.")
    p.add_argument("--config", default="configs/wan.py:tiny", help="FILE.py[:ARG], or a preset name")
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--height", type=int, default=8, help="latent height")
    p.add_argument("--width", type=int, default=8, help="latent width")
    p.add_argument("--text-len", type=int, default=16, help="text tokens (Wan: 512)")
    p.add_argument("--sampler", default="unipc", choices=["euler", "unipc", "dpm++"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--guidance", default="text=5", help="guidance spec (branches per step), e.g. none, text=5")
    p.add_argument("--repeats", type=int, default=2, help="timed clips after a warm-up clip")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    if len(overrides) != len(rest):
        p.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")
    command = _command_line(argv, "sample")
    if args.torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return bench_sample(load_config(args.config, overrides), frames=args.frames, height=args.height, width=args.width,
                        text_len=args.text_len, sampler=args.sampler, steps=args.steps, shift=args.shift,
                        guidance=args.guidance, repeats=args.repeats, torch=args.torch, command=command)


BENCHES = {"vae": bench_vae, "train": bench_train_cli, "sample": bench_sample_cli}


def main(argv) -> int:
    if not argv or argv[0] not in BENCHES:
        raise UsageError("hallojax bench", f"expected a benchmark: {' or '.join(BENCHES)}"
                         + (f", got {argv[0]!r}" if argv else "") + " (usage: hallojax bench NAME --help)")
    BENCHES[argv[0]](argv[1:])
    return 0

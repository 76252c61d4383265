"""Samplers against diffusers' schedulers, guidance arithmetic and long-video clip plans.

Parity: the σ grid and model time inputs equal diffusers' (FlowMatchEulerDiscrete, UniPCMultistep and
DPMSolverMultistep in flow mode) bit for bit for steps ∈ {5, 8, 25, 50} and shift ∈ {1, 3, 5}; with a
deterministic stand-in model written twice (torch, JAX) the final latents agree within 1e-5 relative (fp32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hallojax.sample import long_video
from hallojax.sample.guidance import PRESETS, parse_guidance
from hallojax.sample.schedules import flow_schedule
from hallojax.sample.solvers import Known, get_sampler, sample, schedule_arrays

STEPS = (5, 8, 25, 50)
SHIFTS = (1.0, 3.0, 5.0)
SAMPLERS = ("euler", "unipc", "dpm++")
SHAPE = (2, 4, 3, 5, 6)


def diffusers_scheduler(name, shift):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if name == "unipc":  # as Wan's and EchoMimicV3-Flash's pipelines build it
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


_rng = np.random.default_rng(0)
A = _rng.uniform(0.5, 1.5, (4, 1, 1, 1)).astype(np.float32)
B = _rng.normal(size=(4, 1, 1, 1)).astype(np.float32)
X0 = _rng.standard_normal(SHAPE).astype(np.float32)


def stand_in_torch(x, t):
    """A velocity that depends on the sample and (through the time input) on the schedule's rounding."""
    return torch.tanh(x * torch.from_numpy(A) + (t.float() / 1000) * torch.from_numpy(B)) * 1.5 - 0.3 * x


def stand_in_jax(x, t, i):
    return jnp.tanh(x * A + (t / 1000) * B) * 1.5 - 0.3 * x


@pytest.mark.parametrize("name", SAMPLERS)
def test_schedules_equal_diffusers_bitwise(name):
    for steps in STEPS:
        for shift in SHIFTS:
            ref = diffusers_scheduler(name, shift)
            ref.set_timesteps(steps)
            ours = flow_schedule(name, steps, shift)
            np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy().astype(np.float32), f"{steps} {shift}")
            np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32), f"{steps} {shift}")
            assert ours.sigmas[-1] == 0 and len(ours.timesteps) == steps


_JITTED = {}


def _ours(name, steps, shift):
    sampler = get_sampler(name)
    if name not in _JITTED:  # one program per sampler; the schedule arrays are arguments
        _JITTED[name] = jax.jit(lambda x, arrays, s=sampler: sample(stand_in_jax, x, arrays, s))
    return np.asarray(_JITTED[name](X0, schedule_arrays(sampler, flow_schedule(name, steps, shift))))


@pytest.mark.parametrize("name", SAMPLERS)
def test_final_latents_match_diffusers(name):
    worst = 0.0
    for steps in STEPS:
        for shift in SHIFTS:
            sched = diffusers_scheduler(name, shift)
            sched.set_timesteps(steps)
            x = torch.from_numpy(X0.copy())
            for t in sched.timesteps:
                x = sched.step(stand_in_torch(x, t), t, x).prev_sample
            ref = x.numpy()
            err = float(np.abs(_ours(name, steps, shift) - ref).max() / np.abs(ref).max())
            worst = max(worst, err)
            assert err <= 1e-5, f"{name} steps={steps} shift={shift}: relative error {err:.3g}"
    print(f"{name}: worst relative error {worst:.2e}")


def test_samplers_are_not_interchangeable():
    """The parity above can fail: the three solvers give different latents for the same schedule."""
    outs = [_ours(name, 8, 3.0) for name in SAMPLERS]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(outs[a] - outs[b]).max() > 1e-3


def test_known_frames_are_shown_noised_and_pasted_clean():
    """Known latents enter every model call at the step's noise level and come back exactly."""
    seen = []

    def record(x, t, i):
        jax.debug.callback(lambda x, t: seen.append((np.asarray(x), float(t))), x, t)
        return jnp.zeros_like(x)

    sampler = get_sampler("euler")
    sched = flow_schedule("euler", 4, 3.0)
    rng = np.random.default_rng(1)
    known = Known(rng.standard_normal(SHAPE).astype(np.float32), np.arange(SHAPE[1])[None, :, None, None, None] < 2,
                  rng.standard_normal(SHAPE).astype(np.float32))
    out = np.asarray(jax.jit(lambda x: sample(record, x, schedule_arrays(sampler, sched), sampler, known=known))(X0))
    np.testing.assert_array_equal(out[:, :2], known.latents[:, :2])
    for i, (x, _) in enumerate(seen):
        s = sched.sigmas[i]
        np.testing.assert_allclose(x[:, :2], (1 - s) * known.latents[:, :2] + s * known.noise[:, :2], rtol=1e-6,
                                   atol=1e-6)
    assert len(seen) == 4


# --- guidance ------------------------------------------------------------------------------------
def _combine(g, outs, steps):
    """Σ_b w_b·o_b with the guidance's weights, per step."""
    return np.einsum("nb,b->n", g.weights(steps), outs)


def test_guidance_chain_arithmetic():
    o_none, o_text, o_full = 0.3, 1.1, 2.0
    g = parse_guidance("text=4,audio=2.9")  # EchoMimicV3: 3 passes
    assert [sorted(d) for d in g.branches()] == [["audio", "text"], ["audio"], []]
    expect = o_none + 4 * (o_text - o_none) + 2.9 * (o_full - o_text)
    np.testing.assert_allclose(_combine(g, np.array([o_none, o_text, o_full]), 5), expect)
    g = parse_guidance("text+audio=3.5")  # Hallo3: one pair
    assert [sorted(d) for d in g.branches()] == [["audio", "text"], []]
    np.testing.assert_allclose(_combine(g, np.array([o_none, o_full]), 5), o_none + 3.5 * (o_full - o_none))
    assert parse_guidance("none").weights(3).tolist() == [[1.0]] * 3
    for spec in PRESETS:
        np.testing.assert_allclose(parse_guidance(spec).weights(50).sum(axis=1), 1.0)


def test_hunyuan_avatar_guidance_schedule_and_phases():
    """One scale; text and audio dropped for steps < 10, then audio only; two live branches per step."""
    n, cfg = 50, 7.5
    g = parse_guidance("hyavatar")
    o = np.array([0.3, 1.1, 2.0])  # o_∅, o_text (audio dropped), o_all
    got = _combine(g, o, n)
    for i in range(n):
        w = 2 + (1 - i / n) * (cfg - 2) if i < 10 else 3.5 + (1 - i / n) * (6.5 - 3.5)
        uncond = o[0] if i < 10 else o[1]
        np.testing.assert_allclose(got[i], uncond + w * (o[2] - uncond), rtol=1e-12)
    assert g.phases(n) == [(0, 10, (0, 2)), (10, 50, (1, 2))]


def test_scale_schedules():
    g = parse_guidance("audio=lin(4,2)@:0.5;1.5@0.5:")
    s = g.terms[0][1].values(10)
    np.testing.assert_allclose(s, [4.0, 3.8, 3.6, 3.4, 3.2, 1.5, 1.5, 1.5, 1.5, 1.5])
    assert parse_guidance("text=2@3:5").terms[0][1].values(6).tolist() == [1, 1, 1, 2, 2, 1]
    for bad in ("text", "foo=2", "text=abc", "text=2@x", "text=2,text+audio=3"):
        with pytest.raises(ValueError):
            parse_guidance(bad)
    with pytest.raises(ValueError, match="has no audio"):
        parse_guidance("audio=3").check({"text", "ref"})


def test_all_branches_of_a_step_are_one_batched_call():
    g = parse_guidance("text=4,audio=2.9")
    calls = []

    def model(x, t, i):  # stands for the guided denoiser's single model call over 3 stacked branches
        xb = jnp.concatenate([x] * 3)
        calls.append(xb.shape)
        outs = jnp.stack([xb[:2] * 0 + 1, xb[2:4] * 0 + 2, xb[4:] * 0 + 4])
        return jnp.tensordot(jnp.asarray(g.weights(5), jnp.float32)[i], outs, axes=1)

    sampler = get_sampler("euler")
    jax.jit(lambda x: sample(model, x, schedule_arrays(sampler, flow_schedule("euler", 5, 1.0)), sampler))(X0)
    assert calls == [(6, *SHAPE[1:])]  # traced once: one model call per step, branches stacked on the batch


# --- long-video plans ----------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 4])
def test_clip_plans_cover_every_frame_once(stride):
    clip = 1 + stride * 8  # 9 latent frames
    for frames in (1, 5, clip, clip + 1, 3 * clip + 7, 250):
        for strategy in ("motion", "continue"):
            p = long_video.plan(strategy, frames, clip, stride, known_latent=2, overlap_latent=2)
            emitted = [f for c in p.clips for f in range(*c.emit)]
            assert emitted == list(range(frames)), (strategy, frames)
            m = long_video.known_video_frames(2, stride)
            for a, b in zip(p.clips, p.clips[1:]):
                # the next clip's known frames are the previous clip's last frames
                assert b.known == m and b.start == a.start + clip - m
            # known frames are never re-emitted (but continue's clip 0 shows the portrait as its frame 0)
            skip = p.clips[1:] if strategy == "continue" else p.clips
            assert all(c.emit[0] == c.start + c.known for c in skip)
        p = long_video.plan("overlap", frames, clip, stride, overlap_latent=3)
        starts = [c.start // stride for c in p.clips]
        assert starts[0] == 0 and starts[-1] + p.latent_frames == p.total_latent
        assert p.total_latent >= long_video.latent_count(frames, stride)
        w = long_video.window_weights(p)
        total = np.zeros(p.total_latent)
        for a, row in zip(starts, w):
            total[a:a + p.latent_frames] += row
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
        assert (w > 0).all()


def test_plan_errors():
    with pytest.raises(ValueError, match="1 \\+ 4"):
        long_video.plan("motion", 100, 10, 4)
    with pytest.raises(ValueError, match="known latent"):
        long_video.plan("motion", 100, 9, 1, known_latent=9)
    with pytest.raises(ValueError, match="expected one of"):
        long_video.plan("sliding", 100, 9, 1)

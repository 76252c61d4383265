"""Sampling: noise schedules, solvers (Euler, UniPC, DPM-Solver++ 2M; CogVideoX DDIM / DPM, DDPM, DDIM),
multi-condition guidance and long-video clip plans. `hallojax.generate` puts them together with a model, a
codec and media I/O.

    from hallojax.sample import flow_schedule, get_sampler, sample, schedule_arrays, parse_guidance
"""

from hallojax.sample.guidance import Guidance, parse_guidance
from hallojax.sample.schedules import Schedule, flow_schedule, make_schedule, vp_schedule
from hallojax.sample.solvers import Known, get_sampler, sample, schedule_arrays

__all__ = ["Guidance", "Known", "Schedule", "flow_schedule", "get_sampler", "make_schedule", "parse_guidance",
           "sample", "schedule_arrays", "vp_schedule"]

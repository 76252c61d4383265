"""HunyuanVideo-Avatar's released audio keys -> hallojax `AudioProjection` / `FaceAwareAudioAdapter` parameters
(`hallojax.models.avatar_audio`): the name table for the Avatar transformer's converter.

`audio_rules(proj, adapters)` gives Rules for the projector under our prefix `proj` and the 10 adapters
stacked (leading ``layers`` axis, rule names with ``{i}``) under `adapters`: the released
``audio_adapter_blocks.{i}`` are the adapters after dual blocks 1, 3, ..., 19, in that order.
"""

from __future__ import annotations

from hallojax.convert.table import Rule, linear, norm


def audio_rules(proj: str = "audio_proj", adapters: str = "audio_adapters") -> list[Rule]:
    rules = [r for j in (1, 2, 3) for r in linear(f"audio_proj.proj{j}", f"{proj}.proj{j}")]
    rules += norm("audio_proj.norm", f"{proj}.norm")
    t = "audio_adapter_blocks.{i}"
    rules += norm(f"{t}.norm1", f"{adapters}.norm1") + norm(f"{t}.norm2", f"{adapters}.norm2")
    for name in ("to_q", "to_kv", "to_out"):
        rules += linear(f"{t}.{name}", f"{adapters}.{name}", bias=False)
    return rules

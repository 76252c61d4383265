"""`python -m hallojax.aot_avatar`: HunyuanVideo-Avatar's own training step (forward + backward + AdamW, micro-
batches) compiled ahead of time for a TPU topology on this CPU host, at tiny width."""

import pytest

from hallojax.aot_avatar import main
from hallojax.models.hunyuan_avatar import avatar_flops
from hallojax.models.hunyuan_avatar import preset


def test_tiny_train_step_with_micro_batches_compiles_for_v5p(capsys):
    """Forward + backward over 2 micro-batches of 4 rows (1 per chip), AdamW and EMA, FSDP over 4 chips."""
    rc = main(["train", "--preset", "tiny", "--topology", "v5p:2x2x1", "--batch", "8", "--accum", "2", "--frames",
               "3", "--height", "8", "--width", "8", "--text-len", "16", "--remat", "full"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "mesh {'data': 1, 'fsdp': 4" in out and "global batch 8 (2 per chip)" in out
    assert "per chip: arguments" in out and "collectives per chip per step" in out
    assert "parameters 959,248" in out
    with pytest.raises(ValueError, match="must divide by --accum 3"):
        main(["train", "--preset", "tiny", "--topology", "v5p:2x2x1", "--batch", "8", "--accum", "3"])


def test_flops_count_grows_with_tokens():
    cfg = preset("hunyuan-avatar")
    one = avatar_flops(cfg, 1, 33, 88, 88, 832)
    assert 2 * avatar_flops(cfg, 1, 33, 88, 88, 832) == avatar_flops(cfg, 2, 33, 88, 88, 832)
    # joint attention 4·L²·D over 60 blocks at L = 66,656: 3.28 PFLOP, plus the token-wise matmuls (~0.9 PFLOP:
    # the modulation tables, a large share of the 13B weights, act on the vector, not on every token)
    attention = 60 * 4 * 66_656 ** 2 * 3072
    assert attention < one < attention + 1.0e15

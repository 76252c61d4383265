"""Does a model trained with hallojax learn lip sync? A short CI version of README "Does it learn?":
the lipsync-small recipe at 16x16 px on one-frame clips, trained from scratch by `hallojax train`, then
`hallojax eval --every-checkpoint` on unseen people speaking unseen speech. A model that ignores the audio
scores the same r with its own speech as with another video's; this one must score clearly higher with
its own."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from data_pipeline import synthetic

ROOT = Path(__file__).resolve().parents[1]

STEPS = 800
LR = 8e-3  # 2.7x the recipe's: sync appears within 800 steps (at 3e-3, 600 steps: r own 0.08 for 2 of 3 seeds)
# Thresholds from `python tests/test_learning.py 0 1 2 3 4 5 --config.checkpoint.every=400` (one device):
#   step 800, r own / r shuffled: seed 0: 0.870 / 0.269   seed 1: 0.832 / 0.052   seed 2: 0.816 / 0.461 (these
#   4 speeches share r 0.51)   seed 3: 0.754 / 0.123   seed 4: 0.701 / -0.005   seed 5: 0.556 / 0.083
# so r own 0.56-0.87 and a margin of 0.36-0.78; at step 400, as sync appears: margin 0.06-0.23. A model that
# ignores the audio draws the same video for any speech: a margin of exactly 0 (tests/test_evaluate.py).
MIN_OWN = 0.4  # r own at the last checkpoint
MIN_GAP = 0.2  # r own - r shuffled at the last checkpoint


def _hallojax(*args):
    """`hallojax ARGS` as a user on a small machine runs it: its own process, one CPU device."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "hallojax.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def readme_block(train_line: str) -> list[list[str]]:
    """The `hallojax` commands (argv without `hallojax`, continuation lines joined, comments dropped) of the README
    block whose train command starts with `train_line`: what the README tells a user to run."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    start = text.index("```bash\n" + train_line)
    block = text[start + 8:text.index("```", start + 8)]
    return [shlex.split(line.split("#")[0])[1:] for line in block.splitlines() if line.startswith("hallojax ")]


def learn_and_score(tmp, seed: int, steps: int = STEPS, overrides=(), *, config="configs/wan.py:lipsync-small",
                    clip=("--config.data.frames=1",)) -> list[dict]:
    """The README block of recipe `config` ("Does it learn?"; tests/test_learning_letstalk.py: "Does LetsTalk
    learn?"), its own commands with its paths in `tmp` and this test's sizes appended (later flags win): train
    for `steps` from `seed` at 16 px, batch 16, on one device (clip: the recipe's clip flags), 4 held-out synthetic
    people x 1.2 s (seed 1000 + seed: other people, other speech), every checkpoint scored (raw weights)."""
    commands = readme_block(f"hallojax train --config {config} ")
    train = next(c for c in commands if c[0] == "train")
    run_dir = train[train.index("--workdir") + 1]
    heldout = next(c for c in commands if c[0] == "synthetic")[1]
    paths = {run_dir: str(tmp / "run"), heldout: str(tmp / "heldout")}

    def local(argv):
        for a, b in paths.items():
            argv = [b + x[len(a):] if x == a or x.startswith(a + "/") else x for x in argv]
        return argv

    _hallojax(*local(train), f"--config.seed={seed}", f"--config.data.workdir={tmp / 'data'}",
              "--config.data.size=16", *clip, "--config.train.batch_size=16", f"--config.train.steps={steps}",
              f"--config.train.learning_rate={LR}", f"--config.checkpoint.every={steps}", *overrides)
    synthetic.generate(tmp / "heldout", num_videos=4, seed=1000 + seed,
                       cfg=synthetic.SyntheticConfig(min_seconds=1.6, max_seconds=1.6))
    evals = [c for c in commands if c[0] == "eval"]
    curve = next((c for c in evals if "--every-checkpoint" in c), evals[-1])
    _hallojax(*local(curve), "--every-checkpoint", "--weights", "params", "--steps", "10", "--max-seconds", "1.2")
    out = Path(local(curve)[curve.index("--out") + 1])
    return json.loads((out / "curve.json").read_text())["points"]


def assert_learned_sync(points: list[dict], steps: int, min_own: float, min_gap: float) -> None:
    """One checkpoint at `steps`: r own above min_own and above r shuffled by min_gap, the reference's face."""
    assert [p["step"] for p in points] == [steps]
    last = points[-1]
    assert last["r_own"] - last["r_shuffled"] > min_gap, points
    assert last["r_own"] > min_own, points
    assert last["identity_own"] > last["identity_others"], points  # the reference's face, not another's


def test_a_short_run_learns_lip_sync_beyond_chance(tmp_path):
    assert_learned_sync(learn_and_score(tmp_path, seed=0), STEPS, MIN_OWN, MIN_GAP)


def measure(argv, learn=learn_and_score):
    """python tests/FILE.py SEED [SEED ...] [--config.KEY=VALUE ...]: every checkpoint's scores per seed."""
    import tempfile

    extra = [a for a in argv if a.startswith("--")]
    for s in [int(a) for a in argv if not a.startswith("--")]:
        with tempfile.TemporaryDirectory() as d:
            for p in learn(Path(d), s, overrides=extra):
                print(f"{' '.join(extra)} seed {s} step {p['step']}: r own {p['r_own']:.3f} "
                      f"shuffled {p['r_shuffled']:.3f} (speeches {p['r_truths']:.3f}) silence {p['r_silence']:.3f} "
                      f"identity {p['identity_own']:.3f}/{p['identity_others']:.3f}",
                      flush=True)


if __name__ == "__main__":  # measure: python tests/test_learning.py SEED [SEED ...] [--config.KEY=VALUE ...]
    measure(sys.argv[1:])

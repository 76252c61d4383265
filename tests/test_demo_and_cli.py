"""The embedded default job and the command line."""

import subprocess
import sys

import numpy as np
import pytest

from hallojax import cli, load_pretrained, save_pretrained
from hallojax.checkpoint import CheckpointError, flat_params
from hallojax.config import load_config
from hallojax.demo import run
from hallojax.models.wan import DiTConfig, WanDiT


@pytest.mark.parametrize("mesh", ["fsdp", "fsdp_tp"])
def test_demo_shards_matches_single_device_and_learns(mesh, devices, tmp_path):
    config = load_config(f"configs/wan.py:tiny,mesh={mesh},dtype=float32",
                         ["--config.train.steps=20", "--config.train.log_every=10", f"--config.data.workdir={tmp_path}"])
    result = run(config)
    assert result["forward_max_abs"] > 0.1 and result["forward_max_diff"] <= 1e-5 * result["forward_max_abs"]
    assert int(np.prod(list(result["mesh"].values()))) == 8
    losses = result["losses"]  # the trainer's: a fresh σ and ε every step, so compare means
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert (tmp_path / "train" / "checkpoints" / "20").is_dir()


def test_demo_on_synthetic_talking_faces_through_the_pipeline(tmp_path, devices):
    config = load_config("configs/wan.py:demo,dtype=float32", [
        f"--config.data.workdir={tmp_path}", "--config.data.num_videos=2", "--config.train.steps=12",
        "--config.train.log_every=4", "--config.sample.steps=2"])
    result = run(config)
    assert result["clips"] >= 8  # 2 videos of 2-4 s at 25 fps in 9-frame clips
    assert (tmp_path / "prepared" / "manifest.json").exists() and list((tmp_path / "videos").glob("*.mp4"))
    assert result["forward_max_abs"] > 0.1 and result["forward_max_diff"] <= 1e-5 * result["forward_max_abs"]
    assert result["loss_tail"] < 0.9 * result["loss_head"], result["losses"]
    # the demo ends with a video of an unseen portrait and speech, scored for lip sync
    video = tmp_path / "talk.mp4"
    assert result["video"] == str(video) and video.exists() and video.with_suffix(".json").exists()
    assert -1.0 <= result["lipsync_r"] <= 1.0 and result["lipsync_r"] != 0.0


def test_info_reports_the_sharded_size(capsys):
    assert cli.main(["info", "--config", "configs/wan.py:wan2.1-t2v-14b,mesh=fsdp_tp", "--devices", "64"]) == 0
    out = capsys.readouterr().out
    assert "preset wan2.1-t2v-14b: 14,288,491,584 parameters" in out and "'fsdp': 32, 'context': 1, 'tensor': 2" in out
    per_device = float(out.split("GiB of parameters per device")[0].split()[-1])
    # 14.29e9 fp32 parameters over 64 devices, give or take the few small replicated tables
    assert 14_288_491_584 * 4 / 64 / 2**30 <= per_device < 1.01 * 14_288_491_584 * 4 / 64 / 2**30
    assert cli.main(["info", "--config", "configs/wan.py:tiny,mesh=fsdp_tp", "--devices", "7"]) == 2


def test_console_entry_point_rejects_unknown_arguments():
    proc = subprocess.run([sys.executable, "-m", "hallojax.cli", "convert", "wan-diffusers", "a", "b", "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_save_pretrained_checks_before_writing_and_is_atomic(tmp_path, monkeypatch):
    cfg = DiTConfig.from_dict(load_config("tiny").model)
    params = {k: np.asarray(v) for k, v in flat_params(WanDiT(cfg, rngs=__import__("flax").nnx.Rngs(0))).items()}
    bad = dict(params)
    bad.pop("proj_out.bias")
    with pytest.raises(CheckpointError, match="proj_out.bias"):
        save_pretrained(tmp_path / "a", bad, cfg)
    assert not (tmp_path / "a").exists()

    import orbax.checkpoint as ocp

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tmp_path / "b", params, cfg)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary is left behind
    monkeypatch.undo()

    save_pretrained(tmp_path / "c", params, cfg)
    model, cfg2 = load_pretrained(tmp_path / "c", remat="full")
    assert cfg2.remat == "full" and cfg2.replace(remat="none") == cfg
    with pytest.raises(CheckpointError, match="would change parameter shapes"):
        load_pretrained(tmp_path / "c", num_layers=3)
    with pytest.raises(FileExistsError, match="would replace the input"):
        save_pretrained(tmp_path / "c", params, cfg, overwrite=True, inputs=(tmp_path / "c" / "params",))
    (tmp_path / "c" / "config.json").write_text('{"format": "hallojax-pretrained", "version": 1}')
    with pytest.raises(CheckpointError, match="no 'model' section"):
        load_pretrained(tmp_path / "c")
    for k, v in flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(v), params[k])
    assert list(tmp_path.iterdir()) == [tmp_path / "c"]

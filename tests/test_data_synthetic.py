"""The synthetic talking-faces set: real h264+AAC mp4 files whose mouth follows the speech, with ground
truth and face-box sidecars; deterministic per seed; distinct identities; and the benchmark command."""

import json

import av
import numpy as np
import pytest

from data_pipeline import bench, synthetic


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert synthetic.main([str(out), "--num-videos", "3", "--seed", "5", "--min-seconds", "2",
                           "--max-seconds", "3"]) == 0
    return out


def decode(path):
    with av.open(str(path)) as c:
        vs, ast = c.streams.video[0], c.streams.audio[0]
        info = (vs.codec_context.name, ast.codec_context.name, vs.average_rate, ast.sample_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(vs)])
        c.seek(0)
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(ast)])
    return info, frames, audio


def test_files_are_real_mp4_with_sidecars(videos):
    names = sorted(p.name for p in videos.iterdir())
    assert names == [f"talk_{i:05d}.{ext}" for i in range(3) for ext in ("face.json", "mouth.json", "mp4")]
    for i in range(3):
        info, frames, audio = decode(videos / f"talk_{i:05d}.mp4")
        truth = json.loads((videos / f"talk_{i:05d}.mouth.json").read_text())
        box = json.loads((videos / f"talk_{i:05d}.face.json").read_text())["box"]
        assert info == ("h264", "aac", 25, 24000)
        assert frames.shape == (truth["num_frames"], 64, 64, 3) and 50 <= truth["num_frames"] <= 75
        assert len(audio) >= truth["num_frames"] * 24000 // 25  # AAC may pad, never cut
        assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64
        mouth = np.array(truth["mouth_open"])
        assert mouth.shape == (truth["num_frames"],) and (mouth < 0.02).sum() >= 3 and mouth.max() > 0.4  # pauses and speech
        # the face box holds the face: its centre shows the identity's skin
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert np.abs(frames[:, cy - 1, cx].mean(0) - truth["identity"]["skin"]).max() < 25


def test_mouth_and_voice_follow_the_ground_truth(videos):
    for i in range(3):
        _, frames, audio = decode(videos / f"talk_{i:05d}.mp4")
        truth = json.loads((videos / f"talk_{i:05d}.mouth.json").read_text())
        box = json.loads((videos / f"talk_{i:05d}.face.json").read_text())["box"]
        mouth = np.array(truth["mouth_open"])
        assert synthetic.lipsync_correlation(synthetic.measure_mouth_opening(frames, box), mouth) > 0.97
        n = len(mouth)
        rms = np.sqrt((audio[:n * 960].reshape(n, 960) ** 2).mean(1))  # 960 samples per frame at 24 kHz
        assert synthetic.lipsync_correlation(rms, mouth) > 0.9
        shuffled = np.random.default_rng(0).permutation(mouth)
        assert synthetic.lipsync_correlation(rms, shuffled) < 0.5  # the score tells sync from no sync


def test_seeded_and_distinct(videos, tmp_path):
    cfg = synthetic.SyntheticConfig(min_seconds=2, max_seconds=3)  # as the fixture's command line
    again = synthetic.make_video(tmp_path, 1, seed=5, cfg=cfg)
    assert again.read_bytes() == (videos / "talk_00001.mp4").read_bytes()
    other = synthetic.make_video(tmp_path / "b", 1, seed=6, cfg=cfg)
    assert other.read_bytes() != again.read_bytes()
    ids = [json.loads((videos / f"talk_{i:05d}.mouth.json").read_text())["identity"] for i in range(3)]
    for key in ("skin", "hair", "bg_top", "center", "axes"):
        assert len({json.dumps(x[key]) for x in ids}) == 3, key


def test_errors_and_scoring_guards(tmp_path, capsys):
    assert synthetic.main([str(tmp_path), "--height", "63"]) == 2
    assert "even and >= 16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="same length"):
        synthetic.lipsync_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no mouth region"):
        synthetic.measure_mouth_opening(np.zeros((2, 64, 64, 3), np.uint8), [70, 70, 80, 80])


def test_bench_prints_per_core_figures(capsys):
    assert bench.main(["--videos", "1", "--seconds", "1.5", "--no-pin", "--audio-features", "rms"]) == 0
    out = capsys.readouterr().out
    assert "command: python -m data_pipeline.bench --videos 1" in out
    for stage in ("stage 1", "stage 2", "both stages"):
        line = next(x for x in out.splitlines() if x.startswith(stage))
        assert float(line.split(":")[1].split("clips/s")[0]) > 0, line

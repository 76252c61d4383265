"""`hallojax eval`: the metrics mean what they say (a perfectly synced stand-in scores r ≈ 1 with its own
speech and low with another's; a model that ignores audio does not), and the command writes its JSON,
plot and side-by-side videos from a real (tiny, untrained) checkpoint."""

import json
import types

import av
import numpy as np
import pytest

from data_pipeline import synthetic
from hallojax import cli
from hallojax.evaluate import evaluate, heldout_videos
from hallojax.pipeline import prepare_portrait


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    for i in range(3):
        synthetic.make_video(d, i, seed=500, cfg=synthetic.SyntheticConfig(min_seconds=1.6, max_seconds=1.6))
    return d


class Renderer:
    """A stand-in for the pipeline that draws the person of the portrait with the mouth of whatever speech it
    is given (`lipsync=True`: perfect sync), or always with its own training-time mouth (`lipsync=False`:
    a model that ignores the audio)."""

    def __init__(self, videos, lipsync=True):
        self.people = []
        for v in videos:
            meta = json.loads(v["path"].with_name(v["path"].stem + ".mouth.json").read_text())
            from hallojax.media import read_audio

            self.people.append(dict(v, identity=meta["identity"], wave=read_audio(v["path"])[0]))
        self.lipsync = lipsync
        self.spec = types.SimpleNamespace(box_scale=1.6)

    def generate(self, image, audio, *, face_box, allow_silent=False, **kw):
        wave, rate = audio
        n = round(len(wave) / rate * 25)
        person = next(p for p in self.people if p["box"] == face_box)  # the portrait's person
        speaker = next((p for p in self.people if len(p["wave"]) >= len(wave)
                        and np.array_equal(p["wave"][:len(wave)], wave)), None)
        mouth = np.zeros(n) if speaker is None else speaker["truth"][:n]  # silence: closed
        if not self.lipsync:
            mouth = person["truth"][:n]
        # as long as the speech, like the pipeline's videos: the synthetic audio outlasts the last frame
        mouth = np.pad(mouth, (0, n - len(mouth)), mode="edge")
        frames = synthetic.render_frames(person["identity"], mouth, np.zeros((n, 2)), np.zeros(n, bool), 64, 64)
        out = [prepare_portrait(f, 32, 32, box=face_box) for f in frames]
        first = prepare_portrait(np.asarray(image), 32, 32, box=face_box)
        return types.SimpleNamespace(frames=np.stack([o.frame for o in out]), fps=25.0, portrait=first)


def test_a_synced_stand_in_scores_high_and_an_audio_blind_one_does_not(heldout):
    videos = heldout_videos(heldout)
    synced = evaluate(Renderer(videos), videos)["mean"]
    assert synced["r_own"] > 0.9, synced
    assert synced["r_own"] - synced["r_shuffled"] > 0.5 and abs(synced["r_silence"]) < 1e-6, synced
    # perfect sync with another's speech scores what the two speeches share, the chance level r_truths
    assert abs(synced["r_shuffled"] - synced["r_truths"]) < 0.05, synced  # measured 0.128 vs 0.126
    assert synced["identity_own"] > synced["identity_others"] + 0.1, synced  # measured 0.77 vs 0.61
    assert synced["color_own"] < 0.5 * synced["color_others"], synced
    blind = evaluate(Renderer(videos, lipsync=False), videos)["mean"]  # its mouth moves the same for any speech
    assert abs(blind["r_own"] - blind["r_shuffled"]) < 1e-6 and blind["r_silence"] == pytest.approx(blind["r_own"])


def test_eval_command_writes_json_plot_and_videos(heldout, tmp_path, capsys):
    from test_generate import write_workdir

    ckpt = write_workdir(tmp_path / "ckpt")
    out = tmp_path / "eval"
    rc = cli.main(["eval", "--checkpoint", str(ckpt), "--videos", str(heldout), "--out", str(out), "--steps", "2",
                   "--num-videos", "2", "--max-seconds", "1", "--side-by-side"])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert len(result["videos"]) == 2 and result["settings"]["steps"] == 2 and result["settings"]["max_seconds"] == 1
    for key in ("r_own", "r_shuffled", "r_silence", "identity_own", "identity_others", "flicker", "psnr", "ssim"):
        assert np.isfinite(result["mean"][key]), key
        assert result["mean"][key] == pytest.approx(np.mean([v[key] for v in result["videos"]]))
    assert (out / "mouth_tracks.png").stat().st_size > 1000
    with av.open(str(out / "talk_00000.mp4")) as c:
        v = c.streams.video[0].codec_context
        assert (v.width, v.height) == (64, 32) and c.streams.audio  # truth | generated, with the speech
    assert "| mean" in capsys.readouterr().out

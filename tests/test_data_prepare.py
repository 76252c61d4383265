"""The prepare pipeline end to end on generated media: good inputs of every container and quirk, one file
for each kind of bad input, exact counts, exact frames and audio, kill-and-resume, several processes, and
the Grain and TFDS readers."""

import collections
import fractions
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from data_pipeline import clips, pipeline, prepare, synthetic
from data_pipeline.clips import ClipConfig
from data_pipeline.pipeline import PrepareConfig
from data_pipeline.reader import clip_dataset, load_manifest
from hallojax.codec import PixelCodec

ROOT = Path(__file__).resolve().parents[1]
T, FPS, SR = 17, 25, 16000  # the default clip: 17 frames at 25 fps, audio at 16 kHz


# --- media writers --------------------------------------------------------------------------------------


def write_media(path, frames=None, *, fps=FPS, pts_ms=None, vcodec="libx264", pix_fmt="yuv420p", rotation=None,
                audio=None, rate=SR, acodec="aac", fmt=None):
    """frames uint8 [N, H, W, 3|4] (rgb24/rgba), audio float [S] mono; pts_ms gives a variable frame rate."""
    with av.open(str(path), "w", format=fmt) as out:
        vs = ast = None
        if frames is not None:
            vs = out.add_stream(vcodec, rate=fps)
            vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
            if vcodec == "libvpx-vp9":
                vs.options = {"deadline": "realtime", "cpu-used": "8"}
            tb = fractions.Fraction(1, 1000) if pts_ms is not None else fractions.Fraction(1, fps)
            vs.codec_context.time_base = tb
            if rotation is not None:
                vs.set_display_rotation(rotation)
        if audio is not None:
            ast = out.add_stream(acodec, rate=rate, layout="mono")
        if vs is not None:
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgba" if f.shape[-1] == 4 else "rgb24")
                vf.pts = int(pts_ms[i]) if pts_ms is not None else i
                vf.time_base = tb
                out.mux(vs.encode(vf))
            out.mux(vs.encode())
        if ast is not None:
            step = ast.codec_context.frame_size or 1024
            for i in range(0, len(audio), step):
                af = av.AudioFrame.from_ndarray(np.asarray(audio[None, i:i + step], np.float32), format="flt",
                                                layout="mono")
                af.sample_rate, af.pts = rate, i
                out.mux(ast.encode(af))
            out.mux(ast.encode())


def index_frames(n, h=64, w=64):
    """Flat frames whose grey level codes their index: i -> 16 + 4i (survives h264 within +-1)."""
    return np.repeat((16 + 4 * np.arange(n, dtype=np.uint8))[:, None, None, None], 3, -1) * np.ones((1, h, w, 1), np.uint8)


def frame_index(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 16) / 4).astype(int)


def pcm_exact(seconds, rate, seed):
    """Noise quantised to int16 steps, so a lossless 16-bit codec gives it back bit for bit."""
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, round(seconds * rate))
    return (np.round(x * 32768) / 32768).astype(np.float32)


def tone(seconds, rate=SR):
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def nearest(times_s, k):
    """Index of the frame nearest to k/FPS; ties go to the earlier frame."""
    d = np.abs(np.asarray(times_s) - k / FPS)
    return int(np.flatnonzero(d <= d.min() + 1e-9)[0])


LATIN1 = os.fsdecode(b"caf\xe9.mp4")  # "caf\udce9.mp4"
VFR_MS = np.concatenate([[0], np.cumsum(np.tile([20, 70, 30], 18))])  # 55 frames, mean 40 ms, 2.2 s


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A directory of inputs and what each must give: {source: clips} for good ones, {source: reason} for bad."""
    d = tmp_path_factory.mktemp("media") / "videos"
    synth = synthetic.generate(d / "synth", 3, seed=7, cfg=synthetic.SyntheticConfig(min_seconds=2, max_seconds=3))
    good, bad = {}, {}
    for p in synth:
        n = json.loads(p.with_suffix(".mouth.json").read_text())["num_frames"]
        good[f"synth/{p.name}"] = (n - T) // T + 1

    write_media(d / "cfr30.mov", index_frames(60), fps=30, audio=pcm_exact(2.0, SR, 1), acodec="pcm_s16le")
    good["cfr30.mov"] = 2  # 2.0 s -> 50 frames at 25 fps
    write_media(d / "vfr.mp4", index_frames(55), pts_ms=VFR_MS, audio=tone(2.3))
    good["vfr.mp4"] = 3  # 2.2 s -> 55 frames
    stored = np.full((50, 48, 64, 3), 90, np.uint8)  # 64 wide, 48 high, shown turned by 90 degrees
    stored[:, 0:8, 28:36] = (255, 0, 0)  # a red mark at the top middle of the stored image
    write_media(d / "rotated.mp4", stored, rotation=90, audio=tone(2.0))
    good["rotated.mp4"] = 2
    gray = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], 3, -1) * np.ones((50, 64, 1, 1), np.uint8)
    write_media(d / "gray.mkv", gray, vcodec="ffv1", pix_fmt="gray", audio=pcm_exact(2.0, 48000, 2), rate=48000,
                acodec="flac")
    good["gray.mkv"] = 2
    rgba = np.zeros((50, 64, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 60, 30), np.arange(64, dtype=np.uint8)[None, :, None] * 4
    write_media(d / "alpha.mov", rgba, vcodec="png", pix_fmt="rgba", audio=tone(2.0))
    good["alpha.mov"] = 2
    write_media(d / "odd.mkv", np.full((50, 45, 63, 3), 128, np.uint8), vcodec="ffv1", pix_fmt="yuv444p",
                audio=tone(2.0))
    good["odd.mkv"] = 2
    write_media(d / "clip.webm", np.full((50, 64, 64, 3), 70, np.uint8), vcodec="libvpx-vp9",
                audio=tone(2.0, 48000), rate=48000, acodec="libopus", fmt="webm")
    good["clip.webm"] = 2
    write_media(d / "short_audio.mp4", np.full((50, 64, 64, 3), 100, np.uint8), audio=tone(1.0))
    good["short_audio.mp4"] = 1  # only the first clip has sound
    # POSIX file names are bytes: this one is Latin-1 (0xE9), not UTF-8; Python carries it surrogate-escaped
    write_media(d / LATIN1, np.full((50, 64, 64, 3), 80, np.uint8), audio=tone(2.0))
    good[LATIN1] = 2

    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    bad["corrupt.mp4"] = "unreadable container"
    (d / "empty.mp4").write_bytes(b"")
    bad["empty.mp4"] = "empty file"
    write_media(d / "audio_only.mp4", audio=tone(2.0))
    bad["audio_only.mp4"] = "no video stream"
    write_media(d / "silent.mp4", np.full((50, 64, 64, 3), 100, np.uint8))
    bad["silent.mp4"] = "no audio stream"
    write_media(d / "tiny.mp4", np.full((50, 16, 16, 3), 100, np.uint8), audio=tone(2.0))
    bad["tiny.mp4"] = "tiny resolution"
    write_media(d / "bad_sidecar.mp4", np.full((50, 64, 64, 3), 100, np.uint8), audio=tone(2.0))
    (d / "bad_sidecar.face.json").write_text('{"box": [10, 10, 5')
    bad["bad_sidecar.mp4"] = "unreadable face sidecar bad_sidecar.face.json"
    # face boxes that miss the 64x64 frame (the crop would hold no face, the face mask would be all zeros)
    for name, box, reason in (("off_frame", [500, 400, 560, 470], "lies outside the 64x64 frame"),
                              ("edge_box", [40, 40, 120, 120], "only 9% of face box [40, 40, 120, 120]")):
        (d / f"{name}.mp4").write_bytes((d / "bad_sidecar.mp4").read_bytes())
        (d / f"{name}.face.json").write_text(json.dumps({"box": box}))
        bad[f"{name}.mp4"] = reason
    write_media(d / "no_cover.mp4", np.full((50, 64, 64, 3), 100, np.uint8), audio=tone(0.3))
    bad["no_cover.mp4"] = "audio shorter than video"
    write_media(d / "too_short.mp4", np.full((10, 64, 64, 3), 100, np.uint8), audio=tone(0.4))
    bad["too_short.mp4"] = "too short"
    whole = (d / "short_audio.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(whole[:len(whole) // 2])
    bad["truncated.mp4"] = "unreadable container"
    return d, good, bad


@pytest.fixture(scope="module")
def prepared(media, tmp_path_factory):
    d, _, _ = media
    out = tmp_path_factory.mktemp("prep") / "out"
    summary = pipeline.prepare([d], out, PrepareConfig(videos_per_shard=4, audio_features="rms"), progress=False)
    return out, summary


def records_by_key(out):
    ds = clip_dataset(out)
    return [ds[i] for i in range(len(ds))]


# --- outcomes -------------------------------------------------------------------------------------------


def test_counts_every_good_clip_once_and_every_bad_input_reported(media, prepared):
    _, good, bad = media
    out, summary = prepared
    manifest = load_manifest(out)
    n_clips = sum(good.values())
    assert manifest["counts"] == {"inputs": len(good) + len(bad), "videos_ok": len(good), "videos_skipped": len(bad),
                                  "clips": n_clips, "shards": -(-(len(good) + len(bad)) // 4),
                                  "shard_files": len(manifest["shards"])}
    assert summary["clips"] == n_clips and summary["videos_skipped"] == len(bad)

    keys = collections.Counter((r["source"], int(r["start_frame"])) for r in records_by_key(out))
    assert max(keys.values()) == 1, [k for k, v in keys.items() if v > 1]
    expected = {(s, k * T) for s, n in good.items() for k in range(n)}
    assert set(keys) == expected
    assert sum(s["num_records"] for s in manifest["shards"]) == n_clips
    assert {v["source"]: v["clips"] for v in manifest["videos"]} == good

    report = json.loads((out / "report.json").read_text())
    reasons = {r["source"]: r["reason"] for r in report["skipped"]}
    assert set(reasons) == set(bad)
    for source, reason in bad.items():
        assert reason in reasons[source], (source, reasons[source])
    assert all(r["path"].endswith(r["source"]) for r in report["skipped"])
    warned = {w["source"]: w["warning"] for w in report["warnings"]}
    assert "audio shorter than video" in warned["short_audio.mp4"] and "1 of 2 clips dropped" in warned["short_audio.mp4"]


def test_a_file_name_that_is_not_utf8_keeps_its_clips_and_its_bytes(media, prepared):
    d, _, _ = media
    out, _ = prepared
    name = b"caf\xe9.mp4"
    assert name in os.listdir(os.fsencode(d))  # the file really has the Latin-1 byte in its name
    records = [r for r in records_by_key(out) if r["source"] == LATIN1]
    assert [int(r["start_frame"]) for r in records] == [0, T]
    assert all(os.fsencode(r["source"]) == name for r in records)  # the record holds the file's bytes
    # JSON files carry it as the escape \udce9 (byte 0xE9 under Python's surrogateescape); json reads it back
    text = (out / "manifest.json").read_text(encoding="ascii")
    assert '"caf\\udce9.mp4"' in text
    videos = json.loads(text)["videos"]
    assert {"source": LATIN1, "clips": 2} in [{k: v[k] for k in ("source", "clips")} for v in videos]
    report = json.loads((out / "report.json").read_text())
    assert LATIN1 not in [r["source"] for r in report["skipped"]] + [w["source"] for w in report["warnings"]]
    assert LATIN1 in json.loads((out / "plan.json").read_text())["sources"]


@pytest.fixture
def take_read_permission(monkeypatch):
    """chmod 000 on a path; as root (who reads everything anyway) the OS calls that read it fail the same way."""
    taken = []

    def take(path: Path):
        path.chmod(0)
        taken.append(path)
        if os.geteuid() == 0:
            def denied(p):
                if os.fspath(p) in map(str, taken):
                    raise PermissionError(13, "Permission denied", os.fspath(p))
            real_scandir, real_open = os.scandir, open
            monkeypatch.setattr(os, "scandir", lambda p=".": denied(p) or real_scandir(p))  # os.walk lists with it
            monkeypatch.setattr(clips, "open", lambda p, *a, **k: denied(p) or real_open(p, *a, **k), raising=False)

    yield take
    for path in taken:
        path.chmod(0o755)


def test_links_fifos_and_unreadable_paths_are_reported(media, tmp_path, take_read_permission):
    d, _, _ = media
    videos = tmp_path / "videos"
    (videos / "closed").mkdir(parents=True)
    good = (d / "vfr.mp4").read_bytes()
    for name in ("good.mp4", "locked.mp4", "closed/inside.mp4"):
        (videos / name).write_bytes(good)
    (videos / "link.mp4").symlink_to("good.mp4")  # a working link is an input like any other
    (videos / "dangling.mp4").symlink_to("gone.mp4")
    (videos / "loop.mp4").symlink_to("loop.mp4")
    os.mkfifo(videos / "pipe.mp4")  # opening it would wait forever for a writer
    take_read_permission(videos / "locked.mp4")
    take_read_permission(videos / "closed")
    out = tmp_path / "out"
    summary = pipeline.prepare([videos], out, PrepareConfig(), progress=False)
    assert summary["videos_ok"] == 2 and summary["clips"] == 6
    assert [v["source"] for v in load_manifest(out)["videos"]] == ["good.mp4", "link.mp4"]
    report = json.loads((out / "report.json").read_text())
    reasons = {r["source"]: (r["path"], r["reason"]) for r in report["skipped"]}
    assert {s: r for s, (_, r) in reasons.items()} == {
        "dangling.mp4": "broken symbolic link: its target gone.mp4 does not exist",
        "locked.mp4": "cannot read the file: Permission denied",
        "loop.mp4": "symbolic link loop (too many levels of symbolic links)",
        "pipe.mp4": "not a regular file (a FIFO)"}
    assert all(path == str(videos / s) for s, (path, _) in reasons.items())
    assert report["unlisted_directories"] == [{
        "source": "closed", "path": str(videos / "closed"),
        "reason": "cannot list the directory (Permission denied): videos in it, if any, are not prepared"}]


def _clip(records, source, start=0):
    (r,) = [r for r in records if r["source"] == source and int(r["start_frame"]) == start]
    return r, PixelCodec(1).decode(r["latents"][None])[0]


def _pixels(video):  # [-1, 1] float -> uint8 (the pixel codec is exact, so this is exact too)
    return np.round((video + 1) * 127.5).astype(np.uint8)


def test_frames_follow_timestamps_rotation_and_formats(prepared):
    out, _ = prepared
    records = records_by_key(out)
    times30 = np.arange(60) / 30
    for start in (0, 17):
        r, video = _clip(records, "cfr30.mov", start)
        assert list(frame_index(_pixels(video))) == [nearest(times30, k) for k in range(start, start + T)]
    for start in (0, 17, 34):
        r, video = _clip(records, "vfr.mp4", start)
        assert list(frame_index(_pixels(video))) == [nearest(VFR_MS / 1000, k) for k in range(start, start + T)]
        # the reference frame is another frame of the same video, outside the clip
        ref = int(r["ref_index"])
        assert not start <= ref < start + T and frame_index(r["ref_frame"][None])[0] == nearest(VFR_MS / 1000, ref)

    # rotated: displayed 48 wide x 64 high, centre crop 48x48 -> 64x64; the mark (stored top middle) turns
    # counter-clockwise to the left edge, middle height
    _, video = _clip(records, "rotated.mp4")
    red = (video[0, ..., 0] > 0.5) & (video[0, ..., 1] < -0.5)
    rows, cols = np.nonzero(red)
    assert cols.max() < 16 and 20 < rows.mean() < 44, (rows.mean(), cols.mean())

    _, gray = _clip(records, "gray.mkv")
    g = _pixels(gray)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert g[0, :, :8].mean() < 30 and g[0, :, -8:].mean() > 225  # the ramp survives, left to right

    _, alpha = _clip(records, "alpha.mov")
    assert np.abs(_pixels(alpha).astype(int) - [200, 60, 30]).max() <= 1  # colour kept, alpha dropped
    for source in ("odd.mkv", "clip.webm"):
        r, video = _clip(records, source)
        assert video.shape == (T, 64, 64, 3) and r["face_mask"].all()


def test_audio_is_cut_exactly_to_each_clip(prepared):
    out, _ = prepared
    records = records_by_key(out)
    src = pcm_exact(2.0, SR, 1)  # cfr30.mov: 16-bit PCM at 16 kHz, no resampling
    for start in (0, 17):
        r, _ = _clip(records, "cfr30.mov", start)
        assert r["audio"].shape == (T * SR // FPS,)
        np.testing.assert_array_equal(r["audio"], src[start * 640:(start + T) * 640])
    # gray.mkv: lossless FLAC at 48 kHz, resampled by soxr
    ref = soxr.resample(pcm_exact(2.0, 48000, 2), 48000, SR)
    r, _ = _clip(records, "gray.mkv", 17)
    np.testing.assert_allclose(r["audio"], ref[17 * 640:34 * 640], atol=1e-6)
    r, _ = _clip(records, "short_audio.mp4", 0)
    assert np.abs(r["audio"][-640:]).max() > 0.1  # the kept clip has sound to its end


def test_synthetic_lip_sync_survives_the_pipeline(media, prepared):
    d, good, _ = media
    out, _ = prepared
    records = records_by_key(out)
    lags = {}
    for source in [s for s in good if s.startswith("synth/")]:
        truth = np.array(json.loads((d / source).with_suffix(".mouth.json").read_text())["mouth_open"])
        for r in [r for r in records if r["source"] == source]:
            s = int(r["start_frame"])
            video = _pixels(PixelCodec(1).decode(r["latents"][None])[0])
            # pixels of the face-box crop and the audio features both follow the ground truth
            assert synthetic.lipsync_correlation(synthetic.measure_mouth_opening(video, r["face_box"]),
                                                 truth[s:s + T]) > 0.95
            energy = np.exp(r["audio_features"][:, 0, 0])  # the "rms" feature is log RMS
            padded = np.pad(truth, 3)
            for lag in range(-3, 4):
                lags.setdefault(lag, []).append(
                    synthetic.lipsync_correlation(energy, padded[3 + s + lag:3 + s + lag + T]))
            x0, y0, x1, y1 = r["face_box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and r["face_mask"].sum() < 64 * 64
    mean = {lag: np.mean(v) for lag, v in lags.items()}
    assert mean[0] > 0.9 and max(mean, key=mean.get) == 0, mean  # audio and video are in sync


# --- resume, determinism, several processes --------------------------------------------------------------


@pytest.fixture(scope="module")
def small(media, tmp_path_factory):
    """5 inputs (4 good, 1 bad), one per shard, and an uninterrupted run over them."""
    d, _, _ = media
    small = tmp_path_factory.mktemp("small")
    for name in ["synth/talk_00000.mp4", "synth/talk_00001.mp4", "cfr30.mov", "vfr.mp4", "corrupt.mp4"]:
        (small / Path(name).name).write_bytes((d / name).read_bytes())
        sidecar = (d / name).with_suffix(".face.json")
        if sidecar.exists():
            (small / sidecar.name).write_bytes(sidecar.read_bytes())
    ref = tmp_path_factory.mktemp("ref") / "out"
    pipeline.prepare([small], ref, PrepareConfig(videos_per_shard=1), progress=False)
    return small, ref


def assert_same_tree(a: Path, b: Path):
    names_a, names_b = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    assert names_a == names_b
    assert not [n for n in names_a if n.startswith(".")], names_a  # no temporaries left
    for n in names_a:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


KILLER = """
import os, signal, sys
from data_pipeline import pipeline, prepare
real = pipeline.ArrayRecordWriter
class DiesInThirdShard:
    def __init__(self, path, options):
        self.path, self.w, self.n = path, real(path, options), 0
    def write(self, blob):
        if "shard-00002" in self.path and self.n == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a machine losing power
        self.w.write(blob)
        self.n += 1
    def close(self):
        self.w.close()
pipeline.ArrayRecordWriter = DiesInThirdShard
sys.exit(prepare.main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_identical_bytes(small, tmp_path, capsys):
    videos, ref = small
    out = tmp_path / "out"
    args = [str(videos), "-o", str(out), "--videos-per-shard", "1", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = {p.name for p in out.iterdir()}
    # sources sorted: cfr30.mov, corrupt.mp4 (no clips: its shard has no file), talk_00000.mp4, ...
    assert {"shard-00000-of-00005.array_record", "shard-00000-of-00005.json", "shard-00001-of-00005.json"} <= names
    assert "shard-00002-of-00005.json" not in names and "manifest.json" not in names
    assert any(n.startswith(".shard-00002-of-00005.array_record.tmp-") for n in names)  # the half-written shard
    finished = {n: (out / n).stat() for n in ("shard-00000-of-00005.array_record", "shard-00000-of-00005.json",
                                              "shard-00001-of-00005.json")}

    assert prepare.main(args) == 0
    # the finished shards were skipped, not redone (a full restart would also give identical bytes)
    assert ", 2 shards already done" in capsys.readouterr().out
    for n, st in finished.items():
        now = (out / n).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    assert_same_tree(ref, out)


def test_failed_write_stops_the_run_and_rerun_completes(small, tmp_path, monkeypatch):
    videos, ref = small
    out = tmp_path / "out"
    real = pipeline.ArrayRecordWriter

    class DiskFull:
        def __init__(self, path, options):
            if "shard-00002" in path:
                raise OSError(f"No space left on device: {path}")
            self.w = real(path, options)

        def write(self, blob):
            self.w.write(blob)

        def close(self):
            self.w.close()

    monkeypatch.setattr(pipeline, "ArrayRecordWriter", DiskFull)
    with pytest.raises(OSError, match="No space left"):
        pipeline.prepare([videos], out, PrepareConfig(videos_per_shard=1), progress=False)
    assert not [p for p in out.iterdir() if p.name.startswith(".")] and not (out / "manifest.json").exists()
    monkeypatch.setattr(pipeline, "ArrayRecordWriter", real)
    summary = pipeline.prepare([videos], out, PrepareConfig(videos_per_shard=1), progress=False)
    assert summary["shards_already_done"] == 2 and summary["shards_written"] == 3
    assert_same_tree(ref, out)
    again = pipeline.prepare([videos], out, PrepareConfig(videos_per_shard=1), progress=False)
    assert again["shards_written"] == 0 and again["clips"] == 0  # a finished run is left as it is
    assert_same_tree(ref, out)


def test_processes_split_shards_by_index(small, tmp_path):
    videos, ref = small
    out = tmp_path / "out"
    s1 = pipeline.prepare([videos], out, PrepareConfig(videos_per_shard=1), process_index=1, process_count=2,
                          progress=False)
    assert s1["shards_written"] == 2 and s1["manifest"] is None  # shards 1 and 3; 0, 2, 4 are process 0's
    s0 = pipeline.prepare([videos], out, PrepareConfig(videos_per_shard=1), process_index=0, process_count=2,
                          progress=False)
    assert s0["shards_written"] == 3 and s0["manifest"]
    assert_same_tree(ref, out)


def test_two_jax_processes_share_the_work(small, tmp_path):
    videos, ref = small
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "data_pipeline.prepare", str(videos), "-o", str(out),
                               "--videos-per-shard", "1", "--no-progress", "--distributed", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    summaries = [[line for line in log.splitlines() if line.startswith("prepare: ")] for log in logs]
    assert "manifest" in summaries[0][-1] and "manifest" not in summaries[1][-1], summaries  # process 0 writes it
    assert_same_tree(ref, out)


# --- readers and errors ---------------------------------------------------------------------------------


def test_grain_and_tfds_read_the_same_records(prepared, tmp_path):
    import tensorflow_datasets as tfds

    from data_pipeline.reader import array_record_source
    from data_pipeline.tfds_builder import build_tfds

    out, summary = prepared
    ds = clip_dataset(out)
    assert len(ds) == summary["clips"] == len(array_record_source(out))
    batch = next(iter(clip_dataset(out, seed=3).to_iter_dataset().batch(4)))
    assert batch["latents"].shape == (4, T, 64, 64, 3) and batch["audio"].shape == (4, T * 640)

    build_tfds(out, tmp_path / "tfds")
    source = tfds.data_source("hallojax_clips/audio_features", data_dir=str(tmp_path / "tfds"))["train"]
    assert len(source) == len(ds)
    # TFDS text is bytes: the file name's own bytes, also for a name that is not UTF-8
    assert [source[i]["source"] for i in range(len(ds))] == [os.fsencode(ds[i]["source"]) for i in range(len(ds))]
    for i in (0, len(ds) // 2, len(ds) - 1):
        a, b = ds[i], source[i]
        assert set(a) == set(b) and int(b["start_frame"]) == int(a["start_frame"])
        for k in ("latents", "ref_latent", "ref_frame", "audio", "audio_features", "face_mask", "face_box"):
            assert b[k].dtype == a[k].dtype and np.array_equal(b[k], a[k]), k


def test_cli_errors_are_one_clear_line(media, prepared, tmp_path, capsys):
    d, _, _ = media
    out, _ = prepared
    cases = [
        ([str(tmp_path / "nope"), "-o", str(tmp_path / "o1")], "does not exist"),
        ([str(d), "-o", str(tmp_path / "o2"), "--frames", "16"], "num_frames must be 1 + 4k"),
        # zero or negative sizes, frames, rates and strides are errors (--size 0 used to mean "not given")
        ([str(d), "-o", str(tmp_path / "o2"), "--size", "0"], "output size must be at least 8x8, got 0x0"),
        ([str(d), "-o", str(tmp_path / "o2"), "--size", "-64"], "output size must be at least 8x8, got -64x-64"),
        ([str(d), "-o", str(tmp_path / "o2"), "--width", "0"], "output size must be at least 8x8, got 0x64"),
        ([str(d), "-o", str(tmp_path / "o2"), "--frames", "0"], "num_frames must be 1 + 4k"),
        ([str(d), "-o", str(tmp_path / "o2"), "--frames", "-3"], "num_frames must be 1 + 4k"),
        ([str(d), "-o", str(tmp_path / "o2"), "--fps", "0"], "fps must be positive, got 0.0"),
        ([str(d), "-o", str(tmp_path / "o2"), "--fps", "-25"], "fps must be positive, got -25.0"),
        ([str(d), "-o", str(tmp_path / "o2"), "--stride", "0"], "stride must be >= 1, got 0"),
        ([str(d), "-o", str(tmp_path / "o2"), "--min-side", "0"], "min_side must be >= 1, got 0"),
        ([str(d), "-o", str(tmp_path / "o2"), "--max-seconds", "-1"], "max_seconds must be positive"),
        ([str(d), "-o", str(tmp_path / "o2"), "--seed", "-1"], "seed must be >= 0, got -1"),
        ([str(d), "-o", str(tmp_path / "o2"), "--videos-per-shard", "0"], "videos_per_shard and encode_batch"),
        ([str(d), "-o", str(tmp_path / "o3"), "--codec", "vae"], "unknown codec 'vae'"),
        ([str(d), "-o", str(tmp_path / "o4"), "--codec", "pixel:3"], "multiple of codec 'pixel:3'"),
        ([str(d), "-o", str(tmp_path / "o5"), "--audio-features", "nope"], "unknown audio features"),
        ([str(d), "-o", str(out), "--frames", "25"], "config.clip.num_frames: 17 -> 25"),
        ([str(d), "-o", str(d / "synth")], "overlap"),
        ([str(d), "-o", str(tmp_path / "taken")], "not a prepare output directory"),
        ([str(d), "-o", str(tmp_path / os.fsdecode(b"o\xe9"))], "not valid UTF-8"),
    ]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("not ours")
    for argv, message in cases:
        assert prepare.main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("prepare: error:") and message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match="finished prepare output"):
        load_manifest(tmp_path)


def test_clip_config_stride_and_max_seconds(media, tmp_path):
    d, _, _ = media
    cfg = PrepareConfig(clip=ClipConfig(num_frames=9, stride=5, max_seconds=1.0, crop="center"), codec="pixel:4")
    pipeline.prepare([d / "vfr.mp4"], tmp_path / "o", cfg, progress=False)
    records = records_by_key(tmp_path / "o")
    # 1 s = 25 frames; 9-frame clips every 5 frames: starts 0, 5, 10, 15
    assert [int(r["start_frame"]) for r in records] == [0, 5, 10, 15]
    assert records[0]["latents"].shape == (9, 16, 16, 48)
    video = PixelCodec(4).decode(records[1]["latents"][None])[0]
    assert list(frame_index(_pixels(video))) == [nearest(VFR_MS / 1000, k) for k in range(5, 14)]

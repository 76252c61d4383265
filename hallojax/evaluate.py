"""Does it learn? Lip sync, identity and stability of generated videos, measured on held-out speech.

    hallojax synthetic data/heldout --num-videos 4 --seed 1000          # people and speech never trained on
    hallojax eval --checkpoint runs/demo/train --videos data/heldout --out runs/eval [--max-seconds 2]

For every synthetic video in the directory (`talk_N.mp4` with its `.face.json` and `.mouth.json`
sidecars: the ground-truth mouth opening per frame), the model generates the person from the video's
first frame three times: with their own speech, with the next video's speech (shuffled) and with silence.
Measured per video and on average (`data_pipeline.synthetic.measure_mouth_opening` reads the mouth opening
off the pixels):

- lip sync: Pearson r of the generated mouth opening against the speech's true track (`r_own`); the
  shuffled and silent videos against the *own* track (`r_shuffled`, `r_silence`). A model that ignores the
  audio scores about the same in all three; a synced one scores high with its own speech and, with
  another's, what the two speeches' true tracks share (`r_truths`: their correlation, the chance level of
  `r_shuffled`; about zero over seconds, up to 0.5 over a second of two speeches that start and pause
  alike). `mouth_std_silence`: how much the mouth still moves without speech.
- identity: SSIM of the generated face box to the portrait's (`identity_own`), against the SSIM to the
  other people's portraits (`identity_others`): a kept identity has own > others; and the distance of the
  face box's colour statistics (`color_own` vs `color_others`, 0..255: lower is closer).
- stability: mean absolute frame-to-frame change outside the mouth region (0..255), generated and ground
  truth (`flicker`, `flicker_truth`).
- fidelity: PSNR and SSIM of the generated frames against the ground-truth video, cropped as the portrait
  (scikit-image's `peak_signal_noise_ratio` / `structural_similarity`).

Outputs in OUT: `eval.json` (settings, per video, means), `mouth_tracks.png` (matplotlib: true vs generated
tracks, own and shuffled speech), and with `--side-by-side` one `N.mp4` per video (truth | generated, with
the speech). The table is printed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hallojax.fsutil import atomic_file, write_json

log = logging.getLogger("hallojax.evaluate")

METRICS = ("r_own", "r_shuffled", "r_truths", "r_silence", "mouth_std_silence", "identity_own", "identity_others",
           "color_own", "color_others", "flicker", "flicker_truth", "psnr", "ssim")


def heldout_videos(directory) -> list[dict]:
    """The synthetic videos of `directory` with their sidecars: [{path, box, truth, fps}]."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--videos {directory}: no such directory")
    out = []
    for path in sorted(directory.glob("talk_*.mp4")):
        face, mouth = path.with_name(path.stem + ".face.json"), path.with_name(path.stem + ".mouth.json")
        if not (face.exists() and mouth.exists()):
            log.warning("%s: no %s / %s sidecar, skipped", path, face.name, mouth.name)
            continue
        try:
            m = json.loads(mouth.read_text())
            out.append({"path": path, "box": [float(v) for v in json.loads(face.read_text())["box"]],
                        "truth": np.asarray(m["mouth_open"], np.float64), "fps": float(m["fps"])})
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable sidecar (%s), skipped", path, e)
    if len(out) < 2:
        raise ValueError(f"--videos {directory}: {len(out)} synthetic videos with sidecars (talk_N.mp4 + .face.json "
                         "+ .mouth.json); need at least 2 (one's speech drives another: `hallojax synthetic DIR`)")
    return out


def _frames(path, limit: int | None) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        frames = []
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            if limit is not None and len(frames) >= limit:
                break
    return np.stack(frames)


def _box_slices(box, height, width, rows=(0.0, 1.0), cols=(0.0, 1.0)):
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    r = slice(max(int(round(y0 + rows[0] * h)), 0), min(int(round(y0 + rows[1] * h)), height))
    c = slice(max(int(round(x0 + cols[0] * w)), 0), min(int(round(x0 + cols[1] * w)), width))
    return r, c


def face_similarity(frames: np.ndarray, reference: np.ndarray, box) -> float:
    """Mean SSIM of the face box of `frames` [T, H, W, 3] to that of `reference` [H, W, 3]."""
    from skimage.metrics import structural_similarity

    r, c = _box_slices(box, *reference.shape[:2])
    ref = reference[r, c]
    side = min(ref.shape[:2])
    win = max(3, min(7, side - (1 - side % 2)))  # odd, no larger than the crop
    return float(np.mean([structural_similarity(f[r, c], ref, channel_axis=-1, win_size=win, data_range=255)
                          for f in frames]))


def color_distance(frames: np.ndarray, reference: np.ndarray, box) -> float:
    """Mean L1 distance (0..255) between the per-channel mean and standard deviation of the face box of
    `frames` and of `reference`: skin, hair and background colours are what tells these people apart."""
    r, c = _box_slices(box, *reference.shape[:2])

    def stats(x):
        x = x[..., r, c, :].reshape(-1, 3).astype(np.float64)
        return np.concatenate([x.mean(0), x.std(0)])

    ref = stats(reference)
    return float(np.mean([np.abs(stats(f) - ref).mean() for f in frames]))


def flicker(frames: np.ndarray, box) -> float:
    """Mean |frame t − frame t−1| outside the mouth window (the lower-middle face), 0..255."""
    if len(frames) < 2:
        return 0.0
    mask = np.ones(frames.shape[1:3], bool)
    r, c = _box_slices(box, *frames.shape[1:3], rows=(0.5, 1.0), cols=(0.2, 0.8))
    mask[r, c] = False
    diff = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=-1)
    return float(diff[:, mask].mean())


def fidelity(frames: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean PSNR dB, mean SSIM) of generated vs ground-truth frames (scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    n = min(len(frames), len(truth))
    psnr = [peak_signal_noise_ratio(truth[i], frames[i], data_range=255) for i in range(n)]
    side = min(frames.shape[1:3])
    win = max(3, min(7, side - (1 - side % 2)))
    ssim = [structural_similarity(truth[i], frames[i], channel_axis=-1, win_size=win, data_range=255)
            for i in range(n)]
    return float(np.mean(np.minimum(psnr, 100.0))), float(np.mean(ssim))


def evaluate(pipe, videos: list[dict], *, max_seconds: float | None = None, seed: int = 0, progress: bool = False,
             **sample_kw) -> dict:
    """Generate and score every held-out video (see the module docstring); returns {"videos", "mean"}."""
    from data_pipeline.synthetic import lipsync_correlation, measure_mouth_opening
    from hallojax.pipeline import prepare_portrait
    from hallojax.media import read_audio

    people = []
    for v in videos:  # the portraits and speech (trimmed to max_seconds)
        first = _frames(v["path"], 1)[0]
        wave, rate = read_audio(v["path"])
        if max_seconds is not None:
            wave = wave[:int(round(max_seconds * rate))]
        people.append(dict(v, image=first, wave=wave, rate=rate))
    rows = []
    for i, p in enumerate(people):
        t0 = time.perf_counter()
        other = people[(i + 1) % len(people)]
        kw = dict(face_box=p["box"], seed=seed, progress=progress, **sample_kw)
        own = pipe.generate(p["image"], (p["wave"], p["rate"]), **kw)
        # the generated video is as long as the speech, which may outlast the ground truth's frames
        n = min(len(own.frames), len(p["truth"]))
        shuffled = pipe.generate(p["image"], (other["wave"], other["rate"]), **kw)
        silent = pipe.generate(p["image"], (np.zeros_like(p["wave"]), p["rate"]), allow_silent=True, **kw)
        box, h, w = own.portrait.box, *own.frames.shape[1:3]
        truth = p["truth"][:n]
        measured = {name: measure_mouth_opening(r.frames[:n], box) for name, r in
                    (("own", own), ("shuffled", shuffled), ("silence", silent))}
        m = min(n, len(measured["shuffled"]))
        k = min(m, len(other["truth"]))  # the frames r_shuffled is measured on
        # the ground truth cropped exactly as the portrait was (same region, same resize)
        gt = _frames(p["path"], n)
        region_frames = np.stack([prepare_portrait(f, w, h, box=p["box"], box_scale=pipe.spec.box_scale).frame
                                  for f in gt])
        others = [prepare_portrait(q["image"], w, h, box=q["box"], box_scale=pipe.spec.box_scale).frame
                  for j, q in enumerate(people) if j != i]
        psnr, ssim = fidelity(own.frames, region_frames)
        row = {
            "video": str(p["path"]), "frames": n, "seconds": round(n / own.fps, 3),
            "r_own": lipsync_correlation(measured["own"], truth),
            "r_shuffled": lipsync_correlation(measured["shuffled"][:m], truth[:m]),
            "r_silence": lipsync_correlation(measured["silence"], truth),
            "r_truths": lipsync_correlation(other["truth"][:k], truth[:k]),
            "mouth_std_silence": float(np.std(measured["silence"])),
            "identity_own": face_similarity(own.frames, own.portrait.frame, box),
            "identity_others": float(np.mean([face_similarity(own.frames, o, box) for o in others])),
            "color_own": color_distance(own.frames, own.portrait.frame, box),
            "color_others": float(np.mean([color_distance(own.frames, o, box) for o in others])),
            "flicker": flicker(own.frames, box), "flicker_truth": flicker(region_frames, box),
            "psnr": psnr, "ssim": ssim,
            "tracks": {"truth": truth.tolist(), "own": measured["own"].tolist(),
                       "shuffled": measured["shuffled"][:m].tolist(), "silence": measured["silence"].tolist()},
            "seconds_to_score": time.perf_counter() - t0,
        }
        row["_frames"], row["_truth_frames"], row["_speech"] = own.frames, region_frames, (p["wave"], p["rate"])
        rows.append(row)
        log.info("%s: r own %.3f, shuffled %.3f, silence %.3f; identity %.3f vs others %.3f; PSNR %.1f dB",
                 p["path"].name, row["r_own"], row["r_shuffled"], row["r_silence"], row["identity_own"],
                 row["identity_others"], row["psnr"])
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    return {"videos": rows, "mean": mean}


def table(result: dict) -> str:
    cols = ("video",) + METRICS
    lines = [cols] + [(Path(r["video"]).stem,) + tuple(f"{r[k]:.3f}" for k in METRICS) for r in result["videos"]]
    lines.append(("mean",) + tuple(f"{result['mean'][k]:.3f}" for k in METRICS))
    widths = [max(len(row[i]) for row in lines) for i in range(len(cols))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]])


def plot_tracks(result: dict, path: Path) -> Path:
    """True vs generated mouth-opening tracks per video (own and shuffled speech), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["videos"]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.2 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        t = r["tracks"]

        def z(x):
            x = np.asarray(x, np.float64)
            return (x - x.mean()) / (x.std() + 1e-9)

        ax.plot(z(t["truth"]), "k-", lw=1.5, label="true (speech)")
        ax.plot(z(t["own"]), "C0-", lw=1, label=f"generated, own speech (r {r['r_own']:.2f})")
        ax.plot(z(t["shuffled"]), "C3--", lw=1, label=f"generated, other speech (r {r['r_shuffled']:.2f})")
        ax.set_title(Path(r["video"]).name, fontsize=9)
        ax.set_ylabel("mouth (z)")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def save(result: dict, out_dir, settings: dict, side_by_side: bool = False, fps: float = 25.0) -> dict:
    """eval.json, mouth_tracks.png and (side_by_side) N.mp4 files in `out_dir`, each written atomically."""
    from hallojax.media import write_mp4

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": str(plot_tracks(result, out / "mouth_tracks.png"))}
    if side_by_side:
        for r in result["videos"]:
            video = np.concatenate([r["_truth_frames"][:len(r["_frames"])], r["_frames"]], axis=2)
            wave, rate = r["_speech"]
            write_mp4(out / f"{Path(r['video']).stem}.mp4", video, wave, fps, rate)
    clean = {"settings": settings, "mean": result["mean"],
             "videos": [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["videos"]]}
    paths["json"] = str(write_json(out / "eval.json", clean))
    return paths


# --- command line --------------------------------------------------------------------------------
def add_arguments(p) -> None:
    from hallojax.sample.solvers import SAMPLERS

    p.add_argument("--checkpoint", required=True, help="a `hallojax train` workdir or a converted directory")
    p.add_argument("--videos", required=True, help="held-out synthetic videos (`hallojax synthetic DIR --seed S`)")
    p.add_argument("--out", required=True, help="directory for eval.json, mouth_tracks.png (and videos)")
    p.add_argument("--num-videos", type=int, default=None, help="score the first N videos (default: all)")
    p.add_argument("--max-seconds", type=float, default=None, help="use at most this much of each speech")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--guidance", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="workdir: this checkpoint step")
    p.add_argument("--weights", choices=["auto", "ema", "params"], default="auto")
    p.add_argument("--side-by-side", action="store_true", help="also write truth | generated mp4s")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="workdir: score every checkpoint step (the learning curve: curve.json, curve.png)")


def run(args, overrides=()) -> int:
    from hallojax.generate import Pipeline

    for name in ("num_videos", "steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ValueError(f"--max-seconds {args.max_seconds}: must be positive")
    videos = heldout_videos(args.videos)[:args.num_videos]
    if len(videos) < 2:
        raise ValueError(f"--num-videos {args.num_videos}: need at least 2 videos (one's speech drives another)")
    pipe = Pipeline.load(args.checkpoint, step=args.step, weights=args.weights, overrides=overrides)
    t0 = time.perf_counter()
    sample_kw = {k: getattr(args, k) for k in ("sampler", "steps", "shift", "guidance") if getattr(args, k) is not None}
    if args.every_checkpoint:
        return _curve(pipe, videos, args, sample_kw)
    result = evaluate(pipe, videos, max_seconds=args.max_seconds, seed=args.seed, **sample_kw)
    settings = {"checkpoint": pipe.loaded.source, "videos": args.videos, "max_seconds": args.max_seconds,
                "seed": args.seed, **sample_kw, "seconds": time.perf_counter() - t0}
    paths = save(result, args.out, settings, side_by_side=args.side_by_side, fps=pipe.spec.fps)
    print(table(result))
    print(f"wrote {paths['json']} and {paths['plot']} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _curve(pipe, videos, args, sample_kw) -> int:
    """Every checkpoint of a workdir scored on the same videos: r (own / shuffled / silence) and identity
    against step; curve.json, curve.png and a table."""
    from hallojax.pipeline import _steps_in

    if pipe.loaded.source.get("kind") != "workdir":
        raise ValueError("--every-checkpoint needs a `hallojax train` workdir as --checkpoint")
    workdir = Path(pipe.loaded.source["path"])
    points = []
    for step in _steps_in(workdir):
        pipe.load_step(step, args.weights)
        mean = evaluate(pipe, videos, max_seconds=args.max_seconds, seed=args.seed, **sample_kw)["mean"]
        points.append({"step": step, "weights": pipe.loaded.source["weights"], **mean})
        log.info("step %d (%s): r own %.3f, shuffled %.3f (speeches %.3f), silence %.3f", step,
                 points[-1]["weights"], mean["r_own"], mean["r_shuffled"], mean["r_truths"], mean["r_silence"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "curve.json", {"checkpoint": str(workdir), "videos": args.videos, "points": points})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = [p["step"] for p in points]
    for key, style in (("r_own", "C0o-"), ("r_shuffled", "C3s--"), ("r_silence", "C7^:")):
        ax.plot(steps, [p[key] for p in points], style, label=key.replace("r_", "r, ").replace("_", " "))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("lip-sync r")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out / "curve.png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    print("| step | weights | r own | r shuffled (speeches) | r silence | identity own / others |")
    print("|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['step']} | {p['weights']} | {p['r_own']:.3f} | {p['r_shuffled']:.3f} ({p['r_truths']:.3f}) | "
              f"{p['r_silence']:.3f} | "
              f"{p['identity_own']:.3f} / {p['identity_others']:.3f} |")
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return 0

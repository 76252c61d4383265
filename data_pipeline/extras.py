"""Stage 2 extras: per-video conditioning given as files, and model-specific latents the codec computes.

    prepare VIDEOS -o OUT --codec cogvideox-vae:DIR --audio-features wav2vec2:DIR \\
        --face-embeddings faces.npz --text-states t5.npz --extras hallo3

Per-video files (encoders that are not ours; all optional, every video must have its key):
- ``--face-embeddings FILE.npz``: key = a video's `source` (its path relative to its input directory) ->
  [E] float (InsightFace's raw 512-d embedding for Hallo3) -> record field `face_embedding` [E].
- ``--text-states FILE.npz``: ``SOURCE`` -> [L, D] states, optional ``SOURCE/mask`` [L] (1 = token) and
  ``SOURCE/pooled`` [P]; or a single ``*`` key (with ``*/mask``, ``*/pooled``) for every video -> fields
  `text_states`, `text_mask`, `text_pooled`.
- ``--captions FILE.json --text-encoder DIR --tokenizer DIR [--text-len 226]``: instead of text states, a
  caption per video (``{SOURCE: text}`` or ``{"*": text}``) encoded in prepare by a converted T5 / umT5
  (`hallojax convert t5`) as `hallojax generate` encodes Hallo3's prompt (`encoders.t5.encode_text`: padded to
  the text length, zero states after the caption) -> `text_states` [text_len, D].
A file's keys are checked when prepare starts (from the .npy headers: a wrong rank or size is one error
naming the file and key); arrays are read when their video is prepared (lazily: text states of many
videos need not fit in memory). A video without its key, or with non-finite values, is skipped and named
in report.json, never given zeros.

Extras (``--extras NAME[,NAME]``), latents of the clip's pixels through the set's codec:
- ``hallo3``: `concat_latent` [1, h, w, C] = codec([reference, motion₁, motion₂]) with the motion frames the
  clip's first 2 frames plus pixel noise σ·ε, σ = exp(N(−3, 0.5²)), then one spatial mask (u ≤ 0.1 -> 0,
  both frames, all channels), as the released `shared_step` (hallo3.md §1.7); the draws come from a
  generator keyed by (seed, source, clip), so prepare stays deterministic, and are fixed per clip (released:
  redrawn every step). `masked_ref_latent` [1, h, w, C] = codec(reference × the record's face box mask), the
  reference net's input (the released training's bbox mask, §4).
- ``hunyuan-avatar``: `ref_video_latent` [F, h, w, C] = codec(the reference frame repeated over the clip's T
  frames), the Avatar's `ref_latents` (hyavatar_letstalk.md B.2).
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_pipeline.clips import SkipVideo, _stable_hash

EXTRAS = ("hallo3", "hunyuan-avatar")
HALLO3_MOTION = 2  # pixel motion frames (`n_motion_frame`)
HALLO3_MASK_RATE = 0.1  # motion pixels with u <= 0.1 zeroed (`add_mask_to_first_frame`)
HALLO3_LOG_SIGMA = (-3.0, 0.5)  # `add_noise_to_first_frame`: σ = exp(N(mean, std²)) per sample
EVERY = "*"  # a text-states key used for every video


def parse_extras(spec: str | None) -> tuple[str, ...]:
    names = tuple(sorted({s.strip() for s in (spec or "").split(",") if s.strip()}))
    bad = [n for n in names if n not in EXTRAS]
    if bad:
        raise ValueError(f"--extras {spec}: unknown {bad}; known: {list(EXTRAS)}")
    return names


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Npz:
    """An .npz file read lazily (text states of many videos need not fit in memory): every key's shape and
    dtype from the .npy headers at once (`shapes`), an array only when a video asks for it (`get`)."""

    def __init__(self, path, flag: str):
        import zipfile

        self.path, self.flag = path, flag
        try:
            self.file = np.load(path, allow_pickle=False)
            if not isinstance(self.file, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive of named arrays")
            self.shapes = {}
            for name in self.file.zip.namelist():
                with self.file.zip.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                self.shapes[name[:-4] if name.endswith(".npy") else name] = (tuple(shape), np.dtype(dtype))
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{flag} {path}: not a readable .npz file ({e})") from None

    def check(self, key: str, ndim: int, what: str) -> tuple[int, ...]:
        shape, dtype = self.shapes[key]
        if len(shape) != ndim or not np.issubdtype(dtype, np.number) or 0 in shape:
            raise ValueError(f"{self.flag} {self.path}: key {key!r} has shape {list(shape)} ({dtype}); "
                             f"expected {what}")
        return shape

    def get(self, key: str) -> np.ndarray:
        a = np.asarray(self.file[key], np.float32)
        if not np.all(np.isfinite(a)):  # found when the video is prepared: that video is skipped
            raise SkipVideo(f"{self.flag} {self.path}: key {key!r} holds non-finite values")
        return a


class VideoConditioning:
    """The per-video files of one prepare run: checked whole on construction (every key's shape); `fields(source)`
    gives a video's record fields or raises SkipVideo when the video has no key (or non-finite values)."""

    def __init__(self, face_embeddings: str | None = None, text_states: str | None = None,
                 captions: str | None = None, text_encoder: str | None = None, tokenizer: str | None = None,
                 text_len: int | None = None):
        if captions and text_states:
            raise ValueError("--captions and --text-states both give the text states: choose one")
        if (text_encoder or tokenizer or text_len) and not captions:
            raise ValueError("--text-encoder, --tokenizer and --text-len encode --captions: give the captions file")
        self.face_path, self.text_path, self.captions_path = face_embeddings, text_states, captions
        self.faces = self._faces(face_embeddings) if face_embeddings else None
        self.texts = self._texts(text_states) if text_states else None
        self.captions = self._captions(captions) if captions else None
        self.text_encoder, self.tokenizer, self.text_len = text_encoder, tokenizer, int(text_len or 226)
        self._encoder, self._encoded = None, {}
        if captions:
            self._load_encoder()

    @staticmethod
    def _faces(path) -> _Npz:
        npz = _Npz(path, "--face-embeddings")
        sizes = {npz.check(k, 1, "[E] numbers (one embedding per video)")[0] for k in npz.shapes}
        if len(sizes) > 1:
            raise ValueError(f"--face-embeddings {path}: embeddings of different sizes {sorted(sizes)}; expected one "
                             "size E")
        return npz

    @staticmethod
    def _texts(path) -> tuple[_Npz, dict[str, dict[str, str]]]:
        """(the file, {video key: {record field: npz key}})."""
        flag = "--text-states"
        npz = _Npz(path, flag)
        out: dict[str, dict[str, str]] = {}
        for key in sorted(npz.shapes):  # states first: "a" sorts before "a/mask"
            base, _, part = key.rpartition("/") if key.endswith(("/mask", "/pooled")) else (key, "", "")
            if not part:
                npz.check(key, 2, "[L, D] states")
                out[key] = {"text_states": key}
                continue
            if base not in out:
                raise ValueError(f"{flag} {path}: key {key!r} without states {base!r}")
            if part == "mask":
                n = npz.shapes[base][0][0]
                if npz.check(key, 1, f"[L] = [{n}] (1 = token)")[0] != n:
                    raise ValueError(f"{flag} {path}: key {key!r} has shape {list(npz.shapes[key][0])}; expected "
                                     f"[{n}] (the length of {base!r})")
                out[base]["text_mask"] = key
            else:
                npz.check(key, 1, "[P] numbers")
                out[base]["text_pooled"] = key
        for name, what in (("text_states", "D"), ("text_pooled", "P")):
            sizes = {npz.shapes[v[name]][0][-1] for v in out.values() if name in v}
            if len(sizes) > 1:
                raise ValueError(f"{flag} {path}: {name} of different sizes {what} = {sorted(sizes)}; expected one")
        for name, part in (("text_mask", "mask"), ("text_pooled", "pooled")):  # every record: the same fields
            have = sorted(k for k, v in out.items() if name in v)
            if have and len(have) < len(out):
                lack = sorted(k for k in out if k not in have)
                raise ValueError(f"{flag} {path}: key {lack[0] + '/' + part!r} is missing ({len(lack)} of {len(out)} "
                                 f"videos lack SOURCE/{part}); give it for every video or for none")
        if EVERY in out and len(out) > 1:
            raise ValueError(f"{flag} {path}: key {EVERY!r} (every video) together with per-video keys "
                             f"{sorted(k for k in out if k != EVERY)[:3]}; give one or the other")
        return npz, out

    @staticmethod
    def _captions(path) -> dict[str, str]:
        import json

        try:
            captions = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            raise ValueError(f"--captions {path}: not a readable JSON file ({e})") from None
        if not isinstance(captions, dict) or not captions:
            raise ValueError(f"--captions {path}: expected a JSON object {{SOURCE: caption, ...}} or "
                             '{"*": caption}')
        bad = [k for k, v in captions.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"--captions {path}: key {bad[0]!r} holds a {type(captions[bad[0]]).__name__}, "
                             "not a caption string")
        return captions

    def _load_encoder(self) -> None:
        from hallojax.checkpoint import load_pretrained
        from hallojax.models.encoders.t5 import T5Encoder, load_tokenizer

        if not (self.text_encoder and self.tokenizer):
            raise ValueError("--captions needs --text-encoder DIR (a `hallojax convert t5` directory) and "
                             "--tokenizer DIR (its tokenizer)")
        if self.text_len < 1:
            raise ValueError(f"--text-len {self.text_len}: must be >= 1")
        encoder, _ = load_pretrained(self.text_encoder)
        if not isinstance(encoder, T5Encoder):
            raise ValueError(f"--text-encoder {self.text_encoder} holds a {type(encoder).__name__}, not a T5 "
                             "encoder")
        self._encoder = (encoder, load_tokenizer(self.tokenizer))

    def _caption_fields(self, source: str) -> dict:
        from hallojax.models.encoders.t5 import encode_text

        caption = self.captions.get(source, self.captions.get(EVERY))
        if caption is None:
            raise SkipVideo(f"no caption for {source!r} in --captions {self.captions_path}")
        if caption not in self._encoded:
            encoder, tokenizer = self._encoder
            self._encoded[caption] = np.asarray(encode_text(encoder, tokenizer, [caption],
                                                            max_length=self.text_len), np.float32)[0]
        return {"text_states": self._encoded[caption]}

    def fields(self, source: str) -> dict:
        out = {}
        if self.faces is not None:
            if source not in self.faces.shapes:
                raise SkipVideo(f"no face embedding for {source!r} in --face-embeddings {self.face_path}")
            out["face_embedding"] = self.faces.get(source)
        if self.texts is not None:
            npz, keys = self.texts
            entry = keys.get(source, keys.get(EVERY))
            if entry is None:
                raise SkipVideo(f"no text states for {source!r} in --text-states {self.text_path}")
            out.update({field: npz.get(key) for field, key in entry.items()})
        if self.captions is not None:
            out.update(self._caption_fields(source))
        return out

    def plan(self) -> dict:
        """What plan.json records of the files (a rerun with changed files is refused)."""
        files = (("face_embeddings", self.face_path), ("text_states", self.text_path), ("captions", self.captions_path))
        out = {flag: {"path": str(p), "sha256": file_sha256(p)} for flag, p in files if p}
        if self.captions_path:
            out["text_encoder"] = {"path": str(self.text_encoder), "tokenizer": str(self.tokenizer),
                                   "text_len": self.text_len}
        return out


# --- codec extras ---------------------------------------------------------------------------------
def hallo3_motion_draw(seed: int, source: str, clip_index: int, height: int, width: int):
    """(σ, ε [2, H, W, 3], zeroed [H, W] bool) of one clip's motion frames, keyed by (seed, source, clip)."""
    rng = np.random.default_rng([seed, _stable_hash(source), clip_index, 3])
    sigma = float(np.exp(rng.normal(*HALLO3_LOG_SIGMA)))
    eps = rng.standard_normal((HALLO3_MOTION, height, width, 3)).astype(np.float32)
    return sigma, eps, rng.uniform(size=(height, width)) <= HALLO3_MASK_RATE


def codec_extras(names, codec, clips, idx, video: np.ndarray, refs: np.ndarray, seed: int) -> dict:
    """{field: [B, ...]} of the extras `names` for clips `idx` of a video: their pixels `video` [B, T, H, W, 3]
    and reference frames `refs` [B, 1, H, W, 3], both in [-1, 1]."""
    out = {}
    if "hallo3" in names:
        motion = video[:, :HALLO3_MOTION].copy()
        for j, i in enumerate(idx):
            sigma, eps, zero = hallo3_motion_draw(seed, clips.source, i, *video.shape[2:4])
            motion[j] += sigma * eps
            motion[j][:, zero] = 0.0
        out["concat_latent"] = np.asarray(codec.encode(np.concatenate([refs, motion], axis=1)), np.float32)
        face = clips.face_mask.astype(np.float32)[None, None, :, :, None]
        out["masked_ref_latent"] = np.asarray(codec.encode(refs * face), np.float32)
    if "hunyuan-avatar" in names:
        out["ref_video_latent"] = np.asarray(codec.encode(np.repeat(refs, video.shape[1], axis=1)), np.float32)
    return out


def check_codec(names, codec) -> None:
    """Refuse extras the codec cannot make before any video is read."""
    if names and codec.temporal_stride != 4:
        raise ValueError(f"--extras {','.join(names)}: codec {codec.name!r} has temporal stride "
                         f"{codec.temporal_stride}; Hallo3 and HunyuanVideo-Avatar take a codec of stride 4 "
                         "(cogvideox-vae:DIR, hunyuan-vae:DIR)")

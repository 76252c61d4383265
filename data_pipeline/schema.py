"""The training-record schema: one record = one clip, a set of named numpy arrays; and its byte format.

Shards are ArrayRecord files of records encoded by `encode_record`; `decode_record` is the only reader
(used by `reader.py`, the TFDS builder and the tests), so the format lives in this one file.

Schema version 1 (letters: T video frames, F latent frames, H/W output pixels, h/w latent grid,
C latent channels, S audio samples, N feature layers, D feature width; the optional fields after
`audio_features` are written only by runs given the flag in brackets (`data_pipeline/extras.py`), so sets
prepared without them are unchanged, and readers before them read those sets as ever):

| field            | dtype   | shape          | meaning                                                         |
|------------------|---------|----------------|-----------------------------------------------------------------|
| `latents`        | float32 | [F, h, w, C]   | codec latents of the clip's T frames (channels last)            |
| `ref_latent`     | float32 | [1, h, w, C]   | codec latent of the reference frame (encoded as a 1-frame video)|
| `ref_frame`      | uint8   | [H, W, 3]      | the reference frame, RGB (for image encoders / face embedders)  |
| `audio`          | float32 | [S]            | 16 kHz mono waveform cut exactly to the clip, S = T·16000/fps   |
| `face_mask`      | uint8   | [H, W]         | 1 inside the face box, 0 outside; all 1 when no box was given    |
| `face_box`       | float32 | [4]            | face box x0, y0, x1, y1 in output pixels; [0, 0, W, H] if none  |
| `audio_features` | float32 | [T, N, D]      | optional: per-frame audio features (e.g. wav2vec2 layers;       |
|                  |         |                | whisper: the Avatar's 10-frame window x layers, window-major)   |
| `face_embedding` | float32 | [E]            | [--face-embeddings] the video's face identity embedding         |
| `text_states`    | float32 | [Lt, Dt]       | [--text-states, or --captions encoded by a T5] text states      |
| `text_mask`      | float32 | [Lt]           | [--text-states, SOURCE/mask] 1 = token                          |
| `text_pooled`    | float32 | [P]            | [--text-states, SOURCE/pooled] pooled text vector (CLIP)        |
| `concat_latent`  | float32 | [Fc, h, w, C]  | [--extras hallo3] codec([reference, 2 noised, masked motion     |
|                  |         |                | frames = the clip's first 2]): Hallo3's concat latent (Fc = 1)  |
| `masked_ref_latent` | float32 | [1, h, w, C] | [--extras hallo3] codec(reference x face_mask): reference net   |
| `ref_video_latent` | float32 | [F, h, w, C] | [--extras hunyuan-avatar] codec(reference repeated T times)     |
| `source`         | str     | []             | the input video, relative to its input directory                |
| `clip_index`     | int32   | []             | index of the clip within its video                              |
| `start_frame`    | int32   | []             | first frame of the clip on the resampled (fps) timeline         |
| `num_frames`     | int32   | []             | T                                                               |
| `ref_index`      | int32   | []             | frame of the reference on the resampled timeline                |
| `fps`            | float32 | []             | frame rate of the clip                                          |
| `sample_rate`    | int32   | []             | audio sample rate (16000)                                       |

Byte layout of one record (all integers little-endian):

    0   4 bytes   magic b"HJXR"
    4   uint32    schema version
    8   uint32    n = length of the header
    12  n bytes   header: UTF-8 JSON {"fields": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]},
                  fields in name order, keys sorted, no whitespace
    ... payload: each array's C-order little-endian bytes at `offset` from the start of the record,
                  every offset a multiple of 64 (zero padding), so arrays decode as zero-copy views.

Strings are stored as UTF-8 bytes with dtype "str"; a `source` whose file name is not valid UTF-8 (POSIX
names are bytes) is stored as the name's own bytes: Python carries such a name surrogate-escaped
(`os.fsdecode`), and encode/decode use UTF-8 with "surrogateescape", so `os.fsencode(record["source"])`
gives the file's name back byte for byte. Encoding is a pure function of the arrays, so equal
inputs give byte-identical records (and shards). Readers refuse other magics and versions.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"HJXR"
ALIGN = 64
SAMPLE_RATE = 16000
STR_ERRORS = "surrogateescape"  # str fields: file names that are not UTF-8 keep their bytes

_DTYPES = ("float32", "float16", "bfloat16", "uint8", "int32", "int64", "bool", "str")


class RecordError(ValueError):
    """A record that does not follow the schema (names the field, its dtype and shape)."""


@dataclasses.dataclass(frozen=True)
class Field:
    dtype: str
    shape: tuple[str | int, ...]  # symbolic dims are shared across fields of one record
    doc: str
    required: bool = True


FIELDS: dict[str, Field] = {
    "latents": Field("float32", ("F", "h", "w", "C"), "codec latents of the clip"),
    "ref_latent": Field("float32", (1, "h", "w", "C"), "codec latent of the reference frame"),
    "ref_frame": Field("uint8", ("H", "W", 3), "reference frame, RGB"),
    "audio": Field("float32", ("S",), "16 kHz mono waveform of the clip"),
    "face_mask": Field("uint8", ("H", "W"), "1 inside the face box"),
    "face_box": Field("float32", (4,), "x0, y0, x1, y1 in output pixels"),
    "audio_features": Field("float32", ("T", "N", "D"), "per-frame audio features", required=False),
    "face_embedding": Field("float32", ("E",), "face identity embedding of the video", required=False),
    "text_states": Field("float32", ("Lt", "Dt"), "text encoder states of the video", required=False),
    "text_mask": Field("float32", ("Lt",), "1 = text token", required=False),
    "text_pooled": Field("float32", ("P",), "pooled text vector", required=False),
    "concat_latent": Field("float32", ("Fc", "h", "w", "C"), "codec latent of [reference, motion1, motion2]",
                           required=False),
    "masked_ref_latent": Field("float32", (1, "h", "w", "C"), "codec latent of the face-masked reference",
                               required=False),
    "ref_video_latent": Field("float32", ("F", "h", "w", "C"), "codec latent of the reference repeated T times",
                              required=False),
    "source": Field("str", (), "input video, relative to its input directory"),
    "clip_index": Field("int32", (), "clip number within the video"),
    "start_frame": Field("int32", (), "first frame on the resampled timeline"),
    "num_frames": Field("int32", (), "T"),
    "ref_index": Field("int32", (), "reference frame on the resampled timeline"),
    "fps": Field("float32", (), "frame rate"),
    "sample_rate": Field("int32", (), "audio sample rate"),
}


def describe() -> dict:
    """The schema as plain JSON data (written into every manifest)."""
    return {"version": SCHEMA_VERSION,
            "fields": {k: {"dtype": f.dtype, "shape": list(f.shape), "required": f.required, "doc": f.doc}
                       for k, f in FIELDS.items()}}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name).newbyteorder("<")


def _dtype_name(a: np.ndarray) -> str:
    return "str" if a.dtype.kind in "US" else a.dtype.name


def validate(record: dict) -> dict:
    """Check names, dtypes, ranks and shared dimensions; returns the symbolic sizes {"T": 17, ...}."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise RecordError(f"record has fields not in schema v{SCHEMA_VERSION}: {unknown}")
    missing = sorted(k for k, f in FIELDS.items() if f.required and k not in record)
    if missing:
        raise RecordError(f"record lacks required fields {missing}")
    dims: dict[str, tuple[int, str]] = {}
    for name, value in record.items():
        spec = FIELDS[name]
        if spec.dtype == "str":
            if not isinstance(value, str):
                raise RecordError(f"field {name!r} must be a str, got {type(value).__name__}")
            continue
        a = np.asarray(value)
        if _dtype_name(a) != spec.dtype:
            raise RecordError(f"field {name!r} must be {spec.dtype}, got {a.dtype} with shape {a.shape}")
        if a.ndim != len(spec.shape):
            raise RecordError(f"field {name!r} must have shape {list(spec.shape)}, got {a.shape}")
        for sym, size in zip(spec.shape, a.shape):
            if isinstance(sym, int):
                if size != sym:
                    raise RecordError(f"field {name!r} must have shape {list(spec.shape)}, got {a.shape}")
            elif sym in dims and dims[sym][0] != size:
                other, prev = dims[sym][1], dims[sym][0]
                raise RecordError(f"field {name!r} shape {a.shape} gives {sym}={size}, "
                                  f"but field {other!r} gives {sym}={prev}")
            else:
                dims.setdefault(sym, (size, name))
    if "T" in dims and int(record["num_frames"]) != dims["T"][0]:
        raise RecordError(f"num_frames={int(record['num_frames'])} but audio_features has T={dims['T'][0]}")
    return {k: v[0] for k, v in dims.items()}


def encode_record(record: dict) -> bytes:
    """Serialise one record (validated against the schema) to bytes; deterministic."""
    validate(record)
    entries, payload, offset = [], [], 0
    for name in sorted(record):
        value = record[name]
        if FIELDS[name].dtype == "str":
            data, dtype, shape = value.encode("utf-8", STR_ERRORS), "str", []
        else:
            a = np.asarray(record[name], dtype=_np_dtype(FIELDS[name].dtype), order="C")  # keeps 0-d as 0-d
            data, dtype, shape = a.tobytes(), FIELDS[name].dtype, list(a.shape)
        entries.append({"name": name, "dtype": dtype, "shape": shape, "nbytes": len(data)})
        payload.append(data)
    # the first offset depends on the header's length, which depends on the offsets' digits: grow the
    # reserved header space until the header fits in it (two rounds at most in practice)
    reserved = 0
    while True:
        first = -(-(12 + reserved) // ALIGN) * ALIGN
        offset = first
        for e, data in zip(entries, payload):
            e["offset"] = offset
            offset += -(-len(data) // ALIGN) * ALIGN
        header = json.dumps({"fields": entries}, sort_keys=True, separators=(",", ":")).encode()
        if 12 + len(header) <= first:
            break
        reserved = len(header)
    out = bytearray(offset)
    out[:12] = MAGIC + struct.pack("<II", SCHEMA_VERSION, len(header))
    out[12:12 + len(header)] = header
    for e, data in zip(entries, payload):
        out[e["offset"]:e["offset"] + len(data)] = data
    return bytes(out)


def decode_record(blob: bytes) -> dict:
    """Bytes -> {name: numpy array (read-only view) or str}. Refuses other magics, versions, truncation."""
    buf = memoryview(blob)
    if len(buf) < 12 or bytes(buf[:4]) != MAGIC:
        raise RecordError(f"not a hallojax record (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    version, header_len = struct.unpack("<II", buf[4:12])
    if version != SCHEMA_VERSION:
        raise RecordError(f"record has schema version {version}; this reader understands {SCHEMA_VERSION}")
    try:
        header = json.loads(bytes(buf[12:12 + header_len]))
        entries = header["fields"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"record header is unreadable ({e})") from None
    out = {}
    for e in entries:
        try:
            name, dtype_name, shape = e["name"], e["dtype"], tuple(int(d) for d in e["shape"])
            start, n = int(e["offset"]), int(e["nbytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise RecordError(f"record header entry {e!r} is malformed ({err})") from None
        if dtype_name not in _DTYPES:
            raise RecordError(f"field {name!r} has unknown dtype {dtype_name!r}; known: {list(_DTYPES)}")
        if start < 12 + header_len or start + n > len(buf):
            raise RecordError(f"record truncated or corrupt: field {name!r} claims bytes {start}..{start + n}, "
                              f"record has {len(buf)}")
        if dtype_name == "str":
            out[name] = bytes(buf[start:start + n]).decode("utf-8", STR_ERRORS)
            continue
        dtype = _np_dtype(dtype_name)
        if n != int(np.prod(shape)) * dtype.itemsize:
            raise RecordError(f"field {name!r}: {n} bytes do not hold {dtype_name} {list(shape)}")
        out[name] = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize, offset=start).reshape(shape)
    validate(out)
    return out

"""The record schema: exact round trips, deterministic aligned bytes, and clear errors for records that
break it (missing fields, wrong dtypes or shapes, inconsistent dimensions, foreign or damaged bytes)."""

import json
import struct

import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline.schema import (
    FIELDS,
    SCHEMA_VERSION,
    RecordError,
    decode_record,
    encode_record,
)


def make_record(t=5, h=8, w=12, c=3, layers=None, seed=0):
    rng = np.random.default_rng(seed)
    r = dict(
        latents=rng.normal(size=(t, h, w, c)).astype(np.float32),
        ref_latent=rng.normal(size=(1, h, w, c)).astype(np.float32),
        ref_frame=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        audio=rng.normal(size=t * 640).astype(np.float32),
        face_mask=rng.integers(0, 2, (h, w), dtype=np.uint8),
        face_box=np.array([1, 2, 7, 6], np.float32),
        source="dir/ünïcode clip.mp4",
        clip_index=np.int32(3), start_frame=np.int32(51), num_frames=np.int32(t), ref_index=np.int32(2),
        fps=np.float32(25), sample_rate=np.int32(16000),
    )
    if layers:
        r["audio_features"] = rng.normal(size=(t, layers, 4)).astype(np.float32)
    return r


@pytest.mark.parametrize("layers", [None, 3])
def test_round_trip_is_exact_and_deterministic(layers):
    r = make_record(layers=layers)
    blob = encode_record(r)
    assert blob == encode_record(make_record(layers=layers))  # same arrays, same bytes
    assert blob[:4] == b"HJXR" and struct.unpack("<I", blob[4:8])[0] == SCHEMA_VERSION
    header = json.loads(blob[12:12 + struct.unpack("<I", blob[8:12])[0]])
    assert all(e["offset"] % 64 == 0 for e in header["fields"])
    d = decode_record(blob)
    assert set(d) == set(r)
    for k, v in r.items():
        if isinstance(v, str):
            assert d[k] == v
        else:
            assert d[k].dtype == np.asarray(v).dtype and d[k].shape == np.shape(v) and np.array_equal(d[k], v), k
    assert encode_record(dict(d)) == blob


def test_describe_lists_every_field():
    desc = schema.describe()
    assert desc["version"] == SCHEMA_VERSION and set(desc["fields"]) == set(FIELDS)
    assert desc["fields"]["latents"] == {"dtype": "float32", "shape": ["F", "h", "w", "C"], "required": True,
                                         "doc": FIELDS["latents"].doc}


def test_bad_records_are_named():
    r = make_record()
    del r["audio"]
    with pytest.raises(RecordError, match=r"lacks required fields \['audio'\]"):
        encode_record(r)
    with pytest.raises(RecordError, match=r"not in schema v1: \['extra'\]"):
        encode_record({**make_record(), "extra": np.zeros(1)})
    with pytest.raises(RecordError, match=r"'latents' must be float32, got float64 with shape \(5, 8, 12, 3\)"):
        encode_record({**make_record(), "latents": np.zeros((5, 8, 12, 3))})
    with pytest.raises(RecordError, match=r"'ref_frame' must have shape \['H', 'W', 3\], got \(8, 12, 4\)"):
        encode_record({**make_record(), "ref_frame": np.zeros((8, 12, 4), np.uint8)})
    with pytest.raises(RecordError, match=r"'ref_latent' shape \(1, 4, 12, 3\) gives h=4, but field 'latents' gives h=8"):
        encode_record({**make_record(), "ref_latent": np.zeros((1, 4, 12, 3), np.float32)})
    with pytest.raises(RecordError, match="num_frames=5 but audio_features has T=6"):
        encode_record({**make_record(), "audio_features": np.zeros((6, 2, 2), np.float32)})
    with pytest.raises(RecordError, match="'source' must be a str"):
        encode_record({**make_record(), "source": b"bytes"})


def test_foreign_and_damaged_bytes_are_refused():
    blob = encode_record(make_record())
    with pytest.raises(RecordError, match="not a hallojax record"):
        decode_record(b"PK\x03\x04" + blob[4:])
    with pytest.raises(RecordError, match="schema version 9; this reader understands 1"):
        decode_record(blob[:4] + struct.pack("<I", 9) + blob[8:])
    with pytest.raises(RecordError, match="truncated or corrupt: field"):
        decode_record(blob[:len(blob) // 2])
    with pytest.raises(RecordError, match="header is unreadable"):
        decode_record(blob[:12] + b"X" + blob[13:])
    with pytest.raises(RecordError, match="not a hallojax record"):
        decode_record(b"")

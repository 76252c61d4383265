"""A TFDS dataset over prepared shards, for code that reads data through `tfds.data_source`.

TFDS keeps its own files (tf.train.Example records described by features.json), so the builder copies
the clips of a finished prepare run into a TFDS data directory once; no TensorFlow is needed for that or
for reading (only `tfds.data_source`: `as_dataset` needs TensorFlow).

    from data_pipeline.tfds_builder import build_tfds
    build_tfds("data/prepared", "data/tfds")                       # once
    import tensorflow_datasets as tfds
    source = tfds.data_source("hallojax_clips", data_dir="data/tfds")["train"]
    clip = source[0]                                               # {"latents": ndarray [F, h, w, C], ...}

Two configs: `raw_audio` (the default) and `audio_features` (runs prepared with --audio-features);
`build_tfds` picks the one that matches the manifest. Fields and dtypes are those of schema.py, with
`source` as bytes (TFDS text: the file name's own bytes, see schema.py); the record order is the
manifest's (shuffling is disabled).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import schema


@dataclasses.dataclass
class HallojaxClipsConfig(tfds.core.BuilderConfig):
    audio_features: bool = False


def _feature(name: str, field: schema.Field):
    if field.dtype == "str":
        return tfds.features.Text()
    dtype = np.dtype(field.dtype)
    if not field.shape:
        return tfds.features.Scalar(dtype=dtype)
    shape = tuple(d if isinstance(d, int) else None for d in field.shape)
    # BYTES: raw array bytes, the only encoding TFDS allows for several unknown dimensions
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


class HallojaxClips(tfds.core.GeneratorBasedBuilder):
    """Clips of a hallojax prepare run (latents, reference, audio, face mask), schema.py's fields."""

    VERSION = tfds.core.Version(f"{schema.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES = {f"{schema.SCHEMA_VERSION}.0.0": f"record schema version {schema.SCHEMA_VERSION}"}
    BUILDER_CONFIGS = [
        HallojaxClipsConfig(name="raw_audio", description="latents, reference and 16 kHz audio per clip"),
        HallojaxClipsConfig(name="audio_features", description="as raw_audio, plus per-frame audio features",
                            audio_features=True),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS 4.9's default looks this file up through `importlib_resources`, a backport it no longer
        # declares on Python >= 3.9; the answer is simply this file
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, prepared_dir=None, **kwargs):
        self._prepared_dir = prepared_dir  # needed only to build, not to read
        super().__init__(**kwargs)

    def _info(self):
        fields = {k: _feature(k, f) for k, f in schema.FIELDS.items()
                  if f.required or (k == "audio_features" and self.builder_config.audio_features)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(fields),
                                     disable_shuffling=True, homepage="https://github.com/hallojax")

    def _split_generators(self, dl_manager):
        if self._prepared_dir is None:
            raise ValueError("building hallojax_clips needs prepared_dir=<a finished prepare output directory>")
        from data_pipeline.reader import load_manifest

        has = load_manifest(self._prepared_dir)["config"]["audio_features"] is not None
        if has != self.builder_config.audio_features:
            raise ValueError(f"{self._prepared_dir} was prepared {'with' if has else 'without'} audio features; "
                             f"use the config {'audio_features' if has else 'raw_audio'}")
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from data_pipeline.reader import array_record_source

        source = array_record_source(self._prepared_dir)
        for i in range(len(source)):
            r = dict(schema.decode_record(source[i]))
            r["source"] = r["source"].encode("utf-8", schema.STR_ERRORS)  # the name's bytes, UTF-8 or not
            yield r["source"] + f"#{int(r['clip_index'])}".encode(), r


def build_tfds(prepared_dir, data_dir) -> tfds.core.DatasetBuilder:
    """Write the TFDS copy of a finished prepare output into `data_dir`; returns the builder."""
    from data_pipeline.reader import load_manifest

    has = load_manifest(prepared_dir)["config"]["audio_features"] is not None
    builder = HallojaxClips(prepared_dir=prepared_dir, data_dir=str(data_dir), file_format="array_record",
                            config="audio_features" if has else "raw_audio")
    builder.download_and_prepare()
    return builder

"""Data preparation: talking-head videos to training shards, and the synthetic talking-faces set.

    python -m data_pipeline.synthetic data/videos --num-videos 8 --seed 0     # demo/test data
    python -m data_pipeline.prepare data/videos -o data/prepared               # -> ArrayRecord shards
    python -m data_pipeline.bench                                              # clips/s per core

Modules:
    clips.py         stage 1: decode (PyAV), resample to fps by timestamps, rotate, crop, resize; audio to
                     16 kHz mono (soxr) cut per clip; reference frame; face mask
    features.py      stage 2: codec latents (hallojax.codec), audio-feature hook, records
    schema.py        the versioned record schema and its byte format (encode_record / decode_record)
    pipeline.py      shards over processes: plan, atomic writes, resume, manifest, report
    prepare.py       the command line of the above
    reader.py        Grain reader of prepared shards (what training reads)
    tfds_builder.py  TFDS builder over prepared shards (tfds.data_source)
    synthetic.py     procedurally drawn portraits lip-syncing synthetic speech, as h264+AAC mp4
    bench.py         throughput of stages 1 and 2 on the synthetic set
"""

"""Converter input errors: everything wrong is listed at once, by name and shape, and nothing is written."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from hallojax import cli, load_pretrained
from hallojax.checkpoint import CheckpointError
from hallojax.convert import ConversionError, convert_wan_diffusers
from hallojax.convert.safetensors_io import SafetensorsError, SafetensorsFile, TensorStore, save_file, save_sharded
from wan_reference import TINY_T2V, make_diffusers_wan


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    make_diffusers_wan(TINY_T2V).save_pretrained(src)
    return src


def _broken_copy(tiny_src, tmp_path, edit):
    tensors = safetensors.numpy.load_file(str(tiny_src / "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    out = tmp_path / "broken"
    out.mkdir()
    (out / "config.json").write_text((tiny_src / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"))
    return out


def test_missing_unexpected_and_misshaped_are_listed_together(tiny_src, tmp_path):
    def edit(t):
        del t["blocks.1.attn2.to_k.weight"]
        del t["proj_out.bias"]
        t["blocks.0.extra.weight"] = np.zeros((3, 4), np.float32)
        t["blocks.0.ffn.net.0.proj.weight"] = np.zeros((97, 64), np.float32)

    src = _broken_copy(tiny_src, tmp_path, edit)
    with pytest.raises(ConversionError) as err:
        convert_wan_diffusers(src, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "2 missing" in msg and "blocks.1.attn2.to_k.weight (expected (64, 64))" in msg
    assert "proj_out.bias (expected (32,))" in msg
    assert "1 unexpected" in msg and "blocks.0.extra.weight (3, 4)" in msg
    assert "1 mis-shaped" in msg and "blocks.0.ffn.net.0.proj.weight: (97, 64)" in msg
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp*"))


def test_cli_reports_errors_without_traceback(tiny_src, tmp_path, capsys):
    src = _broken_copy(tiny_src, tmp_path, lambda t: t.pop("scale_shift_table"))
    assert cli.main(["convert", "wan-diffusers", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "scale_shift_table (expected (1, 2, 64))" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_directories_name_the_file(tiny_src, tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert_wan_diffusers(tmp_path, tmp_path / "out")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="badjson/config.json: invalid JSON"):
        convert_wan_diffusers(bad, tmp_path / "out")
    cfg = json.loads((tiny_src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, qk_norm="rms_norm")))
    with pytest.raises(ConversionError, match="qk_norm='rms_norm' is not supported"):
        convert_wan_diffusers(bad, tmp_path / "out")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SafetensorsError, match="no diffusion_pytorch_model.safetensors"):
        convert_wan_diffusers(bad, tmp_path / "out")
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(SafetensorsError, match="diffusion_pytorch_model.safetensors"):
        convert_wan_diffusers(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tiny_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_wan_diffusers(tiny_src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert_wan_diffusers(tiny_src, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_load_pretrained_rejects_a_diffusers_directory(tiny_src):
    with pytest.raises(CheckpointError, match="convert it first"):
        load_pretrained(tiny_src)


def test_safetensors_io_agrees_with_the_reference_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
              "c": rng.standard_normal((2, 2)).astype(np.float16), "empty": np.zeros((0, 4), np.float32)}
    save_file(arrays, tmp_path / "x.safetensors")
    back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    # bf16 through ml_dtypes, read by the torch reader
    bf = torch.randn(4, 3).to(torch.bfloat16)
    save_file({"w": bf.view(torch.int16).numpy().view(ml_dtypes.bfloat16)}, tmp_path / "bf.safetensors")
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "bf.safetensors"))["w"], bf)
    safetensors.torch.save_file({"w": bf}, str(tmp_path / "bf2.safetensors"))
    f = SafetensorsFile(tmp_path / "bf2.safetensors")
    assert np.array_equal(f.get("w").view(np.int16), bf.view(torch.int16).numpy())


def test_sharded_writer_and_index_reader(tmp_path):
    arrays = {f"t{i}": np.full((256,), i, np.float32) for i in range(5)}
    names = save_sharded(arrays, tmp_path, "model", max_shard_bytes=2048)
    assert "model.safetensors.index.json" in names and len(names) == 4  # 3 shards of <= 2 tensors
    store = TensorStore(tmp_path, "model")
    assert sorted(store.keys()) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(store.get(k), v)
    (tmp_path / names[0]).unlink()
    with pytest.raises(SafetensorsError, match="is missing"):
        TensorStore(tmp_path, "model")


@pytest.mark.parametrize("header,match", [
    (b"[1, 2]", "header is a JSON list"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', "needs dtype, shape and data_offsets"),
    (b'{"w": "oops"}', "needs dtype, shape and data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "invalid shape"),
    (b'{"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', "unsupported dtype"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "truncated"),
])
def test_malformed_safetensors_headers_name_file_and_tensor(tmp_path, header, match):
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(SafetensorsError, match=match) as err:
        SafetensorsFile(path)
    assert "m.safetensors" in str(err.value)


def test_output_may_not_replace_the_input(tiny_src, tmp_path):
    with pytest.raises(FileExistsError, match="would replace the input"):
        convert_wan_diffusers(tiny_src, tiny_src, overwrite=True, progress=False)
    assert (tiny_src / "config.json").exists() and (tiny_src / "diffusion_pytorch_model.safetensors").exists()

"""The command line's promise for bad input, held by every subcommand: missing paths, out-of-range
numbers, unknown presets and keys, files of the wrong kind and argparse's own complaints all exit with
status 2 and one line on stderr, `hallojax CMD: error: ...` (no usage block, no traceback), and write
nothing. Run in process through `hallojax.cli.main`, so each case costs milliseconds."""

import json

import pytest

from hallojax import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of the wrong kind: a text file, an empty directory, bad JSON, a diffusers Wan config."""
    d = tmp_path_factory.mktemp("cli")
    (d / "notes.txt").write_text("not a checkpoint, not a video\n")
    (d / "empty").mkdir()
    (d / "badjson").mkdir()
    (d / "badjson" / "config.json").write_text("{oops")
    (d / "wan").mkdir()
    (d / "wan" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 2}))
    return d


TINY = ["--config", "configs/wan.py:tiny"]
TOPOLOGY = ["--topology", "v5p:2x2x1"]
# (subcommand as the error line names it, arguments, a piece of the message); {d}: the files above,
# {out}: a path that must not be created
CASES = {
    "convert": [
        ([], "the following arguments are required: format, src, out"),
        (["wan-2.2", "{d}/wan", "{out}"], "argument format: invalid choice: 'wan-2.2'"),
        (["wan-diffusers", "{d}/missing", "{out}"], "missing"),
        (["wan-diffusers", "{d}/notes.txt", "{out}"], "notes.txt"),
        (["t5", "{d}/badjson", "{out}"], "invalid JSON"),
        (["wav2vec2", "{d}/wan", "{out}"], "no model.safetensors"),
        (["wan-diffusers", "{d}/wan", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
    ],
    "export": [
        (["wan-diffusers", "{d}/missing", "{out}"], "missing"),
        (["wan-diffusers", "{d}/wan", "{out}"], "this looks like a diffusers directory: convert it first"),
        (["wav2vec2", "{d}/notes.txt", "{out}"], "notes.txt"),
        (["wan-diffusers", "{d}/wan", "{out}", "--max-shard-gb", "0"], "--max-shard-gb 0.0: must be positive"),
        (["wan-diffusers", "{d}/wan", "{out}", "--max-shard-gb", "lots"], "invalid float value: 'lots'"),
    ],
    "demo": [
        (["--config", "configs/wan.py:wan9-tiny"], "preset must be one of"),
        (["--config", "{d}/missing.py"], "config file {d}/missing.py not found"),
        (["--config", "{d}/notes.txt"], "notes.txt"),
        (["--config.train.no_such_key=1"], "no config key 'train.no_such_key'"),
        (["--config.train.steps=-5"], "train.steps=-5: must be >= 1"),
        (["--config.train.steps=many"], "train.steps"),
        (["--config.mesh.tensor=3"], "mesh"),
    ],
    "train": [
        ([], "the following arguments are required: --workdir"),
        (["--workdir", "{out}", "--config.train.steps=0"], "train.steps=0: must be >= 1"),
        (["--workdir", "{out}", "--config.train.learning_rate=-1.0"], "train.learning_rate=-1.0: must be >= 0"),
        (["--workdir", "{out}", "--config.data.prepared={d}/empty"], "manifest.json not found"),
        (["--workdir", "{out}", "--config.data.prepared={d}/missing"], "manifest.json not found"),
        (["--workdir", "{out}", "--num-processes", "2"], "multi-host needs all of"),
        (["--workdir", "{out}", "--process-id", "x"], "invalid int value: 'x'"),
    ],
    "info": [
        (["--devices", "-8"], "--devices -8: must be >= 1"),
        (["--config", "configs/wan.py:tiny,mesh=fsdp_tp", "--devices", "7"], "7"),
        (["--config", "configs/wan.py:tiny,mesh=ring"], "mesh must be one of"),
        (["--config.model.num_layers=0"], "num_layers"),
        (["--config", "configs/wan.py:hallo3-style,size=70b"], "size="),
    ],
    "compile": [
        (TINY, "the following arguments are required: --topology"),
        (TINY + ["--topology", "v9z:2x2"], "--topology 'v9z:2x2'"),
        (TINY + ["--topology", "v5p-7"], "no standard slice shape"),
        (TINY + TOPOLOGY + ["--batch", "0"], "--batch 0: must be an integer >= 1"),
        (TINY + TOPOLOGY + ["--frames", "-3"], "--frames -3: must be an integer >= 1"),
        (TINY + TOPOLOGY + ["--text-len", "0"], "--text-len 0: must be an integer >= 1"),
    ],
    "bench": [
        ([], "expected a benchmark: vae or train"),
        (["sample-rate"], "got 'sample-rate'"),
    ],
    "bench vae": [
        (["--height", "0"], "--height 0: must be a positive multiple of 8"),
        (["--width", "-16"], "--width -16: must be a positive multiple of 8"),
        (["--frames", "16"], "--frames 16: must be 1 + 4k"),
        (["--repeats", "0"], "--repeats 0: must be an integer >= 1"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--height", "16", "--width", "16", "--frames", "1", "--vae", "{d}/wan"], "convert it first"),
    ],
    "bench train": [
        (["--batch", "0"], "--batch 0: must be an integer >= 1"),
        (["--steps", "-1"], "--steps -1: must be an integer >= 1"),
        (["--config", "configs/wan.py:wan9"], "preset must be one of"),
        (["--config.model.nope=1"], "no config key 'model.nope'"),
        (["--height", "7"], "--height 7: must be a multiple of the patch size 2"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    "bench sample": [
        (["--steps", "0"], "--steps 0"),
        (["--config", "configs/wan.py:wan9"], "preset must be one of"),
        (["--guidance", "audio=3"], "no audio condition"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    "generate": [
        ([], "the following arguments are required: --checkpoint, --image, --audio, --out"),
        (["--checkpoint", "{d}/missing", "--image", "{d}/notes.txt", "--audio", "{d}/notes.txt", "--out",
          "{out}.mp4", "--steps", "0"], "--steps 0: must be >= 1"),
        (["--checkpoint", "{d}/missing", "--image", "{d}/notes.txt", "--audio", "{d}/notes.txt", "--out",
          "{out}.avi"], "the output is an mp4 file"),
        (["--checkpoint", "{d}/missing", "--image", "{d}/notes.txt", "--audio", "{d}/notes.txt", "--out",
          "{out}.mp4"], "notes.txt"),
        (["--checkpoint", "{d}/empty", "--image", "x.png", "--audio", "x.wav", "--out", "{out}.mp4", "--sampler",
          "heun"], "argument --sampler: invalid choice: 'heun'"),
    ],
    "eval": [
        ([], "the following arguments are required: --checkpoint, --videos, --out"),
        (["--checkpoint", "{d}/missing", "--videos", "{d}/missing", "--out", "{out}"], "no such directory"),
        (["--checkpoint", "{d}/missing", "--videos", "{d}/empty", "--out", "{out}"], "need at least 2"),
        (["--checkpoint", "{d}/missing", "--videos", "{d}/empty", "--out", "{out}", "--steps", "0"], "--steps 0"),
        (["--checkpoint", "{d}/missing", "--videos", "{d}/empty", "--out", "{out}", "--max-seconds", "0"],
         "--max-seconds 0"),
    ],
    "synthetic": [
        ([], "the following arguments are required: out_dir"),
        (["{out}", "--num-videos", "-1"], "num_videos and seed must be >= 0, got -1, 0"),
        (["{out}", "--height", "7"], "synthetic size must be even and >= 16"),
        (["{out}", "--fps", "0"], "fps must be >= 1"),
        (["{out}", "--seed", "-1"], "num_videos and seed must be >= 0, got 8, -1"),
        (["{d}/notes.txt"], "notes.txt"),
    ],
    "prepare": [
        ([], "the following arguments are required: inputs, -o/--out"),
        (["{d}/missing", "-o", "{out}"], "does not exist"),
        (["{d}/empty", "-o", "{out}"], "no video files"),
        (["{d}/empty", "-o", "{out}", "--size", "0"], "output size must be at least 8x8, got 0x0"),
        (["{d}/empty", "-o", "{out}", "--frames", "-3"], "num_frames must be 1 + 4k"),
        (["{d}/empty", "-o", "{out}", "--fps", "0"], "fps must be positive"),
        (["{d}/empty", "-o", "{out}", "--stride", "-1"], "stride must be >= 1"),
        (["{d}/empty", "-o", "{out}", "--codec", "vae"], "unknown codec 'vae'"),
        (["{d}/empty", "-o", "{out}", "--codec", "wan-vae:{d}/notes.txt"], "notes.txt"),
        (["{d}/notes.txt", "-o", "{d}/wan/config.json"], "config.json exists and is not a directory"),
    ],
}


def _params():
    for command, cases in CASES.items():
        for i, (args, message) in enumerate(cases):
            yield pytest.param(command, args, message, id=f"{command.replace(' ', '-')}-{i}")


@pytest.mark.parametrize("command,args,message", list(_params()))
def test_bad_arguments_exit_2_with_one_line(command, args, message, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repo; configs/wan.py resolves from the repo anyway
    out = tmp_path / "out"
    argv = command.split() + [a.format(d=files, out=out) for a in args]
    assert cli.main(argv) == 2, argv
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out
    assert err.count("\n") == 1 and err.startswith(f"hallojax {command}: error: "), err
    assert message.format(d=files) in err, err
    assert not out.exists()


def test_every_command_has_bad_argument_cases():
    from hallojax.bench import BENCHES

    commands = set(cli.build_parser().subcommands) | {f"bench {name}" for name in BENCHES}
    assert commands == set(CASES), "a new command (or benchmark) needs its bad-argument cases here"

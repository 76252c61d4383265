"""Every command and code block of README.md runs, as a reader would run it, so the README cannot drift
from the code. The blocks run in README order in one workspace directory (the cwd), so a later block
finds what an earlier one wrote (`ckpt/...`, `data/...`, `runs/...`), as the reader's would.

A ```bash block's commands: `hallojax ...` runs in process (`hallojax.cli.main`) and must exit 0;
`python -m ...` runs as a subprocess; any other command fails the test unless its block is skipped.
A ```python block is executed. Other fences (output, layout) are text.

Markers: an HTML comment right before a fence (invisible on the rendered page; it may span lines):

    <!-- test: skip (REASON) -->   the block is not run; the reason is required (installs, make targets)
    <!-- test: ITEM ITEM ... -->   the block runs after these changes (ITEMs are shell words):
        OLD=>NEW        replace the text OLD by NEW in every command (a placeholder, a preset, a bucket)
        PATH<=KIND      before the block, make PATH in the workspace a tiny KIND, unless it exists:
                          torch:FORMAT  the PyTorch-side directory `hallojax convert FORMAT` reads
                          FORMAT        that directory converted by `hallojax convert` (wan-diffusers,
                                        wan-vae, wav2vec2, umt5, t5)
                          tokenizer     a T5-style tokenizer directory
                          portrait      a synthetic person's image (+ face sidecar); speech: their speech
        --flag VALUE    set a flag (or --flag=VALUE, --config.key=value, a bare --switch): its value is
                        replaced where a command has the flag, else the flag is appended
        'WORDS:'        the flag items after it apply only to the commands `hallojax WORDS ...` (e.g.
                        prepare:, 'bench vae:'); before any such word, to every command of the block
        setup=NAME      (python) run in the namespace SETUPS[NAME] returns: what the text leaves to the
                        reader, such as inputs of the right shapes

Smaller arguments keep the file short: presets become `tiny`, sizes shrink, checkpoints are tiny random
models of the real architectures; where another test compiles the same program (demo, train, bench
train), the marker picks that test's sizes and dtype, so the step comes from the compilation cache.
KNOWN_BROKEN lists commands known to fail today; each must still fail (the test says when one starts to
pass, so its entry can go).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hallojax import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README command text (a piece of it) -> why it fails today
KNOWN_BROKEN: dict[str, str] = {}


# --- the README's blocks and markers ---------------------------------------------------------------


@dataclasses.dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # the text after "test:", or None

    @property
    def id(self) -> str:
        first = next((ln for ln in self.text.splitlines() if ln.strip() and not ln.startswith("#")), "")
        words = re.sub(r"[^\w.:-]+", "-", " ".join(first.split()[:3])).strip("-")
        return f"L{self.line}-{self.lang}-{words}"


def readme_blocks(text: str) -> list[Block]:
    """The ```bash and ```python blocks, each with the marker comment right before its fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = "\n".join(lines[:i]).rstrip()
        comment = before[before.rfind("<!--"):] if before.endswith("-->") else ""
        marker = " ".join(comment[len("<!-- test:"):-len("-->")].split()) if comment.startswith("<!-- test:") else None
        if m.group(1) in ("bash", "python"):
            blocks.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:end]), marker))
        i = end + 1
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split as the shell does."""
    joined = re.sub(r"\\\n", " ", text)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


@dataclasses.dataclass
class Marker:
    skip: str | None = None
    setup: str | None = None
    fixtures: list = dataclasses.field(default_factory=list)  # (path, kind)
    replace: list = dataclasses.field(default_factory=list)  # (old, new)
    flags: list = dataclasses.field(default_factory=list)  # (scope words or None, flag, value or None, joined)


def parse_marker(text: str | None) -> Marker:
    m = Marker()
    if text is None:
        return m
    if text.startswith("skip"):
        reason = text[len("skip"):].strip()
        assert re.fullmatch(r"\(.+\)", reason), f"'skip' needs a reason in parentheses: {text!r}"
        m.skip = reason[1:-1]
        return m
    items, scope, i = shlex.split(text), None, 0
    while i < len(items):
        item = items[i]
        if "=>" in item:
            m.replace.append(tuple(item.split("=>", 1)))
        elif "<=" in item:
            path, kind = item.split("<=", 1)
            assert kind in KINDS or kind in FORMATS, f"unknown fixture kind {kind!r}; known: {sorted(KINDS)}"
            m.fixtures.append((path, kind))
        elif item.startswith("setup="):
            m.setup = item[len("setup="):]
            assert m.setup in SETUPS, f"unknown setup {m.setup!r}; known: {sorted(SETUPS)}"
        elif item.endswith(":"):
            scope = item[:-1].split()
        elif item.startswith("--"):
            flag, eq, value = item.partition("=")
            if not eq and i + 1 < len(items) and not items[i + 1].startswith("--") and not _special(items[i + 1]):
                i += 1
                value = items[i]
            m.flags.append((scope, flag, value if (eq or value) else None, bool(eq)))
        else:
            raise AssertionError(f"marker item {item!r} is none of OLD=>NEW, PATH<=KIND, setup=NAME, 'WORDS:', --flag")
        i += 1
    return m


def _special(item: str) -> bool:
    return "=>" in item or "<=" in item or item.endswith(":") or item.startswith("setup=")


def apply_marker(commands: list[list[str]], marker: Marker) -> list[list[str]]:
    out = [list(c) for c in commands]
    for old, new in marker.replace:
        assert any(old in w for c in out for w in c), f"marker: {old!r} is in no command of the block"
        out = [[w.replace(old, new) for w in c] for c in out]
    for scope, flag, value, joined in marker.flags:
        targets = [c for c in out if scope is None or c[1:1 + len(scope)] == scope]
        assert targets, f"marker: no command of the block starts with {scope}"
        for c in targets:
            at = next((k for k, w in enumerate(c) if w == flag or w.startswith(flag + "=")), None)
            new = [] if value is None else ([f"{flag}={value}"] if joined else [flag, value])
            if at is None:
                c += new or [flag]
            elif c[at] == flag and value is not None:
                c[at + 1] = value
            elif value is not None:
                c[at] = f"{flag}={value}"
    return out


# --- tiny checkpoints of the real architectures --------------------------------------------------------

# sized so that the README's data and training commands fit together: 16 latent channels like Wan's VAE,
# wav2vec2 with the 2 layers x 8 features of the tiny style presets' audio input (configs/wan.py AUDIO_TINY)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
TINY_WAV2VEC2 = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                     conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                     num_conv_pos_embedding_groups=2)


def _torch_model(kind: str):
    import torch

    torch.manual_seed(0)
    if kind == "wan-diffusers":
        from wan_reference import TINY_T2V, make_diffusers_wan

        return make_diffusers_wan(TINY_T2V)
    if kind == "wan-vae":
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan(**TINY_VAE)
    if kind == "wav2vec2":
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        return Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2))
    from test_t5 import TINY
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    if kind == "umt5":
        return UMT5EncoderModel(UMT5Config(**TINY, feed_forward_proj="gated-gelu"))
    return T5EncoderModel(T5Config(**TINY, feed_forward_proj="relu"))


def _save_tokenizer(path: Path) -> None:
    from test_t5 import make_tokenizer

    make_tokenizer().save_pretrained(path)


@functools.lru_cache(maxsize=None)
def _person(root: str):
    """One synthetic person talking (a video of the data pipeline's synthetic set, made once)."""
    from data_pipeline import synthetic

    return synthetic.make_video(Path(root) / ".person", 0, seed=11,
                                cfg=synthetic.SyntheticConfig(min_seconds=1.0, max_seconds=1.0))


def _save_portrait(path: Path) -> None:
    """The person's first frame as an image (any format by its suffix) with its face-box sidecar."""
    import av
    from PIL import Image

    video = _person(str(path.parent.absolute()))
    with av.open(str(video)) as c:
        Image.fromarray(next(c.decode(video=0)).to_ndarray(format="rgb24")).save(path)
    path.with_name(path.stem + ".face.json").write_text(video.with_name(video.stem + ".face.json").read_text())


def _save_speech(path: Path) -> None:
    """The person's speech as wav / flac (soundfile) or m4a (AAC, PyAV)."""
    import av
    import soundfile as sf

    from hallojax.media import read_audio

    wave, rate = read_audio(_person(str(path.parent.absolute())))
    if path.suffix in (".wav", ".flac"):
        sf.write(path, wave, rate)
        return
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        planar = np.ascontiguousarray(wave[:, :1].T)
        for i in range(0, planar.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, i:i + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


FORMATS = ("wan-diffusers", "wan-vae", "wav2vec2", "umt5", "t5")
KINDS = {**{f"torch:{f}": functools.partial(lambda f, path: _torch_model(f).save_pretrained(path), f)
            for f in FORMATS}, "tokenizer": _save_tokenizer, "portrait": _save_portrait, "speech": _save_speech}


def make_fixture(path: Path, kind: str) -> None:
    if path.exists():
        return
    if kind in KINDS:
        KINDS[kind](path)
        return
    src = path.with_name(f".{path.name}.torch")
    KINDS[f"torch:{kind}"](src)
    assert cli.main(["convert", kind, str(src), str(path)]) == 0


# --- inputs the README leaves to the reader (python blocks) ----------------------------------------------


def dit_inputs() -> dict:
    """latents, timesteps and context for the DiT checkpoint of the README (ckpt/wan2.1-t2v-1.3b)."""
    from hallojax.checkpoint import read_config

    cfg, _ = read_config("ckpt/wan2.1-t2v-1.3b")
    rng = np.random.default_rng(0)
    return {"latents": rng.standard_normal((2, 2, 4, 4, cfg.in_channels)).astype(np.float32),
            "timesteps": np.array([900.0, 100.0], np.float32),
            "context": rng.standard_normal((2, 8, cfg.text_dim)).astype(np.float32)}


def media_inputs() -> dict:
    """A video, a 16 kHz waveform, prompts and the tokenizer directory for the VAE and encoder block."""
    rng = np.random.default_rng(0)
    return {"video": rng.uniform(-1, 1, (1, 1, 16, 16, 3)).astype(np.float32),  # 1 + 4k frames, k = 0
            "wav_16k": rng.uniform(-0.5, 0.5, (1, 8000)).astype(np.float32),
            "prompts": ["a cat sits on the mat", "a red dog runs"], "TOKENIZER_DIR": "ckpt/umt5-xxl-tokenizer"}


SETUPS = {"dit_inputs": dit_inputs, "media_inputs": media_inputs}


# --- the tests --------------------------------------------------------------------------------------------

BLOCKS = readme_blocks(README.read_text())


def _runnable(words: list[str]) -> bool:
    return words[0] == "hallojax" or (words[0] in ("python", "python3") and words[1:2] == ["-m"])


def test_every_block_is_run_or_says_why():
    assert BLOCKS, "no ```bash or ```python block found in README.md"
    for b in BLOCKS:
        marker = parse_marker(b.marker)  # asserts the marker is well formed
        assert not (marker.setup and b.lang != "python"), f"README.md:{b.line}: setup= is for python blocks"
        if b.lang == "bash" and not marker.skip:
            for words in shell_commands(b.text):
                assert _runnable(words), (f"README.md:{b.line}: `{shlex.join(words)}` cannot run in tests/"
                                          "test_readme.py; mark its block <!-- test: skip (reason) -->")
    commands = [" ".join(b.text.split()) for b in BLOCKS]
    for piece in KNOWN_BROKEN:
        assert any(piece in c for c in commands), f"KNOWN_BROKEN entry {piece!r} is no longer in README.md"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("block", [b for b in BLOCKS if not parse_marker(b.marker).skip], ids=lambda b: b.id)
def test_readme_block_runs(block, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    marker = parse_marker(block.marker)
    for path, kind in marker.fixtures:
        make_fixture(workspace / path, kind)
    if block.lang == "python":
        namespace = SETUPS[marker.setup]() if marker.setup else {}
        exec(compile(block.text, f"README.md:{block.line}", "exec"), namespace)
        return
    originals = shell_commands(block.text)
    for original, words in zip(originals, apply_marker(originals, marker)):
        broken = next((why for piece, why in KNOWN_BROKEN.items() if piece in shlex.join(original)), None)
        t0 = time.perf_counter()
        status, output = _run(words)
        output = capsys.readouterr().err + output  # in process: what it printed
        print(f"README.md:{block.line}: {time.perf_counter() - t0:.1f} s: {shlex.join(words)}")
        where = f"README.md:{block.line}: `{shlex.join(words)}`"
        if broken:
            assert status != 0, f"{where} now works: delete its KNOWN_BROKEN entry ({broken})"
        else:
            assert status == 0, f"{where} exited {status}:\n{output[-3000:]}"


def _run(words: list[str]) -> tuple[int | str, str]:
    """(exit status, or the exception that escaped, and the output) of one command."""
    if words[0] == "hallojax":
        import jax

        # TPU programs compile with the default matmul precision, not the suite's "highest" (conftest), which
        # Mosaic refuses for bf16 splash attention; the rest keeps the suite's, so its programs are the other
        # tests' and hit the compilation cache
        precision = "default" if words[1] == "compile" else jax.config.jax_default_matmul_precision
        try:
            with jax.default_matmul_precision(precision):
                status = cli.main(words[1:])
        except Exception as e:  # noqa: BLE001 - a crash is a failure to report, with its type
            status = f"{type(e).__name__}: {e}"
        return status, ""
    proc = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stdout + proc.stderr

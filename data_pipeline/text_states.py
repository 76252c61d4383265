"""HunyuanVideo-Avatar's text states (`hallojax generate --text-states`, prepared sets) from the PyTorch LLaVA and
CLIP-L text encoders, as the released inference computes them, from local directories only (no hub access).

    python -m data_pipeline.text_states --llava ckpts/llava_llama_image --clip ckpts/text_encoder_2 \\
        --image portrait.png --prompt "A woman talks to the camera." -o prompt.npz
    python -m data_pipeline.text_states --llava DIR --clip DIR --batch prompts.json -o texts.npz

Single form -> `generate_families.TEXT_KEYS`: text_states [L, 4096] float32, text_mask [L] int32, text_pooled
[768], and negative_* of the negative prompt (default the released one). Batch form (prompts.json: {source:
prompt} or {source: {"prompt": ..., "image": ...}}) -> per source `SOURCE` [L, 4096], `SOURCE/mask` [L],
`SOURCE/pooled` [768] (the prepared-set layout); a string entry's image is the first frame of the video at
SOURCE (relative to --root, default the JSON's folder).

LLaVA (research note B.6, checked against the release, `hymm_sp/text_encoder`, `constants.py`,
`pipeline_hunyuan_video_audio.py`, written for transformers 4.45's LLaVA): the prompt (with the dataset's
"Authentic, Realistic, ..." prefix; the negative without it) in the video template, + "\\nThe person looks
like<image>", tokenized right-padded / truncated to 95 + 256 tokens; the reference image resized to the
704 bucket (Lanczos), then to 336² (bilinear), CLIP-normalised; `<image>` becomes the N = 576 patch features
in place (positions cumsum(mask) − 1, 1 on padding; padding embeddings zeroed where the ids are the config's
pad id, as 4.45's merge did); hidden_states[-3] (2 layers skipped, no final norm); the first 95 (template)
positions cropped: L = 256 + N − 1 = 831. The mask is the released one: the tokenizer's mask with N − 1 ones
appended, cropped; its sum is the valid length (prompt + image tokens, which lie first), which the DiT's
joint attention uses, while its token refiner reads it position by position, as released. CLIP-L: the
prompt alone, 77 tokens padded with the mask, `pooler_output`. Numerics: float32 by default (the release
runs both in fp16 on GPU: --dtype float16).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

# the released video prompt template (hymm_sp/constants.py) and its crop, the prompt and the DiT text lengths
TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
CROP_START, TEXT_LEN, CLIP_LEN, SKIP_LAYERS = 95, 256, 77, 2
IMAGE_SUFFIX = "\nThe person looks like<image>"
PREFIX = "Authentic, Realistic, Natural, High-quality, Lens-Fixed, "  # the dataset's, before every prompt
NEGATIVE = ("Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, bad "
            "teeth, bad eyes, bad limbs, distortion, blurring, Lens changes")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.4082107), (0.26862954, 0.26130258, 0.27577711)
BUCKET_LONG = {704: 1216, 512: 768, 384: 576, 256: 384}  # short side -> the long side's area bound


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"data_pipeline.text_states runs the PyTorch encoders: install torch and transformers "
                          f"({e})") from None
    return torch, transformers


def _model_dir(path, flag: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag} {path}: not a transformers model directory (no config.json)")
    return path


def bucket_size(width: int, height: int, size: int = 704) -> tuple[int, int]:
    """The released reference-image size: the short side scaled to `size`, both sides rounded to 64, rescaled to
    the bucket's area (size × 1216 at 704) when larger."""
    scale = size / min(width, height)
    w, h = round(width * scale / 64) * 64, round(height * scale / 64) * 64
    if w * h > size * BUCKET_LONG.get(size, size * 1.5):
        scale = math.sqrt(size * BUCKET_LONG.get(size, size * 1.5) / width / height)
        w, h = round(width * scale / 64) * 64, round(height * scale / 64) * 64
    return w, h


def llava_pixels(rgb: np.ndarray, side: int, size: int = 704) -> np.ndarray:
    """float32 [1, 3, side, side]: the uint8 [H, W, 3] image at the release's bucket size (Lanczos), resized to
    side² (bilinear), CLIP-normalised."""
    from PIL import Image

    im = Image.fromarray(np.asarray(rgb, np.uint8))
    im = im.resize(bucket_size(im.width, im.height, size), Image.LANCZOS).resize((side, side), Image.BILINEAR)
    x = (np.asarray(im, np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    return x.transpose(2, 0, 1)[None]


class TextEncoders:
    """The released LLaVA-LLaMA-3-8B (hidden states) and CLIP-L (pooled) encoders from local directories."""

    def __init__(self, llava_dir, clip_dir, *, dtype: str = "float32", crop_start: int = CROP_START,
                 text_len: int = TEXT_LEN, image_size: int = 704):
        torch, transformers = _torch()
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype {dtype}: one of float32, float16, bfloat16")
        llava_dir, clip_dir = _model_dir(llava_dir, "--llava"), _model_dir(clip_dir, "--clip")
        self.torch, self.dtype = torch, getattr(torch, dtype)
        self.crop_start, self.text_len, self.image_size = crop_start, text_len, image_size
        load = dict(local_files_only=True, dtype=self.dtype)
        self.llava = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, **load).eval()
        self.llava_tok = transformers.AutoTokenizer.from_pretrained(llava_dir, local_files_only=True,
                                                                    padding_side="right")
        self.clip = transformers.CLIPTextModel.from_pretrained(clip_dir, **load).eval()
        self.clip_tok = transformers.AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        c = self.llava.config
        self.image_token = c.image_token_id
        self.pad_id = getattr(c, "pad_token_id", None)  # 4.45's LLaVA zeroed these embeddings (None: none)
        v = c.vision_config
        self.image_tokens = (v.image_size // v.patch_size) ** 2 + (c.vision_feature_select_strategy == "full")
        self.side = v.image_size
        self.where = str(llava_dir)

    def states(self, text: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LLaVA's cropped hidden states [L, D] float32 and the released mask [L] int32 of `text` (the prompt as
        it enters the template) with the image."""
        torch = self.torch
        tok = self.llava_tok(TEMPLATE.format(text) + IMAGE_SUFFIX, truncation=True, padding="max_length",
                             max_length=self.crop_start + self.text_len, return_tensors="np")
        ids, mask = tok["input_ids"][0], tok["attention_mask"][0]
        at = np.flatnonzero(ids == self.image_token)
        if len(at) != 1:
            raise ValueError(f"--llava {self.where}: the prompt holds {len(at)} image tokens after tokenizing to "
                             f"{len(ids)} tokens (expected 1: a prompt longer than {self.text_len} tokens cuts off "
                             f"'<image>', or the tokenizer lacks it)")
        n, p = self.image_tokens, int(at[0])
        ids = np.concatenate([ids[:p], np.full(n, self.image_token), ids[p + 1:]])
        real = np.concatenate([mask[:p], np.ones(n, mask.dtype), mask[p + 1:]])  # the model's own mask
        positions = np.where(real == 0, 1, np.cumsum(real) - 1)
        with torch.no_grad():
            ids_t = torch.as_tensor(ids[None])
            embeds = self.llava.get_input_embeddings()(ids_t)
            if self.pad_id is not None:
                embeds = embeds.masked_fill((ids_t == self.pad_id)[..., None], 0.0)
            pixels = torch.as_tensor(llava_pixels(rgb, self.side, self.image_size)).to(self.dtype)
            out = self.llava(inputs_embeds=embeds, pixel_values=pixels, attention_mask=torch.as_tensor(real[None]),
                             position_ids=torch.as_tensor(positions[None]), output_hidden_states=True,
                             logits_to_keep=1)
            hidden = out.hidden_states[-(SKIP_LAYERS + 1)][0].float().numpy()
        released = np.concatenate([mask, np.ones(n - 1, mask.dtype)])  # the pipeline's mask (575 ones appended)
        return hidden[self.crop_start:], released[self.crop_start:].astype(np.int32)

    def pooled(self, text: str) -> np.ndarray:
        """CLIP-L's pooled output [768] float32 of `text`."""
        torch = self.torch
        tok = self.clip_tok(text, truncation=True, padding="max_length", max_length=CLIP_LEN, return_tensors="pt")
        with torch.no_grad():
            out = self.clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return out.pooler_output[0].float().numpy()

    def encode(self, prompt: str, rgb: np.ndarray, *, prefix: str = PREFIX) -> dict:
        """{"states", "mask", "pooled"} of one prompt (with the dataset prefix unless prefix="")."""
        text = prefix + prompt
        states, mask = self.states(text, rgb)
        return {"states": states, "mask": mask, "pooled": self.pooled(text)}


# --- the two forms -----------------------------------------------------------------------------------
def _write_npz(path, arrays):
    """An .npz of (key, array) pairs written one array at a time, atomically (nothing at `path` on error)."""
    from hallojax.fsutil import atomic_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"-o {path}: the folder {path.parent} does not exist")
    with atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for key, a in arrays:
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
    return path


def prompt_states(encoders: TextEncoders, image, prompt: str, negative: str | None = NEGATIVE, *,
                  prefix: str = PREFIX) -> dict:
    """`generate_families.TEXT_KEYS` of a prompt and its negative (None: no negative_* keys; the pipeline then
    drops text to zeros) for the portrait `image` (a path or uint8 [H, W, 3])."""
    from hallojax.media import read_image

    rgb = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
    out = {}
    for name, text, pre in (("text", prompt, prefix), ("negative", negative, "")):
        if text is None:
            continue
        e = encoders.encode(text, rgb, prefix=pre)
        out.update({f"{name}_states": e["states"], f"{name}_mask": e["mask"], f"{name}_pooled": e["pooled"]})
    return out


def first_frame(path: Path) -> np.ndarray:
    """uint8 [H, W, 3]: the first decodable frame of a video file."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot be read as a video ({e})") from None
    raise ValueError(f"{path}: its video stream has no decodable frames")


def read_batch(path, root=None) -> dict[str, tuple[str, object]]:
    """prompts.json -> {source: (prompt, image path or video path)}; errors name the file and the source."""
    from hallojax.fsutil import read_json_object

    path = Path(path)
    table = read_json_object(path, "a JSON object {video source: prompt}")
    root = Path(root) if root is not None else path.parent
    out = {}
    for source, entry in table.items():
        if not source or source.endswith(("/mask", "/pooled")):
            raise ValueError(f"{path}: source {source!r}: empty or ending in /mask or /pooled (the keys of its "
                             "mask and pooled vector)")
        if isinstance(entry, str):
            prompt, image = entry, None
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str) and set(entry) <= {"prompt", "image"}:
            prompt, image = entry["prompt"], entry.get("image")
        else:
            raise ValueError(f"{path}: source {source!r}: expected a prompt string or {{\"prompt\": str, "
                             f"\"image\": path}}, got {json.dumps(entry)[:80]}")
        where = root / (image if image is not None else source)
        if not where.is_file():
            raise ValueError(f"{path}: source {source!r}: {'image' if image is not None else 'video'} {where} "
                             "not found")
        out[source] = (prompt, where if image is not None else ("video", where))
    return out


def batch_states(encoders: TextEncoders, table: dict, out, *, prefix: str = PREFIX, progress: bool = True) -> Path:
    """Write `SOURCE`, `SOURCE/mask`, `SOURCE/pooled` for every entry of `read_batch`'s table."""
    from tqdm import tqdm

    from hallojax.media import read_image

    def arrays():
        for source, (prompt, image) in tqdm(table.items(), desc="text states", unit="video", disable=not progress):
            rgb = first_frame(image[1]) if isinstance(image, tuple) else read_image(image)
            e = encoders.encode(prompt, rgb, prefix=prefix)
            yield from ((source, e["states"]), (f"{source}/mask", e["mask"]), (f"{source}/pooled", e["pooled"]))

    return _write_npz(out, arrays())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.text_states", description=__doc__.splitlines()[0])
    ap.add_argument("--llava", required=True, help="LLaVA-LLaMA-3-8B directory (the release's llava_llama_image)")
    ap.add_argument("--clip", required=True, help="CLIP-L text encoder directory (the release's text_encoder_2)")
    ap.add_argument("--prompt", help="the prompt (single form)")
    ap.add_argument("--negative", default=NEGATIVE, help="the negative prompt (default: the released one)")
    ap.add_argument("--no-negative", action="store_true", help="write no negative_* keys (zero dropped text)")
    ap.add_argument("--image", help="the portrait LLaVA sees (single form)")
    ap.add_argument("--batch", help="JSON {video source: prompt or {prompt, image}} (batch form)")
    ap.add_argument("--root", help="folder the batch's sources and images are relative to (default: the JSON's)")
    ap.add_argument("-o", "--out", required=True, help="output .npz")
    ap.add_argument("--dtype", default="float32", help="encoder precision: float32, float16 (as released), bfloat16")
    ap.add_argument("--crop-start", type=int, default=CROP_START, help="template tokens cropped (released: 95)")
    ap.add_argument("--text-len", type=int, default=TEXT_LEN, help="prompt tokens (released: 256)")
    ap.add_argument("--no-prefix", action="store_true", help=f"do not prepend {PREFIX.strip()!r} to prompts")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        if (a.batch is None) == (a.prompt is None):
            raise ValueError("give --prompt (with --image) or --batch FILE.json")
        if a.prompt is not None and a.image is None:
            raise ValueError("--prompt needs --image (the portrait: LLaVA encodes the prompt with it)")
        table = read_batch(a.batch, a.root) if a.batch else None  # before loading the models: bad input fails fast
        if a.image is not None and not Path(a.image).is_file():
            raise ValueError(f"--image {a.image}: not found")
        enc = TextEncoders(a.llava, a.clip, dtype=a.dtype, crop_start=a.crop_start, text_len=a.text_len)
        prefix = "" if a.no_prefix else PREFIX
        if table is not None:
            out = batch_states(enc, table, a.out, prefix=prefix, progress=not a.no_progress)
        else:
            arrays = prompt_states(enc, a.image, a.prompt, None if a.no_negative else a.negative, prefix=prefix)
            out = _write_npz(a.out, arrays.items())
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

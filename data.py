"""Datasets, shards and the loader.

Both tracks write the same shard format and are read by the same loader:

  DIR/manifest.json            format name + version, track, seed, shapes, dtypes, counts, sizes and
                               sha256s (of each whole file, and of 9 fixed 64 KiB windows of it)
  DIR/shard_NNNNN.latents.npy  (n, C, H, W) latents (Shapes: uint8 pixels, identity autoencoder)
  DIR/shard_NNNNN.captions.npy (n,) int32 index into the caption table
  DIR/captions.json            the unique captions, in table order
  DIR/text_tokens.npy          (n_captions, L, D) float16 per-token hidden states of the text tower
  DIR/text_pooled.npy          (n_captions, P) float16 pooled (projected) text embedding
  DIR/eval_metadata.jsonl      the track's GenEval-format evaluation prompts
  DIR/shard_NNNNN.features.npy (n, [views,] grid*grid, width) float16 patch features of a frozen pretrained
                               encoder (optional, `--encoder`: the external-module track's alignment targets)

Run `python data.py shapes --out data/shapes` to build the GenEval-Shapes track, and
`python data.py verify DIR [--full]` to check one: every file's size and the sha256 of its sampled
windows (fast: what every training run checks at start), or of every byte (--full).
"""
import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

FORMAT = "imagegen-speedrun-shards"
FORMAT_VERSION = 2  # 2: the manifest carries its own checksum and its seed is required


class UserError(Exception):
    """A failure the user can act on (bad input, a bad flag, a full disk, a busy run folder): the programs
    print it as one line, `error: <file>[:line]: <what is wrong>`, and exit non-zero."""


def content_hash(obj):
    """sha256 over nested tensors and plain values (a checkpoint, a state dict): tensors by dtype, shape and bytes,
    plain values by repr, in a fixed order: a flipped byte anywhere in a weight changes it."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(f"tensor {x.dtype} {tuple(x.shape)};".encode())
            h.update(x.view(-1).view(torch.uint8).numpy() if x.numel() else b"")  # hashed in place, no copy
        elif isinstance(x, dict):
            h.update(f"dict {len(x)};".encode())
            for key in sorted(x, key=repr):
                h.update(f"{key!r}:".encode())
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)};".encode())
            for item in x:
                visit(item)
        else:
            h.update(f"{x!r};".encode())

    visit(obj)
    return h.hexdigest()


def atomic_write(path, write):
    """Write `path` through `write(binary file)` into a temporary file beside it, fsync, then rename: a kill
    leaves the previous file intact. Any failure of the writer (a full disk raises OSError from open() or
    write(), RuntimeError from torch.save) removes the temporary file and is one UserError naming the path;
    the previous file, if any, is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # never matches *.pt, *.json or *.npy: never taken for the real file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: could not be written ({root_cause(e)}); nothing was replaced") from None
    except BaseException:  # Ctrl-C mid-write: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    os.fsync(directory)  # the rename itself survives a power cut
    os.close(directory)


def root_cause(e):
    """One line for an exception: the OSError at the bottom of its chain if any (torch.save wraps ENOSPC in a
    RuntimeError), else its own first line."""
    seen = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is not None:
        return seen.strerror or str(seen)
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# -----------------------------------------------------------------------------
# GenEval-Shapes: procedural scenes and prompts in GenEval's own schema

IMAGE_SIZE = 64
BACKGROUND = (128, 128, 128)  # neutral grey: no palette colour is near it
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"cross": "crosses"}
COLORS = {  # GenEval's ten colour names, each with one canonical RGB
    "red": (230, 25, 25), "orange": (245, 130, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "blue": (30, 70, 220), "purple": (130, 50, 180),
    "pink": (245, 130, 190), "brown": (120, 70, 30), "black": (15, 15, 15),
    "white": (245, 245, 245),
}
OBJECT_SIZES = tuple(range(11, 22, 2))  # odd sizes: every shape touches its box at pixel centres
MIN_GAP = 2  # pixels between object boxes, so objects never touch
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
POSITION_THRESHOLD = 0.1  # GenEval's size margin in the relative-position rule
EVAL_PROMPTS_PER_TAG = 100
EVAL_IMAGES_PER_PROMPT = 4
# Independent random streams under one seed: training scenes, eval prompts, eval truth renders.
TRAIN_STREAM, EVAL_PROMPT_STREAM, EVAL_TRUTH_STREAM = 0, 1, 2
CAPTION_STREAM, VIEW_STREAM = 3, 4  # ImageNet's per-image caption template; the loader's per-sample view (flip)


@lru_cache(maxsize=None)
def shape_mask(shape, width, height):
    """Boolean (height, width) mask of `shape` filling a width x height box (pixel centres)."""
    u = (np.arange(width) - (width - 1) / 2) / max((width - 1) / 2, 1)
    v = (np.arange(height) - (height - 1) / 2) / max((height - 1) / 2, 1)
    u, v = np.meshgrid(u, v)
    eps = 1e-9
    if shape == "circle":
        mask = u * u + v * v <= 1 + eps
    elif shape == "square":
        mask = np.ones_like(u, dtype=bool)
    elif shape == "triangle":  # apex at top centre, base along the bottom edge
        mask = v >= 2 * np.abs(u) - 1 - eps
    elif shape == "diamond":
        mask = np.abs(u) + np.abs(v) <= 1 + eps
    elif shape == "cross":
        mask = (np.abs(u) <= 1 / 3 + eps) | (np.abs(v) <= 1 / 3 + eps)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def relative_position(box_a, box_b, margin=POSITION_THRESHOLD):
    """GenEval's relation rule: the set of relations of box A to box B, boxes as (x1, y1, x2, y2).

    The centre offset is shrunk by `margin` times the summed box sizes on each axis, then its
    direction decides: a component beyond half the offset's length names a relation.
    """
    a, b = np.asarray(box_a, float)[:4], np.asarray(box_b, float)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _with_article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape):
    return PLURALS.get(shape, shape + "s")


def sample_prompt(rng, tag):
    """One GenEval-format prompt object of the given tag, phrased as GenEval phrases it."""
    shape_a, shape_b = rng.choice(len(SHAPES), size=2, replace=False)
    shape_a, shape_b = SHAPES[shape_a], SHAPES[shape_b]
    color_a, color_b = (list(COLORS)[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": shape_a, "count": 1}],
                "prompt": f"a photo of {_with_article(shape_a)}"}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}],
                "prompt": f"a photo of {_with_article(shape_a)} and {_with_article(shape_b)}"}
    if tag == "counting":
        n = int(rng.integers(2, 6))
        return {"tag": tag, "include": [{"class": shape_a, "count": n}],
                "exclude": [{"class": shape_a, "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {_plural(shape_a)}"}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": shape_a, "count": 1, "color": color_a}],
                "prompt": f"a photo of {_with_article(color_a)} {shape_a}"}
    if tag == "position":
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return {"tag": tag, "include": [{"class": shape_b, "count": 1},
                                        {"class": shape_a, "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {_with_article(shape_a)} {relation} {_with_article(shape_b)}"}
    if tag == "color_attr":
        return {"tag": tag, "include": [{"class": shape_a, "count": 1, "color": color_a},
                                        {"class": shape_b, "count": 1, "color": color_b}],
                "prompt": f"a photo of {_with_article(color_a)} {shape_a} and {_with_article(color_b)} {shape_b}"}
    raise ValueError(f"unknown tag {tag!r}")


def _place(rng, sizes, max_tries=200):
    """Top-left corners for square objects of the given sizes, MIN_GAP apart, inside the image."""
    boxes = []
    for size in sizes:
        for _ in range(max_tries):
            x, y = (int(c) for c in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
            if all(x + size + MIN_GAP <= bx or bx + bs + MIN_GAP <= x or
                   y + size + MIN_GAP <= by or by + bs + MIN_GAP <= y for bx, by, bs in boxes):
                boxes.append((x, y, size))
                break
        else:
            return None
    return boxes


def scene_for_prompt(rng, prompt):
    """Objects [(shape, color, x, y, size)] that satisfy the prompt exactly under GenEval's rules."""
    wanted = []  # (clause index, shape, colour)
    for index, clause in enumerate(prompt["include"]):
        for _ in range(clause["count"]):
            color = clause.get("color") or list(COLORS)[int(rng.integers(len(COLORS)))]
            wanted.append((index, clause["class"], color))
    for _ in range(1000):
        sizes = [OBJECT_SIZES[int(rng.integers(len(OBJECT_SIZES)))] for _ in wanted]
        boxes = _place(rng, sizes)
        if boxes is None:
            continue
        objects = [(shape, color, x, y, s) for (_, shape, color), (x, y, s) in zip(wanted, boxes)]
        if _positions_hold(prompt, wanted, boxes):
            return objects
    raise RuntimeError(f"could not lay out a scene for {prompt['prompt']!r}")


def _positions_hold(prompt, wanted, boxes):
    as_xyxy = [(x, y, x + s, y + s) for x, y, s in boxes]
    for index, clause in enumerate(prompt["include"]):
        if "position" not in clause:
            continue
        relation, target = clause["position"]
        mine = [b for (i, _, _), b in zip(wanted, as_xyxy) if i == index]
        theirs = [b for (i, _, _), b in zip(wanted, as_xyxy) if i == target]
        if not all(relation in relative_position(a, b) for a in mine for b in theirs):
            return False
    return True


def render_scene(objects):
    """(H, W, 3) uint8 image of flat-coloured objects on the flat background."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    for shape, color, x, y, size in objects:
        region = image[y:y + size, x:x + size]
        region[shape_mask(shape, size, size)] = COLORS[color]
    return image


def shapes_training_shard(seed, shard_index, count):
    """`count` (prompt, image) training pairs; shard k of seed s is the same on every machine."""
    rng = np.random.default_rng([seed, TRAIN_STREAM, shard_index])
    images = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    captions = []
    for i in range(count):
        prompt = sample_prompt(rng, TAGS[int(rng.integers(len(TAGS)))])
        images[i] = render_scene(scene_for_prompt(rng, prompt)).transpose(2, 0, 1)
        captions.append(prompt["prompt"])
    return images, captions


def shapes_eval_prompts(seed, per_tag=EVAL_PROMPTS_PER_TAG):
    """The fixed evaluation list: `per_tag` prompts for each of the six tags, grouped by tag."""
    rng = np.random.default_rng([seed, EVAL_PROMPT_STREAM])
    return [sample_prompt(rng, tag) for tag in TAGS for _ in range(per_tag)]


def shapes_truth_image(seed, prompt_index, sample_index, prompt):
    """A ground-truth render of one evaluation prompt (to check the detector, never to train)."""
    rng = np.random.default_rng([seed, EVAL_TRUTH_STREAM, prompt_index, sample_index])
    return render_scene(scene_for_prompt(rng, prompt))


# -----------------------------------------------------------------------------
# GenEval-format metadata files

def read_jsonl(path):
    """(where, row) for each non-blank line of a jsonl file; unreadable text raises UserError naming the line."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    for number, raw in enumerate(lines, 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{where}: not valid JSON (nested too deeply)") from None


def read_metadata(path):
    """Parse a GenEval metadata jsonl file; a malformed line raises UserError naming line and field."""
    rows = []
    for where, row in read_jsonl(path):
        validate_prompt(row, where)
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


def validate_prompt(row, where):
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    for field, kind in (("tag", str), ("prompt", str), ("include", list)):
        if field not in row:
            raise UserError(f"{where}: field '{field}' missing")
        if not isinstance(row[field], kind):
            raise UserError(f"{where}: field '{field}' must be a {kind.__name__}")
    if not isinstance(row.get("exclude", []), list):
        raise UserError(f"{where}: field 'exclude' must be a list")
    for key in ("include", "exclude"):
        for k, clause in enumerate(row.get(key, [])):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
                raise UserError(f"{where}: field '{key}[{k}].class' missing or not a string")
            if not isinstance(clause.get("count"), int) or isinstance(clause["count"], bool) or clause["count"] < 1:
                raise UserError(f"{where}: field '{key}[{k}].count' must be a positive integer")
            if "color" in clause and not isinstance(clause["color"], str):
                raise UserError(f"{where}: field '{key}[{k}].color' must be a string")
            if "position" in clause:
                pos = clause["position"]
                if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                        or not isinstance(pos[1], int) or isinstance(pos[1], bool) or not 0 <= pos[1] < k):
                    raise UserError(f"{where}: field '{key}[{k}].position' must be [relation, earlier group index]")


def write_metadata(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


GENEVAL_PROMPTS_URL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl"
GENEVAL_PROMPTS_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"  # 553 prompts, commit af4902f
CACHE_DIR = Path(os.environ.get("IMAGEGEN_SPEEDRUN_CACHE", Path.home() / ".cache" / "imagegen-speedrun"))


def geneval_prompts_path():
    """The official evaluation_metadata.jsonl, downloaded into the cache on first use."""
    return cached_download(GENEVAL_PROMPTS_URL, GENEVAL_PROMPTS_SHA256, CACHE_DIR / "geneval" / "evaluation_metadata.jsonl",
                           "GenEval prompts", "the official 553-prompt file")


def cached_download(url, sha256, path, what, official):
    """`path`, downloaded from `url` on first use and checked against its sha256; a failure names how to get it."""
    if not path.exists():
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
        except OSError as e:
            raise UserError(f"{what}: cannot download {url} ({e}); download it on a machine with network to {path}, "
                            f"or pass --prompts PATH") from None
        if hashlib.sha256(body).hexdigest() != sha256:
            raise UserError(f"{what}: {url} is not {official} (sha256 differs); pass --prompts PATH")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(body))
    return path


# -----------------------------------------------------------------------------
# Text features: open_clip's tokenizer and text tower

class TextEncoder:
    """Per-token hidden states (L x width) and the pooled embedding of captions, via open_clip.

    pretrained=None gives a seeded random init (nothing is downloaded). `overrides` are passed to
    open_clip.create_model (e.g. a tiny text_cfg for tests). Only the first `seq_len` positions are
    computed: the tower is causal, so they equal the full-context states for captions that fit.
    """

    def __init__(self, name="ViT-B-32", pretrained=None, seed=0, seq_len=77, overrides=None, device="cpu"):
        import open_clip
        with torch.random.fork_rng(devices=[]), quiet_random_init():
            torch.manual_seed(seed)
            try:
                model = open_clip.create_model(name, pretrained=pretrained or None, **(overrides or {}))
            except Exception as e:  # hub unreachable, unknown tag, ...
                raise UserError(
                    f"text encoder {name} pretrained={pretrained!r} could not be loaded ({type(e).__name__}: {e}); "
                    f"on a machine with network run `python -c \"import open_clip; open_clip.create_model('{name}', "
                    f"pretrained='{pretrained}')\"` to fill the cache, or pass a local checkpoint path as pretrained") from None
        model.visual = None
        self.model = model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.seq_len, self.device = seq_len, device
        self.width = model.ln_final.normalized_shape[0]
        self.pooled_width = model.text_projection.shape[1]

    @torch.no_grad()
    def encode(self, captions, batch_size=256):
        m, L = self.model, self.seq_len
        tokens_out, pooled_out = [], []
        for i in range(0, len(captions), batch_size):
            text = self.tokenizer(captions[i:i + batch_size]).to(self.device)
            too_long = (text[:, L:] != 0).any(dim=1)
            if too_long.any():
                caption = captions[i + int(too_long.nonzero()[0, 0])]
                raise UserError(f"caption longer than the text length {L} tokens: {caption!r}")
            text = text[:, :L]
            x = m.token_embedding(text) + m.positional_embedding[:L]
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:L, :L]))
            pooled = x[torch.arange(len(text)), text.argmax(dim=-1)] @ m.text_projection
            tokens_out.append(x.float().cpu())
            pooled_out.append(pooled.float().cpu())
        return torch.cat(tokens_out), torch.cat(pooled_out)


@contextlib.contextmanager
def quiet_random_init():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" warning: a seeded random
    init is what the Shapes track asks for."""
    def drop(record):
        return not record.getMessage().startswith("No pretrained weights loaded")
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def text_encoder_from_manifest(manifest, device="cpu"):
    t = manifest["text"]
    return TextEncoder(t["name"], t["pretrained"], t["seed"], t["seq_len"], t.get("overrides"), device)


# -----------------------------------------------------------------------------
# Encoder features: the patch tokens of a frozen pretrained vision encoder, the alignment targets of the
# external-module track (REPA, docs/imagenet.md "The external-module track"), computed once at prep time

DEFAULT_ENCODER = "vit_base_patch14_dinov2.lvd142m"  # DINOv2 ViT-B/14 through timm: REPA's encoder


class FeatureEncoder:
    """Patch features of uint8 images by a frozen pretrained vision encoder, through timm.

    `name` is anything timm.create_model loads with pretrained=True: a model name with its pretrained tag (from the
    hub, or its cache offline), `hf-hub:REPO`, or `local-dir:FOLDER`, a folder in the hub's layout (config.json and
    the weights; `save_random_encoder` writes a seeded random-init one): one loading path, only the weights differ.
    As REPA feeds DINOv2, each image is scaled to [0, 1], normalised with the encoder's mean and std and resized
    (bicubic) to `grid` times the encoder's patch size (ImageNet: 256 -> 224 for a 16x16 grid); timm resamples the
    position table to that grid. The features are the patch tokens after the final norm (DINOv2's
    x_norm_patchtokens), grid*grid of them in row-major order, the DiT's image-token order.
    """

    def __init__(self, name=DEFAULT_ENCODER, grid=16, device="cpu"):
        import timm
        try:
            encoder = timm.create_model(name, pretrained=True, dynamic_img_size=True)
        except Exception as e:  # hub unreachable, unknown name, missing files, ...
            raise UserError(
                f"encoder {name!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]}); on a "
                f"machine with network run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
                f"to fill the Hugging Face cache (HF_HUB_OFFLINE=1 then reads it), or pass local-dir:FOLDER") from None
        self.name, self.grid = name, grid
        self.weights_sha256 = weights_sha256(encoder)
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.encoder = encoder.to(self.device, self.dtype).eval().requires_grad_(False)
        self.size = grid * encoder.patch_embed.patch_size[0]
        self.width = encoder.embed_dim
        self.mean, self.std = (torch.tensor(encoder.pretrained_cfg[k], device=self.device).view(1, -1, 1, 1)
                               for k in ("mean", "std"))

    @torch.no_grad()
    def encode(self, images):
        """uint8 images (B, H, W, 3) on the device -> features (B, grid*grid, width), float32 on the device."""
        x = (images.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic")
        tokens = self.encoder.forward_features(x.to(self.dtype))
        return tokens[:, self.encoder.num_prefix_tokens:].float()

    def encode_pairs(self, images):
        """uint8 images (B, H, W, 3) on the device -> (B, 2, grid*grid, width) float16 on the device: each image's
        features (view 0) and its horizontal flip's (view 1), as the ImageNet shards store the latents."""
        return torch.stack(self.encode(torch.cat([images, images.flip(2)])).half().chunk(2), dim=1)

    def encode_shard(self, pixels, batch_size=256):
        """A Shapes shard's uint8 pixels (n, 3, H, W) -> (n, grid*grid, width) float16, in batches."""
        images = torch.from_numpy(pixels).permute(0, 2, 3, 1)
        return np.concatenate([self.encode(images[i:i + batch_size].to(self.device)).half().cpu().numpy()
                               for i in range(0, len(images), batch_size)])

    def flops_per_image(self):
        """Counted FLOPs of one image's features (matmuls, attention; the resize is left out)."""
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            self.encode(torch.zeros((1, self.size, self.size, 3), dtype=torch.uint8, device=self.device))
        return counter.get_total_flops()

    def manifest_section(self):
        """The manifest's `features` section: which encoder (and its weights' sha256), the grid, width and layout."""
        cfg = self.encoder.pretrained_cfg
        return {"encoder": self.name, "weights_sha256": self.weights_sha256, "grid": self.grid, "width": self.width,
                "input_size": self.size, "dtype": "float16",
                "resize": f"the stored crop, scaled to [0, 1], normalised (mean {list(cfg['mean'])}, std "
                          f"{list(cfg['std'])}), bicubic to {self.size}x{self.size}",
                "tokens": "patch tokens after the final norm (timm forward_features), row-major"}


def weights_sha256(module):
    """content_hash of a model's weights as loaded (the same for a .safetensors or a .bin file of the same tensors)."""
    return content_hash(module.state_dict())


def save_random_encoder(folder, name=DEFAULT_ENCODER, overrides=None, seed=0):
    """A seeded random-init timm model in the hub's layout (config.json, model.safetensors), loadable as
    local-dir:FOLDER: the stand-in for the pretrained weights offline. `overrides` (e.g. a tiny width, for tests) are
    saved as its model_args. Returns the parameter count."""
    import timm
    from timm.models import save_for_hf
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = timm.create_model(name, pretrained=False, **(overrides or {}))
    save_for_hf(encoder, str(folder), model_args=overrides, safe_serialization=True)
    return sum(p.numel() for p in encoder.parameters())


# -----------------------------------------------------------------------------
# The shard format

def _sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


SAMPLED_WINDOWS, WINDOW_BYTES = 9, 1 << 16


def _sampled_sha256(path):
    """sha256 of 9 fixed 64 KiB windows spread evenly from the first byte to the last (the fast check)."""
    size = Path(path).stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for k in range(SAMPLED_WINDOWS):
            f.seek(max(size - WINDOW_BYTES, 0) * k // (SAMPLED_WINDOWS - 1))
            h.update(f.read(WINDOW_BYTES))
    return h.hexdigest()


def _file_entry(root, name):
    path = Path(root) / name
    return {"file": name, "bytes": path.stat().st_size, "sha256": _sha256(path),
            "sampled_sha256": _sampled_sha256(path)}


def write_shard(root, index, latents, caption_ids, features=None):
    """Write one shard (with its encoder features, if any); returns its manifest entry."""
    stem = f"shard_{index:05d}"
    np.save(Path(root) / f"{stem}.latents.npy", latents)
    np.save(Path(root) / f"{stem}.captions.npy", caption_ids.astype(np.int32))
    entry = {"count": len(latents),
             "latents": _file_entry(root, f"{stem}.latents.npy"),
             "captions": _file_entry(root, f"{stem}.captions.npy")}
    if features is not None:
        np.save(Path(root) / f"{stem}.features.npy", features)
        entry["features"] = _file_entry(root, f"{stem}.features.npy")
    return entry


def write_text_table(root, captions, encoder):
    """Encode every unique caption once; store the table and return its manifest section.

    The table is written chunk by chunk into .npy memmaps: per-image captions (a captioned ImageNet)
    make a table of many GB, which is streamed from disk by the loader, never held in memory.
    """
    shapes = {"text_tokens.npy": (len(captions), encoder.seq_len, encoder.width),
              "text_pooled.npy": (len(captions), encoder.pooled_width)}
    tables = [np.lib.format.open_memmap(Path(root) / name, "w+", np.float16, shape) for name, shape in shapes.items()]
    for start in tqdm(range(0, len(captions), 1024), desc="text features", unit="chunk", leave=False,
                      disable=not sys.stderr.isatty()):
        for table, features in zip(tables, encoder.encode(captions[start:start + 1024])):
            table[start:start + len(features)] = features.numpy().astype(np.float16)
    for table in tables:
        table.flush()
    del tables
    with open(Path(root) / "captions.json", "w") as f:
        json.dump(captions, f, indent=0)
    return {"count": len(captions), "seq_len": encoder.seq_len, "width": encoder.width,
            "pooled_width": encoder.pooled_width, "dtype": "float16",
            "files": [_file_entry(root, n) for n in ("captions.json", "text_tokens.npy", "text_pooled.npy")]}


def manifest_checksum(manifest):
    """sha256 of a manifest's canonical JSON, its own checksum field left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(root, manifest):
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **manifest}
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    atomic_write(Path(root) / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
    return manifest


def read_manifest(root):
    """The manifest of a shard directory, checked for its format version and the fields the loader reads."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise UserError(f"{path}: missing (build the data first, e.g. `python data.py shapes --out {root}`)")
    try:
        manifest = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: field 'format' is {found!r}, expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {manifest.get('version')!r}; this code reads version {FORMAT_VERSION}")
    check_manifest_fields(manifest, path)
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise UserError(f"{path}: checksum mismatch (field 'manifest_sha256'): the manifest was edited after it was "
                        f"written; rebuild the data")
    return manifest


JSON_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _field(obj, name, kind, path, where=""):
    """obj[name] if it is a `kind` (a bool is no integer here), else a UserError naming the field."""
    value = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{path}: field '{where}{name}' missing or not {JSON_KINDS[kind]}")
    return value


def check_manifest_fields(manifest, path):
    """The fields the loader and verify read, with their types: a hand-edited manifest fails by field name."""
    def file_entry(entry, where):
        for name, kind in (("file", str), ("bytes", int), ("sha256", str)):
            _field(entry, name, kind, path, where)

    _field(manifest, "track", str, path)
    _field(manifest, "seed", int, path)
    for k, shard in enumerate(_field(manifest, "shards", list, path)):
        if _field(shard, "count", int, path, f"shards[{k}].") < 0:
            raise UserError(f"{path}: field 'shards[{k}].count' is negative")
        for part in ("latents", "captions"):
            file_entry(_field(shard, part, dict, path, f"shards[{k}]."), f"shards[{k}].{part}.")
    text = _field(manifest, "text", dict, path)
    for name in ("seq_len", "width", "pooled_width"):
        _field(text, name, int, path, "text.")
    for k, entry in enumerate(_field(text, "files", list, path, "text.")):
        file_entry(entry, f"text.files[{k}].")
    latent = _field(manifest, "latent", dict, path)
    shape = _field(latent, "shape", list, path, "latent.")
    if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise UserError(f"{path}: field 'latent.shape' must be three positive integers (C, H, W)")
    for name in ("mean", "std"):
        values = _field(latent, name, list, path, "latent.")
        if len(values) != shape[0] or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                              and (name == "mean" or v > 0) for v in values):
            raise UserError(f"{path}: field 'latent.{name}' must be {shape[0]} finite numbers, one per channel"
                            + (", each > 0" if name == "std" else ""))
    _field(latent, "autoencoder", str, path, "latent.")
    if "features" in manifest:  # encoder features: every shard has its file
        features = _field(manifest, "features", dict, path)
        for name in ("encoder", "weights_sha256"):
            _field(features, name, str, path, "features.")
        for name in ("grid", "width"):
            if _field(features, name, int, path, "features.") <= 0:
                raise UserError(f"{path}: field 'features.{name}' must be > 0")
        for k, shard in enumerate(manifest["shards"]):
            file_entry(_field(shard, "features", dict, path, f"shards[{k}]."), f"shards[{k}].features.")


def verify_files(root, manifest, full=True):
    """Check every file against the manifest; raise UserError naming the first one that does not match.

    full=True hashes every byte. full=False, the check at every start of training, compares each size
    and the sha256 of 9 fixed 64 KiB windows from the first byte to the last: it catches truncated,
    replaced, swapped and zero-filled files in milliseconds, but not a flipped byte between windows
    (`python data.py verify DIR --full` or train_dit.py --verify_full true catches those).
    """
    parts = ("latents", "captions", "features") if "features" in manifest else ("latents", "captions")
    entries = [s[part] for s in manifest["shards"] for part in parts] + manifest["text"]["files"]
    for entry in entries:
        path = Path(root) / entry["file"]
        if not path.is_file():
            raise UserError(f"{path}: missing (listed in {Path(root) / 'manifest.json'})")
        if path.stat().st_size != entry["bytes"]:
            raise UserError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if full or "sampled_sha256" not in entry:  # manifests from before sampled hashes: hash it all
            if _sha256(path) != entry["sha256"]:
                raise UserError(f"{path}: sha256 mismatch with the manifest (corrupt shard)")
        elif _sampled_sha256(path) != entry["sampled_sha256"]:
            raise UserError(f"{path}: sha256 of its sampled windows does not match the manifest (corrupt shard)")


def build_shapes(out, n_train=100_000, seed=0, shard_size=10_000, workers=None, text_model="ViT-B-32",
                 text_pretrained=None, text_seed=0, text_seq_len=16, text_overrides=None, feature_encoder=None, log=print):
    """Generate the GenEval-Shapes track: training shards, caption table, eval metadata, manifest; with `feature_encoder`
    (a FeatureEncoder), each scene's encoder features too (no pretrained encoder is offline: the plumbing, on a
    random-init one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [min(shard_size, n_train - start) for start in range(0, n_train, shard_size)]
    workers = workers or min(len(counts), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        shards = list(tqdm(pool.map(shapes_training_shard, [seed] * len(counts), range(len(counts)), counts),
                           total=len(counts), desc="rendering scenes", unit="shard", disable=not sys.stderr.isatty()))
    captions = sorted({c for _, shard_captions in shards for c in shard_captions})
    caption_id = {c: i for i, c in enumerate(captions)}
    entries = [write_shard(out, k, images, np.array([caption_id[c] for c in shard_captions]),
                           feature_encoder.encode_shard(images) if feature_encoder else None)
               for k, (images, shard_captions) in enumerate(shards)]
    log(f"shapes: {n_train} scenes in {len(entries)} shards, {len(captions)} unique captions"
        + (f", features of {feature_encoder.name}" if feature_encoder else ""))
    encoder = TextEncoder(text_model, text_pretrained, text_seed, text_seq_len, text_overrides)
    text = write_text_table(out, captions, encoder)
    write_metadata(out / "eval_metadata.jsonl", shapes_eval_prompts(seed))
    manifest = write_manifest(out, {
        "track": "shapes", "seed": seed, "count": n_train, "shards": entries,
        "latent": {"shape": [3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "uint8",
                   "mean": [127.5] * 3, "std": [127.5] * 3, "autoencoder": "identity"},
        "text": {"name": text_model, "pretrained": text_pretrained, "seed": text_seed,
                 "overrides": text_overrides, **text},
        "eval_metadata": "eval_metadata.jsonl",
        **({"features": feature_encoder.manifest_section()} if feature_encoder else {}),
    })
    log(f"shapes: wrote {out}/manifest.json")
    return manifest


# -----------------------------------------------------------------------------
# ImageNet: ADM center crop, SD-VAE latents of each image and its flip, class-name captions

IMAGENET_SIZE = 256
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# OpenAI's CLIP ViT-L/14 was trained with QuickGELU. open_clip >= 2.2x builds `ViT-L-14` with nn.GELU and only
# warns when the `openai` weights go into it; `ViT-L-14-quickgelu` (same weights, same files) is the model itself.
DEFAULT_TEXT_MODEL = "ViT-L-14-quickgelu"


def adm_center_crop(image, size=IMAGENET_SIZE):
    """ADM's center crop: box-halve while the short side is >= 2*size, bicubic to `size`, crop the middle."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def load_imagenet_image(path):
    """(256x256x3 uint8, None), or (None, reason) for a file PIL cannot decode. Grey, CMYK, palette -> RGB."""
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here, not later
            return adm_center_crop(image if image.mode == "RGB" else image.convert("RGB")), None
    except Exception as e:  # OSError, DecompressionBombError, and whatever else a malformed file makes PIL raise
        return None, f"unreadable: {type(e).__name__}: {str(e)[:120]}"


def list_imagenet(src):
    """Sorted relative paths of every file under the synset folders of `src`, and their class indices."""
    from timm.data import ImageNetInfo  # ships ImageNet-1k's synset ids in class-index order
    info = ImageNetInfo()
    index_of = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a directory (expected ImageNet train: n01440764/..., one folder per synset)")
    folders = sorted(d for d in src.iterdir() if d.is_dir())
    unknown = [d.name for d in folders if d.name not in index_of]
    if not folders or unknown:
        raise UserError(f"{src}: expected ImageNet synset folders (n01440764/...); found "
                        f"{', '.join(unknown[:3]) if unknown else 'none'}")
    paths, labels = [], []
    for folder in folders:
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            paths.append(f"{folder.name}/{f.name}")
            labels.append(index_of[folder.name])
    return paths, np.array(labels, np.int64)


def read_captions_file(path, wanted):
    """{relative path: caption} from a jsonl of {"path": ..., "caption": ...}; every wanted path must have one."""
    captions = {}
    for where, row in read_jsonl(path):
        for field in ("path", "caption"):
            if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field]:
                raise UserError(f"{where}: field '{field}' missing or not a non-empty string")
        captions[row["path"]] = row["caption"]
    missing = [p for p in wanted if p not in captions]
    if missing:
        raise UserError(f"{path}: {len(missing)} images have no caption, e.g. {', '.join(missing[:3])}")
    return captions


def imagenet_captions(paths, labels, seed, captions_file=None):
    """One caption per image: from the captions file, else an OpenAI template of the class name chosen by seed."""
    if captions_file:
        by_path = read_captions_file(captions_file, paths)
        return [by_path[p] for p in paths]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    choice = np.random.default_rng([seed, CAPTION_STREAM]).integers(len(OPENAI_IMAGENET_TEMPLATES), size=len(paths))
    return [OPENAI_IMAGENET_TEMPLATES[t](IMAGENET_CLASSNAMES[c]) for t, c in zip(choice, labels)]


class VAEAutoencoder:
    """The SD-VAE through diffusers: 256x256 RGB <-> 4x32x32 latents (the posterior mean).

    `name` is any AutoencoderKL hub id or local folder; `config` (with `seed`) builds a random-init
    model of that config instead, for tests and timing. For the prep's throughput: `channels_last`
    stores the weights NHWC; `compile` runs the encoder under torch.compile at one batch shape (a
    short batch is zero-padded to `compile_batch`). Both change the latents in the last bits; the
    defaults (eager, contiguous weights) give the same latents as every earlier version of the prep.
    """

    def __init__(self, name=DEFAULT_VAE, config=None, seed=0, mean=None, std=None, device="cpu",
                 channels_last=False, compile=False, compile_batch=None):
        from diffusers import AutoencoderKL
        if config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vae = AutoencoderKL(**config)
        else:
            try:
                vae = AutoencoderKL.from_pretrained(name)
            except Exception as e:  # hub unreachable, unknown id, missing files, ...
                raise UserError(
                    f"VAE {name!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]}); on a "
                    f"machine with network run `python -c \"from diffusers import AutoencoderKL; "
                    f"AutoencoderKL.from_pretrained('{name}').save_pretrained('vae')\"` and pass --vae vae, "
                    f"or fill the Hugging Face cache and set HF_HUB_OFFLINE=1") from None
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.static_batch = None
        if compile:
            self.vae.encoder = torch.compile(self.vae.encoder, dynamic=False)
            self.static_batch = compile_batch
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _posterior_mean(self, x):
        """uint8 (B, H, W, 3) on the device -> posterior means (B, C, H/8, W/8) in the model's dtype.

        The permuted view is NCHW with NHWC strides (channels_last): the same input every version fed the VAE.
        """
        x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1
        return self.vae.encode(x).latent_dist.mean

    @torch.no_grad()
    def encode(self, images):
        """uint8 images (B, H, W, 3) -> posterior means (B, C, H/8, W/8), float32 on the CPU."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return self._posterior_mean(x).float().cpu()

    @torch.no_grad()
    def encode_pairs(self, images):
        """uint8 images (B, H, W, 3) on the device -> (B, 2, C, h, w) float32 on the device: each image's posterior
        mean (view 0) and its horizontal flip's (view 1), encoded as one batch of 2B (the image, then the flips)."""
        n = len(images)
        pair = torch.cat([images, images.flip(2)])
        if self.static_batch and n < self.static_batch:  # one compiled shape: zero-pad, then drop the padding
            pad = pair.new_zeros((2 * (self.static_batch - n), *pair.shape[1:]))
            pair = torch.cat([pair[:n], pad[:len(pad) // 2], pair[n:], pad[len(pad) // 2:]])
            z = self._posterior_mean(pair).float()
            z = torch.cat([z[:n], z[self.static_batch:self.static_batch + n]])
        else:
            z = self._posterior_mean(pair).float()
        return torch.stack(z.chunk(2), dim=1)

    @torch.no_grad()
    def decode(self, latents):
        """Normalised latents (B, C, h, w) -> uint8 images (B, H, W, 3) on the CPU."""
        z = latents.float().cpu() * self.std + self.mean
        x = self.vae.decode(z.to(self.device, self.dtype)).sample.float().cpu()
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class ImageChunks(torch.utils.data.Dataset):
    """Item t: the ADM-cropped images of a run of consecutive files (all of one shard), decoded in a worker.

    Returns (shard, start, stop, uint8 (n_kept, 256, 256, 3), kept global indices, skipped [{path, reason}]).
    Paths are held in one numpy array of UTF-8 bytes (40 MB for ImageNet's 1.28M), which forked workers share
    without copying (no per-object reference counts to touch).
    """

    def __init__(self, src, paths, chunks):
        self.src, self.paths = str(src), np.array([p.encode() for p in paths])
        self.chunks = np.array(chunks, np.int64).reshape(-1, 3)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, t):
        k, start, stop = (int(v) for v in self.chunks[t])
        images = np.empty((stop - start, IMAGENET_SIZE, IMAGENET_SIZE, 3), np.uint8)
        kept, skipped = [], []
        for i in range(start, stop):
            path = self.paths[i].decode()
            image, reason = load_imagenet_image(os.path.join(self.src, path))
            if image is None:
                skipped.append({"path": path, "reason": reason})
            else:
                images[len(kept)] = image
                kept.append(i)
        return k, start, stop, torch.from_numpy(images[:len(kept)].copy()), kept, skipped


def imagenet_chunks(shards, shard_size, n, chunk_size):
    """(shard, start, stop) runs of at most chunk_size files, in shard order; no run crosses a shard boundary."""
    return [(k, s, min(s + chunk_size, (k + 1) * shard_size, n))
            for k in shards for s in range(k * shard_size, min((k + 1) * shard_size, n), chunk_size)]


def image_loader(src, paths, chunks, workers, pin_memory, prefetch=2):
    """The decode stage: a DataLoader whose `workers` processes each decode and crop one chunk at a time.

    At most workers x prefetch chunks are decoded ahead of the encoder (0 workers: decode in this process).
    """
    return torch.utils.data.DataLoader(ImageChunks(src, paths, chunks), batch_size=None, shuffle=False,
                                       num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=prefetch if workers else None)


class EncodeQueue:
    """The encode stage: batches of uint8 images on the device -> float16 (B, 2, 4, 32, 32) latents on the host,
    and with `feature_encoder` (a FeatureEncoder) their (B, 2, grid*grid, width) encoder features.

    Each batch's outputs are copied back into pinned memory without waiting; a batch is collected only when
    more than `depth` are in flight, so the host prepares the next batch while the GPU encodes this one.
    `gpu_wait` adds up the seconds the host waited for the GPU (the GPU is then the binding resource).
    """

    def __init__(self, vae, depth=2, feature_encoder=None):
        self.vae, self.depth, self.feature_encoder = vae, depth, feature_encoder
        self.cuda = vae.device.type == "cuda"
        self.inflight = deque()
        self.gpu_wait = 0.0

    def submit(self, images, key):
        outputs = [self.vae.encode_pairs(images)]
        if self.feature_encoder:
            outputs.append(self.feature_encoder.encode_pairs(images))
        event = None
        if self.cuda:
            hosts = [torch.empty(z.shape, dtype=z.dtype, pin_memory=True) for z in outputs]
            for host, z in zip(hosts, outputs):
                host.copy_(z, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.vae.device))
        else:
            hosts = outputs
        self.inflight.append((key, event, hosts))
        return self.collect(self.depth)

    def collect(self, depth=0):
        """[(key, [float16 latents, float16 features (with `feature_encoder`)])] of the oldest batches, until at most
        `depth` are in flight."""
        done = []
        while len(self.inflight) > depth:
            key, event, hosts = self.inflight.popleft()
            if event is not None:
                start = time.perf_counter()
                event.synchronize()
                self.gpu_wait += time.perf_counter() - start
            done.append((key, [host.numpy().astype(np.float16) for host in hosts]))
        return done


def save_npy_parts(f, parts, row_shape):
    """np.save of the float16 concatenation of `parts` (arrays of rows of `row_shape`), written part by part: a
    shard's features (7.9 GB for 10,000 ImageNet images) are never copied into one array."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                             "fortran_order": False, "shape": (sum(map(len, parts)), *row_shape)})
    for part in parts:
        f.write(np.ascontiguousarray(part, np.float16).tobytes())


def _write_imagenet_shard(root, k, latents, caption_ids, skipped, features=None, feature_encoder=None):
    """One shard's files, each landing atomically (tmp + rename), the done marker last; with `feature_encoder`
    (a FeatureEncoder), the `features` (a list of parts) too, and the done marker names its weights."""
    stem = Path(root) / f"shard_{k:05d}"
    latents = np.concatenate(latents) if latents else np.zeros(
        (0, 2, 4, IMAGENET_SIZE // 8, IMAGENET_SIZE // 8), np.float16)
    for name, array in (("latents", latents), ("captions", caption_ids.astype(np.int32))):
        atomic_write(Path(f"{stem}.{name}.npy"), lambda f: np.save(f, array))
    if feature_encoder is not None:
        atomic_write(Path(f"{stem}.features.npy"),
                     lambda f: save_npy_parts(f, features, (2, feature_encoder.grid ** 2, feature_encoder.width)))
    done = json.dumps({"count": len(latents), "skipped": skipped,
                       "features_sha256": feature_encoder.weights_sha256 if feature_encoder else None}).encode()
    atomic_write(Path(f"{stem}.done.json"), lambda f: f.write(done))
    return len(latents)


def encode_imagenet_shards(root, src, paths, caption_ids, shards, shard_size, vae, batch_size=64, workers=8,
                           chunk_size=32, prefetch=2, write=True, log=print, n_shards=None, feature_encoder=None):
    """Decode, crop and encode the given shards (each image and its flip), streaming; with
    `feature_encoder` (a FeatureEncoder), the encoder features of each image and its flip from the same batches.

    Worker processes decode chunks of files (`image_loader`); this process copies each chunk to the device
    as it arrives (pinned memory, non-blocking), encodes `batch_size` kept images of a shard at a time, in
    file order (the batches are the same as the prep has always made, so the latents are too), and a
    writer thread saves each finished shard while the next is encoded. The host holds at most
    workers x prefetch chunks, one batch and the current shard's latents (16 KiB per image) and features
    (DINOv2-B at a 16x16 grid: 768 KiB per image, 7.9 GB for a 10,000-image shard: a smaller --shard-size holds less).
    Returns timing: images, skipped, seconds, loader_wait (host waiting for decoded images), gpu_wait.
    """
    from concurrent.futures import ThreadPoolExecutor
    n_shards = n_shards or len(shards)
    cuda = vae.device.type == "cuda"
    loader = image_loader(src, paths, imagenet_chunks(shards, shard_size, len(paths), chunk_size), workers,
                          pin_memory=cuda, prefetch=prefetch)
    queue_ = EncodeQueue(vae, feature_encoder=feature_encoder)
    state = {}  # shard -> {"latents": [...], "features": [...], "kept": [...], "skipped": [...], "open": batches in
    # flight or to come}
    buffer, buffered = [], 0
    writer, writes = ThreadPoolExecutor(1), []
    stats = dict(images=0, skipped=0, loader_wait=0.0)
    start_time = time.perf_counter()

    def write_shard(k, s):
        ids = caption_ids[np.array(s["kept"], np.int64)]
        count = _write_imagenet_shard(root, k, s["latents"], ids, s["skipped"], s["features"], feature_encoder) if write \
            else len(ids)
        log(f"imagenet: shard {k + 1}/{n_shards} done ({count} images, {len(s['skipped'])} skipped, "
            f"{stats['images'] / (time.perf_counter() - start_time):.0f} img/s so far)")

    def collected(done):
        for k, (latents, *encoded) in done:
            s = state[k]
            s["latents"].append(latents)
            s["features"] += encoded
            s["open"] -= 1
            if s["open"] == 0 and s["closed"]:
                writes.append(writer.submit(write_shard, k, state.pop(k)))
        for f in [f for f in writes if f.done()]:
            f.result()  # a failed write stops the prep here
            writes.remove(f)

    def take(n):
        nonlocal buffer, buffered
        x = buffer[0] if len(buffer) == 1 else torch.cat(buffer)
        buffer = [x[n:]] if len(x) > n else []
        buffered -= n
        return x[:n]

    try:
        it = iter(loader)
        while True:
            wait = time.perf_counter()
            item = next(it, None)
            stats["loader_wait"] += time.perf_counter() - wait
            if item is None:
                break
            k, start, stop, images, kept, skipped = item
            s = state.setdefault(k, {"latents": [], "features": [], "kept": [], "skipped": [], "open": 0,
                                     "closed": False})
            s["kept"] += kept
            s["skipped"] += skipped
            stats["images"] += len(kept)
            stats["skipped"] += len(skipped)
            if len(images):
                buffer.append(images.to(vae.device, non_blocking=True))
                buffered += len(images)
            last = stop == min((k + 1) * shard_size, len(paths))
            while buffered >= batch_size or (last and buffered):
                s["open"] += 1
                collected(queue_.submit(take(min(batch_size, buffered)), k))
            if last:
                s["closed"] = True
                if s["open"] == 0:  # nothing in flight: every file skipped, or all collected already
                    writes.append(writer.submit(write_shard, k, state.pop(k)))
        collected(queue_.collect(0))
    finally:
        writer.shutdown(wait=True)
    for f in writes:
        f.result()
    stats.update(seconds=time.perf_counter() - start_time, gpu_wait=queue_.gpu_wait)
    return stats


def build_imagenet(src, out, vae=DEFAULT_VAE, captions_file=None, seed=0, shard_size=10_000, batch_size=64,
                   workers=8, vae_config=None, rank=0, world_size=1, device="cpu", channels_last=False,
                   compile=False, chunk_size=32, prefetch=2, encoder=None, encoder_grid=16, log=print):
    """ImageNet -> shards of SD-VAE latents (image and flip) + a caption-feature table + manifest; with `encoder`
    (FeatureEncoder's name), each image's and flip's encoder features on a `encoder_grid` square too.

    Each rank encodes the shards k with k % world_size == rank; a shard whose done marker exists is
    skipped, so a killed prep restarts at its first unfinished shard. Rank 0 then writes the text
    table, the per-channel latent statistics and the manifest (callers barrier in between).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, labels = list_imagenet(src)
    captions = imagenet_captions(paths, labels, seed, captions_file)
    table = sorted(set(captions))
    caption_ids = np.searchsorted(np.array(table, dtype=object), np.array(captions, dtype=object))
    n_shards = (len(paths) + shard_size - 1) // shard_size
    todo = [k for k in range(rank, n_shards, world_size) if not (out / f"shard_{k:05d}.done.json").exists()]
    if todo:
        autoencoder = VAEAutoencoder(vae, vae_config, seed, device=device, channels_last=channels_last,
                                     compile=compile, compile_batch=batch_size)
        feature_encoder = FeatureEncoder(encoder, encoder_grid, device) if encoder else None
        stats = encode_imagenet_shards(out, src, paths, caption_ids, todo, shard_size, autoencoder, batch_size,
                                       workers, chunk_size, prefetch, log=log, n_shards=n_shards,
                                       feature_encoder=feature_encoder)
        log(f"imagenet: rank {rank}: {stats['images']} images in {len(todo)} shards, {stats['skipped']} skipped, "
            f"{stats['seconds']:.1f} s ({stats['images'] / max(stats['seconds'], 1e-9):.0f} img/s; waited "
            f"{stats['loader_wait']:.1f} s for decoded images, {stats['gpu_wait']:.1f} s for the encoder)")
    return dict(paths=paths, table=table, n_shards=n_shards)


def finish_imagenet(out, table, n_shards, vae=DEFAULT_VAE, vae_config=None, text_model=DEFAULT_TEXT_MODEL,
                    text_pretrained="openai", text_overrides=None, seed=0, encoder=None, encoder_grid=16, device="cpu",
                    log=print):
    """Rank 0, after every shard is done: latent statistics, text table, manifest with every skip listed (and with
    `encoder`, the features section, every shard's features checked to come from that encoder's weights)."""
    out = Path(out)
    done = [json.loads((out / f"shard_{k:05d}.done.json").read_text()) for k in range(n_shards)]
    feature_encoder = FeatureEncoder(encoder, encoder_grid, device) if encoder else None
    for k, d in enumerate(done):
        if feature_encoder and d.get("features_sha256") != feature_encoder.weights_sha256:
            raise UserError(f"{out / f'shard_{k:05d}.done.json'}: its features come from "
                            f"{'other encoder weights' if d.get('features_sha256') else 'no encoder'}, not {encoder!r} "
                            f"(sha256 {feature_encoder.weights_sha256[:12]}...); remove the shard's files and prep again")
    s1, s2, count = np.zeros(0), np.zeros(0), 0
    for k in range(n_shards):
        z = np.load(out / f"shard_{k:05d}.latents.npy", mmap_mode="r")
        for start in range(0, len(z), 1024):
            block = np.asarray(z[start:start + 1024], np.float64)  # (b, views, C, h, w)
            if not len(s1):
                s1, s2 = np.zeros(block.shape[2]), np.zeros(block.shape[2])
            s1 += block.sum(axis=(0, 1, 3, 4))
            s2 += (block ** 2).sum(axis=(0, 1, 3, 4))
            count += block.size // block.shape[2]
    mean = s1 / max(count, 1)
    std = np.sqrt(np.maximum(s2 / max(count, 1) - mean ** 2, 1e-12))
    text_encoder = TextEncoder(text_model, text_pretrained, seed=0, seq_len=77, overrides=text_overrides,
                               device=device)
    text = write_text_table(out, table, text_encoder)
    skipped = [s for d in done for s in d["skipped"]]
    entries = [{"count": d["count"], "latents": _file_entry(out, f"shard_{k:05d}.latents.npy"),
                "captions": _file_entry(out, f"shard_{k:05d}.captions.npy"),
                **({"features": _file_entry(out, f"shard_{k:05d}.features.npy")} if feature_encoder else {})}
               for k, d in enumerate(done)]
    manifest = write_manifest(out, {
        "track": "imagenet", "seed": seed, "count": sum(d["count"] for d in done), "shards": entries,
        "skipped_count": len(skipped), "skipped": skipped,
        "latent": {"shape": [4, IMAGENET_SIZE // 8, IMAGENET_SIZE // 8], "views": 2, "dtype": "float16",
                   "mean": mean.tolist(), "std": std.tolist(), "autoencoder": vae,
                   "autoencoder_config": vae_config, "autoencoder_seed": seed,
                   "stored": "posterior mean of the image (view 0) and of its horizontal flip (view 1)"},
        "text": {"name": text_model, "pretrained": text_pretrained, "seed": 0, "overrides": text_overrides, **text},
        "eval_metadata": None,
        **({"features": {**feature_encoder.manifest_section(), "views": 2,
                         "stored": "features of the image (view 0) and of its horizontal flip (view 1)"}}
           if feature_encoder else {}),
    })
    log(f"imagenet: {manifest['count']} images in {n_shards} shards, {len(skipped)} skipped, "
        f"{len(table)} unique captions" + (f", features of {encoder}" if feature_encoder else "")
        + f"; wrote {out}/manifest.json")
    return manifest

# -----------------------------------------------------------------------------
# Rehearsal: offline, seeded stand-ins for what the hubs give (an ImageNet-layout tree, random-init weights of
# the real architectures in the hubs' file layouts), so the ImageNet loop runs through its real loaders.

# stabilityai/sd-vae-ft-ema's config.json (the SD 1.x autoencoder): 83.7M parameters.
SD_VAE_FT_EMA = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                     layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=256)
# The same classes a few channels wide (still 4 x 32 x 32 latents of 256 x 256 images).
TINY_SD_VAE = dict(SD_VAE_FT_EMA, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)
# open_clip model configs: OpenAI's ViT-L/14 is open_clip's ViT-L-14-quickgelu; the tiny one has its classes.
TINY_OPEN_CLIP = dict(embed_dim=32, quick_gelu=True,
                      vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
# Mask2Former with a Swin backbone a few channels wide (MASK2FORMER_SWIN_S is the real one).
TINY_MASK2FORMER = dict(
    backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                         window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"]),
    num_labels=80, num_queries=8, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1,
    decoder_layers=2, encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2)
# Weight folders under OUT/weights, named as the hub repositories they stand in for.
# The 80 COCO classes in the detector's index order, under GenEval's names (its object_names.txt).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# Mask2Former Swin-S COCO instance segmentation, the architecture of Options.detector.
MASK2FORMER_SWIN_S = dict(
    backbone_config=dict(model_type="swin", embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24],
                         window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"]),
    num_labels=80, num_queries=100, hidden_dim=256, encoder_layers=6, decoder_layers=10)

REHEARSAL_VAE, REHEARSAL_CLIP = "sd-vae-ft-ema", "vit_large_patch14_clip_224.openai"
REHEARSAL_DETECTOR = "mask2former-swin-small-coco-instance"
OPEN_CLIP_FILE = "open_clip_pytorch_model.bin"
# GenEval-format prompts, one per tag, with COCO classes (the real list: evaluate.py geneval-prompts).
REHEARSAL_PROMPTS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "toaster", "count": 1}],
     "prompt": "a photo of a dog and a toaster"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
     "prompt": "a photo of two cats"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "chair", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a chair"},
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "blue"},
                                      {"class": "kite", "count": 1, "color": "yellow"}],
     "prompt": "a photo of a blue bus and a yellow kite"},
]


def _photo(rng, width, height):
    """A JPEG-friendly RGB picture: smooth colour fields plus grain, so files and decode times are photo-like."""
    low = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-10, 11, smooth.shape, dtype=np.int16), 0, 255).astype(np.uint8)


def _photo_size(rng, tiny):
    """(width, height) drawn like ImageNet's: mostly 500x375 / 500x333 either way, some small, a few large."""
    if tiny:
        w, h = (int(v) for v in rng.integers(48, 400, 2))
        return w, h
    u = rng.random()
    if u < 0.55:
        w, h = 500, 375
    elif u < 0.70:
        w, h = 500, 333
    elif u < 0.80:
        w, h = 500, 500
    elif u < 0.90:
        w, h = (int(v) for v in rng.integers(200, 800, 2))
    elif u < 0.95:
        w, h = (int(v) for v in rng.integers(60, 256, 2))
    else:
        w = int(rng.integers(1000, 3000))
        h = int(w / rng.uniform(1.3, 1.6))
    return (w, h) if rng.random() < 0.7 else (h, w)


def _fabricate_synset(root, synset, first, count, seed, tiny):
    """count JPEGs (quality 75-95, like the crawl) of one synset folder; file i is seeded by (seed, first + i)."""
    folder = Path(root) / synset
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        rng = np.random.default_rng([seed, i])
        w, h = _photo_size(rng, tiny)
        Image.fromarray(_photo(rng, w, h)).save(folder / f"{synset}_{i}.JPEG", quality=int(rng.integers(75, 96)))
    return count


def _fabricate_odd_files(root, synsets, seed):
    """The odd files ImageNet has or a copy may have, one per synset in turn: {relative path: 'kept' | 'skipped'}."""
    rng = np.random.default_rng([seed, 1 << 20])
    photo = _photo(rng, 320, 240)
    odd = {}

    def put(i, name, expect, write):
        rel = f"{synsets[i % len(synsets)]}/{synsets[i % len(synsets)]}_odd_{name}"
        write(Path(root) / rel)
        odd[rel] = expect

    def jpeg_bytes(image, **kw):
        import io
        buf = io.BytesIO()
        image.save(buf, "JPEG", **kw)
        return buf.getvalue()

    put(0, "grey.JPEG", "kept", lambda p: Image.fromarray(photo[..., 1]).save(p, "JPEG"))
    put(1, "cmyk.JPEG", "kept", lambda p: Image.fromarray(photo).convert("CMYK").save(p, "JPEG"))
    put(2, "palette_png.JPEG", "kept", lambda p: Image.fromarray(photo).convert("P").save(p, "PNG"))
    put(3, "rgba_png.JPEG", "kept", lambda p: Image.fromarray(
        np.dstack([photo, np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(photo.shape[0], 0)]),
        "RGBA").save(p, "PNG"))
    put(4, "panorama.JPEG", "kept", lambda p: Image.fromarray(_photo(rng, 1400, 90)).save(p, "JPEG"))
    put(5, "tiny.JPEG", "kept", lambda p: Image.fromarray(photo[:13, :17]).save(p, "JPEG"))
    put(6, "truncated.JPEG", "skipped", lambda p: p.write_bytes(jpeg_bytes(Image.fromarray(photo))[:4000]))
    put(7, "empty.JPEG", "skipped", lambda p: p.write_bytes(b""))
    put(8, "notes.txt", "skipped", lambda p: p.write_text("downloaded with a script; 3 files failed\n"))
    put(9, "html.JPEG", "skipped", lambda p: p.write_text("<html><body>403 Forbidden</body></html>\n"))
    return odd


def _save_open_clip(folder, model_name, overrides, seed):
    """A random-init open_clip model in the layout of the hub's timm/vit_large_patch14_clip_224.openai: its
    open_clip_config.json and open_clip_pytorch_model.bin (loads as pretrained=FILE or as local-dir:FOLDER)."""
    import open_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, **(overrides or {}))
    config = {**open_clip.get_model_config(model_name), **(overrides or {})}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / OPEN_CLIP_FILE)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess},
                                                             indent=2))
    return sum(p.numel() for p in model.parameters())


def _save_mask2former(folder, config, seed):
    """A random-init Mask2Former (80 COCO labels) saved as transformers saves the hub model's folder."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    labels = dict(enumerate(COCO_CLASSES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
            **config, id2label=labels, label2id={v: k for k, v in labels.items()}))
    model.save_pretrained(folder)
    try:
        from transformers import Mask2FormerImageProcessor
        Mask2FormerImageProcessor().save_pretrained(folder)  # the hub folder has one; the scorer does not read it
    except ImportError:
        pass
    return sum(p.numel() for p in model.parameters())


def fabricate_rehearsal(out, tiny=False, images=None, synsets=None, seed=0, workers=None, log=print):
    """What the hubs would give, offline and seeded: OUT/train (ImageNet layout, with odd files), OUT/weights
    (random-init SD-VAE ft-EMA, OpenAI CLIP ViT-L/14, Mask2Former Swin-S COCO instance, or tiny models of the same
    classes), OUT/evaluation_metadata.jsonl (six GenEval prompts) and OUT/rehearsal.json (what was made, the odd
    files and what the prep must do with them, and the follow-up commands)."""
    from timm.data import ImageNetInfo
    out = Path(out).resolve()
    images = images if images is not None else (40 if tiny else 10_000)
    info = ImageNetInfo()
    n_synsets = synsets or (4 if tiny else max(1, min(1000, images // 100)))
    names = [info.index_to_label_name(i) for i in np.linspace(0, 999, n_synsets).astype(int)]
    train, weights = out / "train", out / "weights"
    if train.exists() and any(train.iterdir()):
        raise UserError(f"{train}: already exists; remove it or pick another --out")
    per = [images // n_synsets + (k < images % n_synsets) for k in range(n_synsets)]
    firsts = np.cumsum([0] + per[:-1])
    start = time.perf_counter()
    with ProcessPoolExecutor(workers or min(n_synsets, os.cpu_count() or 1)) as pool:
        made = sum(pool.map(_fabricate_synset, [train] * n_synsets, names, firsts, per, [seed] * n_synsets,
                            [tiny] * n_synsets))
    odd = _fabricate_odd_files(train, names, seed)
    log(f"rehearsal: {made} images + {len(odd)} odd files in {n_synsets} synset folders under {train} "
        f"({time.perf_counter() - start:.1f} s)")
    vae_dir, clip_dir, detector_dir = weights / REHEARSAL_VAE, weights / REHEARSAL_CLIP, weights / REHEARSAL_DETECTOR
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(**(TINY_SD_VAE if tiny else SD_VAE_FT_EMA))
    vae.save_pretrained(vae_dir)
    counts = {"vae": sum(p.numel() for p in vae.parameters())}
    clip_overrides = {k: v for k, v in TINY_OPEN_CLIP.items() if k != "quick_gelu"} if tiny else None
    counts["clip"] = _save_open_clip(clip_dir, DEFAULT_TEXT_MODEL, clip_overrides, seed)
    counts["detector"] = _save_mask2former(detector_dir, TINY_MASK2FORMER if tiny else MASK2FORMER_SWIN_S,
                                           seed)
    log("rehearsal: random-init weights, " + ", ".join(f"{k} {v / 1e6:.2f}M parameters" for k, v in counts.items())
        + f" under {weights}")
    write_metadata(out / "evaluation_metadata.jsonl", REHEARSAL_PROMPTS)
    commands = rehearsal_commands(out, tiny)
    (out / "rehearsal.json").write_text(json.dumps({
        "tiny": tiny, "seed": seed, "images": made, "synsets": names, "odd": odd, "parameters": counts,
        "weights": {"vae": str(vae_dir), "clip_folder": str(clip_dir), "clip_file": str(clip_dir / OPEN_CLIP_FILE),
                    "detector": str(detector_dir)},
        "commands": commands}, indent=1))
    log("rehearsal: next, on the machine that will run the real thing:\n" + "\n".join(commands.values()))
    return out


def rehearsal_commands(out, tiny):
    """The follow-up commands for a rehearsal folder: the real pipeline's flags pointed at its local weights."""
    out = Path(out)
    w = out / "weights"
    if tiny:  # no ViT-L-14 name fits a tiny tower: open_clip reads the architecture from the folder's config
        text = f"--text-model local-dir:{w / REHEARSAL_CLIP} --text-pretrained ''"
        clip = f"--clip-model local-dir:{w / REHEARSAL_CLIP} --clip-pretrained ''"
        speed = "--batch-size 8 --workers 2 --shard-size 16"
        bench = "--batch-sizes 4 8 --workers 0 2 --variants eager channels_last --images 32 --encode-images 16"
    else:
        text = f"--text-model {DEFAULT_TEXT_MODEL} --text-pretrained {w / REHEARSAL_CLIP / OPEN_CLIP_FILE}"
        clip = f"--clip-model {DEFAULT_TEXT_MODEL} --clip-pretrained {w / REHEARSAL_CLIP / OPEN_CLIP_FILE}"
        speed = "--batch-size 128 --workers 14"
        bench = ("--batch-sizes 64 128 256 --workers 8 14 --variants eager channels_last compile --images 8192 "
                 "--cudnn-benchmark")
    return {
        "prep": f"python data.py imagenet --src {out / 'train'} --out {out / 'shards'} --vae {w / REHEARSAL_VAE} "
                f"{text} {speed}",
        "bench": f"python data.py bench-prep --src {out / 'train'} --vae {w / REHEARSAL_VAE} {text} {bench}",
        "score_flags": f"python evaluate.py curve RUN --backend mask2former --detector {w / REHEARSAL_DETECTOR} "
                       f"{clip} --prompts {out / 'evaluation_metadata.jsonl'}",
    }

# -----------------------------------------------------------------------------
# bench-prep: where the prep's time goes (decode on CPU workers, encode on the GPU, both together)

class HostMemory:
    """Peak host memory of this process and its children (the decode workers), sampled 5 times a second.

    Linux: the sum of each process's proportional set size (shared pages split among their users, so the
    workers' common libraries count once). Elsewhere: this process's peak RSS.
    """

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def _tree(pid):
        pids, todo = [], [pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return pids

    def sample(self):
        total = 0
        for pid in self._tree(os.getpid()):
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
            except (OSError, StopIteration, ValueError):
                pass
        if not total:
            import resource
            total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = max(self.peak, total)

    def _run(self):
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def matmul_peak_flops(device, n=8192, iters=50):
    """FLOP/s of a large bf16 matmul on this device: the ceiling that MFU is measured against, in the same process."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def encoder_flops_per_image(vae):
    """Counted FLOPs of encoding one image and its flip (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros((1, IMAGENET_SIZE, IMAGENET_SIZE, 3), dtype=torch.uint8, device=vae.device)
    static, vae.static_batch = vae.static_batch, None
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encoder = getattr(vae.vae.encoder, "_orig_mod", vae.vae.encoder)  # count the eager module
            compiled, vae.vae.encoder = vae.vae.encoder, encoder
            try:
                vae.encode_pairs(x)
            finally:
                vae.vae.encoder = compiled
    finally:
        vae.static_batch = static
    return counter.get_total_flops()


def bench_prep(args, log=print):
    """Time the prep's stages on a source tree and print one table: decode-only (CPU workers), encode-only
    (pre-decoded images in pinned memory, through the prep's copy / encode / copy-back path) and end to end
    (the prep's own encode_imagenet_shards, shards written to a scratch folder), with peak memory. With
    --encoder, a row of the feature encoder alone (each image with its flip) and end-to-end rows that store
    the features too."""
    import shutil
    import tempfile
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    paths, _ = list_imagenet(args.src)
    paths = paths[:args.images]
    rows = []
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak = matmul_peak_flops(device) / 1e12 if cuda else float("nan")
    log(f"bench-prep: {len(paths)} files of {args.src} on {name}, {os.cpu_count()} CPU cores; encoder "
        f"{args.vae_config and 'random-init config' or args.vae}; each image encoded with its flip"
        + (f"; bf16 matmul peak measured here {peak:.0f} TFLOP/s" if cuda else ""))

    def row(**r):
        if isinstance(r.get("tflop_s"), float):
            r["mfu"] = r["tflop_s"] / peak
        rows.append(r)
        log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if v != ""))

    def gpu_reset():
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def gpu_peak():
        return torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")

    chunks = imagenet_chunks([0], len(paths), len(paths), args.chunk_size)
    # 1. decode only: the DataLoader of the prep, its output dropped
    for workers in args.workers:
        with HostMemory() as memory:
            start, n = time.perf_counter(), 0
            for _, _, _, images, _, _ in image_loader(args.src, paths, chunks, workers, cuda, args.prefetch):
                n += len(images)
            seconds = time.perf_counter() - start
        row(stage="decode", workers=workers, batch="", variant="", seconds=seconds, img_s=n / seconds, gflop_img="",
            tflop_s="",
            gpu_gib="", host_gib=memory.peak / 2 ** 30, loader_wait="", gpu_wait="")
    # the images for the encode-only rows, decoded once into pinned memory
    pool = []
    for _, _, _, images, _, _ in image_loader(args.src, paths[:args.encode_images],
                                              imagenet_chunks([0], args.encode_images, len(paths[:args.encode_images]),
                                                              args.chunk_size), max(args.workers), False):
        pool.append(images)
    pool = torch.cat(pool)
    pool = pool.pin_memory() if cuda else pool
    vaes, flops, best = {}, None, {}
    for variant in args.variants:
        parts = set(variant.split("+"))
        for batch in args.batch_sizes:
            if variant not in vaes:  # one per variant: a compiled encoder keeps a graph per batch size
                vaes[variant] = VAEAutoencoder(args.vae, args.vae_config, 0, device=device,
                                               channels_last="channels_last" in parts, compile="compile" in parts)
            vae = vaes[variant]
            vae.static_batch = batch if "compile" in parts else None
            flops = flops or encoder_flops_per_image(vae)
            # 2. encode only: warm-up (compilation, cuDNN's choices), then every pre-decoded image once
            queue_ = EncodeQueue(vae)
            warm = time.perf_counter()
            try:
                for _ in range(2):
                    queue_.submit(pool[:batch].to(device, non_blocking=True), None)
                queue_.collect(0)
            except Exception as e:  # e.g. a compiler or out-of-memory failure: report it, time the rest
                log(f"bench-prep: {variant} at batch {batch} failed: {type(e).__name__}: {str(e)[:300]}")
                row(stage="encode", workers="", batch=batch, variant=f"{variant} FAILED ({type(e).__name__})")
                if cuda:
                    torch.cuda.empty_cache()
                continue
            warm = time.perf_counter() - warm
            gpu_reset()
            queue_ = EncodeQueue(vae)
            start = time.perf_counter()
            for i in range(0, len(pool), batch):
                queue_.submit(pool[i:i + batch].to(device, non_blocking=True), None)
            queue_.collect(0)
            seconds = time.perf_counter() - start
            ips = len(pool) / seconds
            row(stage="encode", workers="", batch=batch, variant=variant, seconds=seconds, img_s=ips,
                gflop_img=flops / 1e9,
                tflop_s=ips * flops / 1e12, gpu_gib=gpu_peak(), host_gib="", loader_wait="", gpu_wait=queue_.gpu_wait,
                warmup_s=warm)
            if ips > best.get(variant, (0, 0))[0]:
                best[variant] = (ips, batch)
    feature_encoder = FeatureEncoder(args.encoder, args.encoder_grid, device) if args.encoder else None
    feature_flops = 2 * feature_encoder.flops_per_image() if feature_encoder else 0  # each image with its flip
    if feature_encoder:  # the feature encoder alone: every pre-decoded image with its flip, at the largest batch
        batch = max(args.batch_sizes)
        feature_encoder.encode_pairs(pool[:batch].to(device))
        gpu_reset()
        start = time.perf_counter()
        for i in range(0, len(pool), batch):
            feature_encoder.encode_pairs(pool[i:i + batch].to(device, non_blocking=True)).cpu()
        seconds = time.perf_counter() - start
        row(stage="features", workers="", batch=batch, variant=args.encoder, seconds=seconds,
            img_s=len(pool) / seconds, gflop_img=feature_flops / 1e9,
            tflop_s=len(pool) * feature_flops / seconds / 1e12,
            gpu_gib=gpu_peak(), host_gib="", loader_wait="", gpu_wait="")
    # 3. end to end: the prep's pipeline, each variant at its best batch, with each worker count (and the features)
    scratch = Path(tempfile.mkdtemp(prefix="bench-prep-", dir=args.scratch))
    try:
        for variant in [v for v in args.variants if v in best]:
            batch, vae = best[variant][1], vaes[variant]
            vae.static_batch = batch if "compile" in variant.split("+") else None
            for workers in args.workers:
                gpu_reset()
                with HostMemory() as memory:
                    stats = encode_imagenet_shards(scratch, args.src, paths, np.zeros(len(paths), np.int64), [0],
                                                   len(paths), vae, batch, workers, args.chunk_size, args.prefetch,
                                                   log=lambda *a: None,
                                                   feature_encoder=feature_encoder)
                row(stage="end-to-end" + (" + features" if feature_encoder else ""), workers=workers, batch=batch,
                    variant=variant, seconds=stats["seconds"],
                    img_s=stats["images"] / stats["seconds"], gflop_img=(flops + feature_flops) / 1e9,
                    tflop_s=stats["images"] * (flops + feature_flops) / stats["seconds"] / 1e12, gpu_gib=gpu_peak(),
                    host_gib=memory.peak / 2 ** 30, loader_wait=stats["loader_wait"], gpu_wait=stats["gpu_wait"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.text_model:
        encoder = TextEncoder(args.text_model, args.text_pretrained or None, 0, 77, args.text_overrides, str(device))
        captions = imagenet_captions(paths, np.arange(len(paths)) % 1000, 0)[:args.text_captions]
        encoder.encode(captions[:256])
        gpu_reset()
        start = time.perf_counter()
        encoder.encode(captions)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        row(stage="text", workers="", batch=256, variant="captions/s", seconds=seconds, img_s=len(captions) / seconds,
            gflop_img="", tflop_s="", gpu_gib=gpu_peak(), host_gib="", loader_wait="", gpu_wait="")
    print_bench_table(rows, log)
    return rows


def print_bench_table(rows, log=print):
    """The rows as one markdown table (img/s: images, each with its flip; text rows: captions/s)."""
    columns = ["stage", "workers", "batch", "variant", "seconds", "img_s", "gflop_img", "tflop_s", "mfu", "gpu_gib",
               "host_gib", "loader_wait", "gpu_wait"]
    heads = ["stage", "workers", "batch", "variant", "s", "img/s", "GFLOP/img", "TFLOP/s", "MFU", "GPU peak GiB",
             "host peak GiB", "waited for decode s", "waited for GPU s"]

    def cell(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    log("\n".join(lines))

# -----------------------------------------------------------------------------
# Autoencoders: latents <-> images

class IdentityAutoencoder:
    """Shapes stores pixels as its latents: decoding only undoes the loader's normalisation."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def decode(self, latents):
        """Normalised latents (B, C, H, W) -> uint8 images (B, H, W, C) on the CPU."""
        x = latents.float().cpu() * self.std + self.mean
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def autoencoder_from_manifest(manifest, device="cpu"):
    latent = manifest["latent"]
    if latent["autoencoder"] == "identity":
        return IdentityAutoencoder(latent["mean"], latent["std"])
    return VAEAutoencoder(latent["autoencoder"], latent.get("autoencoder_config"), latent.get("autoencoder_seed", 0),
                          latent["mean"], latent["std"], device)


# -----------------------------------------------------------------------------
# Synthetic shards: random contents in a track's shapes, for benchmarks (train_dit.py --bench)

# The tensor shapes each track's shards hold: latents (C, H, W), views per sample, caption tokens, and the encoder
# features' grid side and width (DINOv2 ViT-B/14 at the grid of the track's configs: patch 8 on Shapes, 2 on ImageNet).
TRACK_SHAPES = {
    "shapes": dict(latent_shape=(3, IMAGE_SIZE, IMAGE_SIZE), views=1, seq_len=16, width=512, pooled_width=512,
                   features_grid=8, features_width=768),
    # SD-VAE latents of the image and its flip; ViT-L-14 token features (python data.py imagenet).
    "imagenet": dict(latent_shape=(4, IMAGENET_SIZE // 8, IMAGENET_SIZE // 8), views=2, seq_len=77, width=768,
                     pooled_width=768, features_grid=16, features_width=768),
}


def build_synthetic(out, track, n=2048, n_captions=256, seed=0, features=False):
    """Shards of seeded random latents and text features (and with `features`, encoder features) in `track`'s
    shapes (built once, then reused).

    They go through the same ShardDataset and Loader as real data, so a benchmark times the real
    input path (gather, pin, copy) without needing the real data.
    """
    out = Path(out)
    try:
        if read_manifest(out).get("synthetic") == [track, n, n_captions, seed, features]:
            return out
    except UserError:  # none yet, or another format version: (re)built below
        pass
    shape = TRACK_SHAPES[track]
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((n, shape["views"], *shape["latent_shape"]), np.float32).astype(np.float16)
    encoded = None
    if features:  # ImageNet's: 1.6 GB for 2048 images with their flips, drawn in parts
        rows = (shape["features_grid"] ** 2, shape["features_width"])
        encoded = np.concatenate([rng.standard_normal((min(256, n - i), shape["views"], *rows), np.float32)
                                  .astype(np.float16) for i in range(0, n, 256)])
    entries = [write_shard(out, 0, latents if shape["views"] > 1 else latents[:, 0], rng.integers(0, n_captions, n),
                           None if encoded is None else encoded if shape["views"] > 1 else encoded[:, 0])]
    for name, table_shape in (("text_tokens.npy", (n_captions, shape["seq_len"], shape["width"])),
                              ("text_pooled.npy", (n_captions, shape["pooled_width"]))):
        np.save(out / name, rng.standard_normal(table_shape, np.float32).astype(np.float16))
    latent = {"shape": list(shape["latent_shape"]), "dtype": "float16", "mean": [0.0] * shape["latent_shape"][0],
              "std": [1.0] * shape["latent_shape"][0], "autoencoder": "identity"}
    if shape["views"] > 1:
        latent["views"] = shape["views"]
    write_manifest(out, {
        "track": track, "synthetic": [track, n, n_captions, seed, features], "seed": seed, "count": n,
        "shards": entries, "latent": latent,
        "text": {"seq_len": shape["seq_len"], "width": shape["width"], "pooled_width": shape["pooled_width"],
                 "files": [_file_entry(out, name) for name in ("text_tokens.npy", "text_pooled.npy")]},
        **({"features": {"encoder": "synthetic (random features)", "weights_sha256": "", "grid": shape["features_grid"],
                         "width": shape["features_width"], "dtype": "float16"}} if features else {}),
    })
    return out


# -----------------------------------------------------------------------------
# Dataset and loader

class ShardDataset:
    """Memory-mapped view of a shard directory, checked against its manifest on open.

    verify: "fast" (sizes and sampled sha256 windows), "full" (every byte) or None; see verify_files.
    """

    def __init__(self, root, verify="fast"):
        self.root = Path(root)
        self.manifest = read_manifest(root)
        if verify:
            verify_files(root, self.manifest, full=verify == "full")
        shards, text, latent = self.manifest["shards"], self.manifest["text"], self.manifest["latent"]
        if not sum(s["count"] for s in shards):
            raise UserError(f"{self.root / 'manifest.json'}: field 'shards' lists no samples")
        self.latent_shape = tuple(latent["shape"])
        # Every array's shape is checked against the manifest here, not met as an IndexError mid-run.
        self.text_tokens = self._array("text_tokens.npy", "r", (None, text["seq_len"], text["width"]))
        self.text_pooled = self._array("text_pooled.npy", "r", (len(self.text_tokens), text["pooled_width"]))
        # views > 1 (ImageNet: the image and its flip) add an axis after the sample axis, to the features too.
        self.views = latent.get("views", 1)
        self.view_axis = (self.views,) if "views" in latent else ()
        self.latents = [self._array(s["latents"]["file"], "r", (s["count"], *self.view_axis, *self.latent_shape))
                        for s in shards]
        features = self.manifest.get("features")
        self.features = None if features is None else [
            self._array(s["features"]["file"], "r", (s["count"], *self.view_axis, features["grid"] ** 2,
                                                     features["width"])) for s in shards]
        self.caption_ids = np.concatenate([self._array(s["captions"]["file"], None, (s["count"],)) for s in shards])
        if not np.all((self.caption_ids >= 0) & (self.caption_ids < len(self.text_tokens))):
            raise UserError(f"{self.root}: caption indices outside the {len(self.text_tokens)}-caption table")
        self.starts = np.cumsum([0] + [s["count"] for s in shards])
        self.mean = torch.tensor(latent["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(latent["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def _array(self, name, mmap_mode, shape):
        """A stored array whose shape matches `shape` (None: any length)."""
        path = self.root / name
        try:
            array = np.load(path, mmap_mode=mmap_mode)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .npy array ({e})") from None
        if len(array.shape) != len(shape) or any(n is not None and n != m for n, m in zip(shape, array.shape)):
            expected = tuple("n" if n is None else n for n in shape)
            raise UserError(f"{path}: shape {array.shape}, the manifest says {expected}")
        return array

    def __len__(self):
        return int(self.starts[-1])

    def gather(self, indices, views=None, features=False):
        """Raw arrays for the given global sample indices (any order), each in its view (default 0); with
        `features`, the encoder features too."""
        stored = {"latents": self.latents, **({"features": self.features} if features else {})}
        out = {name: np.empty((len(indices), *arrays[0].shape[1 + len(self.view_axis):]), arrays[0].dtype)
               for name, arrays in stored.items()}
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            local = indices[rows] - self.starts[k]
            order = np.argsort(local)  # read each shard front to back
            for name, arrays in stored.items():
                chosen = arrays[k][local[order]]
                if self.view_axis:  # keep each sample's view
                    chosen = chosen[np.arange(len(rows)), 0 if views is None else views[rows[order]]]
                out[name][rows[order]] = chosen
        caption_ids = self.caption_ids[indices]
        return {**out, "text_tokens": self.text_tokens[caption_ids], "text_pooled": self.text_pooled[caption_ids],
                "caption_ids": caption_ids}


def _read_only(array):
    array.flags.writeable = False  # shared by every later call: a caller that wrote into it would change the order
    return array


# Each epoch's permutation and views are drawn once and kept (a batch spans at most two epochs): drawing them again
# for every batch cost the loader thread about 30 ms of host time per batch at ImageNet's 1.28M images, 1.1 ms at
# Shapes' 100k (a 2-core CPU; docs/bench/loader_host.py).
@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    return _read_only(np.random.default_rng([seed, epoch]).permutation(n))


@functools.lru_cache(maxsize=4)
def epoch_views(n, views, seed, epoch):
    return _read_only(np.random.default_rng([seed, epoch, VIEW_STREAM]).integers(views, size=n))


def order_hash(n, seed):
    """Hash of the fixed data order (first epoch's permutation): printed in every log."""
    return hashlib.sha256(epoch_order(n, seed, 0).astype(np.int64).tobytes()).hexdigest()[:16]


def global_batch_indices(n, seed, position, batch_size):
    """Sample indices of the global batch that starts `position` samples into the seeded stream."""
    out, taken = [], 0
    while taken < batch_size:
        epoch, offset = divmod(position + taken, n)
        chunk = epoch_order(n, seed, epoch)[offset:offset + batch_size - taken]
        out.append(chunk)
        taken += len(chunk)
    return np.concatenate(out)


def global_batch_views(n, views, seed, position, indices):
    """The view (e.g. flipped or not) of each sample of a global batch: drawn per (seed, epoch, sample)."""
    epochs = (position + np.arange(len(indices))) // n
    chosen = np.zeros(len(indices), np.int64)
    if views > 1:
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            chosen[rows] = epoch_views(n, views, seed, int(epoch))[indices[rows]]
    return chosen


def host_batch(dataset, seed, position, batch_size, rank=0, world_size=1, features=False):
    """This rank's slice of the global batch at `position`, gathered on the host as CPU tensors: the loader thread's
    whole host work per batch before the copy to the device (docs/bench/loader_host.py times it)."""
    idx = global_batch_indices(len(dataset), seed, position, batch_size)
    views = global_batch_views(len(dataset), dataset.views, seed, position, idx)
    per_rank = batch_size // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    raw = dataset.gather(idx[mine], views[mine], features)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}


class Loader:
    """Global batches in the fixed seeded order, split across ranks without overlap: (latents, text tokens, pooled
    text, caption ids, encoder features or None), the features read only with `features`.

    Resumes from a sample offset (`position`). A background thread gathers the next batches and
    copies them to the device on its own CUDA stream, so the training step never waits on the host.
    """

    def __init__(self, dataset, batch_size, seed, position=0, rank=0, world_size=1, device="cpu", prefetch=3,
                 features=False):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} does not split over {world_size} ranks")
        self.dataset, self.batch_size, self.seed, self.features = dataset, batch_size, seed, features
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.position = position  # samples consumed by batches handed out so far
        # On the device once: a per-batch copy of a pageable CPU tensor would block the host on the GPU.
        self.mean, self.std = dataset.mean.to(self.device), dataset.std.to(self.device)
        self.order_hash = order_hash(len(dataset), seed)
        self._queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(position,), daemon=True)
        self._thread.start()

    def _produce(self, position):
        try:
            self._fill(position)
        except BaseException as e:  # hand the failure to the training loop instead of hanging it
            self._put((e, None))

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _fill(self, position):
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while not self._stop.is_set():
            batch = host_batch(self.dataset, self.seed, position, self.batch_size, self.rank, self.world_size,
                               self.features)
            event = None
            if stream is not None:
                with torch.cuda.stream(stream):
                    batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
                    event = torch.cuda.Event()
                    event.record(stream)
            position += self.batch_size
            self._put((batch, event))

    def __iter__(self):
        return self

    def __next__(self):
        batch, event = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for v in batch.values():
                v.record_stream(current)
        self.position += self.batch_size
        latents = (batch["latents"].float() - self.mean) / self.std
        return (latents, batch["text_tokens"].float(), batch["text_pooled"].float(), batch["caption_ids"],
                batch.get("features"))

    def close(self):
        self._stop.set()
        self._thread.join()


# -----------------------------------------------------------------------------
# Command line

def prepare_imagenet(args):
    """The imagenet command, on one process or under torchrun (each rank encodes every world_size-th shard)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)  # events, streams and pinned copies then refer to this rank's GPU
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if world_size > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    text = dict(text_model=args.text_model, text_pretrained=args.text_pretrained or None,
                text_overrides=args.text_overrides)
    job = build_imagenet(args.src, args.out, args.vae, captions_file=args.captions, seed=args.seed,
                         shard_size=args.shard_size, batch_size=args.batch_size, workers=args.workers,
                         vae_config=args.vae_config, rank=rank, world_size=world_size, device=device,
                         channels_last=args.channels_last, compile=args.compile, chunk_size=args.chunk_size,
                         prefetch=args.prefetch, encoder=args.encoder, encoder_grid=args.encoder_grid)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        finish_imagenet(args.out, job["table"], job["n_shards"], args.vae, args.vae_config, seed=args.seed,
                        encoder=args.encoder, encoder_grid=args.encoder_grid, device=device, **text)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def add_prep_speed_args(p, bench=False):
    """The prep's throughput options (the imagenet command; bench-prep takes lists of the first two)."""
    if bench:
        p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256], help="images per encoder batch "
                       "(each encoded with its flip: twice as many encodes)")
        p.add_argument("--workers", type=int, nargs="+", default=[max((os.cpu_count() or 2) - 2, 1)],
                       help="decoding worker processes")
    else:
        p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (x2 with the flips)")
        p.add_argument("--workers", type=int, default=8, help="worker processes decoding and cropping images "
                       "(0: in the main process); under torchrun, per rank")
        p.add_argument("--channels-last", action="store_true", help="NHWC encoder weights (last-bit changes)")
        p.add_argument("--compile", action="store_true", help="torch.compile the encoder (last-bit changes)")
    p.add_argument("--chunk-size", type=int, default=32, help="files a worker decodes per task")
    p.add_argument("--prefetch", type=int, default=2, help="chunks decoded ahead per worker")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                   help="let cuDNN time its convolution algorithms (GPU; may change the last bits)")


def add_encoder_args(p, grid):
    """--encoder and --encoder-grid: the frozen encoder whose patch features the shards also store."""
    p.add_argument("--encoder", default=None, help=f"also store each image's patch features of this frozen timm "
                   f"encoder (the external-module track): a name with its pretrained tag, e.g. {DEFAULT_ENCODER}, "
                   f"hf-hub:REPO or local-dir:FOLDER (python data.py random-encoder writes a random-init one)")
    p.add_argument("--encoder-grid", type=int, default=grid, help="features per side: the model's image tokens per "
                   f"side (latent side / patch size; default {grid})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shapes", help="build the GenEval-Shapes track")
    s.add_argument("--out", default="data/shapes")
    s.add_argument("--n-train", type=int, default=100_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=10_000)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--text-model", default="ViT-B-32")
    s.add_argument("--text-pretrained", default=None, help="open_clip pretrained tag; default: seeded random init")
    s.add_argument("--text-seed", type=int, default=0)
    s.add_argument("--text-seq-len", type=int, default=16)
    add_encoder_args(s, grid=8)
    m = sub.add_parser("imagenet", help="encode ImageNet train into shards (under torchrun, each rank its shards)")
    m.add_argument("--src", required=True, help="ImageNet train folder: n01440764/*.JPEG, ...")
    m.add_argument("--out", default="data/imagenet")
    m.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local folder")
    m.add_argument("--vae-config", type=json.loads, default=None,
                   help="JSON AutoencoderKL config: a seeded random init of it instead of --vae (tests, timing)")
    m.add_argument("--captions", default=None, help='jsonl of {"path": "n01440764/x.JPEG", "caption": "..."}')
    m.add_argument("--text-model", default=DEFAULT_TEXT_MODEL,
                   help="open_clip model name (or local-dir:FOLDER); OpenAI's ViT-L/14 is ViT-L-14-quickgelu")
    m.add_argument("--text-pretrained", default="openai",
                   help="open_clip pretrained tag or checkpoint file; '' for a random init")
    m.add_argument("--text-overrides", type=json.loads, default=None, help="JSON open_clip.create_model overrides")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shard-size", type=int, default=10_000)
    add_prep_speed_args(m)
    add_encoder_args(m, grid=16)
    r = sub.add_parser("rehearsal", help="fabricate offline what the hubs would give: an ImageNet-layout tree "
                       "with odd files, random-init weights of the real models in the hubs' layouts")
    r.add_argument("--out", required=True)
    r.add_argument("--tiny", action="store_true", help="tens of images and tiny models of the same classes (CI)")
    r.add_argument("--images", type=int, default=None, help="regular images (default 10,000; --tiny 40)")
    r.add_argument("--synsets", type=int, default=None, help="synset folders (default images / 100; --tiny 4)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=None, help="processes writing images (default: one per core)")
    b = sub.add_parser("bench-prep", help="time the imagenet prep's stages: decode, encode, end to end")
    b.add_argument("--src", required=True, help="an ImageNet-layout folder (e.g. a rehearsal's train/)")
    b.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local folder")
    b.add_argument("--vae-config", type=json.loads, default=None, help="JSON AutoencoderKL config (random init)")
    b.add_argument("--images", type=int, default=4096, help="files timed (the first ones, in path order)")
    b.add_argument("--encode-images", type=int, default=1024, help="pre-decoded images for the encode-only rows")
    b.add_argument("--variants", nargs="+", default=["eager", "channels_last", "compile"],
                   help="encoder variants, parts joined by +: eager, channels_last, compile (e.g. compile+channels_last)")
    b.add_argument("--device", default=None, help="default: cuda when available")
    b.add_argument("--scratch", default=None, help="folder for the end-to-end rows' shards (default: system temp)")
    b.add_argument("--text-model", default=None, help="also time the text features of this open_clip model")
    b.add_argument("--text-pretrained", default="openai")
    b.add_argument("--text-overrides", type=json.loads, default=None)
    b.add_argument("--text-captions", type=int, default=4096)
    add_prep_speed_args(b, bench=True)
    add_encoder_args(b, grid=16)
    e = sub.add_parser("random-encoder", help="write a seeded random-init timm encoder in the hub's folder layout "
                       "(the stand-in for pretrained weights offline; load it as --encoder local-dir:OUT)")
    e.add_argument("--out", required=True)
    e.add_argument("--model", default=DEFAULT_ENCODER, help="timm model name (its architecture is what counts)")
    e.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("verify", help="check a shard directory against its manifest")
    v.add_argument("root")
    v.add_argument("--full", action="store_true", help="hash every byte (default: sizes + sampled sha256 windows)")
    args = p.parse_args(argv)
    if args.command == "shapes":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_shapes(args.out, args.n_train, args.seed, args.shard_size, args.workers, args.text_model,
                     args.text_pretrained, args.text_seed, args.text_seq_len,
                     feature_encoder=FeatureEncoder(args.encoder, args.encoder_grid, device) if args.encoder else None)
    elif args.command == "imagenet":
        prepare_imagenet(args)
    elif args.command == "rehearsal":
        fabricate_rehearsal(args.out, args.tiny, args.images, args.synsets, args.seed, args.workers)
    elif args.command == "bench-prep":
        for variant in args.variants:
            if not set(variant.split("+")) <= {"eager", "channels_last", "compile"}:
                raise UserError(f"--variants: {variant!r} is not eager, channels_last, compile or a + of them")
        bench_prep(args)
    elif args.command == "random-encoder":
        params = save_random_encoder(args.out, args.model, seed=args.seed)
        print(f"{args.out}: random-init {args.model} ({params / 1e6:.1f}M parameters, seed {args.seed}); "
              f"pass --encoder local-dir:{args.out}")
    elif args.command == "verify":
        dataset = ShardDataset(args.root, verify="full" if args.full else "fast")
        check = "every byte hashed" if args.full else "sizes and sampled sha256 windows; --full hashes every byte"
        print(f"{args.root}: ok ({check}), {len(dataset)} samples, order hash {order_hash(len(dataset), 0)} (seed 0)")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")

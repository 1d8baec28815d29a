"""evaluate.py: GenEval's rules on a sample folder, HPSv3 and CLIPScore, and metric-against-training-clock curves.

    python evaluate.py score samples/ckpt_0001000            # -> results.jsonl + scores.json
    python evaluate.py score FOLDER --backend mask2former --metrics geneval clipscore
    python evaluate.py curve runs/shapes                     # sample + score every checkpoint
    python evaluate.py plot runs/a runs/b --metrics overall clipscore --out fig.png
    python evaluate.py compare a/results.jsonl b/results.jsonl   # two backends on the same images
    python evaluate.py truth data/shapes --out truth         # ground-truth renders, for checking
    python evaluate.py geneval-prompts                       # the official 553 prompts (cached)
    python evaluate.py bench-detector --backend mask2former --random-init --device cuda
    python evaluate.py score FOLDER --metrics geneval2          # GenEval 2 (Soft-TIFA, Qwen3-VL-8B judge)
    python evaluate.py hpsv3-env ~/hpsv3-env                  # the hpsv3 package's own environment
    python evaluate.py bench-vlm --metric hpsv3 --random-init --device cuda   # or --metric geneval2

The rule engine follows djghosh13/geneval's evaluation: detections above a confidence threshold
(a stricter one for counting), at most max_objects per class, optional class-wise NMS; include
clauses must all hold (the top-`count` detections of the class are checked for colour and
position), any exclude clause fails the image; each task scores the fraction of correct images
and the overall score is the mean of the six task scores.

Detector backends plug into the same engine. `shapes` is exact for the GenEval-Shapes track:
background subtraction, connected components, nearest-palette colour, and the shape whose
template best matches the component, fitted in every box within one pixel of the component's
extent (a shape drawn at an even size or half a pixel off the grid is still its shape); its
confidence is that match (IoU) times colour purity. A component that fits a shape of no class better
(a class turned halfway between its poses, a ring, an L) or is over 1.6 times as long as wide is no
detection, as a COCO detector gives no label to an object of no COCO class.
`mask2former` is GenEval's detector stack rebuilt on transformers and open_clip (metric name
`geneval-m2f`); `official` runs an installed djghosh13/geneval checkout on the folder (`geneval`).
"""
import argparse
import collections
import csv
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import sample
from data import UserError

# -----------------------------------------------------------------------------
# GenEval's rule engine


@dataclass
class Thresholds:
    threshold: float = 0.3  # detection confidence
    counting_threshold: float = 0.9  # detection confidence for the counting task
    max_objects: int = 16  # per class
    max_overlap: float = 1.0  # NMS IoU; 1.0 keeps every detection
    position_threshold: float = 0.1  # size margin of the relative-position rule


@dataclass
class Detection:
    box: tuple  # (x1, y1, x2, y2) in pixels
    score: float
    color: str = None  # set by detectors that classify colour themselves
    mask: object = None  # (H, W) bool tensor of the object, for detectors whose colour step needs it


# GenEval's environment.yml pins numpy 1.23.1, whose argsort (default kind) is an introsort: a range whose
# ends are at most this far apart (16 elements) is insertion-sorted, so stable; larger ones are partitioned
# around a median of three, and past a depth of 2 log2(n) heap-sorted. numpy >= 2 sorts float32 with SIMD
# networks instead, whose order of ties differs from numpy 1.23's and from one CPU to another.
NUMPY1_INSERTION_SPAN = 15


def numpy1_argsort(values):
    """np.argsort(values) (default kind) as numpy 1.23 computes it, ties included, on any numpy and CPU."""
    v = [float(x) for x in values]
    # numpy's order of floats: NaN after everything
    less = lambda x, y: x < y or (y != y and x == x)
    order = list(range(len(v)))

    def heapsort(lo, hi):  # numpy's fallback when partitions keep coming out lopsided; heap positions 1..size
        def sift(top, size, item):
            child = 2 * top
            while child <= size:
                if child < size and less(v[order[lo + child - 1]], v[order[lo + child]]):
                    child += 1
                if not less(v[item], v[order[lo + child - 1]]):
                    break
                order[lo + top - 1] = order[lo + child - 1]
                top, child = child, 2 * child
            order[lo + top - 1] = item
        size = hi - lo + 1
        for top in range(size // 2, 0, -1):
            sift(top, size, order[lo + top - 1])
        for size in range(size, 1, -1):
            item = order[lo + size - 1]
            order[lo + size - 1] = order[lo]
            sift(1, size - 1, item)

    def introsort(lo, hi, depth):  # order[lo..hi], both ends included
        if depth < 0:
            heapsort(lo, hi)
            return
        larger = []  # the larger side of each partition, sorted after the smaller one (disjoint ranges)
        while hi - lo > NUMPY1_INSERTION_SPAN:
            mid = lo + (hi - lo) // 2
            for a, b in ((mid, lo), (hi, mid), (mid, lo)):
                if less(v[order[a]], v[order[b]]):
                    order[a], order[b] = order[b], order[a]
            pivot = v[order[mid]]
            order[mid], order[hi - 1] = order[hi - 1], order[mid]
            i, j = lo + 1, hi - 2
            while True:
                while less(v[order[i]], pivot):
                    i += 1
                while less(pivot, v[order[j]]):
                    j -= 1
                if i >= j:
                    break
                order[i], order[j] = order[j], order[i]
                i, j = i + 1, j - 1
            order[i], order[hi - 1] = order[hi - 1], order[i]
            depth -= 1
            if i - lo < hi - i:
                larger.append((i + 1, hi, depth))
                hi = i - 1
            else:
                larger.append((lo, i - 1, depth))
                lo = i + 1
        for k in range(lo + 1, hi + 1):  # insertion sort: equal values keep their order
            item, k0 = order[k], k
            while k0 > lo and less(v[item], v[order[k0 - 1]]):
                order[k0] = order[k0 - 1]
                k0 -= 1
            order[k0] = item
        for job in larger:
            introsort(*job)

    introsort(0, len(v) - 1, 2 * max(len(v).bit_length() - 1, 0))
    return order


def box_iou(a, b):
    """IoU of two (x1, y1, x2, y2) boxes as evaluate_images.py's compute_iou (its class-wise NMS) computes it.

    As evaluate_images.py does: a box's width and height are x2 - x1 + 1 and y2 - y1 + 1 (pixel ranges with
    both ends included), clipped at 0; its boxes are float32 (mmdet's) and under its numpy 1.23 a side is a
    float32 difference while the + 1, the areas and the ratio are float64; 0 when the union is empty.
    """
    a, b = np.asarray(a[:4], np.float32), np.asarray(b[:4], np.float32)
    area = lambda x1, y1, x2, y2: max(float(x2 - x1) + 1, 0.0) * max(float(y2 - y1) + 1, 0.0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def keep_detections(raw, tag, th: Thresholds):
    """Per class: confidence threshold, highest first, at most max_objects, then NMS; as evaluate_images.py
    does, step by step:
    - scores are float32 (mmdet's) and compared with the threshold in float32: a score of float32(0.3) is
      not above 0.3, nor one that rounds to float32(0.9) above 0.9;
    - the order is np.argsort(scores)[::-1] over all the class's detections, taken before thresholding:
      equal scores come out in numpy 1.23's order (numpy1_argsort), which for up to 16 detections puts the
      later detection first;
    - then the threshold (keeping that order), the first max_objects, and greedy NMS with box_iou
      (+ 1 pixel convention) unless max_overlap is exactly 1.
    """
    threshold = np.float32(th.counting_threshold if tag == "counting" else th.threshold)
    kept = {}
    for cls, dets in raw.items():
        scores = np.array([d.score for d in dets], np.float32)
        order = [k for k in numpy1_argsort(scores)[::-1] if scores[k] > threshold][:th.max_objects]
        chosen = []
        while order:
            best = dets[order.pop(0)]
            chosen.append(best)
            order = [k for k in order if th.max_overlap == 1 or box_iou(best.box, dets[k].box) < th.max_overlap]
        if chosen:
            kept[cls] = chosen
    return kept


def judge(detected, metadata, colors_of, th: Thresholds):
    """GenEval's verdict for one image: (correct, reason). colors_of(cls, detections) -> colour names."""
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        found = detected.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = colors_of(cls, found)
                if colors.count(clause["color"]) < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {cls}>={count}, found "
                                   f"{colors.count(clause['color'])} {clause['color']}; and "
                                   + ", ".join(f"{colors.count(c)} {c}" for c in sorted(set(colors)) if c != clause["color"]))
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            actual = data.relative_position(obj.box, other.box, th.position_threshold)
                            if relation not in actual:
                                matched = False
                                reasons.append(f"expected {cls} {relation} target, found "
                                               f"{' and '.join(sorted(actual)) or 'no relation'}")
                                break
                        if not matched:
                            break
        correct &= matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        if len(detected.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(detected[cls])}")
    return correct, "\n".join(reasons)


def summarize(rows):
    """Per-task accuracy and the overall score (the mean over tasks)."""
    tasks = {}
    for row in rows:
        tasks.setdefault(row["tag"], []).append(row["correct"])
    scores = {tag: float(np.mean(v)) for tag, v in sorted(tasks.items())}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores


# -----------------------------------------------------------------------------
# The shapes detector (GenEval-Shapes track)

BACKGROUND_TOLERANCE = 40  # max channel difference still counted as background
COLOR_TOLERANCE = 60  # max RGB distance to the palette colour for a pixel to count as that colour
MIN_AREA = 20  # pixels; smaller components are noise
PALETTE_NAMES = list(data.COLORS)
PALETTE = np.array([data.COLORS[c] for c in PALETTE_NAMES], np.float32)


def connected_components(mask, min_area=1):
    """8-connected components of at least `min_area` pixels of a boolean mask, as arrays of (y, x)
    pixels, in raster order of their first pixel."""
    from scipy import ndimage
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel())
    components = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if areas[label] >= min_area:
            ys, xs = np.nonzero(labels[box] == label)
            components.append(np.stack([ys + box[0].start, xs + box[1].start], axis=1))
    return components


# Shapes of no class, matched beside the classes so that an object drawn as one of them gets no label: GenEval's
# COCO detector gives no COCO class to an object of none (its score for every class stays low). The classes
# themselves in the poses halfway between class poses (the triangle turned by each multiple of 45 degrees; the
# square turned 22.5 degrees either way, halfway to the diamond; the cross turned 22.5 and 45 degrees), and
# outlines of no class: a ring, and an L in its four orientations. Left out, as the committed records' samples
# showed (9,080 objects): polygons with more corners, which at 11-21 pixels a model's circles match as well as
# circles (a pentagon template took 34 objects, all circles in prompts asking for one); and a half disc filling
# its box (a dome), which took wide triangles (two drawn touching) that the prompts asked for. A half disc in
# its own 2:1 box is too long for any class (MAX_ASPECT).
# Like the classes, each is drawn to fill its box, sampled at pixel centres (u, v in [-1, 1], v downwards).
TRIANGLE = ((0, -1), (1, 1), (-1, 1))
SQUARE = ((-1, -1), (1, -1), (1, 1), (-1, 1))
CROSS_BARS = (((-1 / 3, -1), (1 / 3, -1), (1 / 3, 1), (-1 / 3, 1)), ((-1, -1 / 3), (1, -1 / 3), (1, 1 / 3), (-1, 1 / 3)))
TURNED = {f"triangle turned {d}": ((TRIANGLE,), d) for d in (45, 90, 135, 180, 225, 270, 315)}
TURNED.update({f"square turned {d}": ((SQUARE,), d) for d in (22.5, -22.5)})
TURNED.update({f"cross turned {d}": (CROSS_BARS, d) for d in (22.5, -22.5, 45)})
OUTLINES = ("ring", *(f"L, bars {sides}" for sides in ("left and bottom", "left and top", "right and top", "right and bottom")))
NON_CLASS_SHAPES = (*TURNED, *OUTLINES)
# Every class is drawn in a square box, so an object whose extent is more than MAX_ASPECT times as long as wide is
# none (a bar is no square). Between the widest object that verdicts of the committed records' samples rest on
# (25 x 17 pixels, 1.47: two triangles drawn touching) and the squarest that a 2:1 shape (a half disc, a
# rectangle) rasterises to at the track's sizes (12 x 7, 1.71).
MAX_ASPECT = 1.6


def pixel_grid(width, height):
    """(u, v) of the pixel centres of a width x height box, -1 to 1 from the first to the last (data.shape_mask's)."""
    u = (np.arange(width) - (width - 1) / 2) / max((width - 1) / 2, 1)
    v = (np.arange(height) - (height - 1) / 2) / max((height - 1) / 2, 1)
    return np.meshgrid(u, v)


def turned_mask(pieces, degrees, width, height):
    """The union of convex polygons turned by `degrees` (clockwise on screen), stretched to fill the box."""
    t = np.deg2rad(degrees)
    turned = [np.array(p, float) @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) for p in pieces]
    every = np.concatenate(turned)
    low, high = every.min(axis=0), every.max(axis=0)
    u, v = pixel_grid(width, height)
    mask = np.zeros(u.shape, bool)
    for p in turned:
        p = (p - low) / (high - low) * 2 - 1
        q = np.roll(p, -1, axis=0)
        orientation = np.sign(np.sum(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]))
        inside = np.ones(u.shape, bool)
        for (x0, y0), (x1, y1) in zip(p, q):  # on the inner side of every edge, the edge included
            inside &= orientation * ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) >= -1e-9
        mask |= inside
    return mask


@lru_cache(maxsize=None)
def any_shape_mask(shape, width, height):
    """Boolean (height, width) mask of a class (data.shape_mask) or of a shape of no class (NON_CLASS_SHAPES)."""
    if shape in data.SHAPES:
        return data.shape_mask(shape, width, height)
    if shape in TURNED:
        return turned_mask(*TURNED[shape], width, height)
    u, v = pixel_grid(width, height)
    if shape == "ring":
        mask = (u * u + v * v <= 1 + 1e-9) & (u * u + v * v >= 0.3)
    elif shape.startswith("L, bars"):
        mask = (u <= -1 / 3 + 1e-9) | (v >= 1 / 3 - 1e-9)  # bars left and bottom
        mask = mask[::-1] if "top" in shape else mask
        mask = mask[:, ::-1] if "right" in shape else mask
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.ascontiguousarray(mask)


@lru_cache(maxsize=None)
def shape_templates(shape, height, width):
    """(K, height + 2, width + 2) masks of `shape` in every box whose edges lie within one pixel of the
    object's extent (the inner height x width of the canvas).

    A shape drawn at an even size, or half a pixel off the grid, rasterises differently from the
    template at its own extent: a clean 14-pixel diamond matches its 14 x 14 template at IoU 0.86,
    under the 0.9 counting threshold. The best of these boxes is the object's fit.
    """
    spans = lambda n: [(a, b) for a in range(3) for b in range(n, n + 3) if b - a >= 1]
    stack = []
    for top, bottom in spans(height):
        for left, right in spans(width):
            canvas = np.zeros((height + 2, width + 2), bool)
            canvas[top:bottom, left:right] = any_shape_mask(shape, right - left, bottom - top)
            stack.append(canvas)
    stack = np.stack(stack)
    stack.setflags(write=False)
    return stack


@lru_cache(maxsize=None)
def template_matrix(height, width):
    """Every shape's templates (shape_templates), the classes' then those of NON_CLASS_SHAPES, one row of
    packed bits each (np.packbits), with their areas and K."""
    stacks = [shape_templates(shape, height, width) for shape in (*data.SHAPES, *NON_CLASS_SHAPES)]
    flat = np.concatenate([t.reshape(len(t), -1) for t in stacks])
    return np.packbits(flat, axis=1), flat.sum(axis=1), len(stacks[0])


BITS_SET = np.array([bin(byte).count("1") for byte in range(256)], np.int64)  # of each byte value


def template_ious(mask):
    """{shape: best IoU of a padded object mask with the shape drawn in a box within one pixel of its extent},
    for the classes and then NON_CLASS_SHAPES."""
    bits, areas, k = template_matrix(mask.shape[0] - 2, mask.shape[1] - 2)
    inter = BITS_SET[bits & np.packbits(mask.ravel())].sum(axis=1)  # pixels in both: exact counts
    ious = (inter / (areas + np.count_nonzero(mask) - inter)).reshape(-1, k).max(axis=1)
    return dict(zip((*data.SHAPES, *NON_CLASS_SHAPES), ious.tolist()))


def detect_shapes(image):
    """Detections {class: [Detection]} in one (H, W, 3) uint8 image of the Shapes track.

    An object is the shape whose template fits it best, its confidence that IoU times its colour purity. An
    object that fits a shape of no class best (NON_CLASS_SHAPES; an exact tie goes to the class), or whose
    extent is over MAX_ASPECT times as long as wide (a bar is no square), is no detection.
    """
    pixels = image.astype(np.float32)
    foreground = np.abs(pixels - np.array(data.BACKGROUND, np.float32)).max(axis=2) > BACKGROUND_TOLERANCE
    # Nearest palette colour of each foreground pixel (squared distances: exact integers in float32).
    squared = np.square(pixels[foreground][:, None, :] - PALETTE[None]).sum(axis=2)
    nearest, near_enough = np.zeros(foreground.shape, np.int64), np.zeros(foreground.shape, bool)
    nearest[foreground], near_enough[foreground] = squared.argmin(axis=1), squared.min(axis=1) < COLOR_TOLERANCE ** 2
    found = {}
    for comp in connected_components(foreground, MIN_AREA):
        ys, xs = comp[:, 0], comp[:, 1]
        y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        if max(y2 - y1, x2 - x1) > MAX_ASPECT * min(y2 - y1, x2 - x1):
            continue
        mask = np.zeros((y2 - y1 + 2, x2 - x1 + 2), bool)  # one pixel of margin for the template search
        mask[ys - y1 + 1, xs - x1 + 1] = True
        ious = template_ious(mask)
        shape = max(ious, key=ious.get)
        if shape not in data.SHAPES:
            continue
        color = np.bincount(nearest[ys, xs], minlength=len(PALETTE)).argmax()
        purity = np.mean((nearest[ys, xs] == color) & near_enough[ys, xs])
        found.setdefault(shape, []).append(
            Detection((float(x1), float(y1), float(x2), float(y2)), float(ious[shape] * purity), PALETTE_NAMES[color]))
    return found


def shapes_backend(options=None):
    """Detector and colour classifier of the Shapes track: colour comes with each detection."""
    return (lambda images: [detect_shapes(image) for image in images],
            lambda requests: [[d.color for d in dets] for _, _, dets in requests])


# -----------------------------------------------------------------------------
# GenEval on COCO: the official prompts, class names and colour templates

COLOR_NAMES = tuple(data.COLORS)  # GenEval's ten colours, in its order (argmax ties go to the first)
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
CROP_BACKGROUND = 0x99  # GenEval composites each object onto #999 before classifying its colour


# -----------------------------------------------------------------------------
# Weights: hub ids or local paths; random init (same architectures) for tests and timing


@dataclass
class Options:
    """How the scorers run: the command-line flags of `score`, `curve` and `bench-detector`."""
    device: str = None  # default: cuda when available
    batch_size: int = 16  # images per detector / CLIP batch
    detector: str = "facebook/mask2former-swin-small-coco-instance"  # hub id or local folder
    detector_config: dict = None  # a random-init Mask2Former of this config instead (tests, timing)
    clip_model: str = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14 has QuickGELU; plain ViT-L-14 would load it wrongly
    clip_pretrained: str = "openai"  # open_clip tag or local checkpoint; None: random init
    clip_overrides: dict = None  # open_clip model kwargs (tests: a tiny tower)
    geneval_dir: str = None  # an official djghosh13/geneval checkout
    geneval_python: str = "python"  # the python of its (mmdet 2.x) environment
    geneval_model_path: str = None  # folder holding its mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth
    hpsv3_python: str = None  # the python of `evaluate.py hpsv3-env DIR` (default: $IMAGEGEN_SPEEDRUN_HPSV3_PYTHON)
    hpsv3_checkpoint: str = None  # local HPSv3.safetensors (default: downloaded from MizzenAI/HPSv3)
    hpsv3_base: str = None  # its Qwen2-VL base, hub id or local folder (default: HPSv3_7B.yaml's Qwen2-VL-7B-Instruct)
    hpsv3_precision: str = None  # bf16, fp16, fp32 (default: HPSv3_7B.yaml's, bf16)
    hpsv3_batch_size: int = 2  # images per HPSv3 batch: 12.8 img/s at 1 or 2 on one H200, 9.7 at 4, 4.1 at 16
    # (without flash-attn, Qwen2-VL's vision tower attends over the whole batch's patches with a block mask)
    geneval2_judge: str = "Qwen/Qwen3-VL-8B-Instruct"  # hub id or local folder
    geneval2_judge_config: dict = None  # a random-init Qwen3-VL of this config instead (tests, timing)
    geneval2_dtype: str = "auto"  # auto (the checkpoint's, bf16), bf16, fp16, fp32

    def torch_device(self):
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def weights_error(what, name, e, hint):
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return UserError(f"{what} {name!r} could not be loaded ({type(e).__name__}: {first}); {hint}")


@lru_cache(maxsize=2)
def load_mask2former(name, config_json, device):
    """A Mask2Former from the hub / a local folder, or random-init of a config (JSON, to be cacheable)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    if config_json is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**json.loads(config_json)))
    else:
        try:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(name)
        except (OSError, ValueError) as e:  # hub unreachable and not cached, unknown id, bad folder
            raise weights_error("detector", name, e, f"on a machine with network run `hf download {name}` (then set "
                                f"HF_HUB_OFFLINE=1 here) or save it to a folder and pass --detector PATH") from None
    if model.config.num_labels != len(data.COCO_CLASSES):
        raise UserError(f"detector {name!r}: {model.config.num_labels} classes; GenEval needs the 80 COCO classes")
    return model.to(device).eval().requires_grad_(False)


@lru_cache(maxsize=2)
def load_clip(name, pretrained, overrides_json, device):
    """(model, image transform, tokenizer) of open_clip; pretrained None is a seeded random init."""
    import open_clip
    try:
        with torch.random.fork_rng(devices=[]), data.quiet_random_init():
            torch.manual_seed(0)
            model, _, transform = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, **json.loads(overrides_json or "{}"))
    except (OSError, RuntimeError, ValueError) as e:  # download failed, unknown tag or file
        if pretrained is None:  # nothing was downloaded: a bad architecture is a bug, not a missing file
            raise
        raise weights_error("CLIP", f"{name}/{pretrained}", e, f"on a machine with network run `python -c \"import "
                            f"open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\"` to fill the "
                            f"cache, or pass --clip-pretrained PATH (a local checkpoint)") from None
    return model.eval().requires_grad_(False), transform, open_clip.get_tokenizer(name)


class Clip:
    """Unit-norm open_clip embeddings of images and texts (fp16 autocast on CUDA, as GenEval's CLIP runs)."""

    def __init__(self, options):
        self.device = options.torch_device()
        self.model, self.transform, self.tokenizer = load_clip(
            options.clip_model, options.clip_pretrained, json.dumps(options.clip_overrides) if options.clip_overrides
            else None, str(self.device))
        self.autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def images(self, pil_images):
        with self.autocast:
            x = torch.stack([self.transform(im) for im in pil_images]).to(self.device)
            return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts):
        with self.autocast:
            return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)


# -----------------------------------------------------------------------------
# The mask2former backend: GenEval's detector stack on transformers + open_clip

MMDET_SCALE = (1333, 800)  # GenEval's test pipeline: keep-ratio resize to fit 1333x800, pad to 32
MMDET_MEAN, MMDET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
MMDET_MAX_PER_IMAGE = 100


def mmdet_resize_shape(height, width, scale=MMDET_SCALE):
    """(height, width) of mmcv's keep-ratio rescale: the long side fits max(scale), the short side min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def mask_boxes(masks):
    """(N, 4) boxes (x1, y1, x2 + 1, y2 + 1) of (N, H, W) bool masks; an empty mask gets 0s (mmdet's mask2bbox)."""
    cols, rows = masks.any(1), masks.any(2)
    width, height = masks.shape[2], masks.shape[1]
    boxes = torch.stack([cols.int().argmax(1), rows.int().argmax(1),
                         width - cols.flip(1).int().argmax(1), height - rows.flip(1).int().argmax(1)], 1).float()
    return boxes * cols.any(1, keepdim=True)


def mmdet_instances(class_logits, mask_logits, resized, padded, original, max_per_image=MMDET_MAX_PER_IMAGE):
    """mmdet 2.x Mask2Former instance results of one image: (labels, scores, boxes, masks).

    Mask logits go to the padded input size, lose the padding and go to the original size (bilinear,
    as mmdet rescales them). Class softmax without the no-object class; the top (query, class) pairs;
    score = class probability x mean mask probability inside the binary mask; box from the mask.
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    class_scores, top = probs.flatten().topk(min(max_per_image, probs.numel()))
    labels, queries = top % num_classes, top // num_classes
    logits = F.interpolate(mask_logits[queries][None].float(), size=padded, mode="bilinear", align_corners=False)
    logits = F.interpolate(logits[:, :, :resized[0], :resized[1]], size=original, mode="bilinear",
                           align_corners=False)[0]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return labels, class_scores * mask_scores, mask_boxes(masks), masks


class Mask2FormerDetector:
    """Images -> {COCO class: [Detection with mask]} with mmdet's pre- and post-processing."""

    def __init__(self, options):
        self.device = options.torch_device()
        self.model = load_mask2former(options.detector, json.dumps(options.detector_config)
                                      if options.detector_config else None, str(self.device))
        self.mean = torch.tensor(MMDET_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(MMDET_STD, device=self.device).view(3, 1, 1)

    def preprocess(self, images):
        """A zero-padded (B, 3, H, W) batch (sides multiples of 32) and each image's resized (h, w)."""
        resized, tensors = [], []
        for image in images:
            size = mmdet_resize_shape(*image.shape[:2])
            x = torch.tensor(image, device=self.device).permute(2, 0, 1)[None].float()
            # mmcv resizes the uint8 image (bilinear), then normalises it
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)[0]
            tensors.append((x - self.mean) / self.std)
            resized.append(size)
        height = -(-max(h for h, _ in resized) // 32) * 32
        width = -(-max(w for _, w in resized) // 32) * 32
        batch = torch.stack([F.pad(x, (0, width - x.shape[2], 0, height - x.shape[1])) for x in tensors])
        return batch, resized

    @torch.no_grad()
    def __call__(self, images):
        batch, resized = self.preprocess(images)
        out = self.model(pixel_values=batch)
        found = []
        for k, image in enumerate(images):
            labels, scores, boxes, masks = mmdet_instances(out.class_queries_logits[k], out.masks_queries_logits[k],
                                                           resized[k], batch.shape[2:], image.shape[:2])
            per_class = {}
            for label, score, box, mask in zip(labels.tolist(), scores.tolist(), boxes.tolist(), masks):
                per_class.setdefault(data.COCO_CLASSES[label], []).append(Detection(tuple(box), score, mask=mask))
            found.append(per_class)
        return found


def colour_crop(image, mask, box):
    """GenEval's colour input: the object composited by its mask onto #999, cropped to its box (PIL image)."""
    composite = np.where(np.asarray(mask)[:, :, None], image, np.uint8(CROP_BACKGROUND)).astype(np.uint8)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return Image.fromarray(composite[y1:y2, x1:x2])


class ColorClassifier:
    """GenEval's zero-shot colour: CLIP over its ten colours, each the mean of three templates per class."""

    def __init__(self, clip):
        self.clip = clip
        self.class_weights = {}

    def weights(self, cls):
        """(10, D): per colour, the renormalised mean of its three template embeddings."""
        if cls not in self.class_weights:
            per_colour = [self.clip.texts([t.format(c=c, cls=cls) for t in COLOR_TEMPLATES]).mean(0)
                          for c in COLOR_NAMES]
            self.class_weights[cls] = F.normalize(torch.stack(per_colour), dim=-1)
        return self.class_weights[cls]

    def __call__(self, requests):
        """[(image, class, [Detection with mask])] -> [[colour name per detection]], one CLIP batch."""
        crops = [colour_crop(image, d.mask.cpu().numpy(), d.box) for image, _, dets in requests for d in dets]
        if not crops:
            return [[] for _ in requests]
        features = self.clip.images(crops)
        colours, start = [], 0
        for _, cls, dets in requests:
            best = (features[start:start + len(dets)] @ self.weights(cls).T).argmax(1)
            colours.append([COLOR_NAMES[i] for i in best.tolist()])
            start += len(dets)
        return colours


def mask2former_backend(options):
    return Mask2FormerDetector(options), ColorClassifier(Clip(options))


BACKENDS = {"shapes": shapes_backend, "mask2former": mask2former_backend}
# Reported under different names until their gap is measured (README: "Measuring the gap").
GENEVAL_METRICS = {"shapes": "geneval-shapes", "mask2former": "geneval-m2f", "official": "geneval"}


# -----------------------------------------------------------------------------
# The official backend: an installed djghosh13/geneval checkout, in its own environment


def official_rows(folder, options):
    """Run the checkout's evaluation/evaluate_images.py on `folder`; its results.jsonl rows."""
    if not options.geneval_dir:
        raise UserError("--backend official needs --geneval-dir (a djghosh13/geneval checkout)")
    script = Path(options.geneval_dir) / "evaluation" / "evaluate_images.py"
    if not script.exists():
        raise UserError(f"{script}: not found (--geneval-dir must be a djghosh13/geneval checkout)")
    expected = sum(len(paths) for _, _, paths in read_sample_folder(folder))
    with tempfile.TemporaryDirectory() as tmp:
        outfile = Path(tmp) / "results.jsonl"
        command = [options.geneval_python, str(script.resolve()), str(Path(folder).resolve()), "--outfile", str(outfile)]
        if options.geneval_model_path:
            command += ["--model-path", str(Path(options.geneval_model_path).resolve())]
        try:
            result = subprocess.run(command, cwd=options.geneval_dir, capture_output=True, text=True)
        except OSError as e:
            raise UserError(f"--geneval-python {options.geneval_python}: cannot run ({e.strerror or e})") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"{script}: exited with {result.returncode}: {last}")
        rows = []
        for number, line in enumerate(outfile.read_text().splitlines() if outfile.exists() else [], 1):
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{script} output line {number}: not JSON") from None
            if not isinstance(row, dict) or not {"filename", "tag", "correct", "details"} <= set(row):
                raise UserError(f"{script} output line {number}: fields filename, tag, correct, details expected")
            rows.append(row)
    if len(rows) != expected:
        raise UserError(f"{script}: scored {len(rows)} images of {folder}, which holds {expected}")
    if all(json.loads(row["details"]) == {} for row in rows):
        # The known silent failure of the mmdet stack: every confidence below threshold on some GPUs.
        print(f"warning: {script} detected no object in any of the {len(rows)} images of {folder}; check the mmcv "
              f"build against this GPU before trusting the score", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# Scoring a sample folder


def read_ahead(read, items, ahead=64, threads=4):
    """read(item) for each item, in order, up to `ahead` items early on a few threads: PNG decoding releases the
    GIL, so the scorer's reads (9 s of a 58 s GenEval point on an H200) overlap its detector. A failed read
    raises where its item comes, as a plain loop would."""
    with ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_image(path, size=None):
    """A sample image as an (H, W, 3) uint8 array. A file that is no image, is not RGB, or is not `size` (H, W)
    pixels is a one-line UserError naming it: the sampler writes RGB images of its data's size, so anything
    else was not sampled for this evaluation."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:120]})") from None
    if image.mode != "RGB":
        raise UserError(f"{path}: mode {image.mode}, expected RGB")
    if size is not None and tuple(image.size[::-1]) != tuple(size):
        raise UserError(f"{path}: {image.size[0]}x{image.size[1]} pixels, expected {size[1]}x{size[0]}")
    return np.asarray(image)


def expected_image_size(folder, backend):
    """(H, W) of a sample folder's images: as the sampler recorded it, else the Shapes track's for its detector."""
    info = Path(folder) / "sampling.json"
    size = json.loads(info.read_text()).get("image_size") if info.exists() else None
    return tuple(size) if size else (data.IMAGE_SIZE, data.IMAGE_SIZE) if backend == "shapes" else None


def read_sample_folder(folder):
    """[(prompt index, metadata, [image paths])] of a GenEval-layout folder; errors name the path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {'not a folder' if folder.exists() else 'does not exist'} (expected a sample folder: "
                        f"<folder>/00000/metadata.jsonl, <folder>/00000/samples/0000.png, ...)")
    prompt_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit())
    if not prompt_dirs:
        raise UserError(f"{folder}: no prompt folders (expected {folder}/00000/metadata.jsonl)")
    listed = {d: sorted((d / "samples").glob("*.png")) for d in prompt_dirs}
    # Images per prompt: as the sampler recorded it, else the most any prompt folder holds.
    info = folder / "sampling.json"
    expected = (json.loads(info.read_text())["images_per_prompt"] if info.exists()
                else max(max([int(p.stem) + 1 for p in images if p.stem.isdigit()] + [len(images)]) for images in listed.values()))
    entries = []
    for d, images in listed.items():
        meta_path = d / "metadata.jsonl"
        if not meta_path.exists():
            raise UserError(f"{meta_path}: missing")
        rows = data.read_metadata(meta_path)
        if len(rows) > 1:
            raise UserError(f"{meta_path}:2: a prompt folder's metadata.jsonl holds one line, this one {len(rows)}")
        metadata = rows[0]
        names = {p.name for p in images}
        missing = [f"{k:04d}.png" for k in range(max(expected, 1)) if f"{k:04d}.png" not in names]
        if missing:
            raise UserError(f"{d / 'samples' / missing[0]}: missing image (expected {expected} per prompt)")
        entries.append((int(d.name), metadata, images))
    return entries


def score_images(images, backend="shapes", th=Thresholds(), options=None, seconds=None):
    """One results row per (metadata, filename, (H, W, 3) uint8 image), as GenEval's results.jsonl, with the
    detector's raw output under "detections" (stored_detections). `seconds`, if given, gets the wall time of
    each stage: load (the models), read (the images' iterator), detect, colour, and judge (the rules)."""
    options = options or Options()
    seconds = {} if seconds is None else seconds
    last_lap = time.perf_counter()

    def lap(stage):  # the time since the last lap, added to `stage`
        nonlocal last_lap
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - last_lap
        last_lap = now
    detect, classify_colors = BACKENDS[backend](options)
    lap("load")
    images, rows = iter(images), []
    while batch := list(itertools.islice(images, options.batch_size)):
        lap("read")
        raws = detect([image for _, _, image in batch])
        lap("detect")
        kept = [keep_detections(raw, metadata["tag"], th) for raw, (metadata, _, _) in zip(raws, batch)]
        # GenEval classifies the colours of the top-`count` detections of each coloured include clause that
        # found enough of them; asking for all of them up front lets one CLIP batch serve the image batch.
        wanted = [(k, clause["class"], kept[k][clause["class"]][:clause["count"]])
                  for k, (metadata, _, _) in enumerate(batch) for clause in metadata["include"]
                  if "color" in clause and len(kept[k].get(clause["class"], [])) >= clause["count"]]
        lap("judge")
        colours = classify_colors([(batch[k][2], cls, dets) for k, cls, dets in wanted])
        lap("colour")
        for (_, _, dets), names in zip(wanted, colours):
            for detection, name in zip(dets, names):
                detection.color = name
        for k, (metadata, filename, image) in enumerate(batch):
            correct, reason = judge(kept[k], metadata, lambda cls, dets: [d.color for d in dets], th)
            rows.append({"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"],
                         "correct": correct, "reason": reason, "metadata": json.dumps(metadata),
                         "details": json.dumps({c: [list(d.box) for d in ds] for c, ds in kept[k].items()}),
                         "detections": stored_detections(raws[k], th)})
        lap("judge")
    return rows


def stored_detections(raw, th=Thresholds()):
    """The detector's raw output of one image as a record stores it: per class, [x1, y1, x2, y2, score, colour]
    of every detection the rules could keep (score above the lower of the two thresholds), in the detector's
    order; colour is null where nothing classified it. GenEval's rules re-applied to it give the image's verdict."""
    floor = min(th.threshold, th.counting_threshold)
    return {cls: [[*map(float, d.box), float(d.score), d.color] for d in dets if d.score > floor]
            for cls, dets in sorted(raw.items()) if any(d.score > floor for d in dets)}


def judge_stored(stored, metadata, th=Thresholds()):
    """GenEval's verdict for one image from its stored detections (stored_detections): True or False."""
    raw = {cls: [Detection(tuple(d[:4]), d[4], d[5]) for d in dets] for cls, dets in stored.items()}

    def colors_of(cls, dets):
        if any(d.color is None for d in dets):
            raise UserError(f"stored detections of {cls!r} lack the colour the rules need")
        return [d.color for d in dets]
    return judge(keep_detections(raw, metadata["tag"], th), metadata, colors_of, th)[0]


def geneval_prompt_problem(metadata, where):
    """A prompt GenEval's rules cannot judge is an error naming its file: a tag outside GenEval's six would be
    a seventh task in the overall mean, and an empty include would pass every image."""
    if metadata["tag"] not in data.TAGS:
        raise UserError(f"{where}:1: field 'tag' is {metadata['tag']!r}, not one of GenEval's {', '.join(data.TAGS)}")
    if not metadata["include"]:
        raise UserError(f"{where}:1: field 'include' is empty: GenEval's rules need at least one object to check")


def score_folder(folder, backend="shapes", th=Thresholds(), options=None, out=None):
    """Score every image; write results.jsonl (one row per image) and scores.json into `out` (default: the
    folder); return the scores. Under torchrun every rank calls it: the ranks share the images, rank 0 writes
    and returns the scores, the others return None."""
    rank, world_size = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                        if torch.distributed.is_initialized() else (0, 1))
    seconds = {}  # per stage, this rank's (score_images)
    if backend == "official":  # runs whole folders in its own environment, so it is no image detector
        rows = official_rows(folder, options or Options()) if rank == 0 else None
    else:
        entries = [(metadata, path) for _, metadata, paths in read_sample_folder(folder) for path in paths]
        for metadata, path in entries:
            geneval_prompt_problem(metadata, path.parent.parent / "metadata.jsonl")
        size = expected_image_size(folder, backend)
        # Under torchrun each rank scores every world_size-th image (every image is judged alone) and rank 0
        # gathers the rows back into the folder's order.
        mine = entries[rank::world_size]
        images = tqdm(read_ahead(lambda entry: (entry[0], str(entry[1]), read_image(entry[1], size)), mine),
                      total=len(mine), desc=f"scoring {Path(folder).name}" + (
                          f" (rank 0's share of {world_size})" if world_size > 1 else ""),
                      unit="img", leave=False, disable=rank != 0 or not sys.stderr.isatty())
        rows = score_images(images, backend, th, options, seconds)
        if world_size > 1:
            parts = [None] * world_size if rank == 0 else None
            torch.distributed.gather_object(rows, parts)
            rows = [parts[i % world_size][i // world_size] for i in range(len(entries))] if rank == 0 else None
    if rank != 0:
        return None
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    scores = summarize(rows)
    with open(out / "scores.json", "w") as f:
        json.dump({"backend": backend, "metric": GENEVAL_METRICS[backend], "images": len(rows), "ranks": world_size,
                   **scores, **({"seconds": {k: round(v, 2) for k, v in seconds.items()}} if seconds else {})},
                  f, indent=1)
    return scores


def compare_results(path_a, path_b):
    """Two results.jsonl of the same images (e.g. geneval and geneval-m2f): {task: (score a, score b)} and
    the fraction of images on whose verdict they agree."""
    def read(path):
        try:
            rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        return {"/".join(Path(r["filename"]).parts[-3:]): r for r in rows}  # <prompt>/samples/<image>.png
    a, b = read(path_a), read(path_b)
    if a.keys() != b.keys():
        raise UserError(f"{path_b}: holds other images than {path_a}")
    scores_a, scores_b = summarize(a.values()), summarize(b.values())
    agreement = float(np.mean([a[k]["correct"] == b[k]["correct"] for k in a]))
    return {task: (scores_a[task], scores_b[task]) for task in scores_a}, agreement



# -----------------------------------------------------------------------------
# HPSv3 and CLIPScore: one number per image, averaged overall and per tag (HPDv3: per category)

# HPSv3 runs through its own package (`pip install hpsv3`), whose pins (transformers 4.45.2, trl 0.11, ...) are
# not ours: `evaluate.py hpsv3-env DIR` makes a venv of them layered over this environment (torch, numpy, ...),
# and this file, imported under DIR/bin/python (--hpsv3-python), does the HPSv3 side in hpsv3_job.
HPSV3_REQUIREMENTS = Path(__file__).resolve().with_name("requirements-hpsv3.txt")
HPSV3_WORKER = "import json, sys; sys.path.insert(0, sys.argv[1]); import evaluate; evaluate.hpsv3_job(json.load(sys.stdin))"
HPSV3_PYTHON_ENV = "IMAGEGEN_SPEEDRUN_HPSV3_PYTHON"  # default --hpsv3-python (.ci/run sets it)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Random-init Qwen VLMs of the real architectures (no download): HPSv3's base Qwen/Qwen2-VL-7B-Instruct and GenEval 2's
# judge Qwen/Qwen3-VL-8B-Instruct (their config.json), and tiny ones of the same classes for tests. The tokenizer is a
# byte-level BPE trained on the texts the model will see (Qwen's vocabulary is not shipped with any package), with
# Qwen's special tokens; the chat template writes Qwen's format.
QWEN2_VL_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2))
QWEN2_VL_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2))
QWEN3_VL_8B = dict(
    text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=5e6,
                     max_position_embeddings=262144, vocab_size=151936,
                     rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False)
QWEN3_VL_TINY = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=5e6,
                     max_position_embeddings=4096,
                     rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                       deepstack_visual_indexes=[1]),
    tie_word_embeddings=False)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN2_SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2-VL's template adds it; Qwen3-VL's adds none


def qwen_chat_template(system=None):
    """A Jinja chat template writing Qwen's format: <|im_start|>role\\n...<|im_end|>\\n, an image as
    <|vision_start|><|image_pad|><|vision_end|>, `system` first when the conversation has no system turn."""
    default = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}"
               if system else "")
    return (default + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
            "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_qwen_tokenizer(folder, texts, vocab_size):
    """A Qwen2Tokenizer (saved to `folder`, loaded back): byte-level BPE trained on `texts`, Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "unk_token": None, "model_max_length": 32768, "clean_up_tokenization_spaces": False}))
    return AutoTokenizer.from_pretrained(str(folder))


def qwen_token_ids(tokenizer):
    """The config fields naming the tokenizer's vision and end-of-text tokens."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids, {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                 "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                 "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>")}


def hpsv3_package_config():
    """HPSv3's own model/training config (the YAML its inferencer reads by default) and its path."""
    import hpsv3
    import yaml
    path = Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml"
    return yaml.safe_load(path.read_text()), path


def build_random_hpsv3(folder, size="tiny", seed=0):
    """(Under --hpsv3-python.) A random-init HPSv3 of the real classes, as the package loads it: `folder` holds a
    Qwen2-VL base (config, processor, tokenizer; HPSv3's `model_name_or_path`) whose model.safetensors is also the
    HPSv3 checkpoint: hpsv3's Qwen2VLRewardModelBT with its rm_head and the embeddings resized for <|Reward|>."""
    from hpsv3.dataset.data_collator_qwen import INSTRUCTION, prompt_with_special_token
    from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor
    folder = Path(folder)
    texts = [INSTRUCTION, prompt_with_special_token, QWEN2_SYSTEM_PROMPT, "user assistant system"]
    tokenizer = random_qwen_tokenizer(folder, texts, 4000 if size == "7b" else 1000)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)  # Qwen2-VL's; OpenAI CLIP mean/std
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                     chat_template=qwen_chat_template(QWEN2_SYSTEM_PROMPT)).save_pretrained(folder)
    vision_ids, text_ids = qwen_token_ids(tokenizer)
    # hpsv3 adds <|Reward|> to the tokenizer when it loads, then resizes the embeddings to the tokenizer's length
    config = Qwen2VLConfig(**(QWEN2_VL_7B if size == "7b" else QWEN2_VL_TINY), **vision_ids, **text_ids,
                           vocab_size=len(tokenizer) + 1)
    package, _ = hpsv3_package_config()
    dtype = torch.bfloat16 if size == "7b" else torch.float32
    config.torch_dtype = dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2VLRewardModelBT(config, output_dim=package["output_dim"], reward_token=package["reward_token"],
                                         special_token_ids=[len(tokenizer)], rm_head_type=package["rm_head_type"],
                                         rm_head_kwargs=package.get("rm_head_kwargs"))
        finally:
            torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="1000GB")  # one file: the checkpoint
    return folder / "model.safetensors"


def hpsv3_job(jobs):
    """(Under --hpsv3-python.) Each job in turn: build a random-init HPSv3 folder, or score images with hpsv3's own
    HPSv3RewardInferencer: one [mu, sigma] per image to job["out"], load and per-batch seconds to job["timing"]."""
    for job in jobs:
        if job["mode"] == "build":
            build_random_hpsv3(job["folder"], job["size"], job.get("seed", 0))
        else:
            hpsv3_score_job(job)


def hpsv3_score_job(job):
    from hpsv3 import HPSv3RewardInferencer
    config_path = None  # the package's HPSv3_7B.yaml, unless the base model or the precision is overridden
    if job["base"] or job["precision"]:
        import yaml
        config, _ = hpsv3_package_config()
        if job["base"]:
            config["model_name_or_path"] = job["base"]
        if job["precision"]:
            config.update(bf16=job["precision"] == "bf16", fp16=job["precision"] == "fp16",
                          torch_dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[job["precision"]])
        config_path = str(Path(job["out"]).with_name("HPSv3.yaml"))
        Path(config_path).write_text(yaml.safe_dump(config))
    device = torch.device(job["device"])

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    start = clock()
    inferencer = HPSv3RewardInferencer(config_path=config_path, checkpoint_path=job["checkpoint"], device=job["device"])
    timing = {"load_s": clock() - start, "sweep": []}
    paths, prompts = job["image_paths"], job["prompts"]
    for size in job.get("sweep") or [job["batch_size"]]:  # timing: the images, batch after batch, at each size
        rows, batches = [], []
        for first in range(0, len(paths), size):
            start = clock()
            with torch.no_grad():
                rewards = inferencer.reward(image_paths=paths[first:first + size], prompts=prompts[first:first + size])
            rows += rewards.float().cpu().tolist()
            batches.append([len(rewards), clock() - start])
        timing["sweep"].append({"batch_size": size, "batches": batches})
    with open(job["out"], "w") as out:
        for mu, sigma in rows:  # the score is mu
            out.write(json.dumps([mu, sigma]) + "\n")
    timing["tokens"] = int(inferencer.prepare_batch(paths[:1], prompts[:1])["input_ids"].shape[1])  # one sequence
    Path(job["timing"]).write_text(json.dumps(timing))


def hpsv3_python(options):
    return options.hpsv3_python or os.environ.get(HPSV3_PYTHON_ENV) or "python"


def run_hpsv3(jobs, options):
    """Run hpsv3_job under --hpsv3-python; a failure is one UserError saying how to install and download."""
    python = hpsv3_python(options)
    try:
        result = subprocess.run([python, "-c", HPSV3_WORKER, str(Path(__file__).resolve().parent)],
                                input=json.dumps(jobs), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        raise UserError(f"--hpsv3-python {python}: cannot run ({e.strerror or e})") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(
            f"HPSv3 under {python} failed ({last[:200]}); it needs the hpsv3 package and its pins in that "
            f"environment (`python evaluate.py hpsv3-env DIR`, then --hpsv3-python DIR/bin/python) and the weights "
            f"MizzenAI/HPSv3 and Qwen/Qwen2-VL-7B-Instruct: on a machine with network run `hf download "
            f"MizzenAI/HPSv3` and `hf download Qwen/Qwen2-VL-7B-Instruct` (then HF_HUB_OFFLINE=1), or pass "
            f"--hpsv3-checkpoint FILE and --hpsv3-base FOLDER")


def hpsv3_scores(paths, prompts, options, random_init=None, sweep=None):
    """([mu, sigma] of each (image path, prompt), timing) from hpsv3's HPSv3RewardInferencer under --hpsv3-python.
    random_init=(folder, size): first build a random-init HPSv3 there (same process) and score with it; sweep:
    batch sizes to time in turn (the model loaded once). On the CPU it runs in fp32 unless told otherwise: hpsv3
    keeps its reward head in fp32 under CUDA autocast, which the CPU does not have."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        if random_init:
            folder = Path(random_init[0]).resolve()
            jobs.append({"mode": "build", "folder": str(folder), "size": random_init[1]})
            base, checkpoint = str(folder), str(folder / "model.safetensors")
        else:
            base, checkpoint = options.hpsv3_base, options.hpsv3_checkpoint
            base = base and (str(Path(base).resolve()) if Path(base).exists() else base)  # local folder or hub id
        jobs.append({"mode": "score", "image_paths": [str(Path(p).resolve()) for p in paths], "prompts": list(prompts),
                     "out": f"{tmp}/rewards.jsonl", "timing": f"{tmp}/timing.json",
                     "batch_size": options.hpsv3_batch_size,
                     "device": str(options.torch_device()), "checkpoint": checkpoint, "base": base, "sweep": sweep,
                     "precision": options.hpsv3_precision
                     or ("fp32" if options.torch_device().type == "cpu" else None)})
        run_hpsv3(jobs, options)
        rewards = [json.loads(line) for line in Path(jobs[-1]["out"]).read_text().splitlines()]
        timing = json.loads(Path(jobs[-1]["timing"]).read_text())
    if len(rewards) != len(paths):
        raise UserError(f"HPSv3 under {hpsv3_python(options)}: {len(rewards)} scores for {len(paths)} images")
    return rewards, timing


def hpsv3_values(paths, prompts, options):
    """HPSv3 mu of each (image path, prompt)."""
    return [mu for mu, _ in hpsv3_scores(paths, prompts, options)[0]]


def hpsv3_random_init(folder, size, options):
    """A random-init HPSv3 folder (see build_random_hpsv3); returns (base folder, checkpoint) for Options."""
    folder = Path(folder).resolve()
    run_hpsv3([{"mode": "build", "folder": str(folder), "size": size}], options)
    return str(folder), str(folder / "model.safetensors")


def make_hpsv3_env(folder, wheels=None):
    """A venv for the hpsv3 package: requirements-hpsv3.txt (installed without dependencies: every one is pinned
    there) in its own site-packages, this environment's (torch, torchvision, numpy, ...) behind them."""
    import sysconfig
    folder = Path(folder).resolve()
    stamp = hashlib.sha256(HPSV3_REQUIREMENTS.read_bytes() + sys.executable.encode()).hexdigest()
    if (folder / "requirements.sha256").exists() and (folder / "requirements.sha256").read_text() == stamp:
        return folder / "bin" / "python"  # made already, from these requirements over this environment
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        python = folder / "bin" / "python"
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        parents = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        (Path(site) / "imagegen_speedrun_parent.pth").write_text(
            "".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", str(HPSV3_REQUIREMENTS)]
                       + (["--no-index", "--find-links", str(wheels)] if wheels else []), check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"hpsv3 environment {folder}: {e}") from None
    (folder / "requirements.sha256").write_text(stamp)
    return python


def clipscore_values(paths, prompts, options):
    """CLIPScore of each (image path, prompt): 100 * max(cosine of CLIP image and text embeddings, 0)."""
    clip, values = Clip(options), []
    for start in range(0, len(paths), options.batch_size):
        images = clip.images([Image.open(p).convert("RGB") for p in paths[start:start + options.batch_size]])
        texts = clip.texts(prompts[start:start + options.batch_size])
        values += (100 * (images * texts).sum(1).clamp(min=0)).tolist()
    return values


SCALAR_METRICS = {"hpsv3": hpsv3_values, "clipscore": clipscore_values}


def score_scalar_metric(folder, metric, options=None, out=None):
    """Write <metric>.jsonl (one row per image) and <metric>.json; return {metric: mean, metric/std: standard
    deviation over the images, metric/tag: mean}."""
    entries = [(metadata, path) for _, metadata, paths in read_sample_folder(folder) for path in paths]
    values = SCALAR_METRICS[metric]([path for _, path in entries], [m["prompt"] for m, _ in entries],
                                    options or Options())
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{metric}.jsonl", "w") as f:
        for (metadata, path), value in zip(entries, values):
            f.write(json.dumps({"filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"],
                                metric: value}) + "\n")
    tags = {}
    for (metadata, _), value in zip(entries, values):
        tags.setdefault(metadata["tag"], []).append(value)
    scores = {metric: float(np.mean(values)), f"{metric}/std": float(np.std(values)),
              **{f"{metric}/{t}": float(np.mean(v)) for t, v in sorted(tags.items())}}
    (out / f"{metric}.json").write_text(json.dumps({"images": len(values), **scores}, indent=1))
    return scores


def score_metrics(folder, metrics, backend="shapes", options=None, out=None):
    """The curve columns of one sample folder: GenEval's task scores (with the metric's name), the scalar
    metrics' means and GenEval 2's Soft-TIFA. Under torchrun every rank calls it and takes a share of GenEval's
    detector; rank 0 scores the other metrics and returns the columns, the other ranks None."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    columns = {}
    for metric in sorted(metrics, key=lambda m: m != "geneval"):  # first: the other ranks need only this one
        if metric == "geneval":
            scores = score_folder(folder, backend, options=options, out=out)
            columns.update(geneval_metric=GENEVAL_METRICS[backend], **(scores or {}))
        elif rank != 0:
            break
        elif metric == "geneval2":
            columns.update(score_geneval2(folder, options, out))
        else:
            columns.update(score_scalar_metric(folder, metric, options, out))
    return columns if rank == 0 else None


def read_prompt_file(path):
    """HPDv3 benchmark files or a user prompt file, as GenEval-schema rows whose tag is the category.

    A .txt file holds one prompt per line; a .json file a list of prompts or of {"prompt", "category"}
    objects; a .jsonl file one such object per line. The category defaults to the file's name; a
    folder contributes each such file in it.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".json", ".jsonl"))
        if not files:
            raise UserError(f"{path}: no .txt, .json or .jsonl prompt files")
        return [row for p in files for row in read_prompt_file(p)]
    try:
        text = path.read_text()
        if path.suffix == ".txt":
            items = [line.strip() for line in text.splitlines() if line.strip()]
        elif path.suffix == ".json":
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as a prompt file ({type(e).__name__}: {e})") from None
    rows = []
    for number, item in enumerate(items if isinstance(items, list) else [None], 1):
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = (item["prompt"], item.get("category", path.stem))
        if isinstance(item, str):
            item = (item, path.stem)
        if not isinstance(item, tuple) or not isinstance(item[1], str):
            raise UserError(f"{path}: item {number}: expected a prompt string or a {{\"prompt\", \"category\"}} object")
        rows.append({"tag": item[1], "prompt": item[0], "include": []})
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


# -----------------------------------------------------------------------------
# GenEval 2 (Kamath et al. 2025, arXiv 2512.16853; facebookresearch/GenEval2): 800 prompts of 3 to 10 atoms, each
# with VQA questions, judged by Qwen3-VL-8B-Instruct and scored by Soft-TIFA. Each question is asked alone with
# the image ("<question> Answer in one word."); its soft score is the judge's next-token probability of the
# answer, summed over the answer's spellings (first token of each: Yes/yes/" yes"/" Yes"; for "How many": the
# number word, capitalised, each with a leading space, and its digits). An image's Soft-TIFA AM is the arithmetic
# mean of its questions' scores (atom level), its GM the geometric mean (prompt level); each is averaged over the
# images, x100. `geneval2` is the GM (the repository's headline), `geneval2/am` the AM, `geneval2/<skill>` the
# mean score of that skill's questions (pooled), `geneval2/atoms_<n>` the GM over the prompts of n atoms.

GENEVAL2_COMMIT = "a6e82d2289e8d418f27f0adee77908b07060eea3"
GENEVAL2_URL = f"https://raw.githubusercontent.com/facebookresearch/GenEval2/{GENEVAL2_COMMIT}/geneval2_data.jsonl"
GENEVAL2_SHA256 = "09233adbc9f877fba205f1a20efa4a8640e7e62a91dfd55893562bed8a928e43"  # 800 prompts, 6012 questions
GENEVAL2_SKILLS = ("object", "attribute", "count", "position", "verb")
YES_SPELLINGS = ("Yes", "yes", " yes", " Yes")
NUMBER_DIGITS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
                 "eight": "8", "nine": "9", "ten": "10"}


def geneval2_data_path():
    """GenEval 2's geneval2_data.jsonl (CC BY-NC 4.0), downloaded into the cache on first use, sha256-checked."""
    return data.cached_download(GENEVAL2_URL, GENEVAL2_SHA256, data.CACHE_DIR / "geneval2" / "geneval2_data.jsonl",
                                "GenEval 2 data", "the official 800-prompt file")


def geneval2_prompt_rows(path):
    """GenEval 2 rows as GenEval-schema prompts for the sampler: tag atoms_<n>, the questions kept with them."""
    rows = []
    for where, row in data.read_jsonl(path):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("vqa_list"), list)
                and isinstance(row.get("skills"), list) and len(row["skills"]) == len(row["vqa_list"])
                and isinstance(row.get("atom_count"), int)):
            raise UserError(f"{where}: not a GenEval 2 row (prompt, atom_count, vqa_list, skills)")
        rows.append({"tag": f"atoms_{row['atom_count']}", "prompt": row["prompt"], "include": [],
                     "atom_count": row["atom_count"], "vqa_list": row["vqa_list"], "skills": row["skills"]})
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


def geneval2_prompts_path():
    """The 800 prompts in GenEval's schema (made from the cached geneval2_data.jsonl), for the sampler."""
    path = data.CACHE_DIR / "geneval2" / "geneval2_prompts.jsonl"
    if not path.exists():
        data.write_metadata(path, geneval2_prompt_rows(geneval2_data_path()))
    return path


def answer_spellings(question, answer):
    """The strings whose first tokens' probabilities make a question's soft score (GenEval 2's evaluation.py)."""
    if question.startswith("How many"):
        digits = NUMBER_DIGITS.get(answer, "other")
        return [answer, answer.capitalize(), " " + answer, " " + answer.capitalize(), digits, " " + digits]
    return list(YES_SPELLINGS)


def soft_tifa(scores):
    """(AM, GM) of one image's question scores; the GM is 0 when a score is 0 (as scipy's gmean)."""
    scores = np.asarray(scores, np.float64)
    gm = 0.0 if (scores <= 0).any() else float(np.exp(np.log(scores).mean()))
    return float(scores.mean()), gm


def summarize_geneval2(rows):
    """Curve columns from per-image rows {"scores", "skills", "atom_count"}: x100, see the section's comment."""
    am, gm = zip(*(soft_tifa(r["scores"]) for r in rows))
    columns = {"geneval2": 100 * float(np.mean(gm)), "geneval2/am": 100 * float(np.mean(am))}
    for skill in GENEVAL2_SKILLS:
        pooled = [s for r in rows for s, k in zip(r["scores"], r["skills"]) if k == skill]
        if pooled:
            columns[f"geneval2/{skill}"] = 100 * float(np.mean(pooled))
    for n in sorted({r["atom_count"] for r in rows}):
        columns[f"geneval2/atoms_{n}"] = 100 * float(np.mean([g for g, r in zip(gm, rows) if r["atom_count"] == n]))
    return columns


def random_qwen3vl_processor(folder, texts, vocab_size=4000):
    """A Qwen3-VL processor (Qwen3-VL's image and video processors, a random tokenizer trained on `texts`)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    tokenizer = random_qwen_tokenizer(folder, texts, vocab_size)
    image_processor = Qwen2VLImageProcessor(  # Qwen3-VL's preprocessor_config: 16 px patches, merge 2
        patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=qwen_chat_template())


def random_qwen3vl(config, processor, dtype=torch.bfloat16, device="cpu", seed=0):
    """A random-init Qwen3VLForConditionalGeneration of `config` (a dict) whose token ids are the processor's."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vision_ids, text_ids = qwen_token_ids(processor.tokenizer)
    config = json.loads(json.dumps(config))
    config["text_config"].setdefault("vocab_size", len(processor.tokenizer))
    config["text_config"].update(text_ids)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config, **vision_ids))
        finally:
            torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = text_ids["pad_token_id"]
    return model


def save_random_qwen3vl(folder, config, texts=None, dtype=torch.float32):
    """A random-init Qwen3-VL judge saved like a hub checkpoint (model, processor, tokenizer) to `folder`."""
    processor = random_qwen3vl_processor(folder, texts or judge_tokenizer_texts())
    processor.save_pretrained(folder)
    random_qwen3vl(config, processor, dtype).save_pretrained(folder)
    return str(folder)


def judge_tokenizer_texts():
    """What a random-init judge's tokenizer is trained on: GenEval 2's question forms over COCO's classes and
    GenEval's colours, the answers' spellings."""
    words = [*data.COCO_CLASSES, *COLOR_NAMES, *NUMBER_DIGITS, *NUMBER_DIGITS.values(), *YES_SPELLINGS, "No", "plastic",
             "wooden", "metal", "left", "right", "front", "behind", "above", "below", "on", "of", "the"]
    return [f"How many {w} are in the image? Are there any {w} in the image? Are the {w} {c}? Is the {w} on the "
            f"left of the {c}? Answer in one word." for w in words for c in (*COLOR_NAMES, "plastic")]


@lru_cache(maxsize=1)
def load_judge(name, config_json, device, dtype):
    """(model, processor) of the GenEval 2 judge: a hub id or local folder, or random init of a config (JSON).
    dtype: auto (the checkpoint's: bf16), bf16, fp16, fp32."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    if config_json is not None:
        with tempfile.TemporaryDirectory() as tmp:
            processor = random_qwen3vl_processor(tmp, judge_tokenizer_texts())
        model = random_qwen3vl(json.loads(config_json), processor, TORCH_DTYPES.get(dtype, torch.bfloat16), device)
    else:
        try:
            processor = AutoProcessor.from_pretrained(name)
            model = Qwen3VLForConditionalGeneration.from_pretrained(name, dtype=TORCH_DTYPES.get(dtype, "auto"))
        except (OSError, ValueError) as e:
            raise weights_error("GenEval 2 judge", name, e, f"on a machine with network run `hf download {name}` "
                                f"(then set HF_HUB_OFFLINE=1 here) or pass --geneval2-judge PATH") from None
    processor.tokenizer.padding_side = "left"  # the next token follows every question's last token
    return model.to(device).eval().requires_grad_(False), processor


def judge_probabilities(questions, options):
    """Soft score of each (image path, question, answer): the judge's probability of the answer's first tokens
    after "<question> Answer in one word.", greedy, one new token (as GenEval 2's evaluation.py); batched."""
    model, processor = load_judge(options.geneval2_judge, json.dumps(options.geneval2_judge_config)
                                  if options.geneval2_judge_config else None, str(options.torch_device()),
                                  options.geneval2_dtype)
    encode = processor.tokenizer.encode
    scores = []
    for first in range(0, len(questions), options.batch_size):
        batch = questions[first:first + options.batch_size]
        images = {path: Image.open(path).convert("RGB") for path, _, _ in batch}
        conversations = [[{"role": "user", "content": [{"type": "image", "image": images[path]},
                                                       {"type": "text", "text": f"{question} Answer in one word."}]}]
                         for path, question, _ in batch]
        inputs = processor.apply_chat_template(conversations, tokenize=True, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True}).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        probs = out.scores[0].float().softmax(-1).cpu()
        for p, (_, question, answer) in zip(probs, batch):
            ids = [encode(s, add_special_tokens=False)[0] for s in answer_spellings(question, answer)]
            scores.append(float(p[ids].sum()))  # a token spelled twice counts twice, as in GenEval 2's sum
    return scores


def geneval2_image_rows(folder, options):
    """One row per image of a folder sampled from GenEval 2's prompts: its question scores and the prompt's data."""
    entries = read_sample_folder(folder)
    for _, metadata, _ in entries:
        if "vqa_list" not in metadata:
            raise UserError(f"{folder}: prompt {metadata['prompt']!r} has no GenEval 2 questions (sample "
                                 f"GenEval 2's prompts: `evaluate.py geneval2-prompts`)")
    questions, rows = [], []
    for _, metadata, paths in entries:
        for path in paths:
            questions += [(path, q, a) for q, a in metadata["vqa_list"]]
            rows.append({"filename": str(path), "prompt": metadata["prompt"], "atom_count": metadata["atom_count"],
                         "skills": metadata["skills"]})
    scores = judge_probabilities(questions, options)
    for row in rows:
        row["scores"], scores = scores[:len(row["skills"])], scores[len(row["skills"]):]
    return rows


def score_geneval2(folder, options=None, out=None):
    """Write geneval2.jsonl (one row per image: question scores, AM, GM) and geneval2.json; return the columns."""
    options = options or Options()
    rows = geneval2_image_rows(folder, options)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "geneval2.jsonl", "w") as f:
        for row in rows:
            am, gm = soft_tifa(row["scores"])
            f.write(json.dumps({**row, "am": am, "gm": gm}) + "\n")
    columns = summarize_geneval2(rows)
    judge = "random-init " + options.geneval2_judge if options.geneval2_judge_config else options.geneval2_judge
    (out / "geneval2.json").write_text(json.dumps({"images": len(rows), "judge": judge, **columns}, indent=1))
    return columns


# -----------------------------------------------------------------------------
# Curves: score every checkpoint of a run, against training-clock seconds

CLOCK_FIELDS = ["train_seconds", "step", "images_seen"]
GENEVAL_COLUMNS = [*data.TAGS, "overall"]


PANEL_METRICS = (*SCALAR_METRICS, "geneval2")  # a panel each on the curve's figure, beside GenEval's overall


def metric_columns(point):
    """A curve point's metric columns: GenEval's (with its metric's name), then the other metrics'."""
    return [k for k in point if k in GENEVAL_COLUMNS or k == "geneval_metric" or k.split("/")[0] in PANEL_METRICS]


def write_curve(run, points, name="curve", title=None):
    """<run>/<name>.json (every point), .csv (clock and metric columns) and .png (plot_run)."""
    run = Path(run)
    with open(run / f"{name}.json", "w") as f:
        json.dump(points, f, indent=1)
    columns = metric_columns(points[-1])
    with open(run / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CLOCK_FIELDS + columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    plot_run(points, run / f"{name}.png", title or run.name)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(points, path, title):
    """One run's curve: GenEval's overall score (bold) and each task against the training clock, then a panel
    per scalar metric (hpsv3, clipscore) if scored."""
    plt = pyplot()
    scalars = [c for c in metric_columns(points[-1]) if c in PANEL_METRICS]
    fig, axes = plt.subplots(1 + len(scalars), 1, figsize=(7, 4.2 + 2.6 * len(scalars)), dpi=120, sharex=True,
                             squeeze=False)
    seconds = [p["train_seconds"] for p in points]
    ax = axes[0, 0]
    for task in data.TAGS:
        if task in points[-1]:
            ax.plot(seconds, [p.get(task) for p in points], marker=".", linewidth=1, label=task)
    ax.plot(seconds, [p["overall"] for p in points], marker="o", color="black", linewidth=2.5, label="overall")
    ax.set_ylabel(points[-1].get("geneval_metric", "geneval"))
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    for ax, metric in zip(axes[1:, 0], scalars):
        ax.plot(seconds, [p[metric] for p in points], marker="o")
        ax.set_ylabel(metric)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("training clock (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(runs, path, metrics=("overall",), target=None, title=None):
    """Several runs on one PNG: a panel per metric column against training seconds, a line per run; `target` on
    'overall'."""
    plt = pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 0.8 + 3.2 * len(metrics)), dpi=120, sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for name, points in runs.items():
            shown = [p for p in points if metric in p]
            ax.plot([p["train_seconds"] for p in shown], [p[metric] for p in shown], marker="o", label=name)
        if metric in GENEVAL_COLUMNS:
            names = sorted({p.get("geneval_metric", "geneval-shapes") for points in runs.values() for p in points})
            ax.set_ylabel(f"{'/'.join(names)} {metric}")
            ax.set_ylim(0, 1)
            if target is not None and metric == "overall":
                ax.axhline(target, color="grey", linestyle="--", label=f"target {target}")
        else:
            ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1, 0].set_xlabel("training clock (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve(args):
    """Sample (unless --from-samples) and score every checkpoint of a run; rewrite the curve after each.

    GenEval 2 judges its own 800 prompts: with other metrics, its samples go to <samples>-geneval2."""
    options = options_from_args(args)
    ckpts = sample.checkpoints_of(args.run)
    others = [m for m in args.metrics if m != "geneval2"]
    passes = []  # (sample folder name, metrics, prompts)
    if others:
        prompts = args.prompts
        if "geneval" in others and args.backend != "shapes" and not prompts and not args.from_samples:
            prompts = str(data.geneval_prompts_path())  # the COCO detectors judge GenEval's own prompts
        passes.append((args.samples, others, prompts))
    if "geneval2" in args.metrics:
        prompts = None if args.from_samples else (args.prompts if not others and args.prompts
                                                  else str(geneval2_prompts_path()))
        passes.append((f"{args.samples}-geneval2" if others else args.samples, ["geneval2"], prompts))
    samplers = [None if args.from_samples else sample.sampler_from_args(argparse.Namespace(**{**vars(args),
                "prompts": prompts}), ckpts[0]) for _, _, prompts in passes]
    rank, world_size = sample.distributed()
    title = run_title(args.run)
    points = []
    for ckpt_path in ckpts:
        point = {}
        for (samples, metrics, _), sampler in zip(passes, samplers):
            out = Path(args.run) / samples / ckpt_path.stem
            if sampler is not None:
                info = sampler.run(ckpt_path, out)
            elif (out / "sampling.json").exists():
                info = json.loads((out / "sampling.json").read_text())
            else:
                raise UserError(f"{out / 'sampling.json'}: missing (this checkpoint was not sampled; drop --from-samples)")
            if world_size > 1:
                torch.distributed.barrier()  # rank 0 has written the samples that every rank scores a share of
            score_start = time.perf_counter()
            columns = score_metrics(out, metrics, args.backend, options)
            if rank == 0:
                point = {**info, **point, **columns,
                         "samples" if samples == args.samples else "samples_geneval2": str(out)}
                if sampler is not None:
                    tqdm.write(f"{out}: sampled ({sample.seconds_text(info['seconds'])}), scored "
                               f"{' '.join(metrics)} in {time.perf_counter() - score_start:.1f} s")
        if rank != 0:
            continue
        points.append(point)
        tqdm.write(f"{ckpt_path.name}: {point['train_seconds']:.1f} s  "
                   + "  ".join(f"{k} {v:.3f}" for k, v in point.items() if isinstance(v, float) and k in metric_columns(point)))
        write_curve(args.run, points, args.curve, title)
    if rank == 0:
        print(f"curve: {Path(args.run) / args.curve}.png  table: {Path(args.run) / args.curve}.csv")


def run_title(run):
    """The curve's title: the run, its config and track, and the hardware, as its log.txt gives them."""
    log = Path(run) / "log.txt"
    text = log.read_text() if log.exists() else ""
    found = [re.search(pattern, text, re.M) for pattern in (r"^config (\S+)", r'^ "track": "(\w+)"', r"^gpu: (.*?)  cuda")]
    config, track, gpu = (m[1] if m else None for m in found)
    return f"{Path(run).name}: config {config or '?'}, {track or '?'} track, {gpu or 'CPU'}" if text else Path(run).name


def truth(args):
    """Ground-truth renders of the data's evaluation prompts, in GenEval's layout."""
    manifest = data.read_manifest(args.data)
    prompts = data.read_metadata(Path(args.data) / manifest["eval_metadata"])
    for i, prompt in enumerate(sample.select_prompts(prompts, args.per_tag or 0)):
        folder = Path(args.out) / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(prompt) + "\n")
        for j in range(data.EVAL_IMAGES_PER_PROMPT):
            image = data.shapes_truth_image(manifest["seed"], i, j, prompt)
            Image.fromarray(image).save(folder / "samples" / f"{j:04d}.png")
    print(f"wrote ground-truth renders to {args.out}")


# -----------------------------------------------------------------------------
# Throughput of a detector backend (random-init weights need no download)


def bench_detector(args):
    """Detection and colour throughput (img/s) on random images, timed after one warm-up batch."""
    options = options_from_args(args)
    if args.random_init:
        options.detector_config, options.clip_pretrained = data.MASK2FORMER_SWIN_S, None
    detect, classify_colors = BACKENDS[args.backend](options)
    device, size = options.torch_device(), args.image_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.images)]
    batches = [images[i:i + options.batch_size] for i in range(0, len(images), options.batch_size)]
    # The colour step as a coloured prompt drives it: `--crops` masked objects per image (a centred square).
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    objects = [Detection((size // 4, size // 4, 3 * size // 4, 3 * size // 4), 1.0, "red", mask)] * args.crops

    def seconds(step):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def colour(batch):
        return classify_colors([(image, "car", objects) for image in batch])

    detect(batches[0]), colour(batches[0])  # warm-up: kernels, allocator, the class's text embeddings
    detection, colours = seconds(detect), seconds(colour)
    n = len(images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.backend}{' (random init)' if args.random_init else ''} on {name}: {n} images {size}x{size} "
          f"(detector input {'x'.join(map(str, mmdet_resize_shape(size, size)))}), batch {options.batch_size}")
    print(f"detection {n / detection:.2f} img/s  colour ({args.crops} crops/img) {n / colours:.2f} img/s  "
          f"total {n / (detection + colours):.2f} img/s")


# -----------------------------------------------------------------------------
# Throughput of the VLM metrics: HPSv3 (img/s) and GenEval 2's judge (prompts/s), random-init real-size models

GENEVAL_IMAGES = 553 * 4  # a GenEval curve point: its 553 prompts, 4 images each
GENEVAL2_PROMPTS = 800


def noise_images(folder, n, size, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        paths.append(Path(folder) / f"{k:05d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def bench_rows(n):
    """n GenEval 2 prompts for timing: the cached official ones, else rows of its shape (7 or 8 questions each,
    6012 / 800 = 7.5 on average; counting and yes/no questions)."""
    path = data.CACHE_DIR / "geneval2" / "geneval2_data.jsonl"
    if path.exists():
        rows = geneval2_prompt_rows(path)
        return [rows[k % len(rows)] for k in range(n)]
    made = []
    for k in range(n):
        vqa = [["How many cows are in the image?", "three"], ["Are the cows plastic?", "Yes"],
               ["Are there any cows in the image?", "Yes"], ["Are the bicycles in front of the cows?", "Yes"],
               ["How many bicycles are in the image?", "four"], ["Are the bicycles white?", "Yes"],
               ["Are there any bicycles in the image?", "Yes"], ["Is the dog on the left of the cows?", "Yes"]][:7 + k % 2]
        made.append({"tag": "atoms_7", "prompt": "four white bicycles in front of three plastic cows", "include": [],
                     "atom_count": 7, "vqa_list": vqa, "skills": ["count", "attribute", "object", "position", "count",
                                                                  "attribute", "object", "position"][:len(vqa)]})
    return made


def bench_vlm(args):
    """Random-init (or given) weights at the real sizes: HPSv3 img/s, GenEval 2 prompts/s, and minutes per curve
    point. The first batch is a warm-up (kernels, allocator) and is not timed."""
    options = options_from_args(args)
    device = options.torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.metric == "hpsv3" and args.images < 2 * max(args.sweep or [options.hpsv3_batch_size]):
        raise UserError(f"--images {args.images}: give at least two batches of the largest batch size")
    with tempfile.TemporaryDirectory() as tmp:
        if args.metric == "hpsv3":
            paths = noise_images(tmp, args.images, args.image_size)
            prompts = [f"a photo of {n} cats on a red sofa" for n in ("two", "three", "four", "five")] * args.images
            random_init = None
            if args.random_init:
                folder = Path(args.random_init_dir or data.CACHE_DIR / "random-init" / f"hpsv3-{args.size}")
                random_init = None if (folder / "model.safetensors").exists() else (folder, args.size)
                options.hpsv3_base, options.hpsv3_checkpoint = str(folder), str(folder / "model.safetensors")
            sweep = args.sweep or [options.hpsv3_batch_size]
            start = time.perf_counter()
            _, timing = hpsv3_scores(paths, prompts[:len(paths)], options, random_init, sweep)
            total = time.perf_counter() - start
            print(f"hpsv3{' (random init, ' + args.size + ')' if args.random_init else ''} on {name}: {args.images} "
                  f"images {args.image_size}x{args.image_size} (resized to 448x448 by hpsv3), precision "
                  f"{options.hpsv3_precision or ('fp32' if device.type == 'cpu' else 'bf16 (HPSv3_7B.yaml)')}, "
                  f"{timing['tokens']} tokens per sequence; model load {timing['load_s']:.1f} s, whole call "
                  f"{total:.1f} s (imports, build, load, scoring)")
            for run in timing["sweep"]:
                images, seconds = map(sum, zip(*run["batches"][1:]))
                rate = images / seconds
                print(f"batch {run['batch_size']}: {rate:.2f} img/s after the first batch; minutes per curve point: "
                      f"GenEval's {GENEVAL_IMAGES} images {GENEVAL_IMAGES / rate / 60:.2f} (+ load "
                      f"{timing['load_s'] / 60:.2f})")
        else:
            rows = bench_rows(args.images)
            for k, row in enumerate(rows):
                folder = Path(tmp) / f"{k:05d}"
                (folder / "samples").mkdir(parents=True)
                (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
                noise_images(folder / "samples", 1, args.image_size, seed=k)[0].rename(folder / "samples" / "0000.png")
            if args.random_init:
                options.geneval2_judge_config = QWEN3_VL_8B if args.size != "tiny" else QWEN3_VL_TINY
            questions = [(str(Path(tmp) / "00000" / "samples" / "0000.png"), q, a) for q, a in rows[0]["vqa_list"]]
            start = time.perf_counter()
            judge_probabilities((questions * options.batch_size)[:options.batch_size], options)  # load + warm-up
            load = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            n_questions = sum(len(r["vqa_list"]) for r in rows)
            memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
            print(f"geneval2 judge {'random-init ' + args.size if args.random_init else options.geneval2_judge} on "
                  f"{name}: {len(rows)} prompts x 1 image {args.image_size}x{args.image_size}, {n_questions} questions, "
                  f"dtype {options.geneval2_dtype}; load + warm-up {load:.1f} s{memory}")
            for size in args.sweep or [options.batch_size]:
                options.batch_size = size
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                geneval2_image_rows(tmp, options)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
                rate = len(rows) / seconds
                memory = (f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                          if device.type == "cuda" else "")
                print(f"batch {size} questions: {rate:.2f} prompts/s ({n_questions / seconds:.1f} questions/s){memory}; "
                      f"minutes per curve point: {GENEVAL2_PROMPTS} prompts x 1 image "
                      f"{GENEVAL2_PROMPTS / rate / 60:.2f}, x 4 images {4 * GENEVAL2_PROMPTS / rate / 60:.2f}")


# -----------------------------------------------------------------------------
# Command line


def add_detector_args(p, batch_flag="--batch-size"):
    """The device, batch and weights of GenEval's detectors (record.py takes these too)."""
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument(batch_flag, dest="score_batch_size", type=int, default=Options.batch_size, metavar="N",
                   help="images per detector / CLIP batch (GenEval 2: questions per batch)")
    p.add_argument("--detector", default=Options.detector, help="Mask2Former hub id or local folder")
    p.add_argument("--clip-model", default=Options.clip_model)
    p.add_argument("--clip-pretrained", default=Options.clip_pretrained, help="open_clip tag or local checkpoint")


def add_scoring_args(p, batch_flag="--batch-size", backends=(*BACKENDS, "official")):
    p.add_argument("--backend", choices=sorted(backends), default="shapes",
                   help="GenEval's detector: shapes (exact, Shapes track), mask2former (geneval-m2f), official (geneval)")
    add_detector_args(p, batch_flag)
    p.add_argument("--geneval-dir", default=None, help="official backend: a djghosh13/geneval checkout")
    p.add_argument("--geneval-python", default=Options.geneval_python, help="official backend: its environment's python")
    p.add_argument("--geneval-model-path", default=None, help="official backend: folder of its detector checkpoint")
    p.add_argument("--hpsv3-python", default=None,
                   help=f"the python of `evaluate.py hpsv3-env DIR` (default: ${HPSV3_PYTHON_ENV}, else python)")
    p.add_argument("--hpsv3-checkpoint", default=None, help="local HPSv3.safetensors")
    p.add_argument("--hpsv3-base", default=None, help="HPSv3's Qwen2-VL base: hub id or local folder "
                   "(written into a copy of its HPSv3_7B.yaml; default: Qwen/Qwen2-VL-7B-Instruct)")
    p.add_argument("--hpsv3-precision", choices=sorted(TORCH_DTYPES), default=None, help="default: HPSv3_7B.yaml's (bf16)")
    p.add_argument("--hpsv3-batch-size", type=int, default=Options.hpsv3_batch_size, metavar="N",
                   help="images per HPSv3 batch (measured fastest at 1-2)")
    p.add_argument("--geneval2-judge", default=Options.geneval2_judge, help="GenEval 2's Qwen3-VL judge: hub id or local folder")
    p.add_argument("--geneval2-dtype", choices=["auto", *sorted(TORCH_DTYPES)], default=Options.geneval2_dtype,
                   help="the judge's dtype (auto: the checkpoint's, bf16)")


def options_from_args(args):
    return Options(batch_size=args.score_batch_size, **{f.name: getattr(args, f.name) for f in fields(Options)
                                                        if f.name != "batch_size" and hasattr(args, f.name)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    metrics = dict(nargs="+", choices=["geneval", *SCALAR_METRICS, "geneval2"], default=["geneval"],
                   help="geneval (with --backend's detector), hpsv3, clipscore, geneval2 (on its own 800 prompts)")
    s = sub.add_parser("score", help="score a GenEval-layout sample folder")
    s.add_argument("folder")
    s.add_argument("--metrics", **metrics)
    s.add_argument("--out", default=None, help="where the results go (default: the folder)")
    add_scoring_args(s)
    c = sub.add_parser("curve", help="sample and score every checkpoint of a run")
    c.add_argument("run")
    c.add_argument("--metrics", **metrics)
    c.add_argument("--from-samples", action="store_true", help="score the run's existing sample folders, no sampling")
    c.add_argument("--samples", default="samples", help="sample folders: <run>/<samples>/<checkpoint>")
    c.add_argument("--curve", default="curve", help="curve files: <run>/<curve>.json, .csv, .png")
    sample.add_sampling_args(c)
    add_scoring_args(c, "--score-batch-size")
    g = sub.add_parser("plot", help="several runs' curves, each metric a panel, on one figure")
    g.add_argument("runs", nargs="+")
    g.add_argument("--metrics", nargs="+", default=["overall"], help="curve columns: overall, colors, hpsv3, ...")
    g.add_argument("--curve", default="curve")
    g.add_argument("--out", required=True)
    d = sub.add_parser("compare", help="two GenEval results.jsonl of the same images: scores and agreement")
    d.add_argument("results", nargs=2)
    sub.add_parser("geneval-prompts", help="print the path of GenEval's 553 prompts (downloaded on first use)")
    sub.add_parser("geneval2-prompts", help="print the path of GenEval 2's 800 prompts and questions (downloaded "
                   "on first use), in GenEval's schema for the sampler")
    e = sub.add_parser("hpsv3-env", help="make a venv for the hpsv3 package (requirements-hpsv3.txt over this one)")
    e.add_argument("folder")
    e.add_argument("--wheels", default=None, help="install offline from this folder of wheels")
    i = sub.add_parser("hpsv3-random-init", help="a random-init HPSv3 (Qwen2-VL base + checkpoint) in a folder")
    i.add_argument("folder")
    i.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    i.add_argument("--hpsv3-python", default=None)
    v = sub.add_parser("bench-vlm", help="HPSv3 img/s or GenEval 2 judge prompts/s, and minutes per curve point")
    v.add_argument("--metric", choices=["hpsv3", "geneval2"], required=True)
    v.add_argument("--random-init", action="store_true", help="random weights of the real architectures")
    v.add_argument("--size", choices=["tiny", "7b", "8b"], default=None, help="random init: 7b (HPSv3), 8b "
                   "(GenEval 2; the default sizes) or tiny (a CPU check of the command)")
    v.add_argument("--random-init-dir", default=None, help="hpsv3: where the random-init model is built (default: "
                   "the cache; reused when there)")
    v.add_argument("--images", type=int, default=64, help="hpsv3: images; geneval2: prompts (one image each)")
    v.add_argument("--image-size", type=int, default=512)
    v.add_argument("--sweep", type=int, nargs="+", default=None, help="batch sizes to time in turn, the model "
                   "loaded once (default: --batch-size)")
    add_scoring_args(v)
    h = sub.add_parser("hpsv3-prompts", help="HPDv3 benchmark files or a prompt file -> GenEval-schema jsonl")
    h.add_argument("src")
    h.add_argument("--out", required=True)
    b = sub.add_parser("bench-detector", help="detection + colour throughput of a backend")
    b.add_argument("--random-init", action="store_true", help="random weights of the same architectures")
    b.add_argument("--images", type=int, default=64)
    b.add_argument("--image-size", type=int, default=512)
    b.add_argument("--crops", type=int, default=2, help="objects classified for colour per image")
    add_scoring_args(b, backends=BACKENDS)
    b.set_defaults(backend="mask2former", score_batch_size=8)
    t = sub.add_parser("truth", help="ground-truth renders of a Shapes data set's evaluation prompts")
    t.add_argument("data")
    t.add_argument("--out", required=True)
    t.add_argument("--per-tag", type=int, default=None)
    args = p.parse_args(argv)
    if args.command == "score":
        sample.distributed()  # under torchrun the ranks share GenEval's detector
        scores = score_metrics(args.folder, args.metrics, args.backend, options_from_args(args), args.out)
        if scores is not None:
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
        sample.leave_process_group()
    elif args.command == "curve":
        curve(args)
        sample.leave_process_group()
    elif args.command == "plot":
        missing = [run for run in args.runs if not (Path(run) / f"{args.curve}.json").exists()]
        if missing:
            raise UserError(f"{Path(missing[0]) / args.curve}.json: missing (run `evaluate.py curve` first)")
        plot_curves({run: json.loads((Path(run) / f"{args.curve}.json").read_text()) for run in args.runs},
                    args.out, args.metrics)
        print(f"wrote {args.out}")
    elif args.command == "compare":
        tasks, agreement = compare_results(*args.results)
        for task, (a, b) in tasks.items():
            print(f"{task:14s} {a:.4f}  {b:.4f}  difference {b - a:+.4f}")
        print(f"images with the same verdict: {agreement:.4f}")
    elif args.command == "geneval-prompts":
        print(data.geneval_prompts_path())
    elif args.command == "geneval2-prompts":
        print(geneval2_prompts_path())
    elif args.command == "hpsv3-env":
        print(f"hpsv3 environment: --hpsv3-python {make_hpsv3_env(args.folder, args.wheels)}")
    elif args.command == "hpsv3-random-init":
        base, checkpoint = hpsv3_random_init(args.folder, args.size, Options(hpsv3_python=args.hpsv3_python))
        print(f"random-init HPSv3: --hpsv3-base {base} --hpsv3-checkpoint {checkpoint}")
    elif args.command == "bench-vlm":
        args.size = args.size or ("7b" if args.metric == "hpsv3" else "8b")
        if args.size not in ("tiny", "7b" if args.metric == "hpsv3" else "8b"):
            raise UserError(f"--size {args.size}: {args.metric}'s sizes are tiny and "
                                 f"{'7b' if args.metric == 'hpsv3' else '8b'}")
        bench_vlm(args)
    elif args.command == "hpsv3-prompts":
        rows = read_prompt_file(args.src)
        data.write_metadata(args.out, rows)
        print(f"wrote {len(rows)} prompts in {len({r['tag'] for r in rows})} categories to {args.out}")
    elif args.command == "bench-detector":
        bench_detector(args)
    elif args.command == "truth":
        truth(args)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")

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
confidence is that match (IoU) times colour purity.
`mask2former` is GenEval's detector stack rebuilt on transformers and open_clip (metric name
`geneval-m2f`); `official` runs an installed djghosh13/geneval checkout on the folder (`geneval`).
"""
import argparse
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
import urllib.request
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data

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


def box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def keep_detections(raw, tag, th: Thresholds):
    """Per class: confidence threshold, highest first, at most max_objects, then NMS."""
    threshold = th.counting_threshold if tag == "counting" else th.threshold
    kept = {}
    for cls, dets in raw.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:th.max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            order = [d for d in order if th.max_overlap >= 1 or box_iou(best.box, d.box) < th.max_overlap]
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
            canvas[top:bottom, left:right] = data.shape_mask(shape, right - left, bottom - top)
            stack.append(canvas)
    stack = np.stack(stack)
    stack.setflags(write=False)
    return stack


@lru_cache(maxsize=None)
def template_matrix(height, width):
    """Every shape's templates (shape_templates) flattened into one (shapes x K, pixels) float32 matrix,
    with their areas and K."""
    stacks = [shape_templates(shape, height, width) for shape in data.SHAPES]
    flat = np.concatenate([t.reshape(len(t), -1) for t in stacks])
    return flat.astype(np.float32), flat.sum(axis=1), len(stacks[0])


def template_ious(mask):
    """{shape: best IoU of a padded object mask with the shape drawn in a box within one pixel of its extent}."""
    matrix, areas, k = template_matrix(mask.shape[0] - 2, mask.shape[1] - 2)
    inter = (matrix @ mask.ravel().astype(np.float32)).astype(np.int64)  # pixel counts: exact in float32
    ious = (inter / (areas + np.count_nonzero(mask) - inter)).reshape(len(data.SHAPES), k).max(axis=1)
    return dict(zip(data.SHAPES, ious.tolist()))


def detect_shapes(image):
    """Detections {class: [Detection]} in one (H, W, 3) uint8 image of the Shapes track."""
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
        color = np.bincount(nearest[ys, xs], minlength=len(PALETTE)).argmax()
        purity = np.mean((nearest[ys, xs] == color) & near_enough[ys, xs])
        mask = np.zeros((y2 - y1 + 2, x2 - x1 + 2), bool)  # one pixel of margin for the template search
        mask[ys - y1 + 1, xs - x1 + 1] = True
        ious = template_ious(mask)
        shape = max(ious, key=ious.get)
        found.setdefault(shape, []).append(
            Detection((float(x1), float(y1), float(x2), float(y2)), float(ious[shape] * purity), PALETTE_NAMES[color]))
    return found


def shapes_backend(options=None):
    """Detector and colour classifier of the Shapes track: colour comes with each detection."""
    return (lambda images: [detect_shapes(image) for image in images],
            lambda requests: [[d.color for d in dets] for _, _, dets in requests])


# -----------------------------------------------------------------------------
# GenEval on COCO: the official prompts, class names and colour templates

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
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"  # open_clip tag or local checkpoint; None: random init
    clip_overrides: dict = None  # open_clip model kwargs (tests: a tiny tower)
    geneval_dir: str = None  # an official djghosh13/geneval checkout
    geneval_python: str = "python"  # the python of its (mmdet 2.x) environment
    geneval_model_path: str = None  # folder holding its mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth
    hpsv3_python: str = None  # the python of `evaluate.py hpsv3-env DIR` (default: $IMAGEGEN_SPEEDRUN_HPSV3_PYTHON)
    hpsv3_checkpoint: str = None  # local HPSv3.safetensors (default: downloaded from MizzenAI/HPSv3)
    hpsv3_base: str = None  # its Qwen2-VL base, hub id or local folder (default: HPSv3_7B.yaml's Qwen2-VL-7B-Instruct)
    hpsv3_precision: str = None  # bf16, fp16, fp32 (default: HPSv3_7B.yaml's, bf16)
    geneval2_judge: str = "Qwen/Qwen3-VL-8B-Instruct"  # hub id or local folder
    geneval2_judge_config: dict = None  # a random-init Qwen3-VL of this config instead (tests, timing)
    geneval2_dtype: str = "auto"  # auto (the checkpoint's, bf16), bf16, fp16, fp32

    def torch_device(self):
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# Mask2Former Swin-S COCO instance segmentation, the architecture of Options.detector.
MASK2FORMER_SWIN_S = dict(
    backbone_config=dict(model_type="swin", embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24],
                         window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"]),
    num_labels=80, num_queries=100, hidden_dim=256, encoder_layers=6, decoder_layers=10)


def weights_error(what, name, e, hint):
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return data.UserError(f"{what} {name!r} could not be loaded ({type(e).__name__}: {first}); {hint}")


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
    if model.config.num_labels != len(COCO_CLASSES):
        raise data.UserError(f"detector {name!r}: {model.config.num_labels} classes; GenEval needs the 80 COCO classes")
    return model.to(device).eval().requires_grad_(False)


@lru_cache(maxsize=2)
def load_clip(name, pretrained, overrides_json, device):
    """(model, image transform, tokenizer) of open_clip; pretrained None is a seeded random init."""
    import open_clip
    try:
        with torch.random.fork_rng(devices=[]):
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
                per_class.setdefault(COCO_CLASSES[label], []).append(Detection(tuple(box), score, mask=mask))
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
        raise data.UserError("--backend official needs --geneval-dir (a djghosh13/geneval checkout)")
    script = Path(options.geneval_dir) / "evaluation" / "evaluate_images.py"
    if not script.exists():
        raise data.UserError(f"{script}: not found (--geneval-dir must be a djghosh13/geneval checkout)")
    expected = sum(len(paths) for _, _, paths in read_sample_folder(folder))
    with tempfile.TemporaryDirectory() as tmp:
        outfile = Path(tmp) / "results.jsonl"
        command = [options.geneval_python, str(script.resolve()), str(Path(folder).resolve()), "--outfile", str(outfile)]
        if options.geneval_model_path:
            command += ["--model-path", str(Path(options.geneval_model_path).resolve())]
        try:
            result = subprocess.run(command, cwd=options.geneval_dir, capture_output=True, text=True)
        except OSError as e:
            raise data.UserError(f"--geneval-python {options.geneval_python}: cannot run ({e.strerror or e})") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise data.UserError(f"{script}: exited with {result.returncode}: {last}")
        rows = []
        for number, line in enumerate(outfile.read_text().splitlines() if outfile.exists() else [], 1):
            try:
                row = json.loads(line)
            except ValueError:
                raise data.UserError(f"{script} output line {number}: not JSON") from None
            if not isinstance(row, dict) or not {"filename", "tag", "correct", "details"} <= set(row):
                raise data.UserError(f"{script} output line {number}: fields filename, tag, correct, details expected")
            rows.append(row)
    if len(rows) != expected:
        raise data.UserError(f"{script}: scored {len(rows)} images of {folder}, which holds {expected}")
    if all(json.loads(row["details"]) == {} for row in rows):
        # The known silent failure of the mmdet stack: every confidence below threshold on some GPUs.
        print(f"warning: {script} detected no object in any of the {len(rows)} images of {folder}; check the mmcv "
              f"build against this GPU before trusting the score", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# Scoring a sample folder


def read_sample_folder(folder):
    """[(prompt index, metadata, [image paths])] of a GenEval-layout folder; errors name the path."""
    folder = Path(folder)
    prompt_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()) if folder.is_dir() else []
    if not prompt_dirs:
        raise data.UserError(f"{folder}: no prompt folders (expected {folder}/00000/metadata.jsonl)")
    listed = {d: sorted((d / "samples").glob("*.png")) for d in prompt_dirs}
    # Images per prompt: as the sampler recorded it, else the most any prompt folder holds.
    info = folder / "sampling.json"
    expected = (json.loads(info.read_text())["images_per_prompt"] if info.exists()
                else max(max([int(p.stem) + 1 for p in images if p.stem.isdigit()] + [len(images)]) for images in listed.values()))
    entries = []
    for d, images in listed.items():
        meta_path = d / "metadata.jsonl"
        if not meta_path.exists():
            raise data.UserError(f"{meta_path}: missing")
        metadata = data.read_metadata(meta_path)[0]
        names = {p.name for p in images}
        missing = [f"{k:04d}.png" for k in range(max(expected, 1)) if f"{k:04d}.png" not in names]
        if missing:
            raise data.UserError(f"{d / 'samples' / missing[0]}: missing image (expected {expected} per prompt)")
        entries.append((int(d.name), metadata, images))
    return entries


def score_images(images, backend="shapes", th=Thresholds(), options=None):
    """One results row per (metadata, filename, (H, W, 3) uint8 image), as GenEval's results.jsonl."""
    options = options or Options()
    detect, classify_colors = BACKENDS[backend](options)
    images, rows = iter(images), []
    while batch := list(itertools.islice(images, options.batch_size)):
        kept = [keep_detections(raw, metadata["tag"], th)
                for raw, (metadata, _, _) in zip(detect([image for _, _, image in batch]), batch)]
        # GenEval classifies the colours of the top-`count` detections of each coloured include clause that
        # found enough of them; asking for all of them up front lets one CLIP batch serve the image batch.
        wanted = [(k, clause["class"], kept[k][clause["class"]][:clause["count"]])
                  for k, (metadata, _, _) in enumerate(batch) for clause in metadata["include"]
                  if "color" in clause and len(kept[k].get(clause["class"], [])) >= clause["count"]]
        colours = classify_colors([(batch[k][2], cls, dets) for k, cls, dets in wanted])
        known = {(k, cls, len(dets)): c for (k, cls, dets), c in zip(wanted, colours)}
        for k, (metadata, filename, image) in enumerate(batch):
            correct, reason = judge(kept[k], metadata, lambda cls, dets: known[k, cls, len(dets)], th)
            rows.append({"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"],
                         "correct": correct, "reason": reason, "metadata": json.dumps(metadata),
                         "details": json.dumps({c: [list(d.box) for d in ds] for c, ds in kept[k].items()})})
    return rows


def score_folder(folder, backend="shapes", th=Thresholds(), options=None, out=None):
    """Score every image; write results.jsonl (one row per image) and scores.json into `out` (default: the
    folder); return the scores."""
    if backend == "official":  # runs whole folders in its own environment, so it is no image detector
        rows = official_rows(folder, options or Options())
    else:
        images = ((metadata, str(path), np.asarray(Image.open(path).convert("RGB")))
                  for _, metadata, paths in read_sample_folder(folder) for path in paths)
        rows = score_images(images, backend, th, options)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    scores = summarize(rows)
    with open(out / "scores.json", "w") as f:
        json.dump({"backend": backend, "metric": GENEVAL_METRICS[backend], "images": len(rows), **scores}, f, indent=1)
    return scores


def compare_results(path_a, path_b):
    """Two results.jsonl of the same images (e.g. geneval and geneval-m2f): {task: (score a, score b)} and
    the fraction of images on whose verdict they agree."""
    def read(path):
        try:
            rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        except (OSError, ValueError) as e:
            raise data.UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        return {"/".join(Path(r["filename"]).parts[-3:]): r for r in rows}  # <prompt>/samples/<image>.png
    a, b = read(path_a), read(path_b)
    if a.keys() != b.keys():
        raise data.UserError(f"{path_b}: holds other images than {path_a}")
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
        raise data.UserError(f"--hpsv3-python {python}: cannot run ({e.strerror or e})") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise data.UserError(
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
                     "out": f"{tmp}/rewards.jsonl", "timing": f"{tmp}/timing.json", "batch_size": options.batch_size,
                     "device": str(options.torch_device()), "checkpoint": checkpoint, "base": base, "sweep": sweep,
                     "precision": options.hpsv3_precision
                     or ("fp32" if options.torch_device().type == "cpu" else None)})
        run_hpsv3(jobs, options)
        rewards = [json.loads(line) for line in Path(jobs[-1]["out"]).read_text().splitlines()]
        timing = json.loads(Path(jobs[-1]["timing"]).read_text())
    if len(rewards) != len(paths):
        raise data.UserError(f"HPSv3 under {hpsv3_python(options)}: {len(rewards)} scores for {len(paths)} images")
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
        raise data.UserError(f"hpsv3 environment {folder}: {e}") from None
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
    metrics' means and GenEval 2's Soft-TIFA."""
    columns = {}
    for metric in metrics:
        if metric == "geneval":
            columns.update(geneval_metric=GENEVAL_METRICS[backend],
                           **score_folder(folder, backend, options=options, out=out))
        elif metric == "geneval2":
            columns.update(score_geneval2(folder, options, out))
        else:
            columns.update(score_scalar_metric(folder, metric, options, out))
    return columns


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
            raise data.UserError(f"{path}: no .txt, .json or .jsonl prompt files")
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
        raise data.UserError(f"{path}: cannot be read as a prompt file ({type(e).__name__}: {e})") from None
    rows = []
    for number, item in enumerate(items if isinstance(items, list) else [None], 1):
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = (item["prompt"], item.get("category", path.stem))
        if isinstance(item, str):
            item = (item, path.stem)
        if not isinstance(item, tuple) or not isinstance(item[1], str):
            raise data.UserError(f"{path}: item {number}: expected a prompt string or a {{\"prompt\", \"category\"}} object")
        rows.append({"tag": item[1], "prompt": item[0], "include": []})
    if not rows:
        raise data.UserError(f"{path}: no prompts")
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
    path = data.CACHE_DIR / "geneval2" / "geneval2_data.jsonl"
    if not path.exists():
        try:
            with urllib.request.urlopen(GENEVAL2_URL, timeout=30) as response:
                body = response.read()
        except OSError as e:
            raise data.UserError(f"GenEval 2 data: cannot download {GENEVAL2_URL} ({e}); download it on a machine "
                                 f"with network to {path}, or pass --prompts PATH") from None
        if hashlib.sha256(body).hexdigest() != GENEVAL2_SHA256:
            raise data.UserError(f"GenEval 2 data: {GENEVAL2_URL} is not the official 800-prompt file (sha256 "
                                 f"differs); pass --prompts PATH")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_bytes(body)
        os.replace(path.with_suffix(".tmp"), path)
    return path


def geneval2_prompt_rows(path):
    """GenEval 2 rows as GenEval-schema prompts for the sampler: tag atoms_<n>, the questions kept with them."""
    rows = []
    for where, row in data.read_jsonl(path):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("vqa_list"), list)
                and isinstance(row.get("skills"), list) and len(row["skills"]) == len(row["vqa_list"])
                and isinstance(row.get("atom_count"), int)):
            raise data.UserError(f"{where}: not a GenEval 2 row (prompt, atom_count, vqa_list, skills)")
        rows.append({"tag": f"atoms_{row['atom_count']}", "prompt": row["prompt"], "include": [],
                     "atom_count": row["atom_count"], "vqa_list": row["vqa_list"], "skills": row["skills"]})
    if not rows:
        raise data.UserError(f"{path}: no prompts")
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
    words = [*COCO_CLASSES, *COLOR_NAMES, *NUMBER_DIGITS, *NUMBER_DIGITS.values(), *YES_SPELLINGS, "No", "plastic",
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
            raise data.UserError(f"{folder}: prompt {metadata['prompt']!r} has no GenEval 2 questions (sample "
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


def write_curve(run, points, name="curve"):
    """<run>/<name>.json (every point), .csv (clock and metric columns) and .png (each metric a panel)."""
    run = Path(run)
    with open(run / f"{name}.json", "w") as f:
        json.dump(points, f, indent=1)
    columns = metric_columns(points[-1])
    with open(run / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CLOCK_FIELDS + columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    plot_curves({run.name: points}, run / f"{name}.png", [c for c in columns if c == "overall" or c in PANEL_METRICS])


def plot_curves(runs, path, metrics=("overall",), target=None):
    """One PNG: a panel per metric column against training seconds, a line per run; `target` on 'overall'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    axes[-1, 0].set_xlabel("training wall-clock (s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve(args):
    """Sample (unless --from-samples) and score every checkpoint of a run; rewrite the curve after each.

    GenEval 2 judges its own 800 prompts: with other metrics, its samples go to <samples>-geneval2."""
    import sample
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
                raise data.UserError(f"{out / 'sampling.json'}: missing (this checkpoint was not sampled; drop "
                                     f"--from-samples)")
            if sample.distributed()[0] != 0:  # under torchrun, rank 0 scores what the ranks sampled
                continue
            point = {**info, **point, **score_metrics(out, metrics, args.backend, options),
                     "samples" if samples == args.samples else "samples_geneval2": str(out)}
        if sample.distributed()[0] != 0:
            continue
        points.append(point)
        print(f"{ckpt_path.name}: {point['train_seconds']:.1f} s  "
              + "  ".join(f"{k} {v:.3f}" for k, v in point.items() if isinstance(v, float) and k in metric_columns(point)))
        write_curve(args.run, points, args.curve)
    if sample.distributed()[0] == 0:
        print(f"curve: {Path(args.run) / args.curve}.png  table: {Path(args.run) / args.curve}.csv")


def truth(args):
    """Ground-truth renders of the data's evaluation prompts, in GenEval's layout."""
    manifest = data.read_manifest(args.data)
    prompts = data.read_metadata(Path(args.data) / manifest["eval_metadata"])
    import sample
    for i, prompt in enumerate(sample.select_prompts(prompts, args.per_tag)):
        folder = Path(args.out) / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(prompt) + "\n")
        for j in range(data.EVAL_IMAGES_PER_PROMPT):
            image = data.shapes_truth_image(manifest["seed"], i, j, prompt)
            Image.fromarray(image).save(folder / "samples" / f"{j:04d}.png")
    print(f"wrote ground-truth renders to {args.out}")


# -----------------------------------------------------------------------------
# Records: pack n runs into a record folder, and check one (README.md, "Records")

TARGETS = {"shapes": 0.90}  # overall score a record must reach
# Checkpoint cadence (README): up to the claimed mark, checkpoints at most 5% of its time apart, never required
# closer than the floor, plus the lateness of a checkpoint that lands at the first clock check after its mark.
CHECKPOINT_GAP_FRACTION = 0.05
CHECKPOINT_GAP_FLOOR = {"shapes": 5.0, "imagenet": 600.0}  # training seconds
CHECKPOINT_LATENESS = {"shapes": 2.0, "imagenet": 60.0}  # training seconds
RUN_KEYS = ("seed", "out", "resume", "wandb")  # hyperparameters that may differ between the runs of one recipe
SAMPLER_KEYS = ("nfe", "sampler", "cfg_scale", "cfg_interval", "time_shift", "weights", "seed", "images_per_prompt")
MIN_RUNS, MAX_P = 5, 0.01
LOG_SECTIONS = ("train_dit.py", "model.py", "data.py", "environment", "hyperparameters")


def max_checkpoint_gap(track, claimed_seconds):
    """The largest gap between consecutive checkpoints a record may have (training seconds)."""
    return (max(CHECKPOINT_GAP_FLOOR[track], CHECKPOINT_GAP_FRACTION * claimed_seconds)
            + CHECKPOINT_LATENESS[track])


def log_sections(text):
    """{section name: body} of a train_dit.py log, split on its `==================== name` header lines
    (whole lines only: the embedded train_dit.py holds the header's format string too)."""
    parts = re.split(r"^==================== (.*)\n", text, flags=re.M)[1:]
    return {name.strip(): body for name, body in zip(parts[::2], parts[1::2])}


def log_hyperparameters(sections):
    """The run's Hyperparameters as a dict: the JSON that opens the hyperparameters section of log_sections()."""
    return json.JSONDecoder().raw_decode(sections.get("hyperparameters", "").strip())[0]


def time_to_target(points, target):
    """Training seconds of the first checkpoint whose overall score reaches the target (None: never)."""
    return next((p["train_seconds"] for p in points if p["overall"] >= target), None)


def p_value_above(scores, target):
    """One-sided one-sample t-test, H1: the mean score is above the target."""
    scores = np.asarray(scores, np.float64)
    if scores.std() == 0:  # the t statistic is undefined; the evidence is all-or-nothing
        return 0.0 if scores[0] > target else 1.0
    from scipy import stats
    return float(stats.ttest_1samp(scores, target, alternative="greater").pvalue)


def largest_gap(points, k):
    """The largest gap between consecutive checkpoints of a run, from the start to its k-th (training seconds)."""
    seconds = [0.0] + [p["train_seconds"] for p in points[:k + 1]]
    return max(b - a for a, b in zip(seconds, seconds[1:]))


def too_coarse(curves, k, seconds, track):
    """{run index: largest checkpoint gap up to mark k} of the runs whose cadence is too coarse for a claim at
    `seconds`, and the gap that such a claim allows."""
    allowed = max_checkpoint_gap(track, seconds)
    return {i: gap for i, points in enumerate(curves) if (gap := largest_gap(points, k)) > allowed}, allowed


def mark_evidence(curves, k, target):
    """The runs' scores at the k-th checkpoint mark, the p-value of their test, and the mark's mean time."""
    scores = [points[k]["overall"] for points in curves]
    return scores, p_value_above(scores, target), float(np.mean([points[k]["train_seconds"] for points in curves]))


def record_statistics(curves, target, track):
    """Time-to-target per run, and the claim: the earliest checkpoint mark whose scores beat the target at
    p < MAX_P and up to which every run's checkpoints keep the cadence for that claim (a cadence too coarse
    for a mark defers the claim to a later mark, never to an earlier one)."""
    ttt = [time_to_target(points, target) for points in curves]
    reached = [t for t in ttt if t is not None]
    stats = {"target": target, "n": len(curves), "time_to_target": ttt,
             "time_to_target_mean": float(np.mean(reached)) if reached else None,
             "time_to_target_std": float(np.std(reached, ddof=1)) if len(reached) > 1 else None,
             "claimed_checkpoint": None, "claimed_seconds": None, "scores_at_claim": None, "p_value": None}
    for k in range(min(len(points) for points in curves)):
        scores, p, seconds = mark_evidence(curves, k, target)
        if p < MAX_P and not too_coarse(curves, k, seconds, track)[0]:
            stats.update(claimed_checkpoint=k, scores_at_claim=scores, p_value=p, claimed_seconds=seconds)
            break
    return stats


def shapes_eval_set_problem(prompts, seed):
    """Why `prompts` are not a fair Shapes evaluation set (None when they are): every tag, each with its
    first m prompts of the evaluation list of the dataset's seed, m the same for all tags. A subset that
    drops a hard tag, or picks its prompts, would raise the overall score."""
    import sample
    counts = {tag: sum(p["tag"] == tag for p in prompts) for tag in data.TAGS}
    if 0 in counts.values() or len(set(counts.values())) > 1 or len(prompts) != sum(counts.values()):
        return f"prompts per tag {counts}: a record scores the same number of prompts of every tag"
    official = sample.select_prompts(data.shapes_eval_prompts(seed), counts[data.TAGS[0]])
    if json.loads(json.dumps(prompts)) != json.loads(json.dumps(official)):
        return (f"the prompts are not the first {counts[data.TAGS[0]]} of each tag of the evaluation list "
                f"(dataset seed {seed})")
    return None


def pack_samples(folder, path):
    """All images of a GenEval-layout folder in one compact file: (prompts, images, H, W, 3) uint8 + prompts."""
    entries = read_sample_folder(folder)
    images = np.stack([np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]) for _, _, paths in entries])
    np.savez_compressed(path, images=images, prompts=np.array(json.dumps([m for _, m, _ in entries])))


def score_packed_samples(path, backend="shapes"):
    """(scores, prompts) of a pack_samples file."""
    packed = np.load(path)
    prompts = json.loads(str(packed["prompts"]))
    images = packed["images"]  # read once: every packed[...] lookup decompresses the whole array again
    return summarize(score_images(((m, f"{i:05d}/{j:04d}", image) for i, m in enumerate(prompts)
                                   for j, image in enumerate(images[i])), backend)), prompts


def run_table(names, logs, curves, stats):
    """A markdown table of the runs: training seed, steps and images/s at the end (the machine's speed is part
    of the clock), first checkpoint at the target, score at the claim."""
    rows = ["| run | seed | steps | img/s (images / clock) | first checkpoint at target | score at the claim |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, log_text, points, first, score in zip(names, logs, curves, stats["time_to_target"],
                                                     stats["scores_at_claim"]):
        last = points[-1]
        rows.append(f"| {name} | {log_hyperparameters(log_sections(log_text))['seed']} | {last['step']:,} | "
                    f"{last['images_seen'] / last['train_seconds']:,.0f} | "
                    f"{'never' if first is None else f'{first:.1f} s'} | {score:.3f} |")
    return "\n".join(rows) + "\n"


def build_record(runs, out, name, track="shapes", target=None):
    """Copy n runs' logs and curves into `out`, pack the claimed checkpoint's samples, write record.json."""
    target = TARGETS[track] if target is None else target
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = [json.loads((Path(r) / "curve.json").read_text()) for r in runs]
    stats = record_statistics(curves, target, track)
    if stats["claimed_checkpoint"] is None:
        raise data.UserError(f"{runs[0]}: no checkpoint mark beats target {target} at p < {MAX_P} over {len(runs)} runs "
                             f"with checkpoints at most {CHECKPOINT_GAP_FRACTION:.0%} of its time apart")
    k = stats["claimed_checkpoint"]
    names = [f"run{i + 1}" for i in range(len(runs))]
    logs = [(Path(r) / "log.txt").read_text() for r in runs]
    for run, run_name, log_text, points in zip(runs, names, logs, curves):
        (out / run_name).mkdir(exist_ok=True)
        (out / run_name / "log.txt").write_text(log_text)
        (out / run_name / "curve.json").write_text(json.dumps(points, indent=1))
        samples = Path(run) / "samples" / Path(points[k]["checkpoint"]).stem
        if track == "shapes":
            pack_samples(samples, out / run_name / "samples.npz")
        else:  # the full set is large: a grid here, and a checksum of every image
            entries = read_sample_folder(samples)
            digest = hashlib.sha256(b"".join(p.read_bytes() for _, _, paths in entries for p in paths))
            (out / run_name / "samples.sha256").write_text(digest.hexdigest() + "\n")
        if run_name == "run1":
            first = [np.asarray(Image.open(paths[0]).convert("RGB")) for _, _, paths in read_sample_folder(samples)]
            import sample
            sample.save_grid(first[::max(1, len(first) // 48)][:48], out / "grid.png", columns=8)
    plot_curves(dict(zip(names, curves)), out / "curve.png", target=target)
    params = curves[0][0]["params"]
    hardware = next((line.split("  ")[0][5:] for line in logs[0].splitlines() if line.startswith("gpu: ")), "cpu")
    record = {"track": track, "name": name, "runs": names, "params": params, "hardware": hardware, **stats}
    (out / "record.json").write_text(json.dumps(record, indent=1))
    if not (out / "README.md").exists():
        (out / "README.md").write_text(
            f"# {name}\n\nWhat changed and why: (describe)\n\n"
            f"- time to target {target}: {stats['claimed_seconds']:.1f} s of training clock "
            f"(checkpoint mark {k}; one-sided t-test over {len(runs)} runs, p = {stats['p_value']:.2g})\n"
            f"- first checkpoint at target per run: mean {stats['time_to_target_mean']:.1f} s "
            f"+- {stats['time_to_target_std'] or 0:.1f} s\n"
            f"- parameters: {params:,}\n- hardware: {hardware}\n- evaluation samples: run*/samples.*\n\n"
            f"{run_table(names, logs, curves, stats)}\n"
            f"Runs of this attempt not in this record, with their scores (README.md, Records: every run\n"
            f"started for an attempt is part of it): (none, or list them)\n\n"
            f"![curve](curve.png)\n")
    return record


def check_record(folder):
    """Every reason the record at `folder` is malformed or inconsistent (empty: it holds)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / "record.json").read_text())
        track, runs = record["track"], record["runs"]
        target = record["target"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder / 'record.json'}: unreadable or incomplete ({type(e).__name__}: {e})"]
    if track not in CHECKPOINT_GAP_FLOOR:
        return [f"{folder / 'record.json'}: unknown track {track!r} (one of {sorted(CHECKPOINT_GAP_FLOOR)})"]
    problems = []
    if target != TARGETS.get(track, target):
        problems.append(f"record.json: target {target} is not the {track} target {TARGETS[track]}")
    if len(runs) < MIN_RUNS:
        problems.append(f"record.json: {len(runs)} runs; a record needs at least {MIN_RUNS}")
    curves, code, hashes, seeds, eval_sets, samplers = [], set(), set(), set(), set(), set()
    recipes, train_seeds = {}, []
    for run in runs:
        log_path, curve_path = folder / run / "log.txt", folder / run / "curve.json"
        try:
            log_text = log_path.read_text()
            seeds.update(re.findall(r"\(dataset seed (\d+)\)", log_text))
            sections = log_sections(log_text)
            points = json.loads(curve_path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{folder / run}: unreadable log or curve ({type(e).__name__}: {e})")
            continue
        for section in LOG_SECTIONS:
            if not sections.get(section, "").strip():
                problems.append(f"{log_path}: no '{section}' section (the log must embed the code and environment)")
        code.add(tuple(sections.get(f, "") for f in ("train_dit.py", "model.py", "data.py")))
        try:
            hp = log_hyperparameters(sections)
            train_seeds.append(hp["seed"])
            recipes[run] = {k: v for k, v in hp.items() if k not in RUN_KEYS}
        except (ValueError, KeyError, TypeError):
            problems.append(f"{log_path}: the hyperparameters section does not open with the run's JSON")
        found = [w.split("=", 1)[1] for w in log_text.split() if w.startswith("data_order_hash=")]
        if not found:
            problems.append(f"{log_path}: no data_order_hash")
        hashes.update(found)
        for i, p in enumerate(points):
            if p.get("nfe") != 100:
                problems.append(f"{curve_path}: checkpoint {i} sampled with nfe {p.get('nfe')}, not 100")
            missing = [key for key in SAMPLER_KEYS if key not in p]
            if missing:
                problems.append(f"{curve_path}: checkpoint {i} does not record its sampler settings {missing}")
            samplers.add(json.dumps({key: p.get(key) for key in SAMPLER_KEYS}, sort_keys=True))
        seconds = [0.0] + [p["train_seconds"] for p in points]
        if not points or any(b <= a for a, b in zip(seconds, seconds[1:])):
            problems.append(f"{curve_path}: no checkpoints, or their training seconds do not increase")
        curves.append(points)
    if len(code) > 1:
        problems.append(f"{folder}: the runs' logs embed different code")
    if len(hashes) > 1:
        problems.append(f"{folder}: the runs' logs give different data order hashes {sorted(hashes)}")
    if len(set(map(str, train_seeds))) < len(train_seeds):
        problems.append(f"{folder}: the runs share a training seed {train_seeds}; a record's runs use different seeds")
    keys = set().union(*recipes.values())
    differing = sorted(k for k in keys if len({json.dumps(r.get(k)) for r in recipes.values()}) > 1)
    if differing:
        problems.append(f"{folder}: the runs' hyperparameters differ in {differing}; a record is one recipe")
    if len(samplers) > 1:  # settings chosen per run or per checkpoint would select on the metric
        problems.append(f"{folder}: checkpoints sampled with different settings: {' | '.join(sorted(samplers))}")
    if problems or not curves:
        return problems
    stats = record_statistics(curves, target, track)
    for key in ("time_to_target", "time_to_target_mean", "time_to_target_std", "claimed_checkpoint",
                "claimed_seconds", "scores_at_claim", "p_value"):
        if not np.allclose(np.array(stats[key], dtype=float), np.array(record.get(key), dtype=float), atol=1e-6,
                           equal_nan=True):
            problems.append(f"record.json: {key} is {record.get(key)!r}, the curves give {stats[key]!r}")
    if stats["claimed_checkpoint"] is None:
        problems.append(f"{folder}: no checkpoint mark beats {target} at p < {MAX_P} with the cadence it needs")
        for k in range(min(len(points) for points in curves)):  # why the first mark that beats it is not a claim
            _, p, seconds = mark_evidence(curves, k, target)
            if p < MAX_P:
                gaps, allowed = too_coarse(curves, k, seconds, track)
                problems.extend(f"{folder / runs[i] / 'curve.json'}: checkpoints up to mark {k} at most {allowed:.1f} s "
                                f"apart for a {seconds:.1f} s claim (largest gap {gap:.1f} s)" for i, gap in gaps.items())
                break
        return problems
    k = stats["claimed_checkpoint"]
    for run, points in zip(runs, curves):
        if track == "shapes":
            try:
                scores, prompts = score_packed_samples(folder / run / "samples.npz")
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{folder / run / 'samples.npz'}: unreadable ({type(e).__name__}: {e})")
                continue
            rescored = scores["overall"]
            eval_sets.add(json.dumps(prompts))
            problem = shapes_eval_set_problem(prompts, int(next(iter(seeds)))) if len(seeds) == 1 else (
                f"the logs give dataset seeds {sorted(seeds)}, not one")
            if problem:
                problems.append(f"{folder / run / 'samples.npz'}: {problem}")
            if abs(rescored - points[k]["overall"]) > 1e-9:
                problems.append(f"{folder / run / 'samples.npz'}: rescored overall {rescored:.4f}, "
                                f"curve.json says {points[k]['overall']:.4f}")
        elif not (folder / run / "samples.sha256").exists():
            problems.append(f"{folder / run}: no samples.sha256")
    if len(eval_sets) > 1:
        problems.append(f"{folder}: the runs were scored on different prompts")
    for name in ("README.md", "curve.png", "grid.png"):
        if not (folder / name).exists():
            problems.append(f"{folder / name}: missing")
    return problems


# -----------------------------------------------------------------------------
# Throughput of a detector backend (random-init weights need no download)


def bench_detector(args):
    """Detection and colour throughput (img/s) on random images, timed after one warm-up batch."""
    options = options_from_args(args)
    if args.random_init:
        options.detector_config, options.clip_pretrained = MASK2FORMER_SWIN_S, None
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
    if args.metric == "hpsv3" and args.images < 2 * max(args.sweep or [options.batch_size]):
        raise data.UserError(f"--images {args.images}: give at least two batches of the largest batch size")
    with tempfile.TemporaryDirectory() as tmp:
        if args.metric == "hpsv3":
            paths = noise_images(tmp, args.images, args.image_size)
            prompts = [f"a photo of {n} cats on a red sofa" for n in ("two", "three", "four", "five")] * args.images
            random_init = None
            if args.random_init:
                folder = Path(args.random_init_dir or data.CACHE_DIR / "random-init" / f"hpsv3-{args.size}")
                random_init = None if (folder / "model.safetensors").exists() else (folder, args.size)
                options.hpsv3_base, options.hpsv3_checkpoint = str(folder), str(folder / "model.safetensors")
            sweep = args.sweep or [options.batch_size]
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


def add_scoring_args(p, batch_flag="--batch-size", backends=(*BACKENDS, "official")):
    p.add_argument("--backend", choices=sorted(backends), default="shapes",
                   help="GenEval's detector: shapes (exact, Shapes track), mask2former (geneval-m2f), official (geneval)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument(batch_flag, dest="score_batch_size", type=int, default=Options.batch_size,
                   help="images per detector / CLIP / HPSv3 batch")
    p.add_argument("--detector", default=Options.detector, help="Mask2Former hub id or local folder")
    p.add_argument("--clip-model", default=Options.clip_model)
    p.add_argument("--clip-pretrained", default=Options.clip_pretrained, help="open_clip tag or local checkpoint")
    p.add_argument("--geneval-dir", default=None, help="official backend: a djghosh13/geneval checkout")
    p.add_argument("--geneval-python", default=Options.geneval_python, help="official backend: its environment's python")
    p.add_argument("--geneval-model-path", default=None, help="official backend: folder of its detector checkpoint")
    p.add_argument("--hpsv3-python", default=None,
                   help=f"the python of `evaluate.py hpsv3-env DIR` (default: ${HPSV3_PYTHON_ENV}, else python)")
    p.add_argument("--hpsv3-checkpoint", default=None, help="local HPSv3.safetensors")
    p.add_argument("--hpsv3-base", default=None, help="HPSv3's Qwen2-VL base: hub id or local folder "
                   "(written into a copy of its HPSv3_7B.yaml; default: Qwen/Qwen2-VL-7B-Instruct)")
    p.add_argument("--hpsv3-precision", choices=sorted(TORCH_DTYPES), default=None, help="default: HPSv3_7B.yaml's (bf16)")
    p.add_argument("--geneval2-judge", default=Options.geneval2_judge, help="GenEval 2's Qwen3-VL judge: hub id or local folder")
    p.add_argument("--geneval2-dtype", choices=["auto", *sorted(TORCH_DTYPES)], default=Options.geneval2_dtype,
                   help="the judge's dtype (auto: the checkpoint's, bf16)")


def options_from_args(args):
    return Options(batch_size=args.score_batch_size, **{f.name: getattr(args, f.name) for f in fields(Options)
                                                        if f.name != "batch_size" and hasattr(args, f.name)})


def main(argv=None):
    import sample
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
    r = sub.add_parser("record", help="pack n runs (each with curve.json) into a record folder")
    r.add_argument("runs", nargs="+")
    r.add_argument("--name", required=True)
    r.add_argument("--track", choices=sorted(CHECKPOINT_GAP_FLOOR), default="shapes")
    r.add_argument("--out", default=None, help="default: records/<track>/<date>_<name>")
    k = sub.add_parser("check-record", help="validate a record folder")
    k.add_argument("folder")
    t = sub.add_parser("truth", help="ground-truth renders of a Shapes data set's evaluation prompts")
    t.add_argument("data")
    t.add_argument("--out", required=True)
    t.add_argument("--per-tag", type=int, default=None)
    args = p.parse_args(argv)
    if args.command == "score":
        scores = score_metrics(args.folder, args.metrics, args.backend, options_from_args(args), args.out)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
    elif args.command == "curve":
        curve(args)
    elif args.command == "plot":
        missing = [run for run in args.runs if not (Path(run) / f"{args.curve}.json").exists()]
        if missing:
            raise data.UserError(f"{Path(missing[0]) / args.curve}.json: missing (run `evaluate.py curve` first)")
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
            raise data.UserError(f"--size {args.size}: {args.metric}'s sizes are tiny and "
                                 f"{'7b' if args.metric == 'hpsv3' else '8b'}")
        bench_vlm(args)
    elif args.command == "hpsv3-prompts":
        rows = read_prompt_file(args.src)
        data.write_metadata(args.out, rows)
        print(f"wrote {len(rows)} prompts in {len({r['tag'] for r in rows})} categories to {args.out}")
    elif args.command == "bench-detector":
        bench_detector(args)
    elif args.command == "record":
        import datetime
        out = args.out or f"records/{args.track}/{datetime.date.today():%Y-%m-%d}_{args.name}"
        record = build_record(args.runs, out, args.name, args.track)
        print(f"record: {out}  {record['claimed_seconds']:.1f} s to {record['target']} "
              f"(p = {record['p_value']:.2g}, n = {record['n']})")
    elif args.command == "check-record":
        problems = check_record(args.folder)
        if problems:
            sys.exit(f"error: {args.folder}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
        print(f"record OK: {args.folder}")
    elif args.command == "truth":
        truth(args)


if __name__ == "__main__":
    try:
        main()
    except data.UserError as e:
        sys.exit(f"error: {e}")

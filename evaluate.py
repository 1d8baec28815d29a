"""evaluate.py: GenEval's rules on a sample folder, and metric-against-training-clock curves.

    python evaluate.py score samples/ckpt_0001000            # -> results.jsonl + scores.json
    python evaluate.py curve runs/shapes                     # sample + score every checkpoint
    python evaluate.py truth data/shapes --out truth         # ground-truth renders, for checking

The rule engine follows djghosh13/geneval's evaluation: detections above a confidence threshold
(a stricter one for counting), at most max_objects per class, optional class-wise NMS; include
clauses must all hold (the top-`count` detections of the class are checked for colour and
position), any exclude clause fails the image; each task scores the fraction of correct images
and the overall score is the mean of the six task scores.

Detector backends plug into the same engine. `shapes` is exact for the GenEval-Shapes track:
background subtraction, connected components, nearest-palette colour, and the shape whose
template best matches the component; its confidence is that match (IoU) times colour purity.
"""
import argparse
import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def connected_components(mask):
    """8-connected components of a boolean mask, as arrays of (y, x) pixels.

    Min-label propagation over 3x3 neighbourhoods with pointer jumping: each foreground pixel ends
    labelled with the smallest flat index in its component, in a few vectorised passes.
    """
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.min([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        new = np.where(mask, neighbours, big)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[flat[new]], big)  # pointer jumping: follow labels twice
        if np.array_equal(new, labels):
            break
        labels = new
    ys, xs = np.nonzero(mask)
    order = np.argsort(labels[ys, xs], kind="stable")
    ys, xs, keys = ys[order], xs[order], labels[ys, xs][order]
    splits = np.nonzero(np.diff(keys))[0] + 1
    return [np.stack([y, x], axis=1) for y, x in zip(np.split(ys, splits), np.split(xs, splits))] if len(ys) else []


def detect_shapes(image):
    """Detections {class: [Detection]} in one (H, W, 3) uint8 image of the Shapes track."""
    pixels = image.astype(np.float32)
    foreground = np.abs(pixels - np.array(data.BACKGROUND, np.float32)).max(axis=2) > BACKGROUND_TOLERANCE
    distances = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=3)
    nearest, nearest_dist = distances.argmin(axis=2), distances.min(axis=2)
    found = {}
    for comp in connected_components(foreground):
        if len(comp) < MIN_AREA:
            continue
        ys, xs = comp[:, 0], comp[:, 1]
        y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        color = np.bincount(nearest[ys, xs], minlength=len(PALETTE)).argmax()
        purity = np.mean((nearest[ys, xs] == color) & (nearest_dist[ys, xs] < COLOR_TOLERANCE))
        mask = np.zeros((y2 - y1, x2 - x1), bool)
        mask[ys - y1, xs - x1] = True
        ious = {}
        for shape in data.SHAPES:
            template = data.shape_mask(shape, x2 - x1, y2 - y1)
            ious[shape] = (template & mask).sum() / (template | mask).sum()
        shape = max(ious, key=ious.get)
        found.setdefault(shape, []).append(
            Detection((float(x1), float(y1), float(x2), float(y2)), float(ious[shape] * purity), PALETTE_NAMES[color]))
    return found


def shapes_backend():
    """Detector and colour classifier of the Shapes track: colour comes with each detection."""
    return detect_shapes, lambda image, cls, dets: [d.color for d in dets]


BACKENDS = {"shapes": shapes_backend}


# -----------------------------------------------------------------------------
# Scoring a sample folder


def read_sample_folder(folder):
    """[(prompt index, metadata, [image paths])] of a GenEval-layout folder; errors name the path."""
    folder = Path(folder)
    prompt_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()) if folder.is_dir() else []
    if not prompt_dirs:
        raise data.DataError(f"{folder}: no prompt folders (expected {folder}/00000/metadata.jsonl)")
    listed = {d: sorted((d / "samples").glob("*.png")) for d in prompt_dirs}
    # Images per prompt: as the sampler recorded it, else the most any prompt folder holds.
    info = folder / "sampling.json"
    expected = (json.loads(info.read_text())["images_per_prompt"] if info.exists()
                else max(max([int(p.stem) + 1 for p in images if p.stem.isdigit()] + [len(images)]) for images in listed.values()))
    entries = []
    for d, images in listed.items():
        meta_path = d / "metadata.jsonl"
        if not meta_path.exists():
            raise data.DataError(f"{meta_path}: missing")
        metadata = data.read_metadata(meta_path)[0]
        names = {p.name for p in images}
        missing = [f"{k:04d}.png" for k in range(max(expected, 1)) if f"{k:04d}.png" not in names]
        if missing:
            raise data.DataError(f"{d / 'samples' / missing[0]}: missing image (expected {expected} per prompt)")
        entries.append((int(d.name), metadata, images))
    return entries


def score_images(images, backend="shapes", th=Thresholds()):
    """One results row per (metadata, filename, (H, W, 3) uint8 image), as GenEval's results.jsonl."""
    detector, classify_colors = BACKENDS[backend]()
    rows = []
    for metadata, filename, image in images:
        detected = keep_detections(detector(image), metadata["tag"], th)
        correct, reason = judge(detected, metadata, lambda cls, dets: classify_colors(image, cls, dets), th)
        rows.append({"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"],
                     "correct": correct, "reason": reason, "metadata": json.dumps(metadata),
                     "details": json.dumps({c: [list(d.box) for d in ds] for c, ds in detected.items()})})
    return rows


def score_folder(folder, backend="shapes", th=Thresholds()):
    """Score every image; write results.jsonl (one row per image) and scores.json; return the scores."""
    images = ((metadata, str(path), np.asarray(Image.open(path).convert("RGB")))
              for _, metadata, paths in read_sample_folder(folder) for path in paths)
    rows = score_images(images, backend, th)
    with open(Path(folder) / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    scores = summarize(rows)
    with open(Path(folder) / "scores.json", "w") as f:
        json.dump({"backend": backend, "images": len(rows), **scores}, f, indent=1)
    return scores


# -----------------------------------------------------------------------------
# Curves: score every checkpoint of a run, against training-clock seconds

CURVE_FIELDS = ["train_seconds", "step", "images_seen", "single_object", "two_object", "counting", "colors",
                "position", "color_attr", "overall"]


def write_curve(run, points, metric="overall"):
    run = Path(run)
    with open(run / "curve.json", "w") as f:
        json.dump(points, f, indent=1)
    with open(run / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    plot_curves({run.name: points}, run / "curve.png", metric)


def plot_curves(runs, path, metric="overall", target=None):
    """One PNG of `metric` against training seconds, one line per run (several runs on one figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in runs.items():
        ax.plot([p["train_seconds"] for p in points], [p[metric] for p in points], marker="o", label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", label=f"target {target}")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(f"GenEval-Shapes {metric}" if metric in CURVE_FIELDS else metric)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve(args):
    import sample
    ckpts = sample.checkpoints_of(args.run)
    sampler = sample.sampler_from_args(args, ckpts[0])
    points = []
    for ckpt_path in ckpts:
        out = Path(args.run) / "samples" / ckpt_path.stem
        info = sampler.run(ckpt_path, out)
        if sample.distributed()[0] != 0:  # under torchrun, rank 0 scores what the ranks sampled
            continue
        scores = score_folder(out, args.backend)
        points.append({**info, **scores, "samples": str(out)})
        print(f"{ckpt_path.name}: {info['train_seconds']:.1f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        write_curve(args.run, points)
    if sample.distributed()[0] == 0:
        print(f"curve: {Path(args.run) / 'curve.png'}  table: {Path(args.run) / 'curve.csv'}")


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
MAX_CHECKPOINT_GAP = {"shapes": 5.0, "imagenet": 600.0}  # training seconds between checkpoints, at most
MIN_RUNS, MAX_P = 5, 0.01
LOG_SECTIONS = ("train_dit.py", "model.py", "data.py", "environment", "hyperparameters")


def log_sections(text):
    """{section name: body} of a train_dit.py log, split on its `==================== name` headers."""
    parts = text.split("==================== ")[1:]
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] if "\n" in p else "" for p in parts}


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


def record_statistics(curves, target):
    """Time-to-target per run, and the claim: the earliest checkpoint mark whose scores beat the target at p < MAX_P."""
    ttt = [time_to_target(points, target) for points in curves]
    reached = [t for t in ttt if t is not None]
    stats = {"target": target, "n": len(curves), "time_to_target": ttt,
             "time_to_target_mean": float(np.mean(reached)) if reached else None,
             "time_to_target_std": float(np.std(reached, ddof=1)) if len(reached) > 1 else None,
             "claimed_checkpoint": None, "claimed_seconds": None, "scores_at_claim": None, "p_value": None}
    for k in range(min(len(points) for points in curves)):
        scores = [points[k]["overall"] for points in curves]
        p = p_value_above(scores, target)
        if p < MAX_P:
            stats.update(claimed_checkpoint=k, scores_at_claim=scores, p_value=p,
                         claimed_seconds=float(np.mean([points[k]["train_seconds"] for points in curves])))
            break
    return stats


def pack_samples(folder, path):
    """All images of a GenEval-layout folder in one compact file: (prompts, images, H, W, 3) uint8 + prompts."""
    entries = read_sample_folder(folder)
    images = np.stack([np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]) for _, _, paths in entries])
    np.savez_compressed(path, images=images, prompts=np.array(json.dumps([m for _, m, _ in entries])))


def score_packed_samples(path, backend="shapes"):
    packed = np.load(path)
    prompts = json.loads(str(packed["prompts"]))
    return summarize(score_images(((m, f"{i:05d}/{j:04d}", image) for i, m in enumerate(prompts)
                                   for j, image in enumerate(packed["images"][i])), backend))


def build_record(runs, out, name, track="shapes", target=None):
    """Copy n runs' logs and curves into `out`, pack the claimed checkpoint's samples, write record.json."""
    target = TARGETS[track] if target is None else target
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = [json.loads((Path(r) / "curve.json").read_text()) for r in runs]
    stats = record_statistics(curves, target)
    if stats["claimed_checkpoint"] is None:
        raise data.DataError(f"{runs[0]}: no checkpoint mark beats target {target} at p < {MAX_P} over {len(runs)} runs")
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
    problems = []
    if target != TARGETS.get(track, target):
        problems.append(f"record.json: target {target} is not the {track} target {TARGETS[track]}")
    if len(runs) < MIN_RUNS:
        problems.append(f"record.json: {len(runs)} runs; a record needs at least {MIN_RUNS}")
    curves, code, hashes = [], set(), set()
    for run in runs:
        log_path, curve_path = folder / run / "log.txt", folder / run / "curve.json"
        try:
            sections = log_sections(log_path.read_text())
            points = json.loads(curve_path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{folder / run}: unreadable log or curve ({type(e).__name__}: {e})")
            continue
        for section in LOG_SECTIONS:
            if not sections.get(section, "").strip():
                problems.append(f"{log_path}: no '{section}' section (the log must embed the code and environment)")
        code.add(tuple(sections.get(f, "") for f in ("train_dit.py", "model.py", "data.py")))
        found = [w.split("=", 1)[1] for w in log_path.read_text().split() if w.startswith("data_order_hash=")]
        if not found:
            problems.append(f"{log_path}: no data_order_hash")
        hashes.update(found)
        for i, p in enumerate(points):
            if p.get("nfe") != 100:
                problems.append(f"{curve_path}: checkpoint {i} sampled with nfe {p.get('nfe')}, not 100")
        seconds = [0.0] + [p["train_seconds"] for p in points]
        gap = max(b - a for a, b in zip(seconds, seconds[1:])) if points else float("inf")
        if gap > MAX_CHECKPOINT_GAP.get(track, float("inf")) or any(b <= a for a, b in zip(seconds, seconds[1:])):
            problems.append(f"{curve_path}: checkpoints must be increasing and at most "
                            f"{MAX_CHECKPOINT_GAP.get(track)} s apart (largest gap {gap:.1f} s)")
        curves.append(points)
    if len(code) > 1:
        problems.append(f"{folder}: the runs' logs embed different code")
    if len(hashes) > 1:
        problems.append(f"{folder}: the runs' logs give different data order hashes {sorted(hashes)}")
    if problems or not curves:
        return problems
    stats = record_statistics(curves, target)
    for key in ("time_to_target", "time_to_target_mean", "time_to_target_std", "claimed_checkpoint",
                "claimed_seconds", "scores_at_claim", "p_value"):
        if not np.allclose(np.array(stats[key], dtype=float), np.array(record.get(key), dtype=float), atol=1e-6,
                           equal_nan=True):
            problems.append(f"record.json: {key} is {record.get(key)!r}, the curves give {stats[key]!r}")
    if stats["p_value"] is None or stats["p_value"] >= MAX_P:
        problems.append(f"{folder}: no checkpoint mark beats {target} at p < {MAX_P}")
        return problems
    k = stats["claimed_checkpoint"]
    for run, points in zip(runs, curves):
        if track == "shapes":
            try:
                rescored = score_packed_samples(folder / run / "samples.npz")["overall"]
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{folder / run / 'samples.npz'}: unreadable ({type(e).__name__}: {e})")
                continue
            if abs(rescored - points[k]["overall"]) > 1e-9:
                problems.append(f"{folder / run / 'samples.npz'}: rescored overall {rescored:.4f}, "
                                f"curve.json says {points[k]['overall']:.4f}")
        elif not (folder / run / "samples.sha256").exists():
            problems.append(f"{folder / run}: no samples.sha256")
    for name in ("README.md", "curve.png", "grid.png"):
        if not (folder / name).exists():
            problems.append(f"{folder / name}: missing")
    return problems


def main(argv=None):
    import sample
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a GenEval-layout sample folder")
    s.add_argument("folder")
    s.add_argument("--backend", choices=sorted(BACKENDS), default="shapes")
    c = sub.add_parser("curve", help="sample and score every checkpoint of a run")
    c.add_argument("run")
    c.add_argument("--backend", choices=sorted(BACKENDS), default="shapes")
    sample.add_sampling_args(c)
    r = sub.add_parser("record", help="pack n runs (each with curve.json) into a record folder")
    r.add_argument("runs", nargs="+")
    r.add_argument("--name", required=True)
    r.add_argument("--track", choices=sorted(MAX_CHECKPOINT_GAP), default="shapes")
    r.add_argument("--out", default=None, help="default: records/<track>/<date>_<name>")
    k = sub.add_parser("check-record", help="validate a record folder")
    k.add_argument("folder")
    t = sub.add_parser("truth", help="ground-truth renders of a Shapes data set's evaluation prompts")
    t.add_argument("data")
    t.add_argument("--out", required=True)
    t.add_argument("--per-tag", type=int, default=None)
    args = p.parse_args(argv)
    if args.command == "score":
        scores = score_folder(args.folder, args.backend)
        print("  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    elif args.command == "curve":
        curve(args)
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
    except data.DataError as e:
        sys.exit(f"error: {e}")

"""record.py: the records machinery: pack n runs into a record folder, check one, and the statistics.

    python record.py build runs/rec/seed* --name MyIdea          # -> records/<track>/<date>_MyIdea/
    python record.py check records/shapes/2026-11-24_ShapesSixBlocks200
    python record.py check records/shapes/<record> --samples runs/rec   # also the detector, on the exact images
    python record.py build runs/in/seed* --name MyIdea --track imagenet --target 0.5 --detector DIR ...
    python record.py compare runs/fp8-s* --against runs/bf16-s*     # a change against its baseline, within noise?

A record is the earliest checkpoint mark at which n >= 5 runs of one recipe beat the track's target
in a one-sided t-test at p < 0.01, with checkpoints close enough together for that claim (README.md,
"Records"). A record folder holds, per run, the log (the code, the environment, every step's loss and
clock), the curve, and per image of the claimed checkpoint its sha256 and the detector's raw output;
no images (a Shapes run's 480 noisy 64x64 images take 2.9 MB even losslessly compressed). `check`
recomputes everything from that evidence: the rules on the stored detections, the statistics, each
curve against its log, the README's generated numbers, and that no two runs are one; with --samples
it also hashes the exact images and runs the detector on them. Per run a small grid of its claimed samples
shows a reader what they look like; at 64 px it keeps an ImageNet record (2,212 images a run) in its 5 MB.
"""
import argparse
import datetime
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import data
import evaluate
import sample
from data import UserError

FORMAT = 3  # 1: the records of 2026-11-24 (samples.npz, logs without sample.py); 2: no grid per run

# -----------------------------------------------------------------------------
# The rules of a record

# The overall score a record must reach. None: the track has none until its first record, which sets it with
# `build --target` (and this table takes its value in that record's commit); every later record uses it.
TARGETS = {"shapes": 0.90, "imagenet": None}
# Checkpoint cadence (README): up to the claimed mark, checkpoints at most 5% of its time apart, never required
# closer than the floor, plus the lateness of a checkpoint that lands at the first clock check after its mark.
CHECKPOINT_GAP_FRACTION = 0.05
CHECKPOINT_GAP_FLOOR = {"shapes": 5.0, "imagenet": 600.0}  # training seconds
CHECKPOINT_LATENESS = {"shapes": 2.0, "imagenet": 60.0}  # training seconds
BACKENDS = {"shapes": "shapes", "imagenet": "mask2former"}  # the detector each track's records are scored with
METRIC_NAMES = {"shapes": "GenEval-Shapes", "imagenet": "GenEval (geneval-m2f)"}
RUN_KEYS = ("seed", "out", "resume", "wandb")  # hyperparameters that may differ between the runs of one recipe
SAMPLER_KEYS = ("nfe", "sampler", "cfg_scale", "cfg_interval", "time_shift", "weights", "seed", "images_per_prompt")
# Sampler choices that curves record since sample.py had them (older curves lack them): one value across the runs.
SAMPLER_CHOICES = (*SAMPLER_KEYS, "float8")
MIN_RUNS, MAX_P = 5, 0.01
GENEVAL_IMAGES_PER_PROMPT = 4
# The ImageNet evaluation set, GenEval's official 553 prompts (data.GENEVAL_PROMPTS_SHA256), as prompt_list_sha256
# of data.read_metadata of that file
GENEVAL_PROMPT_LIST_SHA256 = "010f2e9a62a68a9069150764f9736bb5063b869f799ba1a6239e35e561f75aa0"
MAX_RECORD_BYTES = 5 * 2 ** 20  # the repository holds every record, so each stays small: no images
GRID_IMAGES, GRID_PIXELS = 8, 64  # per run: the first image of 8 prompts spread over the list, at most 64 px wide
CODE_SECTIONS = ("train_dit.py", "model.py", "data.py", "sample.py")
LOG_SECTIONS = (*CODE_SECTIONS, "environment", "hyperparameters")

# The external-module tracks (README, "Tracks"): `<track>-external` allows frozen pretrained modules that are not
# generative models and keeps its benchmark's rules; the basic tracks allow none. A run uses one when its
# hyperparameters align to an encoder; the record names the encoder and its weights' sha256 (from the logs).
EXTERNAL = "-external"
for rules in (TARGETS, CHECKPOINT_GAP_FLOOR, CHECKPOINT_LATENESS, BACKENDS, METRIC_NAMES):
    rules.update({track + EXTERNAL: value for track, value in list(rules.items())})


def log_encoder(text):
    """{name, weights_sha256} of the pretrained encoder a run's log says it aligned to (None: none)."""
    found = re.search(r"^align: .*; encoder (\S+) weights_sha256=(\w*)", text, re.M)
    return {"name": found[1], "weights_sha256": found[2]} if found else None


def track_problems(track, where, text, hparams, encoder):
    """Why a run does not belong in `track` (empty when it does): a basic track refuses a run whose hyperparameters
    use an external module; in an external track every run names the record's `encoder`."""
    if not track.endswith(EXTERNAL):
        if hparams.get("align_weight", 0) > 0:
            return [f"{where}: its hyperparameters use a pretrained encoder (align_weight {hparams['align_weight']}), "
                    f"which the basic track {track!r} forbids; pack it as {track}{EXTERNAL}"]
        return []
    if log_encoder(text) != encoder:
        return [f"{where}: aligned to {log_encoder(text)}, record.json names the encoder {encoder}"]
    return []


def max_checkpoint_gap(track, claimed_seconds):
    """The largest gap between consecutive checkpoints a record may have (training seconds)."""
    return (max(CHECKPOINT_GAP_FLOOR[track], CHECKPOINT_GAP_FRACTION * claimed_seconds)
            + CHECKPOINT_LATENESS[track])


def target_problem(track, target):
    """Why `target` cannot be a record's target on `track` (None when it can): the track's own once it has one;
    before that, any overall score strictly between 0 and 1 (the first record sets it)."""
    official = TARGETS[track]
    if official is not None:
        return None if target == official else f"target {target} is not the {track} target {official}"
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        return f"target {target!r} is not an overall score in (0, 1) (the {track} track's first record sets its target)"
    return None


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


def welch(a, b):
    """(mean a - mean b, its standard error, Welch's two-sided p) of two samples; p is None where the error is 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return diff, 0.0, None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return diff, 0.0, None
    from scipy import stats
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    return diff, float(np.sqrt(va + vb)), float(2 * stats.t.sf(abs(diff) / np.sqrt(va + vb), df))


def compare_runs(runs, against, tail=0.1):
    """Markdown rows comparing two sets of runs (a change, and its baseline; each a recipe over seeds): per
    checkpoint mark the mean training seconds, each set's mean overall score +- its standard error, the difference
    and Welch's two-sided p; then the training loss, each run's mean over its logged steps in the last `tail` of
    the shortest run's steps, likewise. How a precision or recipe change is judged "within noise"."""
    sets = [[json.loads((Path(r) / "curve.json").read_text()) for r in group] for group in (runs, against)]
    losses = [[{k: float(v) for k, v in log_lines(read_log(r))["losses"].items()} for r in group]
              for group in (runs, against)]

    def mean_se(values, form):
        return f"{np.mean(values):{form}} +- {np.std(values, ddof=1) / np.sqrt(len(values)):{form}}" \
            if len(values) > 1 else f"{values[0]:{form}}"

    def row(name, seconds, a, b, form=".3f"):
        diff, se, p = welch(a, b)
        return (f"| {name} | {seconds} | {mean_se(a, form)} | {mean_se(b, form)} | {diff:+{form}} +- {se:{form}} | "
                f"{'-' if p is None else f'{p:.3g}'} |")
    rows = [f"| mark | seconds (runs / against) | runs (n = {len(runs)}) | against (n = {len(against)}) | "
            f"difference | p (Welch, two-sided) |", "| --- | --- | --- | --- | --- | --- |"]
    for k in range(min(len(points) for group in sets for points in group)):
        a, b = ([points[k]["overall"] for points in group] for group in sets)
        seconds = " / ".join(f"{np.mean([points[k]['train_seconds'] for points in group]):.1f}" for group in sets)
        rows.append(row(f"checkpoint {k + 1}: overall", seconds, a, b))
    last = min(max(steps) for group in losses for steps in group)
    start = last - max(1, int(tail * last)) + 1
    a, b = ([np.mean([v for step, v in steps.items() if start <= step <= last]) for steps in group] for group in losses)
    rows.append(row(f"training loss, steps {start}-{last}", "", a, b, ".4g"))
    return rows


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


def shapes_eval_set_problem(prompts, images_per_prompt, log):
    """Why `prompts` are not a fair Shapes evaluation set (None when they are): every tag, each with its
    first m prompts of the evaluation list of the dataset's seed, m the same for all tags, 4 images each. A
    subset that drops a hard tag, or picks its prompts, would raise the overall score."""
    seeds = set(re.findall(r"\(dataset seed (\d+)\)", log))
    if len(seeds) != 1:
        return f"the log gives dataset seeds {sorted(seeds)}, not one"
    seed = int(seeds.pop())
    counts = {tag: sum(p["tag"] == tag for p in prompts) for tag in data.TAGS}
    if 0 in counts.values() or len(set(counts.values())) > 1 or len(prompts) != sum(counts.values()):
        return f"prompts per tag {counts}: a record scores the same number of prompts of every tag"
    official = sample.select_prompts(data.shapes_eval_prompts(seed), counts[data.TAGS[0]])
    if json.loads(json.dumps(prompts)) != json.loads(json.dumps(official)):
        return (f"the prompts are not the first {counts[data.TAGS[0]]} of each tag of the evaluation list "
                f"(dataset seed {seed})")
    if images_per_prompt != GENEVAL_IMAGES_PER_PROMPT:
        return f"{images_per_prompt} images per prompt, not GenEval's {GENEVAL_IMAGES_PER_PROMPT}"
    return None


def prompt_list_sha256(prompts):
    """sha256 of a prompt list's canonical JSON (keys sorted, no spaces): the list, its order and every field."""
    return hashlib.sha256(json.dumps(prompts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def imagenet_eval_set_problem(prompts, images_per_prompt, log):
    """Why `prompts` are not GenEval's evaluation set (None when they are): all 553 prompts of the official
    evaluation_metadata.jsonl (data.GENEVAL_PROMPTS_URL) in their order, 4 images each. The list is checked by
    its hash, so that check needs no download."""
    if prompt_list_sha256(prompts) != GENEVAL_PROMPT_LIST_SHA256 or images_per_prompt != GENEVAL_IMAGES_PER_PROMPT:
        return (f"scored on {len(prompts)} prompts x {images_per_prompt} images, not GenEval's 553 official prompts "
                f"x {GENEVAL_IMAGES_PER_PROMPT} (evaluation_metadata.jsonl, all of it, in its order)")
    return None


EVAL_SET_PROBLEMS = {"shapes": shapes_eval_set_problem, "imagenet": imagenet_eval_set_problem}  # per track
EVAL_SET_PROBLEMS.update({track + EXTERNAL: rule for track, rule in list(EVAL_SET_PROBLEMS.items())})


# -----------------------------------------------------------------------------
# A run's log: the sections train_dit.py writes, and its clock, checkpoint and loss lines


def read_log(run_dir):
    """A run's log text: log.txt.gz in a record, log.txt in a run folder."""
    run_dir = Path(run_dir)
    packed = run_dir / "log.txt.gz"
    return gzip.decompress(packed.read_bytes()).decode() if packed.exists() else (run_dir / "log.txt").read_text()


def log_sections(text):
    """{section name: body} of a train_dit.py log, split on its `==================== name` header lines
    (whole lines only: the embedded train_dit.py holds the header's format string too)."""
    parts = re.split(r"^==================== (.*)\n", text, flags=re.M)[1:]
    return {name.strip(): body for name, body in zip(parts[::2], parts[1::2])}


def log_hyperparameters(sections):
    """The run's Hyperparameters as a dict: the JSON that opens the hyperparameters section of log_sections()."""
    return json.JSONDecoder().raw_decode(sections.get("hyperparameters", "").strip())[0]


def log_lines(text):
    """What a run's log says after its header sections: {step: training seconds} of its clock lines, {step:
    training seconds} of its checkpoint lines, {step: loss} of its loss lines, its parameter count and GPU."""
    clock = {int(s): float(t) for s, t in re.findall(r"^step (\d+) \| train (\S+) s \|", text, re.M)}
    checkpoints = {int(s): float(t) for t, s in re.findall(r"^checkpoint \S+ at (\S+) s, step (\d+)$", text, re.M)}
    losses = {int(s): v for s, v in re.findall(r"^step (\d+) loss (\S+)$", text, re.M)}
    params = re.findall(r"^params: ([\d,]+)", text, re.M)
    gpu = re.findall(r"^gpu: (.*?)  cuda", text, re.M)
    return {"clock": clock, "checkpoints": checkpoints, "losses": losses,
            "params": int(params[0].replace(",", "")) if params else None, "hardware": gpu[0] if gpu else "cpu"}


def decimals(text_number):
    """The precision a logged number was printed with: half its last digit's unit."""
    return 0.5 * 10 ** -len(text_number.split(".")[1]) if "." in text_number else 0.5


# -----------------------------------------------------------------------------
# The samples of a claimed checkpoint: per image its hash and the detector's raw output


def image_sha256(image):
    """sha256 of an image's pixels (height, width, RGB bytes): independent of how the PNG was compressed."""
    image = np.ascontiguousarray(image, np.uint8)
    return hashlib.sha256(f"{image.shape}".encode() + image.tobytes()).hexdigest()


def sample_source(path):
    """(prompts, {(prompt index, image index): image}) of a GenEval-layout folder or a format-1 samples.npz."""
    path = Path(path)
    if path.suffix == ".npz":
        packed = np.load(path)
        images = packed["images"]  # read once: every packed[...] lookup decompresses the whole array again
        return json.loads(str(packed["prompts"])), {(i, j): images[i, j] for i in range(len(images))
                                                     for j in range(images.shape[1])}
    entries = evaluate.read_sample_folder(path)
    return [m for _, m, _ in entries], {(i, j): evaluate.read_image(p) for i, (_, _, paths) in enumerate(entries)
                                        for j, p in enumerate(paths)}


def pack_samples(source, path, backend, options=None):
    """samples.jsonl.gz: a header line with the prompts, then one line per image with its sha256 and the detector's
    raw output (evaluate.stored_detections); returns the scores those give."""
    prompts, images = sample_source(source)
    keys = sorted(images)
    rows = evaluate.score_images(((prompts[i], f"{i:05d}/{j:04d}", images[i, j]) for i, j in keys), backend,
                                 options=options)
    lines = [json.dumps({"prompts": prompts, "backend": backend, "images": len(keys)})]
    lines += [json.dumps({"prompt": i, "image": j, "sha256": image_sha256(images[i, j]), "detections": row["detections"]})
              for (i, j), row in zip(keys, rows)]
    data.atomic_write(path, lambda f: f.write(gzip.compress(("\n".join(lines) + "\n").encode(), 9, mtime=0)))
    return evaluate.summarize(rows)


def read_packed(path):
    """(header, rows) of a samples.jsonl.gz."""
    lines = gzip.decompress(Path(path).read_bytes()).decode().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def rescore_packed(header, rows):
    """The scores GenEval's rules give on the stored detections (no detector runs)."""
    prompts = header["prompts"]
    verdicts = [{"tag": prompts[r["prompt"]]["tag"], "correct": evaluate.judge_stored(r["detections"], prompts[r["prompt"]])}
                for r in rows]
    return evaluate.summarize(verdicts)


def samples_problems(packed, source, backend, options=None):
    """Where the exact images at `source` differ from a record's packed samples: hashes, then, when every hash
    matches, the detector (on other images its verdict says nothing more, and on ImageNet it costs minutes)."""
    header, rows = read_packed(packed)
    try:
        prompts, images = sample_source(source)
    except (UserError, OSError, ValueError, KeyError) as e:
        return [f"{source}: unreadable samples ({e})"]
    if prompts != header["prompts"] or sorted(images) != [(r["prompt"], r["image"]) for r in rows]:
        return [f"{source}: other prompts or images than {packed}"]
    problems = [f"{source}: image {r['prompt']:05d}/{r['image']:04d} has another sha256 than {packed} records"
                for r in rows if image_sha256(images[r["prompt"], r["image"]]) != r["sha256"]]
    if problems:
        return problems
    detected = evaluate.score_images(((prompts[r["prompt"]], "", images[r["prompt"], r["image"]]) for r in rows),
                                     backend, options=options)
    return [f"{source}: image {r['prompt']:05d}/{r['image']:04d}: the detector gives {d['detections']}, {packed} "
            f"records {r['detections']}" for r, d in zip(rows, detected) if d["detections"] != r["detections"]]


# -----------------------------------------------------------------------------
# The README's numbers: generated from record.json, checked against it


GENERATED = ("<!-- record.py: generated from record.json; do not edit by hand -->", "<!-- end of generated -->")


def generated_summary(record, runs):
    """The README's numbers: the claim, the test, the parameters, the hardware and a table of the runs."""
    lines = [GENERATED[0],
             f"**{record['claimed_seconds']:.1f} s** of training clock to {METRIC_NAMES[record['track']]} overall >= {record['target']} "
             f"on {record['hardware']} (checkpoint mark {record['claimed_checkpoint']} of every run; one-sided t-test "
             f"over {record['n']} runs, **p = {record['p_value']:.2g}**).", "",
             f"- first checkpoint at the target per run: mean {record['time_to_target_mean']:.1f} s "
             f"+- {record['time_to_target_std'] or 0:.1f} s",
             f"- parameters: {record['params']:,}", f"- hardware: {record['hardware']}",
             "- evaluation samples: per run, each image's sha256 and detections in run*/samples.jsonl.gz", "",
             "| run | seed | steps | img/s (images / clock) | first checkpoint at target | score at the claim |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, run, first, score in zip(record["runs"], runs, record["time_to_target"], record["scores_at_claim"]):
        last = run["curve"][-1]
        lines.append(f"| {name} | {run['hparams']['seed']} | {last['step']:,} | "
                     f"{last['images_seen'] / last['train_seconds']:,.0f} | "
                     f"{'never' if first is None else f'{first:.1f} s'} | {score:.3f} |")
    return "\n".join(lines + [GENERATED[1]])


def readme_problem(readme, expected):
    """Why a record's README does not hold the generated summary (None when it does)."""
    if GENERATED[0] not in readme or GENERATED[1] not in readme:
        return "README.md: no generated summary (record.py build writes it between its two marker lines)"
    start = readme.index(GENERATED[0])
    found = readme[start:readme.index(GENERATED[1], start) + len(GENERATED[1])]
    if found != expected:
        return "README.md: the generated summary differs from record.json (regenerate it; do not edit it by hand)"
    return None


# -----------------------------------------------------------------------------
# Build a record


def thumbnail(image):
    """An image scaled down (box filter) to GRID_PIXELS wide; a smaller one as it is."""
    height, width = image.shape[:2]
    if width <= GRID_PIXELS:
        return image
    size = (GRID_PIXELS, max(1, round(height * GRID_PIXELS / width)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BOX))


def save_sample_grid(samples, path, count):
    """A grid (8 a row) of the first image of `count` prompts of a sample folder, spread over its prompt list
    (which runs tag by tag), as thumbnails: what a reader sees of a run's samples."""
    entries = evaluate.read_sample_folder(samples)
    picked = entries[::max(1, len(entries) // count)][:count]
    sample.save_grid([thumbnail(evaluate.read_image(paths[0])) for _, _, paths in picked], path, columns=8)


def build_record(runs, out, name, track="shapes", target=None, options=None):
    """Copy n runs' logs and curves into `out`, pack the claimed checkpoint's samples (the detector runs with
    `options`: its weights), draw a grid of them per run, write record.json and a README whose numbers are
    generated. `target`: the track's (TARGETS); a track without one yet needs it given."""
    if target is None and TARGETS[track] is None:
        raise UserError(f"--target: the {track} track has no target yet (record.py TARGETS); its first record sets "
                        f"it: pass --target SCORE")
    target = TARGETS[track] if target is None else target
    problem = target_problem(track, target)
    if problem:
        raise UserError(f"--target: {problem}")
    out = Path(out)
    logs = [read_log(r) for r in runs]
    encoder = log_encoder(logs[0])
    for run, text in zip(runs, logs):
        for problem in track_problems(track, run, text, log_hyperparameters(log_sections(text)), encoder):
            raise UserError(problem)
    curves = [json.loads((Path(r) / "curve.json").read_text()) for r in runs]
    stats = record_statistics(curves, target, track)
    if stats["claimed_checkpoint"] is None:
        raise UserError(f"{runs[0]}: no checkpoint mark beats target {target} at p < {MAX_P} over {len(runs)} runs "
                        f"with checkpoints at most {CHECKPOINT_GAP_FRACTION:.0%} of its time apart")
    k = stats["claimed_checkpoint"]
    names = [f"run{i + 1}" for i in range(len(runs))]
    out.mkdir(parents=True, exist_ok=True)
    for run, run_name, log_text, points in zip(runs, names, logs, curves):
        (out / run_name).mkdir(exist_ok=True)
        data.atomic_write(out / run_name / "log.txt.gz", lambda f: f.write(gzip.compress(log_text.encode(), 9, mtime=0)))
        (out / run_name / "curve.json").write_text(json.dumps(points, indent=1))
        samples = Path(run) / "samples" / Path(points[k]["checkpoint"]).stem
        pack_samples(samples, out / run_name / "samples.jsonl.gz", BACKENDS[track], options)
        save_sample_grid(samples, out / run_name / "grid.png", GRID_IMAGES)
        if run_name == "run1":
            save_sample_grid(samples, out / "grid.png", 48)
    evaluate.plot_curves(dict(zip(names, curves)), out / "curve.png", target=target, title=f"{name}: {track} track")
    evidence = [{"curve": c, "hparams": log_hyperparameters(log_sections(t))} for c, t in zip(curves, logs)]
    record = {"format": FORMAT, "track": track, "name": name, "runs": names, "params": curves[0][0]["params"],
              "hardware": log_lines(logs[0])["hardware"], **stats,
              **({"encoder": encoder} if track.endswith(EXTERNAL) else {})}
    (out / "record.json").write_text(json.dumps(record, indent=1))
    summary = generated_summary(record, evidence)
    readme = out / "README.md"
    if readme.exists() and readme_problem(readme.read_text(), summary) is not None and GENERATED[0] in readme.read_text():
        text = readme.read_text()
        start = text.index(GENERATED[0])
        readme.write_text(text[:start] + summary + text[text.index(GENERATED[1], start) + len(GENERATED[1]):])
    elif not readme.exists():
        whose_target = "the track's" if TARGETS[track] is not None else "set by this record (the track had none)"
        readme.write_text(
            f"# {name}\n\n{summary}\n\nTarget: {target}, {whose_target}.\n\nWhat changed and why: (describe)\n\n"
            f"Reproduce (one command per seed, the code the logs embed): (the commands)\n\n"
            f"Runs of this attempt not in this record, with their scores (README.md, Records: every run\n"
            f"started for an attempt is part of it): (none, or list them)\n\n"
            f"The exact images (each run's claimed sample folder): (where they are archived, e.g. a release asset)\n"
            f"verified by\n\n    python record.py check {out} --samples FOLDER\n\n"
            f"(plus --detector and --clip-model/--clip-pretrained, as evaluate.py takes them, where the track's\n"
            f"detector needs weights)\n\n"
            f"![curve](curve.png)\n\n![run1's samples](grid.png)\n")
    return record


# -----------------------------------------------------------------------------
# Check a record


def read_run(folder, run):
    """A record run's evidence: log text, its parsed sections and lines, hyperparameters, curve, packed samples."""
    text = read_log(folder / run)
    sections = log_sections(text)
    return {"log": text, "sections": sections, "lines": log_lines(text), "curve": json.loads((folder / run / "curve.json").read_text()),
            "hparams": log_hyperparameters(sections)}


def check_record(folder, samples=None, options=None):
    """Every reason the record at `folder` is malformed or inconsistent (empty: it holds). With `samples` (a
    folder holding runK/ sample folders or runK/samples.npz), the exact images are checked too, by the track's
    detector with `options` (its weights)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / "record.json").read_text())
        track, names, target = record["track"], record["runs"], record["target"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder / 'record.json'}: unreadable or incomplete ({type(e).__name__}: {e})"]
    if track not in CHECKPOINT_GAP_FLOOR:
        return [f"{folder / 'record.json'}: unknown track {track!r} (one of {sorted(CHECKPOINT_GAP_FLOOR)})"]
    problems = []
    if problem := target_problem(track, target):
        problems.append(f"record.json: {problem}")
    if len(names) < MIN_RUNS:
        problems.append(f"record.json: {len(names)} runs; a record needs at least {MIN_RUNS}")
    runs = []
    for name in names:
        try:
            run = read_run(folder, name)
            run["hparams"]["seed"]
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            problems.append(f"{folder / name}: unreadable log, hyperparameters or curve ({type(e).__name__}: {e})")
            continue
        run["name"] = name
        problems += run_problems(folder, run, record)
        problems += track_problems(track, folder / name, run["log"], run["hparams"], record.get("encoder"))
        runs.append(run)
    if len(runs) < len(names):
        return problems
    problems += recipe_problems(folder, runs, record)
    if problems:
        return problems
    curves = [run["curve"] for run in runs]
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
                problems.extend(f"{folder / names[i] / 'curve.json'}: checkpoints up to mark {k} at most {allowed:.1f} s "
                                f"apart for a {seconds:.1f} s claim (largest gap {gap:.1f} s)" for i, gap in gaps.items())
                break
        return problems
    problems += sample_problems(folder, runs, record, stats["claimed_checkpoint"], samples, options)
    grids = [f"{name}/grid.png" for name in names] if record.get("format", 1) >= 3 else []
    for name in ("README.md", "curve.png", "grid.png", *grids):
        if not (folder / name).exists():
            problems.append(f"{folder / name}: missing")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > MAX_RECORD_BYTES:
        problems.append(f"{folder}: {size / 2 ** 20:.1f} MB; a record stays under {MAX_RECORD_BYTES / 2 ** 20:.0f} MB "
                        f"(its images are archived outside the repository)")
    if (folder / "README.md").exists():
        problem = readme_problem((folder / "README.md").read_text(), generated_summary(record, runs))
        if problem:
            problems.append(f"{folder}/{problem}")
    return problems


def run_problems(folder, run, record):
    """One run's evidence against itself: the log's sections, its clock and checkpoint lines against the curve,
    the sampler's settings and NFE, the parameter count and hardware against record.json."""
    problems = []
    where, curve_path = folder / run["name"] / "log", folder / run["name"] / "curve.json"
    expected = LOG_SECTIONS if record.get("format", 1) >= 2 else tuple(s for s in LOG_SECTIONS if s != "sample.py")
    for section in expected:
        if not run["sections"].get(section, "").strip():
            problems.append(f"{where}: no '{section}' section (the log must embed the code and environment)")
    if not re.search(r"data_order_hash=\w+", run["log"]):
        problems.append(f"{where}: no data_order_hash")
    lines, points = run["lines"], run["curve"]
    seconds = [0.0] + [p["train_seconds"] for p in points]
    if not points or any(b <= a for a, b in zip(seconds, seconds[1:])):
        problems.append(f"{curve_path}: no checkpoints, or their training seconds do not increase")
    for i, p in enumerate(points):
        if p.get("nfe") != 100:
            problems.append(f"{curve_path}: checkpoint {i} sampled with nfe {p.get('nfe')}, not 100")
        missing = [key for key in SAMPLER_KEYS if key not in p]
        if missing:
            problems.append(f"{curve_path}: checkpoint {i} does not record its sampler settings {missing}")
        # The curve's clock against the log: the checkpoint line of that step, and the clock line it was read at.
        step, logged = p.get("step"), lines["checkpoints"].get(p.get("step"))
        if logged is None or abs(logged - p["train_seconds"]) > 0.05 + 1e-9:
            problems.append(f"{curve_path}: checkpoint {i} (step {step}) at {p['train_seconds']:.1f} s; the log's "
                            f"checkpoint line says {'nothing' if logged is None else f'{logged:.1f} s'}")
        clock = re.search(rf"^step {step} \| train (\S+) s \|", run["log"], re.M)
        if clock is None or abs(float(clock[1]) - p["train_seconds"]) > decimals(clock[1]) + 1e-6:
            problems.append(f"{curve_path}: checkpoint {i} (step {step}) at {p['train_seconds']:.3f} s; the log's clock "
                            f"line of that step says {clock[1] + ' s' if clock else 'nothing'}")
        if p.get("params") != lines["params"] or p.get("images_seen") != step * run["hparams"].get("batch_size", 0):
            problems.append(f"{curve_path}: checkpoint {i}: params {p.get('params')} and images {p.get('images_seen')}; "
                            f"the log gives {lines['params']} parameters and batch {run['hparams'].get('batch_size')}")
    clock = [lines["clock"][s] for s in sorted(lines["clock"])]
    if any(b <= a for a, b in zip(clock, clock[1:])):
        problems.append(f"{where}: its clock lines do not increase")
    # Each clock line's img/s is the interval's images over its seconds: an edited clock shows in it.
    logged = re.findall(r"^step (\d+) \| train (\S+) s \| loss \S+ \| (\d+) img/s", run["log"], re.M)
    for (s0, t0, _), (s1, t1, rate) in zip(logged, logged[1:]):
        seconds, slack = float(t1) - float(t0), decimals(t0) + decimals(t1)
        images = (int(s1) - int(s0)) * run["hparams"].get("batch_size", 0)
        if seconds > 4 * slack and not images / (seconds + slack) - 1 <= int(rate) <= images / (seconds - slack) + 1:
            problems.append(f"{where}: step {s1} logs {rate} img/s, its clock gives {images / seconds:.0f}")
            break
    if lines["params"] != record.get("params"):
        problems.append(f"record.json: params {record.get('params')}, {where} says {lines['params']}")
    if lines["hardware"] != record.get("hardware"):
        problems.append(f"record.json: hardware {record.get('hardware')!r}, {where} says {lines['hardware']!r}")
    return problems


def recipe_problems(folder, runs, record):
    """The runs together: one code, one recipe but the seed, one data order, one sampler, and no two runs the same."""
    problems = []
    for what, values in (("code", [tuple(r["sections"].get(s, "") for s in CODE_SECTIONS) for r in runs]),
                         ("data order hashes", [tuple(re.findall(r"data_order_hash=(\w+)", r["log"])) for r in runs]),
                         ("dataset seeds", [tuple(re.findall(r"\(dataset seed (\d+)\)", r["log"])) for r in runs])):
        if len(set(values)) > 1:
            problems.append(f"{folder}: the runs' logs give different {what}")
    seeds = [r["hparams"]["seed"] for r in runs]
    if len(set(map(str, seeds))) < len(seeds):
        problems.append(f"{folder}: the runs share a training seed {seeds}; a record's runs use different seeds")
    recipes = [{k: v for k, v in r["hparams"].items() if k not in RUN_KEYS} for r in runs]
    differing = sorted(k for k in set().union(*recipes) if len({json.dumps(r.get(k)) for r in recipes}) > 1)
    if differing:
        problems.append(f"{folder}: the runs' hyperparameters differ in {differing}; a record is one recipe")
    samplers = {json.dumps({key: p.get(key) for key in SAMPLER_CHOICES}, sort_keys=True) for r in runs for p in r["curve"]}
    if len(samplers) > 1:  # settings chosen per run or per checkpoint would select on the metric
        problems.append(f"{folder}: checkpoints sampled with different settings: {' | '.join(sorted(samplers))}")
    if record.get("format", 1) >= 2:  # the sampler that made the curves is the one the logs embed
        code = {hashlib.sha256(r["sections"].get("sample.py", "").rstrip("\n").encode() + b"\n").hexdigest() for r in runs}
        used = {p.get("sample_py_sha256") for r in runs for p in r["curve"]}
        if len(used) > 1 or used != code:
            problems.append(f"{folder}: the curves were sampled by sample.py {sorted(map(str, used))}, the logs embed "
                            f"{sorted(code)}; one sampler code across all runs")
    for i, a in enumerate(runs):  # a run copied under another seed is one run counted twice
        for b in runs[i + 1:]:
            same = [what for what, key in (("loss trace", "losses"), ("clock", "clock")) if a["lines"][key] == b["lines"][key]]
            if [(p["train_seconds"], p["overall"]) for p in a["curve"]] == [(p["train_seconds"], p["overall"]) for p in b["curve"]]:
                same.append("curve")
            if same:
                problems.append(f"{folder}: {a['name']} and {b['name']} have the same {' and '.join(same)}: one run counted twice")
    return problems


def sample_problems(folder, runs, record, k, samples, options=None):
    """The claimed checkpoint's samples: the rules on the stored detections give each run's curve score, the
    evaluation set is the track's, no two runs share their images; with `samples`, the exact images match."""
    problems, eval_sets, hashes = [], set(), []
    for run in runs:
        packed = folder / run["name"] / "samples.jsonl.gz"
        try:
            header, rows = read_packed(packed)
            rescored = rescore_packed(header, rows)
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError) as e:
            problems.append(f"{packed}: unreadable ({type(e).__name__}: {e})")
            continue
        images_per_prompt = run["curve"][k]["images_per_prompt"]
        expected = [(i, j) for i in range(len(header["prompts"])) for j in range(images_per_prompt)]
        if [(r["prompt"], r["image"]) for r in rows] != expected:
            problems.append(f"{packed}: holds {len(rows)} images, not {images_per_prompt} for each of the "
                            f"{len(header['prompts'])} prompts")
        for task, score in rescored.items():
            if abs(score - run["curve"][k].get(task, -1)) > 1e-9:
                problems.append(f"{packed}: the rules on its detections give {task} {score:.4f}, curve.json says "
                                f"{run['curve'][k].get(task)}")
        eval_sets.add(json.dumps(header["prompts"]))
        problem = EVAL_SET_PROBLEMS[record["track"]](header["prompts"], images_per_prompt, run["log"])
        if problem:
            problems.append(f"{packed}: {problem}")
        hashes.append({r["sha256"] for r in rows})
        if samples is not None:
            source = next((p for p in (Path(samples) / run["name"], Path(samples) / run["name"] / "samples.npz")
                           if p.is_file() or (p / "00000").is_dir()), Path(samples) / run["name"])
            problems += samples_problems(packed, source, BACKENDS[record["track"]], options)
    if len(eval_sets) > 1:
        problems.append(f"{folder}: the runs were scored on different prompts")
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if hashes[i] and len(hashes[i] & hashes[j]) > len(hashes[i]) // 2:
                problems.append(f"{folder}: {runs[i]['name']} and {runs[j]['name']} share {len(hashes[i] & hashes[j])} "
                                f"of their images: one run counted twice")
    return problems


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack n runs (each with log.txt, curve.json and samples/) into a record folder")
    b.add_argument("runs", nargs="+")
    b.add_argument("--name", required=True)
    b.add_argument("--track", choices=sorted(CHECKPOINT_GAP_FLOOR), default="shapes")
    b.add_argument("--out", default=None, help="default: records/<track>/<date>_<name>")
    b.add_argument("--target", type=float, default=None, help="the overall score to reach: the track's (record.py "
                   "TARGETS); a track without one yet takes it from its first record, which must give it")
    evaluate.add_detector_args(b)
    c = sub.add_parser("check", help="validate a record folder")
    c.add_argument("folder")
    c.add_argument("--samples", default=None, help="a folder of the runs' exact claimed images: runK/ in GenEval's "
                   "layout (or runK/samples.npz); their hashes and detections are checked too")
    evaluate.add_detector_args(c)
    m = sub.add_parser("compare", help="two sets of runs (a change and its baseline), checkpoint by checkpoint: "
                       "mean overall +- s.e., the difference and Welch's p; and the training loss")
    m.add_argument("runs", nargs="+", help="run folders of the change (each with log.txt and curve.json)")
    m.add_argument("--against", nargs="+", required=True, help="run folders of the baseline")
    args = p.parse_args(argv)
    if args.command == "compare":
        print("\n".join(compare_runs(args.runs, args.against)))
        return
    if args.command == "build":
        out = args.out or f"records/{args.track}/{datetime.date.today():%Y-%m-%d}_{args.name}"
        record = build_record(args.runs, out, args.name, args.track, args.target, evaluate.options_from_args(args))
        print(f"record: {out}  {record['claimed_seconds']:.1f} s to {record['target']} "
              f"(p = {record['p_value']:.2g}, n = {record['n']})")
    else:
        problems = check_record(args.folder, args.samples, evaluate.options_from_args(args))
        if problems:
            sys.exit(f"error: {args.folder}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
        print(f"record OK: {args.folder}" + ("" if args.samples else " (the detector on the exact images: pass --samples)"))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")

"""Records: packing n runs into a record folder, and the validator that recomputes and rejects.

The runs are assembled from real parts: the tiny training run's log (code, environment, data order
hash), and sample folders of ground-truth renders with a few images replaced by noise, scored by
the real detector into each run's curve.json.
"""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import evaluate
from conftest import REPO, run_cli

PROMPT_DIRS = [f"{i:05d}" for t in range(6) for i in range(t * 20, t * 20 + 2)]  # 2 prompts of each tag
NOISE_AT_CLAIM = [0, 1, 0, 1, 2]  # noise images per run at the last checkpoint: scores 1 - k/48
SAMPLER = {"nfe": 100, "sampler": "euler", "cfg_scale": 6.0, "cfg_interval": [0.3, 1.0], "time_shift": 1.0,
           "weights": "ema", "seed": 0, "images_per_prompt": 4}  # as sample.py records them


def make_samples(truth, out, noisy, seed):
    """A GenEval-layout folder of 12 truth prompts, the first `noisy` images (in order) replaced by noise."""
    rng = np.random.default_rng(seed)
    for new, old in enumerate(PROMPT_DIRS):
        shutil.copytree(truth / old, out / f"{new:05d}")
    images = sorted(out.glob("*/samples/*.png"))
    for path in images[:: max(1, len(images) // max(noisy, 1))][:noisy]:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def edit_hyperparameters(text, old, new):
    """A log's text with the first `old` of its hyperparameters section replaced (the header line, not
    train_dit.py's format string)."""
    at = text.index("\n==================== hyperparameters\n")
    assert old in text[at:]
    return text[:at] + text[at:].replace(old, new, 1)


@pytest.fixture(scope="module")
def five_runs(trained_run, truth_renders, tmp_path_factory):
    root = tmp_path_factory.mktemp("record_runs")
    params = int(next(line.split()[1].replace(",", "") for line in (trained_run / "log.txt").read_text().splitlines()
                      if line.startswith("params:")))
    runs = []
    for r, noisy_at_claim in enumerate(NOISE_AT_CLAIM):
        run = root / f"r{r}"
        run.mkdir()
        # one real log, given each run its own training seed
        log = (trained_run / "log.txt").read_text()
        (run / "log.txt").write_text(edit_hyperparameters(log, '"seed": 0,', f'"seed": {r},'))
        points = []
        for k, noisy in enumerate([48, 24, noisy_at_claim]):
            ckpt = f"ckpt_{k:07d}"
            make_samples(truth_renders, run / "samples" / ckpt, noisy, seed=10 * r + k)
            scores = evaluate.score_folder(run / "samples" / ckpt)
            points.append({"checkpoint": f"{run}/checkpoints/{ckpt}.pt", **SAMPLER, "params": params,
                           "train_seconds": 4.0 * (k + 1) + 0.01 * r, "step": 10 * (k + 1),
                           "images_seen": 80 * (k + 1), **scores})
        (run / "curve.json").write_text(json.dumps(points))
        runs.append(run)
    return runs


@pytest.fixture(scope="module")
def record(five_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "2026-11-23_Test"
    evaluate.build_record([str(r) for r in five_runs], out, "Test")
    return out


def test_record_holds_runs_samples_and_recomputable_statistics(record):
    rec = json.loads((record / "record.json").read_text())
    assert rec["n"] == 5 and rec["claimed_checkpoint"] == 2
    assert rec["scores_at_claim"] == pytest.approx([1 - k / 48 for k in NOISE_AT_CLAIM])
    assert rec["claimed_seconds"] == pytest.approx(12.02)
    assert rec["p_value"] < 0.01
    for run in rec["runs"]:
        packed = np.load(record / run / "samples.npz")
        assert packed["images"].shape == (12, 4, 64, 64, 3)
    for name in ("README.md", "curve.png", "grid.png"):
        assert (record / name).exists()
    readme = (record / "README.md").read_text()  # one row per run: seed from its log, steps and img/s at the end
    assert "| run1 | 0 | 30 | 20 | 12.0 s | 1.000 |" in readme
    assert "| run2 | 1 | 30 | 20 | 12.0 s | 0.979 |" in readme
    assert "| run5 | 4 | 30 | 20 | 12.0 s | 0.958 |" in readme
    assert evaluate.check_record(record) == []
    result = run_cli("evaluate.py", "check-record", record)
    assert result.returncode == 0 and "record OK" in result.stdout


def corrupt_copy(record, tmp_path, edit):
    copy = shutil.copytree(record, tmp_path / "bad")
    edit(copy)
    return copy


def drop_model_code(rec):
    log = rec / "run2" / "log.txt"
    text = log.read_text()
    start = text.index("==================== model.py")
    log.write_text(text[:start] + text[text.index("==================== data.py"):])


def edit_curve(rec, run, change):
    """Rewrite one run's curve.json through change(points)."""
    path = rec / run / "curve.json"
    points = json.loads(path.read_text())
    change(points)
    path.write_text(json.dumps(points))


def edit_time(rec):
    edit_curve(rec, "run3", lambda points: points[2].update(train_seconds=points[2]["train_seconds"] - 3.0))


def set_nfe(rec):
    edit_curve(rec, "run1", lambda points: points[1].update(nfe=50))


def noise_samples(rec):
    path = rec / "run4" / "samples.npz"
    packed = dict(np.load(path))
    packed["images"][:6] = np.random.default_rng(0).integers(0, 256, packed["images"][:6].shape, dtype=np.uint8)
    np.savez_compressed(path, **packed)


def sparse_checkpoints(rec):
    def spread(points):  # checkpoints 12 s apart
        for p in points:
            p["train_seconds"] *= 3
    edit_curve(rec, "run2", spread)


def guidance_tuned_for_one_run(rec):
    edit_curve(rec, "run4", lambda points: points[2].update(cfg_scale=8.0))


def duplicate_a_run(rec):
    shutil.copy(rec / "run1" / "log.txt", rec / "run2" / "log.txt")


def change_one_runs_budget(rec):
    log = rec / "run3" / "log.txt"
    log.write_text(edit_hyperparameters(log.read_text(), '"budget_seconds": ', '"budget_seconds": 1'))


def drop_a_hard_tag(rec):
    path = rec / "run5" / "samples.npz"
    packed = dict(np.load(path))
    prompts = json.loads(str(packed["prompts"]))
    keep = [i for i, p in enumerate(prompts) if p["tag"] != "color_attr"]
    packed["images"] = packed["images"][keep]
    packed["prompts"] = np.array(json.dumps([prompts[i] for i in keep]))
    np.savez_compressed(path, **packed)


@pytest.mark.parametrize("edit,reason", [(drop_model_code, "no 'model.py' section"),
                                         (edit_time, "the curves give"),
                                         (set_nfe, "nfe 50, not 100"),
                                         (noise_samples, "rescored overall"),
                                         (sparse_checkpoints, "up to mark 2 at most 7.0 s apart for a 16.8 s claim (largest gap 12.0 s)"),
                                         (guidance_tuned_for_one_run, "sampled with different settings"),
                                         (duplicate_a_run, "the runs share a training seed [0, 0, 2, 3, 4]"),
                                         (change_one_runs_budget, "hyperparameters differ in ['budget_seconds']"),
                                         (drop_a_hard_tag, "a record scores the same number of prompts of every tag")],
                         ids=["missing-code", "edited-time", "nfe-50", "swapped-samples", "sparse-checkpoints",
                              "per-run-guidance", "duplicated-run", "other-recipe", "dropped-tag"])
def test_validator_rejects_a_corrupted_record_with_its_reason(record, tmp_path, edit, reason):
    bad = corrupt_copy(record, tmp_path, edit)
    problems = evaluate.check_record(bad)
    assert any(reason in p for p in problems), problems
    result = run_cli("evaluate.py", "check-record", bad)
    assert result.returncode != 0 and reason in result.stderr and "Traceback" not in result.stderr


def test_validator_rejects_too_few_runs(record, tmp_path):
    def four_runs(rec):
        meta = json.loads((rec / "record.json").read_text())
        meta["runs"] = meta["runs"][:4]
        (rec / "record.json").write_text(json.dumps(meta))
    assert any("at least 5" in p for p in evaluate.check_record(corrupt_copy(record, tmp_path, four_runs)))


def test_checkpoint_gap_is_five_percent_of_the_claim_above_a_floor():
    # floor 5 s up to a 100 s claim, then 5% of the claim; 2 s for a checkpoint landing after its mark
    assert evaluate.max_checkpoint_gap("shapes", 60.0) == pytest.approx(7.0)
    assert evaluate.max_checkpoint_gap("shapes", 300.0) == pytest.approx(17.0)
    assert evaluate.max_checkpoint_gap("imagenet", 6 * 3600.0) == pytest.approx(1080.0 + 60.0)


def test_a_cadence_too_coarse_for_the_first_passing_mark_defers_the_claim():
    # the real runs' shape: checkpoints every 15.6 s, all five runs above 0.90 from mark 16 (265.2 s) on.
    # There 5% of the claim + 2 s is 15.26 s < 15.6 s; at mark 17 (280.8 s) it is 16.04 s, so the claim is mark 17
    curves = [[{"train_seconds": 15.6 * (k + 1), "overall": 0.93 + 0.01 * r if k >= 16 else 0.5} for k in range(20)]
              for r in range(5)]
    stats = evaluate.record_statistics(curves, 0.90, "shapes")
    assert stats["time_to_target"] == [pytest.approx(15.6 * 17)] * 5
    assert stats["claimed_checkpoint"] == 17 and stats["claimed_seconds"] == pytest.approx(15.6 * 18)
    for points in curves:  # 13 s apart: fine enough for mark 16 (221 s: 13.05 s allowed)
        for k, p in enumerate(points):
            p["train_seconds"] = 13.0 * (k + 1)
    assert evaluate.record_statistics(curves, 0.90, "shapes")["claimed_checkpoint"] == 16


def test_one_sided_p_value_follows_the_t_distribution():
    # t = (mean - target) / (s / sqrt(n)) = 0.05 / (0.01414 / sqrt 5) = 7.906 on 4 dof; t tables: p = 0.00070
    scores = [0.93, 0.95, 0.95, 0.95, 0.97]
    assert evaluate.p_value_above(scores, 0.90) == pytest.approx(0.00070, abs=1e-5)
    assert evaluate.p_value_above(scores, 0.99) > 0.99
    assert evaluate.p_value_above([0.95] * 5, 0.90) == 0.0


def test_a_record_eval_set_is_the_first_prompts_of_every_tag():
    import data
    import sample
    official = data.shapes_eval_prompts(0)
    assert evaluate.shapes_eval_set_problem(sample.select_prompts(official, 3), 0) is None
    picked = [p for tag in data.TAGS for p in [q for q in official if q["tag"] == tag][5:8]]  # chosen, not the first
    assert "not the first 3" in evaluate.shapes_eval_set_problem(picked, 0)
    uneven = sample.select_prompts(official, 3)[:-1]  # one color_attr prompt short
    assert "same number of prompts of every tag" in evaluate.shapes_eval_set_problem(uneven, 0)


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (REPO / "records").glob("*/*/record.json")))
def test_every_committed_record_passes_the_validator(folder):
    (path,) = (REPO / "records").glob(f"*/{folder}")
    assert evaluate.check_record(path) == []


@pytest.mark.parametrize("attempt, p_at_160s", [("raw160", 0.031), ("bf16-160", 0.019)])
def test_the_committed_failed_attempts_have_no_claim(attempt, p_at_160s):
    # Five real runs each (records/shapes-baseline-tuning.md, sections 14 and 15). raw160: mean 0.914 at 160 s,
    # t = 2.56 on 4 dof, p = 0.031, where a normal approximation (p = 0.005) would have claimed 160 s.
    # bf16-160: mean 0.915, t = 3.04, p = 0.019.
    curves = json.loads((REPO / f"records/shapes-baseline-tuning/attempt-{attempt}-curves.json").read_text())
    stats = evaluate.record_statistics(curves, 0.90, "shapes")
    assert stats["claimed_checkpoint"] is None
    assert evaluate.mark_evidence(curves, 15, 0.90)[1] == pytest.approx(p_at_160s, abs=0.001)


def test_the_withdrawn_165s_attempt_claims_on_its_five_runs_but_not_on_all_eight():
    # records/shapes-baseline-tuning.md, section 16: five seeds chosen before the runs claim 148.8 s (p = 0.0044);
    # three more runs of the same recipe (seed 5, whose samples were lost; seeds 11 and 12, scored at the last
    # five marks only) take the evidence at that mark to p = 0.18, and only the last mark, 165.3 s, holds.
    tuning = REPO / "records/shapes-baseline-tuning"
    curves = json.loads((tuning / "attempt-raw165-curves.json").read_text())
    stats = evaluate.record_statistics(curves, 0.90, "shapes")
    assert stats["claimed_checkpoint"] == 17
    assert stats["claimed_seconds"] == pytest.approx(148.8, abs=0.05)
    assert stats["p_value"] == pytest.approx(0.0044, abs=0.0002)
    more = json.loads((tuning / "attempt-raw165-more-curves.json").read_text())
    tails = [points[-5:] for points in curves + list(more.values())]  # marks 15-19 of all eight runs
    assert [len(points) for points in more.values()] == [20, 5, 5]
    p_at = {k: evaluate.mark_evidence(tails, k - 15, 0.90)[1] for k in (17, 18, 19)}
    assert p_at[17] == pytest.approx(0.176, abs=0.001)
    assert p_at[18] == pytest.approx(0.017, abs=0.001)
    assert p_at[19] == pytest.approx(0.0026, abs=0.0002)

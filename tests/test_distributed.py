"""torchrun on the CPU (gloo): two processes train and sample the same experiment as one."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
from conftest import REPO, TRAIN_BATCH, logged_losses, train

STEPS = 10


def launch(*args, nproc=1):
    """`torchrun --nproc_per_node=nproc <args>` (or plain python for 1), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    result = subprocess.run([sys.executable, *runner, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_run(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", out, "--max-steps", STEPS,
           "--log-every", 5, "--batch-size", TRAIN_BATCH, "--ckpt-every-seconds", 0.0001,
           "--micro-batch-size", TRAIN_BATCH, nproc=2)  # a bound above the rank batch (TRAIN_BATCH / 2): no chunks
    return out


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_two_processes_follow_the_one_process_run(two_process_run, trained_run):
    one, two = logged_losses(trained_run), logged_losses(two_process_run)
    assert sorted(two) == list(range(1, STEPS + 1))
    for s in two:
        assert float(two[s]) == pytest.approx(float(one[s]), rel=1e-4, abs=1e-6), s
    ref, got = weights(trained_run / "checkpoints" / "ckpt_0000010.pt"), weights(
        two_process_run / "checkpoints" / "ckpt_0000010.pt")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)


def test_ranks_hold_identical_weights_at_every_checkpoint(two_process_run):
    log = (two_process_run / "log.txt").read_text()
    assert "step 5: weights identical on all 2 ranks" in log
    assert "step 10: weights identical on all 2 ranks" in log


def test_gradient_accumulation_follows_the_whole_batch_run(shapes_data, trained_run, tmp_path):
    run = train(shapes_data, tmp_path / "micro", 0, "--micro-batch-size", TRAIN_BATCH // 4)
    one, micro = logged_losses(trained_run), logged_losses(run)
    for s in range(1, 21):
        assert float(micro[s]) == pytest.approx(float(one[s]), rel=1e-4, abs=1e-6), s


def test_two_process_sampling_writes_the_same_files(trained_run, shapes_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    data.write_metadata(prompts, data.read_metadata(shapes_data / "eval_metadata.jsonl")[:3])
    ckpt = trained_run / "checkpoints" / "ckpt_0000020.pt"
    common = ("--prompts", prompts, "--images-per-prompt", 2, "--batch-size", 2)
    launch("sample.py", ckpt, "--out", tmp_path / "one", *common)
    launch("sample.py", ckpt, "--out", tmp_path / "two", *common, nproc=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 3 * 2 + 3  # samples + grids
    for f in files:
        one, two = ((tmp_path / run / f).read_bytes() for run in ("one", "two"))
        if f.name == "sampling.json":  # the same but for the seconds each stage took
            one, two = ({k: v for k, v in json.loads(b).items() if k != "seconds"} for b in (one, two))
        assert one == two, f


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, shapes_data, trained_run, tmp_path):
    launch("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "resumed",
           "--max-steps", STEPS, "--log-every", 5, "--batch-size", TRAIN_BATCH,
           "--resume", two_process_run / "checkpoints" / "ckpt_0000005.pt")
    one, resumed = logged_losses(trained_run), logged_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(6, STEPS + 1))
    for s in resumed:
        assert float(resumed[s]) == pytest.approx(float(one[s]), rel=1e-4, abs=1e-6), s


def test_a_two_process_curve_shares_the_scoring_and_equals_the_one_process_curve(trained_run, tmp_path):
    """The whole curve under torchrun: sampling, the barrier, the shared detector, rank 0's curve."""
    run = tmp_path / "run"  # the trained run with its last checkpoint only
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "log.txt", run)
    shutil.copy(trained_run / "checkpoints" / "ckpt_0000020.pt", run / "checkpoints")
    common = ("evaluate.py", "curve", run, "--per-tag", 1, "--images-per-prompt", 2, "--batch-size", 4)
    launch(*common, "--samples", "one", "--curve", "one")
    launch(*common, "--samples", "two", "--curve", "two", nproc=2)
    one, two = run / "one" / "ckpt_0000020", run / "two" / "ckpt_0000020"
    assert (one / "results.jsonl").read_text() == (two / "results.jsonl").read_text().replace("/two/", "/one/")
    assert len((one / "results.jsonl").read_text().splitlines()) == 6 * 2  # one prompt of each tag, two images
    scores_one, scores_two = (json.loads((f / "scores.json").read_text()) for f in (one, two))
    assert (scores_one.pop("ranks"), scores_two.pop("ranks")) == (1, 2)  # the two ranks shared the detector
    assert scores_one.pop("seconds").keys() == scores_two.pop("seconds").keys()  # each rank's own timings
    assert scores_one == scores_two
    points_one, points_two = (json.loads((run / f"{c}.json").read_text()) for c in ("one", "two"))
    assert [{k: v for k, v in p.items() if k not in ("samples", "seconds")} for p in points_one] == \
           [{k: v for k, v in p.items() if k not in ("samples", "seconds")} for p in points_two]


def test_two_processes_score_a_folder_as_one_each_taking_every_other_image(truth_renders, tmp_path):
    """Exact renders, which the detector finds objects in (the tiny model's samples hold none)."""
    for name, nproc in (("one", 1), ("two", 2)):
        shutil.copytree(truth_renders, tmp_path / name, ignore=shutil.ignore_patterns("results.jsonl", "scores.json"))
        launch("evaluate.py", "score", tmp_path / name, nproc=nproc)
    rows_one, rows_two = ([json.loads(line) for line in (tmp_path / n / "results.jsonl").read_text().splitlines()]
                          for n in ("one", "two"))
    assert len(rows_one) == 6 * 20 * 4 and sum(r["correct"] for r in rows_one) > 0.9 * len(rows_one)
    assert [{**r, "filename": r["filename"].replace("/two/", "/one/")} for r in rows_two] == rows_one
    scores_one, scores_two = (json.loads((tmp_path / n / "scores.json").read_text()) for n in ("one", "two"))
    assert (scores_one.pop("ranks"), scores_two.pop("ranks")) == (1, 2)
    assert scores_one.pop("seconds").keys() == scores_two.pop("seconds").keys()
    assert scores_one == scores_two

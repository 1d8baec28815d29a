"""train_dit.py: determinism, resume, and what the run's log records."""
import platform
import re

import torch

import data
from conftest import N_TRAIN, REPO, TRAIN_STEPS, logged_losses, train


def test_same_seed_gives_identical_losses_and_other_seed_differs(shapes_data, trained_run, tmp_path):
    first = logged_losses(trained_run)
    assert sorted(first) == list(range(1, TRAIN_STEPS + 1))
    assert all(float(v) > 0 for v in first.values())

    again = logged_losses(train(shapes_data, tmp_path / "again", 0))
    assert again == first

    other = logged_losses(train(shapes_data, tmp_path / "seed1", 1))
    assert sorted(other) == sorted(first)
    assert sum(other[s] != first[s] for s in first) > TRAIN_STEPS // 2


def test_resume_from_a_checkpoint_continues_the_same_run(shapes_data, trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "ckpt_0000010.pt"
    assert ckpt.exists(), sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    resumed = logged_losses(train(shapes_data, tmp_path / "resumed", 0, "--resume", ckpt))
    full = logged_losses(trained_run)
    assert sorted(resumed) == list(range(11, TRAIN_STEPS + 1))
    assert resumed == {s: full[s] for s in resumed}


def test_log_holds_the_code_environment_and_data_order_hash(trained_run):
    log = (trained_run / "log.txt").read_text()
    for name in ("train_dit.py", "model.py", "data.py"):
        assert f"==================== {name}\n" + (REPO / name).read_text() in log, f"{name} source not in log"
    environment = log.split("==================== environment\n", 1)[1].split("====================", 1)[0]
    assert f"python {platform.python_version()}" in environment
    assert f"torch {torch.__version__}" in environment
    hashes = re.findall(r"data_order_hash=(\w+)", log)
    assert hashes == [data.order_hash(N_TRAIN, 0)]


def test_checkpoint_records_the_run(trained_run, shapes_data):
    from train_dit import load_checkpoint
    ckpt = load_checkpoint(trained_run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt")
    assert ckpt["step"] == TRAIN_STEPS
    assert ckpt["loader_position"] == TRAIN_STEPS * ckpt["hparams"]["batch_size"]
    assert ckpt["data_order_hash"] == data.order_hash(N_TRAIN, 0)
    assert ckpt["model_config"]["patch_size"] == 8
    assert ckpt["model_config"]["text_dim"] == data.read_manifest(shapes_data)["text"]["width"]

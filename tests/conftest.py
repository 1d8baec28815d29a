"""Shared fixtures: one tiny GenEval-Shapes data set, one tiny training run, one set of truth renders.

Everything runs on the CPU with a random-init, tiny open_clip text tower (nothing is downloaded).
The expensive things are session-scoped so they are built once.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data  # noqa: E402

# A tiny open_clip text tower (random init): 64-wide tokens, 32-wide pooled embedding.
TINY_TEXT = dict(text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
                 vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16), embed_dim=32)
N_TRAIN, SHARD_SIZE = 256, 100  # three shards, the last one short
TRAIN_STEPS = 20
TRAIN_BATCH = 8
LOSS_LINE = re.compile(r"^step (\d+) loss (\S+)$", re.M)


def build_data(out, seed=0, workers=1):
    return data.build_shapes(out, n_train=N_TRAIN, seed=seed, shard_size=SHARD_SIZE, workers=workers,
                             text_overrides=TINY_TEXT, log=lambda *a: None)


def run_cli(*args, timeout=300, cwd=REPO):
    """Run `python <args>` from the repository root (or cwd); returns the CompletedProcess (text mode)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def train(data_dir, out, seed=0, *extra):
    """A 20-step CPU run of the tiny preset; fails the test if the run fails."""
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", data_dir, "--out", out,
                     "--max-steps", TRAIN_STEPS, "--log-every", 10, "--batch-size", TRAIN_BATCH,
                     "--seed", seed, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(out)


def logged_losses(run_dir):
    """{step: loss string} from a run's log.txt `step N loss X` lines."""
    return {int(s): v for s, v in LOSS_LINE.findall((Path(run_dir) / "log.txt").read_text())}


def assert_one_line_error(result, *mentions):
    """A clean CLI failure: nonzero exit, last stderr line `error: ...` naming `mentions`, no traceback."""
    assert result.returncode != 0, f"expected a failure, got rc 0\nstdout: {result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("error:"), result.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr[-3000:]
    for m in mentions:
        assert str(m) in last, f"{m!r} not in {last!r}"
    return last


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A 256-scene GenEval-Shapes data set (seed 0, three shards). Treat as read-only: copy to modify."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    build_data(out, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run(shapes_data, tmp_path_factory):
    """A 20-step seed-0 run of the tiny preset, checkpointing at steps 10 and 20. Read-only."""
    out = tmp_path_factory.mktemp("runs") / "seed0"
    return train(shapes_data, out, 0, "--ckpt-every-seconds", "0.0001")


@pytest.fixture(scope="session")
def truth_renders(shapes_data, tmp_path_factory):
    """Ground-truth renders (`evaluate.py truth`) of the first 20 eval prompts of each tag. Read-only."""
    import evaluate
    out = tmp_path_factory.mktemp("truth") / "truth"
    evaluate.main(["truth", str(shapes_data), "--out", str(out), "--per-tag", "20"])
    return out

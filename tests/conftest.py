"""Shared fixtures: one tiny GenEval-Shapes data set, one tiny training run, one set of truth renders; the
tiny ImageNet rehearsal (`data.py rehearsal --tiny`), its shards, and one run trained and scored on them.

Everything runs on the CPU with random-init, tiny models (nothing is downloaded). The expensive things
are session-scoped so they are built once. The commands of other programs (train_dit.py, evaluate.py,
data.py) on the rehearsal are built in the helpers below only.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker and per program it starts, so that
    os.environ["OMP_NUM_THREADS"] = "1"  # N workers keep N cores busy without spinning threads on each other
sys.path.insert(0, str(REPO))

import data  # noqa: E402

SHARED = REPO.parent / "shared" / "geneval"  # the official GenEval files, for tests only (never committed)
needs_shared = pytest.mark.skipif(not (SHARED / "evaluation_metadata.jsonl").exists(),
                                  reason="../shared/geneval/ (official GenEval files) is absent")

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


def run_ok(*args, timeout=300):
    """run_cli that fails the test, with the end of stderr, unless the program exits 0."""
    result = run_cli(*args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train(data_dir, out, seed=0, *extra):
    """A 20-step CPU run of the tiny preset; fails the test if the run fails."""
    run_ok("train_dit.py", "--config", "shapes-cpu", "--data", data_dir, "--out", out, "--max-steps", TRAIN_STEPS,
           "--log-every", 10, "--batch-size", TRAIN_BATCH, "--seed", seed, *extra)
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


# -----------------------------------------------------------------------------
# The ImageNet rehearsal: an ImageNet-layout tree and random-init weights of the real architectures in the hubs'
# layouts; the real prep, trainer, sampler and scorer run on it unchanged

REHEARSAL_SHARD_SIZE = 16  # 50 files: 4 shards, the last one short
TINY_DIT = ("--hidden", 64, "--depth", 2, "--heads", 2)  # an ImageNet config's model, shrunk for a CPU
# Two of the rehearsal's GenEval prompts, one image each: on this CPU a 100-NFE sample of the tiny model takes
# seconds. The single object is the one the records tests' detector passes; the colour one asks CLIP.
REHEARSAL_TAGS = ("single_object", "colors")


def train_cli(data_dir, out, config="imagenet", steps=2, batch=4):
    """A few CPU steps of an ImageNet config's model, shrunk, a checkpoint after each."""
    return ["train_dit.py", "--config", config, *TINY_DIT, "--data", data_dir, "--out", out, "--max-steps", steps,
            "--batch-size", batch, "--log-every", 1, "--compile", "false", "--ckpt-every-seconds", "0.0001"]


def score_flags(rehearsal):
    """The rehearsal's printed scoring flags (mask2former backend on its weights), after `evaluate.py curve RUN`."""
    flags = shlex.split(rehearsal["commands"]["score_flags"])
    return flags[flags.index("--backend"):]


def curve_cli(run, rehearsal, prompts):
    """evaluate.py curve with the mask2former backend on the rehearsal's weights, from its printed flags."""
    flags = score_flags(rehearsal)
    flags[flags.index("--prompts") + 1] = str(prompts)
    return ["evaluate.py", "curve", run, *flags, "--per-tag", 1, "--images-per-prompt", 1, "--batch-size", 2,
            "--score-batch-size", 2, "--device", "cpu"]


def prep_args(rehearsal, out, *extra):
    """The rehearsal's printed prep command, with this test's output folder and shard size."""
    args = shlex.split(rehearsal["commands"]["prep"])[2:]  # after `python data.py`
    args[args.index("--out") + 1] = str(out)
    args[args.index("--shard-size") + 1] = str(REHEARSAL_SHARD_SIZE)
    return ["data.py", *args, *extra]


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory):
    """rehearsal.json of a tiny rehearsal, with its folder ("root") and what the command printed. Read-only."""
    out = tmp_path_factory.mktemp("rehearsal") / "r"
    result = run_ok("data.py", "rehearsal", "--out", out, "--tiny")
    info = json.loads((out / "rehearsal.json").read_text())
    info["root"], info["stdout"] = out, result.stdout
    return info


@pytest.fixture(scope="session")
def rehearsal_shards(rehearsal, tmp_path_factory):
    """The rehearsal tree prepped by its printed command. Read-only."""
    out = tmp_path_factory.mktemp("rehearsal_shards") / "shards"
    run_ok(*prep_args(rehearsal, out))
    return out


@pytest.fixture(scope="session")
def rehearsal_run(rehearsal_shards, tmp_path_factory):
    """Two steps of the shrunk `imagenet` config on the rehearsal shards, a checkpoint after each. Read-only."""
    out = tmp_path_factory.mktemp("rehearsal_runs") / "imagenet"
    run_ok(*train_cli(rehearsal_shards, out))
    return out


@pytest.fixture(scope="session")
def rehearsal_scored_run(rehearsal, rehearsal_run, tmp_path_factory):
    """A copy of rehearsal_run with its curve: `evaluate.py curve` sampled every checkpoint on REHEARSAL_TAGS'
    prompts (into samples/ckpt_*/) and scored them with the rehearsal's detector (curve.json). Read-only."""
    root = tmp_path_factory.mktemp("rehearsal_scored")
    run = shutil.copytree(rehearsal_run, root / "imagenet")
    prompts = root / "prompts.jsonl"
    data.write_metadata(prompts, [p for p in data.read_metadata(rehearsal["root"] / "evaluation_metadata.jsonl")
                                  if p["tag"] in REHEARSAL_TAGS])
    run_ok(*curve_cli(run, rehearsal, prompts), timeout=900)
    return run

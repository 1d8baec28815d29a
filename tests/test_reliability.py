"""Reliability: bit-exact resume, kills and signals, NaN/Inf, data integrity, full disks, and parsers
that refuse malformed input with an error naming the line and field (fuzzed with hypothesis).

Training runs are the tiny CPU preset of conftest.train; every case works on copies of the shared fixtures.
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import model
import sample
import train_dit
from conftest import REPO, TRAIN_BATCH, TRAIN_STEPS, assert_one_line_error, logged_losses, run_cli, train

# Derandomized: CI runs the same 200 examples each time, and no example database is written.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def load(path):
    return model.load_checkpoint(path)


def assert_same_training_state(a, b):
    """Model, EMA and optimizer state of two checkpoints are bit-identical (torch.equal)."""
    for weights in ("model", "ema"):
        assert a[weights].keys() == b[weights].keys()
        for name in a[weights]:
            assert torch.equal(a[weights][name], b[weights][name]), f"{weights}.{name} differs"
    assert len(a["optimizer"]) == len(b["optimizer"])
    for sa, sb in zip((o["state"] for o in a["optimizer"]), (o["state"] for o in b["optimizer"])):
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            for key in sa[i]:
                assert torch.equal(sa[i][key], sb[i][key]), f"optimizer state {i}.{key} differs"


def ckpt_name(step):
    return f"ckpt_{step:07d}.pt"


def checkpoint_files(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# -----------------------------------------------------------------------------
# Resume


def test_resume_continues_bit_exactly_in_weights_ema_optimizer_and_losses(shapes_data, trained_run, tmp_path):
    half = TRAIN_STEPS // 2
    resumed = train(shapes_data, tmp_path / "resumed", 0, "--resume", trained_run / "checkpoints" / ckpt_name(half))
    full = load(trained_run / "checkpoints" / ckpt_name(TRAIN_STEPS))
    again = load(resumed / "checkpoints" / ckpt_name(TRAIN_STEPS))
    assert_same_training_state(full, again)
    for key in ("step", "loader_position", "images_seen", "data_order_hash"):
        assert full[key] == again[key], key
    assert torch.equal(full["rng"]["cpu"], again["rng"]["cpu"])
    start = load(trained_run / "checkpoints" / ckpt_name(half))["train_seconds"]
    assert again["train_seconds"] >= start  # the training clock went on from the checkpoint's
    assert f"step {half}, {start:.1f} s of training clock" in (resumed / "log.txt").read_text()
    losses = logged_losses(resumed)
    assert sorted(losses) == list(range(half + 1, TRAIN_STEPS + 1))
    assert losses == {s: logged_losses(trained_run)[s] for s in losses}


def test_resume_from_a_checkpoint_without_training_state_is_refused(shapes_data, trained_run, tmp_path):
    ckpt = load(trained_run / "checkpoints" / ckpt_name(10))
    del ckpt["rng"], ckpt["optimizer"]  # as a checkpoint of an older train_dit.py
    path = tmp_path / "old.pt"
    model.save_checkpoint(ckpt, path)
    args = train_dit.parse_args(["--config", "shapes-cpu", "--data", str(shapes_data), "--out", str(tmp_path / "run"),
                                 "--max-steps", "11", "--batch-size", str(TRAIN_BATCH), "--resume", str(path)])
    lacks = f"{path}: cannot resume from it, it lacks ['optimizer', 'rng']"
    with pytest.raises(data.UserError, match=re.escape(lacks)):
        train_dit.main(*args)
    assert not (tmp_path / "run").exists()  # a start that fails leaves nothing behind


# -----------------------------------------------------------------------------
# Atomic checkpoints: a kill during a save, a full disk

SLOW_SAVE = r"""
import sys, time
sys.path.insert(0, {repo!r})
import torch, data, model

path = {path!r}
model.save_checkpoint({{"model_config": {{}}, "step": 1}}, path)

class SlowFile:
    # A real file whose writes stall once a megabyte is down, so that the kill lands mid-save.
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, b):
        n = self.f.write(b)
        self.written += n
        if self.written > 1 << 20:
            self.f.flush()
            print("mid-save", flush=True)
            time.sleep(600)
        return n
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

data.open = lambda *a, **k: SlowFile(open(*a, **k))
model.save_checkpoint({{"model_config": {{}}, "step": 2, "big": torch.ones(4 << 20)}}, path)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_no_mistakable_file(tmp_path):
    """A real SIGKILL while a checkpoint save is half-way through writing (held there by a slow file wrapper)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path = run / "checkpoints" / ckpt_name(1)
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(repo=str(REPO), path=str(path))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "mid-save", child.stderr.read()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    partial = path.with_name(path.name + ".tmp")
    assert partial.exists() and partial.stat().st_size > 1 << 20  # the half-written save
    assert model.load_checkpoint(path)["step"] == 1  # the previous checkpoint, intact
    with pytest.raises(data.UserError, match="not a readable checkpoint"):
        model.load_checkpoint(partial)
    assert sample.checkpoints_of(run) == [path]  # the leftover is never listed as a checkpoint
    model.save_checkpoint({"model_config": {}, "step": 3}, path)  # the next save goes through
    assert model.load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [ckpt_name(1)]


def test_checkpoint_save_on_a_full_disk_is_a_one_line_error_and_replaces_nothing(tmp_path):
    """ENOSPC from the device: the temporary file is a link to /dev/full, where every write fails with it."""
    path = tmp_path / ckpt_name(5)
    model.save_checkpoint({"model_config": {}, "step": 5}, path)
    before = path.read_bytes()
    path.with_name(path.name + ".tmp").symlink_to("/dev/full")
    with pytest.raises(data.UserError) as error:
        model.save_checkpoint({"model_config": {}, "step": 6, "big": torch.ones(1 << 20)}, path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "No space left on device" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_full_disk_while_checkpointing_stops_with_one_line_and_keeps_the_previous_checkpoint(
        shapes_data, trained_run, tmp_path):
    """A training run whose step-20 checkpoint meets a real ENOSPC (its temporary file links to /dev/full)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    previous = shutil.copy(trained_run / "checkpoints" / ckpt_name(10), run / "checkpoints")
    before = (run / "checkpoints" / ckpt_name(10)).read_bytes()
    (run / "checkpoints" / (ckpt_name(20) + ".tmp")).symlink_to("/dev/full")
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", run,
                     "--max-steps", 20, "--log-every", 10, "--batch-size", TRAIN_BATCH, "--resume", previous)
    assert_one_line_error(result, run / "checkpoints" / ckpt_name(20), "No space left on device")
    assert checkpoint_files(run) == [ckpt_name(10)]  # no temporary file left, nothing replaced
    assert (run / "checkpoints" / ckpt_name(10)).read_bytes() == before


def test_fake_full_disk_while_writing_samples_leaves_the_previous_samples(shapes_data, trained_run, tmp_path,
                                                                          monkeypatch):
    """Simulated ENOSPC (PNG writes fail after the first two) while re-sampling into a sampled folder."""
    from PIL import Image
    manifest = data.read_manifest(shapes_data)
    prompts = data.read_metadata(shapes_data / "eval_metadata.jsonl")[:2]
    settings = {"cfg_scale": 6.0, "cfg_interval": (0.3, 1.0), "time_shift": 1.0, "sample_weights": "ema"}
    sampler = sample.Sampler(manifest, prompts, data.text_encoder_from_manifest(manifest), settings, "cpu",
                             images_per_prompt=2)
    out = tmp_path / "samples" / "ckpt"
    sampler.run(trained_run / "checkpoints" / ckpt_name(TRAIN_STEPS), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len([p for p in before if p.suffix == ".png"]) == 2 * 3

    real_save, saves = Image.Image.save, []

    def save_until_full(self, *args, **kwargs):
        saves.append(args[0])
        if len(saves) > 2:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    sampler.seed = 1  # other images than those on disk
    with pytest.raises(data.UserError) as error:
        sampler.run(trained_run / "checkpoints" / ckpt_name(10), out)
    message = str(error.value)
    assert "\n" not in message and str(out) in message and "No space left on device" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no staging folder left
    monkeypatch.undo()
    sampler.run(trained_run / "checkpoints" / ckpt_name(10), out)  # with space again, it goes through
    assert json.loads((out / "sampling.json").read_text())["step"] == 10
    replaced = Path("00001", "samples", "0001.png")
    assert (out / replaced).read_bytes() != before[replaced]


# -----------------------------------------------------------------------------
# Signals: finish the step, checkpoint, exit 0


def start_long_run(shapes_data, run):
    """A run with an endless budget, logging every step; returns once it has logged its first step."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "train_dit.py", "--config", "shapes-cpu", "--data", str(shapes_data),
                              "--out", str(run), "--batch-size", str(TRAIN_BATCH), "--log-every", "1",
                              "--budget-seconds", "1e9"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in child.stdout:
        if line.startswith("step "):
            return child
    child.wait()
    pytest.fail(f"the run ended before its first step: {child.stderr.read()[-3000:]}")


STOPPED = re.compile(r"^stopped by (SIG\w+) after step (\d+): checkpoint (\S+); continue with --resume (\S+)$", re.M)


def stop_with(sig, shapes_data, run):
    """Start a long run, send `sig` after its first step; check exit 0, the message and the checkpoint."""
    child = start_long_run(shapes_data, run)
    try:
        child.send_signal(sig)
        stdout, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:  # never leave an endless run behind
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr[-3000:]
    match = STOPPED.search(stdout)
    assert match, stdout[-2000:]
    name, step, ckpt, resume = match.groups()
    step = int(step)
    assert name == sig.name and ckpt == resume == str(run / "checkpoints" / ckpt_name(step))
    assert f"step {step} |" in stdout  # the step was finished and logged before the checkpoint
    assert checkpoint_files(run) == [ckpt_name(step)]
    state = model.load_checkpoint(ckpt)
    assert state["step"] == step and state["loader_position"] == step * TRAIN_BATCH
    return step, ckpt


def test_sigint_finishes_the_step_checkpoints_and_exits_0(shapes_data, tmp_path):
    stop_with(signal.SIGINT, shapes_data, tmp_path / "run")


def test_sigterm_checkpoints_exits_0_and_resume_equals_an_uninterrupted_run(shapes_data, trained_run, tmp_path):
    """Stopped by SIGTERM at some step k (mid log interval), resumed to step 20: the 20-step run, bit for bit."""
    run = tmp_path / "run"
    step, ckpt = stop_with(signal.SIGTERM, shapes_data, run)
    train(shapes_data, run, 0, "--resume", ckpt)
    assert_same_training_state(load(trained_run / "checkpoints" / ckpt_name(TRAIN_STEPS)),
                               load(run / "checkpoints" / ckpt_name(TRAIN_STEPS)))
    assert logged_losses(run) == logged_losses(trained_run)  # steps 1..k, then k+1..20 in the same log


# -----------------------------------------------------------------------------
# NaN / Inf


@pytest.fixture(scope="module")
def poisoned_data(shapes_data, tmp_path_factory):
    """A data copy whose text features for one caption are float16 infinity (an overflowing text encoder),
    with a manifest that matches; and the training steps (batch 8, seed 0) whose batch holds that caption.

    The caption is one first met in step 5's batch and met again in step 6's: steps 1-4 are clean.
    """
    root = shutil.copytree(shapes_data, tmp_path_factory.mktemp("poisoned") / "shapes")
    dataset = data.ShardDataset(root)
    batches = [dataset.caption_ids[data.global_batch_indices(len(dataset), 0, s * TRAIN_BATCH, TRAIN_BATCH)]
               for s in range(TRAIN_STEPS)]
    caption = next(c for c in batches[4] if c not in np.concatenate(batches[:4]) and c in batches[5])
    tokens = np.load(root / "text_tokens.npy")
    tokens[caption] = np.inf
    np.save(root / "text_tokens.npy", tokens)
    manifest = data.read_manifest(root)
    manifest["text"]["files"] = [data._file_entry(root, entry["file"]) for entry in manifest["text"]["files"]]
    data.write_manifest(root, manifest)
    return root, [s + 1 for s, ids in enumerate(batches) if caption in ids]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(poisoned_data, tmp_path):
    root, poisoned_steps = poisoned_data
    assert poisoned_steps[0] == 5
    run = tmp_path / "run"
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", root, "--out", run, "--max-steps", 12,
                     "--batch-size", TRAIN_BATCH, "--log-every", 4, "--ckpt-every-seconds", "0.0001",
                     "--text-dropout", 0)
    good = run / "checkpoints" / ckpt_name(4)
    assert_one_line_error(result, "step 5: loss nan", "not finite", f"last good checkpoint: {good}")
    assert checkpoint_files(run) == [ckpt_name(4)]  # the interval holding step 5 wrote none
    assert all(torch.isfinite(t).all() for t in model.load_checkpoint(good)["model"].values())
    assert "error: step 5: loss nan" in (run / "log.txt").read_text()


def test_skip_nonfinite_skips_the_update_of_exactly_the_nonfinite_steps(poisoned_data, tmp_path):
    root, poisoned_steps = poisoned_data
    run = train(root, tmp_path / "run", 0, "--skip-nonfinite", "true", "--text-dropout", 0, "--max-steps", 6,
                "--log-every", 4, "--ckpt-every-seconds", "0.0001")
    log = (run / "log.txt").read_text()
    skipped = [int(s) for s in re.findall(r"^step (\d+): loss nan, gradient norm \S+: update skipped", log, re.M)]
    assert skipped == [s for s in poisoned_steps if s <= 6] == [5, 6]
    losses = logged_losses(run)
    assert sorted(losses) == list(range(1, 7))
    assert [s for s in losses if losses[s] == "nan"] == skipped
    # Steps 5 and 6 were skipped whole: weights, EMA and optimizer (its step count too) are step 4's.
    after = model.load_checkpoint(run / "checkpoints" / ckpt_name(6))
    assert_same_training_state(load(run / "checkpoints" / ckpt_name(4)), after)
    assert all(torch.isfinite(t).all() for w in ("model", "ema") for t in after[w].values())


def test_weights_blown_up_by_an_update_are_never_checkpointed(shapes_data, tmp_path):
    """lr 1e39 turns finite gradients into infinite float32 weights at step 1; the step-1 checkpoint is refused."""
    run = tmp_path / "run"
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", run, "--max-steps", 1,
                     "--batch-size", TRAIN_BATCH, "--lr", "1e39", "--lr-warmup-steps", 0)
    assert_one_line_error(result, "step 1: the weights are not finite", "none written yet")
    assert checkpoint_files(run) == []


# -----------------------------------------------------------------------------
# Data integrity: fast check at every start, full check on request, format version


@pytest.fixture
def data_copy(shapes_data, tmp_path):
    return shutil.copytree(shapes_data, tmp_path / "shapes")


def flip_byte(path, offset):
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_fast_check_catches_truncated_swapped_and_zeroed_files(data_copy):
    manifest = data.read_manifest(data_copy)
    a, b = data_copy / "shard_00000.latents.npy", data_copy / "shard_00001.latents.npy"
    original = a.read_bytes()
    assert len(original) == b.stat().st_size  # same size: only the hashes can tell them apart

    a.write_bytes(b.read_bytes())  # a shard copied over another
    with pytest.raises(data.UserError, match=re.escape(str(a)) + ".*sha256"):
        data.verify_files(data_copy, manifest, full=False)
    a.write_bytes(original[:len(original) // 2] + bytes(len(original) - len(original) // 2))  # zero-filled tail
    with pytest.raises(data.UserError, match=re.escape(str(a)) + ".*sha256"):
        data.verify_files(data_copy, manifest, full=False)
    a.write_bytes(original[:-1])  # truncated
    with pytest.raises(data.UserError, match=re.escape(str(a)) + ".*bytes, manifest says"):
        data.verify_files(data_copy, manifest, full=False)
    a.write_bytes(original)
    data.verify_files(data_copy, manifest, full=False)


def test_fast_check_misses_a_byte_between_windows_which_verify_full_and_the_trainer_flag_catch(data_copy, tmp_path):
    shard = data_copy / "shard_00002.latents.npy"
    second_window = (shard.stat().st_size - data.WINDOW_BYTES) // (data.SAMPLED_WINDOWS - 1)
    assert second_window > data.WINDOW_BYTES + 1
    flip_byte(shard, (data.WINDOW_BYTES + second_window) // 2)  # between the first two windows
    data.verify_files(data_copy, data.read_manifest(data_copy), full=False)  # the documented blind spot
    last = assert_one_line_error(run_cli("data.py", "verify", data_copy, "--full"), shard, "sha256 mismatch")
    trained = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", data_copy, "--out", tmp_path / "run",
                      "--max-steps", 1, "--batch-size", TRAIN_BATCH, "--verify-full", "true")
    assert assert_one_line_error(trained, shard) == last


def test_manifest_of_another_format_version_is_refused_naming_both_versions(data_copy):
    manifest = json.loads((data_copy / "manifest.json").read_text())
    for version in (0, "2", None, 1):  # the CLI is run on the last: the version before the manifest's checksum
        manifest["version"] = version
        (data_copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(data.UserError, match=re.escape(f"format version {version!r}; this code reads version 2")):
            data.ShardDataset(data_copy)  # as train_dit.py opens it
    result = run_cli("data.py", "verify", data_copy)
    assert_one_line_error(result, data_copy / "manifest.json", "format version 1; this code reads version 2")


# -----------------------------------------------------------------------------
# Parsers, fuzzed: GenEval metadata, the shard manifest, the trainer's flags.
# (data.py has no captions-file parser: captions.json is written for people, never read back.)

json_leaf = st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True) | st.text(max_size=8)
PROMPT_KEYS = ["tag", "prompt", "include", "exclude", "class", "count", "color", "position"]
json_value = st.recursive(json_leaf | st.sampled_from(list(data.RELATIONS)),
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(PROMPT_KEYS) | st.text(max_size=4), inner, max_size=4),
                          max_leaves=12)


@st.composite
def mutated(draw, document):
    """`document` with one value somewhere inside replaced by another JSON value, or deleted."""
    document = json.loads(json.dumps(document))
    node, key = None, None
    target = document
    while isinstance(target, (dict, list)) and target and draw(st.booleans()):
        node = target
        key = draw(st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target))))
        target = node[key]
    if node is None:
        return draw(json_value)
    if isinstance(node, dict) and draw(st.booleans()):
        del node[key]
    else:
        node[key] = draw(json_value)
    return document


EVAL_ROWS = [data.sample_prompt(np.random.default_rng(k), tag) for k, tag in enumerate(data.TAGS)]
metadata_line = st.one_of(
    st.sampled_from(EVAL_ROWS).map(json.dumps),
    st.sampled_from(EVAL_ROWS).flatmap(mutated).map(json.dumps),
    json_value.map(json.dumps),
    st.text(max_size=20).map(lambda s: s.replace("\n", " ").replace("\r", " ")),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
    st.just(""),
)
KNOWN_METADATA_ERRORS = ("field '", "not valid JSON", "expected a JSON object", "not UTF-8 text")


@FUZZ
@given(lines=st.lists(metadata_line, max_size=5))
def test_fuzz_metadata_parser_errors_name_the_first_bad_line_and_field(lines, tmp_path):
    path = tmp_path / "metadata.jsonl"
    encoded = [line if isinstance(line, bytes) else line.encode() for line in lines]

    def parse(chunks):
        path.write_bytes(b"\n".join(chunks) + b"\n")
        try:
            return data.read_metadata(path)
        except data.UserError as e:
            return e

    alone = [parse([chunk]) for chunk in encoded]  # each line in a file of its own
    result = parse(encoded)
    blank = f"{path}: no prompts"  # what a file of blank lines gives
    bad = [n for n, r in enumerate(alone, 1) if isinstance(r, data.UserError) and str(r) != blank]
    if bad:
        message = str(result)
        assert isinstance(result, data.UserError) and message.startswith(f"{path}:{bad[0]}: "), message
        assert "\n" not in message and any(known in message for known in KNOWN_METADATA_ERRORS), message
        assert message.split(": ", 1)[1] == str(alone[bad[0] - 1]).split(": ", 1)[1]
    elif any(isinstance(r, list) for r in alone):
        assert result == [row for r in alone if isinstance(r, list) for row in r]
    else:
        assert str(result) == blank


@pytest.fixture(scope="module")
def manifest_playground(shapes_data, tmp_path_factory):
    return shutil.copytree(shapes_data, tmp_path_factory.mktemp("manifest") / "shapes")


@FUZZ
@given(data_draw=st.data())
def test_fuzz_manifest_errors_name_the_file_and_field(manifest_playground, shapes_data, data_draw):
    root = manifest_playground
    manifest = json.loads((shapes_data / "manifest.json").read_text())
    edited = data_draw.draw(mutated(manifest))
    (root / "manifest.json").write_text(json.dumps(edited))
    try:
        dataset = data.ShardDataset(root)
    except data.UserError as e:
        message = str(e)
        assert "\n" not in message and str(root) in message, message
        return
    assert len(dataset) == sum(s["count"] for s in edited["shards"]) and len(dataset) > 0
    loader = data.Loader(dataset, TRAIN_BATCH, seed=0)  # and the loader reads it
    try:
        assert next(loader)[0].shape == (TRAIN_BATCH, *dataset.latent_shape)
    finally:
        loader.close()


FLAGS = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(train_dit.Hyperparameters)] + ["--config"]
flag_value = st.one_of(st.sampled_from(["0", "-1", "1", "1e400", "nan", "-inf", "true", "yes", "tiny", "XL",
                                        "shapes-cpu", "", "0.5", "1.5", "image", "uniform", "2147483648"]),
                       st.integers(-10, 10 ** 12).map(str), st.floats().map(str), st.text(max_size=10))


@FUZZ
@given(argv=st.lists(st.sampled_from(FLAGS) | flag_value, max_size=8))
def test_fuzz_cli_overrides_give_valid_hyperparameters_or_an_argparse_error_naming_the_flag(argv):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            hp, _ = train_dit.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:  # help was asked for, maybe by an abbreviation
            assert any(len(a) > 2 and "--help".startswith(a) or a == "-h" for a in argv), argv
            return
        error = re.search(r"^\S+: error: (.*)", stderr.getvalue(), re.M | re.S)  # values may hold line breaks
        assert e.code == 2 and error, stderr.getvalue()
        assert re.match(r"argument --[\w-]+: |unrecognized arguments: |ambiguous option: ", error.group(1)), error.group(1)
        return
    for f in dataclasses.fields(train_dit.Hyperparameters):
        value = getattr(hp, f.name)
        assert type(value) is f.type or (f.type, type(value)) == (float, int), (f.name, value)
    for name, choices in train_dit.CHOICES.items():
        assert getattr(hp, name) in choices
    for names, _, holds in train_dit.RANGES:
        assert all(holds(getattr(hp, name)) for name in names)
    assert hp.hidden % hp.heads == 0 and hp.batch_size >= 1 and hp.log_every >= 1


@pytest.mark.parametrize("argv,mentions", [
    (["--log-every", "0"], "argument --log-every: must be > 0, got 0"),
    (["--lr", "nan"], "argument --lr: must be >= 0, got nan"),
    (["--compile", "yes"], "argument --compile: expected true, false, 1 or 0, got 'yes'"),
    (["--prediction", "noise"], "argument --prediction: invalid choice: 'noise'"),
    (["--heads", "5"], "argument --heads: 5 does not divide --hidden 128"),
    (["--cfg-interval", "0.8", "0.2"], "argument --cfg-interval: must be two times 0 <= lo <= hi <= 1, got (0.8, 0.2)"),
    (["--beta2", "1"], "argument --beta2: must be in [0, 1), got 1.0"),
    (["--compile-muon", "true"], "argument --compile-muon: compiles Muon's update: needs --optimizer muon, got adamw"),
    (["--bench", "sample", "--bench-profile"], "argument --bench-profile: profiles the GPU kernels of the training step: "
                                               "needs --bench train and a GPU, got --bench sample on a"),
])
def test_bad_flag_values_are_refused_naming_the_flag(argv, mentions, capsys):
    with pytest.raises(SystemExit) as exit:
        train_dit.parse_args(["--config", "shapes-cpu", *argv])
    assert exit.value.code == 2
    assert mentions in capsys.readouterr().err.strip().splitlines()[-1]

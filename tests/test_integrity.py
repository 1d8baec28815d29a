"""Integrity: checkpoints that cannot run code or hide a flipped byte, writes that survive a full disk, one
trainer per run folder, and every bad input a one-line error naming its file."""
import json
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import model
from conftest import REPO, TRAIN_BATCH, assert_one_line_error, run_cli
from test_reliability import start_long_run


# -----------------------------------------------------------------------------
# Checkpoints


class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("cli", ["train", "sample"])
def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(cli, trained_run, shapes_data, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = model.load_checkpoint(trained_run / "checkpoints" / "ckpt_0000020.pt")
    ckpt["payload"] = Payload(marker)
    path = tmp_path / "crafted.pt"
    torch.save(ckpt, path)
    if cli == "train":
        result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "run",
                         "--resume", path, "--max-steps", 21, "--batch-size", TRAIN_BATCH)
    else:
        result = run_cli("sample.py", path, "--out", tmp_path / "samples", "--per-tag", 1)
    assert_one_line_error(result, path, "not a readable checkpoint of tensors and plain types")
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "samples").exists()


def test_a_flipped_byte_inside_a_weight_is_a_content_hash_error(trained_run, shapes_data, tmp_path):
    path = shutil.copy(trained_run / "checkpoints" / "ckpt_0000020.pt", tmp_path / "flipped.pt")
    with zipfile.ZipFile(path) as archive:  # the largest tensor's bytes, stored uncompressed in the zip
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    blob = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(blob[entry.header_offset + k:entry.header_offset + k + 2], "little")
                                 for k in (26, 28))
    blob[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(data.UserError, match="content hash mismatch"):
        model.load_checkpoint(path)
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "run",
                     "--resume", path, "--max-steps", 21, "--batch-size", TRAIN_BATCH)
    assert_one_line_error(result, path, "content hash mismatch")


# -----------------------------------------------------------------------------
# A full disk: what the kernel answers when a file may not grow (RLIMIT_FSIZE), as torch.save meets it

FULL_DISK = r"""
import resource, signal, sys
sys.path.insert(0, {repo!r})
import torch, data, model
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG, as with ENOSPC
model.save_checkpoint({{"model_config": {{}}, "step": 1}}, {path!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    model.save_checkpoint({{"model_config": {{}}, "step": 2, "big": torch.ones(1 << 20)}}, {path!r})
except data.UserError as e:
    print("error:", e)
"""


def test_a_checkpoint_that_torch_save_cannot_finish_is_one_line_and_replaces_nothing(tmp_path):
    path = tmp_path / "ckpt_0000002.pt"
    result = subprocess.run([sys.executable, "-c", FULL_DISK.format(repo=str(REPO), path=str(path))],
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0] == f"error: {path}: could not be written (File too large); nothing was replaced"
    assert model.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_training_whose_log_cannot_be_written_stops_with_one_line(shapes_data, tmp_path):
    run = tmp_path / "run"
    script = (f"import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000)); "
              f"sys.argv = ['train_dit.py', '--config', 'shapes-cpu', '--data', {str(shapes_data)!r}, '--out', "
              f"{str(run)!r}, '--max-steps', '2']; runpy.run_path('train_dit.py', run_name='__main__')")
    result = run_cli("-c", script)
    assert_one_line_error(result, run / "log.txt", "could not be written (File too large)")


# -----------------------------------------------------------------------------
# One trainer per run folder


def test_a_second_trainer_on_the_same_folder_is_refused_at_start(shapes_data, tmp_path):
    run = tmp_path / "run"
    first = start_long_run(shapes_data, run)
    try:
        result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", run,
                         "--max-steps", 2, "--batch-size", TRAIN_BATCH)
        assert_one_line_error(result, run, "another trainer is writing to this folder", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    log = (run / "log.txt").read_text()
    assert log.count("==================== train_dit.py") == 1  # the second trainer wrote nothing


# -----------------------------------------------------------------------------
# Bad input: one line naming the file (and line, field), nothing lost


def edit_manifest(root, change, keep_checksum=True):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if not keep_checksum:
        manifest["manifest_sha256"] = data.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change,keep_checksum,reason", [
    (lambda m: m.pop("seed"), False, "field 'seed' missing or not an integer"),
    (lambda m: m["latent"].update(std=[0.0, 1.0, 1.0]), False, "field 'latent.std' must be 3 finite numbers"),
    (lambda m: m["latent"].update(mean=[0.0, 0.0, 0.0]), True, "checksum mismatch (field 'manifest_sha256')"),
    (lambda m: m.update(seed=1), True, "checksum mismatch"),
], ids=["no-seed", "zero-std", "edited-mean", "edited-seed"])
def test_a_hand_edited_manifest_is_refused_naming_the_field(change, keep_checksum, reason, shapes_data, tmp_path):
    root = shutil.copytree(shapes_data, tmp_path / "data")
    edit_manifest(root, change, keep_checksum)
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", root, "--out", tmp_path / "run", "--max-steps", 1)
    assert_one_line_error(result, root / "manifest.json", reason)
    assert not (tmp_path / "run").exists()


def copy_folder(truth_renders, tmp_path, prompts=3):
    folder = tmp_path / "samples"
    for i in range(prompts):
        shutil.copytree(truth_renders / f"{i * 20:05d}", folder / f"{i:05d}")
    return folder


@pytest.mark.parametrize("write,reason", [
    (lambda p: p.write_text("not a picture"), "not a readable image"),
    (lambda p: p.write_bytes(b""), "not a readable image"),
    (lambda p: Image.fromarray(np.zeros((64, 64), np.uint8)).save(p), "mode L, expected RGB"),
    (lambda p: Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(p), "mode RGBA, expected RGB"),
    (lambda p: Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p), "32x32 pixels, expected 64x64"),
    (lambda p: Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(p), "256x256 pixels, expected 64x64"),
], ids=["text", "empty", "grey", "rgba", "32px", "256px"])
def test_a_sample_image_that_is_not_one_is_an_error_naming_it(write, reason, truth_renders, tmp_path):
    folder = copy_folder(truth_renders, tmp_path)
    bad = folder / "00001" / "samples" / "0002.png"
    write(bad)
    if reason == "not a readable image" and bad.stat().st_size:  # the command line once: one line, no traceback
        assert_one_line_error(run_cli("evaluate.py", "score", folder), bad, reason)
    else:
        with pytest.raises(data.UserError, match=re.escape(f"{bad}: {reason}")):
            evaluate.main(["score", str(folder)])
    assert not (folder / "scores.json").exists()


@pytest.mark.parametrize("change,reason", [
    (lambda m: m["include"][0].update(count=True), "field 'include[0].count' must be a positive integer"),
    (lambda m: m.update(include=[]), "field 'include' is empty"),
    (lambda m: m.update(tag="vibes"), "field 'tag' is 'vibes', not one of GenEval's"),
], ids=["count-true", "empty-include", "unknown-tag"])
def test_a_prompt_the_rules_cannot_judge_is_an_error_naming_its_file(change, reason, truth_renders, tmp_path):
    folder = copy_folder(truth_renders, tmp_path)
    meta_path = folder / "00002" / "metadata.jsonl"
    metadata = json.loads(meta_path.read_text())
    change(metadata)
    meta_path.write_text(json.dumps(metadata) + "\n")
    with pytest.raises(data.UserError, match=re.escape(f"{meta_path}:1: ")) as error:
        evaluate.main(["score", str(folder)])
    assert reason in str(error.value)


def test_a_prompt_folder_with_two_metadata_lines_is_an_error(truth_renders, tmp_path):
    folder = copy_folder(truth_renders, tmp_path)
    meta_path = folder / "00000" / "metadata.jsonl"
    meta_path.write_text(meta_path.read_text() * 2)
    with pytest.raises(data.UserError, match=re.escape(f"{meta_path}:2: a prompt folder's metadata.jsonl holds one line")):
        evaluate.main(["score", str(folder)])


def test_scoring_a_folder_that_does_not_exist_says_so(tmp_path):
    assert_one_line_error(run_cli("evaluate.py", "score", tmp_path / "nowhere"), tmp_path / "nowhere", "does not exist")

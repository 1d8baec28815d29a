"""Bad inputs give a one-line `error: ...` naming the file, never a traceback, and destroy nothing.

Every case works on a copy of the shared fixtures.
"""
import hashlib
import json
import shutil

import pytest

import data
from conftest import TRAIN_STEPS, assert_one_line_error, run_cli


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def data_copy(shapes_data, tmp_path):
    return shutil.copytree(shapes_data, tmp_path / "shapes")


def verify_cli(root, tmp_path):
    return run_cli("data.py", "verify", root)


def train_cli(root, tmp_path):
    return run_cli("train_dit.py", "--config", "shapes-cpu", "--data", root, "--out", tmp_path / "run",
                   "--max-steps", 1, "--batch-size", 8)


CLIS = {"verify": verify_cli, "train": train_cli}


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_corrupt_shard_is_a_checksum_error_naming_the_file(cli, shapes_data, data_copy, tmp_path):
    shard = data_copy / "shard_00001.latents.npy"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    last = assert_one_line_error(CLIS[cli](data_copy, tmp_path), shard)
    assert "sha256" in last or "checksum" in last
    assert shard.read_bytes() == bytes(blob)  # the bad file is reported, not removed or rewritten
    data.verify_files(shapes_data, data.read_manifest(shapes_data))  # the original is untouched


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_missing_shard_is_an_error_naming_the_file(cli, data_copy, tmp_path):
    shard = data_copy / "shard_00002.captions.npy"
    shard.unlink()
    last = assert_one_line_error(CLIS[cli](data_copy, tmp_path), shard)
    assert "missing" in last


def test_verify_accepts_intact_data(data_copy):
    result = run_cli("data.py", "verify", data_copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def without_include(path, line):
    """Rewrite `path` (a metadata jsonl) with the `include` field removed on 1-based `line`."""
    rows = path.read_text().splitlines()
    row = json.loads(rows[line - 1])
    del row["include"]
    rows[line - 1] = json.dumps(row)
    path.write_text("\n".join(rows) + "\n")


def test_prompt_without_include_is_an_error_naming_file_and_line_for_sample(shapes_data, trained_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    data.write_metadata(prompts, data.read_metadata(shapes_data / "eval_metadata.jsonl")[:3])
    without_include(prompts, 2)
    ckpt = trained_run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt"
    result = run_cli("sample.py", ckpt, "--prompts", prompts, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{prompts}:2", "include")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def truth_copy(truth_renders, tmp_path):
    """The first three prompt folders of the truth renders."""
    out = tmp_path / "samples"
    for i in range(3):
        shutil.copytree(truth_renders / f"{i:05d}", out / f"{i:05d}")
    return out


def test_prompt_without_include_is_an_error_naming_file_and_line_for_score(truth_copy):
    metadata = truth_copy / "00001" / "metadata.jsonl"
    without_include(metadata, 1)
    assert_one_line_error(run_cli("evaluate.py", "score", truth_copy), f"{metadata}:1", "include")


@pytest.mark.parametrize("prompt,image", [(1, 2), (2, 3), (0, 3)], ids=["middle", "last", "last-of-first-prompt"])
def test_score_with_a_missing_image_names_it(truth_copy, prompt, image):
    missing = truth_copy / f"{prompt:05d}" / "samples" / f"{image:04d}.png"
    missing.unlink()
    assert_one_line_error(run_cli("evaluate.py", "score", truth_copy), missing)
    assert not (truth_copy / "scores.json").exists()


@pytest.mark.parametrize("flag,value", [("--patch-size", "4"), ("--prediction", "velocity")])
def test_resume_from_another_model_config_is_an_error(flag, value, shapes_data, trained_run, tmp_path):
    ckpt = shutil.copy(trained_run / "checkpoints" / "ckpt_0000010.pt", tmp_path / "ckpt.pt")
    before = sha256(ckpt)
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "run",
                     "--max-steps", 1, "--batch-size", 8, "--resume", ckpt, flag, value)
    assert_one_line_error(result, ckpt, flag.lstrip("-").replace("-", "_"))
    assert sha256(ckpt) == before
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


@pytest.fixture
def checkpoint_with_a_missing_weight(trained_run, tmp_path):
    """A checkpoint whose weights miss one tensor, as after an edit of model.py between runs."""
    import model
    ckpt = model.load_checkpoint(trained_run / "checkpoints" / "ckpt_0000010.pt")
    for weights in ("model", "ema"):
        del ckpt[weights]["text_embed.pos"]
    path = tmp_path / "edited.pt"
    model.save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize("cli", ["train", "sample"])
def test_checkpoint_whose_weights_do_not_fit_is_a_one_line_error(cli, checkpoint_with_a_missing_weight,
                                                                 shapes_data, tmp_path):
    ckpt = checkpoint_with_a_missing_weight
    if cli == "train":
        result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "run",
                         "--max-steps", 11, "--batch-size", 8, "--resume", ckpt)
    else:
        prompts = tmp_path / "one.jsonl"
        data.write_metadata(prompts, data.read_metadata(shapes_data / "eval_metadata.jsonl")[:1])
        result = run_cli("sample.py", ckpt, "--prompts", prompts, "--images-per-prompt", 1, "--out", tmp_path / "s")
    assert_one_line_error(result, ckpt, "text_embed.pos")


def test_training_into_a_folder_with_checkpoints_is_refused(shapes_data, trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", run,
                     "--max-steps", 1, "--batch-size", 8)
    assert_one_line_error(result, run / "checkpoints", "--resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("cli,flag,value", [("sample", "--time-shift", "0"), ("sample", "--time-shift", "-2"),
                                            ("sample", "--per-tag", "0"), ("curve", "--batch-size", "0")])
def test_nonpositive_sampling_numbers_are_refused_before_any_work(cli, flag, value, trained_run, tmp_path):
    # A zero time shift would collapse the 100 steps onto t = 0; zero prompts per tag would score nothing.
    run = shutil.copytree(trained_run, tmp_path / "run")  # curve writes into the run: a copy keeps the fixture clean
    ckpt = run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt"
    argv = ("sample.py", ckpt) if cli == "sample" else ("evaluate.py", "curve", run)
    result = run_cli(*argv, flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(f"argument {flag}: must be > 0, got {value}")
    assert not (run / "samples").exists() and not (run / "curve.json").exists()

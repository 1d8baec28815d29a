"""sample.py: GenEval's output layout, determinism, and exactly NFE = 100 evaluations per image."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import model
import sample
from conftest import REPO, TRAIN_STEPS, run_cli

IMAGES_PER_PROMPT = 2


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt"


@pytest.fixture(scope="module")
def prompts_file(shapes_data, tmp_path_factory):
    """Three eval prompts of different tags."""
    prompts = data.read_metadata(shapes_data / "eval_metadata.jsonl")
    path = tmp_path_factory.mktemp("prompts") / "three.jsonl"
    data.write_metadata(path, [prompts[0], prompts[400], prompts[500]])
    return path


def run_sampler(checkpoint, prompts_file, out, seed=0):
    result = run_cli("sample.py", checkpoint, "--out", out, "--prompts", prompts_file,
                     "--images-per-prompt", IMAGES_PER_PROMPT, "--seed", seed)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def samples(checkpoint, prompts_file, tmp_path_factory):
    return run_sampler(checkpoint, prompts_file, tmp_path_factory.mktemp("samples") / "s0")


def test_sampler_writes_geneval_layout(samples, prompts_file):
    prompts = data.read_metadata(prompts_file)
    assert sorted(p.name for p in samples.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]
    for i, prompt in enumerate(prompts):
        folder = samples / f"{i:05d}"
        assert data.read_metadata(folder / "metadata.jsonl") == [prompt]
        names = sorted(p.name for p in (folder / "samples").iterdir())
        assert names == [f"{j:04d}.png" for j in range(IMAGES_PER_PROMPT)]
        images = [np.asarray(Image.open(folder / "samples" / n)) for n in names]
        assert all(im.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and im.dtype == np.uint8 for im in images)
        grid = np.asarray(Image.open(folder / "grid.png"))
        np.testing.assert_array_equal(grid, np.concatenate(images, axis=1))  # two columns, one row
    info = json.loads((samples / "sampling.json").read_text())
    assert info["nfe"] == sample.NFE == 100
    assert info["step"] == TRAIN_STEPS
    assert info["sample_py_sha256"] == hashlib.sha256((REPO / "sample.py").read_bytes()).hexdigest()
    assert len(evaluate.read_sample_folder(samples)) == 3  # the scorer reads it back
    assert set(info["seconds"]) == {"denoise", "decode", "write"}  # what the point cost, stage by stage
    assert info["seconds"]["denoise"] > 0 and all(v >= 0 for v in info["seconds"].values())


@pytest.mark.parametrize("n, batch, ranks, size", [(2212, 256, 1, 246), (2212, 256, 8, 139), (2212, 256, 2, 222),
                                                   (6, 2, 1, 2), (6, 2, 2, 2), (5, 8, 1, 5), (3, 4, 8, 1)])
def test_batches_are_equal_and_as_many_on_every_rank(n, batch, ranks, size):
    assert sample.even_batch_size(n, batch, ranks) == size
    per_rank = [len(range(r * size, n, ranks * size)) for r in range(ranks)]  # Sampler.images' deal
    covered = sorted(k for r in range(ranks) for start in range(r * size, n, ranks * size)
                     for k in range(start, min(start + size, n)))
    assert covered == list(range(n))  # every image once
    assert size <= batch and max(per_rank) == -(-n // (ranks * batch))  # no more rounds than full batches need
    assert max(per_rank) - min(per_rank) <= 1


def test_sampler_is_deterministic(samples, checkpoint, prompts_file, tmp_path):
    again = run_sampler(checkpoint, prompts_file, tmp_path / "again")
    pngs = sorted(p.relative_to(samples) for p in samples.rglob("*.png"))
    assert len(pngs) == 3 * (IMAGES_PER_PROMPT + 1)
    assert pngs == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for rel in pngs:
        assert (samples / rel).read_bytes() == (again / rel).read_bytes(), rel


class CountingForward:
    """Wraps the real model's forward, recording each evaluation's batch, times and caption rows, and each caption
    encoding's drops."""

    def __init__(self, forward):
        self.forward, self.calls, self.drops = forward, [], []

    def encode_text(self, tokens, pooled, drop):
        self.drops.append(drop.tolist())
        return self.forward.encode_text(tokens, pooled, drop)

    def __call__(self, x, t, tokens, pooled, drop=None, text=None):
        self.calls.append((len(x), t.clone(), len(text[0])))
        return self.forward(x, t, tokens, pooled, drop, text=text)


SETTINGS = {"cfg_scale": 6.0, "cfg_interval": (0.3, 1.0), "time_shift": 1.0, "sample_weights": "ema"}


def make_sampler(shapes_data, prompts, cfg_interval=(0.3, 1.0), **kwargs):
    manifest = data.read_manifest(shapes_data)
    return sample.Sampler(manifest, prompts, data.text_encoder_from_manifest(manifest),
                          {**SETTINGS, "cfg_interval": cfg_interval}, "cpu", **kwargs)


def test_sampler_takes_exactly_nfe_evaluations_per_image(shapes_data, checkpoint):
    prompts = data.read_metadata(shapes_data / "eval_metadata.jsonl")[:1]
    sampler = make_sampler(shapes_data, prompts, images_per_prompt=3, batch_size=2,  # chunks of 2 and 1
                           cfg_interval=(0.0, 1.0))  # guidance at every step (the default skips t < 0.3)
    sampler.load(checkpoint)
    sampler.forward = counter = CountingForward(sampler.forward)
    images = sampler.images()
    assert sorted(images) == [(0, 0), (0, 1), (0, 2)]
    sizes = [size for size, _, _ in counter.calls]
    # Conditional and unconditional branches share one evaluation: 2 rows per image.
    assert sizes == [4] * sample.NFE + [2] * sample.NFE
    assert sum(sizes) == 2 * sample.NFE * len(images)
    assert all(size == captions for size, _, captions in counter.calls)
    # The captions are encoded once per batch, the second half of each with the null caption.
    assert counter.drops == [[False] * 2 + [True] * 2, [False, True]]
    times = [float(t[0]) for _, t, _ in counter.calls[:sample.NFE]]
    np.testing.assert_allclose(times, np.linspace(1, 0, sample.NFE + 1)[:-1], atol=1e-6)


def test_sampler_noise_depends_on_seed_prompt_and_index(shapes_data, checkpoint):
    shape = (3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert torch.equal(sample.image_noise(shape, 0, 1, 2), sample.image_noise(shape, 0, 1, 2))
    for other in [(1, 1, 2), (0, 2, 2), (0, 1, 3)]:
        assert not torch.equal(sample.image_noise(shape, 0, 1, 2), sample.image_noise(shape, *other))
    prompts = data.read_metadata(shapes_data / "eval_metadata.jsonl")[:1]
    by_seed = []
    for seed in (0, 1):
        sampler = make_sampler(shapes_data, prompts, images_per_prompt=1, seed=seed)
        sampler.load(checkpoint)
        by_seed.append(sampler.images()[0, 0])
    assert not np.array_equal(*by_seed)


def test_the_sampler_settings_are_the_runs_recipe_and_a_flag_overrides_one(checkpoint, prompts_file, tmp_path):
    recipe = model.load_checkpoint(checkpoint)["hparams"]
    info = json.loads((run_sampler(checkpoint, prompts_file, tmp_path / "recipe") / "sampling.json").read_text())
    assert (info["cfg_scale"], info["cfg_interval"], info["time_shift"], info["weights"]) == (
        recipe["cfg_scale"], list(recipe["cfg_interval"]), recipe["time_shift"], recipe["sample_weights"])
    result = run_cli("sample.py", checkpoint, "--out", tmp_path / "flag", "--prompts", prompts_file,
                     "--images-per-prompt", 1, "--cfg-scale", 2.5, "--weights", "model")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "flag" / "sampling.json").read_text())
    assert (info["cfg_scale"], info["weights"], info["time_shift"]) == (2.5, "model", recipe["time_shift"])

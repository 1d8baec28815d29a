"""ImageNet track, offline: a generated fake ImageNet tree, a tiny random-init AutoencoderKL and text tower.

The tree has three real synsets; JPEG and PNG; a corrupt file, a grayscale, a CMYK and a palette
image; odd sizes, some smaller than 256 and one large enough for ADM's box-halving.
"""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import data
from conftest import TINY_TEXT, assert_one_line_error, run_cli

SYNSETS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark
TINY_VAE = dict(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SHARD_SIZE = 5


def make_tree(root):
    rng = np.random.default_rng(0)
    sizes = [(300, 200), (180, 120), (256, 256), (640, 530), (97, 301)]
    for s, synset in enumerate(SYNSETS):
        folder = root / synset
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{synset}_{i}.{'JPEG' if i % 2 else 'png'}")
    odd = root / SYNSETS[0]
    Image.fromarray(rng.integers(0, 256, (150, 210), dtype=np.uint8), "L").save(odd / "gray.JPEG")
    Image.fromarray(rng.integers(0, 256, (220, 260, 3), dtype=np.uint8)).convert("CMYK").save(odd / "cmyk.JPEG")
    Image.fromarray(rng.integers(0, 256, (240, 200, 3), dtype=np.uint8)).convert("P").save(odd / "palette.png")
    (odd / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


def prep(src, out, *extra):
    return run_cli("data.py", "imagenet", "--src", src, "--out", out, "--shard-size", SHARD_SIZE,
                   "--batch-size", 4, "--workers", 2, "--vae-config", json.dumps(TINY_VAE),
                   "--text-model", "ViT-B-32", "--text-pretrained", "", "--text-overrides", json.dumps(TINY_TEXT),
                   *extra)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet") / "train")


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet_shards") / "imagenet"
    result = prep(tree, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_readable_image_is_encoded_with_its_flip_and_the_corrupt_one_is_listed(shards, tree):
    manifest = data.read_manifest(shards)
    assert manifest["count"] == 3 * 5 + 3  # grayscale, CMYK and palette converted, not skipped
    assert manifest["skipped_count"] == 1
    assert manifest["skipped"][0]["path"] == f"{SYNSETS[0]}/corrupt.JPEG"
    latents = np.concatenate([np.load(shards / s["latents"]["file"]) for s in manifest["shards"]])
    assert latents.shape == (18, 2, 4, 32, 32) and latents.dtype == np.float16


def test_flip_view_is_the_encoding_of_the_mirrored_image(shards, tree):
    manifest = data.read_manifest(shards)
    latent = manifest["latent"]
    vae = data.VAEAutoencoder(config=latent["autoencoder_config"], seed=latent["autoencoder_seed"])
    paths = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    first = paths[0]  # shard 0, row 0 (the corrupt file sorts later)
    image, _ = data.load_imagenet_image(tree / first)
    direct = vae.encode(np.stack([image, image[:, ::-1]])).numpy()
    stored = np.load(shards / manifest["shards"][0]["latents"]["file"])[0].astype(np.float32)
    np.testing.assert_allclose(stored, direct, atol=2e-3, rtol=1e-2)
    assert not np.allclose(stored[0], stored[1], atol=1e-3)


def test_manifest_statistics_are_the_per_channel_mean_and_std_of_all_views(shards):
    manifest = data.read_manifest(shards)
    z = np.concatenate([np.load(shards / s["latents"]["file"]) for s in manifest["shards"]]).astype(np.float64)
    np.testing.assert_allclose(manifest["latent"]["mean"], z.mean(axis=(0, 1, 3, 4)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(manifest["latent"]["std"], z.std(axis=(0, 1, 3, 4)), rtol=1e-5)


def test_loader_normalises_and_picks_the_flip_per_sample_by_the_seeded_order(shards):
    dataset = data.ShardDataset(shards)
    idx = data.global_batch_indices(len(dataset), 0, 0, len(dataset))
    views = data.global_batch_views(len(dataset), dataset.views, 0, 0, idx)
    assert set(views.tolist()) == {0, 1}
    raw = dataset.gather(idx, views)["latents"].astype(np.float32)
    z = np.concatenate([np.load(shards / s["latents"]["file"]) for s in dataset.manifest["shards"]])
    np.testing.assert_array_equal(raw, z[idx, views].astype(np.float32))
    loader = data.Loader(dataset, batch_size=len(dataset), seed=0)
    latents = next(loader)[0]
    loader.close()
    assert abs(latents.mean().item()) < 1e-3 and abs(latents.std().item() - 1) < 1e-2


def test_killed_prep_restarts_at_the_first_unfinished_shard(tree, shards, tmp_path):
    out = tmp_path / "imagenet"
    shutil.copytree(shards, out)
    for name in ("manifest.json", "shard_00002.done.json", "shard_00003.done.json", "shard_00003.latents.npy"):
        (out / name).unlink()
    kept = {k: (out / f"shard_{k:05d}.latents.npy").stat().st_mtime_ns for k in (0, 1)}
    result = prep(tree, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 3/4 done" in result.stdout and "shard 1/4 done" not in result.stdout
    assert kept == {k: (out / f"shard_{k:05d}.latents.npy").stat().st_mtime_ns for k in (0, 1)}
    for name in [p.name for p in shards.iterdir()]:
        if name.endswith(".npy"):
            assert (out / name).read_bytes() == (shards / name).read_bytes(), name


def test_captions_file_missing_images_is_one_error_with_count_and_paths(tree, tmp_path):
    captions = tmp_path / "captions.jsonl"
    rows = [{"path": f"{s}/{s}_{i}.{'JPEG' if i % 2 else 'png'}", "caption": f"photo {i}"}
            for s in SYNSETS for i in range(5)]
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = prep(tree, tmp_path / "out", "--captions", captions)
    last = assert_one_line_error(result, captions, "4 images have no caption")
    assert f"{SYNSETS[0]}/cmyk.JPEG" in last
    captions.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"path": "x"}) + "\n")
    assert_one_line_error(prep(tree, tmp_path / "out", "--captions", captions), f"{captions}:2", "caption")


def test_captions_file_gives_each_image_its_caption(tree, tmp_path):
    captions = tmp_path / "captions.jsonl"
    paths = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    captions.write_text("\n".join(json.dumps({"path": p, "caption": f"a picture numbered {i}"})
                                  for i, p in enumerate(paths)) + "\n")
    out = tmp_path / "out"
    assert prep(tree, out, "--captions", captions).returncode == 0
    dataset = data.ShardDataset(out)
    table = json.loads((out / "captions.json").read_text())
    kept = [p for p in paths if p != f"{SYNSETS[0]}/corrupt.JPEG"]
    assert [table[i] for i in dataset.caption_ids] == [f"a picture numbered {paths.index(p)}" for p in kept]


def test_default_captions_are_class_templates_chosen_by_seed(shards):
    table = json.loads((shards / "captions.json").read_text())
    dataset = data.ShardDataset(shards)
    captions = [table[i] for i in dataset.caption_ids]
    assert all(("tench" in c) for c in captions[:8])  # the first synset's images (corrupt one skipped)
    assert len(set(captions)) > 3  # templates vary per image


def test_unreachable_vae_names_the_model_and_the_fix(tree, tmp_path):
    result = run_cli("data.py", "imagenet", "--src", tree, "--out", tmp_path / "o", "--vae", tmp_path / "no-such-vae",
                     "--text-model", "ViT-B-32", "--text-pretrained", "", "--text-overrides", json.dumps(TINY_TEXT))
    last = assert_one_line_error(result, "no-such-vae")
    assert "--vae" in last


def test_training_steps_and_100_nfe_sampling_run_on_imagenet_shards(shards, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train_dit.py", "--config", "imagenet", "--data", shards, "--out", run, "--hidden", 128, "--depth", 4, "--heads", 4,
                     "--batch-size", 4, "--max-steps", 3, "--log-every", 1, "--compile", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = tmp_path / "p.jsonl"
    data.write_metadata(prompts, [{"tag": "single_object", "prompt": "a photo of a goldfish",
                                   "include": [{"class": "goldfish", "count": 1}]}])
    result = run_cli("sample.py", run, "--prompts", prompts, "--images-per-prompt", 1, "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr[-3000:]
    image = Image.open(tmp_path / "s" / "00000" / "samples" / "0000.png")
    assert image.size == (256, 256) and image.mode == "RGB"

"""The ImageNet rehearsal: `data.py rehearsal --tiny` fabricates offline what the hubs would give (an
ImageNet-layout tree with odd files, random-init weights of the real model classes in the hubs' file
layouts), and the real loaders, prep, trainer, sampler and scorer run on it unchanged.

The fixtures (`rehearsal`, `rehearsal_shards`, the trained and scored runs) and the helpers that build the
other programs' command lines are in conftest.py: the records tests use them too.
"""
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import model
import record
import train_dit
from conftest import REHEARSAL_SHARD_SIZE, REHEARSAL_TAGS, REPO, logged_losses, prep_args, run_cli, train_cli

# -----------------------------------------------------------------------------
# Fabrication


def test_tiny_rehearsal_has_the_imagenet_layout_and_the_odd_files(rehearsal):
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    synsets = {info.index_to_label_name(i) for i in range(info.num_classes())}
    train = rehearsal["root"] / "train"
    folders = sorted(p.name for p in train.iterdir())
    assert folders == sorted(rehearsal["synsets"]) and len(folders) == 4 and set(folders) <= synsets
    files = sorted(p for p in train.rglob("*") if p.is_file())
    regular = [p for p in files if "_odd_" not in p.name]
    assert len(regular) == rehearsal["images"] == 40
    sizes = set()
    for p in regular:
        with Image.open(p) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) > 20 and len({w > h for w, h in sizes}) == 2  # varied sizes, both orientations
    odd = rehearsal["odd"]
    assert sorted(odd) == sorted(p.relative_to(train).as_posix() for p in files if "_odd_" in p.name)
    kinds = {}
    for rel in odd:
        try:
            with Image.open(train / rel) as image:
                kinds[rel.split("_odd_")[1]] = (image.format, image.mode)
        except OSError:
            kinds[rel.split("_odd_")[1]] = None
    assert kinds["grey.JPEG"] == ("JPEG", "L") and kinds["cmyk.JPEG"] == ("JPEG", "CMYK")
    assert kinds["palette_png.JPEG"] == ("PNG", "P") and kinds["rgba_png.JPEG"] == ("PNG", "RGBA")
    assert kinds["empty.JPEG"] is None and kinds["notes.txt"] is None and kinds["html.JPEG"] is None
    assert (train / next(r for r in odd if r.endswith("empty.JPEG"))).stat().st_size == 0
    assert sorted(r.split("_odd_")[1] for r, e in odd.items() if e == "skipped") == [
        "empty.JPEG", "html.JPEG", "notes.txt", "truncated.JPEG"]


def test_weight_folders_have_the_hub_file_layouts(rehearsal):
    w = rehearsal["weights"]
    assert {p.name for p in (rehearsal["root"] / "weights" / "sd-vae-ft-ema").iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors"}
    assert {"config.json", "model.safetensors"} <= set(os.listdir(w["detector"]))
    config = json.loads((rehearsal["root"] / "weights" / "mask2former-swin-small-coco-instance" / "config.json")
                        .read_text())
    assert [config["id2label"][str(i)] for i in range(80)] == list(data.COCO_CLASSES)
    assert set(os.listdir(w["clip_folder"])) == {"open_clip_config.json", "open_clip_pytorch_model.bin"}
    assert json.loads((rehearsal["root"] / "weights" / data.REHEARSAL_CLIP / "open_clip_config.json").read_text())[
        "model_cfg"]["quick_gelu"] is True
    for flag in ("--vae", "--text-model", "--detector", "--clip-model", "--clip-pretrained"):
        assert flag in " ".join(rehearsal["commands"].values())
    assert rehearsal["commands"]["prep"] in rehearsal["stdout"]


def test_full_size_configs_are_the_real_architectures(tmp_path):
    """The full rehearsal's models, built on the meta device: the parameter counts of the real checkpoints."""
    from diffusers import AutoencoderKL
    import open_clip
    with torch.device("meta"):
        vae = AutoencoderKL(**data.SD_VAE_FT_EMA)
        clip = open_clip.create_model(data.DEFAULT_TEXT_MODEL, device="meta")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-ema
    assert sum(p.numel() for p in clip.parameters()) == 427_616_513  # OpenAI ViT-L/14
    assert clip.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    commands = data.rehearsal_commands(tmp_path, tiny=False)
    clip_file = str(tmp_path / "weights" / data.REHEARSAL_CLIP / data.OPEN_CLIP_FILE)
    assert f"--text-pretrained {clip_file}" in commands["prep"]
    assert f"--clip-pretrained {clip_file}" in commands["score_flags"]
    assert "local-dir:" not in " ".join(commands.values())


# -----------------------------------------------------------------------------
# The pipeline's own loaders read the local folders


def test_local_weights_load_through_the_pipelines_loaders(rehearsal):
    from safetensors.torch import load_file
    w = rehearsal["weights"]
    vae = data.VAEAutoencoder(w["vae"])
    saved = load_file(os.path.join(w["vae"], "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(vae.vae.encoder.conv_in.weight, saved["encoder.conv_in.weight"])
    state = torch.load(w["clip_file"], weights_only=True)
    # the tiny tower by its folder (what the printed commands use), and by name + overrides + checkpoint file
    # (the path real weights take: --text-pretrained FILE)
    overrides = {k: v for k, v in data.TINY_OPEN_CLIP.items() if k != "quick_gelu"}
    for name, pretrained, extra in ((f"local-dir:{w['clip_folder']}", None, None),
                                    (data.DEFAULT_TEXT_MODEL, w["clip_file"], overrides)):
        encoder = data.TextEncoder(name, pretrained, overrides=extra)
        torch.testing.assert_close(encoder.model.token_embedding.weight, state["token_embedding.weight"])
        tokens, pooled = encoder.encode(["a photo of a tench."])
        assert tokens.shape == (1, 77, 64) and pooled.shape == (1, 32)
    detector = evaluate.load_mask2former(w["detector"], None, "cpu")
    saved = load_file(os.path.join(w["detector"], "model.safetensors"))
    key = next(k for k in saved if k.endswith("class_predictor.weight"))
    torch.testing.assert_close(detector.state_dict()[key], saved[key])
    assert detector.config.num_labels == 80
    for name, pretrained, extra in ((f"local-dir:{w['clip_folder']}", "", None),
                                    (data.DEFAULT_TEXT_MODEL, w["clip_file"], json.dumps(overrides))):
        model, transform, tokenizer = evaluate.load_clip(name, pretrained, extra, "cpu")
        torch.testing.assert_close(model.visual.conv1.weight, state["visual.conv1.weight"])


# -----------------------------------------------------------------------------
# Prep on the rehearsal tree


def test_prep_lists_every_unreadable_file_with_its_reason_and_encodes_the_rest(rehearsal, rehearsal_shards):
    manifest = data.read_manifest(rehearsal_shards)
    odd = rehearsal["odd"]
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == sorted(p for p, expect in odd.items() if expect == "skipped")
    assert manifest["skipped_count"] == len(skipped) == 4
    assert all(reason.startswith("unreadable: ") for reason in skipped.values())
    assert "truncated" in skipped[next(p for p in skipped if p.endswith("truncated.JPEG"))]
    kept = sum(expect == "kept" for expect in odd.values())
    assert manifest["count"] == rehearsal["images"] + kept
    assert [s["count"] for s in manifest["shards"]] == [15, 15, 15, 1]  # 50 files, 16 per shard, 4 skipped
    assert manifest["text"]["name"].startswith("local-dir:")
    assert manifest["latent"]["autoencoder"] == rehearsal["weights"]["vae"]
    data.ShardDataset(rehearsal_shards, verify="full")


def reference_shard(vae, root, paths, batch_size):
    """The prep as it was before it streamed (threads decode the whole shard, then batch by batch)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(data.load_imagenet_image, [root / p for p in paths]))
    images = [image for image, _ in loaded if image is not None]
    latents = []
    for start in range(0, len(images), batch_size):
        batch = np.stack(images[start:start + batch_size])
        pair = vae.encode(np.concatenate([batch, batch[:, :, ::-1]]))
        latents.append(torch.stack(pair.chunk(2), dim=1).numpy().astype(np.float16))
    return np.concatenate(latents)


def test_streamed_prep_gives_the_same_latents_as_the_old_prep(rehearsal, rehearsal_shards):
    paths, _ = data.list_imagenet(rehearsal["root"] / "train")
    vae = data.VAEAutoencoder(rehearsal["weights"]["vae"])
    batch_size = int(shlex.split(rehearsal["commands"]["prep"])[
        shlex.split(rehearsal["commands"]["prep"]).index("--batch-size") + 1])
    size = REHEARSAL_SHARD_SIZE
    for k in (0, 3):
        expected = reference_shard(vae, rehearsal["root"] / "train", paths[k * size:(k + 1) * size], batch_size)
        stored = np.load(rehearsal_shards / f"shard_{k:05d}.latents.npy")
        assert stored.dtype == expected.dtype and stored.shape == expected.shape
        assert stored.tobytes() == expected.tobytes(), f"shard {k}"


def test_killed_prep_resumes_at_the_first_unfinished_shard(rehearsal, rehearsal_shards, tmp_path):
    out = tmp_path / "shards"
    process = subprocess.Popen([sys.executable, *map(str, prep_args(rehearsal, out, "--workers", "1"))], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # After the first shard (whose wait includes loading the models) the tiny shards take tens of ms each: the
        # prep is frozen as soon as the first is done, and the shards done then are the ones the resume must skip.
        deadline = time.time() + 120
        while not (out / "shard_00000.done.json").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGSTOP)
        done_at_kill = {int(p.name[6:11]) for p in out.glob("shard_*.done.json")}
        assert 0 in done_at_kill and 3 not in done_at_kill and process.poll() is None, done_at_kill
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the prep and its decode workers, mid-shard
        process.wait()
    assert not (out / "manifest.json").exists()
    result = run_cli(*prep_args(rehearsal, out))
    assert result.returncode == 0, result.stderr[-3000:]
    for shard in range(4):  # exactly the shards unfinished at the kill are encoded again
        assert (f"shard {shard + 1}/4 done" in result.stdout) == (shard not in done_at_kill), (shard, done_at_kill)
    for name in sorted(p.name for p in rehearsal_shards.iterdir()
                       if p.suffix == ".npy" or p.name.endswith("done.json")):
        assert (out / name).read_bytes() == (rehearsal_shards / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))


def test_an_all_unreadable_shard_is_written_empty_and_listed(rehearsal, tmp_path):
    src = tmp_path / "train" / rehearsal["synsets"][0]
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"bad_{i}.JPEG").write_bytes(b"" if i else b"not an image")
    Image.fromarray(np.zeros((300, 260, 3), np.uint8)).save(src / "z_good.JPEG")
    w = rehearsal["weights"]
    result = run_cli("data.py", "imagenet", "--src", tmp_path / "train", "--out", tmp_path / "o", "--vae", w["vae"],
                     "--text-model", f"local-dir:{w['clip_folder']}", "--text-pretrained", "", "--shard-size", 3,
                     "--workers", 0, "--batch-size", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = data.read_manifest(tmp_path / "o")
    assert [s["count"] for s in manifest["shards"]] == [0, 1] and manifest["skipped_count"] == 3


# -----------------------------------------------------------------------------
# bench-prep and the whole loop


def test_bench_prep_prints_decode_encode_and_end_to_end_rows_on_the_cpu(rehearsal):
    args = shlex.split(rehearsal["commands"]["bench"])[2:]
    args = args[:args.index("--batch-sizes")] + ["--batch-sizes", "4", "--workers", "0", "1", "--variants", "eager",
                                                 "--images", "12", "--encode-images", "8"]
    result = run_cli("data.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    stages = [line.split("|")[1].strip() for line in table[2:]]  # after the header and the rule
    assert stages == ["decode", "decode", "encode", "end-to-end", "end-to-end", "text"], result.stdout
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    assert {"img/s", "GFLOP/img", "GPU peak GiB", "host peak GiB", "waited for decode s"} <= set(header)
    for line in table[2:]:
        cells = dict(zip(header, (c.strip() for c in line.split("|")[1:-1])))
        assert float(cells["img/s"].replace(",", "")) > 0
        if cells["stage"] in ("decode", "end-to-end"):
            assert float(cells["host peak GiB"]) > 0


@pytest.mark.parametrize("config", ["imagenet", "imagenet-vanilla"])
def test_both_imagenet_configs_train_a_few_steps_on_the_rehearsal_shards(config, rehearsal_shards, rehearsal_run,
                                                                          tmp_path):
    # each config's own recipe (optimizer, caption blocks, times, EMA, ...) with only its model shrunk
    if config == "imagenet":
        run = rehearsal_run  # the records tests' run: trained once
    else:
        run = tmp_path / "run"
        result = run_cli(*train_cli(rehearsal_shards, run, config))
        assert result.returncode == 0, result.stderr[-3000:]
    losses = logged_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(float(v)) for v in losses.values())
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_0000001.pt", "ckpt_0000002.pt"]
    logged = record.log_hyperparameters(record.log_sections((run / "log.txt").read_text()))
    overridden = {"data", "out", "hidden", "depth", "heads", "batch_size", "max_steps", "log_every", "compile",
                  "ckpt_every_seconds"}
    recipe = json.loads(json.dumps(dataclasses.asdict(train_dit.CONFIGS[config])))  # tuples as the log's lists
    assert {k: v for k, v in logged.items() if k not in overridden} == {
        k: v for k, v in recipe.items() if k not in overridden}
    assert (logged["hidden"], logged["depth"], logged["heads"]) == (64, 2, 2)
    ckpt = model.load_checkpoint(run / "checkpoints" / "ckpt_0000002.pt")
    assert ckpt["step"] == 2 and ckpt["model_config"]["depth"] == 2


def test_whole_loop_on_the_tiny_rehearsal(rehearsal_run, rehearsal_scored_run):
    # the trained run's checkpoints, each sampled at 100 NFE and scored by the rehearsal's Mask2Former and CLIP
    ckpts = sorted((rehearsal_run / "checkpoints").glob("ckpt_*.pt"))
    assert len(ckpts) == 2
    points = json.loads((rehearsal_scored_run / "curve.json").read_text())
    assert [p["step"] for p in points] == [1, 2]
    assert all(p["nfe"] == 100 and p["geneval_metric"] == "geneval-m2f" and 0 <= p["overall"] <= 1 for p in points)
    for p in points:
        folder = rehearsal_scored_run / "samples" / f"ckpt_{p['step']:07d}"
        tags = [json.loads((d / "metadata.jsonl").read_text())["tag"] for d in sorted(folder.glob("0000?"))]
        assert tags == list(REHEARSAL_TAGS)
        assert json.loads((folder / "scores.json").read_text())["overall"] == p["overall"]

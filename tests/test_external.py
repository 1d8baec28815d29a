"""The external-module track: REPA-style alignment to a frozen encoder's patch features, precomputed into the shards.

No pretrained encoder is reachable offline: every test runs on a seeded random-init, tiny timm ViT of DINOv2's class,
saved in the hub's folder layout and loaded by the path the pretrained weights take. It tests the plumbing (the
loss, the loading, the shards, the trainer, the records' guard), not what alignment to DINOv2 buys.
"""
import gzip
import json
import math
import re
import shutil

import numpy as np
import pytest
import timm
import torch

import data
import model
import record
from conftest import N_TRAIN, SHARD_SIZE, TINY_TEXT, assert_one_line_error, logged_losses, run_cli
from test_imagenet import make_tree, prep

TINY_ENCODER = dict(embed_dim=32, depth=1, num_heads=2, img_size=56)  # DINOv2-B's class, 32 wide, one block
ALIGN = ("--align-weight", 0.5, "--align-depth", 2, "--projector-width", 64)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "dinov2-tiny"
    data.save_random_encoder(folder, data.DEFAULT_ENCODER, TINY_ENCODER, seed=0)
    return folder


@pytest.fixture(scope="module")
def aligned_data(encoder_dir, tmp_path_factory):
    """The tiny Shapes data set with the encoder's features on the 8x8 grid of patch 8 (64 image tokens)."""
    out = tmp_path_factory.mktemp("data") / "shapes-features"
    data.build_shapes(out, n_train=N_TRAIN, seed=0, shard_size=SHARD_SIZE, workers=1, text_overrides=TINY_TEXT,
                      feature_encoder=data.FeatureEncoder(f"local-dir:{encoder_dir}", grid=8), log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def aligned_run(aligned_data, tmp_path_factory):
    """Four steps of shapes-cpu with alignment after block 2 of 4, a checkpoint every two."""
    out = tmp_path_factory.mktemp("runs") / "aligned"
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", aligned_data, "--out", out, "--max-steps", 4,
                     "--log-every", 2, "--batch-size", 8, "--ckpt-every-seconds", 0.0001, *ALIGN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_alignment_loss_is_minus_the_mean_cosine_with_the_hand_computed_gradient():
    from train_dit import alignment_loss
    projected = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]], requires_grad=True)  # one image, two tokens
    features = torch.tensor([[[4.0, 3.0], [0.0, 2.0]]])
    loss = alignment_loss(projected, features)
    assert loss.item() == pytest.approx(-(24 / 25 + 0) / 2)  # cosines 0.96 and 0, averaged, negated
    loss.backward()
    # d cos / d p = f / (|p| |f|) - cos p / |p|^2, times -1/2 (the mean over two tokens):
    # token 1: (0.16, 0.12) - 0.96 (3, 4) / 25 = (0.0448, -0.0336); token 2: (0, 1) - 0 (1, 0) = (0, 1)
    torch.testing.assert_close(projected.grad, torch.tensor([[[-0.0224, 0.0168], [0.0, -0.5]]]))
    assert alignment_loss(5 * projected.detach(), 0.1 * features).item() == pytest.approx(-0.48)  # scale-free
    assert alignment_loss(features, 2 * features).item() == pytest.approx(-1.0)


def test_encoder_loads_from_a_local_folder_by_the_pretrained_path(encoder_dir, tmp_path):
    assert {p.name for p in encoder_dir.iterdir()} == {"config.json", "model.safetensors"}  # the hub's layout
    encoder = data.FeatureEncoder(f"local-dir:{encoder_dir}", grid=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = timm.create_model(data.DEFAULT_ENCODER, pretrained=False, **TINY_ENCODER).eval()
    loaded = encoder.encoder.state_dict()
    assert all(torch.equal(w, loaded[name]) for name, w in reference.state_dict().items())
    assert encoder.weights_sha256 == data.weights_sha256(reference)
    assert (encoder.size, encoder.width) == (4 * 14, 32)  # 4x4 patches of 14 pixels
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = encoder.encode(images)
    # REPA's DINOv2 input: [0, 1], ImageNet's mean and std, bicubic to the grid; the patch tokens after the norm
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate((images.permute(0, 3, 1, 2) / 255 - mean) / std, size=56, mode="bicubic")
    with torch.no_grad():
        torch.testing.assert_close(features, reference.forward_features(x)[:, 1:])
    pairs = encoder.encode_pairs(images)
    assert pairs.shape == (3, 2, 16, 32) and pairs.dtype == torch.float16
    torch.testing.assert_close(pairs[:, 1], encoder.encode(images.flip(2)).half())  # view 1: the mirrored image
    with pytest.raises(data.UserError, match="encoder 'local-dir:.*none' could not be loaded"):
        data.FeatureEncoder(f"local-dir:{tmp_path / 'none'}")
    result = run_cli("data.py", "shapes", "--out", tmp_path / "shapes", "--encoder", f"local-dir:{tmp_path / 'none'}")
    assert_one_line_error(result, "could not be loaded", "local-dir:")


def test_shapes_features_round_trip_through_the_shards_and_the_loader(aligned_data, encoder_dir, tmp_path):
    manifest = data.read_manifest(aligned_data)
    encoder = data.FeatureEncoder(f"local-dir:{encoder_dir}", grid=8)
    assert manifest["features"] == encoder.manifest_section()  # the encoder, its weights' sha256, the layout
    assert (manifest["features"]["grid"], manifest["features"]["width"], manifest["features"]["input_size"]) == (8, 32, 112)
    dataset = data.ShardDataset(aligned_data, verify="full")
    assert [f.shape for f in dataset.features] == [(100, 64, 32), (100, 64, 32), (56, 64, 32)]
    np.testing.assert_array_equal(dataset.features[1][:5], encoder.encode_shard(np.array(dataset.latents[1][:5])))
    loader = data.Loader(dataset, 16, seed=0, features=True)
    latents, _, _, caption_ids, features = next(loader)
    loader.close()
    raw = dataset.gather(data.global_batch_indices(len(dataset), 0, 0, 16), features=True)
    assert features.dtype == torch.float16 and features.shape == (16, 64, 32)
    np.testing.assert_array_equal(features.numpy(), raw["features"])  # each sample's own features
    np.testing.assert_array_equal(caption_ids.numpy(), raw["caption_ids"])
    plain = data.Loader(dataset, 16, seed=0)  # a basic run reads no features
    assert next(plain)[4] is None
    plain.close()
    broken = tmp_path / "broken"
    shutil.copytree(aligned_data, broken)
    path = broken / "shard_00001.features.npy"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(data.UserError, match="shard_00001.features.npy: .* bytes, manifest says"):
        data.ShardDataset(broken)


def test_imagenet_prep_stores_the_features_of_each_image_and_its_flip(encoder_dir, tmp_path):
    tree = make_tree(tmp_path / "train")
    out = tmp_path / "shards"
    result = prep(tree, out, "--encoder", f"local-dir:{encoder_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = data.read_manifest(out)
    assert (manifest["features"]["grid"], manifest["features"]["views"], manifest["features"]["input_size"]) == (16, 2, 224)
    dataset = data.ShardDataset(out, verify="full")
    assert [f.shape for f in dataset.features] == [(s["count"], 2, 256, 32) for s in manifest["shards"]]
    first = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())[0]  # shard 0, row 0
    image, _ = data.load_imagenet_image(tree / first)
    direct = data.FeatureEncoder(f"local-dir:{encoder_dir}").encode_pairs(torch.tensor(image[None]))[0]
    np.testing.assert_allclose(dataset.features[0][0].astype(np.float32), direct.float().numpy(), atol=2e-3, rtol=1e-2)
    # the loader picks each sample's features in the view it picks its latents in
    views = data.global_batch_views(len(dataset), 2, 0, 0, np.arange(len(dataset)))
    both = dataset.gather(np.arange(len(dataset)), views, features=True)
    assert {int(v) for v in views} == {0, 1}
    np.testing.assert_array_equal(both["features"][1], dataset.features[0][1, views[1]])
    # shards whose features came from other weights are refused at the manifest, naming the shard
    other = tmp_path / "other"
    data.save_random_encoder(other, data.DEFAULT_ENCODER, TINY_ENCODER, seed=1)
    again = prep(tree, out, "--encoder", f"local-dir:{other}")
    assert_one_line_error(again, "shard_00000.done.json", "other encoder weights")


def test_shapes_run_with_alignment_logs_the_encoder_and_checkpoints_the_projector(aligned_run, aligned_data):
    log = (aligned_run / "log.txt").read_text()
    features = data.read_manifest(aligned_data)["features"]
    assert record.log_encoder(log) == {"name": features["encoder"], "weights_sha256": features["weights_sha256"]}
    losses = [float(v) for v in logged_losses(aligned_run).values()]
    aligns = [float(v) for v in re.findall(r"^step \d+ \| train .* \| align (\S+)$", log, re.M)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert len(aligns) == 2 and all(-1 <= v <= 1 for v in aligns)
    ckpt = model.load_checkpoint(aligned_run / "checkpoints" / "ckpt_0000004.pt")
    cfg = model.DiTConfig(**ckpt["model_config"])
    assert (cfg.align_depth, cfg.align_width, cfg.projector_width) == (2, 32, 64)
    assert ckpt["model"]["projector.mlp.4.weight"].shape == (32, 64)
    assert ckpt["params"] == model.param_count(model.DiT(cfg))
    # sampling never runs the projector: without align the model returns the velocity alone, the same one
    net = model.DiT(cfg).eval()
    model.load_weights(net, ckpt["ema"], "ema")
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=g) for s in ((2, 3, 64, 64), (2,), (2, 16, 64), (2, 32))]
    with torch.no_grad():
        velocity = net(*inputs)
        with_align, projected = net(*inputs, align=True)
    torch.testing.assert_close(velocity, with_align)
    assert projected.shape == (2, 64, 32)
    basic = model.DiTConfig(**{**ckpt["model_config"], "align_depth": 0, "align_width": 0})
    assert model.flops_per_image(cfg, training=False) == model.flops_per_image(basic, training=False)
    assert model.flops_per_image(cfg) - model.flops_per_image(basic) == 3 * 64 * 2 * (128 * 64 + 64 * 64 + 64 * 32)


def test_alignment_needs_encoder_features_on_the_models_grid(shapes_data, aligned_data, tmp_path):
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "a", *ALIGN)
    assert_one_line_error(result, f"{shapes_data / 'manifest.json'}: no encoder features", "--align-weight 0")
    result = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", aligned_data, "--out", tmp_path / "b",
                     "--patch-size", 4, *ALIGN)
    assert_one_line_error(result, "8x8 grid", "16x16", "--encoder-grid 16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_records_refuse_an_aligned_run_in_the_basic_track(aligned_run, tmp_path):
    log = (aligned_run / "log.txt").read_text()
    folder = tmp_path / "record"
    (folder / "run1").mkdir(parents=True)
    (folder / "run1" / "log.txt.gz").write_bytes(gzip.compress(log.encode()))
    (folder / "run1" / "curve.json").write_text("[]")

    def check(track, **fields):
        (folder / "record.json").write_text(json.dumps({"format": 2, "track": track, "runs": ["run1"], "target": 0.9,
                                                        **fields}))
        return [p for p in record.check_record(folder) if "encoder" in p]

    assert check("shapes") == [f"{folder / 'run1'}: its hyperparameters use a pretrained encoder (align_weight 0.5), "
                               f"which the basic track 'shapes' forbids; pack it as shapes-external"]
    assert check("shapes-external", encoder=record.log_encoder(log)) == []  # the record names the encoder
    other = {**record.log_encoder(log), "weights_sha256": "0" * 64}
    assert len(check("shapes-external", encoder=other)) == 1
    result = run_cli("record.py", "build", aligned_run, "--name", "Aligned", "--out", tmp_path / "built")
    assert_one_line_error(result, "align_weight 0.5", "the basic track 'shapes' forbids; pack it as shapes-external")
    assert not (tmp_path / "built").exists()

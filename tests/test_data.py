"""Data generation determinism, the shard loader, resume and rank splitting."""
import json

import numpy as np
import torch
import pytest

import data
from conftest import N_TRAIN, build_data


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_data_and_other_seed_differs(shapes_data, tmp_path):
    # Rebuilt with another worker count: shard k of seed s must not depend on the machine.
    again = tmp_path / "again"
    build_data(again, seed=0, workers=2)
    original, rebuilt = files_of(shapes_data), files_of(again)
    expected = {"manifest.json", "captions.json", "text_tokens.npy", "text_pooled.npy", "eval_metadata.jsonl",
                *(f"shard_{k:05d}.{kind}.npy" for k in range(3) for kind in ("latents", "captions"))}
    assert set(original) == expected
    assert set(rebuilt) == expected
    for name in sorted(expected):
        assert original[name] == rebuilt[name], f"{name} differs between two seed-0 builds"

    other = tmp_path / "seed1"
    build_data(other, seed=1, workers=2)
    different = files_of(other)
    for k in range(3):
        name = f"shard_{k:05d}.latents.npy"
        assert different[name] != original[name], f"{name} is the same for seeds 0 and 1"
    assert different["eval_metadata.jsonl"] != original["eval_metadata.jsonl"]


def test_manifest_checksums_match_the_files(shapes_data):
    manifest = data.read_manifest(shapes_data)
    assert manifest["count"] == N_TRAIN == sum(s["count"] for s in manifest["shards"])
    data.verify_files(shapes_data, manifest)  # raises on any mismatch
    dataset = data.ShardDataset(shapes_data)
    assert len(dataset) == N_TRAIN
    captions = json.loads((shapes_data / "captions.json").read_text())
    assert dataset.text_tokens.shape[:2] == (len(captions), manifest["text"]["seq_len"])


def test_dataset_gather_returns_the_stored_scene_and_caption(shapes_data):
    dataset = data.ShardDataset(shapes_data)
    captions = json.loads((shapes_data / "captions.json").read_text())
    images, shard_captions = data.shapes_training_shard(0, 1, 100)  # shard 1 holds samples 100..199
    idx = np.array([150, 3, 101, 255])  # spans three shards, out of order
    got = dataset.gather(idx)
    np.testing.assert_array_equal(got["latents"][0], images[50])
    np.testing.assert_array_equal(got["latents"][2], images[1])
    assert captions[got["caption_ids"][0]] == shard_captions[50]
    np.testing.assert_array_equal(got["text_tokens"][1], dataset.text_tokens[dataset.caption_ids[3]])


def test_order_hash_depends_on_seed():
    assert data.order_hash(N_TRAIN, 0) == data.order_hash(N_TRAIN, 0)
    assert data.order_hash(N_TRAIN, 0) != data.order_hash(N_TRAIN, 1)
    assert data.order_hash(N_TRAIN, 0) != data.order_hash(N_TRAIN + 1, 0)


def test_global_batches_cover_each_epoch_exactly_once():
    n, batch = 50, 7
    stream = np.concatenate([data.global_batch_indices(n, 3, pos, batch) for pos in range(0, 3 * n + 1, batch)])
    for epoch in range(3):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # each epoch is reshuffled


def test_each_epochs_order_and_views_are_drawn_once_kept_read_only_and_are_the_seeded_draws():
    n, batch, views = 50, 7, 2
    positions = range(0, 3 * n + 1, batch)
    for cached in (False, True):  # drawn afresh for every batch (as before the caches), then from the caches
        got = []
        for pos in positions:
            if not cached:
                data.epoch_order.cache_clear()
                data.epoch_views.cache_clear()
            idx = data.global_batch_indices(n, 3, pos, batch)
            got.append((idx, data.global_batch_views(n, views, 3, pos, idx)))
        if not cached:
            fresh = got
    for (a, va), (b, vb) in zip(fresh, got):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(va, vb)
    stream = np.concatenate([idx for idx, _ in got])
    drawn = np.concatenate([np.random.default_rng([3, epoch]).permutation(n) for epoch in range(4)])
    np.testing.assert_array_equal(stream, drawn[:len(stream)])  # the seeded order itself, unchanged
    epoch_one = np.random.default_rng([3, 1, data.VIEW_STREAM]).integers(views, size=n)
    flat = np.concatenate([v for _, v in got])
    np.testing.assert_array_equal(flat[n:2 * n], epoch_one[stream[n:2 * n]])
    assert data.epoch_order(n, 3, 0) is data.epoch_order(n, 3, 0)  # kept, not drawn again
    with pytest.raises(ValueError):
        data.epoch_order(n, 3, 0)[0] = 1  # a caller cannot change the order others read


def take(loader, count):
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u is None:  # the encoder features, not asked for
                assert v is None
                continue
            assert u.shape == v.shape
            assert (u == v).all()


def test_loader_resumed_from_a_position_continues_the_same_stream(shapes_data):
    dataset = data.ShardDataset(shapes_data)
    batch = 48  # 8 batches cross the 256-sample epoch boundary
    uninterrupted = take(data.Loader(dataset, batch, seed=5), 8)
    resumed = data.Loader(dataset, batch, seed=5, position=3 * batch)
    assert_same_batches(take(resumed, 5), uninterrupted[3:])
    assert resumed.position == 8 * batch
    other_seed = take(data.Loader(dataset, batch, seed=6), 1)
    assert not (other_seed[0][3] == uninterrupted[0][3]).all()


def test_two_ranks_split_the_global_batch_without_overlap(shapes_data):
    dataset = data.ShardDataset(shapes_data)
    batch, position = 32, 240  # the second batch crosses the epoch boundary
    single = take(data.Loader(dataset, batch, seed=1, position=position), 2)
    ranks = [take(data.Loader(dataset, batch, seed=1, position=position, rank=r, world_size=2), 2) for r in (0, 1)]
    for step in range(2):
        idx = data.global_batch_indices(len(dataset), 1, position + step * batch, batch)
        parts = [ranks[r][step] for r in (0, 1)]
        for r, part in enumerate(parts):  # rank r holds positions [r * 16, (r + 1) * 16) of the batch
            np.testing.assert_array_equal(part[3].numpy(), dataset.caption_ids[idx[r * 16:(r + 1) * 16]])
        for field in range(4):  # latents, text tokens, pooled, caption ids: rank 0 then rank 1
            joined = np.concatenate([p[field].numpy() for p in parts])
            np.testing.assert_array_equal(joined, single[step][field].numpy())


def test_loader_refuses_a_batch_that_does_not_split_over_ranks(shapes_data):
    dataset = data.ShardDataset(shapes_data)
    with pytest.raises(ValueError, match="does not split"):
        data.Loader(dataset, 5, seed=0, world_size=2)


def test_fake_dataset_failure_in_the_loader_thread_reaches_the_caller():
    """Plumbing check with a fake dataset: a read error in the prefetch thread is raised by next(), not a hang."""
    class Broken:
        mean, std, views = torch.zeros(1), torch.ones(1), 1

        def __len__(self):
            return 10

        def gather(self, indices, views, features):
            raise OSError("disk went away")

    loader = data.Loader(Broken(), batch_size=2, seed=0)
    with pytest.raises(OSError, match="disk went away"):
        next(loader)
    loader.close()

"""The loader thread's host work per global batch, with each epoch's order and views drawn once (data.epoch_order,
data.epoch_views) against drawn again for every batch (as before; the caches cleared before each batch).
python docs/bench/loader_host.py BATCH REPEATS [SHARD_DIR]
Without SHARD_DIR: the batch's indices and views at the Shapes and ImageNet dataset sizes (2 views, ImageNet's flip).
With SHARD_DIR (written by data.py): also the whole host path of data.Loader: indices, views, gather, from_numpy."""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402


def indices_and_views(n, views, batch, position):
    idx = data.global_batch_indices(n, 0, position, batch)
    return data.global_batch_views(n, views, 0, position, idx)


def median_ms(host_batch, batch, repeats, fresh):
    times = []
    for k in range(repeats):
        if fresh:
            data.epoch_order.cache_clear()
            data.epoch_views.cache_clear()
        start = time.perf_counter()
        host_batch((k + 1) * batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


batch, repeats = int(sys.argv[1]), int(sys.argv[2])
cases = [(f"{name}, {views} view{'s' * (views > 1)}",
          lambda position, n=n, views=views: indices_and_views(n, views, batch, position))
         for name, n, views in (("Shapes size", 100_000, 1), ("ImageNet size", 1_281_167, 2))]
if len(sys.argv) > 3:  # data.Loader's own host path
    dataset = data.ShardDataset(sys.argv[3])
    cases.append((f"{sys.argv[3]}, whole host path", lambda position: data.host_batch(dataset, 0, position, batch)))
print(f"host work per global batch of {batch}, median of {repeats} (torch {torch.__version__}, "
      f"{torch.get_num_threads()} CPU threads)")
print("| case | drawn for every batch (ms) | drawn once per epoch (ms) | ratio |")
print("| --- | --- | --- | --- |")
for name, host_batch in cases:
    before = median_ms(host_batch, batch, repeats, True)
    after = median_ms(host_batch, batch, repeats, False)
    print(f"| {name} | {before:.2f} | {after:.2f} | {before / after:.1f}x |")

"""The loader thread's host work per global batch, with each epoch's order and views drawn once (data.epoch_order,
data.epoch_views) against drawn again for every batch (as before; the caches cleared before each batch).
python docs/bench/loader_host.py BATCH REPEATS [SHARD_DIR]
Without SHARD_DIR: the batch's indices and views at the Shapes and ImageNet dataset sizes (2 views, ImageNet's flip).
With SHARD_DIR (written by data.py): also the whole host path of data.Loader: indices, views, gather, from_numpy."""
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402


def host_batch(n, views, batch, position, dataset=None):
    idx = data.global_batch_indices(n, 0, position, batch)
    chosen = data.global_batch_views(n, views, 0, position, idx)
    if dataset is not None:
        raw = dataset.gather(idx, chosen)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}
    return chosen


def median_ms(n, views, batch, repeats, fresh, dataset=None):
    times = []
    for k in range(repeats):
        if fresh:
            data.epoch_order.cache_clear()
            data.epoch_views.cache_clear()
        start = time.perf_counter()
        host_batch(n, views, batch, (k + 1) * batch, dataset)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


batch, repeats = int(sys.argv[1]), int(sys.argv[2])
cases = [("Shapes size, 1 view", 100_000, 1, None), ("ImageNet size, 2 views", 1_281_167, 2, None)]
if len(sys.argv) > 3:
    dataset = data.ShardDataset(sys.argv[3])
    cases.append((f"{sys.argv[3]}, whole host path", len(dataset), dataset.views, dataset))
print(f"host work per global batch of {batch}, median of {repeats} (torch {torch.__version__}, "
      f"{torch.get_num_threads()} CPU threads)")
print("| case | drawn for every batch (ms) | drawn once per epoch (ms) | ratio |")
print("| --- | --- | --- | --- |")
for name, n, views, dataset in cases:
    # both orders once: the two timings alternate, so neither has the warmer caches
    before = median_ms(n, views, batch, repeats, True, dataset)
    after = median_ms(n, views, batch, repeats, False, dataset)
    print(f"| {name} | {before:.2f} | {after:.2f} | {before / after:.1f}x |")

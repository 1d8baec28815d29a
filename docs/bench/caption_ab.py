"""The caption path once per batch, measured: one forward that recomputes the caption path against one that is
given it (DiT.encode_text), alternated in one process, on the GPU when there is one (bf16 autocast, eager).
python docs/bench/caption_ab.py {shapes,b2} BATCH REPEATS"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import model  # noqa: E402

MODELS = {  # the model shapes of the `shapes` and `imagenet` configs (text widths: ViT-B-32, ViT-L-14)
    "shapes": model.DiTConfig(input_size=64, in_channels=3, patch_size=8, hidden=384, depth=6, heads=6, qk_norm=True,
                              text_len=16, text_blocks=2, text_dim=512, pooled_dim=512, prediction="image"),
    "b2": model.DiTConfig(input_size=32, in_channels=4, patch_size=2, hidden=768, depth=12, heads=12, qk_norm=True,
                          text_len=77, text_blocks=2, text_dim=768, pooled_dim=768),
}

name, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = MODELS[name]
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
net = model.DiT(cfg).to(device).eval()
x, t = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device), torch.rand(batch, device=device)
tokens = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device)
pooled = torch.randn(batch, cfg.pooled_dim, device=device)
drop = torch.zeros(batch, dtype=torch.bool, device=device)
sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
    text = net.encode_text(tokens, pooled, drop)
    forwards = {"recomputed": lambda: net(x, t, tokens, pooled, drop),
                "passed in": lambda: net(x, t, tokens, pooled, drop, text=text)}
    torch.testing.assert_close(forwards["recomputed"](), forwards["passed in"]())  # also the warm-up
    seconds = {k: [] for k in forwards}
    for i in range(repeats):
        for k in (list(forwards) if i % 2 == 0 else list(forwards)[::-1]):
            sync()
            start = time.perf_counter()
            forwards[k]()
            sync()
            seconds[k].append(time.perf_counter() - start)
ms = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
predicted = 1 - (model.flops_per_image(cfg, training=False) - model.flops_per_image(
    model.DiTConfig(**{**cfg.__dict__, "text_blocks": 0}), training=False)) / model.flops_per_image(cfg, training=False)
print(f"{name} | {device.type} | batch {batch} | {model.param_count(net) / 1e6:.1f}M | "
      f"{model.flops_per_image(cfg, training=False) / 1e9:.3f} GFLOP/img | recomputed {ms['recomputed']:.1f} ms | "
      f"passed in {ms['passed in']:.1f} ms | ratio {ms['passed in'] / ms['recomputed']:.3f} | "
      f"predicted {predicted:.3f} | median of {repeats}")

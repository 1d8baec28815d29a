"""The floor of a training step from its counts: the FLOPs of its matmuls (model.flops_per_image, split into token
linears, attention and the rest) at a bf16 matmul peak, and the bytes it must move at a copy rate: the activations
the backward reads (bf16, written once and read once) and the optimizer + EMA pass over the fp32 weights.
python docs/bench/step_floor.py CONFIG BATCH [PEAK_TFLOPS [COPY_TB_PER_S]]   (defaults: 740 and 4.3, the H200's)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import model  # noqa: E402
import train_dit  # noqa: E402

name, batch = sys.argv[1], int(sys.argv[2])
peak = float(sys.argv[3]) * 1e12 if len(sys.argv) > 3 else 740e12
copy_rate = float(sys.argv[4]) * 1e12 if len(sys.argv) > 4 else 4.3e12
hp = train_dit.CONFIGS[name]
size, channels, text_len, text_dim = (64, 3, 16, 512) if hp.track == "shapes" else (32, 4, 77, 768)
cfg = model.DiTConfig(input_size=size, in_channels=channels, patch_size=hp.patch_size, hidden=hp.hidden,
                      depth=hp.depth, heads=hp.heads, mlp_ratio=hp.mlp_ratio, qk_norm=hp.qk_norm, text_len=text_len,
                      text_blocks=hp.text_blocks, text_dim=text_dim, pooled_dim=text_dim, prediction=hp.prediction)
D, M, N, T = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio), cfg.image_tokens + text_len, text_len
# training FLOPs per image (x3: forward and backward), as model.flops_per_image counts them
linears = 3 * 2 * (4 * D * D + 2 * D * M) * (cfg.depth * N + cfg.text_blocks * T)
attention = 3 * 4 * D * (cfg.depth * N * N + cfg.text_blocks * T * T)
total = model.flops_per_image(cfg)
# the activations the backward reads, per token and block: x, both LayerNorm outputs, qkv, the attention output,
# fc1's output and GELU's (7D + 2M values, bf16), written once and read once
activations = 2 * 2 * (7 * D + 2 * M) * (cfg.depth * N + cfg.text_blocks * T) * batch
params = model.param_count(model.DiT(cfg))
weights = params * 4 * 9  # fp32: weight, gradient and two optimizer moments read and written, the EMA read and written
rows = [("token linears", linears * batch / peak), ("attention scores and sums", attention * batch / peak),
        ("other matmuls (adaLN, embeddings, output)", (total - linears - attention) * batch / peak),
        ("activations for the backward (bytes)", activations / copy_rate),
        ("optimizer + EMA over the weights (bytes)", weights / copy_rate)]
print(f"{name}: {hp.hidden}x{hp.depth}/{hp.patch_size}, {N} tokens, batch {batch}, {params / 1e6:.1f}M params, "
      f"{total / 1e9:.3f} GFLOP/img (training), at {peak / 1e12:.0f} TFLOP/s and {copy_rate / 1e12:.1f} TB/s")
print("| part | floor (ms) |")
print("| --- | --- |")
for part, seconds in rows:
    print(f"| {part} | {seconds * 1e3:.2f} |")
arithmetic, data_moved = sum(s for _, s in rows[:3]), sum(s for _, s in rows[3:])
print(f"| step: arithmetic {arithmetic * 1e3:.2f}, bytes {data_moved * 1e3:.2f}; the larger | "
      f"**{max(arithmetic, data_moved) * 1e3:.2f}** |")

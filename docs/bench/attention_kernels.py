"""Attention alone, forward and forward + backward, with each of model.ATTENTION_KERNELS, bf16 on one GPU.
python docs/bench/attention_kernels.py [REPEATS [BATCH HEADS TOKENS HEAD_DIM]]
Default: the Shapes step's attention (batch 512, 6 heads, 64 image + 16 caption tokens, head dim 64), per layer.
The matmul kernel is compiled, as the trainer compiles it; the fused kernels run as they are. Median of REPEATS,
each timed by CUDA events around 10 calls; the kernels alternate within each repeat, so a GPU that clocks down
biases none of them."""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import model  # noqa: E402

repeats, batch, heads, tokens, head_dim = [int(a) for a in sys.argv[1:]] + [20, 512, 6, 80, 64][len(sys.argv) - 1:]
device = torch.device("cuda")
q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
grad = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
compiled = torch.compile(model.attend, dynamic=False)
reference = model.attend(q.float(), k.float(), v.float(), "sdpa")  # the function in fp32
kernels = {}
for name in model.ATTENTION_KERNELS:
    run = compiled if name == "matmul" else model.attend
    try:
        error = (run(q, k, v, name).float() - reference).abs().max().item()
    except RuntimeError as e:
        print(f"{name}: not available here ({str(e).splitlines()[0][:100]})")
        continue
    kernels[name] = (run, error)


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def forward(run, name):
    with torch.no_grad():
        run(q, k, v, name)


def forward_backward(run, name):
    torch.autograd.grad(run(q, k, v, name), (q, k, v), grad)


times = {name: ([], []) for name in kernels}
for name, (run, _) in kernels.items():  # warm-up: compiles, picks cuDNN's plan
    timed(lambda: forward(run, name)), timed(lambda: forward_backward(run, name))
for _ in range(repeats):
    for name, (run, _) in kernels.items():
        times[name][0].append(timed(lambda: forward(run, name)))
        times[name][1].append(timed(lambda: forward_backward(run, name)))

# Bytes that must move: q, k, v and the output once each forward; the backward reads them, the output's gradient
# and (for the fused kernels) a per-row statistic, and writes three gradients.
tensor_bytes = batch * heads * tokens * head_dim * 2
flops = 4 * batch * heads * tokens * tokens * head_dim  # two matmuls forward; the backward does 2.5x that
print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}: batch {batch}, {heads} heads, {tokens} "
      f"tokens, head dim {head_dim}; median of {repeats}")
print(f"each of q, k, v: {tensor_bytes / 1e6:.1f} MB; forward {flops / 1e9:.1f} GFLOP, forward + backward "
      f"{3.5 * flops / 1e9:.1f}")
print("| kernel | forward (ms) | forward + backward (ms) | max error against fp32 |")
print("| --- | --- | --- | --- |")
for name, (fwd, both) in times.items():
    print(f"| {name} | {statistics.median(fwd):.3f} | {statistics.median(both):.3f} | {kernels[name][1]:.1e} |")

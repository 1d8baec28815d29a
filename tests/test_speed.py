"""Muon, QK-norm, the residual stream's dtype, the benchmark modes, synthetic shards, and the sampler's time grid and CFG interval."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import model as dit
import sample
import train_dit
from conftest import REPO, TRAIN_STEPS, logged_losses, run_cli, train
from test_reliability import assert_same_training_state, load, poisoned_data  # noqa: F401 (a fixture)

TINY = dict(hidden=128, depth=4, heads=4)  # the shapes-cpu config's model


# -----------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("rows, cols", [(48, 16), (16, 48), (32, 32)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_orthogonalize_brings_every_singular_value_near_one(rows, cols, scale):
    g = torch.Generator().manual_seed(0)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(3, rows, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(3, cols, k, generator=g))[0]
    spectrum = scale * torch.logspace(-1, 0, k)  # singular values spread over 10x
    m = u @ torch.diag(spectrum) @ v.mT
    out = train_dit.orthogonalize(m).float()
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25, s
    # U V^T: the same singular vectors, so out^T m is symmetric positive definite
    assert torch.linalg.eigvalsh(0.5 * (out.mT @ m + m.mT @ out)).min() > -1e-3 * scale


def test_muon_direction_is_the_momentum_step_then_the_orthogonalised_nesterov_gradient():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(24, 8, generator=g) for _ in range(3)]
    momenta = [torch.randn(24, 8, generator=g) for _ in range(3)]
    expected_momenta = [0.9 * m + 0.1 * grad for m, grad in zip(momenta, grads)]
    nesterov = torch.stack([0.1 * grad + 0.9 * m for m, grad in zip(expected_momenta, grads)])
    direction = train_dit.nesterov_orthogonalized(grads, momenta, 0.9)
    for m, expected in zip(momenta, expected_momenta):  # updated in place: the optimizer's state
        torch.testing.assert_close(m, expected)
    torch.testing.assert_close(direction, train_dit.orthogonalize(nesterov))
    assert direction.shape == (3, 24, 8)


def test_muon_with_qk_norm_resumes_bit_exactly(shapes_data, trained_run, tmp_path):
    flags = ("--optimizer", "muon", "--qk-norm", "true", "--text-blocks", "1", "--ckpt-every-seconds", "0.0001")
    full = train(shapes_data, tmp_path / "full", 0, *flags)
    half = full / "checkpoints" / f"ckpt_{TRAIN_STEPS // 2:07d}.pt"
    ckpt = load(half)
    assert len(ckpt["optimizer"]) == 2  # AdamW, then Muon with a momentum per weight matrix of the blocks:
    depth = ckpt["model_config"]["depth"]  # qkv, proj, fc1, fc2 and adaLN per joint block; no adaLN in a text block
    assert len(ckpt["optimizer"][1]["state"]) == 5 * depth + 4 * 1
    assert any("q_norm" in k for k in ckpt["model"])
    resumed = train(shapes_data, tmp_path / "resumed", 0, *flags, "--resume", half)
    last = f"ckpt_{TRAIN_STEPS:07d}.pt"
    assert_same_training_state(load(full / "checkpoints" / last), load(resumed / "checkpoints" / last))
    losses = logged_losses(resumed)
    assert losses == {s: logged_losses(full)[s] for s in losses}
    adamw = logged_losses(trained_run)  # the same run with the default optimizer
    assert adamw[TRAIN_STEPS] != logged_losses(full)[TRAIN_STEPS]  # Muon changed the run


def test_muon_skips_a_nonfinite_step_whole(poisoned_data, tmp_path):
    root, poisoned_steps = poisoned_data
    run = train(root, tmp_path / "run", 0, "--optimizer", "muon", "--skip-nonfinite", "true", "--text-dropout", 0,
                "--max-steps", 6, "--log-every", 4, "--ckpt-every-seconds", "0.0001")
    assert [s for s in poisoned_steps if s <= 6] == [5, 6]
    before, after = load(run / "checkpoints" / "ckpt_0000004.pt"), load(run / "checkpoints" / "ckpt_0000006.pt")
    assert_same_training_state(before, after)  # Muon's momentum and the weights included


def test_qk_norm_normalises_each_heads_queries_and_keys_before_attention():
    torch.manual_seed(0)
    attn = dit.Attention(32, heads=4, qk_norm=True)
    for norm in attn.q_norm, attn.k_norm:
        norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (batch, heads, tokens, head_dim)

    def rms_norm(z, weight):
        return z / z.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * weight

    scores = rms_norm(q, attn.q_norm.weight) @ rms_norm(k, attn.k_norm.weight).mT / 8 ** 0.5
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_the_residual_stream_stays_bf16_under_autocast():
    # fp32 position tables would promote it to fp32 (twice the bytes per elementwise pass on the GPU).
    cfg = dit.DiTConfig(input_size=16, patch_size=8, hidden=32, depth=2, heads=4, text_blocks=1, text_dim=24,
                        pooled_dim=24, text_len=4, prediction="image")
    model = dit.DiT(cfg)
    seen = []
    for block in [*model.text_blocks, *model.blocks]:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 24), torch.randn(2, 24))
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 3
    seen.clear()
    model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 24), torch.randn(2, 24))
    assert seen == [(torch.float32, torch.float32)] * 3  # without autocast, fp32 throughout


# -----------------------------------------------------------------------------
# Benchmark mode and synthetic shards


def test_synthetic_shards_have_the_track_shapes_and_are_built_once(tmp_path):
    root = data.build_synthetic(tmp_path / "syn", "imagenet", n=64, n_captions=8)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    dataset = data.ShardDataset(root, verify="full")
    shape = data.TRACK_SHAPES["imagenet"]
    assert len(dataset) == 64 and dataset.latent_shape == shape["latent_shape"] and dataset.views == 2
    loader = data.Loader(dataset, 4, seed=0)
    latents, tokens, pooled, _, features = next(loader)
    loader.close()
    assert latents.shape == (4, 4, 32, 32) and tokens.shape == (4, 77, 768) and pooled.shape == (4, 768)
    assert features is None and dataset.features is None
    assert data.build_synthetic(tmp_path / "syn", "imagenet", n=64, n_captions=8) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    data.build_synthetic(tmp_path / "syn", "imagenet", n=32, n_captions=8)
    assert len(data.ShardDataset(root)) == 32  # another size is rebuilt
    # with features (the alignment bench): DINOv2-B's 16x16 x 768 per view, through the same loader
    data.build_synthetic(tmp_path / "syn", "imagenet", n=16, n_captions=8, features=True)
    loader = data.Loader(data.ShardDataset(root, verify="full"), 4, seed=0, features=True)
    assert next(loader)[4].shape == (4, 256, 768)
    loader.close()


def test_train_bench_times_the_step_and_writes_no_checkpoint(tmp_path):
    out = tmp_path / "bench"
    result = run_cli(REPO / "train_dit.py", "--config", "shapes-cpu", "--bench", "train", "--batch-size", 8,
                     "--bench-steps", 2, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.jsonl").read_text().splitlines()[-1])
    assert report["model"] == "128x4/8" and report["latent"] == [3, 64, 64] and report["text_tokens"] == 16
    assert report["ms_per_step"] > 0 and report["batch"] == 8
    cfg = dit.DiTConfig(patch_size=8, **TINY)
    assert report["gflop_per_image"] == pytest.approx(dit.flops_per_image(cfg) / 1e9)
    assert report["params"] == dit.param_count(dit.DiT(cfg))
    assert "bench train | 128x4/8 shapes 3x64x64 + 16 text tokens | batch 8 on 1 rank(s)" in result.stdout
    log = (out / "log.txt").read_text()
    assert "==================== train_dit.py" in log and "bench train | 128x4/8" in log
    assert not (out / "checkpoints").exists()


def test_sample_bench_counts_the_forward_passes_of_interval_cfg(tmp_path):
    result = run_cli(REPO / "train_dit.py", "--config", "shapes-cpu", "--bench", "sample", "--batch-size", 1,
                     "--cfg-interval", 0.1, 0.75, "--out", tmp_path / "bench", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    full, interval = [line for line in result.stdout.splitlines() if line.startswith("bench sample")]
    assert "cfg interval [0.0, 1.0]: 200 forward passes per image" in full
    assert "cfg interval [0.1, 0.75]: 166 forward passes per image" in interval


def test_bench_profile_line_sums_time_and_launches_by_kernel_kind():
    # Kernel names as the H200's profile of the Shapes step shows them (docs/bench/2026-12-04-h200-shapes.jsonl).
    report = {"bench": "train", "model": "384x6/8", "track": "shapes", "latent": [3, 64, 64], "text_tokens": 16,
              "batch": 512, "world_size": 1, "optimizer": "muon", "align": "off", "compile": True, "max_autotune": False,
              "float8": "off", "attention": "sdpa", "params": 20610880, "gflop_per_image": 5.73, "ms_per_step": 15.0,
              "img_per_s": 34133, "loader_share": 0.01, "gpu_busy_ms": 4.0,
              "kernels": [["cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 1.5, 0.375, 8.0],
                          ["nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", 1.0, 0.25, 16.0],
                          ["triton_poi_fused_gelu_gelu_backward_view_13", 0.75, 0.1875, 8.0],
                          ["cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8", 0.5, 0.125, 75.0],
                          ["void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 0.25,
                           0.0625, 120.0]]}
    lines = train_dit.format_bench(report).splitlines()
    assert lines[1] == ("  GPU busy 4.00 ms/step of 15.00 in 227 kernel launches: attention 1.50 (8), matmuls 1.50 (91), "
                        "compiled 0.75 (8), other 0.25 (120); the top kernels:")
    assert lines[2] == "      1.50 ms/step  37.5%     8x  cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16"
    assert len(lines) == 2 + len(report["kernels"])


@pytest.mark.parametrize("lever, value", [("float8", "tensorwise"), ("attention", "matmul")])
def test_bench_with_a_speed_lever_on_times_every_lever_off_first_and_prints_the_ratio(tmp_path, lever, value):
    out = tmp_path / "bench"
    result = run_cli(REPO / "train_dit.py", "--config", "shapes-cpu", "--bench", "train", "--batch-size", 8,
                     "--bench-steps", 2, f"--{lever}", value, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("bench ")]
    off = train_dit.SPEED_LEVERS_OFF[lever]
    assert [line.split(f" | {lever} ")[1].split(" ")[0] for line in lines[:2]] == [off, value]
    reference, timed, ratio = (json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines())
    assert (reference[lever], timed[lever], ratio["levers"]) == (off, value, {lever: value})
    assert ratio["ratios"] == [pytest.approx(timed["img_per_s"] / reference["img_per_s"])]
    assert lines[2] == f"bench ratio | {lever}={value} against every lever off | {ratio['ratios'][0]:.2f}x img/s"


@pytest.mark.parametrize("max_autotune, graphs, mode", [(False, True, "reduce-overhead"), (False, False, "default"),
                                                          (True, True, "max-autotune"),
                                                          (True, False, "max-autotune-no-cudagraphs")])
def test_compile_mode_keeps_cuda_graphs_where_allowed_and_adds_max_autotune_with_its_lever(max_autotune, graphs, mode):
    hp = train_dit.CONFIGS["shapes"]
    assert train_dit.compile_mode(train_dit.dataclasses.replace(hp, max_autotune=max_autotune), graphs) == mode
    assert train_dit.SPEED_LEVERS_OFF["max_autotune"] is False  # --bench's yardstick turns it off


def attention_test_dit():
    """A tiny DiT whose attention shows in its output, its config, and inputs for it."""
    torch.manual_seed(0)
    cfg = dit.DiTConfig(input_size=16, patch_size=8, hidden=32, depth=2, heads=4, qk_norm=True, text_blocks=1,
                        text_dim=24, pooled_dim=24, text_len=4)  # velocity: no 1/t to magnify fp32 rounding
    net = dit.DiT(cfg)
    for m in net.modules():  # the zero-initialised gates and output would hide the attention from the output
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    inputs = (torch.randn(3, 3, 16, 16), torch.rand(3), torch.randn(3, 4, 24), torch.randn(3, 24))
    return cfg, net, inputs


def test_attention_by_matmuls_is_the_same_function_as_the_fused_kernel_forward_and_backward():
    cfg, fused, inputs = attention_test_dit()
    by_matmuls = dit.DiT(cfg)
    by_matmuls.load_state_dict(fused.state_dict())
    assert dit.use_attention(by_matmuls, "matmul") is by_matmuls
    assert {m.kernel for m in by_matmuls.modules() if isinstance(m, dit.Attention)} == {"matmul"}
    assert {m.kernel for m in fused.modules() if isinstance(m, dit.Attention)} == {"sdpa"}
    outs = [net(*inputs) for net in (fused, by_matmuls)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert outs[0].std() > 0.1  # not the zeroed init's constant output
    for out in outs:
        out.pow(2).sum().backward()
    # fp32 sums in another order: ~1e-7 for most, up to ~4e-5 for the QK-norm scales' sums of cancelling terms
    errors = {name: ((a.grad - b.grad).norm() / a.grad.norm()).item()
              for (name, a), b in zip(fused.named_parameters(), by_matmuls.parameters()) if a.grad is not None}
    assert len(errors) > 20 and max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)  # the function alone, against PyTorch's kernel
    torch.testing.assert_close(dit.attention_by_matmuls(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_each_attention_kernel_computes_the_same_function_or_is_refused_by_its_flag():
    cfg, reference, inputs = attention_test_dit()
    expected = reference(*inputs)
    accepted, refused = [], []
    for kernel in dit.ATTENTION_KERNELS:
        net = dit.DiT(cfg)
        net.load_state_dict(reference.state_dict())
        try:
            dit.use_attention(net, kernel)
        except data.UserError as e:
            assert str(e).startswith(f"--attention {kernel}: PyTorch has no such kernel"), e
            assert {m.kernel for m in net.modules() if isinstance(m, dit.Attention)} == {"sdpa"}  # left as it was
            refused.append(kernel)
            continue
        torch.testing.assert_close(net(*inputs), expected, rtol=1e-5, atol=1e-5)
        accepted.append(kernel)
    assert {"sdpa", "flash", "matmul"} <= set(accepted)  # PyTorch has a flash kernel on the CPU too
    if not torch.cuda.is_available():
        assert set(refused) == {"efficient", "cudnn"}  # GPU-only kernels


# -----------------------------------------------------------------------------
# FP8 matmuls (torchao's float8 training)


def tiny_dit():
    torch.manual_seed(0)
    return dit.DiT(dit.DiTConfig(patch_size=8, text_blocks=1, text_len=16, **TINY))


def test_float8_swaps_only_the_blocks_token_linears_and_keeps_the_weights():
    from torchao.float8.float8_linear import Float8Linear
    net, plain = tiny_dit(), tiny_dit()
    dit.use_float8(net, "tensorwise")
    swapped = sorted(name for name, m in net.named_modules() if isinstance(m, Float8Linear))
    assert swapped == sorted(f"{blocks}.{i}.{layer}" for blocks, n in (("blocks", 4), ("text_blocks", 1))
                             for i in range(n) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert not isinstance(net.blocks[0].adaLN[1], Float8Linear) and not isinstance(net.final.linear, Float8Linear)
    weights, plain_weights = net.state_dict(), plain.state_dict()
    assert list(weights) == list(plain_weights)  # a checkpoint of it loads into a plain DiT
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    # The same function, to FP8's precision (e4m3: 3 mantissa bits); the zero-initialised adaLN and output
    # layers would hide the blocks, so they are filled first, alike in both.
    for m in (net, plain):
        torch.manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if not p.any():
                    p.normal_(std=0.05)
    x, t = torch.randn(4, 3, 64, 64), torch.rand(4)
    tokens, pooled = torch.randn(4, 16, 512), torch.randn(4, 512)
    with torch.no_grad():
        fp8, bf = net(x, t, tokens, pooled), plain(x, t, tokens, pooled)
    assert torch.nn.functional.cosine_similarity(fp8.flatten(), bf.flatten(), dim=0) > 0.99
    assert not torch.equal(fp8, bf)  # it did run in FP8


def test_float8_in_the_forward_only_runs_the_forward_in_fp8_and_the_backward_as_a_plain_linear():
    # grad_weight = g^T x and grad_input = g W do not depend on the forward's output: with the backward in full
    # precision they match a plain linear's, which the all-FP8 recipe's do not.
    linears = {}
    for recipe in ("off", "tensorwise", "tensorwise_forward"):
        net = tiny_dit()
        dit.use_float8(net, recipe)
        linears[recipe] = net.blocks[0].mlp.fc2
    torch.manual_seed(2)
    x, g = torch.randn(64, linears["off"].in_features), torch.randn(64, linears["off"].out_features)
    out, grads = {}, {}
    for recipe, linear in linears.items():
        xr = x.clone().requires_grad_()
        out[recipe] = linear(xr)
        (out[recipe] * g).sum().backward()
        grads[recipe] = (linear.weight.grad, xr.grad)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert not torch.equal(out["tensorwise_forward"], out["off"])  # the forward ran in FP8
    assert torch.equal(out["tensorwise_forward"], out["tensorwise"])  # as the all-FP8 recipe's forward does
    assert rel(out["tensorwise_forward"], out["off"]) < 0.1
    for full, fp8_forward, fp8_all in zip(grads["off"], grads["tensorwise_forward"], grads["tensorwise"]):
        assert rel(fp8_forward, full) < 1e-6
        assert rel(fp8_all, full) > 1e-3


def test_a_float8_run_follows_the_plain_run_and_its_checkpoint_samples_in_a_plain_model(shapes_data, trained_run,
                                                                                          tmp_path):
    run = train(shapes_data, tmp_path / "f8", 0, "--float8", "tensorwise", "--ckpt-every-seconds", "0.0001")
    losses, plain_losses = logged_losses(run), logged_losses(trained_run)  # the same seed without FP8
    assert sorted(losses) == sorted(plain_losses) and len(losses) >= TRAIN_STEPS
    assert all(float(losses[s]) == pytest.approx(float(plain_losses[s]), rel=0.05) for s in losses)
    assert any(losses[s] != plain_losses[s] for s in losses)
    assert '"float8": "tensorwise"' in (run / "log.txt").read_text()
    ckpt = dit.load_checkpoint(run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt")
    assert ckpt["hparams"]["float8"] == "tensorwise"
    plain = dit.DiT(dit.DiTConfig(**ckpt["model_config"]))
    dit.load_weights(plain, ckpt["model"], "ckpt")  # the FP8 layers' weights load into nn.Linear
    for float8 in ("off", "tensorwise"):  # the sampler's own choice, either way
        samples = tmp_path / f"samples-{float8}"
        result = run_cli(REPO / "sample.py", run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt", "--per-tag", 1,
                         "--images-per-prompt", 1, "--float8", float8, "--out", samples)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(list(samples.rglob("0000.png"))) == 6
        assert json.loads((samples / "sampling.json").read_text())["float8"] == float8


# -----------------------------------------------------------------------------
# Sampler: time grid and CFG interval


def test_time_grid_runs_from_one_to_zero_and_the_shift_moves_steps_to_high_noise():
    plain, shifted = sample.time_grid(100, 1.0), sample.time_grid(100, 3.0)
    assert torch.allclose(plain, torch.linspace(1, 0, 101))
    assert shifted[0] == 1 and shifted[-1] == 0 and bool((shifted[1:] < shifted[:-1]).all())
    assert (plain > 0.5).sum() == 50 and (shifted > 0.5).sum() == 75  # s t / (1 + 2 t) > 0.5  <=>  t > 0.25
    # t in [0.1, 0.75] on the uniform grid: t = 1 - i/100 for i = 25 ... 90
    assert sum(sample.guided_steps(plain, (0.1, 0.75))) == 66


def sampler_dit(text_blocks=0):
    """A tiny DiT for the sampler's tests, its weights moved off DiT's zero init (which makes every output 0)."""
    torch.manual_seed(0)
    cfg = dit.DiTConfig(input_size=8, patch_size=4, text_len=4, text_dim=8, pooled_dim=8, text_blocks=text_blocks,
                        **TINY)
    net = dit.DiT(cfg).eval()
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return net


class CountingNet:
    """The net, recording the images of each forward and the captions of each caption encoding."""

    def __init__(self, net):
        self.net, self.forwards, self.encodes = net, [], []

    def encode_text(self, tokens, *args):
        self.encodes.append(len(tokens))
        return self.net.encode_text(tokens, *args)

    def __call__(self, x, *args, **kwargs):
        self.forwards.append(len(x))
        return self.net(x, *args, **kwargs)


def test_the_caption_path_runs_once_per_batch_and_gives_the_same_velocity():
    net = sampler_dit(text_blocks=2)
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    tokens, pooled, drop = torch.randn(4, 4, 8), torch.randn(4, 8), torch.tensor([False, True, False, True])
    with torch.no_grad():
        whole = net(x, t, tokens, pooled, drop)
        assert torch.equal(net(x, t, None, None, text=net.encode_text(tokens, pooled, drop)), whole)
        assert not torch.allclose(net(x, t, tokens, pooled, None), whole, atol=1e-3)  # the drop mask is in the text
    counting = CountingNet(net)
    with torch.no_grad():
        sample.sample_latents(counting, torch.randn(2, 3, 8, 8), tokens[:2], pooled[:2], 4.0, nfe=10,
                              cfg_interval=(0.0, 0.55))
    assert counting.encodes == [4, 2]  # once for the guided batch (captions and null captions), once for the conditional one


def test_unguided_steps_evaluate_the_conditional_branch_alone():
    net = sampler_dit()
    counting = CountingNet(net)
    noise, tokens, pooled = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8), torch.randn(2, 8)
    never = sample.sample_latents(counting, noise, tokens, pooled, 4.0, nfe=10, cfg_interval=(2.0, 3.0))
    assert counting.forwards == [2] * 10  # one batch of B images per step: no unconditional branch
    scale_one = sample.sample_latents(net, noise, tokens, pooled, 1.0, nfe=10)
    assert torch.allclose(never, scale_one, atol=1e-5)  # cond alone == guidance at scale 1
    counting.forwards.clear()
    part = sample.sample_latents(counting, noise, tokens, pooled, 4.0, nfe=10, cfg_interval=(0.0, 0.55))
    assert counting.forwards == [2] * 5 + [4] * 5  # t = 1.0 ... 0.6 unguided, t = 0.5 ... 0.1 guided (2B)
    assert not torch.allclose(part, never, atol=1e-3)

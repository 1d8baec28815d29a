"""model.py: FLOP and parameter accounting, patchify, prediction types, config checks."""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model as dit

CONFIGS = {
    "small": dit.DiTConfig(input_size=16, patch_size=4, hidden=64, depth=2, heads=4, text_len=5, text_dim=24,
                           pooled_dim=12),
    "odd": dit.DiTConfig(input_size=24, in_channels=4, patch_size=8, hidden=48, depth=1, heads=2, mlp_ratio=2.5,
                         text_len=3, text_dim=20, pooled_dim=8, prediction="image"),
    "text_blocks": dit.DiTConfig(input_size=16, patch_size=8, hidden=32, depth=1, heads=2, text_len=4, text_dim=8,
                                 pooled_dim=8, qk_norm=True, text_blocks=2),
}


def inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g),
            torch.rand(batch, generator=g),
            torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g),
            torch.randn(batch, cfg.pooled_dim, generator=g))


# The CPU's fused attention kernel is invisible to FlopCounterMode; the math backend runs attention
# as bmm calls, which it counts (2*N*N*D for scores, 2*N*N*D for the weighted sum).
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_per_image_matches_flop_counter_forward(name):
    cfg, batch = CONFIGS[name], 3
    model = dit.DiT(cfg)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs(cfg, batch))
    assert counter.get_total_flops() == batch * dit.flops_per_image(cfg, training=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_flops_are_forward_plus_twice_forward_for_backward(name):
    cfg, batch = CONFIGS[name], 2
    model = dit.DiT(cfg)
    x, t, tokens, pooled = inputs(cfg, batch)
    x.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, tokens, pooled).square().sum().backward()
    # Only gap to 3x forward: the timestep MLP's first layer sees fixed sinusoidal features, so
    # autograd computes no input gradient for it (2 * 256 * hidden FLOPs per image).
    skipped = 2 * model.t_embed.freq_dim * cfg.hidden
    assert counter.get_total_flops() == batch * (dit.flops_per_image(cfg, training=True) - skipped)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_equals_the_layer_shapes(name):
    cfg = CONFIGS[name]
    model = dit.DiT(cfg)
    D, M, P = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio), cfg.patch_size ** 2 * cfg.in_channels
    T, Q, L = cfg.text_dim, cfg.pooled_dim, cfg.text_len
    linear = lambda i, o: i * o + o  # noqa: E731
    qk_norm = 2 * (D // cfg.heads) if cfg.qk_norm else 0
    attention_mlp = linear(D, 3 * D) + linear(D, D) + qk_norm + linear(D, M) + linear(M, D)
    block = attention_mlp + linear(D, 6 * D)
    text_block = attention_mlp + 2 * 2 * D  # two affine LayerNorms
    expected = (linear(P, D) + linear(256, D) + linear(D, D)  # patch and timestep embeddings
                + 2 * T + linear(T, D) + 2 * Q + linear(Q, D) + L * T + Q + L * D
                + cfg.text_blocks * text_block + cfg.depth * block + linear(D, P) + linear(D, 2 * D))
    assert dit.param_count(model) == expected
    assert dit.param_count(model) == sum(p.numel() for p in model.parameters())


def test_patchify_unpatchify_round_trip_and_token_layout():
    cfg = CONFIGS["odd"]
    model, p, g = dit.DiT(cfg), cfg.patch_size, cfg.input_size // cfg.patch_size
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    tokens = model.patchify(x)
    assert tokens.shape == (2, g * g, p * p * cfg.in_channels)
    assert torch.equal(model.unpatchify(tokens), x)
    row, col = 1, 2  # token row * g + col is the patch at that grid cell
    patch = x[1, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
    assert torch.equal(tokens[1, row * g + col], patch.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("prediction", ["velocity", "image"])
def test_output_shape_for_both_predictions(prediction):
    cfg = dataclasses.replace(CONFIGS["small"], prediction=prediction)
    x, t, tokens, pooled = inputs(cfg, batch=3)
    out = dit.DiT(cfg)(x, t, tokens, pooled, drop=torch.tensor([True, False, True]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_x_prediction_is_turned_into_velocity():
    velocity = dit.DiT(dataclasses.replace(CONFIGS["small"], prediction="velocity"))
    image = dit.DiT(dataclasses.replace(CONFIGS["small"], prediction="image"))
    torch.nn.init.normal_(velocity.final.linear.weight, std=0.1)  # the zero init would output 0
    image.load_state_dict(velocity.state_dict())
    x, t, tokens, pooled = inputs(velocity.cfg, batch=4)
    t = torch.tensor([0.01, 0.3, 0.7, 1.0])
    raw = velocity(x, t, tokens, pooled)  # the network output, taken as the clean image estimate
    expected = (x - raw) / t.clamp(min=0.05).view(-1, 1, 1, 1)  # x_t = (1-t) x0 + t noise
    torch.testing.assert_close(image(x, t, tokens, pooled), expected)


@pytest.mark.parametrize("change", [dict(input_size=30, patch_size=4), dict(hidden=64, heads=5),
                                    dict(prediction="epsilon")])
def test_inconsistent_config_raises(change):
    with pytest.raises(ValueError, match="inconsistent DiT config"):
        dit.DiT(dataclasses.replace(CONFIGS["small"], **change))


def test_text_blocks_let_each_caption_token_read_the_others_before_the_image_does():
    """Without text blocks a caption token enters the joint blocks as its own projection; with them,
    changing one word changes the other words' states too (how "red" reaches the "circle" after it)."""
    for blocks in (0, 1):
        cfg = dataclasses.replace(CONFIGS["text_blocks"], text_blocks=blocks)
        model = dit.DiT(cfg).eval()
        _, _, tokens, pooled = inputs(cfg)
        edited = tokens.clone()
        edited[:, 1] = torch.randn(edited[:, 1].shape, generator=torch.Generator().manual_seed(1))  # one word changed

        def caption_states(tokens):
            text, _ = model.text_embed(tokens, pooled, None)
            for block in model.text_blocks:
                text = block(text)
            return text

        with torch.no_grad():
            moved = (caption_states(edited) - caption_states(tokens)).abs().amax(dim=(0, 2))
        assert moved[1] > 0.1
        others = torch.cat([moved[:1], moved[2:]])
        assert (others > 1e-3).all() if blocks else (others == 0).all(), (blocks, moved)

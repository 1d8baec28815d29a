"""The DiT: a diffusion transformer for text-to-image, conditioned on text-tower token features.

Text conditioning is joint attention: the caption's token features are projected to the model
width, optionally pass through caption-only blocks (`text_blocks`), and attend together with the
image tokens in every block (one shared attention, as in DiT's in-context conditioning). The
pooled caption embedding joins the timestep embedding in the adaLN-Zero modulation. A learned
null caption replaces the text for classifier-free guidance.

With `align_depth` (the external-module track), a projector maps the image tokens after that many
joint blocks to the width of a frozen encoder's patch features, for REPA's alignment loss; the
forward pass computes it only when asked (`align=True`, in training), so sampling never pays for it.
"""
import dataclasses
import math
import pickle
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from data import UserError, atomic_write, content_hash


@dataclass
class DiTConfig:
    input_size: int = 64  # latent height = width
    in_channels: int = 3
    patch_size: int = 4
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    text_len: int = 16  # caption token positions the model sees
    text_blocks: int = 0  # self-attention blocks over the caption tokens alone, before they join the image tokens
    text_dim: int = 512  # width of the text tower's token features
    pooled_dim: int = 512  # width of the pooled caption embedding
    prediction: str = "velocity"  # network output: "velocity", or "image" (x-prediction, turned into velocity)
    align_depth: int = 0  # joint blocks before the image tokens that the projector aligns (REPA); 0: no projector
    align_width: int = 0  # width of the encoder features the projector maps to
    projector_width: int = 2048  # hidden width of the projector MLP

    @property
    def image_tokens(self):
        return (self.input_size // self.patch_size) ** 2


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(dim, grid):
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    parts = [torch.outer(c.flatten(), freqs) for c in (y, x)]
    return torch.cat([f(p) for p in parts for f in (torch.sin, torch.cos)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TextEmbedder(nn.Module):
    """Caption token features and pooled embedding -> model width; the null caption for CFG."""

    def __init__(self, cfg):
        super().__init__()
        self.tokens = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.hidden))
        self.pooled = nn.Sequential(nn.LayerNorm(cfg.pooled_dim), nn.Linear(cfg.pooled_dim, cfg.hidden))
        self.null_tokens = nn.Parameter(torch.randn(cfg.text_len, cfg.text_dim))
        self.null_pooled = nn.Parameter(torch.randn(cfg.pooled_dim))
        # Caption positions, learned: joint attention is order-blind, and "a X left of a Y" needs order.
        # Measured (H100, S/4, 90 s): overall 0.283 with, 0.225 without.
        self.pos = nn.Parameter(torch.zeros(cfg.text_len, cfg.hidden))

    def forward(self, text_tokens, text_pooled, drop):
        """drop: (B,) bool, True where the caption is replaced by the null caption."""
        if drop is not None:
            text_tokens = torch.where(drop[:, None, None], self.null_tokens.to(text_tokens.dtype), text_tokens)
            text_pooled = torch.where(drop[:, None], self.null_pooled.to(text_pooled.dtype), text_pooled)
        tokens = self.tokens(text_tokens)
        return tokens + self.pos.to(tokens.dtype), self.pooled(text_pooled)


def attention_by_matmuls(q, k, v):
    """softmax(q k^T / sqrt(head_dim)) v as two batched matmuls and a softmax, which torch.compile fuses with their
    neighbours. The same function as scaled_dot_product_attention; slower on the Shapes step (0.91x on an H200,
    docs/performance.md)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1).to(v.dtype) @ v


# The attention kernels by name, all the same function: PyTorch's scaled_dot_product_attention choosing its kernel
# (sdpa: cuDNN on Hopper), one of its fused kernels forced, or two matmuls. At Shapes' 80 tokens the fused kernels'
# fixed costs dominate (cuDNN: 2.0 ms of the H200's 15.3 ms step for ~3% of its FLOPs), so which one matters.
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
ATTENTION_KERNELS = ("sdpa", *SDPA_BACKENDS, "matmul")


def attend(q, k, v, kernel):
    """softmax(q k^T / sqrt(head_dim)) v of (batch, heads, tokens, head_dim) tensors, computed by `kernel`."""
    if kernel == "matmul":
        return attention_by_matmuls(q, k, v)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPA_BACKENDS[kernel]):
        return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, hidden, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.kernel = "sdpa"  # one of ATTENTION_KERNELS (use_attention); the function is the same
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        # QK-norm bounds the attention logits, which otherwise grow and destabilise training at high lr.
        self.q_norm = nn.RMSNorm(hidden // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hidden // heads, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x):
        B, N, D = x.shape
        # Normalised in the (B, N, heads, head_dim) layout the projection writes, then viewed as
        # (B, heads, N, head_dim): normalising after the permute cost copies (H100, shapes-gpu step: 17.9 -> 17.1 ms).
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = [z.transpose(1, 2) for z in (self.q_norm(q), self.k_norm(k), v)]
        x = attend(q, k, v, self.kernel)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, hidden, ratio):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TextBlock(nn.Module):
    """Pre-norm self-attention + MLP over the caption tokens alone, without timestep modulation, so
    that "red" can bind to the "circle" after it before any image token attends to them."""

    def __init__(self, hidden, heads, mlp_ratio, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = Attention(hidden, heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = MLP(hidden, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP with adaLN-Zero modulation from the conditioning vector."""

    def __init__(self, hidden, heads, mlp_ratio, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Projector(nn.Module):
    """REPA's projector: a 3-layer MLP with SiLU, per image token, from the model width to the encoder's."""

    def __init__(self, hidden, width, out):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, out))

    def forward(self, x):
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, hidden, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if (cfg.input_size % cfg.patch_size or cfg.hidden % cfg.heads or cfg.hidden % 4
                or cfg.prediction not in ("velocity", "image") or not 0 <= cfg.align_depth <= cfg.depth
                or (cfg.align_depth and cfg.align_width <= 0)):
            raise ValueError(f"inconsistent DiT config: {cfg}")
        self.cfg = cfg
        p, C = cfg.patch_size, cfg.in_channels
        self.patch_embed = nn.Linear(p * p * C, cfg.hidden)
        self.register_buffer("pos_embed", sincos_2d(cfg.hidden, cfg.input_size // p), persistent=False)
        self.t_embed = TimestepEmbedder(cfg.hidden)
        self.text_embed = TextEmbedder(cfg)
        self.text_blocks = nn.ModuleList(TextBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
                                         for _ in range(cfg.text_blocks))
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.hidden, p * p * C)
        self.projector = Projector(cfg.hidden, cfg.projector_width, cfg.align_width) if cfg.align_depth else None
        self.initialize()

    def initialize(self):
        # DiT's init: xavier linears (the projector's too, as REPA's), N(0, 0.02) timestep MLP, zeroed adaLN and
        # output (identity blocks).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.t_embed.mlp[0], self.t_embed.mlp[2]:
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x):
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):
        B, C, p, g = x.shape[0], self.cfg.in_channels, self.cfg.patch_size, self.cfg.input_size // self.cfg.patch_size
        return x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def encode_text(self, text_tokens, text_pooled, drop=None):
        """The caption path: the caption tokens through the caption blocks, and the pooled embedding, at model width.
        It depends on the caption alone, so a sampler computes it once for all its steps (forward's `text`)."""
        text, pooled = self.text_embed(text_tokens[:, :self.cfg.text_len], text_pooled, drop)
        for block in self.text_blocks:
            text = block(text)
        return text, pooled

    def forward(self, x, t, text_tokens, text_pooled, drop=None, align=False, text=None):
        """Velocity prediction for latents x (B, C, H, W) at times t (B,) given caption features (or `text`, their
        encode_text, computed once); with align, also the projected image tokens after block `align_depth`,
        (B, image tokens, align_width)."""
        # The residual stream stays in the layers' dtype (bf16 under autocast): the fp32 position tables would
        # promote it, and an fp32 stream doubles the bytes of every elementwise pass (H100, shapes-gpu step:
        # 17.9 -> 17.1 ms; 16.3-16.5 ms with the QK-norm layout above; records/shapes-baseline-tuning.md, section 15).
        image = self.patch_embed(self.patchify(x))
        image = image + self.pos_embed.to(image.dtype)
        text, pooled = self.encode_text(text_tokens, text_pooled, drop) if text is None else text
        c = self.t_embed(t) + pooled
        h = torch.cat([image, text], dim=1)
        for depth, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if align and depth == self.cfg.align_depth:
                aligned = self.projector(h[:, :image.shape[1]])
        out = self.unpatchify(self.final(h[:, :image.shape[1]], c))
        if self.cfg.prediction == "image":
            # x_t = (1 - t) x + t noise  =>  velocity = (x_t - x) / t; the clamp bounds it near t = 0.
            out = (x - out) / t.clamp(min=0.05).view(-1, 1, 1, 1)
        return (out, aligned) if align else out


# torchao's float8 training recipes by name; "tensorwise_forward": tensorwise FP8 in the forward matmul only, the two
# backward matmuls in bf16 (no casts of gradients or transposes, a third of the FP8 speed-up); and off.
FLOAT8_RECIPES = ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp", "tensorwise_forward")


def float8_config(recipe):
    from torchao.float8 import CastConfig, Float8LinearConfig, ScalingType
    if recipe == "tensorwise_forward":
        full_precision = CastConfig(scaling_type=ScalingType.DISABLED)
        return Float8LinearConfig(cast_config_grad_output=full_precision,
                                  cast_config_weight_for_grad_input=full_precision,
                                  cast_config_input_for_grad_weight=full_precision,
                                  cast_config_grad_output_for_grad_weight=full_precision)
    return Float8LinearConfig.from_recipe_name(recipe)


def use_float8(net, recipe):
    """Swap the token-wise linears of every block (attention qkv and proj, MLP fc1 and fc2: 95% of XL/2's
    FLOPs) for torchao's Float8Linear, which runs their matmuls in FP8 with dynamic scales (`recipe`, one of
    FLOAT8_RECIPES). Weights and their names stay as they were: checkpoints load into a plain DiT. The adaLN,
    embedding and output linears see one row per image or few tokens, where the casts would cost more than the
    FP8 matmul saves."""
    if recipe == "off":
        return net
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError(f"float8 {recipe} needs torchao (pip install -r requirements.txt)") from None
    token_wise = {name for name, m in net.named_modules() if isinstance(m, (Attention, MLP))}
    return convert_to_float8_training(net, config=float8_config(recipe),
                                      module_filter_fn=lambda m, name: name.rpartition(".")[0] in token_wise)


def use_attention(net, kernel):
    """Every attention layer of `net` computes with `kernel` (one of ATTENTION_KERNELS); weights are untouched.
    A kernel PyTorch lacks for the net's device is refused here, not at the first step."""
    param = next(net.parameters())
    dtype = torch.bfloat16 if param.is_cuda else param.dtype  # the dtype autocast gives attention on a GPU
    q = torch.zeros(1, 1, 8, 64, device=param.device, dtype=dtype)
    try:
        with warnings.catch_warnings(action="ignore"):  # PyTorch warns why each kernel does not apply
            attend(q, q, q, kernel)
    except RuntimeError:
        raise UserError(f"--attention {kernel}: PyTorch has no such kernel for {dtype} on {param.device.type}; "
                        f"choose another of {', '.join(ATTENTION_KERNELS)}") from None
    for m in net.modules():
        if isinstance(m, Attention):
            m.kernel = kernel
    return net


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_image(cfg: DiTConfig, training=True):
    """Matmul FLOPs for one image through the model (x3 for forward + backward when training).

    Counted from the layer shapes: every linear layer at 2*in*out per token it sees, attention at
    2*N*N*D for scores plus 2*N*N*D for the weighted sum, per block. Elementwise ops are left out. The
    projector (align_depth > 0) runs in training only.
    """
    D, N_img, N_txt = cfg.hidden, cfg.image_tokens, cfg.text_len
    N, M = N_img + N_txt, int(D * cfg.mlp_ratio)
    pp_c = cfg.patch_size ** 2 * cfg.in_channels
    per_block = N * 2 * (3 * D * D + D * D + 2 * D * M) + 4 * N * N * D + 2 * D * 6 * D
    per_text_block = N_txt * 2 * (4 * D * D + 2 * D * M) + 4 * N_txt * N_txt * D
    flops = (cfg.depth * per_block + cfg.text_blocks * per_text_block
             + N_img * 2 * pp_c * D  # patch embedding
             + N_txt * 2 * cfg.text_dim * D + 2 * cfg.pooled_dim * D  # text projections
             + 2 * 256 * D + 2 * D * D  # timestep MLP
             + 2 * D * 2 * D + N_img * 2 * D * pp_c)  # final adaLN + output projection
    P = cfg.projector_width
    projector = N_img * 2 * (D * P + P * P + P * cfg.align_width) if cfg.align_depth else 0
    return 3 * (flops + projector) if training else flops


# -----------------------------------------------------------------------------
# Checkpoints: tensors and plain types only, with a hash of their content


def save_checkpoint(state, path):
    """Write a checkpoint atomically, with the sha256 of its contents under "content_sha256"."""
    atomic_write(path, lambda f: torch.save({**state, "content_sha256": content_hash(state)}, f))


def load_checkpoint(path, expected_cfg=None):
    """A checkpoint's dict, loaded without unpickling anything but tensors and plain types, its content hash
    checked; with expected_cfg, one written for another model config is refused."""
    try:
        # mmap: tensors stay in the page cache, shared by every rank that reads the file and paged out under
        # pressure, instead of a private copy of the whole file (XL/2's 10.8 GB, optimizer included) per process
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError:  # a crafted pickle is refused here, before anything in it runs
        raise UserError(f"{path}: not a readable checkpoint of tensors and plain types: it holds other objects, "
                        f"refused without running them") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: not a readable checkpoint of tensors and plain types ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise UserError(f"{path}: not a train_dit.py checkpoint (no 'model_config')")
    stored = ckpt.pop("content_sha256", None)
    if stored is None:
        raise UserError(f"{path}: no content hash (written by a train_dit.py older than the hashed checkpoints)")
    if content_hash(ckpt) != stored:
        raise UserError(f"{path}: content hash mismatch: the file is corrupt or was edited")
    unknown = ckpt["model_config"].keys() - {f.name for f in dataclasses.fields(DiTConfig)}
    if unknown:
        raise UserError(f"{path}: checkpoint config has fields model.py does not know: {sorted(unknown)}")
    if expected_cfg is not None:
        diffs = [f"{k} {v!r} != {getattr(expected_cfg, k)!r}" for k, v in ckpt["model_config"].items()
                 if getattr(expected_cfg, k, None) != v]
        if diffs:
            raise UserError(f"{path}: checkpoint is for another model config ({', '.join(diffs)})")
    return ckpt


def load_weights(module, state_dict, path):
    """load_state_dict, with weights that do not fit the model (model.py edited since?) as a one-line error."""
    missing, unexpected = module.state_dict().keys() - state_dict.keys(), state_dict.keys() - module.state_dict().keys()
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit model.py (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit model.py ({str(e).splitlines()[-1].strip()})") from None

"""train_dit.py: train a text-to-image DiT with flow matching, on a training-clock budget.

    python data.py shapes --out data/shapes                       # the data, once
    python train_dit.py                                           # the Shapes record's recipe, on one GPU
    torchrun --standalone --nproc_per_node=8 train_dit.py --config imagenet
    python train_dit.py --config shapes-cpu                       # no GPU
    python evaluate.py curve runs/shapes                          # sample + score every checkpoint

Read top to bottom: the recipes, setup, data, model and optimizers, the run folder and its log,
the training step, the compile warm-up, the training loop. To attempt a record, change a value of
the recipe below (or the code: model.py for the network) and keep the rules of README.md: fixed
data and data order, 100-NFE sampling.

The training clock starts after an untimed compile warm-up (whose effects on the weights, the
optimizer and the data position are undone) and stops while checkpoints are written. Checkpoints
land every `ckpt_every_seconds` of training clock; `evaluate.py curve` samples and scores them.
`--resume CKPT` continues bit-exactly; SIGTERM or SIGINT finishes the step, checkpoints and exits 0.
"""
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import functools
import gc
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model
from data import UserError
from sample import NFE, guided_steps, sample_latents, time_grid

# =============================================================================
# The recipe: every value of a run, and the named configs of each track
#
# The defaults are the Shapes record (records/shapes/2026-11-24_ShapesSixBlocks200, 170.3 s to 0.90):
# a record attempt changes values here. The numbers behind each choice are in
# records/shapes-baseline-tuning.md (sections named). Comments are the --help texts.


@dataclass(frozen=True)
class Hyperparameters:
    # data and output
    track: str = "shapes"  # the benchmark the run belongs to: shapes or imagenet (must match the data's manifest)
    data: str = "data/shapes"  # shard directory written by data.py
    out: str = "runs/shapes"  # run directory: log.txt, checkpoints/, samples/, curve.*
    # model (model.py)
    hidden: int = 384  # model width
    depth: int = 6  # joint image+caption blocks (Shapes: six beat twelve at 60-150 s budgets, tuning section 12)
    heads: int = 6  # attention heads
    mlp_ratio: float = 4.0  # MLP width / model width
    patch_size: int = 8  # pixels (or latent cells) per patch side: 8 on 64x64 gives 64 image tokens (section 4)
    qk_norm: bool = True  # RMS-normalise queries and keys per head: Muon diverged without it (section 5)
    text_blocks: int = 2  # caption-only blocks before the joint ones: colour binding (section 9)
    prediction: str = "image"  # network output: image (x-prediction, turned into velocity) or velocity (section 1)
    # optimisation
    batch_size: int = 512  # global batch, split evenly over ranks
    micro_batch_size: int = 0  # the largest per-rank chunk; a larger rank batch accumulates its chunks' gradients
        # (0, or a rank batch no larger: the whole rank batch at once). Memory only: the chunks give the same gradient.
    optimizer: str = "muon"  # adamw, or muon: Muon for the blocks' matrices, AdamW for the rest (section 5)
    lr: float = 5e-4  # AdamW learning rate (Shapes: six blocks want half of twelve's rates, section 12)
    muon_lr: float = 0.01  # Muon learning rate
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    lr_warmup_steps: int = 100  # linear warm-up of every learning rate
    lr_cooldown: float = 0.5  # final fraction of the budget over which every lr falls linearly to 0 (section 7)
    weight_decay: float = 0.0  # decoupled weight decay of matrices (AdamW and Muon)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip (0: off)
    skip_nonfinite: bool = False  # a step with NaN/Inf gradients skips its update instead of stopping the run
    ema_decay: float = 0.999  # EMA of the weights, reached after a warm-up (section 2)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)); false: ema_decay from step 0 (DiT)
    # flow matching: x_t = (1 - t) x + t noise, target velocity noise - x
    time_sampling: str = "logit_normal"  # training times: logit_normal (SD3) or uniform
    time_mean: float = 1.0  # logit-normal location; > 0 trains more at high noise, where layout forms (section 10)
    time_std: float = 1.0  # logit-normal scale
    time_mean_cooldown: float = 0.0  # added to time_mean over the lr cooldown, from 0 to this at the end (< 0: more
        # low noise late, where exact edges are learnt, after the layout; section 22)
    text_dropout: float = 0.1  # fraction of captions replaced by the null caption (for guidance)
    # representation alignment (REPA): the external-module track, on data with encoder features (data.py --encoder)
    align_weight: float = 0.0  # weight of REPA's loss, -cos(projected token, encoder feature); 0: off (basic tracks)
    align_depth: int = 2  # joint blocks before the aligned image tokens (REPA: 4 of SiT-B's 12, 8 of SiT-XL's 28)
    projector_width: int = 2048  # hidden width of the 3-layer MLP projector (REPA's)
    # clock and checkpoints
    budget_seconds: float = 200.0  # training-clock seconds
    max_steps: int = 0  # also stop after this many steps (0: no limit)
    ckpt_every_seconds: float = 10.0  # training-clock seconds between checkpoints (a 170 s claim needs <= 10.5)
    log_every: int = 25  # steps between loss reads and clock checks (each one host sync)
    # sampling and evaluation (sample.py and evaluate.py curve read these from the checkpoint)
    cfg_scale: float = 6.0  # classifier-free guidance scale (section 10)
    cfg_interval: tuple = (0.3, 1.0)  # guide only the steps with t in [lo, hi]; the others skip the unconditional half
    time_shift: float = 1.0  # sampler step spacing: > 1 more steps at high noise (SD3's shift), 1 uniform
    sample_weights: str = "ema"  # weights to sample: ema or model (the raw weights)
    eval_per_tag: int = 20  # prompts of each tag that a curve scores (0: all); 20 is what records use
    # systems
    seed: int = 0  # model init, noise, times and caption drops (the data order is the dataset's, fixed)
    compile: bool = True  # torch.compile the model (GPU only)
    float8: str = "off"  # FP8 matmuls in the blocks' token linears (torchao float8 training): one of model.FLOAT8_RECIPES
    max_autotune: bool = False  # compile's max-autotune: Triton matmuls with elementwise epilogues fused (slow compile)
    attention: str = "sdpa"  # attention kernel: sdpa (PyTorch's choice; cuDNN on Hopper), flash, efficient, cudnn,
        # or matmul (two matmuls, compiled): the same function (docs/performance.md, the Shapes step measured)
    compile_muon: bool = False  # torch.compile Muon's update around its matmuls (GPU, with compile)
    compile_warmup_steps: int = 3  # untimed steps that trigger compilation, then undone
    resume: str = ""  # checkpoint to continue from
    verify_full: bool = False  # hash every byte of the data at start (false: sizes and sampled sha256 windows)
    wandb: bool = False  # also log to wandb (if installed)


CONFIGS = {
    # The Shapes record: the defaults above.
    "shapes": Hyperparameters(),
    # The vanilla DiT recipe in this harness, the baseline row of the Shapes records (section 8): DiT-S/8 at
    # DiT's batch, AdamW 1e-4 constant, uniform t, plain EMA 0.9999, no clipping, velocity output.
    "shapes-vanilla": Hyperparameters(
        out="runs/shapes-vanilla", depth=12, qk_norm=False, text_blocks=0, prediction="velocity", batch_size=256,
        optimizer="adamw", lr=1e-4, lr_warmup_steps=0, lr_cooldown=0.0, beta2=0.999, grad_clip=0.0, ema_decay=0.9999,
        ema_warmup=False, time_sampling="uniform", time_mean=0.0, budget_seconds=300, ckpt_every_seconds=30),
    # A first run on a 2-core CPU: the whole loop in about 12 minutes on the first 20k scenes; it shows the loop
    # working, not the speedrun (~75k images in 8 min score about 0.05-0.08; the GPU recipe needs ~350k images for
    # 0.3). Muon + QK-norm + a caption block, a 3e-3 lr with cooldown, or width 192 did no better on 2 cores
    # (tuning section 17).
    "shapes-cpu": Hyperparameters(
        data="data/shapes-cpu", out="runs/shapes-cpu", hidden=128, depth=4, heads=4, qk_norm=False, text_blocks=0,
        batch_size=32, optimizer="adamw", lr=1e-3, lr_warmup_steps=20, lr_cooldown=0.0, ema_decay=0.99,
        time_mean=0.0, budget_seconds=480, ckpt_every_seconds=160, log_every=10, eval_per_tag=5, compile=False),
    # ImageNet: SD-VAE latents 4x32x32 at patch 2 (256 image tokens) + 77 caption tokens. Sized for a few hours on
    # one 8-GPU node (batch 1024: 128 per GPU); NOT tuned on ImageNet here (no weights or data reach this
    # repository's machines): every value is taken from a Shapes measurement or a published recipe, named.
    "imagenet": Hyperparameters(
        track="imagenet", data="data/imagenet", out="runs/imagenet",
        hidden=768, depth=12, heads=12, patch_size=2,  # DiT-B/2 with head dim 64 (kernels tile it exactly; XL's 72
        # is padded): at a few GPU-hours a smaller model learns more per second (Shapes, section 12)
        qk_norm=True, text_blocks=2,  # QK-norm: Shapes section 5, LightningDiT; caption blocks: Shapes section 9
        prediction="velocity",  # SiT, LightningDiT on SD-VAE latents (x-prediction won on Shapes' 48-dim pixel
        # patches, section 1; latents at patch 2 are 16-dim, where velocity is the published choice)
        batch_size=1024, optimizer="muon", muon_lr=0.02, lr=2e-4,  # Muon at Shapes' twelve-block rate (section 5);
        # AdamW's share at LightningDiT's 2e-4 for batch 1024
        beta2=0.95, lr_cooldown=0.5,  # LightningDiT's beta2; cooldown over the last half (Shapes section 7)
        ema_decay=0.9999,  # DiT's decay, with the warm-up (Shapes section 2)
        time_mean=0.0,  # SD3's logit-normal (0, 1): Shapes' mean 1.0 was tuned on 64x64 pixels
        budget_seconds=3 * 3600, ckpt_every_seconds=540,  # 5% of a 3 h claim
        cfg_scale=4.0,  # DiT's and SiT's visual guidance scale; the interval stays Shapes' (0.3, 1)
        log_every=50, eval_per_tag=0),
    # The vanilla DiT recipe in this harness, the ImageNet baseline row (not yet measured): DiT-XL/2 (Peebles &
    # Xie 2023) at its batch and rates, AdamW 1e-4 constant, no clipping, plain EMA 0.9999; flow matching with
    # uniform t and velocity output, as SiT trains DiT's network; guidance 4 at every step (DiT's visual setting).
    "imagenet-vanilla": Hyperparameters(
        track="imagenet", data="data/imagenet", out="runs/imagenet-vanilla", hidden=1152, depth=28, heads=16,
        patch_size=2, qk_norm=False, text_blocks=0, prediction="velocity", batch_size=256, optimizer="adamw", lr=1e-4,
        lr_warmup_steps=0, lr_cooldown=0.0, beta2=0.999, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False,
        time_sampling="uniform", time_mean=0.0, budget_seconds=3 * 3600, ckpt_every_seconds=540, cfg_scale=4.0,
        cfg_interval=(0.0, 1.0), log_every=50, eval_per_tag=0),
}

# The external-module track (README, "Tracks"): `imagenet` plus REPA's alignment (Yu et al. 2024) to the patch features
# of DINOv2 ViT-B/14 (REPA's encoder) that `data.py imagenet --encoder vit_base_patch14_dinov2.lvd142m` stores in the
# shards (docs/imagenet.md, "The external-module track": its step measured, its quality not).
CONFIGS["imagenet-external"] = dataclasses.replace(
    CONFIGS["imagenet"], out="runs/imagenet-external",
    align_weight=0.5,  # REPA's lambda for every model size
    align_depth=4,  # REPA aligns SiT-B's 4th of 12 blocks (SiT-L's and XL's 8th): this is B/2 with 12 joint blocks
    projector_width=2048,  # REPA's projector: Linear-SiLU-Linear-SiLU-Linear, hidden width 2048
    micro_batch_size=512)  # one H200 holds 1,024 of B/2 without alignment (127 GiB) but not with it (out of memory
# while compiling): 512 at a time takes 72.8 GiB; on 8 GPUs the rank batch (128) runs whole

# Allowed values, checked when the flags are read: a bad value fails at once, naming its flag.
CHOICES = {"track": sorted(data.TRACK_SHAPES), "prediction": ["image", "velocity"], "optimizer": ["adamw", "muon"],
           "time_sampling": ["logit_normal", "uniform"], "sample_weights": ["ema", "model"],
           "float8": list(model.FLOAT8_RECIPES), "attention": list(model.ATTENTION_KERNELS)}
# The speed levers and their values when off: --bench with any of them on also times the step with all of them off.
SPEED_LEVERS_OFF = {"float8": "off", "max_autotune": False, "attention": "sdpa", "compile_muon": False}
RANGES = [
    (("hidden", "depth", "heads", "mlp_ratio", "patch_size", "batch_size", "log_every", "ckpt_every_seconds",
      "time_shift", "align_depth", "projector_width"), "> 0", lambda v: v > 0),
    (("lr", "muon_lr", "lr_warmup_steps", "weight_decay", "grad_clip", "time_std", "budget_seconds", "max_steps",
      "compile_warmup_steps", "micro_batch_size", "text_blocks", "eval_per_tag", "align_weight"), ">= 0",
     lambda v: v >= 0),
    (("beta1", "beta2", "muon_momentum"), "in [0, 1)", lambda v: 0 <= v < 1),
    (("ema_decay", "text_dropout", "lr_cooldown"), "in [0, 1]", lambda v: 0 <= v <= 1),
    (("time_mean", "time_mean_cooldown", "cfg_scale"), "finite", math.isfinite),
    (("cfg_interval",), "two times 0 <= lo <= hi <= 1", lambda v: 0 <= v[0] <= v[1] <= 1),
    (("seed",), "in [0, 2**31)", lambda v: 0 <= v < 2 ** 31),
]


def field_docs():
    """{field: (section, help)} read from the comments of Hyperparameters: the recipe documents itself. A comment
    line at the fields' indent heads a section; one indented further continues the field above it."""
    docs, section, name = {}, "", None
    for line in inspect.getsource(Hyperparameters).splitlines():
        if more := re.match(r"        # (.*)", line):
            docs[name] = (section, f"{docs[name][1]} {more[1]}")
        elif heading := re.match(r"    # (.*)", line):
            section = heading[1]
        elif field := re.match(r"    (\w+): \w+ = .*?  # (.*)", line):
            name = field[1]
            docs[name] = (section, field[2])
    return docs


def parse_bool(text):
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0, got {text!r}")
    return value


def parse_args(argv=None):
    """(Hyperparameters, bench options): the named config, then any single field the command line overrides."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", choices=sorted(CONFIGS), default="shapes")
    config = pre.parse_known_args(argv)[0].config
    base = CONFIGS[config]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--config NAME] [--FIELD VALUE ...] [--bench {train,sample}]",
                                epilog="Every default shown is the value of the chosen --config.")
    p.add_argument("--config", choices=sorted(CONFIGS), default="shapes",
                   help="the named recipe to start from (default: shapes, the Shapes record)")
    groups, docs = {}, field_docs()
    for f in dataclasses.fields(Hyperparameters):
        section, text = docs[f.name]
        group = groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
        default = getattr(base, f.name)
        kind = {bool: parse_bool, tuple: float}.get(f.type, f.type)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, choices=CHOICES.get(f.name),
                           default=None, nargs=2 if f.type is tuple else None,
                           metavar=("LO", "HI") if f.type is tuple else "{true,false}" if f.type is bool else None,
                           help=f"{text} (default: {' '.join(map(str, default)) if f.type is tuple else default if default != '' else 'none'})")
    b = p.add_argument_group("benchmark: time the config's model on synthetic data of its track; no checkpoint")
    b.add_argument("--bench", choices=["train", "sample"], default=None,
                   help="train: the training step (img/s, MFU); sample: 100-NFE sampling of batch_size images")
    b.add_argument("--bench-steps", type=int, default=30, help="timed training steps per measurement")
    b.add_argument("--bench-profile", action="store_true",
                   help="also profile the GPU kernels: time and launches per step by kind, the top kernels")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Hyperparameters)
                 if getattr(args, f.name) is not None}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    hp = dataclasses.replace(base, **overrides)
    for names, rule, holds in RANGES:
        for name in names:
            if not holds(getattr(hp, name)):
                p.error(f"argument --{name.replace('_', '-')}: must be {rule}, got {getattr(hp, name)!r}")
    if hp.hidden % hp.heads:
        p.error(f"argument --heads: {hp.heads} does not divide --hidden {hp.hidden}")
    if hp.time_mean_cooldown and not (hp.lr_cooldown and hp.time_sampling == "logit_normal"):
        p.error("argument --time-mean-cooldown: moves the logit-normal location over the cooldown: needs "
                "--time-sampling logit_normal and --lr-cooldown > 0")
    if hp.compile_muon and hp.optimizer != "muon":
        p.error(f"argument --compile-muon: compiles Muon's update: needs --optimizer muon, got {hp.optimizer}")
    if hp.align_weight and hp.align_depth > hp.depth:
        p.error(f"argument --align-depth: {hp.align_depth} is past the model's --depth {hp.depth} blocks")
    if args.bench_profile and (args.bench != "train" or not torch.cuda.is_available()):
        p.error("argument --bench-profile: profiles the GPU kernels of the training step: needs --bench train and "
                f"a GPU, got --bench {args.bench} on {'a GPU' if torch.cuda.is_available() else 'a machine without one'}")
    return hp, argparse.Namespace(name=config, overrides=overrides, bench=args.bench, bench_steps=args.bench_steps,
                                  bench_profile=args.bench_profile)


def next_clock_read(step, log_every, seconds_left, seconds_per_step):
    """The step after which the loop next reads the clock (a host sync): the next multiple of log_every, or sooner
    when the budget runs out before then at the last interval's pace, so that a run stops within about a step of
    its budget (50 of B/2's steps are 27 s, which a 60 s run overshot by 22 s)."""
    return min((step // log_every + 1) * log_every,
               step + max(1, math.ceil(min(seconds_left / seconds_per_step, log_every))))


def cooldown_progress(hp, seconds):
    """How far the cooldown has gone at this training-clock time: 0 before it (or without one), 1 at the end."""
    if hp.lr_cooldown == 0:
        return 0.0
    return min(1.0, max(0.0, 1 - (hp.budget_seconds - seconds) / (hp.lr_cooldown * hp.budget_seconds)))


def lr_scale(hp, step, seconds):
    """Learning-rate multiplier: linear warm-up over steps; with lr_cooldown, a linear fall to 0 at the end
    of the budget, on the training clock (read once per log interval: the lr moves every log_every steps)."""
    return min(1.0, (step + 1) / max(hp.lr_warmup_steps, 1)) * (1 - cooldown_progress(hp, seconds))


def time_mean(hp, seconds):
    """The logit-normal location of the training times: time_mean, moving by time_mean_cooldown over the cooldown."""
    return hp.time_mean + hp.time_mean_cooldown * cooldown_progress(hp, seconds)


def main(hp: Hyperparameters, run: argparse.Namespace):
    # =========================================================================
    # Setup: ranks, device, seeds

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if hp.batch_size % world_size:
        raise UserError(f"--batch-size {hp.batch_size} does not split evenly over {world_size} ranks")
    per_rank = hp.batch_size // world_size
    chunk = min(hp.micro_batch_size or per_rank, per_rank)  # what a rank runs at once (micro_batch_size caps it)
    if per_rank % chunk:
        raise UserError(f"--micro-batch-size {hp.micro_batch_size} does not divide the per-rank batch {per_rank}")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda)
    torch.manual_seed(hp.seed)

    # =========================================================================
    # Data: the fixed seeded order, split over ranks

    aligning = hp.align_weight > 0
    if run.bench:  # random shards in the track's shapes, through the real dataset and loader code
        hp = dataclasses.replace(hp, data=f"data/bench-{hp.track}" + ("-features" if aligning else ""))
        if local_rank == 0:  # one writer per node
            data.build_synthetic(hp.data, hp.track, features=aligning)
        if world_size > 1:
            dist.barrier()
    dataset = data.ShardDataset(hp.data, verify="full" if hp.verify_full else "fast")
    if dataset.manifest["track"] != hp.track:
        raise UserError(f"{Path(hp.data) / 'manifest.json'}: track {dataset.manifest['track']!r}, the config's is "
                        f"{hp.track!r} (pass --data of that track, or --track)")
    # The rules fix the data order: it follows the dataset's own seed, never --seed (which seeds the init
    # and the noise, so that a record's repeated runs differ while seeing the same batches).
    order_seed = dataset.manifest["seed"]
    data_hash = data.order_hash(len(dataset), order_seed)

    # =========================================================================
    # Model, EMA and optimizers (and the state to resume, checked before anything is written)

    cfg = model_config(hp, dataset)
    raw_model = model.DiT(cfg).to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False)
    model.use_float8(raw_model, hp.float8)  # the EMA, which only averages weights, stays a plain DiT
    model.use_attention(raw_model, hp.attention)
    n_params = model.param_count(raw_model)
    optimizers = build_optimizers(hp, raw_model)
    step, train_seconds, position = 0, 0.0, 0
    if hp.resume:
        step, train_seconds, position = resume_state(hp.resume, cfg, raw_model, ema, optimizers, device)
    compiled = raw_model
    if world_size > 1:
        compiled = DDP(raw_model, device_ids=[local_rank] if use_cuda else None)
    if hp.compile and use_cuda:
        # One process: CUDA graphs replay the compiled forward and backward. The S/8 step launches ~1,300 kernels,
        # and launching them took the host 39 ms, longer than the GPU's 31 ms of work. Under DDP the gradient
        # all-reduce hooks run between the graph's pieces, and micro-batches accumulate gradients across replays
        # that may reuse the graph's memory: both compile without CUDA graphs.
        accumulating = chunk < per_rank
        compiled = torch.compile(compiled, mode=compile_mode(hp, graphs=world_size == 1 and not accumulating))

    # =========================================================================
    # The run folder and its log: created only now that the data, the model and the resume state checked out.
    # The log starts with the code and the environment of the run.

    log = RunLog(Path(hp.out) if master else None, resuming=bool(hp.resume), bench=bool(run.bench))
    for name in ("train_dit.py", "model.py", "data.py", "sample.py"):
        log(f"==================== {name}\n{(Path(__file__).parent / name).read_text()}", echo=False)
    log(f"==================== environment\n{environment_report()}", echo=False)
    log(f"==================== hyperparameters\n{json.dumps(asdict(hp), indent=1)}", echo=False)
    log(f"config {run.name}" + (f" with {', '.join(f'{k}={v}' for k, v in run.overrides.items())}" if run.overrides
                                else "") + f" -> {hp.out}")
    log(f"data: {hp.data} track={dataset.manifest['track']} samples={len(dataset)} data_order_hash={data_hash} "
        f"(dataset seed {order_seed}) verified={'full' if hp.verify_full else 'fast'}")
    log(f"model: {asdict(cfg)}", echo=False)
    log(f"params: {n_params:,}  training GFLOP/image: {model.flops_per_image(cfg) / 1e9:.2f}")
    if aligning:  # record.py reads the encoder from this line
        features = dataset.manifest["features"]
        log(f"align: weight {hp.align_weight} after joint block {hp.align_depth} of {hp.depth}, projector width "
            f"{hp.projector_width}; encoder {features['encoder']} weights_sha256={features['weights_sha256']} "
            f"({features['grid']}x{features['grid']}x{features['width']} patch features, precomputed in the data)")
    if hp.resume:
        log(f"resumed from {hp.resume}: step {step}, {train_seconds:.1f} s of training clock")
    wandb_run = start_wandb(hp, log) if hp.wandb and master else None

    # =========================================================================
    # The training step: one update of the global batch (each rank its slice)

    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
    noise_generator = torch.Generator(device)
    step_fn = functools.partial(train_step, hp=hp, model=compiled, optimizers=optimizers, ema_params=ema_params,
                                model_params=model_params, autocast=autocast, generator=noise_generator,
                                latent_shape=dataset.latent_shape, rank=rank, world_size=world_size, chunk=chunk)

    # =========================================================================
    # Compile warm-up, untimed and undone

    if hp.compile and use_cuda and hp.compile_warmup_steps > 0 and run.bench != "sample":
        saved = [copy.deepcopy(m.state_dict()) for m in (raw_model, ema, *optimizers)]
        warm_loader = data.Loader(dataset, hp.batch_size, order_seed, position, rank, world_size, device,
                                  features=aligning)
        batch = next(warm_loader)
        warm_loader.close()
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if use_cuda else []):
            for i in range(hp.compile_warmup_steps):
                step_fn(step + i, batch, train_seconds)
        sync(device)
        for m, state in zip((raw_model, ema, *optimizers), saved):
            m.load_state_dict(state)
        log(f"compile warm-up: {hp.compile_warmup_steps} steps in {time.perf_counter() - t0:.1f} s (untimed, undone)")

    # =========================================================================
    # Benchmark mode (--bench): time the training step above or the sampler, print the numbers, stop

    if run.bench:
        if run.bench == "train":
            report = benchmark_training(hp, run, cfg, n_params, step_fn, dataset, rank, world_size, device)
        else:
            report = benchmark_sampling(hp, cfg, raw_model, dataset, device)
        log(format_bench(report))
        if master:
            with open(Path(hp.out) / "bench.jsonl", "a") as f:
                f.write(json.dumps(report) + "\n")
        if world_size > 1:
            dist.destroy_process_group()
        return report

    # =========================================================================
    # Training loop: read the losses and the clock every log_every steps (sooner near the end of the budget);
    # checkpoint on marks of the clock

    loader = data.Loader(dataset, hp.batch_size, order_seed, position, rank, world_size, device, features=aligning)
    last_checkpoint = hp.resume or None
    # SIGTERM (preemption) or SIGINT (Ctrl-C): finish the step, checkpoint, exit 0. With several ranks the stop
    # is agreed at the next log interval, together with the clock, so that all ranks stop at the same step.
    stop_signals = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop_signals.append(signal.Signals(signum).name))
    next_ckpt = (train_seconds // hp.ckpt_every_seconds + 1) * hp.ckpt_every_seconds
    losses, grad_norms, align_losses = [], [], []
    stopping = False
    # The bar shows only on a terminal; clamped to the budget, since the last interval ends past it.
    bar = tqdm(total=hp.budget_seconds, initial=min(train_seconds, hp.budget_seconds), unit="s", desc="training clock",
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}", disable=not (master and sys.stderr.isatty()))
    next_read = next_clock_read(step, hp.log_every, math.inf, 1.0)  # no pace yet: log_every steps
    sync(device)
    segment_start, data_wait = time.perf_counter(), 0.0
    while train_seconds < hp.budget_seconds and not (hp.max_steps and step >= hp.max_steps):
        # The host's wait for the loader's next batch: a step faster than the loader shows here, not in the GPU.
        fetch = time.perf_counter()
        batch = next(loader)
        data_wait += time.perf_counter() - fetch
        loss, grad_norm, align_loss = step_fn(step, batch, train_seconds)
        losses.append(loss)
        grad_norms.append(grad_norm)
        align_losses.append(align_loss)
        step += 1
        at_max_steps = hp.max_steps and step >= hp.max_steps
        if step < next_read and not at_max_steps and not (stop_signals and world_size == 1):
            continue
        # One host sync per log interval: the losses and gradient norms, then the clock and any stop request
        # (the same on every rank).
        readings = torch.stack([torch.stack(losses), torch.stack(align_losses), torch.stack(grad_norms)])
        if world_size > 1:  # each rank's losses are its slice's means: log the global batch's means
            readings[:2] = readings[:2] / world_size
            dist.all_reduce(readings[:2])
        loss_values, align_values, norm_values = readings.tolist()
        sync(device)
        clock = torch.tensor([train_seconds + time.perf_counter() - segment_start, float(bool(stop_signals))],
                             device=device)
        if world_size > 1:
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
        clock, stopping = clock.tolist()
        first = step - len(loss_values) + 1
        for i, value in enumerate(loss_values):
            log(f"step {first + i} loss {value:.5f}", echo=False)
        check_finite(hp, first, loss_values, norm_values, last_checkpoint, log)
        seconds_per_step = max(clock - train_seconds, 1e-9) / len(loss_values)
        rate = hp.batch_size / seconds_per_step
        align_mean = sum(align_values) / len(align_values)
        log(f"step {step} | train {clock:.3f} s | loss {sum(loss_values) / len(loss_values):.4f} | "
            f"{rate:.0f} img/s | images {step * hp.batch_size} | data wait "
            f"{100 * data_wait / max(clock - train_seconds, 1e-9):.0f}%" + (f" | align {align_mean:.4f}" if aligning else ""),
            echo=bar.disable)
        bar.update(min(clock, hp.budget_seconds) - bar.n)
        bar.set_postfix_str(f"step {step}, loss {loss_values[-1]:.4f}, {rate:.0f} img/s")
        if wandb_run:
            wandb_run.log({"loss": loss_values[-1], "train_seconds": clock, "img_per_s": rate,
                           **({"align": align_values[-1]} if aligning else {})}, step=step)
        losses.clear()
        grad_norms.clear()
        align_losses.clear()
        train_seconds = clock
        done = train_seconds >= hp.budget_seconds or at_max_steps or stopping
        if train_seconds >= next_ckpt or done:  # the clock is stopped while the checkpoint is written
            check_weights(model_params + ema_params, step, last_checkpoint, world_size, log)
            last_checkpoint = Path(hp.out) / "checkpoints" / f"ckpt_{step:07d}.pt"
            if master:
                model.save_checkpoint({
                    "model": raw_model.state_dict(), "ema": ema.state_dict(),
                    "optimizer": [opt.state_dict() for opt in optimizers], "model_config": asdict(cfg),
                    "hparams": asdict(hp), "step": step, "train_seconds": train_seconds,
                    "images_seen": step * hp.batch_size, "params": n_params, "data_order_hash": data_hash,
                    "loader_position": loader.position, "data": str(hp.data), "world_size": world_size,
                    "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if use_cuda else None},
                }, last_checkpoint)
                log(f"checkpoint {last_checkpoint} at {train_seconds:.1f} s, step {step}", echo=bar.disable)
            next_ckpt = (train_seconds // hp.ckpt_every_seconds + 1) * hp.ckpt_every_seconds
        if done:
            break
        next_read = next_clock_read(step, hp.log_every, hp.budget_seconds - train_seconds, seconds_per_step)
        sync(device)
        segment_start, data_wait = time.perf_counter(), 0.0

    loader.close()
    bar.close()
    if stopping:
        log(f"stopped by {(stop_signals or ['a signal to another rank'])[0]} after step {step}: checkpoint "
            f"{last_checkpoint}; continue with --resume {last_checkpoint}")
    else:
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if use_cuda else ""
        log(f"done: {step} steps, {train_seconds:.1f} s of training clock, {step * hp.batch_size} images{memory}; "
            f"checkpoints in {Path(hp.out) / 'checkpoints'}")
    if world_size > 1:
        dist.destroy_process_group()


# =============================================================================
# The pieces of main, in the order it uses them


def compile_mode(hp, graphs):
    """torch.compile's mode: with CUDA graphs where `graphs` allows them, and max-autotune with that lever."""
    if hp.max_autotune:
        return "max-autotune" if graphs else "max-autotune-no-cudagraphs"
    return "reduce-overhead" if graphs else "default"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_config(hp, dataset):
    """The DiT's config: the recipe's model fields and the data's latent and caption shapes; aligning, the projector's
    and the width of the data's encoder features, which must lie on the grid of the model's image tokens."""
    channels, size, _ = dataset.latent_shape
    text = dataset.manifest["text"]
    if size % hp.patch_size:
        raise UserError(f"--patch-size {hp.patch_size} does not divide the data's {size}x{size} latents")
    align = {}
    if hp.align_weight > 0:
        features, grid, where = dataset.manifest.get("features"), size // hp.patch_size, Path(hp.data) / "manifest.json"
        if features is None:
            raise UserError(f"{where}: no encoder features (field 'features'), which --align-weight {hp.align_weight} "
                            f"needs: build the data with --encoder (data.py), or pass --align-weight 0")
        if features["grid"] != grid:
            raise UserError(f"{where}: encoder features on a {features['grid']}x{features['grid']} grid, the model's "
                            f"image tokens are {grid}x{grid} (--patch-size {hp.patch_size}); build the data with "
                            f"--encoder-grid {grid}")
        align = dict(align_depth=hp.align_depth, align_width=features["width"], projector_width=hp.projector_width)
    return model.DiTConfig(input_size=size, in_channels=channels, patch_size=hp.patch_size, hidden=hp.hidden,
                           depth=hp.depth, heads=hp.heads, mlp_ratio=hp.mlp_ratio, qk_norm=hp.qk_norm,
                           text_len=text["seq_len"], text_blocks=hp.text_blocks, text_dim=text["width"],
                           pooled_dim=text["pooled_width"], prediction=hp.prediction, **align)


def build_optimizers(hp, raw_model):
    """AdamW for everything, or Muon for the blocks' weight matrices and AdamW for the rest (embeddings,
    output, norms, biases). Fused AdamW on the CPU too: its found_inf hook is how skip_nonfinite skips a step
    without a host sync."""
    muon_params = [p for name, p in raw_model.named_parameters()
                   if hp.optimizer == "muon" and name.startswith(("blocks.", "text_blocks.")) and p.ndim == 2]
    decay, no_decay = [], []
    for name, p in raw_model.named_parameters():
        if not any(p is q for q in muon_params):
            (decay if p.ndim >= 2 and "null" not in name else no_decay).append(p)
    optimizers = [torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.lr, betas=(hp.beta1, hp.beta2), fused=True)]
    if muon_params:
        optimizers.append(Muon(muon_params, lr=hp.muon_lr, momentum=hp.muon_momentum, weight_decay=hp.weight_decay,
                               compiled=hp.compile_muon and hp.compile and next(raw_model.parameters()).is_cuda))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


# What --resume needs besides the model config and weights; a checkpoint without one is refused by name.
RESUME_FIELDS = {"ema", "optimizer", "step", "train_seconds", "loader_position", "rng"}


def resume_state(path, cfg, raw_model, ema, optimizers, device):
    """Load a checkpoint's weights, EMA, optimizer state and RNG into the run; (step, train seconds, position)."""
    ckpt = model.load_checkpoint(path, cfg)
    missing = sorted(RESUME_FIELDS - ckpt.keys())
    if missing:
        raise UserError(f"{path}: cannot resume from it, it lacks {missing} (an older train_dit.py?)")
    model.load_weights(raw_model, ckpt["model"], path)
    model.load_weights(ema, ckpt["ema"], path)
    for opt, state in zip(optimizers, ckpt["optimizer"], strict=True):
        opt.load_state_dict(state)
    # The batch draws depend on (seed, step) alone; the global RNG is restored for any edit that draws from
    # it (dropout, ...), so that resuming stays bit-exact.
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["train_seconds"], ckpt["loader_position"]


class RunLog:
    """log.txt of a run, on rank 0; every line is also echoed to the terminal unless echo=False.

    Opening it claims the run folder: a lock that a second trainer on the same --out cannot take, and a
    refusal of a folder that already holds checkpoints (unless resuming). A line that cannot be written (a
    full disk) stops the run with one line; the checkpoints written so far stay. Other ranks (out None) log
    nothing.
    """

    def __init__(self, out, resuming=False, bench=False):
        self.file = None
        if out is None:
            return
        self.path = out / "log.txt"
        (out if bench else out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.lock = open(out / ".lock", "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            raise UserError(f"{out}: another trainer is writing to this folder ({self.lock.read().strip() or 'pid ?'}); "
                            f"pass another --out") from None
        if not resuming and not bench and list((out / "checkpoints").glob("*.pt")):
            raise UserError(f"{out / 'checkpoints'}: already holds checkpoints; pass --resume or another --out")
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"pid {os.getpid()} on {platform.node()}\n")
        self.lock.flush()
        self.file = open(self.path, "a")

    def __call__(self, msg, echo=True):
        if self.file is None:
            return
        try:
            self.file.write(msg + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"{self.path}: could not be written ({e.strerror or e}); training stopped, "
                            f"the checkpoints written so far are kept") from None
        if echo:
            tqdm.write(msg)


def start_wandb(hp, log):
    try:
        import wandb
    except ImportError:
        log("wandb requested but not installed: logging to log.txt only")
        return None
    return wandb.init(project="imagegen-speedrun", config=asdict(hp), dir=hp.out)


def draw_noise(hp, step, seconds, latent_shape, generator, rank, world_size):
    """The global batch's noise, times and caption drops, from (seed, step) alone (and the training clock, where
    time_mean_cooldown moves the times): every rank draws all of them and keeps its slice, so world size and resume
    do not change the run."""
    device = generator.device
    generator.manual_seed(hp.seed * 1_000_003 + step)
    noise = torch.randn((hp.batch_size, *latent_shape), generator=generator, device=device)
    if hp.time_sampling == "logit_normal":
        logits = torch.randn((hp.batch_size,), generator=generator, device=device)
        t = torch.sigmoid(time_mean(hp, seconds) + hp.time_std * logits)
    else:
        t = torch.rand((hp.batch_size,), generator=generator, device=device)
    drop = torch.rand((hp.batch_size,), generator=generator, device=device) < hp.text_dropout
    per_rank = hp.batch_size // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return noise[mine], t[mine], drop[mine]


def alignment_loss(projected, features):
    """REPA's loss: minus the cosine similarity of each projected image token (B, N, E) to the encoder's feature of
    its patch of the clean image (B, N, E), averaged over the tokens and the images."""
    return -(F.normalize(projected.float(), dim=-1) * F.normalize(features.float(), dim=-1)).sum(-1).mean()


def train_step(step, batch, seconds, *, hp, model, optimizers, ema_params, model_params, autocast, generator,
               latent_shape, rank, world_size, chunk):
    """One update: flow matching on x_t = (1 - t) x + t noise, target velocity noise - x, plus align_weight times the
    alignment loss. Returns the flow-matching loss, the gradient norm and the alignment loss (0 when off) on the
    device (read once per log interval)."""
    latents, text_tokens, text_pooled, _, features = batch
    aligning = hp.align_weight > 0
    noise, t, drop = draw_noise(hp, step, seconds, latent_shape, generator, rank, world_size)
    x_t = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
    scale = lr_scale(hp, step, seconds)
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["lr"] = group["peak_lr"] * scale
    per_rank = len(latents)
    loss, align = 0.0, torch.zeros((), device=latents.device)
    for start in range(0, per_rank, chunk):
        part = slice(start, start + chunk)
        last = start + chunk >= per_rank
        # DDP all-reduces gradients on the last chunk only; the chunks' losses add up to the batch mean.
        with (model.no_sync() if world_size > 1 and not last else contextlib.nullcontext()), autocast:
            output = model(x_t[part], t[part], text_tokens[part], text_pooled[part], drop[part], align=aligning)
        velocity, projected = output if aligning else (output, None)
        share = len(velocity) / per_rank
        chunk_loss = F.mse_loss(velocity.float(), (noise - latents)[part]) * share
        if aligning:
            chunk_align = alignment_loss(projected, features[part]) * share
            (chunk_loss + hp.align_weight * chunk_align).backward()
            align = align + chunk_align.detach()
        else:
            chunk_loss.backward()
        loss = loss + chunk_loss.detach()
    # The gradient norm is read with the loss to catch a non-finite step; after DDP's all-reduce it is the same
    # on every rank, so every rank skips (or not) alike.
    if hp.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model_params, hp.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model_params if p.grad is not None])
    # EMA warm-up: a fixed 0.999 would keep 43% of the random init after 850 steps (section 2).
    ema_weight = 1 - (min(hp.ema_decay, (1 + step) / (10 + step)) if hp.ema_warmup else hp.ema_decay)
    if hp.skip_nonfinite:
        # Fused AdamW (and Muon) skip their whole update on the device where found_inf is nonzero (the hook
        # torch.amp.GradScaler uses), so skipping costs no host sync. The EMA step is masked alike, with one
        # 0-dim weight per tensor (the scalar-weight lerp would read it on the host).
        skip = (~torch.isfinite(grad_norm)).float()
        for opt in optimizers:
            opt.found_inf = skip
        ema_weight = [ema_weight * (1 - skip)] * len(ema_params)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, model_params, ema_weight)
    return loss.detach(), grad_norm.detach(), align


def check_finite(hp, first, loss_values, norm_values, last_checkpoint, log):
    """Stop on a non-finite loss or gradient norm, before this interval's checkpoint: none ever holds what
    followed (with skip_nonfinite, a non-finite gradient only skipped its step's update)."""
    for i, (value, norm) in enumerate(zip(loss_values, norm_values)):
        if math.isfinite(value) and math.isfinite(norm):
            continue
        if hp.skip_nonfinite and not math.isfinite(norm):
            log(f"step {first + i}: loss {value}, gradient norm {norm}: update skipped (skip_nonfinite)")
            continue
        message = (f"step {first + i}: loss {value}, gradient norm {norm}: not finite, training stopped; "
                   f"last good checkpoint: {last_checkpoint or 'none written yet'} (--skip-nonfinite true skips such steps)")
        log(f"error: {message}", echo=False)
        raise UserError(message)


def check_weights(params, step, last_checkpoint, world_size, log):
    """Before a checkpoint, on every rank: the weights are finite (an update can blow them up with finite
    gradients, a huge learning rate) and, under DDP, identical on every rank (exact per-tensor sums)."""
    if not torch.stack([torch.isfinite(p).all() for p in params]).all():
        raise UserError(f"step {step}: the weights are not finite (NaN/Inf) after the update; no checkpoint "
                        f"written, the last good one is {last_checkpoint or 'none (none written yet)'}")
    if world_size > 1:
        fingerprint = torch.stack([p.double().pow(2).sum() for p in params])
        every = [torch.empty_like(fingerprint) for _ in range(world_size)]
        dist.all_gather(every, fingerprint)
        if not all(torch.equal(every[0], f) for f in every[1:]):
            raise UserError(f"step {step}: the ranks' weights differ (DDP replicas diverged)")
        log(f"step {step}: weights identical on all {world_size} ranks", echo=False)


def environment_report():
    lines = [f"python {sys.version.split()[0]}  torch {torch.__version__}  platform {platform.platform()}",
             f"cuda available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}  cuda {torch.version.cuda}")
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi: not available")
    return "\n".join(lines)


# =============================================================================
# Benchmark: throughput, MFU against a matmul peak measured in this process, memory, loader share


def benchmark_training(hp, run, cfg, n_params, step_fn, dataset, rank, world_size, device):
    """Times bench_steps training steps twice: on one batch reused (the step alone) and fed by the loader (the
    step as training runs it); their difference is the loader's share of the step."""
    loader = data.Loader(dataset, hp.batch_size, dataset.manifest["seed"], 0, rank, world_size, device,
                         features=hp.align_weight > 0)
    batch = next(loader)

    def timed(next_batch):
        sync(device)
        start = time.perf_counter()
        for i in range(run.bench_steps):
            loss, _, _ = step_fn(i, next_batch(), 0.0)
        loss.item()  # one host sync, at the end
        sync(device)
        return (time.perf_counter() - start) / run.bench_steps

    use_cuda = device.type == "cuda"
    # The memory peak is the whole process's, compile warm-up included: CUDA graphs keep the step's activations in
    # a pool their replays reuse without allocating, so a peak counted over the timed steps alone would leave them
    # out (it read 16.0 GiB for XL/2 at batch 256, whose training run peaks at 109.9).
    # Alternated, best of two each: a GPU that warms up and clocks down would bias a fixed order.
    step_alone, step_fed = (min(pair) for pair in zip(*[(timed(lambda: batch), timed(lambda: next(loader)))
                                                      for _ in range(2)]))
    loader.close()
    flops = model.flops_per_image(cfg)
    report = {"bench": "train", "model": f"{cfg.hidden}x{cfg.depth}/{cfg.patch_size}", "track": hp.track,
              "align": f"block {cfg.align_depth}, projector {cfg.projector_width}, weight {hp.align_weight}"
              if cfg.align_depth else "off",
              "latent": dataset.latent_shape, "text_tokens": cfg.text_len, "batch": hp.batch_size,
              "world_size": world_size, "optimizer": hp.optimizer, "compile": bool(hp.compile and use_cuda),
              "float8": hp.float8, "max_autotune": hp.max_autotune, "attention": hp.attention,
              "compile_muon": bool(hp.compile_muon and hp.compile and use_cuda),
              "params": n_params, "gflop_per_image": flops / 1e9, "ms_per_step": 1e3 * step_alone,
              "img_per_s": hp.batch_size / step_alone, "loader_share": step_fed / step_alone - 1,
              "device": torch.cuda.get_device_name(device) if use_cuda else "cpu", "torch": torch.__version__}
    if use_cuda:
        peak = data.matmul_peak_flops(device)
        achieved = flops * hp.batch_size / world_size / step_alone  # per GPU
        report.update(peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30, tflops=achieved / 1e12,
                      matmul_peak_tflops=peak / 1e12, mfu=achieved / peak)
        if run.bench_profile:
            report["gpu_busy_ms"], report["kernels"] = profile_kernels(lambda i: step_fn(i, batch, 0.0), device)
    return report


def benchmark_sampling(hp, cfg, raw_model, dataset, device):
    """100-NFE sampling of batch_size images with the config's model (random weights: they do not change the
    work), once with guidance on every step and once on the config's cfg_interval. FLOPs per image are the
    counted forward FLOPs times the evaluations: 2 per guided step (both branches), 1 per unguided one."""
    net = raw_model.eval()
    forward = torch.compile(net, mode=compile_mode(hp, graphs=True)) if hp.compile and device.type == "cuda" else net
    g = torch.Generator().manual_seed(0)
    text = dataset.manifest["text"]
    noise, tokens, pooled = (torch.randn((hp.batch_size, *s), generator=g).to(device)
                             for s in (dataset.latent_shape, (text["seq_len"], text["width"]), (text["pooled_width"],)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def timed(cfg_interval, nfe=NFE):
        sync(device)
        start = time.perf_counter()
        with autocast:
            sample_latents(forward, noise, tokens, pooled, hp.cfg_scale, nfe, hp.time_shift, cfg_interval)
        sync(device)
        return time.perf_counter() - start

    timed((0.75, 1.0), nfe=2)  # compiles both batch shapes: step 1 guided (2B images), step 2 not (B)
    use_cuda = device.type == "cuda"
    peak = data.matmul_peak_flops(device) if use_cuda else None
    rows = []
    for interval in dict.fromkeys([(0.0, 1.0), tuple(hp.cfg_interval)]):
        seconds = timed(interval)
        evaluations = NFE + sum(guided_steps(time_grid(NFE, hp.time_shift), interval))
        flops = model.flops_per_image(cfg, training=False) * evaluations * hp.batch_size
        row = {"cfg_interval": list(interval), "forward_passes_per_image": evaluations, "seconds": seconds,
               "img_per_s": hp.batch_size / seconds, "forward_img_per_s": hp.batch_size * evaluations / seconds}
        if peak:
            row.update(tflops=flops / seconds / 1e12, mfu=flops / seconds / peak)
        rows.append(row)
    return {"bench": "sample", "model": f"{cfg.hidden}x{cfg.depth}/{cfg.patch_size}", "track": hp.track,
            "batch": hp.batch_size, "compile": bool(hp.compile and use_cuda), "float8": hp.float8,
            "max_autotune": hp.max_autotune, "attention": hp.attention, "params": model.param_count(net),
            "gflop_per_forward": model.flops_per_image(cfg, training=False) / 1e9, "rows": rows,
            "matmul_peak_tflops": peak / 1e12 if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if use_cuda else None,
            "device": torch.cuda.get_device_name(device) if use_cuda else "cpu", "torch": torch.__version__}


def profile_kernels(run_step, device, steps=5):
    """(GPU busy ms per step, [(kernel name, ms per step, share of GPU time, launches per step)] of every GPU kernel,
    most expensive first). Busy time well under the step's means the GPU waits: on the host's launches or on data;
    many launches of a few microseconds each mean a step bound by per-kernel costs, not by FLOPs or bytes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            run_step(i)
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return total / 1e3 / steps, [(e.key[:90], e.self_device_time_total / 1e3 / steps, e.self_device_time_total / total,
                                  e.count / steps) for e in kernels]


def levers_text(r):
    """'compile True max-autotune | float8 tensorwise | attention sdpa' of a bench report: its speed settings."""
    return (f"compile {r['compile']}{' max-autotune' if r['max_autotune'] else ''}"
            f"{' + Muon' if r.get('compile_muon') else ''} | float8 {r['float8']} | attention {r['attention']}")


PROFILE_TOP = 20  # kernels printed by --bench-profile; bench.jsonl keeps them all
# Kernels by name, the first kind that matches (attention first: the efficient kernel is a CUTLASS fmha); the rest
# are eager elementwise kernels, reductions, optimizers and copies.
KERNEL_KINDS = {"attention": ("sdpa", "flash", "fmha", "cudnn"), "matmuls": ("nvjet", "gemm", "cutlass", "splitKreduce"),
                "compiled": ("triton_",)}


def kernel_kind(name):
    return next((kind for kind, marks in KERNEL_KINDS.items() if any(m in name for m in marks)), "other")


def format_bench(r):
    if r["bench"] == "sample":
        lines = []
        for row in r["rows"]:
            line = (f"bench sample | {r['model']} {r['track']} | batch {r['batch']} | {levers_text(r)} | 100 NFE, "
                    f"cfg interval {row['cfg_interval']}: {row['forward_passes_per_image']} forward passes per image | "
                    f"{row['seconds']:.2f} s | {row['img_per_s']:.2f} img/s | {row['forward_img_per_s']:.0f} forward img/s")
            if "mfu" in row:
                line += (f" | {row['tflops']:.0f} TFLOP/s of {r['matmul_peak_tflops']:.0f} measured bf16 peak | "
                         f"MFU {100 * row['mfu']:.1f}% | peak mem {r['peak_mem_gib']:.1f} GiB")
            lines.append(line)
        return "\n".join(lines)
    line = (f"bench train | {r['model']} {r['track']} {'x'.join(map(str, r['latent']))} + {r['text_tokens']} text tokens | "
            f"batch {r['batch']} on {r['world_size']} rank(s) | {r['optimizer']} | align {r['align']} | "
            f"{levers_text(r)} | "
            f"params {r['params'] / 1e6:.1f}M | {r['gflop_per_image']:.1f} GFLOP/img | {r['ms_per_step']:.1f} ms/step | "
            f"{r['img_per_s']:.0f} img/s | loader share {100 * r['loader_share']:+.1f}%")
    if "mfu" in r:
        line += (f" | {r['tflops']:.0f} TFLOP/s of {r['matmul_peak_tflops']:.0f} measured bf16 peak | "
                 f"MFU {100 * r['mfu']:.1f}% | peak mem {r['peak_mem_gib']:.1f} GiB")
    if "kernels" in r:
        kinds = {kind: [(ms, launches) for name, ms, _, launches in r["kernels"] if kernel_kind(name) == kind]
                 for kind in [*KERNEL_KINDS, "other"]}
        line += (f"\n  GPU busy {r['gpu_busy_ms']:.2f} ms/step of {r['ms_per_step']:.2f} in "
                 f"{sum(n for _, _, _, n in r['kernels']):,.0f} kernel launches: "
                 + ", ".join(f"{kind} {sum(ms for ms, _ in rows):.2f} ({sum(n for _, n in rows):.0f})"
                             for kind, rows in kinds.items()) + "; the top kernels:")
    for name, ms, share, launches in r.get("kernels", [])[:PROFILE_TOP]:
        line += f"\n  {ms:8.2f} ms/step {100 * share:5.1f}% {launches:5.0f}x  {name}"
    return line


# =============================================================================
# Muon: momentum, then the update matrix orthogonalised (Keller Jordan's optimizer for hidden matrices)


def orthogonalize(g, steps=5):
    """U V^T of the SVD of each matrix in g (batch, rows, cols), approximately: a quintic Newton-Schulz
    iteration in bf16. Its coefficients push every singular value into about [0.7, 1.2] in 5 steps,
    an inexact orthogonalisation that Muon tolerates, for a fraction of the cost of an SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    x = x.mT if tall else x  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1
    for _ in range(steps):  # x <- a x + (b G + c G^2) x with G = x x^T: three batched matmuls, scalars fused in
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


def nesterov_orthogonalized(grads, momenta, momentum):
    """Muon's update direction for matrices of one shape: the momentum step (in place), then the Nesterov
    gradient of each, orthogonalised as one batch."""
    torch._foreach_lerp_(momenta, grads, 1 - momentum)
    return orthogonalize(torch.stack(torch._foreach_lerp(grads, momenta, momentum)))


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised and scaled to the matrix's shape.

    Matrices of one shape are orthogonalised together, as one batch; with `compiled`, torch.compile fuses the
    momentum, the casts and the iteration's scalars around its matmuls (eager, about 25 launches per shape). Like
    fused AdamW, a nonzero `found_inf` tensor (set by the trainer) skips the update on the device, without a host sync.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, compiled=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.found_inf = None
        # One graph per shape; the learning rate stays outside, so its schedule recompiles nothing.
        self.direction = torch.compile(nesterov_orthogonalized, dynamic=False) if compiled else nesterov_orthogonalized

    @torch.no_grad()
    def step(self):
        keep = 1.0 if self.found_inf is None else 1 - self.found_inf
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                momenta = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
                grads = [p.grad for p in params]
                if self.found_inf is not None:  # lerp(m, m) = m: a skipped step leaves the momentum as it was
                    grads = [torch.where(self.found_inf > 0, m, g) for m, g in zip(momenta, grads)]
                # max(1, rows/cols)^0.5: a tall matrix's orthogonal update has the RMS of a square one.
                updates = (self.direction(grads, momenta, group["momentum"])
                           * (keep * group["lr"] * max(1.0, rows / cols) ** 0.5))
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - keep * group["lr"] * group["weight_decay"])
                torch._foreach_sub_(params, list(updates.unbind(0)))


def bench(hp, run):
    """--bench: the config's numbers, and with any speed lever on, first the same model with every lever off
    (SPEED_LEVERS_OFF) in the same process, then the ratio of the two: every speed change against one yardstick."""
    levers_on = {k: getattr(hp, k) for k, off in SPEED_LEVERS_OFF.items() if getattr(hp, k) != off}
    if not levers_on:
        return main(hp, run)
    off = {k: SPEED_LEVERS_OFF[k] for k in levers_on}
    reference = main(dataclasses.replace(hp, **off), argparse.Namespace(**{**vars(run),
                                                                          "overrides": {**run.overrides, **off}}))
    gc.collect()  # the reference's model, its compiled graphs and its log's lock go before the next
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report = main(hp, run)
    rates = ([(row["img_per_s"], ref["img_per_s"]) for row, ref in zip(report["rows"], reference["rows"])]
             if run.bench == "sample" else [(report["img_per_s"], reference["img_per_s"])])
    ratio = {"bench": "ratio", "levers": levers_on, "ratios": [mine / ref for mine, ref in rates]}
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"bench ratio | {', '.join(f'{k}={v}' for k, v in levers_on.items())} against every lever off | "
              + " | ".join(f"{r:.2f}x img/s" for r in ratio["ratios"]))
        with open(Path(hp.out) / "bench.jsonl", "a") as f:
            f.write(json.dumps(ratio) + "\n")
    return report


if __name__ == "__main__":
    try:
        hp, run = parse_args()
        (bench if run.bench else main)(hp, run)
    except UserError as e:
        sys.exit(f"error: {e}")

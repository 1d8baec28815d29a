"""train_dit.py: train a text-to-image DiT with flow matching, on a training-clock budget.

    python data.py shapes --out data/shapes                        # build the data once
    torchrun --standalone --nproc_per_node=1 train_dit.py --preset shapes-gpu
    python train_dit.py --preset shapes-cpu --budget_seconds 120   # no GPU
    python evaluate.py curve runs/shapes                           # sample + score every checkpoint

Read top to bottom: hyperparameters, setup, logging, data, model and optimizer, the training
step, the compile warm-up, the training loop. To attempt a record, change what you need here (or
in model.py) and keep the rules of README.md: fixed data and data order, 100-NFE sampling.

The training clock starts after an untimed compile warm-up (whose effects on weights, optimizer
and data position are undone) and stops while checkpoints are written. Checkpoints land every
`ckpt_every_seconds` of training clock; sample.py and evaluate.py turn them into the curve.

Reliability: `--resume CKPT` continues bit-exactly (weights, EMA, optimizer, data position, RNG,
training clock). SIGTERM or SIGINT finishes the step, checkpoints and exits 0. A NaN/Inf loss or
gradient stops the run naming the step, before any checkpoint holds such weights (or, with
`--skip_nonfinite true`, skips that step's update). Checkpoints are written atomically; a full
disk is a one-line error that replaces nothing.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
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

import data
import model as dit

# =============================================================================
# Hyperparameters


@dataclass
class Hyperparameters:
    # data and output
    data: str = "data/shapes"  # shard directory written by data.py
    out: str = "runs/shapes"  # run directory: log.txt, checkpoints/, samples/, curve.*
    # model
    model: str = "S"  # width/depth preset in model.PRESETS
    depth: int = 0  # joint blocks, overriding the preset's depth (0: the preset's)
    patch_size: int = 4
    qk_norm: bool = False  # RMS-normalise queries and keys per head (stabilises attention at high lr)
    text_blocks: int = 0  # caption-only transformer blocks before the joint blocks (model.py, TextBlock)
    prediction: str = "image"  # "image" (x-prediction, turned into velocity) or "velocity"; see model.py
    # optimisation
    batch_size: int = 256  # global batch, split evenly over ranks
    micro_batch_size: int = 0  # per-rank forward/backward chunk, gradients accumulated (0: the whole rank batch)
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the blocks' weight matrices, AdamW for the rest
    lr: float = 3e-4  # AdamW learning rate
    muon_lr: float = 0.02  # Muon learning rate (with --optimizer muon)
    muon_momentum: float = 0.95
    lr_warmup_steps: int = 100
    lr_cooldown: float = 0.0  # final fraction of budget_seconds over which every lr falls linearly to 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables
    skip_nonfinite: bool = False  # a step with NaN/Inf gradients skips its update instead of stopping the run
    ema_decay: float = 0.999  # reached after a warm-up: decay at step s is min(ema_decay, (1 + s) / (10 + s))
    ema_warmup: bool = True  # false: ema_decay from the first step (plain EMA, as DiT)
    # flow matching
    time_sampling: str = "logit_normal"  # "logit_normal" (SD3) or "uniform"
    time_mean: float = 0.0  # logit-normal location; > 0 trains more at high noise, where layout forms
    time_std: float = 1.0  # logit-normal scale
    text_dropout: float = 0.1  # fraction of captions replaced by the null caption (for CFG)
    # clock and checkpoints
    budget_seconds: float = 300.0  # training-clock seconds
    max_steps: int = 0  # also stop after this many steps (0: no limit)
    ckpt_every_seconds: float = 30.0
    log_every: int = 25  # steps between loss reads and clock checks (each is one host sync)
    # systems
    seed: int = 0  # model init, noise, times and caption drops (the data order is the dataset's, fixed)
    compile: bool = True  # torch.compile the model (GPU only)
    compile_warmup_steps: int = 3  # untimed steps that trigger compilation, then undone
    resume: str = ""  # checkpoint to continue from
    verify_full: bool = False  # hash every byte of the data at start (default: sizes + sampled sha256 windows)
    wandb: bool = False  # log to wandb (if installed)
    # benchmark mode: time steps on synthetic shards of a track's shapes, print a table, write no checkpoint
    bench: str = ""  # "shapes" or "imagenet" (4x32x32 latents, 77 caption tokens); "" trains
    bench_steps: int = 30  # timed steps per measurement
    bench_profile: bool = False  # also print the top GPU kernels by time (torch.profiler)


# Presets are data: named overrides of the defaults above. CLI flags override a preset.
PRESETS = {
    # S/8 over S/4 (H100, lr 1e-3, 150 s): overall 0.488 vs ~0.45; 64 image tokens give 3x the images/s.
    # Muon + QK-norm (H100, 100 s): overall 0.523 vs 0.408 with AdamW; Muon without QK-norm diverged at
    # step ~1300. lr cooldown over the last half (H100, 300 s): 0.829 vs 0.783 at constant lr.
    # Two caption blocks and times at logit-normal mean 0.5 (H100, 100 s): 0.660 and 0.702 vs 0.596; together,
    # 300 s: 0.906 vs 0.840. Times at mean 1.0 (300 s, full list): 0.910 vs 0.885, colour attributes 0.81 vs 0.64
    # (records/shapes-baseline-tuning.md, sections 7, 9 and 10).
    # Six blocks instead of twelve at half the learning rates (H100, 60 s): overall 0.692 vs 0.492; at 150 s,
    # 0.902, 0.935 and 0.892 on three seeds (section 12). Record 1 ran the twelve-block preset for 300 s; record 2 ran
    # this one with --budget_seconds 200 --ckpt_every_seconds 10 (170.3 s to 0.90, section 13).
    "shapes-gpu": dict(data="data/shapes", out="runs/shapes", model="S", depth=6, patch_size=8, batch_size=512,
                       optimizer="muon", qk_norm=True, lr=5e-4, muon_lr=0.01, lr_cooldown=0.5, text_blocks=2,
                       time_mean=1.0, budget_seconds=150, ckpt_every_seconds=15, log_every=25),
    # The vanilla DiT recipe in this harness, the baseline row of the records (DiT-S/8, DiT's batch,
    # AdamW 1e-4 constant, plain EMA 0.9999, no clipping; flow matching with uniform t, velocity output).
    "shapes-vanilla": dict(data="data/shapes", out="runs/shapes-vanilla", model="S", patch_size=8, batch_size=256,
                           prediction="velocity", lr=1e-4, lr_warmup_steps=0, beta2=0.999, grad_clip=0.0,
                           ema_decay=0.9999, ema_warmup=False, time_sampling="uniform", budget_seconds=300,
                           ckpt_every_seconds=30, log_every=25),
    "shapes-cpu": dict(data="data/shapes-cpu", out="runs/shapes-cpu", model="tiny", patch_size=8,
                       batch_size=32, lr=1e-3, lr_warmup_steps=20, ema_decay=0.99, budget_seconds=300,
                       ckpt_every_seconds=100, log_every=10, compile=False),
    # SD-VAE latents 4x32x32, patch 2: 256 image tokens + 77 caption tokens (python data.py imagenet).
    "imagenet-gpu": dict(data="data/imagenet", out="runs/imagenet", model="B", patch_size=2, batch_size=256,
                         lr=1e-4, prediction="velocity", ema_decay=0.9999, budget_seconds=6 * 3600,
                         ckpt_every_seconds=600, log_every=50),
}


# Allowed values, checked when the flags are read: a bad value fails at once, naming its flag,
# instead of deep in the run (a zero log_every, a NaN learning rate, a seed numpy refuses).
CHOICES = {"model": sorted(dit.PRESETS), "prediction": ["image", "velocity"], "optimizer": ["adamw", "muon"],
           "time_sampling": ["logit_normal", "uniform"], "bench": ["", *sorted(data.TRACK_SHAPES)]}
RANGES = [
    (("patch_size", "batch_size", "log_every", "ckpt_every_seconds", "bench_steps"), "> 0", lambda v: v > 0),
    (("lr", "muon_lr", "lr_warmup_steps", "weight_decay", "grad_clip", "time_std", "budget_seconds", "max_steps",
      "compile_warmup_steps", "micro_batch_size", "text_blocks", "depth"), ">= 0", lambda v: v >= 0),
    (("beta1", "beta2", "muon_momentum"), "in [0, 1)", lambda v: 0 <= v < 1),
    (("ema_decay", "text_dropout", "lr_cooldown"), "in [0, 1]", lambda v: 0 <= v <= 1),
    (("time_mean",), "finite", math.isfinite),
    (("seed",), "in [0, 2**31)", lambda v: 0 <= v < 2 ** 31),
]


def parse_bool(text):
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0, got {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="named set of overrides")
    for f in dataclasses.fields(Hyperparameters):
        p.add_argument(f"--{f.name}", type=parse_bool if f.type is bool else f.type, choices=CHOICES.get(f.name),
                       default=None, help=f"default {f.default!r}")
    args = p.parse_args(argv)
    overrides = dict(PRESETS[args.preset]) if args.preset else {}
    overrides.update({k: v for k, v in vars(args).items() if k != "preset" and v is not None})
    hp = Hyperparameters(**overrides)
    for names, rule, holds in RANGES:
        for name in names:
            if not holds(getattr(hp, name)):
                p.error(f"argument --{name}: must be {rule}, got {getattr(hp, name)!r}")
    return hp


def lr_scale(hp, step, seconds):
    """Learning-rate multiplier: linear warm-up over steps; with lr_cooldown, a linear fall to 0 at the end
    of the budget, on the training clock (read once per log interval: the lr moves every log_every steps)."""
    warmup = min(1.0, (step + 1) / max(hp.lr_warmup_steps, 1))
    if hp.lr_cooldown == 0:
        return warmup
    return warmup * min(1.0, max(0.0, (hp.budget_seconds - seconds) / (hp.lr_cooldown * hp.budget_seconds)))


def main(hp: Hyperparameters):
    # =========================================================================
    # Setup: distributed, device, seeds

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
        raise data.UserError(f"--batch_size {hp.batch_size} does not split evenly over {world_size} ranks")
    if hp.micro_batch_size and (hp.batch_size // world_size) % hp.micro_batch_size:
        raise data.UserError(f"--micro_batch_size {hp.micro_batch_size} does not divide the per-rank batch "
                             f"{hp.batch_size // world_size}")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda)
    torch.manual_seed(hp.seed)

    def sync():
        if use_cuda:
            torch.cuda.synchronize(device)

    # =========================================================================
    # Logging: the log starts with the code and the environment of the run

    out = Path(hp.out)
    if not hp.resume and not hp.bench and list((out / "checkpoints").glob("*.pt")):
        # A second run into the same folder would mix two runs' logs and curves.
        raise data.UserError(f"{out / 'checkpoints'}: already holds checkpoints; pass --resume or another --out")
    (out if hp.bench else out / "checkpoints").mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "a") if master else None

    def log(msg, echo=True):
        if master:
            logfile.write(msg + "\n")
            logfile.flush()
            if echo:
                print(msg)

    for name in ("train_dit.py", "model.py", "data.py"):
        log(f"==================== {name}\n{(Path(__file__).parent / name).read_text()}", echo=False)
    log(f"==================== environment\n{environment_report()}", echo=False)
    log(f"==================== hyperparameters\n{json.dumps(asdict(hp), indent=1)}")

    wandb_run = None
    if hp.wandb and master:
        try:
            import wandb
            wandb_run = wandb.init(project="imagegen-speedrun", config=asdict(hp), dir=str(out))
        except ImportError:
            log("wandb requested but not installed: logging to log.txt only")

    # =========================================================================
    # Data: the fixed seeded order, split over ranks

    if hp.bench:  # random shards in the track's shapes, through the real dataset and loader code
        hp.data = f"data/bench-{hp.bench}"
        if local_rank == 0:  # one writer per node
            data.build_synthetic(hp.data, hp.bench)
        if world_size > 1:
            dist.barrier()
    dataset = data.ShardDataset(hp.data, verify="full" if hp.verify_full else "fast")
    # The rules fix the data order: it follows the dataset's own seed, never --seed (which seeds the
    # init and the noise, so that a record's repeated runs differ while seeing the same batches).
    order_seed = dataset.manifest["seed"]
    data_hash = data.order_hash(len(dataset), order_seed)
    log(f"data: {hp.data} track={dataset.manifest['track']} samples={len(dataset)} "
        f"data_order_hash={data_hash} (dataset seed {order_seed}) verified={'full' if hp.verify_full else 'fast'}")

    # =========================================================================
    # Model, EMA and optimizer

    latent_c, latent_h, _ = dataset.latent_shape
    text = dataset.manifest["text"]
    width_depth = dict(dit.PRESETS[hp.model])
    if hp.depth:
        width_depth["depth"] = hp.depth
    cfg = dit.DiTConfig(input_size=latent_h, in_channels=latent_c, patch_size=hp.patch_size,
                        text_len=text["seq_len"], text_dim=text["width"], pooled_dim=text["pooled_width"],
                        prediction=hp.prediction, qk_norm=hp.qk_norm, text_blocks=hp.text_blocks, **width_depth)
    raw_model = dit.DiT(cfg).to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False)
    n_params = dit.param_count(raw_model)
    flops_per_image = dit.flops_per_image(cfg)
    log(f"model: {hp.model} {asdict(cfg)}\nparams: {n_params:,}  training GFLOP/image: {flops_per_image / 1e9:.2f}")

    # Muon takes the blocks' weight matrices; AdamW the rest (embeddings, output, norms, biases).
    muon_params = [p for name, p in raw_model.named_parameters()
                   if hp.optimizer == "muon" and name.startswith(("blocks.", "text_blocks.")) and p.ndim == 2]
    decay, no_decay = [], []
    for name, p in raw_model.named_parameters():
        if not any(p is q for q in muon_params):
            (decay if p.ndim >= 2 and "null" not in name else no_decay).append(p)
    # Fused on the CPU too: its found_inf hook is how skip_nonfinite skips a step without a host sync.
    optimizers = [torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.lr, betas=(hp.beta1, hp.beta2), fused=True)]
    if muon_params:
        optimizers.append(Muon(muon_params, lr=hp.muon_lr, momentum=hp.muon_momentum, weight_decay=hp.weight_decay))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    model = DDP(raw_model, device_ids=[local_rank] if use_cuda else None) if world_size > 1 else raw_model
    if hp.compile and use_cuda:
        # One process: CUDA graphs replay the compiled forward and backward. The S/8 step launches ~1,300 kernels,
        # and launching them took the host 39 ms, longer than the GPU's 31 ms of work. Under DDP the gradient
        # all-reduce hooks run between the graph's pieces, and micro-batches accumulate gradients across replays
        # that may reuse the graph's memory (untested on a GPU here): both compile without CUDA graphs.
        accumulating = 0 < hp.micro_batch_size < hp.batch_size // world_size
        model = torch.compile(model, mode="default" if world_size > 1 or accumulating else "reduce-overhead")

    step, train_seconds, position = 0, 0.0, 0
    if hp.resume:
        ckpt = load_checkpoint(hp.resume, cfg)
        missing = sorted(RESUME_FIELDS - ckpt.keys())
        if missing:
            raise data.UserError(f"{hp.resume}: cannot resume from it, it lacks {missing} (an older train_dit.py?)")
        load_weights(raw_model, ckpt["model"], hp.resume)
        load_weights(ema, ckpt["ema"], hp.resume)
        for opt, state in zip(optimizers, ckpt["optimizer"], strict=True):
            opt.load_state_dict(state)
        step, train_seconds, position = ckpt["step"], ckpt["train_seconds"], ckpt["loader_position"]
        # The batch draws below depend on (seed, step) alone; the global RNG is restored for any edit
        # that draws from it (dropout, ...), so that resuming stays bit-exact.
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if use_cuda and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log(f"resumed from {hp.resume}: step {step}, {train_seconds:.1f} s of training clock")

    # =========================================================================
    # The training step: flow matching, x_t = (1 - t) x + t * noise, target velocity noise - x

    per_rank = hp.batch_size // world_size
    generator = torch.Generator(device).manual_seed(0)

    def draw(step):
        # The global batch's noise, times and caption drops depend only on (seed, step): every rank
        # draws all of them and keeps its slice, so world size and resume do not change the run.
        generator.manual_seed(hp.seed * 1_000_003 + step)
        noise = torch.randn((hp.batch_size, *dataset.latent_shape), generator=generator, device=device)
        u = torch.randn if hp.time_sampling == "logit_normal" else torch.rand
        t = u((hp.batch_size,), generator=generator, device=device)
        t = torch.sigmoid(hp.time_mean + hp.time_std * t) if hp.time_sampling == "logit_normal" else t
        drop = torch.rand((hp.batch_size,), generator=generator, device=device) < hp.text_dropout
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        return noise[mine], t[mine], drop[mine]

    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())

    def train_step(step, latents, text_tokens, text_pooled):
        """One update; returns the loss and the gradient norm, on the device (read once per log interval)."""
        noise, t, drop = draw(step)
        x_t = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
        scale = lr_scale(hp, step, train_seconds)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = group["peak_lr"] * scale
        micro = hp.micro_batch_size or per_rank
        loss = 0.0
        for start in range(0, per_rank, micro):
            part = slice(start, start + micro)
            last = start + micro >= per_rank
            # DDP all-reduces gradients on the last chunk only; the chunks' losses add up to the batch mean.
            with (model.no_sync() if world_size > 1 and not last else contextlib.nullcontext()), autocast:
                velocity = model(x_t[part], t[part], text_tokens[part], text_pooled[part], drop[part])
            chunk_loss = F.mse_loss(velocity.float(), (noise - latents)[part]) * (len(velocity) / per_rank)
            chunk_loss.backward()
            loss = loss + chunk_loss.detach()
        # The gradient norm is read with the loss to catch a non-finite step; after DDP's all-reduce it
        # is the same on every rank, so every rank skips (or not) alike.
        if hp.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model_params, hp.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model_params if p.grad is not None])
        # EMA warm-up: a fixed 0.999 would keep 43% of the random init after 850 steps.
        ema_weight = 1 - (min(hp.ema_decay, (1 + step) / (10 + step)) if hp.ema_warmup else hp.ema_decay)
        if hp.skip_nonfinite:
            # Fused AdamW (and Muon) skip their whole update on the device where found_inf is nonzero
            # (the hook torch.amp.GradScaler uses), so skipping costs no host sync. The EMA step is masked
            # alike, with one 0-dim weight per tensor (the scalar-weight lerp would read it on the host).
            skip = (~torch.isfinite(grad_norm)).float()
            for opt in optimizers:
                opt.found_inf = skip
            ema_weight = [ema_weight * (1 - skip)] * len(ema_params)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, ema_weight)
        return loss.detach(), grad_norm.detach()

    # =========================================================================
    # Compile warm-up, untimed and undone

    if hp.compile and use_cuda and hp.compile_warmup_steps > 0:
        saved = [copy.deepcopy(m.state_dict()) for m in (raw_model, ema, *optimizers)]
        warm_loader = data.Loader(dataset, hp.batch_size, order_seed, position, rank, world_size, device)
        batch = next(warm_loader)
        warm_loader.close()
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if use_cuda else []):
            for i in range(hp.compile_warmup_steps):
                train_step(step + i, *batch[:3])
        sync()
        for m, state in zip((raw_model, ema, *optimizers), saved):
            m.load_state_dict(state)
        log(f"compile warm-up: {hp.compile_warmup_steps} steps in {time.perf_counter() - t0:.1f} s (untimed, undone)")

    # =========================================================================
    # Benchmark mode (--bench): time the training step above, print the numbers, stop

    if hp.bench:
        report = benchmark(hp, cfg, n_params, train_step, dataset, step, rank, world_size, device, sync)
        log(format_bench(report))
        if master:
            with open(out / "bench.jsonl", "a") as f:
                f.write(json.dumps(report) + "\n")
        if world_size > 1:
            dist.destroy_process_group()
        return

    # =========================================================================
    # Training loop: checkpoints on marks of the training clock

    loader = data.Loader(dataset, hp.batch_size, order_seed, position, rank, world_size, device)
    last_checkpoint = hp.resume or None

    def save_checkpoint():
        nonlocal last_checkpoint
        # Never a checkpoint of non-finite weights: an update can blow them up with finite gradients
        # (a huge learning rate), so they are checked here too, on every rank (one sync per checkpoint).
        if not torch.stack([torch.isfinite(p).all() for p in model_params + ema_params]).all():
            raise data.UserError(f"step {step}: the weights are not finite (NaN/Inf) after the update; no checkpoint "
                                 f"written, the last good one is {last_checkpoint or 'none (none written yet)'}")
        if world_size > 1:  # DDP keeps replicas identical: check it once per checkpoint (exact per-tensor sums)
            fingerprint = torch.stack([p.double().pow(2).sum() for p in model_params + ema_params])
            every = [torch.empty_like(fingerprint) for _ in range(world_size)]
            dist.all_gather(every, fingerprint)
            if not all(torch.equal(every[0], f) for f in every[1:]):
                raise data.UserError(f"step {step}: the ranks' weights differ (DDP replicas diverged)")
            log(f"step {step}: weights identical on all {world_size} ranks")
        path = out / "checkpoints" / f"ckpt_{step:07d}.pt"
        if master:
            atomic_save({
                "model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": [opt.state_dict() for opt in optimizers],
                "model_config": asdict(cfg), "hparams": asdict(hp), "step": step, "train_seconds": train_seconds,
                "images_seen": step * hp.batch_size, "params": n_params, "data_order_hash": data_hash,
                "loader_position": loader.position, "data": str(hp.data), "world_size": world_size,
                "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if use_cuda else None},
            }, path)
            log(f"checkpoint {path} at {train_seconds:.1f} s, step {step}")
        last_checkpoint = path

    # SIGTERM (preemption) or SIGINT (Ctrl-C): finish the step, checkpoint, exit 0. With several ranks
    # the stop is agreed at the next log interval, together with the clock, so all ranks stop at one step.
    stop_signals = []

    def request_stop(signum, frame):
        stop_signals.append(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)

    next_ckpt = (train_seconds // hp.ckpt_every_seconds + 1) * hp.ckpt_every_seconds
    losses, grad_norms = [], []
    stopping = False
    progress = tqdm_or_none(master, hp.budget_seconds, train_seconds)
    sync()
    segment_start = time.perf_counter()
    while train_seconds < hp.budget_seconds and not (hp.max_steps and step >= hp.max_steps):
        latents, text_tokens, text_pooled, _ = next(loader)
        loss, grad_norm = train_step(step, latents, text_tokens, text_pooled)
        losses.append(loss)
        grad_norms.append(grad_norm)
        step += 1
        at_max_steps = hp.max_steps and step >= hp.max_steps
        if step % hp.log_every and not at_max_steps and not (stop_signals and world_size == 1):
            continue
        # One host sync per log interval: read the losses and gradient norms, then the clock and any
        # stop request (the same on every rank).
        readings = torch.stack([torch.stack(losses), torch.stack(grad_norms)])
        if world_size > 1:  # each rank's loss is its slice's mean: log the global batch's mean
            readings[0] = readings[0] / world_size
            dist.all_reduce(readings[0])
        loss_values, norm_values = readings.tolist()
        sync()
        clock = torch.tensor([train_seconds + time.perf_counter() - segment_start, float(bool(stop_signals))],
                             device=device)
        if world_size > 1:
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
        clock, stopping = clock.tolist()
        first = step - len(loss_values) + 1
        for i, value in enumerate(loss_values):
            log(f"step {first + i} loss {value:.5f}", echo=False)
        nonfinite = [(first + i, value, norm) for i, (value, norm) in enumerate(zip(loss_values, norm_values))
                     if not (math.isfinite(value) and math.isfinite(norm))]
        for bad_step, value, norm in nonfinite:
            if hp.skip_nonfinite and not math.isfinite(norm):
                log(f"step {bad_step}: loss {value}, gradient norm {norm}: update skipped (skip_nonfinite)")
                continue
            # Checked before this interval's checkpoint: no checkpoint ever holds what followed.
            message = (f"step {bad_step}: loss {value}, gradient norm {norm}: not finite, training stopped; "
                       f"last good checkpoint: {last_checkpoint or 'none written yet'} "
                       f"(--skip_nonfinite true skips such steps)")
            log(f"error: {message}", echo=False)
            raise data.UserError(message)
        rate = hp.batch_size * len(loss_values) / max(clock - train_seconds, 1e-9)
        log(f"step {step} | train {clock:.1f} s | loss {sum(loss_values) / len(loss_values):.4f} | "
            f"{rate:.0f} img/s | images {step * hp.batch_size}", echo=progress is None)
        if progress is not None:
            progress.update(clock - train_seconds)
            progress.set_postfix(step=step, loss=f"{loss_values[-1]:.4f}")
        if wandb_run:
            wandb_run.log({"loss": loss_values[-1], "train_seconds": clock, "img_per_s": rate}, step=step)
        losses.clear()
        grad_norms.clear()
        train_seconds = clock
        done = train_seconds >= hp.budget_seconds or at_max_steps or stopping
        if train_seconds >= next_ckpt or done:
            save_checkpoint()  # the clock is stopped while the checkpoint is written
            next_ckpt = (train_seconds // hp.ckpt_every_seconds + 1) * hp.ckpt_every_seconds
        if done:
            break
        sync()
        segment_start = time.perf_counter()

    loader.close()
    if progress is not None:
        progress.close()
    if stopping:
        log(f"stopped by {(stop_signals or ['a signal to another rank'])[0]} after step {step}: checkpoint "
            f"{last_checkpoint}; continue with --resume {last_checkpoint}")
    else:
        log(f"done: {step} steps, {train_seconds:.1f} s of training clock, {step * hp.batch_size} images")
    if world_size > 1:
        dist.destroy_process_group()


# =============================================================================
# Benchmark: throughput, MFU against a matmul peak measured in this process, memory, loader share


def matmul_peak_flops(device, n=8192, iters=50):
    """FLOP/s of a large bf16 matmul on this device: the ceiling MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def benchmark(hp, cfg, n_params, train_step, dataset, step, rank, world_size, device, sync):
    """Times hp.bench_steps training steps twice: on one batch reused (the step alone) and fed by the
    loader (the step as training runs it); their difference is the loader's share of the step."""
    loader = data.Loader(dataset, hp.batch_size, dataset.manifest["seed"], 0, rank, world_size, device)
    batch = next(loader)

    def timed(next_batch):
        sync()
        start = time.perf_counter()
        for i in range(hp.bench_steps):
            loss, _ = train_step(step + i, *next_batch()[:3])
        loss.item()  # one host sync, at the end
        sync()
        return (time.perf_counter() - start) / hp.bench_steps

    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # Alternated, best of two each: a GPU that warms up and clocks down would bias a fixed order.
    step_alone, step_fed = (min(pair) for pair in zip(*[(timed(lambda: batch), timed(lambda: next(loader)))
                                                      for _ in range(2)]))
    loader.close()
    flops = dit.flops_per_image(cfg)
    report = {"model": f"{hp.model}/{cfg.patch_size}", "track": hp.bench, "latent": dataset.latent_shape,
              "text_tokens": cfg.text_len, "batch": hp.batch_size, "world_size": world_size,
              "optimizer": hp.optimizer, "compile": bool(hp.compile and use_cuda), "params": n_params,
              "gflop_per_image": flops / 1e9, "ms_per_step": 1e3 * step_alone, "img_per_s": hp.batch_size / step_alone,
              "loader_share": step_fed / step_alone - 1, "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
              "torch": torch.__version__}
    if use_cuda:
        peak = matmul_peak_flops(device)
        achieved = flops * hp.batch_size / world_size / step_alone  # per GPU
        report.update(peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30, tflops=achieved / 1e12,
                      matmul_peak_tflops=peak / 1e12, mfu=achieved / peak)
        if hp.bench_profile:
            report["top_kernels"] = profile_kernels(lambda i: train_step(step + i, *batch[:3]), device)
    return report


def profile_kernels(run_step, device, steps=5, top=15):
    """[(kernel name, ms per step, share of GPU time)] of the most expensive GPU kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            run_step(i)
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return [(e.key[:90], e.self_device_time_total / 1e3 / steps, e.self_device_time_total / total) for e in kernels[:top]]


def format_bench(r):
    line = (f"bench | {r['model']} {r['track']} {'x'.join(map(str, r['latent']))} + {r['text_tokens']} text tokens | "
            f"batch {r['batch']} on {r['world_size']} rank(s) | {r['optimizer']} | compile {r['compile']} | params {r['params'] / 1e6:.1f}M | "
            f"{r['gflop_per_image']:.1f} GFLOP/img | {r['ms_per_step']:.1f} ms/step | {r['img_per_s']:.0f} img/s | "
            f"loader share {100 * r['loader_share']:+.1f}%")
    if "mfu" in r:
        line += (f" | {r['tflops']:.0f} TFLOP/s of {r['matmul_peak_tflops']:.0f} measured bf16 peak | "
                 f"MFU {100 * r['mfu']:.1f}% | peak mem {r['peak_mem_gib']:.1f} GiB")
    for name, ms, share in r.get("top_kernels", []):
        line += f"\n  {ms:8.2f} ms/step {100 * share:5.1f}%  {name}"
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


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised and scaled to the matrix's shape.

    Matrices of one shape are orthogonalised together, as one batch. Like fused AdamW, a nonzero
    `found_inf` tensor (set by the trainer) skips the update on the device, without a host sync.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.found_inf = None

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
                torch._foreach_lerp_(momenta, grads, 1 - group["momentum"])
                nesterov = torch.stack(torch._foreach_lerp(grads, momenta, group["momentum"]))
                # max(1, rows/cols)^0.5: a tall matrix's orthogonal update has the RMS of a square one.
                updates = orthogonalize(nesterov) * (keep * group["lr"] * max(1.0, rows / cols) ** 0.5)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - keep * group["lr"] * group["weight_decay"])
                torch._foreach_sub_(params, list(updates.unbind(0)))


# =============================================================================
# Helpers: checkpoints, environment report, progress bar


def atomic_save(obj, path):
    """Write to a temporary file, fsync, then rename: a killed save leaves the old file intact.

    A write that fails (a full disk, ...) removes the temporary file and raises a one-line UserError;
    the file at `path`, if any, is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # not *.pt: never taken for a checkpoint
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise data.UserError(f"{path}: could not write the checkpoint ({e.strerror or e}); "
                             f"nothing was replaced") from None
    directory = os.open(path.parent, os.O_RDONLY)
    os.fsync(directory)  # the rename itself survives a power cut
    os.close(directory)


# What --resume needs besides the model config and weights; a checkpoint without one is refused by name.
RESUME_FIELDS = {"ema", "optimizer", "step", "train_seconds", "loader_position", "rng"}


def load_checkpoint(path, expected_cfg=None):
    """Load a checkpoint; with expected_cfg, refuse one written for another model config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise data.UserError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise data.UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise data.UserError(f"{path}: not a train_dit.py checkpoint (no 'model_config')")
    unknown = ckpt["model_config"].keys() - {f.name for f in dataclasses.fields(dit.DiTConfig)}
    if unknown:
        raise data.UserError(f"{path}: checkpoint config has fields model.py does not know: {sorted(unknown)}")
    if expected_cfg is not None:
        diffs = [f"{k} {v!r} != {getattr(expected_cfg, k)!r}" for k, v in ckpt["model_config"].items()
                 if getattr(expected_cfg, k, None) != v]
        if diffs:
            raise data.UserError(f"{path}: checkpoint is for another model config ({', '.join(diffs)})")
    return ckpt


def load_weights(module, state_dict, path):
    """load_state_dict, with weights that do not fit the model (model.py edited since?) as a one-line error."""
    missing, unexpected = module.state_dict().keys() - state_dict.keys(), state_dict.keys() - module.state_dict().keys()
    if missing or unexpected:
        raise data.UserError(f"{path}: weights do not fit model.py (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        raise data.UserError(f"{path}: weights do not fit model.py ({str(e).splitlines()[-1].strip()})") from None


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


def tqdm_or_none(master, total, initial):
    if not master or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="s", desc="training clock", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UserError as e:
        sys.exit(f"error: {e}")

"""sample.py: 100-NFE samples of a checkpoint (or of every checkpoint of a run), in GenEval's layout.

    python sample.py runs/shapes/checkpoints/ckpt_0001000.pt --out samples/ckpt_0001000
    python sample.py runs/shapes                      # every checkpoint -> runs/shapes/samples/<ckpt>/

NFE: one evaluation of the guided velocity field is 1 NFE; the conditional and unconditional
branches of classifier-free guidance are batched together into that one evaluation. Every image
takes exactly NFE = 100 evaluations: 100 Euler steps from pure noise at t = 1 to the image at t = 0.
The sampler's only random inputs are the noise, seeded per (prompt index, sample index), and the
prompt.

Output (GenEval's layout, scorable by its scripts unchanged):
    <out>/<5-digit prompt index>/metadata.jsonl   the prompt's JSON object
    <out>/<5-digit prompt index>/samples/<4-digit>.png
    <out>/<5-digit prompt index>/grid.png
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import model as dit
from train_dit import load_checkpoint, load_weights

NFE = 100
# Guidance defaults, measured on Shapes (records/shapes-baseline-tuning.md, section 10; full list, 300 s preset):
# scale 6 on t in [0.3, 1] scored 0.926 and 0.939 on two runs against 0.910 and 0.926 for scale 4 everywhere;
# guiding the low-noise steps too (scale 8 throughout) lost exact counts (0.71 -> 0.51).
CFG_SCALE, CFG_INTERVAL = 6.0, (0.3, 1.0)


@torch.no_grad()
def sample_latents(model, noise, text_tokens, text_pooled, cfg_scale, nfe=NFE, time_shift=1.0, cfg_interval=(0.0, 1.0)):
    """Euler integration of the guided velocity field from t=1 (noise) to t=0, nfe evaluations.

    time_shift > 1 spends more of the steps at high noise, where the layout forms (SD3's shift:
    t -> s t / (1 + (s - 1) t)); 1 is the uniform grid. Guidance applies at the steps whose t lies
    in cfg_interval (Kynkaanniemi et al. 2024); the others evaluate the conditional branch alone,
    which saves the unconditional half of their FLOPs (still 1 NFE each).
    """
    x = noise
    times = time_grid(nfe, time_shift)
    guided = guided_steps(times, cfg_interval)
    times = times.to(noise.device)
    b = len(x)
    tokens2, pooled2 = torch.cat([text_tokens, text_tokens]), torch.cat([text_pooled, text_pooled])
    drop = torch.arange(2 * b, device=noise.device) >= b  # second half: the null caption
    for i in range(nfe):
        if guided[i]:
            v_cond, v_uncond = model(torch.cat([x, x]), times[i].expand(2 * b), tokens2, pooled2, drop).float().chunk(2)
            velocity = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            velocity = model(x, times[i].expand(b), text_tokens, text_pooled, None).float()
        x = x + (times[i + 1] - times[i]) * velocity
    return x


def time_grid(nfe=NFE, time_shift=1.0):
    """The nfe + 1 times of the Euler steps, from 1 to 0."""
    times = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    return (time_shift * times / (1 + (time_shift - 1) * times)).float()


def guided_steps(times, cfg_interval=(0.0, 1.0)):
    """Per step: True where guidance applies (both branches evaluated)."""
    return [cfg_interval[0] <= t <= cfg_interval[1] for t in times[:-1].tolist()]


def image_noise(shape, seed, prompt_index, sample_index):
    """The noise of one image: a function of (seed, prompt index, sample index) alone."""
    rng = np.random.default_rng([seed, prompt_index, sample_index])
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


def save_grid(images, path, columns=2):
    rows = (len(images) + columns - 1) // columns
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for k, image in enumerate(images):
        grid[(k // columns) * h:(k // columns + 1) * h, (k % columns) * w:(k % columns + 1) * w] = image
    Image.fromarray(grid).save(path)


class Sampler:
    """Samples checkpoints of one run; the model is built (and compiled) once, weights swapped in."""

    def __init__(self, manifest, prompts, encoder, device="cpu", images_per_prompt=4, cfg_scale=CFG_SCALE,
                 batch_size=256, seed=0, weights="ema", compile=False, time_shift=1.0, cfg_interval=CFG_INTERVAL):
        self.manifest, self.prompts, self.device = manifest, prompts, device
        self.images_per_prompt, self.cfg_scale, self.batch_size = images_per_prompt, cfg_scale, batch_size
        self.time_shift, self.cfg_interval = time_shift, tuple(cfg_interval)
        self.seed, self.weights, self.compile = seed, weights, compile
        self.autoencoder = data.autoencoder_from_manifest(manifest, device)
        self.latent_shape = tuple(manifest["latent"]["shape"])
        self.tokens, self.pooled = encoder.encode([p["prompt"] for p in prompts])
        self.model = self.model_config = self.forward = None

    def load(self, ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_config"]["text_dim"] != self.tokens.shape[-1]:
            raise data.UserError(f"{ckpt_path}: checkpoint expects text width {ckpt['model_config']['text_dim']}, "
                                 f"the data's text encoder gives {self.tokens.shape[-1]}")
        if ckpt["model_config"] != self.model_config:
            self.model_config = ckpt["model_config"]
            self.model = dit.DiT(dit.DiTConfig(**self.model_config)).to(self.device).eval()
            self.forward = torch.compile(self.model, mode="reduce-overhead") if self.compile else self.model  # CUDA graphs
        load_weights(self.model, ckpt[self.weights], ckpt_path)
        return ckpt

    def images(self):
        """{(prompt index, sample index): (H, W, 3) uint8 image} for every prompt (rank 0; others: None).

        Under torchrun the batches go round-robin to the ranks and are gathered on rank 0: each batch
        holds the same images as in a one-process run, so the output is the same.
        """
        rank, world_size = distributed()
        jobs = [(i, j) for i in range(len(self.prompts)) for j in range(self.images_per_prompt)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(self.device).type == "cuda")
        images = {}
        for start in range(rank * self.batch_size, len(jobs), world_size * self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk) if self.compile else 0)  # one shape
            noise = torch.stack([image_noise(self.latent_shape, self.seed, i, j) for i, j in padded]).to(self.device)
            idx = torch.tensor([i for i, _ in padded])
            with autocast:
                latents = sample_latents(self.forward, noise, self.tokens[idx].to(self.device),
                                         self.pooled[idx].to(self.device), self.cfg_scale,
                                         time_shift=self.time_shift, cfg_interval=self.cfg_interval)
            for (i, j), image in zip(chunk, self.autoencoder.decode(latents[:len(chunk)]).numpy()):
                images[i, j] = image
        if world_size > 1:
            gathered = [None] * world_size if rank == 0 else None
            torch.distributed.gather_object(images, gathered)
            images = {k: v for part in gathered for k, v in part.items()} if rank == 0 else None
        return images

    def run(self, ckpt_path, out):
        """Sample one checkpoint into `out` in GenEval's layout; returns the checkpoint's metadata.

        The files are written to a staging folder beside `out`, then moved in: a write that fails (a
        full disk, ...) is a one-line UserError that leaves `out` as it was and no staging folder.
        """
        ckpt = self.load(ckpt_path)
        images = self.images()
        info = {"checkpoint": str(ckpt_path), "nfe": NFE, "sampler": "euler", "cfg_scale": self.cfg_scale,
                "time_shift": self.time_shift, "cfg_interval": list(self.cfg_interval),
                "weights": self.weights, "seed": self.seed, "images_per_prompt": self.images_per_prompt,
                **{k: ckpt[k] for k in ("train_seconds", "step", "images_seen", "params")}}
        if images is None:  # not rank 0: rank 0 writes
            return info
        out = Path(out)
        staging = out.resolve().with_name(out.resolve().name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        try:
            self.write(images, info, staging)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise data.UserError(f"{out}: could not write the samples ({e.strerror or e}); "
                                 f"{out} is unchanged") from None
        out.mkdir(parents=True, exist_ok=True)
        (out / "sampling.json").unlink(missing_ok=True)  # moved in last: its presence means complete
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == "sampling.json"):
            if (out / entry.name).is_dir():
                shutil.rmtree(out / entry.name)
            os.replace(entry, out / entry.name)
        staging.rmdir()
        return info

    def write(self, images, info, out):
        for i, prompt in enumerate(self.prompts):
            folder = out / f"{i:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            with open(folder / "metadata.jsonl", "w") as f:
                f.write(json.dumps(prompt) + "\n")
            for j in range(self.images_per_prompt):
                Image.fromarray(images[i, j]).save(folder / "samples" / f"{j:04d}.png")
            save_grid([images[i, j] for j in range(self.images_per_prompt)], folder / "grid.png")
        with open(out / "sampling.json", "w") as f:
            json.dump(info, f, indent=1)


def distributed():
    """(rank, world size): joins the process group under torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world_size


def checkpoints_of(run):
    """A checkpoint file, or every checkpoint of a run directory in training order."""
    run = Path(run)
    if run.is_file():
        return [run]
    found = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise data.UserError(f"{run}: no checkpoints (expected {run}/checkpoints/ckpt_*.pt)")
    return found


def select_prompts(prompts, per_tag=None):
    """The first `per_tag` prompts of each tag (all when None), keeping their order."""
    if per_tag is None:
        return prompts
    seen = {}
    kept = []
    for p in prompts:
        seen[p["tag"]] = seen.get(p["tag"], 0) + 1
        if seen[p["tag"]] <= per_tag:
            kept.append(p)
    return kept


def positive(kind):
    """argparse type: a number of `kind` above 0 (a zero or negative one is a clear error, not a silent empty run)."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_sampling_args(p):
    p.add_argument("--data", default=None, help="shard directory (default: the one the checkpoint trained on)")
    p.add_argument("--prompts", default=None, help="GenEval metadata jsonl (default: the data's eval list)")
    p.add_argument("--per-tag", type=positive(int), default=None, help="only the first N prompts of each tag")
    p.add_argument("--images-per-prompt", type=positive(int), default=4)
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE)
    p.add_argument("--time-shift", type=positive(float), default=1.0,
                   help="> 1: more steps at high noise (SD3 shift); < 1: more steps near the image")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=CFG_INTERVAL, metavar=("LO", "HI"),
                   help="guide only the steps with t in [LO, HI]; the others skip the unconditional branch")
    p.add_argument("--batch-size", type=positive(int), default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")


def sampler_from_args(args, ckpt_path):
    """A Sampler for a run's checkpoints, from the command-line sampling options."""
    data_dir = args.data or load_checkpoint(ckpt_path)["data"]
    manifest = data.read_manifest(data_dir)
    if args.prompts:
        prompts_path = args.prompts
    elif manifest.get("eval_metadata"):  # Shapes: the data's own evaluation list
        prompts_path = Path(data_dir) / manifest["eval_metadata"]
    else:  # ImageNet: GenEval's official 553 prompts, downloaded once into the cache
        prompts_path = data.geneval_prompts_path()
    prompts = data.read_metadata(prompts_path)
    distributed()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    encoder = data.text_encoder_from_manifest(manifest, device)
    return Sampler(manifest, select_prompts(prompts, args.per_tag), encoder, device, args.images_per_prompt,
                   args.cfg_scale, args.batch_size, args.seed, args.weights, args.compile, args.time_shift,
                   args.cfg_interval)


def benchmark(args):
    """100-NFE sampling of a random-init model at a track's shapes: img/s and forward MFU.

    Weights do not change the work, so no checkpoint is needed. FLOPs per image are the counted
    forward FLOPs times the evaluations: 2 per guided step (cond + uncond), 1 per unguided one.
    """
    from train_dit import matmul_peak_flops
    shape = data.TRACK_SHAPES[args.bench]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dit.DiTConfig(input_size=shape["latent_shape"][1], in_channels=shape["latent_shape"][0],
                        patch_size=args.patch_size, text_len=shape["seq_len"], text_dim=shape["width"],
                        pooled_dim=shape["pooled_width"], **dit.PRESETS[args.model])
    model = dit.DiT(cfg).to(device).eval()
    forward = torch.compile(model, mode="reduce-overhead") if args.compile else model
    g = torch.Generator().manual_seed(0)
    noise, tokens, pooled = (torch.randn((args.batch_size, *s), generator=g).to(device)
                             for s in (shape["latent_shape"], (shape["seq_len"], shape["width"]), (shape["pooled_width"],)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(cfg_interval, nfe=NFE):
        with autocast:
            latents = sample_latents(forward, noise, tokens, pooled, args.cfg_scale, nfe, args.time_shift, cfg_interval)
        latents.sum().item()

    run((0.75, 1.0), nfe=2)  # compiles both batch shapes: step 1 guided (2B images), step 2 not (B)
    peak = matmul_peak_flops(device) if device.type == "cuda" else None
    for cfg_interval in dict.fromkeys([(0.0, 1.0), tuple(args.cfg_interval)]):  # full CFG, then the interval asked
        start = time.perf_counter()
        run(cfg_interval)
        seconds = time.perf_counter() - start
        guided = sum(guided_steps(time_grid(NFE, args.time_shift), cfg_interval))
        evaluations = NFE + guided
        flops = dit.flops_per_image(cfg, training=False) * evaluations * args.batch_size
        line = (f"sample bench | {args.model}/{args.patch_size} {args.bench} | batch {args.batch_size} | compile "
                f"{args.compile} | {NFE} NFE, cfg interval {cfg_interval}: {guided} guided steps, {evaluations} "
                f"forward passes per image ({100 * (1 - evaluations / (2 * NFE)):.0f}% fewer FLOPs than full CFG) | "
                f"{seconds:.2f} s | {args.batch_size / seconds:.2f} img/s | "
                f"{args.batch_size * evaluations / seconds:.0f} forward img/s")
        if peak:
            line += (f" | {flops / seconds / 1e12:.0f} TFLOP/s of {peak / 1e12:.0f} measured bf16 peak | "
                     f"MFU {100 * flops / seconds / peak:.1f}% | peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
        print(line)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file or a run directory")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples/<checkpoint name>)")
    add_sampling_args(p)
    b = p.add_argument_group("benchmark (no checkpoint: a random-init model at a track's shapes)")
    b.add_argument("--bench", choices=sorted(data.TRACK_SHAPES), default=None)
    b.add_argument("--model", choices=sorted(dit.PRESETS), default="XL")
    b.add_argument("--patch-size", type=int, default=2)
    args = p.parse_args(argv)
    if args.bench:
        return benchmark(args)
    if not args.checkpoint:
        p.error("a checkpoint or run directory is required (or --bench TRACK)")
    ckpts = checkpoints_of(args.checkpoint)
    sampler = sampler_from_args(args, ckpts[0])
    for ckpt in ckpts:
        if args.out:
            out = Path(args.out) / (ckpt.stem if len(ckpts) > 1 else "")
        else:
            out = ckpt.parent.parent / "samples" / ckpt.stem
        sampler.run(ckpt, out)
        if distributed()[0] == 0:
            print(f"{ckpt} -> {out}")


if __name__ == "__main__":
    try:
        main()
    except data.UserError as e:
        sys.exit(f"error: {e}")

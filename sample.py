"""sample.py: 100-NFE samples of a checkpoint (or of every checkpoint of a run), in GenEval's layout.

    python sample.py runs/shapes/checkpoints/ckpt_0001000.pt --out samples/ckpt_0001000
    python sample.py runs/shapes                      # every checkpoint -> runs/shapes/samples/<ckpt>/

The sampler's settings (guidance scale and interval, step spacing, EMA or raw weights, prompts per
tag) are part of the run's recipe (train_dit.py's Hyperparameters), read from the checkpoint; a flag
overrides one for this call.

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
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import model
from data import UserError

NFE = 100  # the rules: every image takes exactly 100 evaluations of the guided velocity field


@torch.no_grad()
def sample_latents(net, noise, text_tokens, text_pooled, cfg_scale, nfe=NFE, time_shift=1.0, cfg_interval=(0.0, 1.0)):
    """Euler integration of the guided velocity field from t=1 (noise) to t=0, nfe evaluations.

    time_shift > 1 spends more of the steps at high noise, where the layout forms (SD3's shift:
    t -> s t / (1 + (s - 1) t)); 1 is the uniform grid. Guidance applies at the steps whose t lies
    in cfg_interval (Kynkaanniemi et al. 2024); the others evaluate the conditional branch alone,
    which saves the unconditional half of their FLOPs (still 1 NFE each). The caption path (net.encode_text)
    depends on the caption alone: it runs once per batch, not once per step.
    """
    x = noise
    times = time_grid(nfe, time_shift)
    guided = guided_steps(times, cfg_interval)
    times = times.to(noise.device)
    b = len(x)
    tokens2, pooled2 = torch.cat([text_tokens, text_tokens]), torch.cat([text_pooled, text_pooled])
    drop = torch.arange(2 * b, device=noise.device) >= b  # second half: the null caption
    both = net.encode_text(tokens2, pooled2, drop) if any(guided) else None
    cond = net.encode_text(text_tokens, text_pooled, None) if not all(guided) else None
    for i in range(nfe):
        if guided[i]:
            v_cond, v_uncond = net(torch.cat([x, x]), times[i].expand(2 * b), None, None, text=both).float().chunk(2)
            velocity = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            velocity = net(x, times[i].expand(b), None, None, text=cond).float()
        x = x + (times[i + 1] - times[i]) * velocity
    return x


def time_grid(nfe=NFE, time_shift=1.0):
    """The nfe + 1 times of the Euler steps, from 1 to 0."""
    times = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    return (time_shift * times / (1 + (time_shift - 1) * times)).float()


def guided_steps(times, cfg_interval=(0.0, 1.0)):
    """Per step: True where guidance applies (both branches evaluated)."""
    return [cfg_interval[0] <= t <= cfg_interval[1] for t in times[:-1].tolist()]


def even_batch_size(n_images, batch_size, world_size=1):
    """The largest batch of at most `batch_size` that deals `n_images` out as equal batches, as many on every rank.

    GenEval's 2,212 images at batch 256 run as 9 batches of 246 (not 8 of 256 and one padded up from 164), and
    on 8 ranks as 2 batches of 139 on each (not 2 of 256 on rank 0 while the others run one)."""
    rounds = max(1, math.ceil(n_images / (world_size * batch_size)))  # batches per rank
    return max(1, math.ceil(n_images / (world_size * rounds)))


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
    """Samples checkpoints of one run; the model is built (and compiled) once, weights swapped in.

    `settings` are the sampler's settings of the run's recipe (sampler_settings): cfg_scale, cfg_interval,
    time_shift and sample_weights.
    """

    def __init__(self, manifest, prompts, encoder, settings, device="cpu", images_per_prompt=4, batch_size=256,
                 seed=0, compile=False, float8="off"):
        self.manifest, self.prompts, self.device = manifest, prompts, device
        self.settings, self.images_per_prompt, self.batch_size = settings, images_per_prompt, batch_size
        self.seed, self.compile, self.float8 = seed, compile, float8
        self.autoencoder = data.autoencoder_from_manifest(manifest, device)
        self.latent_shape = tuple(manifest["latent"]["shape"])
        self.tokens, self.pooled = encoder.encode([p["prompt"] for p in prompts])
        self.net = self.model_config = self.forward = None

    def load(self, ckpt_path):
        ckpt = model.load_checkpoint(ckpt_path)
        if ckpt["model_config"]["text_dim"] != self.tokens.shape[-1]:
            raise UserError(f"{ckpt_path}: checkpoint expects text width {ckpt['model_config']['text_dim']}, "
                            f"the data's text encoder gives {self.tokens.shape[-1]}")
        if ckpt["model_config"] != self.model_config:
            self.model_config = ckpt["model_config"]
            self.net = model.use_float8(model.DiT(model.DiTConfig(**self.model_config)).to(self.device).eval(),
                                        self.float8)
            self.forward = torch.compile(self.net, mode="reduce-overhead") if self.compile else self.net  # CUDA graphs
        model.load_weights(self.net, ckpt[self.settings["sample_weights"]], ckpt_path)
        return ckpt

    def images(self, desc="sampling"):
        """{(prompt index, sample index): (H, W, 3) uint8 image} for every prompt (rank 0; others: None).

        Under torchrun the batches go round-robin to the ranks and are gathered on rank 0. Every image's noise is
        its own (image_noise), so the output is the one-process run's wherever the batch size works out the same,
        and equal to rounding otherwise.
        """
        rank, world_size = distributed()
        jobs = [(i, j) for i in range(len(self.prompts)) for j in range(self.images_per_prompt)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(self.device).type == "cuda")
        images = {}
        self.seconds = {"denoise": 0.0, "decode": 0.0}  # this rank's, for the table of what a point costs
        size = even_batch_size(len(jobs), self.batch_size, world_size)
        starts = range(rank * size, len(jobs), world_size * size)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=rank != 0 or not sys.stderr.isatty()):
            chunk = jobs[start:start + size]
            padded = chunk + [chunk[-1]] * (size - len(chunk) if self.compile else 0)  # one shape
            noise = torch.stack([image_noise(self.latent_shape, self.seed, i, j) for i, j in padded]).to(self.device)
            idx = torch.tensor([i for i, _ in padded])
            start_time = time.perf_counter()
            with autocast:
                latents = sample_latents(self.forward, noise, self.tokens[idx].to(self.device),
                                         self.pooled[idx].to(self.device), self.settings["cfg_scale"],
                                         time_shift=self.settings["time_shift"], cfg_interval=self.settings["cfg_interval"])
            latents = latents[:len(chunk)].cpu()  # waits for the sampling
            denoised_time = time.perf_counter()
            for (i, j), image in zip(chunk, self.autoencoder.decode(latents).numpy()):
                images[i, j] = image
            self.seconds["denoise"] += denoised_time - start_time
            self.seconds["decode"] += time.perf_counter() - denoised_time
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
        images = self.images(desc=f"sampling {Path(ckpt_path).stem}")
        info = {"checkpoint": str(ckpt_path), "nfe": NFE, "sampler": "euler", "cfg_scale": self.settings["cfg_scale"],
                "time_shift": self.settings["time_shift"], "cfg_interval": list(self.settings["cfg_interval"]),
                "weights": self.settings["sample_weights"], "seed": self.seed, "images_per_prompt": self.images_per_prompt,
                "float8": self.float8,
                "sample_py_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
                **{k: ckpt[k] for k in ("train_seconds", "step", "images_seen", "params")}}
        if images is None:  # not rank 0: rank 0 writes
            return info
        info["image_size"] = list(next(iter(images.values())).shape[:2])
        write_start = time.perf_counter()
        out = Path(out)
        staging = out.resolve().with_name(out.resolve().name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        try:
            self.write(images, staging)
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"{out}: could not write the samples ({data.root_cause(e)}); {out} is unchanged") from None
        out.mkdir(parents=True, exist_ok=True)
        (out / "sampling.json").unlink(missing_ok=True)  # written last: its presence means complete
        for entry in staging.iterdir():
            if (out / entry.name).is_dir():
                shutil.rmtree(out / entry.name)
            os.replace(entry, out / entry.name)
        staging.rmdir()
        info["seconds"] = {**{k: round(v, 2) for k, v in self.seconds.items()},
                           "write": round(time.perf_counter() - write_start, 2)}
        data.atomic_write(out / "sampling.json", lambda f: f.write(json.dumps(info, indent=1).encode()))
        return info

    def write(self, images, out):
        def write_prompt(i):
            folder = out / f"{i:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            with open(folder / "metadata.jsonl", "w") as f:
                f.write(json.dumps(self.prompts[i]) + "\n")
            for j in range(self.images_per_prompt):
                Image.fromarray(images[i, j]).save(folder / "samples" / f"{j:04d}.png")
            save_grid([images[i, j] for j in range(self.images_per_prompt)], folder / "grid.png")

        # PNG compression is CPU work that releases the GIL: GenEval's 2,212 images and 553 grids take ~40 s in one
        # thread (9 ms per 256x256 image), so the folders are written by a thread per core.
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            list(pool.map(write_prompt, range(len(self.prompts))))  # re-raises a failed write


def seconds_text(seconds):
    """'denoise 301.2 s, decode 5.1 s, write 3.0 s' of a stage-seconds dict (sampling.json's, scores.json's)."""
    return ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())


def distributed():
    """(rank, world size): joins the process group under torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world_size


def leave_process_group():
    """Under torchrun, the last step of a program: wait for every rank, then close the group (a rank that exits
    with it open can abort while another still receives)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def checkpoints_of(run):
    """A checkpoint file, or every checkpoint of a run directory in training order."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: does not exist (expected a checkpoint file or a run folder)")
    if run.is_file():
        return [run]
    found = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise UserError(f"{run}: no checkpoints (expected {run}/checkpoints/ckpt_*.pt)")
    return found


def select_prompts(prompts, per_tag=0):
    """The first `per_tag` prompts of each tag (all when 0), keeping their order."""
    if not per_tag:
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


# The sampler's settings in the run's recipe (train_dit.py's Hyperparameters field: this command's flag).
RECIPE_FLAGS = {"cfg_scale": "--cfg-scale", "cfg_interval": "--cfg-interval", "time_shift": "--time-shift",
                "sample_weights": "--weights", "eval_per_tag": "--per-tag", "compile": "--compile"}


def add_sampling_args(p):
    recipe = "default: the run's recipe, read from the checkpoint"
    p.add_argument("--data", default=None, help="shard directory (default: the one the checkpoint trained on)")
    p.add_argument("--prompts", default=None, help="GenEval metadata jsonl (default: the data's evaluation list, or "
                   "GenEval's 553 prompts for data without one)")
    p.add_argument("--per-tag", dest="eval_per_tag", type=positive(int), default=None,
                   help=f"only the first N prompts of each tag ({recipe}: eval_per_tag, 0 = all)")
    p.add_argument("--images-per-prompt", type=positive(int), default=4, help="images per prompt (default: 4, GenEval's)")
    p.add_argument("--cfg-scale", type=float, default=None, help=f"classifier-free guidance scale ({recipe})")
    p.add_argument("--time-shift", type=positive(float), default=None,
                   help=f"> 1: more steps at high noise (SD3 shift); < 1: more steps near the image ({recipe})")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"guide only the steps with t in [LO, HI]; the others skip the unconditional branch ({recipe})")
    p.add_argument("--weights", dest="sample_weights", choices=("ema", "model"), default=None,
                   help=f"EMA or raw weights ({recipe})")
    p.add_argument("--batch-size", type=positive(int), default=256, help="images per sampling batch (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: image (i, j) starts from noise seeded by "
                   "(seed, i, j) (default: 0, what records use)")
    p.add_argument("--compile", type=lambda v: {"true": True, "false": False}[v.lower()], default=None,
                   metavar="{true,false}", help="torch.compile the model with CUDA graphs (default: the recipe's "
                   "compile, on a GPU)")
    p.add_argument("--float8", choices=model.FLOAT8_RECIPES, default="off",
                   help="FP8 matmuls in the blocks' token linears, as train_dit.py --float8 (default: off)")


def sampler_settings(args, hparams, ckpt_path):
    """The run's sampler settings from its recipe (the checkpoint's hparams), each overridable by its flag."""
    settings = {}
    for field, flag in RECIPE_FLAGS.items():
        value = getattr(args, field, None)
        if value is None:
            if field not in hparams:
                raise UserError(f"{ckpt_path}: the run's recipe has no {field} (an older train_dit.py); pass {flag}")
            value = hparams[field]
        settings[field] = tuple(value) if field == "cfg_interval" else value
    settings["compile"] = settings["compile"] and torch.cuda.is_available()
    return settings


def sampler_from_args(args, ckpt_path):
    """A Sampler for a run's checkpoints, from the checkpoint's recipe and the command-line sampling options."""
    ckpt = model.load_checkpoint(ckpt_path)
    settings = sampler_settings(args, ckpt["hparams"], ckpt_path)
    data_dir = args.data or ckpt["data"]
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
    return Sampler(manifest, select_prompts(prompts, settings["eval_per_tag"]), encoder, settings, device,
                   args.images_per_prompt, args.batch_size, args.seed, settings["compile"], args.float8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint file or a run directory")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples/<checkpoint name>)")
    add_sampling_args(p)
    args = p.parse_args(argv)
    ckpts = checkpoints_of(args.checkpoint)
    sampler = sampler_from_args(args, ckpts[0])
    for ckpt in ckpts:
        if args.out:
            out = Path(args.out) / (ckpt.stem if len(ckpts) > 1 else "")
        else:
            out = ckpt.parent.parent / "samples" / ckpt.stem
        info = sampler.run(ckpt, out)
        if distributed()[0] == 0:
            print(f"{ckpt} -> {out}  ({seconds_text(info['seconds'])})")
    leave_process_group()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")

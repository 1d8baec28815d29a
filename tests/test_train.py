"""train_dit.py: determinism, resume, and what the run's log records."""
import dataclasses
import platform
import math
import re

import pytest

import torch

import data
from conftest import N_TRAIN, REPO, TRAIN_STEPS, logged_losses, run_cli, train


def test_same_seed_gives_identical_losses_and_other_seed_differs(shapes_data, trained_run, tmp_path):
    first = logged_losses(trained_run)
    assert sorted(first) == list(range(1, TRAIN_STEPS + 1))
    assert all(float(v) > 0 for v in first.values())

    again = logged_losses(train(shapes_data, tmp_path / "again", 0))
    assert again == first

    other = logged_losses(train(shapes_data, tmp_path / "seed1", 1))
    assert sorted(other) == sorted(first)
    assert sum(other[s] != first[s] for s in first) > TRAIN_STEPS // 2
    # --seed changes the init and noise, never the data order, which the rules fix
    orders = [re.findall(r"data_order_hash=(\w+)", (run / "log.txt").read_text()) for run in (trained_run, tmp_path / "seed1")]
    assert orders[0] == orders[1] == [data.order_hash(N_TRAIN, 0)]


def test_resume_from_a_checkpoint_continues_the_same_run(shapes_data, trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "ckpt_0000010.pt"
    assert ckpt.exists(), sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    resumed = logged_losses(train(shapes_data, tmp_path / "resumed", 0, "--resume", ckpt))
    full = logged_losses(trained_run)
    assert sorted(resumed) == list(range(11, TRAIN_STEPS + 1))
    assert resumed == {s: full[s] for s in resumed}


def test_log_holds_the_code_environment_and_data_order_hash(trained_run):
    log = (trained_run / "log.txt").read_text()
    for name in ("train_dit.py", "model.py", "data.py", "sample.py"):
        assert f"==================== {name}\n" + (REPO / name).read_text() in log, f"{name} source not in log"
    environment = log.split("==================== environment\n", 1)[1].split("====================", 1)[0]
    assert f"python {platform.python_version()}" in environment
    assert f"torch {torch.__version__}" in environment
    hashes = re.findall(r"data_order_hash=(\w+)", log)
    assert hashes == [data.order_hash(N_TRAIN, 0)]
    # every clock line says how much of its interval the host waited for the loader
    clock_lines = re.findall(r"^step \d+ \| train .*", log, re.M)
    waits = [int(w) for w in re.findall(r"^step \d+ \| train .* \| data wait (\d+)%", log, re.M)]
    assert clock_lines and len(waits) == len(clock_lines) and all(0 <= w <= 100 for w in waits)
    # record.py reads the sections back whole, though train_dit.py holds the header's format string too
    import record
    sections = record.log_sections(log)
    assert list(sections)[:6] == ["train_dit.py", "model.py", "data.py", "sample.py", "environment", "hyperparameters"]
    assert all(sections[name].rstrip("\n") == (REPO / name).read_text().rstrip("\n") for name in list(sections)[:4])


def test_checkpoint_records_the_run(trained_run, shapes_data):
    from model import load_checkpoint
    ckpt = load_checkpoint(trained_run / "checkpoints" / f"ckpt_{TRAIN_STEPS:07d}.pt")
    assert ckpt["step"] == TRAIN_STEPS
    assert ckpt["loader_position"] == TRAIN_STEPS * ckpt["hparams"]["batch_size"]
    assert ckpt["data_order_hash"] == data.order_hash(N_TRAIN, 0)
    assert ckpt["model_config"]["patch_size"] == 8
    assert ckpt["model_config"]["text_dim"] == data.read_manifest(shapes_data)["text"]["width"]


def test_lr_warms_up_over_steps_then_cools_down_to_zero_at_the_end_of_the_budget():
    from train_dit import Hyperparameters, lr_scale
    hp = Hyperparameters(lr_warmup_steps=10, budget_seconds=100.0, lr_cooldown=0.0)
    assert [lr_scale(hp, s, 0.0) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    assert lr_scale(hp, 1000, 99.0) == 1.0  # no cooldown
    hp = dataclasses.replace(hp, lr_cooldown=0.4)  # the last 40 s
    assert [lr_scale(hp, 1000, t) for t in (0.0, 60.0, 80.0, 90.0, 100.0, 130.0)] == [1.0, 1.0, 0.5, 0.25, 0.0, 0.0]
    assert lr_scale(hp, 4, 80.0) == 0.25  # warm-up and cooldown multiply


def test_time_mean_moves_by_time_mean_cooldown_over_the_cooldown_and_the_drawn_times_follow():
    from train_dit import Hyperparameters, draw_noise, time_mean
    hp = Hyperparameters(budget_seconds=100.0, lr_cooldown=0.5, time_mean=1.0, time_mean_cooldown=-0.6, batch_size=4096)
    assert [time_mean(hp, t) for t in (0.0, 50.0, 75.0, 100.0, 120.0)] == pytest.approx([1.0, 1.0, 0.7, 0.4, 0.4])
    assert time_mean(dataclasses.replace(hp, time_mean_cooldown=0.0), 100.0) == 1.0  # off: the recipe as before
    generator = torch.Generator()
    # the same (seed, step) draws the same normals: the times' logits move by exactly the mean's change
    early, late = (torch.logit(draw_noise(hp, 7, t, (3, 8, 8), generator, 0, 1)[1].double()) for t in (10.0, 100.0))
    assert (early - late).mean().item() == pytest.approx(0.6, abs=1e-4) and (early - late).std().item() < 1e-4


def test_time_mean_cooldown_without_a_cooldown_is_refused_naming_the_flag(capsys):
    from train_dit import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--time-mean-cooldown", "-0.5", "--lr-cooldown", "0"])
    assert "--time-mean-cooldown" in capsys.readouterr().err
    assert parse_args(["--time-mean-cooldown", "-0.5"])[0].time_mean_cooldown == -0.5


def test_cooldown_run_sets_each_steps_lr_from_the_clock_read_before_it(shapes_data, tmp_path):
    from model import load_checkpoint
    from train_dit import Hyperparameters, lr_scale
    run = train(shapes_data, tmp_path / "cool", 0, "--budget-seconds", 3, "--max-steps", 0, "--lr-cooldown", 1,
                "--log-every", 1, "--lr-warmup-steps", 1)
    ckpt = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    clock = {int(s): float(t) for s, t in re.findall(r"^step (\d+) \| train (\S+) s", (run / "log.txt").read_text(), re.M)}
    last = ckpt["step"]
    assert ckpt["train_seconds"] >= 3 and last > 1 and clock[last] == pytest.approx(ckpt["train_seconds"], abs=0.05)
    # the last step (index last - 1) ran with the lr of the clock logged after the step before it
    hp = Hyperparameters(**{**ckpt["hparams"], "cfg_interval": tuple(ckpt["hparams"]["cfg_interval"])})
    # the log's clock has 1 ms steps: the schedule at the clock it rounds, within half a step either side
    slowest, fastest = (lr_scale(hp, last - 1, clock[last - 1] + d) for d in (0.0005, -0.0005))
    assert fastest < 1  # in the cooldown
    for group in (g for opt in ckpt["optimizer"] for g in opt["param_groups"]):
        assert slowest - 1e-9 <= group["lr"] / group["peak_lr"] <= fastest + 1e-9


def test_the_clock_is_read_every_log_every_steps_or_at_the_step_the_pace_says_the_budget_runs_out():
    from train_dit import next_clock_read
    assert next_clock_read(0, 50, math.inf, 1.0) == 50  # the first interval: no pace yet
    assert next_clock_read(100, 50, 500.0, 0.53) == 150  # far from the end: the next multiple
    assert next_clock_read(120, 50, 500.0, 0.53) == 150  # after an early read (a stop signal), multiples again
    # 60 s of B/2 at 0.53 s a step: at step 100 (55.6 s) 4.4 s are left, 9 steps (not 50, which took it to 82 s)
    assert next_clock_read(100, 50, 60.0 - 55.6, 0.53) == 109
    assert next_clock_read(109, 50, 60.0 - 59.9, 0.53) == 110  # at least one step
    assert next_clock_read(109, 50, -1.0, 0.53) == 110


def test_a_run_reads_the_clock_on_that_rule_and_stops_at_its_budget(shapes_data, tmp_path):
    from train_dit import next_clock_read
    budget, every = 3.0, 5
    run = train(shapes_data, tmp_path / "budget", 0, "--budget-seconds", budget, "--max-steps", 0,
                "--log-every", every, "--ckpt-every-seconds", 1000)
    reads = [(0, 0.0)] + [(int(n), float(t)) for n, t in
                          re.findall(r"^step (\d+) \| train (\S+) s", (run / "log.txt").read_text(), re.M)]
    if len(reads) < 3:
        pytest.skip(f"the first {every} steps took {reads[-1][1]} s, past the {budget} s budget: no pace to judge")
    assert reads[1][0] == every and reads[-2][1] < budget <= reads[-1][1], reads
    for (n_q, t_q), (n_p, t_p), (n, _) in zip(reads, reads[1:], reads[2:]):
        due = next_clock_read(n_p, every, budget - t_p, (t_p - t_q) / (n_p - n_q))
        assert abs(n - due) <= 1, (reads, n_p, due)  # the log's clock has 1 ms steps: ceil may move by one
        assert n == due or due % every, (reads, n_p, due)  # multiples exactly


def test_vanilla_preset_trains_with_plain_ema(shapes_data, tmp_path):
    # shapes-vanilla on the CPU: DiT's recipe, EMA 0.9999 from the first step (no warm-up)
    from model import load_checkpoint

    run = tmp_path / "vanilla"
    result = run_cli("train_dit.py", "--config", "shapes-vanilla", "--data", shapes_data, "--out", run,
                     "--hidden", 128, "--depth", 2, "--heads", 4, "--batch-size", 8, "--max-steps", 3, "--log-every", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    hp = ckpt["hparams"]
    # |EMA| / |model| of the zero-initialised output layer, which 3 AdamW steps moved off zero
    model_w, ema_w = ckpt["model"]["final.linear.weight"], ckpt["ema"]["final.linear.weight"]
    assert model_w.abs().max() > 0
    plain = (ema_w.norm() / model_w.norm()).item()
    assert (hp["optimizer"], hp["lr"], hp["ema_warmup"], hp["time_sampling"], hp["prediction"], hp["grad_clip"]) == (
        "adamw", 1e-4, False, "uniform", "velocity", 0.0)
    # Three steps of weight 1e-4: the EMA is still the init. With the warm-up (the default) the first
    # weights would be 0.9, 0.82, 0.75 and the ratio above 0.5 (checked by hand).
    assert plain < 1e-3, plain


def test_a_flag_overrides_one_field_of_the_config(shapes_data, tmp_path):
    from model import load_checkpoint

    run = train(shapes_data, tmp_path / "d2", 0, "--depth", 2, "--max-steps", 1)  # shapes-cpu has 4 blocks
    ckpt = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    blocks = {k.split(".")[1] for k in ckpt["model"] if k.startswith("blocks.")}
    assert ckpt["model_config"]["depth"] == 2 and blocks == {"0", "1"}
    assert ckpt["model_config"]["hidden"] == 128 and ckpt["hparams"]["lr"] == 1e-3  # the rest of shapes-cpu stays
    bad = run_cli("train_dit.py", "--config", "shapes-cpu", "--data", shapes_data, "--out", tmp_path / "bad", "--depth", -1)
    assert bad.returncode != 0 and "--depth: must be > 0, got -1" in bad.stderr


def test_help_texts_come_whole_from_the_recipe_comments_under_their_section_headings():
    from train_dit import Hyperparameters, field_docs
    docs = field_docs()
    assert docs.keys() == {f.name for f in dataclasses.fields(Hyperparameters)}
    sections = [section for section, _ in docs.values()]
    assert sections[0] == "data and output" and sections[-1] == "systems"
    # a help that runs over two comment lines is one text, and its second line heads no section of its own
    assert docs["micro_batch_size"] == ("optimisation", docs["micro_batch_size"][1])
    assert docs["micro_batch_size"][1].endswith("Memory only: the chunks give the same gradient.")
    assert docs["optimizer"][0] == "optimisation" and docs["time_mean_cooldown"][0].startswith("flow matching")
    assert not any(section.startswith("(") for section in sections)

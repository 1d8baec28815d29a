"""The VLM metrics on tiny random-init models of the real classes (nothing is downloaded, nothing is faked but
the weights): GenEval 2's Soft-TIFA with a Qwen3-VL judge (transformers, this environment), and HPSv3 through the
hpsv3 package's own HPSv3RewardInferencer in its environment (`evaluate.py hpsv3-env`, named by
$IMAGEGEN_SPEEDRUN_HPSV3_PYTHON; .ci/run makes it). Fakes appear only in tests named test_plumbing_*.
"""
import contextlib
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
from evaluate import Options

G2_ROWS = [  # GenEval 2's schema (geneval2_data.jsonl), three prompts of 3, 4 and 5 atoms
    {"prompt": "two red apples", "atom_count": 3,
     "vqa_list": [["How many apples are in the image?", "two"], ["Are the apples red?", "Yes"],
                  ["Are there any apples in the image?", "Yes"]], "skills": ["count", "attribute", "object"]},
    {"prompt": "a dog to the left of a wooden chair", "atom_count": 4,
     "vqa_list": [["Is there a dog in the image?", "Yes"], ["Is the dog to the left of the chair?", "Yes"],
                  ["Is the chair wooden?", "Yes"], ["Is there a chair in the image?", "Yes"]],
     "skills": ["object", "position", "attribute", "object"]},
    {"prompt": "three cats sleeping", "atom_count": 5,
     "vqa_list": [["How many cats are in the image?", "three"], ["Are the cats sleeping?", "Yes"]],
     "skills": ["count", "verb"]},
]


def g2_folder(root, rows=G2_ROWS, images_per_prompt=2, size=64):
    """A GenEval-layout folder sampled (here: noise) from GenEval 2 prompts, as sample.py writes it."""
    path = root / "g2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(evaluate.geneval2_prompt_rows(path)):
        (root / "s" / f"{i:05d}" / "samples").mkdir(parents=True)
        data.write_metadata(root / "s" / f"{i:05d}" / "metadata.jsonl", [prompt])
        for j in range(images_per_prompt):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / "s" / f"{i:05d}" / "samples" / f"{j:04d}.png")
    return root / "s"


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """A random-init Qwen3-VL judge saved like a hub checkpoint (model, processor, tokenizer, chat template)."""
    return evaluate.save_random_qwen3vl(tmp_path_factory.mktemp("judge") / "qwen3vl", evaluate.QWEN3_VL_TINY)


def judge_options(judge, **changes):
    return Options(**{"device": "cpu", "batch_size": 4, "geneval2_judge": judge, "geneval2_dtype": "fp32", **changes})


# -----------------------------------------------------------------------------
# Soft-TIFA arithmetic, against hand-computed cases


def test_soft_tifa_am_and_gm_of_one_image():
    am, gm = evaluate.soft_tifa([0.9, 0.5, 0.8])
    assert am == pytest.approx((0.9 + 0.5 + 0.8) / 3)
    assert gm == pytest.approx(0.36 ** (1 / 3))  # 0.9 * 0.5 * 0.8 = 0.36
    assert evaluate.soft_tifa([0.5, 0.0]) == (0.25, 0.0)  # one question at 0 sinks the prompt
    assert evaluate.soft_tifa([1.0, 1.0]) == (1.0, 1.0)


def test_geneval2_columns_pool_skills_and_group_atomicity():
    rows = [{"scores": [0.5, 1.0], "skills": ["count", "object"], "atom_count": 3},
            {"scores": [0.25, 0.25, 1.0], "skills": ["object", "position", "verb"], "atom_count": 3},
            {"scores": [0.64, 1.0], "skills": ["count", "attribute"], "atom_count": 4}]
    gm = [math.sqrt(0.5), 0.25 ** (2 / 3), 0.8]
    am = [0.75, 0.5, 0.82]
    columns = evaluate.summarize_geneval2(rows)
    assert columns == pytest.approx({
        "geneval2": 100 * sum(gm) / 3, "geneval2/am": 100 * sum(am) / 3,
        "geneval2/object": 100 * (1.0 + 0.25) / 2,  # pooled over the questions, not averaged per prompt
        "geneval2/attribute": 100.0, "geneval2/count": 100 * (0.5 + 0.64) / 2, "geneval2/position": 25.0,
        "geneval2/verb": 100.0, "geneval2/atoms_3": 100 * (gm[0] + gm[1]) / 2, "geneval2/atoms_4": 80.0})


def test_answer_spellings_are_geneval2s():
    assert evaluate.answer_spellings("How many cows are in the image?", "three") == \
        ["three", "Three", " three", " Three", "3", " 3"]
    assert evaluate.answer_spellings("How many cows are in the image?", "eleven")[-2:] == ["other", " other"]
    assert evaluate.answer_spellings("Are the cows plastic?", "Yes") == ["Yes", "yes", " yes", " Yes"]


def test_geneval2_data_is_downloaded_once_and_checked(tmp_path, monkeypatch):
    body = "".join(json.dumps(r) + "\n" for r in G2_ROWS).encode()
    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(body)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    with pytest.raises(data.UserError, match="not the official 800-prompt file"):
        evaluate.geneval2_data_path()
    assert not (tmp_path / "geneval2").exists()
    monkeypatch.setattr(evaluate, "GENEVAL2_SHA256", hashlib.sha256(body).hexdigest())
    prompts = data.read_metadata(evaluate.geneval2_prompts_path())  # GenEval's schema: the sampler reads it
    assert [p["tag"] for p in prompts] == ["atoms_3", "atoms_4", "atoms_5"]
    assert prompts[1]["vqa_list"] == G2_ROWS[1]["vqa_list"] and prompts[1]["include"] == []
    evaluate.geneval2_prompts_path()
    assert calls == [evaluate.GENEVAL2_URL] * 2 and evaluate.GENEVAL2_COMMIT in calls[0]

    def offline(url, timeout):
        raise OSError("no network")
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "empty")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.UserError, match="cannot download .* or pass --prompts PATH"):
        evaluate.geneval2_data_path()


# -----------------------------------------------------------------------------
# The judge: a tiny random-init Qwen3VLForConditionalGeneration through transformers


def test_soft_score_is_the_next_token_probability_of_the_answers_first_tokens(tmp_path, tiny_judge):
    folder = g2_folder(tmp_path, G2_ROWS[:1], images_per_prompt=1)
    image = folder / "00000" / "samples" / "0000.png"
    options = judge_options(tiny_judge)
    questions = [(image, "How many apples are in the image?", "two"), (image, "Are the apples red?", "Yes"),
                 (image, "Are there any apples in the image?", "Yes")]
    scores = evaluate.judge_probabilities(questions, options)
    assert evaluate.judge_probabilities(questions, judge_options(tiny_judge, batch_size=1)) == \
        pytest.approx(scores, rel=1e-5)  # batched with left padding: the same
    model, processor = evaluate.load_judge(tiny_judge, None, "cpu", "fp32")
    for score, (question, spellings) in zip(scores, [("How many apples are in the image?", ["two", "Two", " two", " Two", "2", " 2"]),
                                                     ("Are the apples red?", ["Yes", "yes", " yes", " Yes"])]):
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": Image.open(image).convert("RGB")},
                                          {"type": "text", "text": f"{question} Answer in one word."}]}],
            tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        assert processor.tokenizer.decode(inputs["input_ids"][0]).endswith(
            "Answer in one word.<|im_end|>\n<|im_start|>assistant\n")
        with torch.no_grad():
            probs = model(**inputs).logits[0, -1].softmax(-1)
        expected = sum(probs[processor.tokenizer.encode(s, add_special_tokens=False)[0]].item() for s in spellings)
        assert score == pytest.approx(expected, rel=1e-4)
        assert 0 < score < 1


def test_geneval2_scores_a_folder_with_a_saved_tiny_judge(tmp_path, tiny_judge):
    folder = g2_folder(tmp_path)
    evaluate.load_judge.cache_clear()
    columns = evaluate.score_metrics(folder, ["geneval2"], options=judge_options(tiny_judge))
    rows = [json.loads(line) for line in (folder / "geneval2.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [len(r["scores"]) for r in rows] == [3, 3, 4, 4, 2, 2]
    assert all(0 < s < 1 for r in rows for s in r["scores"])
    assert columns == pytest.approx(evaluate.summarize_geneval2(rows))
    assert set(columns) == {"geneval2", "geneval2/am", "geneval2/object", "geneval2/attribute", "geneval2/count",
                            "geneval2/position", "geneval2/verb", "geneval2/atoms_3", "geneval2/atoms_4",
                            "geneval2/atoms_5"}
    summary = json.loads((folder / "geneval2.json").read_text())
    assert summary["images"] == 6 and summary["judge"] == tiny_judge


def test_geneval2_needs_folders_sampled_from_its_prompts(tmp_path, tiny_judge):
    folder = g2_folder(tmp_path, images_per_prompt=1)
    data.write_metadata(folder / "00001" / "metadata.jsonl", [{"tag": "colors", "prompt": "a red cup", "include": []}])
    with pytest.raises(data.UserError, match="'a red cup' has no GenEval 2 questions"):
        evaluate.score_geneval2(folder, judge_options(tiny_judge))


def test_bench_vlm_geneval2_runs_the_scoring_path_on_a_random_init_judge(capsys):
    evaluate.load_judge.cache_clear()
    evaluate.main(["bench-vlm", "--metric", "geneval2", "--random-init", "--size", "tiny", "--device", "cpu",
                   "--images", "2", "--batch-size", "8", "--image-size", "64", "--geneval2-dtype", "fp32"])
    out = capsys.readouterr().out
    assert "geneval2 judge random-init tiny on cpu: 2 prompts x 1 image 64x64, 15 questions" in out
    assert "prompts/s" in out and "minutes per curve point: 800 prompts x 1 image" in out


def run_with_geneval2_samples(tmp_path):
    """A Shapes run with GenEval samples of two checkpoints (5 s, 10 s) and GenEval 2 samples beside them."""
    from test_benchmarks import shapes_run
    run = shapes_run(tmp_path / "run")
    for step, seconds in ((10, 5.0), (20, 10.0)):
        (tmp_path / f"g{step}").mkdir()
        folder = g2_folder(tmp_path / f"g{step}", images_per_prompt=1)
        (folder / "sampling.json").write_text(json.dumps({"train_seconds": seconds, "step": step,
                                                          "images_seen": 8 * step, "images_per_prompt": 1}))
        (run / "samples-geneval2").mkdir(exist_ok=True)
        folder.rename(run / "samples-geneval2" / f"ckpt_{step:07d}")
    evaluate.load_judge.cache_clear()
    return run


def test_curve_puts_geneval_and_geneval2_side_by_side(tmp_path, tiny_judge):
    run = run_with_geneval2_samples(tmp_path)
    evaluate.main(["curve", str(run), "--from-samples", "--metrics", "geneval", "geneval2", "--device", "cpu",
                   "--geneval2-judge", tiny_judge, "--geneval2-dtype", "fp32"])
    points = json.loads((run / "curve.json").read_text())
    assert [p["train_seconds"] for p in points] == [5.0, 10.0]
    assert all(p["overall"] == 1.0 and 0 < p["geneval2"] < 100 for p in points)
    assert points[0]["samples_geneval2"].endswith("samples-geneval2/ckpt_0000010")
    header = (run / "curve.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["train_seconds", "step", "images_seen", "geneval_metric", "colors", "single_object", "overall"]
    assert header[7:10] == ["geneval2", "geneval2/am", "geneval2/object"]
    assert Image.open(run / "curve.png").size[1] == int((4.2 + 2.6 * 1) * 120)  # panels: geneval, geneval2


# -----------------------------------------------------------------------------
# HPSv3: the hpsv3 package (its own environment) with a tiny random-init Qwen2-VL named in its config

HPSV3_PYTHON = os.environ.get(evaluate.HPSV3_PYTHON_ENV)
needs_hpsv3 = pytest.mark.skipif(not HPSV3_PYTHON and not os.environ.get("CI"),
                                 reason="no hpsv3 environment: python evaluate.py hpsv3-env DIR, then "
                                        "IMAGEGEN_SPEEDRUN_HPSV3_PYTHON=DIR/bin/python")


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    """(base folder, checkpoint, bench output): bench-vlm builds a tiny random-init HPSv3 with the hpsv3 package's
    classes and times the package on it, in one process (the package takes seconds to import)."""
    assert HPSV3_PYTHON, f"CI must set ${evaluate.HPSV3_PYTHON_ENV} (.ci/run makes the environment)"
    folder = tmp_path_factory.mktemp("hpsv3") / "tiny"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        evaluate.main(["bench-vlm", "--metric", "hpsv3", "--random-init", "--size", "tiny", "--random-init-dir",
                       str(folder), "--device", "cpu", "--images", "2", "--hpsv3-batch-size", "1", "--image-size", "64",
                       "--hpsv3-precision", "fp32"])
    return str(folder), str(folder / "model.safetensors"), out.getvalue()


@needs_hpsv3
def test_bench_vlm_hpsv3_builds_and_times_the_package(tiny_hpsv3):
    base, checkpoint, out = tiny_hpsv3
    config = json.loads((Path(base) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLRewardModelBT"] and config["model_type"] == "qwen2_vl"
    assert Path(checkpoint).exists()
    assert "hpsv3 (random init, tiny) on cpu: 2 images 64x64" in out and "tokens per sequence" in out
    assert "img/s after the first batch" in out and "GenEval's 2212 images" in out


@needs_hpsv3
def test_hpsv3_scores_through_the_package_with_a_random_init_qwen2vl(tmp_path, tiny_hpsv3):
    base, checkpoint, _ = tiny_hpsv3
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2))
    prompts = [{"tag": t, "include": [], "prompt": p} for t, p in
               (("Animals", "a cat"), ("Animals", "a cat"), ("Animals", "a dog"), ("Food", "a cat"))]
    from test_benchmarks import write_folder
    folder = write_folder(tmp_path / "s", prompts, [[a], [b], [a], [a]])
    options = Options(device="cpu", hpsv3_batch_size=3, hpsv3_base=base, hpsv3_checkpoint=checkpoint,
                      hpsv3_precision="fp32")
    scores = evaluate.score_scalar_metric(folder, "hpsv3", options)
    mu = [json.loads(line)["hpsv3"] for line in (folder / "hpsv3.jsonl").read_text().splitlines()]
    assert len(mu) == 4 and all(math.isfinite(m) for m in mu)
    assert mu[3] == pytest.approx(mu[0], abs=1e-5)  # the same image and prompt in a batch of 1 and one of 3
    assert mu[1] != pytest.approx(mu[0], abs=1e-7) and mu[2] != pytest.approx(mu[0], abs=1e-7)  # image, prompt
    assert scores == pytest.approx({"hpsv3": np.mean(mu), "hpsv3/std": np.std(mu), "hpsv3/Animals": np.mean(mu[:3]),
                                    "hpsv3/Food": mu[3]})


@needs_hpsv3
def test_curve_puts_geneval_hpsv3_and_geneval2_side_by_side(tmp_path, tiny_judge, tiny_hpsv3):
    base, checkpoint, _ = tiny_hpsv3
    run = run_with_geneval2_samples(tmp_path)
    evaluate.main(["curve", str(run), "--from-samples", "--metrics", "geneval", "hpsv3", "geneval2", "--device", "cpu",
                   "--geneval2-judge", tiny_judge, "--geneval2-dtype", "fp32", "--hpsv3-base", base,
                   "--hpsv3-checkpoint", checkpoint, "--hpsv3-precision", "fp32"])
    points = json.loads((run / "curve.json").read_text())
    assert [p["train_seconds"] for p in points] == [5.0, 10.0]
    for p in points:  # HPSv3 scored the GenEval folder's images: one mu each, their mean and spread
        mu = [json.loads(line)["hpsv3"] for line in (Path(p["samples"]) / "hpsv3.jsonl").read_text().splitlines()]
        assert p["hpsv3"] == pytest.approx(np.mean(mu)) and p["hpsv3/std"] == pytest.approx(np.std(mu))
        assert p["overall"] == 1.0 and 0 < p["geneval2"] < 100
    header = (run / "curve.csv").read_text().splitlines()[0].split(",")
    assert {"overall", "hpsv3", "hpsv3/std", "geneval2"} <= set(header)
    assert Image.open(run / "curve.png").size[1] == int((4.2 + 2.6 * 2) * 120)  # panels: geneval, hpsv3, geneval2


def test_bench_vlm_sizes_are_per_metric():
    with pytest.raises(data.UserError, match="hpsv3's sizes are tiny and 7b"):
        evaluate.main(["bench-vlm", "--metric", "hpsv3", "--size", "8b"])

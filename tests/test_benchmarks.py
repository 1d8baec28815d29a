"""The real benchmarks: GenEval's official prompts and its rules on COCO classes, the mask2former backend's
mmdet-style post-processing and colour crops (tiny random-init models of the same classes), CLIPScore, curves
of several metrics, offline errors. The official GenEval scorer and HPSv3 cannot run here: their wiring is
tested against injected fakes, in the tests named test_plumbing_*.
"""
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
from conftest import REPO, SHARED, assert_one_line_error, needs_shared
from evaluate import Detection, Options, Thresholds, judge, keep_detections

# Same classes as the real models, a few layers wide.
TINY_M2F = dict(backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                     window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"]),
                num_labels=80, num_queries=8, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1,
                decoder_layers=2, encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2)
TINY_CLIP = dict(text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
                 vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16), embed_dim=16)


def tiny_options(**changes):
    return Options(device="cpu", batch_size=2, detector_config=TINY_M2F, clip_pretrained=None,
                   clip_overrides=TINY_CLIP, **changes)


def write_folder(root, prompts, images):
    """A GenEval-layout folder: prompts[i] with images[i] (a list of (H, W, 3) uint8 arrays)."""
    for i, (prompt, sample_images) in enumerate(zip(prompts, images)):
        (root / f"{i:05d}" / "samples").mkdir(parents=True)
        data.write_metadata(root / f"{i:05d}" / "metadata.jsonl", [prompt])
        for j, image in enumerate(sample_images):
            Image.fromarray(image).save(root / f"{i:05d}" / "samples" / f"{j:04d}.png")
    return root


# -----------------------------------------------------------------------------
# GenEval's official prompt file and class list


@needs_shared
def test_official_prompt_file_has_553_prompts_in_six_tags():
    path = SHARED / "evaluation_metadata.jsonl"
    rows = data.read_metadata(path)
    assert len(path.read_text().splitlines()) == len(rows) == 553
    assert Counter(r["tag"] for r in rows) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                               "position": 100, "color_attr": 100}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.GENEVAL_PROMPTS_SHA256
    clauses = [c for r in rows for key in ("include", "exclude") for c in r.get(key, [])]
    assert {c["class"] for c in clauses} <= set(data.COCO_CLASSES)
    assert {c["color"] for c in clauses if "color" in c} <= set(evaluate.COLOR_NAMES)


@needs_shared
def test_coco_class_names_are_genevals_in_the_detector_order():
    names = [line.strip() for line in (SHARED / "object_names.txt").read_text().splitlines() if line.strip()]
    assert tuple(names) == data.COCO_CLASSES


def test_geneval_prompts_download_failure_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(data, "GENEVAL_PROMPTS_URL", "http://127.0.0.1:9/evaluation_metadata.jsonl")
    with pytest.raises(data.UserError, match="--prompts PATH") as e:
        data.geneval_prompts_path()
    assert str(tmp_path / "cache" / "geneval" / "evaluation_metadata.jsonl") in str(e.value)
    cached = tmp_path / "cache" / "geneval" / "evaluation_metadata.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_text('{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}\n')
    assert data.geneval_prompts_path() == cached  # once cached, no network


# -----------------------------------------------------------------------------
# GenEval's rules on hand-built COCO detections, one case set per tag

TH = Thresholds()


def det(x1, y1, x2, y2, score=0.99, color=None):
    return Detection((x1, y1, x2, y2), score, color)


def verdict(raw, metadata):
    return judge(keep_detections(raw, metadata["tag"], TH), metadata, lambda cls, dets: [d.color for d in dets], TH)[0]


def test_rules_single_object_needs_one_detection_above_threshold():
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    assert verdict({"bench": [det(10, 10, 90, 60, 0.31)]}, meta)
    assert not verdict({"bench": [det(10, 10, 90, 60, 0.3)]}, meta)  # 0.3 is not above the threshold
    assert not verdict({"chair": [det(10, 10, 90, 60)]}, meta)


def test_rules_two_object_needs_both_classes():
    meta = {"tag": "two_object", "include": [{"class": "toaster", "count": 1}, {"class": "fork", "count": 1}]}
    assert verdict({"toaster": [det(0, 0, 40, 40)], "fork": [det(60, 0, 70, 50)]}, meta)
    assert not verdict({"fork": [det(60, 0, 70, 50)]}, meta)


def test_rules_counting_threshold_and_exclude_clause():
    meta = {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}]}
    apples = [det(20 * i, 0, 20 * i + 15, 15, 0.95) for i in range(4)]
    assert verdict({"apple": apples[:3]}, meta)
    assert not verdict({"apple": apples}, meta)  # the exclude clause: a fourth apple fails the image
    assert verdict({"apple": apples[:3] + [det(80, 0, 95, 15, 0.85)]}, meta)  # 0.85 is below 0.9 for counting
    assert not verdict({"apple": apples[:2] + [det(80, 0, 95, 15, 0.85)]}, meta)


def test_rules_colors_checks_the_top_detection():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert verdict({"car": [det(0, 0, 50, 30, 0.9, "red"), det(60, 0, 99, 30, 0.5, "blue")]}, meta)
    assert not verdict({"car": [det(0, 0, 50, 30, 0.9, "blue"), det(60, 0, 99, 30, 0.5, "red")]}, meta)


def test_rules_position_with_the_size_margin():
    meta = {"tag": "position", "include": [{"class": "cup", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    cup = det(100, 100, 200, 200)
    assert verdict({"cup": [cup], "dog": [det(300, 100, 400, 200)]}, meta)
    # Centres 15 px apart, inside the margin 0.1 * (100 + 100) = 20 px: no relation.
    assert not verdict({"cup": [cup], "dog": [det(115, 100, 215, 200)]}, meta)
    assert not verdict({"dog": [det(300, 100, 400, 200)]}, meta)  # no target


def test_rules_color_attr_binds_each_colour_to_its_object():
    meta = {"tag": "color_attr", "include": [{"class": "umbrella", "count": 1, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "green"}]}
    assert verdict({"umbrella": [det(0, 0, 40, 40, color="red")], "bench": [det(50, 0, 99, 40, color="green")]}, meta)
    assert not verdict({"umbrella": [det(0, 0, 40, 40, color="green")],
                        "bench": [det(50, 0, 99, 40, color="red")]}, meta)


# -----------------------------------------------------------------------------
# mmdet's Mask2Former post-processing on synthetic logits and masks


def test_mmdet_resize_shape_fits_1333x800_keeping_the_ratio():
    assert evaluate.mmdet_resize_shape(64, 64) == (800, 800)
    assert evaluate.mmdet_resize_shape(512, 512) == (800, 800)
    assert evaluate.mmdet_resize_shape(480, 640) == (800, 1067)
    assert evaluate.mmdet_resize_shape(200, 1000) == (267, 1333)  # the long side binds


def test_mmdet_postprocess_scores_labels_and_boxes():
    num_classes = 4
    class_logits = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0],   # query 0: class 2
                                 [0.0, 0.0, 0.0, 0.0, 6.0],   # query 1: mostly no-object
                                 [2.0, 0.0, 0.0, 0.0, 1.0]])  # query 2: class 0, empty mask
    mask_logits = torch.full((3, 8, 8), -4.0)
    mask_logits[0, 2:5, 1:6] = 4.0
    mask_logits[1, 0:3, 0:2] = 1.0
    labels, scores, boxes, masks = evaluate.mmdet_instances(class_logits, mask_logits, (8, 8), (8, 8), (8, 8))
    assert len(labels) == 3 * num_classes  # top-100 of the 12 (query, class) pairs: the no-object class dropped
    assert labels.max() < num_classes
    probs = class_logits.softmax(-1)[:, :-1]
    mask_score = torch.tensor([torch.sigmoid(torch.tensor(4.0)), torch.sigmoid(torch.tensor(1.0)), 0.0])
    # score = class probability x mean mask probability inside the binary mask, for every (query, class)
    assert sorted(scores.tolist()) == pytest.approx(sorted((probs * mask_score[:, None]).flatten().tolist()), rel=1e-4)
    best = int(scores.argmax())
    assert int(labels[best]) == 2 and tuple(boxes[best].tolist()) == (1.0, 2.0, 6.0, 5.0)  # box from the mask
    assert masks[best].sum() == 15
    empty = (masks.flatten(1).sum(1) == 0).nonzero()[:, 0]
    assert len(empty) == num_classes and (boxes[empty] == 0).all() and (scores[empty] == 0).all()
    labels, scores, _, _ = evaluate.mmdet_instances(class_logits, mask_logits, (8, 8), (8, 8), (8, 8), max_per_image=2)
    assert len(labels) == 2 and int(labels[scores.argmax()]) == 2


def test_mmdet_postprocess_drops_padding_and_rescales_masks_to_the_image():
    # A 10x20 image resized x4 to 40x80, padded to 64x96; mask logits at a quarter of the padded size.
    mask_logits = torch.full((1, 16, 24), -10.0)
    mask_logits[0, 2:6, 5:15] = 10.0  # the object at x 5..15, y 2..6 of the original image
    class_logits = torch.tensor([[0.0, 4.0, 0.0]])
    _, _, boxes, masks = evaluate.mmdet_instances(class_logits, mask_logits, (40, 80), (64, 96), (10, 20))
    assert masks.shape == (2, 10, 20)
    assert np.allclose(boxes[0].tolist(), (5, 2, 15, 6), atol=1)


def test_detector_on_a_tiny_random_model_follows_mmdets_input_and_output_shapes():
    detector = evaluate.Mask2FormerDetector(tiny_options())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    batch, resized = detector.preprocess(images)
    assert resized == [(800, 1067)] * 2 and tuple(batch.shape) == (2, 3, 800, 1088)  # padded to 32
    assert (batch[:, :, :, 1067:] == 0).all()
    corner = (torch.tensor(images[0][0, 0], dtype=torch.float32) - torch.tensor(evaluate.MMDET_MEAN)) \
        / torch.tensor(evaluate.MMDET_STD)
    assert torch.allclose(batch[0, :, 0, 0], corner, atol=1e-5)
    for found in detector(images):
        detections = [d for dets in found.values() for d in dets]
        assert len(detections) == min(100, TINY_M2F["num_queries"] * 80)
        assert set(found) <= set(data.COCO_CLASSES)
        for d in detections:
            assert d.mask.shape == (48, 64) and 0 <= d.score <= 1
            ys, xs = np.nonzero(d.mask.numpy())
            expected = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0)
            assert d.box == tuple(float(v) for v in expected)


# -----------------------------------------------------------------------------
# Colour: the #999 composite, and the zero-shot classifier


def test_colour_crop_composites_the_object_on_999_and_crops_to_its_box():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:12, 8:20] = True
    mask[5, 8] = False  # a corner of the box outside the object
    crop = np.asarray(evaluate.colour_crop(image, mask, (8, 5, 20, 12)))
    assert crop.shape == (7, 12, 3)
    assert (crop[mask[5:12, 8:20]] == image[5:12, 8:20][mask[5:12, 8:20]]).all()
    assert (crop[0, 0] == 0x99).all()


def test_colour_classifier_is_clip_over_ten_colours_and_three_templates():
    clip = evaluate.Clip(tiny_options())
    classifier = evaluate.ColorClassifier(clip)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    masks = [torch.zeros(40, 40, dtype=torch.bool) for _ in range(2)]
    masks[0][5:20, 5:30] = True
    masks[1][22:38, 10:35] = True
    dets = [Detection((5, 5, 30, 20), 0.9, mask=masks[0]), Detection((10, 22, 35, 38), 0.8, mask=masks[1])]
    (colours,) = classifier([(image, "car", dets)])
    weights = torch.stack([torch.nn.functional.normalize(clip.texts(
        [f"a photo of a {c} car", f"a photo of a {c}-colored car", f"a photo of a {c} object"]).mean(0), dim=0)
        for c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")])
    crops = clip.images([evaluate.colour_crop(image, m.numpy(), d.box) for m, d in zip(masks, dets)])
    assert colours == [evaluate.COLOR_NAMES[i] for i in (crops @ weights.T).argmax(1).tolist()]


def test_mask2former_backend_scores_a_folder_end_to_end(tmp_path):
    prompts = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
               {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}]
    rng = np.random.default_rng(3)
    folder = write_folder(tmp_path / "s", prompts, [[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)] for _ in prompts])
    scores = evaluate.score_folder(folder, "mask2former", options=tiny_options())
    assert set(scores) == {"colors", "single_object", "overall"}
    assert json.loads((folder / "scores.json").read_text())["metric"] == "geneval-m2f"
    assert len((folder / "results.jsonl").read_text().splitlines()) == 2


# -----------------------------------------------------------------------------
# Offline: the error names the model and how to pre-download it


def test_offline_detector_error_names_the_model_and_how_to_get_it(tmp_path):
    folder = write_folder(tmp_path / "s", [{"tag": "single_object", "include": [{"class": "cow", "count": 1}],
                                            "prompt": "a photo of a cow"}], [[np.zeros((16, 16, 3), np.uint8)]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = subprocess.run([sys.executable, "evaluate.py", "score", str(folder), "--backend", "mask2former"],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(result, "facebook/mask2former-swin-small-coco-instance",
                          "hf download facebook/mask2former-swin-small-coco-instance", "--detector PATH")


def test_missing_clip_weights_error_names_the_model_and_the_flag():
    with pytest.raises(data.UserError, match="ViT-B-32") as e:
        evaluate.load_clip("ViT-B-32", "/nonexistent/clip.bin", None, "cpu")
    assert "--clip-pretrained PATH" in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# CLIPScore


def test_clipscore_is_100_times_the_clipped_cosine(tmp_path):
    prompts = [{"tag": "a", "include": [], "prompt": "a red cube"}, {"tag": "b", "include": [], "prompt": "a dog"}]
    rng = np.random.default_rng(4)
    images = [[rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)] for _ in prompts]
    folder = write_folder(tmp_path / "s", prompts, images)
    options = tiny_options()
    scores = evaluate.score_scalar_metric(folder, "clipscore", options)
    clip = evaluate.Clip(options)
    expected = {p["tag"]: [100 * max(float(clip.images([Image.fromarray(im)])[0] @ clip.texts([p["prompt"]])[0]), 0)
                           for im in ims] for p, ims in zip(prompts, images)}
    assert scores["clipscore"] == pytest.approx(np.mean(expected["a"] + expected["b"]), abs=1e-3)
    assert scores["clipscore/a"] == pytest.approx(np.mean(expected["a"]), abs=1e-3)
    assert len((folder / "clipscore.jsonl").read_text().splitlines()) == 4


# -----------------------------------------------------------------------------
# Plumbing: the official scorer and HPSv3 replaced by fakes


FAKE_GENEVAL = '''
import json, os, sys
folder, outfile = sys.argv[1], sys.argv[sys.argv.index("--outfile") + 1]
json.dump(sys.argv[1:], open(os.environ["FAKE_GENEVAL_ARGV"], "w"))
if os.environ.get("FAKE_GENEVAL_FAIL"):
    sys.exit("RuntimeError: CUDA error: no kernel image is available")
with open(outfile, "w") as out:
    for sub in sorted(os.listdir(folder)):
        if sub.isdigit():
            meta = json.load(open(os.path.join(folder, sub, "metadata.jsonl")))
            for name in sorted(os.listdir(os.path.join(folder, sub, "samples"))):
                out.write(json.dumps({"filename": os.path.join(folder, sub, "samples", name), "tag": meta["tag"],
                                      "prompt": meta["prompt"], "correct": name == "0000.png", "reason": "",
                                      "metadata": json.dumps(meta), "details": "{}"}) + "\\n")
'''


def test_plumbing_official_backend_fake(tmp_path, monkeypatch, capsys):
    checkout = tmp_path / "geneval"
    (checkout / "evaluation").mkdir(parents=True)
    (checkout / "evaluation" / "evaluate_images.py").write_text(FAKE_GENEVAL)
    prompts = [{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
               {"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"}]
    folder = write_folder(tmp_path / "s", prompts, [[np.zeros((8, 8, 3), np.uint8)] * 2 for _ in prompts])
    monkeypatch.setenv("FAKE_GENEVAL_ARGV", str(tmp_path / "argv.json"))
    options = Options(geneval_dir=str(checkout), geneval_python=sys.executable, geneval_model_path=str(tmp_path / "m"))
    scores = evaluate.score_folder(folder, "official", options=options)
    assert scores == {"counting": 0.5, "single_object": 0.5, "overall": 0.5}
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[0] == str(folder.resolve()) and argv[argv.index("--model-path") + 1] == str((tmp_path / "m").resolve())
    assert json.loads((folder / "scores.json").read_text())["metric"] == "geneval"
    assert "detected no object" in capsys.readouterr().err  # the silent-failure warning
    monkeypatch.setenv("FAKE_GENEVAL_FAIL", "1")
    with pytest.raises(data.UserError, match="exited with 1: RuntimeError: CUDA error"):
        evaluate.score_folder(folder, "official", options=options)


FAKE_HPSV3 = '''
import json, os
import torch
class HPSv3RewardInferencer:
    def __init__(self, config_path=None, checkpoint_path=None, device="cuda"):
        self.log = open(os.environ["FAKE_HPSV3_LOG"], "a")
        self.log.write(json.dumps({"device": device, "checkpoint": checkpoint_path, "config": config_path}) + "\\n")

    def reward(self, *, image_paths, prompts):  # keyword-only: positional calls fail
        assert all(os.path.exists(p) for p in image_paths)
        self.log.write(json.dumps({"batch": len(image_paths)}) + "\\n")
        return torch.tensor([[float(len(p)), 0.5] for p in prompts])  # (mu, sigma); mu = the prompt's length

    def prepare_batch(self, image_paths, prompts):
        return {"input_ids": torch.zeros(len(prompts), 7, dtype=torch.long)}
'''


@pytest.fixture
def fake_hpsv3(tmp_path, monkeypatch):
    (tmp_path / "fakepkgs" / "hpsv3").mkdir(parents=True)
    (tmp_path / "fakepkgs" / "hpsv3" / "__init__.py").write_text(FAKE_HPSV3)
    (tmp_path / "fakepkgs" / "hpsv3" / "config").mkdir()
    (tmp_path / "fakepkgs" / "hpsv3" / "config" / "HPSv3_7B.yaml").write_text(
        "model_name_or_path: Qwen/Qwen2-VL-7B-Instruct\nbf16: true\ntorch_dtype: bfloat16\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakepkgs"))
    monkeypatch.setenv("FAKE_HPSV3_LOG", str(tmp_path / "hpsv3.log"))
    return tmp_path / "hpsv3.log"


def test_plumbing_hpsv3_fake(tmp_path, fake_hpsv3):
    prompts = [{"tag": "Animals", "include": [], "prompt": "a cat"}, {"tag": "Animals", "include": [], "prompt": "a horse"},
               {"tag": "Food", "include": [], "prompt": "a pizza on a table"}]
    folder = write_folder(tmp_path / "s", prompts, [[np.zeros((8, 8, 3), np.uint8)] * 2 for _ in prompts])
    options = Options(hpsv3_python=sys.executable, hpsv3_batch_size=4, device="cpu",
                      hpsv3_checkpoint="/w/HPSv3.safetensors")
    scores = evaluate.score_scalar_metric(folder, "hpsv3", options)
    assert scores == {"hpsv3": pytest.approx(np.mean([5, 7, 18])), "hpsv3/std": pytest.approx(np.std([5, 5, 7, 7, 18, 18])),
                      "hpsv3/Animals": 6.0, "hpsv3/Food": 18.0}
    log = [json.loads(line) for line in fake_hpsv3.read_text().splitlines()]
    config = log[0].pop("config")  # on the CPU: a copy of the package's config in fp32
    assert log == [{"device": "cpu", "checkpoint": "/w/HPSv3.safetensors"}, {"batch": 4}, {"batch": 2}]
    assert config.endswith("HPSv3.yaml") and not os.path.exists(config)  # written beside the job, then removed
    rows = [json.loads(line) for line in (folder / "hpsv3.jsonl").read_text().splitlines()]
    assert [r["hpsv3"] for r in rows] == [5.0, 5.0, 7.0, 7.0, 18.0, 18.0]


def test_compare_reports_both_backends_scores_and_per_image_agreement(tmp_path, capsys):
    def results(name, verdicts):
        rows = [{"filename": f"/{name}/{i:05d}/samples/0000.png", "tag": tag, "correct": ok}
                for i, (tag, ok) in enumerate(verdicts)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / f"{name}.jsonl")
    a = results("official", [("colors", True), ("colors", True), ("position", False), ("position", True)])
    b = results("m2f", [("colors", True), ("colors", False), ("position", False), ("position", False)])
    tasks, agreement = evaluate.compare_results(a, b)
    assert tasks == {"colors": (1.0, 0.5), "position": (0.5, 0.0), "overall": (0.75, 0.25)}
    assert agreement == 0.5
    evaluate.main(["compare", a, b])
    assert "difference -0.5000" in capsys.readouterr().out


def test_plumbing_hpsv3_failure_says_how_to_install_and_download(tmp_path):
    folder = write_folder(tmp_path / "s", [{"tag": "x", "include": [], "prompt": "a cat"}], [[np.zeros((8, 8, 3), np.uint8)]])
    options = Options(hpsv3_python=sys.executable, device="cpu")  # no hpsv3 package on this path
    with pytest.raises(data.UserError, match="evaluate.py hpsv3-env DIR") as e:
        evaluate.score_scalar_metric(folder, "hpsv3", options)
    assert "ModuleNotFoundError" in str(e.value) and "hf download MizzenAI/HPSv3" in str(e.value)


def test_hpdv3_and_user_prompt_files_become_geneval_schema_rows(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "Animals.txt").write_text("a cat\n\na horse\n")
    (tmp_path / "bench" / "Food.json").write_text(json.dumps(["a pizza", {"prompt": "a cake", "category": "Dessert"}]))
    rows = evaluate.read_prompt_file(tmp_path / "bench")
    assert rows == [{"tag": "Animals", "prompt": "a cat", "include": []}, {"tag": "Animals", "prompt": "a horse", "include": []},
                    {"tag": "Food", "prompt": "a pizza", "include": []}, {"tag": "Dessert", "prompt": "a cake", "include": []}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"caption": 3}\n')
    with pytest.raises(data.UserError, match="bad.jsonl: item 2"):
        evaluate.read_prompt_file(tmp_path / "bad.jsonl")


# -----------------------------------------------------------------------------
# Curves: every metric through the same machinery, several on one figure


def shapes_run(root):
    """A run with two checkpoints whose samples exist: exact renders of two Shapes prompts."""
    prompts = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
               {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "blue"}],
                "prompt": "a photo of a blue square"}]
    scenes = [[("circle", "red", 10, 10, 15)], [("square", "blue", 20, 20, 17)]]
    (root / "checkpoints").mkdir(parents=True)
    for k, step in enumerate((10, 20)):
        (root / "checkpoints" / f"ckpt_{step:07d}.pt").write_bytes(b"")
        samples = write_folder(root / "samples" / f"ckpt_{step:07d}", prompts,
                               [[data.render_scene(s)] * 2 for s in scenes])
        (samples / "sampling.json").write_text(json.dumps({"train_seconds": 5.0 * (k + 1), "step": step,
                                                           "images_seen": 8 * step, "images_per_prompt": 2}))
    return root


def test_plumbing_curve_from_samples_with_fake_hpsv3(tmp_path, fake_hpsv3):
    run = shapes_run(tmp_path / "run")
    evaluate.main(["curve", str(run), "--from-samples", "--metrics", "geneval", "hpsv3",
                   "--hpsv3-python", sys.executable, "--score-batch-size", "3", "--device", "cpu"])
    points = json.loads((run / "curve.json").read_text())
    assert [p["step"] for p in points] == [10, 20]
    for p in points:
        assert p["overall"] == 1.0 and p["geneval_metric"] == "geneval-shapes"
        assert p["hpsv3"] == pytest.approx((19 + 24) / 2) and p["hpsv3/colors"] == 24.0
    header = (run / "curve.csv").read_text().splitlines()[0].split(",")
    assert header == ["train_seconds", "step", "images_seen", "geneval_metric", "colors", "single_object", "overall",
                      "hpsv3", "hpsv3/std", "hpsv3/colors", "hpsv3/single_object"]
    assert Image.open(run / "curve.png").size[1] == int((4.2 + 2.6 * 1) * 120)  # two panels: geneval and hpsv3
    evaluate.main(["plot", str(run), str(run), "--metrics", "overall", "colors", "hpsv3", "--out", str(tmp_path / "f.png")])
    assert Image.open(tmp_path / "f.png").size[1] == int((0.8 + 3.2 * 3) * 120)


def test_curve_from_samples_needs_the_sampled_folders(tmp_path):
    run = shapes_run(tmp_path / "run")
    (run / "checkpoints" / "ckpt_0000030.pt").write_bytes(b"")
    with pytest.raises(data.UserError, match="ckpt_0000030/sampling.json: missing"):
        evaluate.main(["curve", str(run), "--from-samples"])


def test_bench_detector_reports_detection_colour_and_total_throughput(capsys):
    evaluate.main(["bench-detector", "--backend", "shapes", "--images", "4", "--batch-size", "2", "--image-size", "64"])
    out = capsys.readouterr().out
    assert "4 images 64x64" in out and "batch 2" in out
    assert all(word in out for word in ("detection", "colour (2 crops/img)", "total", "img/s"))

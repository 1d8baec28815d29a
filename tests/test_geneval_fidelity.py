"""Fidelity to djghosh13/geneval's evaluation/evaluate_images.py, case by case on hand-made detections, where
this repo's rule engine once differed from it; and the Shapes detector on shapes that are none of its classes.

Expected results come from the official code's definitions (worked by hand in the comments) or, for sort
orders, from numpy 1.23.5 itself: GenEval's environment.yml pins numpy 1.23.1, whose argsort is the same.
"""
import numpy as np

import data
import evaluate
from evaluate import Detection, Thresholds, box_iou, judge, keep_detections

TH = Thresholds()


def det(x1, y1, x2, y2, score=0.99, color="red"):
    return Detection((x1, y1, x2, y2), score, color)


def verdict(raw, metadata, th=TH):
    return judge(keep_detections(raw, metadata["tag"], th), metadata, lambda cls, dets: [d.color for d in dets], th)[0]


def kept_ids(raw, tag="single_object", th=TH):
    """The kept detections of each class, named by their index in the raw list."""
    return {cls: [next(k for k, r in enumerate(raw[cls]) if r is d) for d in dets]
            for cls, dets in keep_detections(raw, tag, th).items()}


# -----------------------------------------------------------------------------
# 1. Equal scores: np.argsort(scores)[::-1] puts the later detection first


def test_equal_scores_put_the_later_detection_first_for_colour():
    # evaluate_images.py: ordering = np.argsort([0.95, 0.95])[::-1] = [1, 0], so the colour check sees the blue one.
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "blue"}]}
    raw = {"circle": [det(0, 0, 10, 10, 0.95, "red"), det(30, 30, 40, 40, 0.95, "blue")]}
    assert kept_ids(raw, "colors") == {"circle": [1, 0]}
    assert verdict(raw, meta)
    raw["circle"].reverse()
    assert not verdict(raw, meta)


def test_equal_scores_put_the_later_detection_first_for_position():
    # The later of two equally scored circles is the one checked against the square: it is right of it.
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    square = det(30, 20, 40, 30)
    left, right = det(2, 20, 12, 30, 0.8), det(50, 20, 60, 30, 0.8)
    assert not verdict({"square": [square], "circle": [left, right]}, meta)
    assert verdict({"square": [square], "circle": [right, left]}, meta)


def test_up_to_16_detections_ties_go_latest_first_after_the_threshold():
    # numpy 1.23 insertion-sorts up to 16 elements (stable), so reversed: higher score first, then the later.
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 17))
        scores = rng.choice([0.2, 0.3, 0.5, 0.75, 0.95], n)
        raw = {"cross": [det(k, 0, k + 5, 5, float(s)) for k, s in enumerate(scores)]}
        expected = sorted((k for k in range(n) if scores[k] > 0.3), key=lambda k: (-scores[k], -k))
        assert kept_ids(raw).get("cross", []) == expected, scores


# np.argsort(values)[::-1] under numpy 1.23.5 (python -c "import numpy as np; print(np.argsort(np.array(v,
# np.float32))[::-1].tolist())"): past 16 elements numpy 1.x partitions, and ties no longer go latest first.
ALTERNATING_20 = ([0.5, 0.7] * 10, [19, 11, 1, 3, 5, 7, 9, 13, 15, 17, 12, 10, 18, 8, 14, 6, 4, 16, 2, 0])
MIXED_18 = ([0.8, 0.8, 0.4, 0.8, 0.4, 0.8, 0.8, 0.4, 0.8, 0.4, 0.8, 0.8, 0.4, 0.8, 0.4, 0.8, 0.8, 0.4],
            [8, 10, 1, 3, 5, 6, 16, 0, 11, 13, 15, 9, 7, 12, 4, 14, 2, 17])
# 37 values that drive numpy 1.x's introsort past its depth limit (built by McIlroy's adversary, then halved
# to make ties), so part of it is heap-sorted; np.argsort under numpy 1.23.5, not reversed.
HEAPSORTED_37 = ([0, 15, 1, 10, 2, 11, 3, 18, 4, 17, 5, 17, 6, 16, 7, 16, 8, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                  14, 14, 13, 13, 12, 12, 9, 11],
                 [0, 18, 2, 19, 4, 20, 6, 21, 8, 22, 10, 23, 12, 24, 14, 25, 16, 26, 35, 27, 3, 28, 36, 5, 33, 34,
                  32, 31, 30, 29, 1, 17, 15, 13, 11, 9, 7])


def test_ties_among_more_than_16_detections_follow_numpy_1_23():
    for scores, official in (ALTERNATING_20, MIXED_18):
        raw = {"circle": [det(k, 0, k + 5, 5, s) for k, s in enumerate(scores)]}
        assert kept_ids(raw)["circle"] == [k for k in official if scores[k] > 0.3][:TH.max_objects]
    values, official = HEAPSORTED_37
    assert evaluate.numpy1_argsort(np.array(values, np.float32)) == official


def test_numpy1_argsort_is_a_sort_and_stable_up_to_16_elements():
    rng = np.random.default_rng(1)
    for _ in range(300):
        values = rng.integers(0, 4, int(rng.integers(0, 60))).astype(np.float32)
        order = evaluate.numpy1_argsort(values)
        assert sorted(order) == list(range(len(values)))
        assert np.all(np.diff(values[order]) >= 0)
        if len(values) <= 16:
            assert order == np.argsort(values, kind="stable").tolist()


# -----------------------------------------------------------------------------
# 2. Scores are float32 and compared with the thresholds in float32


def test_a_float32_score_equal_to_the_threshold_is_not_kept():
    # bbox[:, 4] > 0.3 with float32 scores: numpy casts 0.3 to float32, and float32(0.3) > float32(0.3) is False,
    # although float32(0.3) = 0.30000001192... is above the float64 0.3.
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
    at = float(np.float32(0.3))
    assert at > 0.3
    assert keep_detections({"circle": [det(0, 0, 10, 10, at)]}, "single_object", TH) == {}
    assert not verdict({"circle": [det(0, 0, 10, 10, at)]}, meta)
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    assert verdict({"circle": [det(0, 0, 10, 10, above)]}, meta)


def test_a_score_that_rounds_to_float32_0_9_does_not_count():
    # mmdet hands evaluate_images.py float32 scores: 0.9 + 1e-9 is float32(0.9) there, not above float32(0.9).
    meta = {"tag": "counting", "include": [{"class": "square", "count": 2}],
            "exclude": [{"class": "square", "count": 3}]}
    assert np.float32(0.9 + 1e-9) == np.float32(0.9)
    squares = [det(0, 0, 10, 10, 0.99), det(20, 0, 30, 10, 0.98), det(40, 0, 50, 10, 0.9 + 1e-9)]
    assert kept_ids({"square": squares}, "counting") == {"square": [0, 1]}
    assert verdict({"square": squares}, meta)  # two squares count, the third does not
    squares[2] = det(40, 0, 50, 10, float(np.nextafter(np.float32(0.9), np.float32(1))))
    assert not verdict({"square": squares}, meta)


# -----------------------------------------------------------------------------
# 3. NMS's IoU adds one pixel to every width and height


def test_box_iou_counts_both_end_pixels():
    # compute_iou: area = max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0).
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == 66 / 176  # 6 x 11 over 121 + 121 - 66
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 11 / 231  # touching boxes share a column
    assert box_iou((0, 0, 10, 10), (12, 0, 22, 10)) == 0  # -1 wide: clipped to 0
    assert box_iou((3, 4, 9, 8), (3, 4, 9, 8)) == 1


def test_nms_suppresses_by_the_plus_one_iou():
    # At max_overlap 0.35 the half-overlapping box goes (66/176 = 0.375; without the + 1 it is 50/150 = 0.33),
    # and at 0.04 even a box that only touches (11/231 = 0.048).
    first, half, touching = det(0, 0, 10, 10, 0.9), det(5, 0, 15, 10, 0.8), det(10, 0, 20, 10, 0.8)
    assert kept_ids({"circle": [first, half]}, th=Thresholds(max_overlap=0.35)) == {"circle": [0]}
    assert kept_ids({"circle": [first, half]}, th=Thresholds(max_overlap=0.38)) == {"circle": [0, 1]}
    assert kept_ids({"circle": [first, touching]}, th=Thresholds(max_overlap=0.04)) == {"circle": [0]}
    assert kept_ids({"circle": [first, det(0, 0, 10, 10, 0.8)]}) == {"circle": [0, 1]}  # max_overlap 1: no NMS


# -----------------------------------------------------------------------------
# 4. The Shapes detector gives no label to a shape of no class (as a COCO detector gives no COCO label to an
#    object of no COCO class), and keeps every class at every size and sub-pixel offset


def turned(u, v, degrees):
    t = np.deg2rad(degrees)
    return np.cos(t) * u - np.sin(t) * v, np.sin(t) * u + np.cos(t) * v


def square_turned(degrees):  # a square turned on screen, scaled to fit its box
    scale = abs(np.cos(np.deg2rad(degrees))) + abs(np.sin(np.deg2rad(degrees)))
    return lambda u, v: np.all(np.abs(turned(u * scale, v * scale, -degrees)) <= 1, axis=0)


def cross_turned(degrees):
    t = np.deg2rad(degrees % 90)
    scale = max(np.cos(t) + np.sin(t) / 3, np.sin(t) + np.cos(t) / 3)  # the bars' far corners touch the box
    def inside(u, v):
        a, b = turned(u * scale, v * scale, -degrees)
        return (np.abs(a) <= 1) & (np.abs(b) <= 1) & ((np.abs(a) <= 1 / 3) | (np.abs(b) <= 1 / 3))
    return inside


CLASS_SHAPES = {"circle": lambda u, v: u * u + v * v <= 1, "square": lambda u, v: np.ones_like(u, bool),
                "triangle": lambda u, v: v >= 2 * np.abs(u) - 1, "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
                "cross": cross_turned(0)}
# (shape of no class, width / height of its box)
NO_CLASS_SHAPES = {
    "triangle upside down": (lambda u, v: -v >= 2 * np.abs(u) - 1, 1),
    "triangle pointing left": (lambda u, v: u >= 2 * np.abs(v) - 1, 1),
    "triangle pointing right": (lambda u, v: -u >= 2 * np.abs(v) - 1, 1),
    "square turned 20": (square_turned(20), 1), "square turned -25": (square_turned(-25), 1),
    "cross turned 20": (cross_turned(20), 1), "cross turned 30": (cross_turned(30), 1),
    "cross turned 45": (cross_turned(45), 1),
    "ring": (lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.5 ** 2), 1),
    "L": (lambda u, v: (u <= -1 / 3) | (v >= 1 / 3), 1),
    "half disc": (lambda u, v: u * u + np.square((v + 1) / 2) <= 1, 2),
    "thin bar": (lambda u, v: np.ones_like(u, bool), 4),
    "rectangle": (lambda u, v: np.ones_like(u, bool), 2),
}


def drawn(inside, cx, cy, width, height, color="orange"):
    """A (64, 64, 3) image of one shape filling a width x height box centred at (cx, cy), sampled at pixel
    centres (all real-valued: any size, any sub-pixel position)."""
    centres = np.arange(data.IMAGE_SIZE) + 0.5
    u, v = (centres[None, :] - cx) / (width / 2), (centres[:, None] - cy) / (height / 2)
    image = np.full((data.IMAGE_SIZE, data.IMAGE_SIZE, 3), data.BACKGROUND, np.uint8)
    image[(np.abs(u) <= 1) & (np.abs(v) <= 1) & inside(u, v)] = data.COLORS[color]
    return image


def test_shapes_of_no_class_get_no_label_above_the_threshold():
    # They were circles or squares at confidence 0.6-0.87 (bars and rectangles: squares at 1.0), so a model
    # drawing an upside-down triangle for "a photo of a circle" passed.
    rng = np.random.default_rng(0)
    for name, (inside, aspect) in NO_CLASS_SHAPES.items():
        for _ in range(30):
            size = rng.uniform(min(data.OBJECT_SIZES), max(data.OBJECT_SIZES))
            image = drawn(inside, *rng.uniform(16, 48, 2), size, size / aspect)
            found = evaluate.detect_shapes(image)
            assert not [(c, d.score) for c, ds in found.items() for d in ds if d.score > TH.threshold], (name, size)


def test_every_class_keeps_its_label_where_its_turned_twin_has_none():
    # Each class at every track size and at whole, half and quarter pixel offsets is found once, as itself;
    # the shape beside it (the class turned, or hollowed) at the same place and size is not found at all.
    twins = {"circle": "ring", "square": "square turned 20", "triangle": "triangle upside down",
             "diamond": "square turned -25", "cross": "cross turned 45"}
    for shape, twin in twins.items():
        for size in range(min(data.OBJECT_SIZES), max(data.OBJECT_SIZES) + 1):
            for dx, dy in ((0, 0), (0.5, 0), (0, 0.5), (0.25, 0.75)):
                found = evaluate.detect_shapes(drawn(CLASS_SHAPES[shape], 32 + dx, 32 + dy, size, size))
                assert list(found) == [shape] and len(found[shape]) == 1, (shape, size, dx, dy, found)
                assert evaluate.detect_shapes(drawn(NO_CLASS_SHAPES[twin][0], 32 + dx, 32 + dy, size, size)) == {}, (
                    twin, size, dx, dy)

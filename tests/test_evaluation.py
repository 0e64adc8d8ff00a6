"""Semantic and panoptic metrics against hand-computed cases and independent references written here: Detectron2's
SemSegEvaluator formulas over a confusion matrix built with np.add.at, and panopticapi's PQ definition evaluated
with a plain loop over segment pairs and boolean masks."""
import json
import math

import numpy as np
import pytest

from maskformer_jax.evaluation import PanopticEvaluator, SemanticEvaluator, to_json_safe

ATOL = 1e-9  # on percentages
NAN = float("nan")

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "dog", "isthing": 1},
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 11, "name": "grass", "isthing": 0},
    {"id": 12, "name": "road", "isthing": 0},
]
PERSON, CAR, DOG, SKY, GRASS, ROAD = 1, 2, 3, 10, 11, 12


def assert_results_equal(actual: dict, expected: dict, atol: float = ATOL) -> None:
  """Same keys; values equal to `atol`, NaN only where NaN is expected."""
  assert set(actual) == set(expected), set(actual) ^ set(expected)
  for key, value in expected.items():
    if isinstance(value, float) and math.isnan(value):
      assert math.isnan(actual[key]), (key, actual[key])
    else:
      assert actual[key] == pytest.approx(value, abs=atol), (key, actual[key], value)


def assert_subset(actual: dict, expected: dict) -> None:
  """`expected` names only some keys of `actual`."""
  assert_results_equal({key: actual[key] for key in expected}, expected)


# ----------------------------------------------------------------------------------------------------------------
# Semantic segmentation.
# ----------------------------------------------------------------------------------------------------------------

def reference_semantic(preds, gts, num_classes: int, ignore_label: int, names) -> dict:
  """Detectron2's SemSegEvaluator.evaluate written out per class over a [gt, pred] confusion matrix."""
  conf = np.zeros((num_classes, num_classes), np.int64)
  for pred, gt in zip(preds, gts):
    keep = gt != ignore_label
    np.add.at(conf, (gt[keep].astype(np.int64), pred[keep].astype(np.int64)), 1)
  total = conf.sum()
  results, ious, accs, weighted = {}, [], [], 0.0
  for c, name in enumerate(names):
    tp, gt_count, pred_count = conf[c, c], conf[c, :].sum(), conf[:, c].sum()
    union = gt_count + pred_count - tp
    acc = tp / gt_count if gt_count > 0 else float("nan")
    iou = tp / union if gt_count > 0 and union > 0 else float("nan")
    if gt_count > 0:
      accs.append(acc)
      if union > 0:
        ious.append(iou)
        weighted += iou * gt_count / total
    results[f"IoU-{name}"] = 100 * iou
    results[f"ACC-{name}"] = 100 * acc
  results["mIoU"] = 100 * sum(ious) / len(ious)
  results["fwIoU"] = 100 * weighted
  results["mACC"] = 100 * sum(accs) / len(accs)
  results["pAcc"] = 100 * np.trace(conf) / total
  return results


def random_semantic_pair(rng, shape, num_classes: int, ignore_label: int):
  """A uint8 gt with an ignored rectangle and scattered ignored pixels, never using the last class, and a pred
  that agrees with it on about 70% of pixels (the last class is predicted sometimes)."""
  h, w = shape
  gt = rng.integers(0, num_classes - 1, size=shape).astype(np.uint8)
  y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
  gt[y:y + h // 3, x:x + w // 3] = ignore_label
  gt[rng.random(shape) < 0.05] = ignore_label
  pred = np.where(rng.random(shape) < 0.7, gt, rng.integers(0, num_classes, size=shape))
  pred = np.where(gt == ignore_label, rng.integers(0, num_classes, size=shape), pred).astype(np.int32)
  return pred, gt


def test_semantic_matches_reference_on_random_maps():
  rng = np.random.default_rng(0)
  num_classes, ignore = 6, 255
  names = ["a", "b", "c", "d", "e", "never_in_gt"]
  pairs = [random_semantic_pair(rng, shape, num_classes, ignore) for shape in [(17, 23), (32, 9), (40, 40)]]
  evaluator = SemanticEvaluator(num_classes, ignore, class_names=names)
  for pred, gt in pairs:
    evaluator.update(pred, gt)
  preds, gts = zip(*pairs)
  expected = reference_semantic(preds, gts, num_classes, ignore, names)
  assert math.isnan(expected["IoU-never_in_gt"]) and expected["mIoU"] > 0
  assert_results_equal(evaluator.result(), expected)


def test_semantic_hand_computed():
  # The ignored pixel's prediction (class 0) must not count: counting it would make IoU-0 1/4.
  gt = np.array([[0, 0, 1], [1, 255, 2]])
  pred = np.array([[0, 1, 1], [1, 0, 0]])
  evaluator = SemanticEvaluator(3)
  evaluator.update(pred, gt)
  # Per class tp / gt / pred: 0: 1/2/2, 1: 2/2/3, 2: 0/1/0 -> IoU 1/3, 2/3, 0; ACC 1/2, 1, 0.
  assert_results_equal(evaluator.result(), {
      "mIoU": 100 / 3, "fwIoU": 40.0, "mACC": 50.0, "pAcc": 60.0,
      "IoU-0": 100 / 3, "IoU-1": 200 / 3, "IoU-2": 0.0, "ACC-0": 50.0, "ACC-1": 100.0, "ACC-2": 0.0})


def test_semantic_class_absent_from_gt_is_nan_and_excluded():
  gt = np.array([[0, 0], [1, 1]])
  pred = np.array([[0, 3], [1, 1]])  # class 3 predicted but never in gt; class 2 in neither
  evaluator = SemanticEvaluator(4, class_names=["w", "x", "y", "z"])
  evaluator.update(pred, gt)
  result = evaluator.result()
  assert all(math.isnan(result[key]) for key in ["IoU-y", "IoU-z", "ACC-y", "ACC-z"])
  # IoU-w = 1/2, IoU-x = 1; including z as 0 would give a mean of 50.
  assert_subset(result, {"IoU-w": 50.0, "IoU-x": 100.0, "mIoU": 75.0, "mACC": 75.0, "pAcc": 75.0,
                         "fwIoU": 75.0})


def test_semantic_accumulation_equals_concatenation_and_reset():
  rng = np.random.default_rng(1)
  pairs = [random_semantic_pair(rng, (h, 16), 5, 255) for h in (5, 12, 7)]
  separate = SemanticEvaluator(5)
  for pred, gt in pairs:
    separate.update(pred, gt)
  joint = SemanticEvaluator(5)
  joint.update(np.concatenate([p for p, _ in pairs]), np.concatenate([g for _, g in pairs]))
  np.testing.assert_array_equal(separate.confusion_matrix, joint.confusion_matrix)
  assert_results_equal(separate.result(), joint.result(), atol=0)

  separate.reset()
  separate.update(*pairs[0])
  fresh = SemanticEvaluator(5)
  fresh.update(*pairs[0])
  assert_results_equal(separate.result(), fresh.result(), atol=0)


def test_semantic_result_is_json_safe():
  evaluator = SemanticEvaluator(3)
  evaluator.update(np.array([[0, 1]]), np.array([[0, 1]]))
  safe = to_json_safe({"sem_seg": evaluator.result(), "step": np.int64(3)})
  text = json.dumps(safe, allow_nan=False)
  assert json.loads(text)["sem_seg"]["IoU-2"] is None and json.loads(text)["step"] == 3
  assert safe["sem_seg"]["mIoU"] == 100.0


@pytest.mark.parametrize("pred, gt, message", [
    (np.array([[0, 3]]), np.array([[0, 1]]), "outside"),          # pred == num_classes
    (np.array([[0, -1]]), np.array([[0, 1]]), "outside"),
    (np.array([[0, 1]]), np.array([[0, 3]]), "neither"),          # gt neither a class nor ignore_label
    (np.array([[0, 1]]), np.array([[0, 1, 1]]), "differ in shape"),
    (np.array([[0.0, 1.0]]), np.array([[0, 1]]), "integer dtype"),
    (np.array([[0, 1]]), np.array([[0.0, 1.0]]), "integer dtype"),
    (np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), "2-D"),
])
def test_semantic_rejects_bad_inputs(pred, gt, message):
  evaluator = SemanticEvaluator(3)
  with pytest.raises(ValueError, match=message):
    evaluator.update(pred, gt)
  assert evaluator.confusion_matrix.sum() == 0


def test_semantic_rejects_bad_configuration():
  with pytest.raises(ValueError, match="ignore_label"):
    SemanticEvaluator(3, ignore_label=2)
  with pytest.raises(ValueError, match="class_names"):
    SemanticEvaluator(3, class_names=["a", "b"])


# ----------------------------------------------------------------------------------------------------------------
# Panoptic segmentation: hand-built cases.
# ----------------------------------------------------------------------------------------------------------------

def segments(categories: dict, crowd=()) -> list[dict]:
  """`{id: category_id}` -> segment list; ids in `crowd` get iscrowd 1."""
  return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in categories.items()]


def evaluate(*images) -> dict:
  evaluator = PanopticEvaluator(CATEGORIES)
  for image in images:
    evaluator.update(*image)
  return evaluator.result()


def test_panoptic_perfect_prediction():
  gt = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [7, 7, 9, 9], [7, 7, 9, 9]], np.uint32)
  # The prediction reuses the ground truth's ids for other segments: ids are only compared within a map.
  pred = np.array([[7, 7, 7, 7], [7, 7, 7, 7], [9, 9, 5, 5], [9, 9, 5, 5]], np.uint32)
  result = evaluate((pred, segments({7: SKY, 9: PERSON, 5: GRASS}), gt, segments({5: SKY, 7: PERSON, 9: GRASS})))
  assert_results_equal(result, {
      "PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "PQ_th": 100.0, "SQ_th": 100.0, "RQ_th": 100.0,
      "PQ_st": 100.0, "SQ_st": 100.0, "RQ_st": 100.0, "num_categories": 3, "num_things": 1, "num_stuff": 2,
      **{f"{m}-{name}": 100.0 for m in "PQ SQ RQ".split() for name in ["person", "sky", "grass"]},
      **{f"{m}-{name}": NAN for m in "PQ SQ RQ".split() for name in ["car", "dog", "road"]}})


def test_panoptic_void_in_gt():
  gt = np.array([[1, 1, 0, 0],
                 [1, 1, 0, 0],
                 [3, 3, 3, 3]])
  pred = np.array([[10, 10, 20, 20],
                   [10, 10, 10, 20],
                   [30, 30, 30, 20]])
  # person: overlap 4, pred area 5 of which 1 on void -> IoU 4 / (5 + 4 - 4 - 1) = 1 (not 4/5).
  # car: unmatched, 3 of its 4 pixels on void -> not a false positive.
  # grass: IoU 3/4.
  result = evaluate((pred, segments({10: PERSON, 20: CAR, 30: GRASS}), gt, segments({1: PERSON, 3: GRASS})))
  assert_subset(result, {
      "PQ": 87.5, "SQ": 87.5, "RQ": 100.0, "PQ_th": 100.0, "SQ_th": 100.0, "RQ_th": 100.0,
      "PQ_st": 75.0, "SQ_st": 75.0, "RQ_st": 100.0, "num_categories": 2, "num_things": 1, "num_stuff": 1,
      "PQ-person": 100.0, "PQ-grass": 75.0, "SQ-grass": 75.0, "RQ-grass": 100.0, "PQ-car": NAN})


def test_panoptic_half_is_not_enough():
  gt = np.array([[1, 1, 1, 1],
                 [0, 5, 5, 5]])
  pred = np.array([[10, 10, 0, 0],
                   [20, 20, 30, 30]])
  # person: IoU exactly 2/4 -> no match: one FN and one FP.
  # car (absent from the gt): half of its pixels on void -> still a false positive, and car counts in the mean.
  # grass: IoU 2/3.
  result = evaluate((pred, segments({10: PERSON, 20: CAR, 30: GRASS}), gt, segments({1: PERSON, 5: GRASS})))
  assert_subset(result, {
      "PQ": 200 / 9, "SQ": 200 / 9, "RQ": 100 / 3, "PQ_th": 0.0, "SQ_th": 0.0, "RQ_th": 0.0,
      "PQ_st": 200 / 3, "SQ_st": 200 / 3, "RQ_st": 100.0, "num_categories": 3, "num_things": 2, "num_stuff": 1,
      "PQ-person": 0.0, "SQ-person": 0.0, "RQ-person": 0.0, "PQ-car": 0.0, "RQ-car": 0.0})


def test_panoptic_crowd_absorbs_same_category_only():
  gt = np.array([[1, 1, 1, 1],
                 [1, 1, 1, 1],
                 [5, 5, 5, 5]])
  pred = np.array([[10, 10, 20, 20],
                   [10, 10, 20, 20],
                   [30, 30, 30, 30]])
  # The person crowd is never a FN and absorbs the unmatched person prediction; the car on it is a FP.
  result = evaluate((pred, segments({10: PERSON, 20: CAR, 30: GRASS}), gt, segments({1: PERSON, 5: GRASS},
                                                                                      crowd=[1])))
  assert_subset(result, {
      "PQ": 50.0, "SQ": 50.0, "RQ": 50.0, "PQ_th": 0.0, "PQ_st": 100.0,
      "num_categories": 2, "num_things": 1, "num_stuff": 1, "PQ-person": NAN, "PQ-car": 0.0, "RQ-car": 0.0})


def test_panoptic_only_last_listed_crowd_of_a_category_absorbs():
  gt = np.array([[1, 1, 2, 2],
                 [1, 1, 3, 3],
                 [5, 5, 5, 5]])
  pred = np.array([[10, 11, 20, 20],
                   [10, 11, 30, 30],
                   [50, 50, 50, 50]])
  # Crowds 1 and 2 are both persons; panopticapi keeps only the last listed (2). So 10 and 11 on crowd 1 are FPs,
  # 20 on crowd 2 is absorbed, 30 matches 3: person tp 1, fp 2 -> RQ 1/2 (first-listed would give 2/3, a union
  # of crowds 1).
  gt_segments = segments({1: PERSON, 2: PERSON, 3: PERSON, 5: GRASS}, crowd=[1, 2])
  result = evaluate((pred, segments({10: PERSON, 11: PERSON, 20: PERSON, 30: PERSON, 50: GRASS}), gt, gt_segments))
  assert_subset(result, {"PQ-person": 50.0, "SQ-person": 100.0, "RQ-person": 50.0, "PQ": 75.0, "SQ": 100.0,
                         "RQ": 75.0})


def test_panoptic_stuff_is_one_segment_per_class():
  # COCO ground truth has one segment per stuff class, here grass in two disjoint columns.
  gt = np.array([[5, 1, 1, 5], [5, 1, 1, 5]])
  gt_segments = segments({1: PERSON, 5: GRASS})
  merged = np.array([[30, 10, 10, 30], [30, 10, 10, 30]])
  result = evaluate((merged, segments({10: PERSON, 30: GRASS}), gt, gt_segments))
  assert_subset(result, {"PQ": 100.0, "PQ-grass": 100.0, "num_categories": 2})
  # Predicting the two regions as two grass segments: each has IoU 1/2, so grass has 1 FN and 2 FPs.
  split = np.array([[30, 10, 10, 31], [30, 10, 10, 31]])
  result = evaluate((split, segments({10: PERSON, 30: GRASS, 31: GRASS}), gt, gt_segments))
  assert_subset(result, {"PQ": 50.0, "SQ": 50.0, "RQ": 50.0, "PQ-grass": 0.0, "RQ-grass": 0.0, "PQ-person": 100.0,
                         "num_categories": 2})


def test_panoptic_empty_image_contributes_nothing():
  gt = np.array([[5, 5], [7, 7]])
  image = (gt, segments({5: SKY, 7: PERSON}), gt, segments({5: SKY, 7: PERSON}))
  void = np.zeros((2, 2), np.int64)
  empty = (void, [], void, [])
  covered = (np.full((2, 2), 4), segments({4: CAR}), void, [])  # a prediction on all-void gt: ignored
  assert_results_equal(evaluate(image, empty, covered), evaluate(image))
  only_empty = evaluate(empty, covered)
  assert only_empty["num_categories"] == only_empty["num_things"] == only_empty["num_stuff"] == 0
  assert all(math.isnan(value) for key, value in only_empty.items() if not key.startswith("num_"))
  json.dumps(to_json_safe(only_empty), allow_nan=False)


def test_panoptic_reset():
  gt = np.array([[5, 5], [7, 7]])
  evaluator = PanopticEvaluator(CATEGORIES)
  evaluator.update(np.zeros_like(gt), [], gt, segments({5: SKY, 7: PERSON}))
  evaluator.reset()
  evaluator.update(gt, segments({5: SKY, 7: PERSON}), gt, segments({5: SKY, 7: PERSON}))
  assert evaluator.result()["PQ"] == 100.0


# ----------------------------------------------------------------------------------------------------------------
# Panoptic segmentation: random images against a per-pair reference.
# ----------------------------------------------------------------------------------------------------------------

def reference_panoptic(images, categories) -> tuple[dict, dict]:
  """panopticapi's PQ from its definition: every (gt, pred) segment pair compared with boolean masks.

  Returns the results in the evaluator's format and counters showing which rules the images exercised.
  """
  stats = {c["id"]: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in categories}
  seen = {"tp": 0, "fp": 0, "fn": 0, "void_in_union": 0, "ignored_by_void": 0, "ignored_by_crowd": 0}
  for pred, pred_segments, gt, gt_segments in images:
    void = gt == 0
    crowd_region = {}
    for s in gt_segments:  # later crowd segments of a category replace earlier ones
      if s.get("iscrowd", 0) == 1:
        crowd_region[s["category_id"]] = gt == s["id"]
    matched_gt, matched_pred = set(), set()
    for g in gt_segments:
      if g.get("iscrowd", 0) == 1:
        continue
      g_mask = gt == g["id"]
      for p in pred_segments:
        if p["category_id"] != g["category_id"]:
          continue
        p_mask = pred == p["id"]
        intersection = np.sum(g_mask & p_mask)
        union = np.sum(g_mask | p_mask) - np.sum(p_mask & void)
        if intersection / union > 0.5:
          stats[g["category_id"]]["tp"] += 1
          stats[g["category_id"]]["iou"] += intersection / union
          matched_gt.add(g["id"])
          matched_pred.add(p["id"])
          seen["tp"] += 1
          seen["void_in_union"] += int(np.any(p_mask & void))
    for g in gt_segments:
      if g.get("iscrowd", 0) != 1 and g["id"] not in matched_gt:
        stats[g["category_id"]]["fn"] += 1
        seen["fn"] += 1
    for p in pred_segments:
      if p["id"] in matched_pred:
        continue
      p_mask = pred == p["id"]
      crowd = crowd_region.get(p["category_id"], np.zeros_like(void))
      if np.sum(p_mask & (void | crowd)) / np.sum(p_mask) > 0.5:
        seen["ignored_by_void" if np.sum(p_mask & void) / np.sum(p_mask) > 0.5 else "ignored_by_crowd"] += 1
        continue
      stats[p["category_id"]]["fp"] += 1
      seen["fp"] += 1

  results, groups = {}, {"": [], "_th": [], "_st": []}
  for c in categories:
    s = stats[c["id"]]
    if s["tp"] + s["fp"] + s["fn"] == 0:
      values = (NAN, NAN, NAN)
    else:
      denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
      values = (s["iou"] / denominator, s["iou"] / s["tp"] if s["tp"] else 0.0, s["tp"] / denominator)
      groups[""].append(values)
      groups["_th" if c["isthing"] == 1 else "_st"].append(values)
    for metric, value in zip(("PQ", "SQ", "RQ"), values):
      results[f"{metric}-{c['name']}"] = 100 * value
  for suffix, members in groups.items():
    for k, metric in enumerate(("PQ", "SQ", "RQ")):
      results[metric + suffix] = 100 * sum(v[k] for v in members) / len(members) if members else NAN
  results.update(num_categories=len(groups[""]), num_things=len(groups["_th"]), num_stuff=len(groups["_st"]))
  return results, seen


def random_panoptic_image(rng, h: int = 20, w: int = 24):
  """A gt with stuff bands (one segment per stuff class), thing rectangles (some crowd, dogs never) and void,
  and a prediction derived from it by relabelling, splitting, growing, adding (some on the void boxes) and voiding
  segments."""
  used_ids = {0}

  def new_id():
    while (i := int(rng.integers(1, 256 ** 3))) in used_ids:
      pass
    used_ids.add(i)
    return i

  gt = np.zeros((h, w), np.int64)
  info = {}
  stuff_id = {}
  for band in np.split(np.arange(h), np.sort(rng.choice(np.arange(1, h), 2, replace=False))):
    category = int(rng.choice([SKY, GRASS, ROAD]))
    stuff_id.setdefault(category, new_id())
    gt[band] = stuff_id[category]
    info[stuff_id[category]] = (category, 0)
  for _ in range(rng.integers(1, 7)):
    i = new_id()
    info[i] = (int(rng.choice([PERSON, CAR])), int(rng.random() < 0.3))
    y, x, dy, dx = rng.integers(0, h - 2), rng.integers(0, w - 2), rng.integers(2, 10), rng.integers(2, 10)
    gt[y:y + dy, x:x + dx] = i
  void_boxes = []
  for _ in range(rng.integers(0, 3)):
    y, x, dy, dx = rng.integers(0, h - 2), rng.integers(0, w - 2), rng.integers(1, 6), rng.integers(1, 6)
    gt[y:y + dy, x:x + dx] = 0
    void_boxes.append((y, x, dy, dx))
  gt[rng.random((h, w)) < 0.03] = 0
  gt_segments = [{"id": i, "category_id": info[i][0], "iscrowd": info[i][1]} for i in np.unique(gt) if i]

  remap = {i: new_id() for i in info}
  pred = np.vectorize(lambda i: remap.get(i, 0))(gt)
  pred_category = {remap[i]: c for i, (c, _) in info.items()}
  for i in list(pred_category):
    if rng.random() < 0.15:
      pred_category[i] = int(rng.choice([PERSON, CAR, DOG, SKY, GRASS, ROAD]))
    if rng.random() < 0.15:  # split off the right part of a segment as a new one of the same category
      j = new_id()
      pred_category[j] = pred_category[i]
      pred[(pred == i) & (np.arange(w) >= rng.integers(0, w))] = j
  for _ in range(rng.integers(2, 6)):
    y, x, dy, dx = rng.integers(0, h - 1), rng.integers(0, w - 1), rng.integers(1, 8), rng.integers(1, 8)
    if rng.random() < 0.5:
      i = int(rng.choice(list(pred_category)))  # grow an existing segment
    else:
      i = new_id()
      pred_category[i] = int(rng.choice([PERSON, CAR, DOG, SKY, GRASS, ROAD]))
    pred[y:y + dy, x:x + dx] = i
  for y, x, dy, dx in void_boxes:  # predictions mostly on void
    if rng.random() < 0.7:
      i = new_id()
      pred_category[i] = int(rng.choice([PERSON, CAR, DOG, SKY, GRASS, ROAD]))
      pred[y:y + dy + 1, x:x + dx + 1] = i
  pred[rng.random((h, w)) < 0.03] = 0
  pred_segments = [{"id": i, "category_id": pred_category[i]} for i in np.unique(pred) if i]
  return pred.astype(np.uint32), pred_segments, gt.astype(np.uint32), gt_segments


def test_panoptic_matches_reference_on_random_images():
  rng = np.random.default_rng(0)
  images = [random_panoptic_image(rng) for _ in range(10)]
  expected, seen = reference_panoptic(images, CATEGORIES)
  # The images exercise every rule.
  assert all(count > 0 for count in seen.values()), seen
  assert_results_equal(evaluate(*images), expected)


# ----------------------------------------------------------------------------------------------------------------
# Panoptic segmentation: errors.
# ----------------------------------------------------------------------------------------------------------------

GOOD_MAP = np.array([[5, 5], [7, 0]])
GOOD_SEGMENTS = [{"id": 5, "category_id": SKY}, {"id": 7, "category_id": PERSON}]


@pytest.mark.parametrize("pred, pred_segments, gt, gt_segments, message", [
    (GOOD_MAP, GOOD_SEGMENTS, GOOD_MAP, GOOD_SEGMENTS[:1], r"\[7\] appear in the gt map but not in its segment"),
    (GOOD_MAP, GOOD_SEGMENTS[1:], GOOD_MAP, GOOD_SEGMENTS, r"\[5\] appear in the pred map"),
    (GOOD_MAP, GOOD_SEGMENTS + [{"id": 9, "category_id": CAR}], GOOD_MAP, GOOD_SEGMENTS,
     r"pred lists segment ids \[9\] that have no pixels"),
    (GOOD_MAP, [GOOD_SEGMENTS[0], {"id": 7, "category_id": 99}], GOOD_MAP, GOOD_SEGMENTS,
     "unknown category_id 99"),
    (GOOD_MAP, GOOD_SEGMENTS, GOOD_MAP, [GOOD_SEGMENTS[0], {"id": 7, "category_id": 42}], "unknown category_id 42"),
    (GOOD_MAP, GOOD_SEGMENTS + [{"id": 0, "category_id": CAR}], GOOD_MAP, GOOD_SEGMENTS, "reserved for VOID"),
    (GOOD_MAP, GOOD_SEGMENTS + GOOD_SEGMENTS[:1], GOOD_MAP, GOOD_SEGMENTS, "twice"),
    (GOOD_MAP, GOOD_SEGMENTS, np.pad(GOOD_MAP, ((0, 1), (0, 0))), GOOD_SEGMENTS, "differ in shape"),
    (GOOD_MAP.astype(np.float32), GOOD_SEGMENTS, GOOD_MAP, GOOD_SEGMENTS, "integer dtype"),
])
def test_panoptic_rejects_bad_inputs(pred, pred_segments, gt, gt_segments, message):
  evaluator = PanopticEvaluator(CATEGORIES)
  evaluator.update(GOOD_MAP, GOOD_SEGMENTS, GOOD_MAP, GOOD_SEGMENTS)
  before = evaluator.result()
  with pytest.raises(ValueError, match=message):
    evaluator.update(pred, pred_segments, gt, gt_segments)
  assert_results_equal(evaluator.result(), before, atol=0)  # a rejected image changes nothing


def test_panoptic_rejects_bad_categories():
  with pytest.raises(ValueError, match="duplicate ids"):
    PanopticEvaluator(CATEGORIES + [{"id": 1, "name": "human", "isthing": 1}])
  with pytest.raises(ValueError, match="names must be unique"):
    PanopticEvaluator(CATEGORIES + [{"id": 4, "name": "person", "isthing": 1}])

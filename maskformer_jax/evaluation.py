"""Semantic and panoptic segmentation metrics, accumulated image by image in bounded memory (pure numpy).

`SemanticEvaluator` reproduces Detectron2's `SemSegEvaluator` (mIoU, fwIoU, mACC and the pixel accuracy, which
Detectron2 calls pACC and we `pAcc`, from one confusion matrix); `PanopticEvaluator` reproduces the COCO
panopticapi `pq_compute` (PQ, SQ, RQ with VOID and crowd handling). Both report percentages. Per-class values of
classes the data never exercised are NaN, which JSON cannot represent: pass results through `to_json_safe` before
`json.dump`.

`evaluate_model` runs a model over a dataset split through `inference.predict` and both evaluators;
`write_results` stores them as `eval_results.json`.
"""
import json
import math
import os

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from maskformer_jax import checkpoint as checkpoint_lib
from maskformer_jax import inference
from maskformer_jax.data import pipeline
from maskformer_jax.models import build_model

# Segment id of unlabelled pixels in panoptic maps (panopticapi's VOID).
VOID = 0


def to_json_safe(results: dict) -> dict:
  """A copy of `results` (nested dicts allowed) with NaN replaced by None and numpy scalars by Python numbers, so
  that `json.dump(..., allow_nan=False)` accepts it."""
  safe = {}
  for key, value in results.items():
    if isinstance(value, dict):
      value = to_json_safe(value)
    elif isinstance(value, np.generic):
      value = value.item()
    if isinstance(value, float) and math.isnan(value):
      value = None
    safe[key] = value
  return safe


def _check_label_maps(first: np.ndarray, second: np.ndarray, names: tuple[str, str]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Validates two `[H, W]` integer maps of equal shape; returns them as int64 arrays."""
  arrays = []
  for array, name in zip((first, second), names):
    array = np.asarray(array)
    if array.ndim != 2:
      raise ValueError(f"{name} must be a 2-D [H, W] map; got shape {array.shape}. Squeeze batch/channel axes.")
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{name} must have an integer dtype; got {array.dtype}. Pass label ids (e.g. the argmax), "
                       "not scores, and cast with .astype(np.int64).")
    arrays.append(array.astype(np.int64, copy=False))
  if arrays[0].shape != arrays[1].shape:
    raise ValueError(f"{names[0]} {arrays[0].shape} and {names[1]} {arrays[1].shape} differ in shape; resize the "
                     "prediction to the ground-truth resolution before evaluating.")
  return arrays[0], arrays[1]


# ----------------------------------------------------------------------------------------------------------------
# Semantic segmentation.
# ----------------------------------------------------------------------------------------------------------------

class SemanticEvaluator:
  """Detectron2 `SemSegEvaluator` metrics from a `(num_classes + 1) x (num_classes + 1)` int64 confusion matrix.

  Rows are predicted classes, columns ground-truth classes; the extra column collects ignored pixels (the extra row
  stays empty since predictions are always real classes). Only the `num_classes x num_classes` block enters the
  metrics, so predictions on ignored pixels are not counted.
  """

  def __init__(self, num_classes: int, ignore_label: int = 255, class_names=None):
    if num_classes < 1:
      raise ValueError(f"num_classes must be positive; got {num_classes}.")
    if 0 <= ignore_label < num_classes:
      raise ValueError(f"ignore_label {ignore_label} is a real class id in [0, {num_classes}); use a label outside "
                       "that range (e.g. 255).")
    class_names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(class_names) != num_classes:
      raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {num_classes}.")
    if len(set(class_names)) != num_classes:
      raise ValueError("class_names must be unique: they become the result keys IoU-<name> and ACC-<name>.")
    self.num_classes = num_classes
    self.ignore_label = ignore_label
    self.class_names = class_names
    self.reset()

  def reset(self) -> None:
    """Forgets all accumulated images."""
    self.confusion_matrix = np.zeros((self.num_classes + 1, self.num_classes + 1), np.int64)

  def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
    """Adds one image: `pred` `[H, W]` integer class ids in [0, num_classes); `gt` `[H, W]` integer class ids in
    [0, num_classes) or `ignore_label`."""
    pred, gt = _check_label_maps(pred, gt, ("pred", "gt"))
    n = self.num_classes
    bad_pred = (pred < 0) | (pred >= n)
    if bad_pred.any():
      raise ValueError(f"pred holds class id {pred[bad_pred][0]} outside [0, {n}); predictions must be class ids "
                       "of the num_classes evaluated classes.")
    ignored = gt == self.ignore_label
    bad_gt = ((gt < 0) | (gt >= n)) & ~ignored
    if bad_gt.any():
      raise ValueError(f"gt holds label {gt[bad_gt][0]} that is neither a class id in [0, {n}) nor ignore_label "
                       f"{self.ignore_label}; map dataset ids to contiguous class ids first.")
    gt = np.where(ignored, n, gt)
    self.confusion_matrix += np.bincount(((n + 1) * pred + gt).ravel(),
                                         minlength=(n + 1) ** 2).reshape(n + 1, n + 1)

  def result(self) -> dict:
    """Percentages over everything accumulated since the last `reset`.

    Keys: `mIoU`, `fwIoU`, `IoU-<name>` per class, `mACC`, `pAcc`, `ACC-<name>` per class (Python floats). A class
    absent from the ground truth has NaN `IoU-`/`ACC-` values and is left out of mIoU, fwIoU and mACC, even if it
    was predicted (its false positives still lower the other classes' accuracy). With no valid pixel at all every
    value is NaN.
    """
    block = self.confusion_matrix[:-1, :-1].astype(np.float64)
    tp = np.diagonal(block)
    pos_gt = block.sum(axis=0)
    pos_pred = block.sum(axis=1)
    union = pos_gt + pos_pred - tp
    acc_valid = pos_gt > 0
    iou_valid = acc_valid & (union > 0)
    acc = np.full(self.num_classes, np.nan)
    iou = np.full(self.num_classes, np.nan)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total_gt = pos_gt.sum()
    nan = float("nan")
    results = {
        "mIoU": 100 * iou[iou_valid].mean() if iou_valid.any() else nan,
        "fwIoU": 100 * np.sum(iou[iou_valid] * pos_gt[iou_valid] / total_gt) if total_gt > 0 else nan,
    }
    results.update({f"IoU-{name}": 100 * iou[i] for i, name in enumerate(self.class_names)})
    results["mACC"] = 100 * acc[acc_valid].mean() if acc_valid.any() else nan
    results["pAcc"] = 100 * tp.sum() / total_gt if total_gt > 0 else nan
    results.update({f"ACC-{name}": 100 * acc[i] for i, name in enumerate(self.class_names)})
    return {key: float(value) for key, value in results.items()}


# ----------------------------------------------------------------------------------------------------------------
# Panoptic segmentation.
# ----------------------------------------------------------------------------------------------------------------

class PanopticEvaluator:
  """COCO panoptic quality (panopticapi's `pq_compute_single_core` and `PQStat.pq_average`), accumulated as per
  category true positives, false positives, false negatives and summed matched IoU.

  Per image, with `I(g, p)` the pixel overlap of ground-truth segment g and predicted segment p:

    * a non-crowd g and a p of the same category match when `I / (area_p + area_g - I - I(VOID, p)) > 0.5`
      (pixels of p on VOID ground truth do not enlarge the union); matches are unique by construction;
    * unmatched non-crowd g are false negatives; crowd g never match and are never false negatives;
    * an unmatched p is a false positive unless `(I(VOID, p) + I(crowd of p's category, p)) / area_p > 0.5`. As in
      panopticapi, "crowd of a category" is the crowd segment of that category listed last in the image's
      ground-truth segments (COCO ground truth has at most one per category).

  Areas come from the maps (panopticapi reads ground-truth areas from the JSON, which equal the pixel counts for
  COCO). Inputs are stricter than panopticapi: any mismatch between a map and its segment list is an error.
  """

  def __init__(self, categories):
    """`categories`: list of `{"id": int, "name": str, "isthing": 0 or 1}`, as in COCO panoptic JSON."""
    self.categories = list(categories)
    ids = [int(c["id"]) for c in self.categories]
    names = [str(c["name"]) for c in self.categories]
    if not ids:
      raise ValueError("categories is empty; pass the dataset's list of {'id', 'name', 'isthing'} dicts.")
    if len(set(ids)) != len(ids):
      raise ValueError(f"categories has duplicate ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}.")
    if len(set(names)) != len(names):
      raise ValueError("category names must be unique: they become the result keys PQ-<name>, SQ-<name>, "
                       "RQ-<name>.")
    self._index = {category_id: i for i, category_id in enumerate(ids)}
    self._names = names
    self._isthing = np.array([c["isthing"] == 1 for c in self.categories])
    self.reset()

  def reset(self) -> None:
    """Forgets all accumulated images."""
    k = len(self.categories)
    self.tp = np.zeros(k, np.int64)
    self.fp = np.zeros(k, np.int64)
    self.fn = np.zeros(k, np.int64)
    self.iou = np.zeros(k, np.float64)

  def _segment_table(self, ids: np.ndarray, segments, name: str, crowd_key: str | None):
    """Category indices `[S]` and crowd flags `[S]` of the segments with ids `ids` `[S]` (the map's ids, VOID
    removed), after checking that `segments` lists exactly these ids with known categories."""
    by_id = {}
    for segment in segments:
      segment_id = int(segment["id"])
      if segment_id == VOID:
        raise ValueError(f"{name} lists a segment with id {VOID}, which is reserved for VOID (unlabelled) pixels.")
      if segment_id in by_id:
        raise ValueError(f"{name} lists segment id {segment_id} twice.")
      if int(segment["category_id"]) not in self._index:
        raise ValueError(f"{name} segment {segment_id} has unknown category_id {segment['category_id']}; it must "
                         f"be one of the evaluator's category ids {sorted(self._index)}.")
      by_id[segment_id] = segment
    unlisted = sorted(set(ids.tolist()) - by_id.keys())
    if unlisted:
      raise ValueError(f"segment ids {unlisted} appear in the {name} map but not in its segment list; list every "
                       f"non-zero id of the map, or set unlabelled pixels to {VOID}.")
    missing = sorted(by_id.keys() - set(ids.tolist()))
    if missing:
      raise ValueError(f"{name} lists segment ids {missing} that have no pixels in its map; drop empty segments "
                       "from the list.")
    category = np.array([self._index[int(by_id[i]["category_id"])] for i in ids.tolist()], np.int64)
    crowd = np.array([crowd_key is not None and by_id[i].get(crowd_key, 0) == 1 for i in ids.tolist()], bool)
    return category, crowd

  def update(self, pred_panoptic: np.ndarray, pred_segments, gt_panoptic: np.ndarray, gt_segments) -> None:
    """Adds one image.

    `pred_panoptic`, `gt_panoptic`: `[H, W]` integer segment-id maps, `VOID` (0) for unlabelled pixels.
    `pred_segments`: list of `{"id", "category_id"}`, one per non-zero id of `pred_panoptic`.
    `gt_segments`: list of `{"id", "category_id", "iscrowd" (optional, default 0)}`, one per non-zero id of
    `gt_panoptic`.
    """
    pred_map, gt_map = _check_label_maps(pred_panoptic, gt_panoptic, ("pred_panoptic", "gt_panoptic"))
    if pred_map.size == 0:
      raise ValueError(f"panoptic maps are empty (shape {pred_map.shape}); pass the image's full-size maps.")
    if (pred_map < 0).any() or (gt_map < 0).any():
      raise ValueError("panoptic maps must hold non-negative segment ids; convert RGB PNGs with rgb2id first.")
    gt_ids, gt_inverse, gt_area = np.unique(gt_map.ravel(), return_inverse=True, return_counts=True)
    pred_ids, pred_inverse, pred_area = np.unique(pred_map.ravel(), return_inverse=True, return_counts=True)
    # Joint histogram of (gt segment, pred segment) over the compact indices: bounded by the segment counts.
    overlap = np.bincount(gt_inverse.ravel() * len(pred_ids) + pred_inverse.ravel(),
                          minlength=len(gt_ids) * len(pred_ids)).reshape(len(gt_ids), len(pred_ids))
    # np.unique sorts, so VOID can only come first; split it off as a row/column of its own.
    gt_void, pred_void = gt_ids[0] == VOID, pred_ids[0] == VOID
    void_overlap = overlap[0, int(pred_void):] if gt_void else np.zeros(len(pred_ids) - int(pred_void), np.int64)
    overlap = overlap[int(gt_void):, int(pred_void):]
    gt_ids, gt_area = gt_ids[int(gt_void):], gt_area[int(gt_void):]
    pred_ids, pred_area = pred_ids[int(pred_void):], pred_area[int(pred_void):]
    gt_category, gt_crowd = self._segment_table(gt_ids, gt_segments, "gt", "iscrowd")
    pred_category, _ = self._segment_table(pred_ids, pred_segments, "pred", None)

    union = pred_area[None, :] + gt_area[:, None] - overlap - void_overlap[None, :]
    iou = overlap / union  # union >= area_g > 0
    matched = (iou > 0.5) & (gt_category[:, None] == pred_category[None, :]) & ~gt_crowd[:, None]
    g, p = np.nonzero(matched)
    np.add.at(self.tp, gt_category[g], 1)
    np.add.at(self.iou, gt_category[g], iou[g, p])

    k = len(self.categories)
    gt_unmatched = ~matched.any(axis=1)
    self.fn += np.bincount(gt_category[gt_unmatched & ~gt_crowd], minlength=k)

    # The last listed crowd segment of each category (panopticapi keeps one per category in a dict).
    position = {segment_id: row for row, segment_id in enumerate(gt_ids.tolist())}
    crowd_row = np.full(k, -1, np.int64)
    for segment in gt_segments:
      if segment.get("iscrowd", 0) == 1:
        crowd_row[self._index[int(segment["category_id"])]] = position[int(segment["id"])]
    pred_crowd_row = crowd_row[pred_category]
    has_crowd = pred_crowd_row >= 0
    crowd_overlap = np.zeros(len(pred_ids), np.int64)
    crowd_overlap[has_crowd] = overlap[pred_crowd_row[has_crowd], np.nonzero(has_crowd)[0]]
    ignored = (void_overlap + crowd_overlap) / pred_area > 0.5
    pred_unmatched = ~matched.any(axis=0)
    self.fp += np.bincount(pred_category[pred_unmatched & ~ignored], minlength=k)

  def result(self) -> dict:
    """Percentages over everything accumulated since the last `reset` (panopticapi's `pq_average`).

    A category counts when it has at least one TP, FP or FN (also a category absent from the ground truth that was
    predicted: its PQ is 0). Keys:

      * `PQ`, `SQ`, `RQ`: means over counted categories; `_th` / `_st` suffixes: over counted things / stuff.
        NaN when the group has no counted category (panopticapi divides by zero there).
      * `num_categories`, `num_things`, `num_stuff` (ints): the counted categories, panopticapi's `n`.
      * `PQ-<name>`, `SQ-<name>`, `RQ-<name>` for every category; NaN for uncounted categories (panopticapi reports
        0 for them, but they are also excluded from its averages). SQ of a counted category without TP is 0.
    """
    tp, fp, fn = (x.astype(np.float64) for x in (self.tp, self.fp, self.fn))
    counted = tp + fp + fn > 0
    denominator = np.where(counted, tp + 0.5 * fp + 0.5 * fn, 1.0)
    pq = np.where(counted, self.iou / denominator, np.nan)
    sq = np.where(counted, np.divide(self.iou, tp, out=np.zeros_like(tp), where=tp > 0), np.nan)
    rq = np.where(counted, tp / denominator, np.nan)
    results = {}
    for suffix, group in (("", np.ones_like(counted)), ("_th", self._isthing), ("_st", ~self._isthing)):
      members = counted & group
      for metric, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
        results[metric + suffix] = float(100 * values[members].mean()) if members.any() else float("nan")
    results["num_categories"] = int(counted.sum())
    results["num_things"] = int((counted & self._isthing).sum())
    results["num_stuff"] = int((counted & ~self._isthing).sum())
    for i, name in enumerate(self._names):
      for metric, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
        results[f"{metric}-{name}"] = float(100 * values[i])
    return results


# ----------------------------------------------------------------------------------------------------------------
# A model on a dataset split.
# ----------------------------------------------------------------------------------------------------------------

RESULTS_FILE = "eval_results.json"


def evaluate_model(model, variables: dict, config: ml_collections.ConfigDict, *, split: str | None = None) -> dict:
  """Semantic metrics, and panoptic ones for `data.task == 'panoptic'`, of `model` on a split of `config.data`.

  Each image goes through `inference.predict` with `config.test` at its original size, as the reference evaluates.
  Every process evaluates its own share of the split; the accumulated counts are summed over processes, so all of
  them return the metrics of the whole split.

  Returns a flat dict: `split`, `num_images`, the `SemanticEvaluator` keys (mIoU, fwIoU, mACC, pAcc, per class) and,
  for panoptic data, the `PanopticEvaluator` keys (PQ, SQ, RQ, _th, _st, per class), all in percent.
  """
  data = config.data
  split = split or data.eval_split
  data_dir = data.data_dir or None
  categories = pipeline.dataset_categories(data, data_dir)
  names = [category["name"] for category in categories]
  is_thing = [bool(category["isthing"]) for category in categories]
  panoptic_on = data.task == "panoptic"
  semantic = SemanticEvaluator(data.num_classes, data.ignore_label, names)
  # Predictions and ground truth both use class indices as category ids.
  panoptic = PanopticEvaluator([dict(c, id=i) for i, c in enumerate(categories)]) if panoptic_on else None
  examples, count = pipeline.ground_truth_examples(data, split, process_index=jax.process_index(),
                                                   process_count=jax.process_count(), data_dir=data_dir)
  for example in tqdm.tqdm(examples, total=count, desc=f"evaluate {split}", unit="image", dynamic_ncols=True,
                           disable=jax.process_index() != 0):
    prediction = inference.predict(model, variables, example["image"], config.test,
                                   is_thing if panoptic_on else None)
    semantic.update(prediction["semantic"], example["semantic"])
    if panoptic_on:
      panoptic.update(prediction["panoptic"], prediction["segments"], example["panoptic"], example["segments"])

  counts = {"images": np.int64(count), "confusion": semantic.confusion_matrix}
  if panoptic_on:
    counts.update(tp=panoptic.tp, fp=panoptic.fp, fn=panoptic.fn, iou=panoptic.iou)
  if jax.process_count() > 1:
    counts = jax.tree.map(lambda x: np.asarray(x).sum(0), multihost_utils.process_allgather(counts))
  semantic.confusion_matrix = counts["confusion"]
  results = {"split": split, "num_images": int(counts["images"])}
  if panoptic_on:
    panoptic.tp, panoptic.fp, panoptic.fn, panoptic.iou = (counts[k] for k in ("tp", "fp", "fn", "iou"))
    results.update(panoptic.result())
  results.update(semantic.result())
  return results


SUMMARY_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "mIoU", "fwIoU", "pAcc")


def summary(results: dict) -> dict:
  """The headline metrics of `results` (those present), rounded to 2 decimals, for printing."""
  return {key: round(results[key], 2) for key in SUMMARY_KEYS if key in results}


def write_results(workdir: str, results: dict) -> str:
  """Writes `results` to `workdir/eval_results.json` (NaN as null) on process 0; returns the path."""
  path = os.path.join(workdir, RESULTS_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(to_json_safe(results), f, indent=2, allow_nan=False)
  return path


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
                        step: int | None = None, split: str | None = None) -> dict:
  """`scripts/evaluate.py`: evaluates the weights in `checkpoint` (a model directory or a training workdir;
  default `workdir`) at `step` (default the latest) and writes `workdir/eval_results.json`.

  The architecture comes with the weights; `config` gives the data and test settings, and its classes must be the
  weights' classes.
  """
  model_config, variables = checkpoint_lib.load_variables(checkpoint or workdir, step)
  if model_config.num_classes != config.data.num_classes:
    raise ValueError(f"The weights in {checkpoint or workdir} predict {model_config.num_classes} classes but "
                     f"config.data.num_classes is {config.data.num_classes}; evaluate them with their dataset's "
                     "config.")
  results = evaluate_model(build_model(model_config), variables, config, split=split)
  write_results(workdir, results)
  return results

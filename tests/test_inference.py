"""Test-time preprocessing and inference against independent references: hand-computed Detectron2 resizes, PyTorch's
`F.interpolate`, a plain transcription of the original MaskFormer `panoptic_inference` loop, numpy transcriptions
of the semantic and (Mask2Former) instance rules, and transformers' MaskFormer post-processing."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import MaskFormerImageProcessorPil

from maskformer_jax import inference
from maskformer_jax.inference import (instance_inference, panoptic_inference, postprocess_mask_logits, predict,
                                      prepare_image, resize_shortest_edge, semantic_inference)
from maskformer_jax.models import PIXEL_MEAN, PIXEL_STD, abstract_variables, build_model
from maskformer_jax.models.layers import resize_bilinear


@pytest.mark.parametrize("shape,short,max_size,expected", [
    ((400, 600), 512, 2048, (512, 768)),   # short side to 512
    ((600, 400), 512, 2048, (768, 512)),
    ((100, 1000), 512, 2048, (205, 2048)),  # 512 / 100 would make the long side 5120 > 2048: cap it
    ((512, 512), 512, 2048, (512, 512)),
])
def test_resize_shortest_edge(shape, short, max_size, expected):
  image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
  assert resize_shortest_edge(image, short, max_size).shape == (*expected, 3)


def test_prepare_image_normalises_and_zero_pads_to_32():
  batch, size = prepare_image(np.full((100, 150, 3), 200, np.uint8), short_side=200, max_size=1333)
  assert size == (200, 300) and batch.shape == (1, 224, 320, 3) and batch.dtype == np.float32
  expected = (200 - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
  np.testing.assert_allclose(batch[0, :200, :300], np.broadcast_to(expected, (200, 300, 3)), rtol=1e-6)
  assert not batch[0, 200:].any() and not batch[0, :, 300:].any()  # padding is 0 after normalisation


def test_prepare_image_refuses_non_rgb_uint8():
  with pytest.raises(ValueError, match="RGB uint8"):
    prepare_image(np.zeros((64, 64), np.uint8))
  with pytest.raises(ValueError, match="RGB uint8"):
    prepare_image(np.zeros((64, 64, 3), np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Independent references.
# ----------------------------------------------------------------------------------------------------------------

def softmax_np(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid_np(x):
  return 1 / (1 + np.exp(-x))


def reference_panoptic(class_logits, mask_logits, is_thing, object_mask_threshold=0.8, overlap_threshold=0.8):
  """facebookresearch/MaskFormer `MaskFormer.panoptic_inference`, transcribed in torch (metadata lookup -> is_thing)."""
  mask_cls, mask_pred = torch.tensor(np.asarray(class_logits)), torch.tensor(np.asarray(mask_logits))
  num_classes = mask_cls.shape[-1] - 1
  scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
  mask_pred = mask_pred.sigmoid()
  keep = labels.ne(num_classes) & (scores > object_mask_threshold)
  cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
  cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
  panoptic_seg = torch.zeros(cur_masks.shape[-2:], dtype=torch.int32)
  segments_info = []
  current_segment_id = 0
  if cur_masks.shape[0] == 0:
    return panoptic_seg.numpy(), segments_info
  cur_mask_ids = cur_prob_masks.argmax(0)
  stuff_memory_list = {}
  for k in range(cur_classes.shape[0]):
    pred_class = cur_classes[k].item()
    isthing = bool(is_thing[pred_class])
    mask = cur_mask_ids == k
    mask_area = mask.sum().item()
    original_area = (cur_masks[k] >= 0.5).sum().item()
    if mask_area > 0 and original_area > 0:
      if mask_area / original_area < overlap_threshold:
        continue
      if not isthing:
        if int(pred_class) in stuff_memory_list:
          panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
          continue
        stuff_memory_list[int(pred_class)] = current_segment_id + 1
      current_segment_id += 1
      panoptic_seg[mask] = current_segment_id
      segments_info.append({"id": current_segment_id, "isthing": isthing, "category_id": int(pred_class)})
  return panoptic_seg.numpy(), segments_info


def class_logits_for(labels, scores, num_classes):
  """`[Q, K+1]` logits whose softmax puts `score` on `label` (K = no object) and spreads the rest evenly."""
  probs = np.empty((len(labels), num_classes + 1), np.float64)
  for q, (label, score) in enumerate(zip(labels, scores)):
    probs[q] = (1 - score) / num_classes
    probs[q, label] = score
  return np.log(probs).astype(np.float32)


def hf_outputs(class_logits, mask_logits):
  """The two fields transformers' post-processing reads from a model output, for a batch of one or more."""
  return types.SimpleNamespace(class_queries_logits=torch.from_numpy(class_logits),
                               masks_queries_logits=torch.from_numpy(mask_logits))


# ----------------------------------------------------------------------------------------------------------------
# Mask post-processing and semantic inference.
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size,output_size", [((27, 35), (50, 61)), ((32, 40), (20, 23)), ((25, 40), (25, 40))])
def test_postprocess_mask_logits_matches_torch(image_size, output_size):
  logits = np.random.default_rng(0).normal(size=(3, 8, 10)).astype(np.float32) * 4
  expected = F.interpolate(torch.from_numpy(logits)[None], size=(32, 40), mode="bilinear", align_corners=False)
  expected = expected[:, :, :image_size[0], :image_size[1]]  # Detectron2's sem_seg_postprocess: crop, then resize
  expected = F.interpolate(expected, size=output_size, mode="bilinear", align_corners=False)[0].numpy()
  ours = jax.jit(postprocess_mask_logits, static_argnums=(1, 2))(logits, image_size, output_size)
  assert ours.shape == (3, *output_size)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5)


def test_semantic_inference_matches_numpy_and_transformers():
  rng = np.random.default_rng(1)
  class_logits = rng.normal(size=(2, 7, 6)).astype(np.float32) * 3  # B=2, Q=7, K=5
  mask_logits = rng.normal(size=(2, 7, 8, 10)).astype(np.float32) * 3
  scores = np.asarray(jax.jit(jax.vmap(semantic_inference))(class_logits, mask_logits))
  expected = np.einsum("bqc,bqhw->bchw", softmax_np(class_logits.astype(np.float64))[..., :-1],
                       sigmoid_np(mask_logits.astype(np.float64)))
  assert scores.shape == (2, 5, 8, 10) and scores.dtype == np.float32
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

  # transformers marginalises at the mask-logit resolution (no upsampling to the padded input first, no crop) and
  # resizes the K-channel score map straight to each target size with bilinear align_corners=False, then takes
  # the argmax; so the same composition of ours must match it.
  target_sizes = [(20, 28), (13, 17)]
  hf = MaskFormerImageProcessorPil().post_process_semantic_segmentation(
      hf_outputs(class_logits, mask_logits), target_sizes=target_sizes, return_segmentation_scores=True)
  for i, size in enumerate(target_sizes):
    resized = np.asarray(resize_bilinear(scores[i], size))
    np.testing.assert_allclose(resized, hf[i].segmentation_scores.numpy(), atol=1e-5)
    np.testing.assert_array_equal(resized.argmax(0), hf[i].segmentation.numpy())


# ----------------------------------------------------------------------------------------------------------------
# Panoptic inference.
# ----------------------------------------------------------------------------------------------------------------

IS_THING = [True, True, False, False]  # K = 4: classes 0, 1 things, 2, 3 stuff; index 4 is "no object"
NO_OBJECT = 4


def _overlap_case(stolen):
  """Thing query 0 owns the top 100 pixels of a 10x20 map; thing query 1, more confident, owns the bottom half and
  takes `stolen` of query 0's pixels, leaving it a visible ratio of (100 - stolen) / 100."""
  masks = np.full((2, 10, 20), -4.0, np.float32)
  masks[0, :5] = 4
  masks[1, 5:] = 4
  masks[1].reshape(-1)[:stolen] = 4
  return class_logits_for([0, 1], [0.9, 0.95], 4), masks


def _blocks(*row_ranges, width=8):
  """One query mask per (start, stop) row range of an 8 x width map: logit 4 inside, -4 outside."""
  masks = np.full((len(row_ranges), 8, width), -4.0, np.float32)
  for q, (start, stop) in enumerate(row_ranges):
    masks[q, start:stop] = 4
  return masks


# name -> (class_logits, mask_logits, expected segments as (category, isthing) in id order)
PANOPTIC_CASES = {
    # Score 0.79 is not above the 0.8 threshold: dropped, and then the 0.81 query wins every pixel.
    "low_score": (class_logits_for([0, 1], [0.79, 0.81], 4), _blocks((0, 8), (0, 4)), [(1, True)]),
    # A confident "no object" query is dropped and never wins a pixel, however strong its mask.
    "no_object_winner": (class_logits_for([NO_OBJECT, 0], [0.95, 0.9], 4), np.stack(
        [np.full((8, 8), 8.0, np.float32), _blocks((0, 4))[0]]), [(0, True)]),
    "overlap_0.79_dropped": (*_overlap_case(21), [(1, True)]),
    "overlap_0.80_kept": (*_overlap_case(20), [(0, True), (1, True)]),  # the rule is "drop if ratio < threshold"
    "overlap_0.81_kept": (*_overlap_case(19), [(0, True), (1, True)]),
    # Stuff class 2 from queries 0 and 2 is one segment (id 1), listed once; the thing in between gets id 2.
    "stuff_merged": (class_logits_for([2, 0, 2, 3], [0.9, 0.9, 0.85, 0.9], 4), _blocks((0, 2), (2, 4), (4, 6), (6, 8)),
                     [(2, False), (0, True), (3, False)]),
    "things_separate": (class_logits_for([1, 1], [0.9, 0.85], 4), _blocks((0, 4), (4, 8)), [(1, True), (1, True)]),
    "nothing_kept": (class_logits_for([0, 2, NO_OBJECT], [0.5, 0.7, 0.99], 4), _blocks((0, 4), (4, 8), (0, 8)), []),
    # Identical queries tie on every pixel: the first wins all, the second wins nothing and is skipped.
    "tie": (class_logits_for([0, 0], [0.9, 0.9], 4), _blocks((0, 5), (0, 5)), [(0, True)]),
    # The only kept query wins every pixel but has no pixel with sigmoid >= 0.5: skipped, all void.
    "no_own_pixels": (class_logits_for([0], [0.9], 4), np.full((1, 8, 8), -1.0, np.float32), []),
}


@pytest.mark.parametrize("name", PANOPTIC_CASES)
def test_panoptic_inference_rules(name):
  class_logits, mask_logits, expected = PANOPTIC_CASES[name]
  panoptic, segments = panoptic_inference(class_logits, mask_logits, IS_THING)
  ref_panoptic, ref_segments = reference_panoptic(class_logits, mask_logits, IS_THING)
  assert panoptic.dtype == np.int32 and panoptic.shape == mask_logits.shape[1:]
  np.testing.assert_array_equal(panoptic, ref_panoptic)
  assert segments == ref_segments
  assert [(s["category_id"], s["isthing"]) for s in segments] == expected  # the case hits the rule it names
  assert sorted(set(np.unique(panoptic)) - {0}) == [s["id"] for s in segments]


def test_panoptic_score_equal_to_threshold_is_dropped():
  # Logits 0 on class 0 and on "no object" (-inf elsewhere) give a score of exactly 0.5 for class 0 (the first of
  # the tied maxima); with threshold 0.5 it is dropped and the bottom query takes the whole map.
  class_logits = np.array([[0, -np.inf, -np.inf, -np.inf, 0], [-np.inf, 0, -np.inf, -np.inf, -np.inf]], np.float32)
  mask_logits = _blocks((0, 4), (4, 8))
  panoptic, segments = panoptic_inference(class_logits, mask_logits, IS_THING, object_mask_threshold=0.5)
  ref_panoptic, ref_segments = reference_panoptic(class_logits, mask_logits, IS_THING, object_mask_threshold=0.5)
  np.testing.assert_array_equal(panoptic, ref_panoptic)
  assert segments == ref_segments == [{"id": 1, "category_id": 1, "isthing": True}]
  assert (panoptic == 1).all()


def test_panoptic_merged_stuff_covers_both_queries():
  class_logits, mask_logits, _ = PANOPTIC_CASES["stuff_merged"]
  panoptic, _ = panoptic_inference(class_logits, mask_logits, IS_THING)
  np.testing.assert_array_equal(panoptic[:, 0], [1, 1, 2, 2, 1, 1, 3, 3])


@pytest.mark.parametrize("seed,object_mask_threshold,overlap_threshold", [
    (0, 0.8, 0.8), (1, 0.8, 0.8), (2, 0.5, 0.8), (3, 0.5, 0.5), (4, 0.3, 0.9), (5, 0.6, 0.7)])
def test_panoptic_inference_random_matches_reference(seed, object_mask_threshold, overlap_threshold):
  rng = np.random.default_rng(seed)
  class_logits = (rng.normal(size=(10, 5)) * 4).astype(np.float32)
  # Smooth blobs covering a fraction of the map each, so that queries own regions and overlap partly.
  mask_logits = np.asarray(resize_bilinear(rng.normal(size=(10, 4, 4)).astype(np.float32) * 8 - 6, (12, 14)))
  is_thing = rng.random(4) < 0.5
  panoptic, segments = panoptic_inference(class_logits, mask_logits, is_thing, object_mask_threshold,
                                          overlap_threshold)
  ref_panoptic, ref_segments = reference_panoptic(class_logits, mask_logits, is_thing, object_mask_threshold,
                                                  overlap_threshold)
  np.testing.assert_array_equal(panoptic, ref_panoptic)
  assert segments == ref_segments and segments  # every seed here yields segments


def _assert_same_panoptic(ours, segments, hf):
  """Same partition of the pixels (ids may differ, void is void) and the same category on each segment."""
  pairs = set(zip(ours.ravel().tolist(), hf["segmentation"].numpy().ravel().tolist()))
  assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)  # a bijection between ids
  assert all((a == 0) == (b == 0) for a, b in pairs)
  ours_category = {s["id"]: s["category_id"] for s in segments}
  hf_category = {s["id"]: s["label_id"] for s in hf["segments_info"]}  # merged stuff is listed once per query
  assert len(ours_category) == len(segments) == len(pairs - {(0, 0)})
  assert all(ours_category[a] == hf_category[b] for a, b in pairs if a)


def test_panoptic_inference_agrees_with_transformers():
  """transformers deviates from MaskFormer in ways these cases avoid: it tests the overlap against score-weighted
  masks (here every mask logit is +-6, so sigmoid >= 0.5 and score x sigmoid >= 0.5 pick the same pixels for any
  kept score > 0.8), keeps a segment only when the ratio is strictly above the threshold (no ratio here is exactly
  0.8, checked below), lists a merged stuff segment once per query, fills an empty result with -1, and, after
  reusing a stuff id, continues numbering from that id, so later segments get duplicate ids (here the stuff
  queries to merge come last)."""
  processor = MaskFormerImageProcessorPil()
  rng = np.random.default_rng(0)
  cases = []
  for _ in range(4):  # things only: random classes, smooth random regions
    signs = np.asarray(resize_bilinear(rng.normal(size=(8, 3, 4)).astype(np.float32), (9, 11))) > 0
    cases.append((rng.normal(size=(8, 5)).astype(np.float32) * 4, np.where(signs, 6.0, -6.0).astype(np.float32),
                  [True] * 4))
  cases.append((class_logits_for([2, 0, 1, 2], [0.9, 0.95, 0.85, 0.99], 4),
                np.where(_blocks((0, 2), (2, 4), (4, 6), (6, 8), width=6) > 0, 6.0, -6.0).astype(np.float32),
                IS_THING))
  for class_logits, mask_logits, is_thing in cases:
    panoptic, segments = panoptic_inference(class_logits, mask_logits, is_thing)
    # No ratio is exactly 0.8: the reference gives the same result when the rule is "ratio > 0.8".
    strict, _ = reference_panoptic(class_logits, mask_logits, is_thing, overlap_threshold=np.nextafter(0.8, 1))
    np.testing.assert_array_equal(strict, panoptic)
    hf = processor.post_process_panoptic_segmentation(
        hf_outputs(class_logits[None], mask_logits[None]), threshold=0.8, overlap_mask_area_threshold=0.8,
        label_ids_to_fuse={c for c, thing in enumerate(is_thing) if not thing})[0]
    assert segments  # non-trivial
    _assert_same_panoptic(panoptic, segments, hf)
  assert len(segments) == 3 and panoptic[6, 0] == panoptic[0, 0]  # the stuff case merged its two queries


# ----------------------------------------------------------------------------------------------------------------
# Instance inference.
# ----------------------------------------------------------------------------------------------------------------

def reference_instance(class_logits, mask_logits, top_k, is_thing=None):
  """Mask2Former's `instance_inference`, in numpy."""
  num_classes = class_logits.shape[1] - 1
  probs = softmax_np(class_logits.astype(np.float64))[:, :-1].ravel()
  index = np.argsort(-probs, kind="stable")[:top_k]
  labels, masks = index % num_classes, mask_logits[index // num_classes]
  binary = masks > 0
  mask_scores = (sigmoid_np(masks.astype(np.float64)) * binary).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
  keep = np.ones(len(index), bool) if is_thing is None else np.asarray(is_thing)[labels]
  return {"scores": (probs[index] * mask_scores)[keep], "labels": labels[keep], "masks": binary[keep]}


@pytest.mark.parametrize("top_k,is_thing", [(10, None), (100, None), (10, IS_THING)])
def test_instance_inference_matches_reference(top_k, is_thing):
  rng = np.random.default_rng(2)
  class_logits = rng.normal(size=(6, 5)).astype(np.float32) * 2
  mask_logits = rng.normal(size=(6, 7, 9)).astype(np.float32) * 2
  ours = instance_inference(class_logits, mask_logits, top_k=top_k, is_thing=is_thing)
  expected = reference_instance(class_logits, mask_logits, min(top_k, 24), is_thing)
  assert len(expected["labels"]) == min(top_k, 24) if is_thing is None else 0 < len(expected["labels"]) < 10
  assert ours["masks"].dtype == bool and ours["labels"].dtype == np.int32
  np.testing.assert_array_equal(ours["labels"], expected["labels"])
  np.testing.assert_array_equal(ours["masks"], expected["masks"])
  np.testing.assert_allclose(ours["scores"], expected["scores"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------------

def test_inference_refuses_bad_inputs():
  class_logits, masks = np.zeros((7, 6), np.float32), np.zeros((7, 8, 10), np.float32)
  with pytest.raises(ValueError, match="same number of queries"):
    semantic_inference(class_logits[:5], masks)
  with pytest.raises(ValueError, match="Index the batch"):
    semantic_inference(class_logits[None], masks[None])
  with pytest.raises(ValueError, match="must be float logits"):
    panoptic_inference(class_logits, masks.astype(np.int32), [True] * 5)
  with pytest.raises(ValueError, match="K\\+1 >= 2"):
    semantic_inference(class_logits[:, :1], masks)
  with pytest.raises(ValueError, match="is_thing must be 5 booleans"):
    panoptic_inference(class_logits, masks, [True] * 6)
  with pytest.raises(ValueError, match="is_thing must be 5 booleans"):
    instance_inference(class_logits, masks, is_thing=[1, 0, 1, 0, 1])
  with pytest.raises(ValueError, match="top_k must be positive"):
    instance_inference(class_logits, masks, top_k=0)
  with pytest.raises(ValueError, match="must fit inside the padded maps"):
    postprocess_mask_logits(masks, (33, 40), (50, 50))  # padded input is 32 x 40
  with pytest.raises(ValueError, match="positive ints"):
    postprocess_mask_logits(masks, (32, 40), (50, 0))


# ----------------------------------------------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------------------------------------------

def torch_postprocess(mask_logits, padded_size, image_size, output_size):
  """MaskFormer's resize path in torch: `[Q, h, w]` -> upsampled to the padded input `[1, Q, H_pad, W_pad]` and
  post-processed (cropped, resized) `[Q, *output_size]` numpy."""
  padded = F.interpolate(torch.tensor(mask_logits)[None], size=padded_size, mode="bilinear", align_corners=False)
  cropped = padded[:, :, :image_size[0], :image_size[1]]
  return padded, F.interpolate(cropped, size=output_size, mode="bilinear", align_corners=False)[0].numpy()


def is_argmax_up_to_noise(labels, scores, atol=1e-5):
  """Whether `labels` is an argmax of `scores [K, H, W]` up to float noise (near-tied classes may flip)."""
  chosen = np.take_along_axis(scores, labels[None], 0)[0]
  return bool(np.all(chosen >= scores.max(0) - atol))


def test_predict_tiny_model():
  """`predict` on a tiny random model against the reference pipeline in torch on the same raw model outputs."""
  from configs import common
  config = common.shapes_config()
  config.model.num_queries = 6
  config.model.transformer.num_layers = 1
  config.model.backbone.depths = (1, 1, 1, 1)
  config.test.update(dict(min_size_test=32, max_size_test=64, object_mask_threshold=0.2, overlap_threshold=0.5))
  model = build_model(config.model)
  # Random values straight into the variables' shapes: Flax's own init runs the model eagerly (over a minute here).
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.3).astype(x.dtype),
                           abstract_variables(config.model))
  is_thing = [True] * 4 + [False] * 4

  for shape in [(30, 45), (31, 44)]:  # both resize to a 32 x 64 padded input
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    result = predict(model, variables, image, config.test, is_thing)
    assert result["semantic"].shape == result["panoptic"].shape == shape
    assert result["semantic"].dtype == result["panoptic"].dtype == np.int32

    # The raw outputs from the jitted forward `predict` used (the model itself is tested elsewhere); a second
    # compilation or an eager run would cost more than the rest of this file.
    images, image_size = prepare_image(image, 32, 64)
    class_logits, mask_logits = jax.device_get(inference._jitted_apply()(model, variables, jnp.asarray(images)))
    _, logits = torch_postprocess(mask_logits, images.shape[1:3], image_size, shape)
    # This random model predicts almost the same class for every query, so the semantic check here is loose; the
    # stand-in model below checks the semantic paths on varied outputs.
    assert is_argmax_up_to_noise(result["semantic"],
                                 np.einsum("qc,qhw->chw", softmax_np(class_logits)[:, :-1], sigmoid_np(logits)))
    ref_panoptic, ref_segments = reference_panoptic(class_logits, logits, is_thing, 0.2, 0.5)
    np.testing.assert_array_equal(result["panoptic"], ref_panoptic)
    assert result["segments"] == ref_segments and ref_segments
  assert inference._jitted_apply()._cache_size() == 1  # one compilation for both images


class StandInModel(nn.Module):
  """Returns its two parameters as the model outputs, for a 32 x 64 padded input: varied logits on demand."""

  @nn.compact
  def __call__(self, images, train=False, aux_outputs=True):
    assert images.shape == (1, 32, 64, 3) and not train and not aux_outputs
    return {"pred_logits": self.param("class_logits", nn.initializers.zeros, (1, 7, 6)),
            "pred_masks": self.param("mask_logits", nn.initializers.zeros, (1, 7, 8, 16))}


def test_predict_semantic_follows_config():
  """Panoptic configs post-process the mask logits before the einsum; semantic configs marginalise at the padded
  input size and crop/resize the K-channel scores (`test.sem_seg_postprocess_before_inference`)."""
  from configs import common
  rng = np.random.default_rng(3)
  class_logits = rng.normal(size=(7, 6)).astype(np.float32) * 3
  mask_logits = rng.normal(size=(7, 8, 16)).astype(np.float32) * 6
  variables = {"params": {"class_logits": class_logits[None], "mask_logits": mask_logits[None]}}
  image = rng.integers(0, 256, (60, 91, 3), dtype=np.uint8)  # resized to 32 x 49, padded to 32 x 64
  padded, logits = torch_postprocess(mask_logits, (32, 64), (32, 49), (60, 91))
  class_probs = softmax_np(class_logits)[:, :-1]
  before = np.einsum("qc,qhw->chw", class_probs, sigmoid_np(logits))
  after = torch.einsum("qc,qhw->chw", torch.tensor(class_probs), padded[0].sigmoid())[None, :, :32, :49]
  after = F.interpolate(after, size=(60, 91), mode="bilinear", align_corners=False)[0].numpy()
  # The two paths differ beyond float noise, so the check below tells them apart.
  assert not is_argmax_up_to_noise(before.argmax(0), after) and not is_argmax_up_to_noise(after.argmax(0), before)

  config = common.shapes_config().test
  config.update(dict(min_size_test=32, max_size_test=64))
  for postprocess_before_inference, expected in [(True, before), (False, after)]:
    config.sem_seg_postprocess_before_inference = postprocess_before_inference
    semantic = predict(StandInModel(), variables, image, config)["semantic"]
    assert semantic.shape == (60, 91)
    assert is_argmax_up_to_noise(semantic, expected)

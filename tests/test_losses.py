"""maskformer_loss against transformers' MaskFormerLoss, finite differences and an autodiff statement of the terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

from configs import ade20k_r50
from maskformer_jax.losses import maskformer_loss
from maskformer_jax.matching import match_queries, matching_cost

NUM_CLASSES, NUM_QUERIES, NUM_SLOTS, SIZE = 5, 10, 6, 32
WEIGHTS = {"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
TRANSFORMERS_NAMES = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
# One jitted loss for the whole file: tests with the same shapes and options share its compilation cache.
jitted_loss = jax.jit(maskformer_loss, static_argnames=(
    "num_classes", "class_weight", "mask_weight", "dice_weight", "no_object_weight", "focal_alpha", "focal_gamma",
    "matcher"))


def split_name(name: str) -> tuple[str, str]:
  """'loss_ce_3' -> ('loss_ce', '_3'); 'loss_dice' -> ('loss_dice', '')."""
  base = name.rstrip("_0123456789")
  return base, name[len(base):]


def make_predictions(rng, batch: int, num_layers: int, size: int = SIZE) -> dict:
  """Model-like outputs: the last of `num_layers` decoder layers plus the others as aux outputs."""
  layers = [{"pred_logits": 2 * rng.standard_normal((batch, NUM_QUERIES, NUM_CLASSES + 1)).astype(np.float32),
             "pred_masks": 2 * rng.standard_normal((batch, NUM_QUERIES, size // 4, size // 4)).astype(np.float32)}
            for _ in range(num_layers)]
  return dict(layers[-1], aux_outputs=layers[:-1])


def make_targets(rng, counts, size: int = SIZE, garbage: bool = False) -> dict:
  """Padded targets with `counts[b]` rectangles in random (non-prefix) slots; padded slots hold zeros, or random
  labels and masks with `garbage=True`."""
  batch = len(counts)
  labels = np.zeros((batch, NUM_SLOTS), np.int32)
  masks = np.zeros((batch, NUM_SLOTS, size, size), bool)
  valid = np.zeros((batch, NUM_SLOTS), bool)
  for b, count in enumerate(counts):
    for slot in rng.permutation(NUM_SLOTS)[:count]:
      valid[b, slot] = True
      labels[b, slot] = rng.integers(NUM_CLASSES)
      top, left = rng.integers(0, size - 4, 2)
      masks[b, slot, top:top + rng.integers(3, size // 2), left:left + rng.integers(3, size // 2)] = True
  if garbage:
    labels = np.where(valid, labels, rng.integers(-50, 50, labels.shape)).astype(np.int32)
    masks = np.where(valid[..., None, None], masks, rng.random(masks.shape) < 0.5)
  return {"labels": labels, "masks": masks, "valid": valid}


def transformers_loss(outputs: dict, targets: dict, cost_class: float = 1.0) -> dict:
  """transformers' MaskFormerLoss on the real segments of each image (matching costs cost_class / 20 / 1,
  no-object 0.1; the terms it returns are unweighted)."""
  criterion = MaskFormerLoss(num_labels=NUM_CLASSES, matcher=MaskFormerHungarianMatcher(cost_class, 20.0, 1.0),
                             weight_dict={}, eos_coef=0.1)
  valid = targets["valid"]
  mask_labels = [torch.from_numpy(targets["masks"][b][valid[b]].astype(np.float32)) for b in range(len(valid))]
  class_labels = [torch.from_numpy(targets["labels"][b][valid[b]].astype(np.int64)) for b in range(len(valid))]
  aux = [{"masks_queries_logits": torch.from_numpy(a["pred_masks"]),
          "class_queries_logits": torch.from_numpy(a["pred_logits"])} for a in outputs["aux_outputs"]]
  with torch.no_grad():
    losses = criterion(torch.from_numpy(outputs["pred_masks"]), torch.from_numpy(outputs["pred_logits"]),
                       mask_labels, class_labels, aux or None)
  return {name: float(value) for name, value in losses.items()}


def ours(outputs, targets, matcher="device", **options) -> tuple[float, dict]:
  total, terms = jitted_loss(outputs, targets, num_classes=NUM_CLASSES, matcher=matcher, **options)
  return float(total), {name: float(value) for name, value in terms.items()}


@jax.jit
def layer_matchings(outputs, targets) -> jax.Array:
  """The query matched to each target slot `[L, B, M]`, for every layer (aux first), as the loss matches them."""
  def match(layer):
    cost = matching_cost(layer["pred_logits"], layer["pred_masks"], targets["labels"], targets["masks"],
                         targets["valid"])
    return match_queries(cost, targets["valid"])
  return jnp.stack([match(layer) for layer in [*outputs["aux_outputs"], outputs]])


@pytest.mark.parametrize("matcher", ["device", "host"])
@pytest.mark.parametrize("num_aux", [0, 3])
@pytest.mark.parametrize("counts", [(1, 4, 6), (0, 3, 2)], ids=["full_slots", "empty_image"])
def test_terms_equal_transformers(matcher, num_aux, counts):
  rng = np.random.default_rng(len(counts) * 10 + sum(counts) + num_aux)
  outputs = make_predictions(rng, len(counts), num_aux + 1)
  targets = make_targets(rng, counts)
  total, terms = ours(outputs, targets, matcher)
  theirs = transformers_loss(outputs, targets)

  suffixes = ["", *(f"_{i}" for i in range(num_aux))]
  assert set(terms) == {name + suffix for name in WEIGHTS for suffix in suffixes}
  expected_total = 0.0
  for name, value in terms.items():
    base, suffix = split_name(name)
    reference = theirs[TRANSFORMERS_NAMES[base] + suffix]
    np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-7, err_msg=name)
    expected_total += WEIGHTS[base] * reference
  np.testing.assert_allclose(total, expected_total, rtol=1e-4)


def test_matching_class_weight_apart_from_the_loss_weight():
  """match_class_weight weighs the class term of the matching cost alone, like transformers' (and DETR's) separate
  matcher costs; class_weight then only scales the cross-entropy in the total."""
  rng = np.random.default_rng(7)
  outputs = make_predictions(rng, 3, 3)
  targets = make_targets(rng, (2, 5, 3))
  total, terms = ours(outputs, targets, class_weight=5.0, match_class_weight=0.05)
  theirs = transformers_loss(outputs, targets, cost_class=0.05)
  expected_total = 0.0
  for name, value in terms.items():
    base, suffix = split_name(name)
    np.testing.assert_allclose(value, theirs[TRANSFORMERS_NAMES[base] + suffix], rtol=1e-4, atol=1e-7, err_msg=name)
    expected_total += {**WEIGHTS, "loss_ce": 5.0}[base] * value
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)
  # The matching really changed: tied weights (5 / 20 / 1) match differently on these predictions.
  tied = transformers_loss(outputs, targets, cost_class=5.0)
  assert any(abs(tied[key] - theirs[key]) > 1e-3 for key in theirs)


def test_padded_slots_do_not_matter():
  rng = np.random.default_rng(3)
  outputs = make_predictions(rng, 3, 2)
  clean = make_targets(np.random.default_rng(4), (2, 0, 5))
  garbage = make_targets(np.random.default_rng(4), (2, 0, 5), garbage=True)
  assert not np.array_equal(clean["masks"], garbage["masks"])
  assert ours(outputs, clean) == ours(outputs, garbage)


def test_jit_equals_eager():
  rng = np.random.default_rng(5)
  outputs, targets = make_predictions(rng, 2, 2), make_targets(rng, (3, 1))
  eager_total, eager_terms = maskformer_loss(outputs, targets, num_classes=NUM_CLASSES)
  total, terms = ours(outputs, targets)
  np.testing.assert_allclose(float(eager_total), total, rtol=1e-6)
  for name, value in terms.items():
    np.testing.assert_allclose(float(eager_terms[name]), value, rtol=1e-6, err_msg=name)


def reference_terms(pred_logits, pred_masks, query_index, targets) -> dict:
  """The three terms written plainly with jax.image.resize and jax.nn, given a matching, for autodiff."""
  labels, masks, valid = targets["labels"], targets["masks"].astype(jnp.float32), targets["valid"]
  batch, num_queries = pred_logits.shape[:2]
  target_class = jnp.full((batch, num_queries), NUM_CLASSES)
  for b in range(batch):
    for m in range(NUM_SLOTS):
      if valid[b, m]:
        target_class = target_class.at[b, query_index[b, m]].set(labels[b, m])
  weight = jnp.where(target_class == NUM_CLASSES, 0.1, 1.0)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(pred_logits), target_class[..., None], -1)[..., 0]
  chosen = jnp.take_along_axis(pred_masks, jnp.maximum(query_index, 0)[..., None, None], axis=1)
  # jax.image.resize's linear upsampling uses the same half-pixel rule as PyTorch's align_corners=False.
  x = jax.image.resize(chosen, chosen.shape[:2] + masks.shape[-2:], "linear")
  p = jax.nn.sigmoid(x)
  ce = -(masks * jnp.log(p) + (1 - masks) * jnp.log(1 - p))
  p_t = p * masks + (1 - p) * (1 - masks)
  focal = jnp.mean((0.25 * masks + 0.75 * (1 - masks)) * ce * (1 - p_t) ** 2, axis=(-2, -1))
  dice = 1 - (2 * jnp.sum(p * masks, (-2, -1)) + 1) / (jnp.sum(p, (-2, -1)) + jnp.sum(masks, (-2, -1)) + 1)
  num_masks = max(valid.sum(), 1)
  return {"loss_ce": jnp.sum(weight * nll) / jnp.sum(weight),
          "loss_mask": jnp.sum(jnp.where(valid, focal, 0)) / num_masks,
          "loss_dice": jnp.sum(jnp.where(valid, dice, 0)) / num_masks}


def test_gradient_equals_autodiff_of_plain_terms():
  """The custom VJP of the chunked mask terms against autodiff of the same terms written plainly, for the same
  matching, with more real segments per image than one chunk holds."""
  rng = np.random.default_rng(6)
  outputs = make_predictions(rng, 2, 1, size=16)
  outputs.pop("aux_outputs")
  targets = make_targets(rng, (NUM_SLOTS, 0), size=16)
  query_index = np.asarray(layer_matchings(dict(outputs, aux_outputs=[]), targets)[0])

  def plain(logits, masks):
    terms = reference_terms(logits, masks, query_index, targets)
    return sum(WEIGHTS[k] * v for k, v in terms.items())

  def ours_total(logits, masks):
    return maskformer_loss({"pred_logits": logits, "pred_masks": masks}, targets, num_classes=NUM_CLASSES)[0]

  args = (outputs["pred_logits"], outputs["pred_masks"])
  np.testing.assert_allclose(float(jax.jit(ours_total)(*args)), float(plain(*args)), rtol=1e-5)
  for got, want in zip(jax.jit(jax.grad(ours_total, (0, 1)))(*args), jax.jit(jax.grad(plain, (0, 1)))(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences():
  """Directional derivatives of the total against central differences, in float32: the loss computes in float32
  even under x64. The loss is smooth only while the matching stays put, so each step is checked not to move it."""
  rng = np.random.default_rng(7)
  outputs = make_predictions(rng, 2, 2, size=16)
  targets = make_targets(rng, (3, 0), size=16)  # includes an image with no segment

  def total(o):
    return maskformer_loss(o, targets, num_classes=NUM_CLASSES)[0]

  grad = jax.jit(jax.grad(total))(outputs)
  for leaf in jax.tree.leaves(grad):
    assert np.all(np.isfinite(leaf))
  f = jax.jit(total)
  matching = np.asarray(layer_matchings(outputs, targets))
  assert np.all(matching[:, 0][:, targets["valid"][0]] >= 0) and np.all(matching[:, 1] == -1)
  for seed in range(3):
    direction = jax.tree.map(lambda x: np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32),
                             outputs)
    eps = 1e-2
    plus = jax.tree.map(lambda x, d: x + eps * d, outputs, direction)
    minus = jax.tree.map(lambda x, d: x - eps * d, outputs, direction)
    for moved in (plus, minus):
      np.testing.assert_array_equal(layer_matchings(moved, targets), matching)
    numeric = (float(f(plus)) - float(f(minus))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3)


def test_images_without_segments_push_every_query_to_no_object():
  rng = np.random.default_rng(8)
  outputs = make_predictions(rng, 2, 2)
  targets = make_targets(rng, (0, 0))
  (total, terms), grad = jax.jit(jax.value_and_grad(
      lambda o: maskformer_loss(o, targets, num_classes=NUM_CLASSES), has_aux=True))(outputs)
  assert np.isfinite(float(total))
  for name, value in terms.items():
    if not name.startswith("loss_ce"):
      assert float(value) == 0.0, name
  for layer in [grad, *grad["aux_outputs"]]:
    assert np.all(np.asarray(layer["pred_logits"])[..., NUM_CLASSES] < 0)  # raising no-object lowers the loss
    assert np.all(np.asarray(layer["pred_masks"]) == 0)


@pytest.mark.parametrize("change, message", [
    (lambda t: dict(t, labels=np.where(t["valid"], NUM_CLASSES, 0).astype(np.int32)), "num_classes is 5"),
    (lambda t: dict(t, masks=t["masks"].astype(np.float32)), "bool or uint8"),
    (lambda t: {k: v for k, v in t.items() if k != "valid"}, "missing \\['valid'\\]"),
    (lambda t: dict(t, valid=t["valid"][:, :3]), "labels \\[B, M\\]"),
])
def test_bad_targets_name_the_problem(change, message):
  rng = np.random.default_rng(9)
  outputs, targets = make_predictions(rng, 2, 1), make_targets(rng, (2, 1))
  with pytest.raises(ValueError, match=message):
    maskformer_loss(outputs, change(targets), num_classes=NUM_CLASSES)


def test_wrong_number_of_classes():
  rng = np.random.default_rng(10)
  outputs, targets = make_predictions(rng, 2, 1), make_targets(rng, (2, 1))
  with pytest.raises(ValueError, match="num_classes \\+ 1"):
    maskformer_loss(outputs, targets, num_classes=NUM_CLASSES + 1)


def test_config_loss_section_is_the_keyword_arguments():
  rng = np.random.default_rng(11)
  outputs, targets = make_predictions(rng, 2, 2), make_targets(rng, (2, 1))
  total, _ = ours(outputs, targets, **ade20k_r50.get_config().loss)
  np.testing.assert_allclose(total, ours(outputs, targets)[0], rtol=1e-6)

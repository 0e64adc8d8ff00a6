"""The matcher against independent references: scipy's linear_sum_assignment for optimality, a float64 numpy
statement of MaskFormer's matching cost, and transformers' pairwise losses and Hungarian matcher."""
import functools
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
from transformers.models.maskformer.modeling_maskformer import (MaskFormerHungarianMatcher, pair_wise_dice_loss,
                                                                pair_wise_sigmoid_focal_loss)

from maskformer_jax.matching import linear_sum_assignment, match_queries, matching_cost

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT32_ATOL = 1e-4  # on total costs of moderate magnitude
FLOAT64_RTOL = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------

def total_cost(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """Float64 totals `[B]` of the pairs `(rows, cols)` `[B, k]` in `cost` `[B, n, m]`."""
  cost = np.asarray(cost, np.float64)
  return cost[np.arange(len(cost))[:, None], rows, cols].sum(-1)


def scipy_optimum(cost: np.ndarray, maximize: bool = False) -> np.ndarray:
  """scipy's optimal totals `[B]` for each matrix of `cost` `[B, n, m]`, in float64."""
  cost = np.asarray(cost, np.float64)
  totals = []
  for matrix in cost:
    rows, cols = scipy.optimize.linear_sum_assignment(matrix, maximize=maximize)
    totals.append(matrix[rows, cols].sum())
  return np.array(totals)


def assert_assignment_contract(rows: np.ndarray, cols: np.ndarray, n: int, m: int):
  """scipy's contract for a batch `[B, k]` of results on `[n, m]` matrices."""
  k = min(n, m)
  assert rows.dtype == cols.dtype == np.int32
  assert rows.shape == cols.shape and rows.shape[1:] == (k,)
  assert np.all((rows >= 0) & (rows < n)) and np.all((cols >= 0) & (cols < m))
  assert np.all(np.diff(rows, axis=-1) > 0), "row_ind must be strictly ascending (hence distinct)"
  assert np.all(np.diff(np.sort(cols, axis=-1), axis=-1) > 0), "a column is assigned twice"


def assert_optimal(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray, maximize: bool = False):
  ours, best = total_cost(cost, rows, cols), scipy_optimum(cost, maximize)
  if cost.dtype == np.float64:
    np.testing.assert_allclose(ours, best, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL)
  else:
    np.testing.assert_allclose(ours, best, rtol=0, atol=FLOAT32_ATOL)


# ----------------------------------------------------------------------------------------------------------------
# linear_sum_assignment against scipy.
# ----------------------------------------------------------------------------------------------------------------

def _uniform(rng, shape):
  return rng.random(shape)


def _ties(rng, shape):
  """Integers 0..3: many optimal assignments, so only totals can be compared."""
  return rng.integers(0, 4, shape).astype(np.float64)


def _normal(rng, shape):
  return rng.standard_normal(shape)


def _large(rng, shape):
  return rng.uniform(-1e6, 1e6, shape)


def _large_positive(rng, shape):
  return rng.uniform(0, 1e6, shape)


def _large_integer_ties(rng, shape):
  return rng.integers(-3, 4, shape) * 5e5


def _constant_padding(rng, shape):
  """Like the batched matcher's padded target slots: the last columns all hold one constant (per matrix)."""
  cost = rng.random(shape)
  num_padded = shape[-1] // 3 + 1
  cost[..., -num_padded:] = rng.choice([0.0, 0.5, 2.0], shape[0])[:, None, None]
  return cost


def _rank_one(rng, shape):
  """c_ij = a_i * b_j: every row prefers the same column, which defeats any greedy start and forces long paths."""
  return rng.random(shape[:2] + (1,)) * rng.random(shape[:1] + (1,) + shape[2:])


def _all_equal(rng, shape):
  return np.broadcast_to(rng.standard_normal((shape[0], 1, 1)), shape).copy()


# (name, generator, (n, m), number of matrices, dtype, maximize). Float32 cases keep moderate magnitudes; the 1e6
# ones are float64. 6,150 matrices in 21 same-shaped batches, one compile each.
LSA_CASES = [
    ("square", _uniform, (8, 8), 600, np.float32, False),
    ("tall", _uniform, (12, 5), 500, np.float32, False),
    ("wide", _uniform, (5, 12), 500, np.float32, False),
    ("1x1", _normal, (1, 1), 100, np.float32, False),
    ("1xm", _normal, (1, 9), 200, np.float32, False),
    ("nx1", _normal, (9, 1), 200, np.float32, False),
    ("ties", _ties, (10, 10), 600, np.float32, False),
    ("ties_tall", _ties, (10, 6), 300, np.float32, False),
    ("ties_wide", _ties, (4, 11), 200, np.float32, False),
    ("negative", _normal, (16, 16), 300, np.float32, False),
    ("constant_padding", _constant_padding, (20, 8), 300, np.float32, False),
    ("constant_padding_square", _constant_padding, (10, 10), 300, np.float32, False),
    ("rank_one", _rank_one, (12, 12), 200, np.float32, False),
    ("all_equal", _all_equal, (6, 3), 50, np.float32, False),
    ("larger", _uniform, (40, 40), 100, np.float32, False),
    ("maximize_wide", _normal, (7, 11), 300, np.float32, True),
    ("maximize_tall", _ties, (11, 7), 200, np.float32, True),
    ("large_square", _large, (15, 15), 400, np.float64, False),
    ("large_tall", _large_positive, (20, 9), 300, np.float64, False),
    ("large_wide_ties", _large_integer_ties, (6, 14), 300, np.float64, False),
    ("large_maximize", _large, (9, 9), 200, np.float64, True),
]


def test_enough_matrices():
  assert sum(case[3] for case in LSA_CASES) >= 5000


@pytest.mark.parametrize("name,generator,shape,count,dtype,maximize", LSA_CASES, ids=[c[0] for c in LSA_CASES])
def test_linear_sum_assignment_vmap_equals_scipy(name, generator, shape, count, dtype, maximize):
  rng = np.random.default_rng(zlib.crc32(name.encode()))  # a fixed seed per case (str hashes vary per process)
  cost = generator(rng, (count,) + shape).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    solve = jax.jit(jax.vmap(functools.partial(linear_sum_assignment, maximize=maximize)))
    rows, cols = jax.device_get(solve(jnp.asarray(cost)))
  assert_assignment_contract(rows, cols, *shape)
  assert_optimal(cost, rows, cols, maximize)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_sum_assignment_jit_equals_scipy(dtype):
  """Without vmap: one jitted solver per (shape, maximize), called on several matrices of that shape."""
  rng = np.random.default_rng(1)
  scale = 1e6 if dtype == np.float64 else 1.0
  cases = [((1, 1), False), ((1, 5), True), ((5, 1), False), ((6, 6), False), ((6, 6), True), ((9, 4), False),
           ((4, 9), True)]
  with jax.enable_x64(dtype == np.float64):
    for shape, maximize in cases:
      solve = jax.jit(functools.partial(linear_sum_assignment, maximize=maximize))
      cost = np.concatenate([_normal(rng, (8,) + shape) * scale, _ties(rng, (8,) + shape)]).astype(dtype)
      results = [jax.device_get(solve(jnp.asarray(matrix))) for matrix in cost]
      rows, cols = (np.stack(x) for x in zip(*results))
      assert_assignment_contract(rows, cols, *shape)
      assert_optimal(cost, rows, cols, maximize)


# ----------------------------------------------------------------------------------------------------------------
# match_queries against scipy on the real columns.
# ----------------------------------------------------------------------------------------------------------------

def make_match_inputs(seed: int, batch: int, num_queries: int, num_slots: int, ties: bool = False):
  """Costs `[B, Q, M]` and validity `[B, M]`: one image with no targets, one full, one prefix, the rest random
  (non-prefix). Padded columns hold very attractive costs, which a matcher that looked at them would take."""
  rng = np.random.default_rng(seed)
  cost = (_ties if ties else _uniform)(rng, (batch, num_queries, num_slots)).astype(np.float32)
  valid = rng.random((batch, num_slots)) < 0.5
  valid[0], valid[1], valid[2] = False, True, np.arange(num_slots) < num_slots // 2
  valid[3] = np.arange(num_slots) % 2 == 1  # real slots interleaved with padded ones
  cost = np.where(valid[:, None, :], cost, np.float32(-1e3))
  return cost, valid


def assert_matching_optimal(cost: np.ndarray, valid: np.ndarray, query_index: np.ndarray):
  """Contract of `match_queries`, and totals over real slots equal to scipy on `cost[b][:, valid[b]]`."""
  batch, num_queries, num_slots = cost.shape
  assert query_index.dtype == np.int32 and query_index.shape == (batch, num_slots)
  assert np.all(query_index[~valid] == -1)
  assert np.all((query_index[valid] >= 0) & (query_index[valid] < num_queries))
  for b in range(batch):
    real = np.flatnonzero(valid[b])
    queries = query_index[b, real]
    assert len(np.unique(queries)) == len(real), f"image {b}: a query is matched twice"
    ours = cost[b][queries, real].astype(np.float64).sum()
    best = scipy_optimum(cost[b][None][:, :, real])[0]
    np.testing.assert_allclose(ours, best, rtol=0, atol=FLOAT32_ATOL, err_msg=f"image {b}")


def _match_jit(backend: str):
  return jax.jit(functools.partial(match_queries, backend=backend))


@pytest.mark.parametrize("backend", ["device", "host"])
@pytest.mark.parametrize("batch,num_queries,num_slots,ties", [
    (12, 10, 7, False), (12, 10, 7, True), (6, 6, 6, False), (4, 100, 20, False), (4, 100, 20, True)])
def test_match_queries_equals_scipy_on_real_columns(backend, batch, num_queries, num_slots, ties):
  cost, valid = make_match_inputs(num_queries + num_slots + ties, batch, num_queries, num_slots, ties)
  query_index = jax.device_get(_match_jit(backend)(jnp.asarray(cost), jnp.asarray(valid)))
  assert_matching_optimal(cost, valid, query_index)


def test_match_queries_backends_give_equal_costs():
  cost, valid = make_match_inputs(7, 16, 30, 12, ties=True)
  totals = {}
  for backend in ("device", "host"):
    query_index = jax.device_get(_match_jit(backend)(jnp.asarray(cost), jnp.asarray(valid)))
    rows = np.where(valid, query_index, 0)
    totals[backend] = np.where(valid, cost[np.arange(16)[:, None], rows, np.arange(12)], 0).sum(-1, dtype=np.float64)
  np.testing.assert_allclose(totals["device"], totals["host"], rtol=0, atol=FLOAT32_ATOL)


def test_match_queries_unknown_backend():
  cost, valid = make_match_inputs(0, 4, 5, 3)
  with pytest.raises(ValueError):
    match_queries(jnp.asarray(cost), jnp.asarray(valid), backend="gpu")


# ----------------------------------------------------------------------------------------------------------------
# matching_cost against numpy and transformers.
# ----------------------------------------------------------------------------------------------------------------

def reference_matching_cost(pred_logits, pred_masks, labels, masks, *, class_weight=1.0, mask_weight=20.0,
                            dice_weight=1.0, focal_alpha=0.25, focal_gamma=2.0) -> np.ndarray:
  """The formula in float64 numpy, for every column (padded ones included: callers compare real ones only).
  Non-finite predictions give NaN, as in PyTorch."""
  (height, width), (h, w) = masks.shape[-2:], pred_masks.shape[-2:]
  rows, cols = np.arange(h) * height // h, np.arange(w) * width // w  # PyTorch's legacy nearest: floor(i * H / h)
  targets = masks[:, :, rows][:, :, :, cols].astype(np.float64).reshape(*masks.shape[:2], -1)
  x = pred_masks.astype(np.float64).reshape(*pred_masks.shape[:2], -1)
  logits = pred_logits.astype(np.float64)
  with np.errstate(invalid="ignore"):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cost_class = -np.take_along_axis(probs, np.clip(labels, 0, None)[:, None, :], axis=-1)

    p = 1 / (1 + np.exp(-x))
    pos = focal_alpha * (1 - p) ** focal_gamma * np.logaddexp(0, -x)  # BCE(x, 1)
    neg = (1 - focal_alpha) * p ** focal_gamma * np.logaddexp(0, x)  # BCE(x, 0)
    cost_mask = (np.einsum("bqp,bmp->bqm", pos, targets) + np.einsum("bqp,bmp->bqm", neg, 1 - targets)) / (h * w)
    cost_dice = 1 - (2 * np.einsum("bqp,bmp->bqm", p, targets) + 1) / (
        p.sum(-1)[:, :, None] + targets.sum(-1)[:, None, :] + 1)
  return class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice


def make_cost_inputs(seed: int, size: tuple, pred_size: tuple, mask_dtype=bool, batch=2, num_queries=6,
                     num_classes=5, num_slots=4):
  """Random predictions (with some saturated mask logits) and blob-like target masks; padded slots labelled -1."""
  rng = np.random.default_rng(seed)
  pred_logits = (rng.standard_normal((batch, num_queries, num_classes + 1)) * 2).astype(np.float32)
  pred_masks = (rng.standard_normal((batch, num_queries) + pred_size) * 3).astype(np.float32)
  # Saturated logits: a log(sigmoid) that is not written stably gives inf * 0 here.
  pred_masks[:, 0, 0, 0], pred_masks[:, 1, 0, 0], pred_masks[:, 2] = 40.0, -40.0, 25.0
  labels = rng.integers(0, num_classes, (batch, num_slots)).astype(np.int32)
  # Thresholded smooth noise: connected regions rather than salt and pepper, so nearest resizing matters.
  noise = rng.standard_normal((batch, num_slots) + tuple(s // 4 + 1 for s in size))
  masks = np.kron(noise, np.ones((4, 4)))[..., :size[0], :size[1]] > 0.3
  masks[0, 1] = False  # an empty target mask
  valid = np.ones((batch, num_slots), bool)
  valid[1, [0, 2]] = False  # non-prefix padding
  labels[~valid] = -1
  masks[~valid] = False
  return pred_logits, pred_masks, labels, masks.astype(mask_dtype), valid


COST_CASES = [  # (size, pred_size, mask dtype, weights)
    ((32, 32), (8, 8), bool, {}),
    ((20, 20), (6, 6), np.uint8, {}),  # not an integer factor
    ((30, 17), (7, 5), bool, {}),  # neither, and not square
    ((24, 40), (6, 10), np.uint8, dict(class_weight=2.0, mask_weight=5.0, dice_weight=0.5, focal_alpha=0.4,
                                       focal_gamma=1.5)),
]


@pytest.mark.parametrize("size,pred_size,mask_dtype,weights", COST_CASES)
def test_matching_cost_equals_numpy(size, pred_size, mask_dtype, weights):
  pred_logits, pred_masks, labels, masks, valid = make_cost_inputs(sum(size), size, pred_size, mask_dtype)
  ours = jax.device_get(jax.jit(functools.partial(matching_cost, **weights))(
      pred_logits, pred_masks, labels, masks, valid))
  assert ours.dtype == np.float32 and ours.shape == (2, 6, 4)
  theirs = reference_matching_cost(pred_logits, pred_masks, labels, masks, **weights)
  real = np.broadcast_to(valid[:, None, :], ours.shape)
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def transformers_cost(pred_logits, pred_masks, labels, masks, b, real) -> np.ndarray:
  """The default-weight cost of transformers' MaskFormerHungarianMatcher for image b's real columns."""
  target = torch.nn.functional.interpolate(torch.from_numpy(masks[b][real])[:, None].float(),
                                           size=pred_masks.shape[-2:], mode="nearest")[:, 0].flatten(1)
  pred = torch.from_numpy(pred_masks[b]).flatten(1)
  cost_class = -torch.from_numpy(pred_logits[b]).softmax(-1)[:, torch.from_numpy(labels[b][real]).long()]
  cost = 20.0 * pair_wise_sigmoid_focal_loss(pred, target) + cost_class + pair_wise_dice_loss(pred, target)
  return cost.numpy()


@pytest.mark.parametrize("size,pred_size,mask_dtype", [case[:3] for case in COST_CASES])
def test_matching_cost_equals_transformers(size, pred_size, mask_dtype):
  pred_logits, pred_masks, labels, masks, valid = make_cost_inputs(sum(size) + 1, size, pred_size, mask_dtype)
  ours = jax.device_get(jax.jit(matching_cost)(pred_logits, pred_masks, labels, masks, valid))
  for b in range(len(valid)):
    real = np.flatnonzero(valid[b])
    theirs = transformers_cost(pred_logits, pred_masks, labels, masks, b, real)
    np.testing.assert_allclose(ours[b][:, real], theirs, rtol=1e-5, atol=1e-5, err_msg=f"image {b}")


def test_matching_equals_transformers_matcher():
  """End to end: our cost and matcher give assignments as cheap as transformers' MaskFormerHungarianMatcher."""
  pred_logits, pred_masks, labels, masks, valid = make_cost_inputs(3, (32, 32), (8, 8), batch=4, num_queries=10,
                                                                   num_slots=6)
  reference = reference_matching_cost(pred_logits, pred_masks, labels, masks)
  matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
  for backend in ("device", "host"):
    query_index = jax.device_get(jax.jit(lambda *a: match_queries(matching_cost(*a), a[-1], backend=backend))(
        pred_logits, pred_masks, labels, masks, valid))
    for b in range(len(valid)):
      real = np.flatnonzero(valid[b])
      [(rows, cols)] = matcher(torch.from_numpy(pred_masks[b:b + 1]), torch.from_numpy(pred_logits[b:b + 1]),
                               [torch.from_numpy(masks[b][real]).float()], [torch.from_numpy(labels[b][real]).long()])
      theirs = reference[b][rows.numpy(), real[cols.numpy()]].sum()
      ours = reference[b][query_index[b, real], real].sum()
      np.testing.assert_allclose(ours, theirs, rtol=0, atol=FLOAT32_ATOL, err_msg=f"{backend} image {b}")


def test_matching_cost_nonfinite_predictions_give_finite_costs():
  pred_logits, pred_masks, labels, masks, valid = make_cost_inputs(5, (32, 32), (8, 8))
  pred_masks[0, 3, 2, 2] = np.nan
  pred_logits[1, 4, 0] = np.inf
  ours = jax.device_get(jax.jit(matching_cost)(pred_logits, pred_masks, labels, masks, valid))
  assert np.all(np.isfinite(ours))
  theirs = reference_matching_cost(pred_logits, pred_masks, labels, masks)
  real = np.broadcast_to(valid[:, None, :], ours.shape)
  diverged = np.zeros(ours.shape, bool)
  diverged[0, 3], diverged[1, 4] = True, True
  # The other queries are untouched; the diverged ones cost more than any real cost, so they are matched last.
  np.testing.assert_allclose(ours[real & ~diverged], theirs[real & ~diverged], rtol=1e-5, atol=1e-5)
  assert ours[real & diverged].min() > ours[real & ~diverged].max()


# ----------------------------------------------------------------------------------------------------------------
# Both backends on a mesh of 8 CPU devices (in a subprocess: the device count is fixed when JAX initialises).
# ----------------------------------------------------------------------------------------------------------------

MESH_SCRIPT = textwrap.dedent("""
  import sys
  import jax
  import numpy as np
  from maskformer_jax.matching import match_queries

  assert jax.device_count() == 8, jax.devices()
  inputs = np.load(sys.argv[1])
  results = {}
  for axis_type in ("Explicit", "Auto"):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):
      sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
      cost, valid = jax.device_put(inputs["cost"], sharding), jax.device_put(inputs["valid"], sharding)
      for backend in ("host", "device"):
        query_index = jax.jit(lambda c, v: match_queries(c, v, backend=backend))(cost, valid)
        results[f"{axis_type}_{backend}"] = jax.device_get(query_index)
        if axis_type == "Explicit":
          continue
        # One image at a time under vmap, as the trainer's per-image validation loss does (on an Auto mesh): a
        # batch of 1 cannot be split, so each is solved whole.
        one_by_one = jax.jit(jax.vmap(lambda c, v: match_queries(c[None], v[None], backend=backend)[0]))
        results[f"{axis_type}_{backend}_vmapped"] = jax.device_get(one_by_one(cost, valid))
  np.savez(sys.argv[2], **results)
""")


def test_match_queries_on_8_device_mesh(tmp_path):
  cost, valid = make_match_inputs(11, 16, 20, 8, ties=True)
  np.savez(tmp_path / "inputs.npz", cost=cost, valid=valid)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                 env=env, cwd=REPO_ROOT, check=True, timeout=300)
  results = np.load(tmp_path / "out.npz")
  assert len(results.files) == 6
  for key in results.files:
    assert_matching_optimal(cost, valid, results[key])

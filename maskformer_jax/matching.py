"""Bipartite matching of queries to ground-truth segments: an exact in-graph linear sum assignment, MaskFormer's
matching costs, and the batched matcher used by the loss.

The solver is the shortest-augmenting-path method with row and column potentials (the Jonker-Volgenant family that
scipy's LSAP also belongs to), written as one flat `lax.while_loop` whose every step is O(m) vector work:

  * Rows are the smaller side, and only *active* rows are processed. In the batched matcher the rows are target
    slots, so padded slots cost nothing: work grows with the number of real segments, not with `max_segments`.
  * A vectorised greedy pass first assigns every row whose cheapest column no earlier row wants (potentials u =
    row minimum, v = 0 keep the assignment optimal for the rows it covers); only the rest need augmenting paths.
  * Searching and augmenting are phases of the same loop, so under `vmap` the loop runs for the largest total
    step count in the batch, not for the sum over rows of each row's slowest element.
"""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from maskformer_jax.models.layers import nearest_indices

# Non-finite matching costs (a diverged prediction) are replaced by this value: larger than any real cost (the
# class, focal and dice terms are O(1) per unit weight), small enough to keep float32 potentials precise.
NONFINITE_COST = 1e5


# ----------------------------------------------------------------------------------------------------------------
# Linear sum assignment.
# ----------------------------------------------------------------------------------------------------------------

def _assign_columns(cost: jax.Array, active: jax.Array) -> jax.Array:
  """Minimum-cost assignment of the active columns of `cost` `[n, m]` (m <= n) to distinct rows.

  Columns are the side being assigned because that is the batched matcher's layout (queries by targets), which
  saves a transpose. Returns `row4col` int32 `[m]`: the row of each active column, -1 for inactive columns. Costs
  must be finite.

  Variables follow the usual row-wise statement with the roles swapped: `agent` is a column (u its potential), a
  `slot` is a row (v its potential), `agent4slot` the current assignment.
  """
  n, m = cost.shape
  if m == 0:
    return jnp.zeros((0,), jnp.int32)
  dtype = cost.dtype
  agents, slots = jnp.arange(m, dtype=jnp.int32), jnp.arange(n, dtype=jnp.int32)
  slots_and_root = jnp.arange(n + 1, dtype=jnp.int32)
  root = n  # a virtual slot holding the agent whose augmenting path is being searched

  # The active agents in index order (a compaction: argsort is slow on CPU); the loop visits only those.
  num_pending = jnp.sum(active, dtype=jnp.int32)
  position = jnp.where(active, jnp.cumsum(active, dtype=jnp.int32) - 1, m)
  order = jnp.zeros((m,), jnp.int32).at[position].set(agents.astype(jnp.int32), mode="drop")

  state = dict(
      k=jnp.int32(0),                           # position in `order` of the agent being assigned
      j0=jnp.int32(root),                       # current slot of the search / augmentation
      searching=jnp.bool_(True),                # phase: search for a free slot, or augment along the path
      agent4slot=jnp.full((n + 1,), -1, jnp.int32).at[root].set(order[0]),
      u=jnp.zeros((m,), dtype), v=jnp.zeros((n,), dtype),
      minv=jnp.full((n,), jnp.inf, dtype),      # shortest reduced distance to each slot found so far
      way=jnp.full((n,), root, jnp.int32),      # predecessor slot on the shortest-path tree
      used=jnp.zeros((n,), bool),               # slots in the tree
      agent_in_tree=jnp.zeros((m,), bool),
      steps=jnp.int32(0),
  )
  # An agent needs at most n + 1 search and n augment steps; the cap only guards against non-finite input.
  max_steps = (num_pending + 1) * (2 * n + 2)

  def search(s):
    i0 = s["agent4slot"][s["j0"]]
    agent_in_tree = s["agent_in_tree"] | (agents == i0)
    used = s["used"] | (slots == s["j0"])
    reduced = jax.lax.dynamic_index_in_dim(cost, i0, axis=1, keepdims=False) - s["u"][i0] - s["v"]
    better = ~used & (reduced < s["minv"])
    minv = jnp.where(better, reduced, s["minv"])
    way = jnp.where(better, s["j0"], s["way"])
    candidates = jnp.where(used, jnp.inf, minv)
    j1 = jnp.argmin(candidates).astype(jnp.int32)
    delta = candidates[j1]
    return dict(s, j0=j1, searching=s["agent4slot"][j1] >= 0, agent_in_tree=agent_in_tree, used=used, way=way,
                u=s["u"] + jnp.where(agent_in_tree, delta, 0), v=s["v"] - jnp.where(used, delta, 0),
                minv=minv - jnp.where(used, 0, delta))

  def augment(s):
    previous = s["way"][s["j0"]]
    finished = previous == root
    k = s["k"] + finished
    # Slot j0 takes its predecessor's agent; when the path reaches the root, the root takes the next agent, which
    # starts a fresh search.
    agent4slot = jnp.where(slots_and_root == s["j0"], s["agent4slot"][previous], s["agent4slot"])
    agent4slot = jnp.where(finished & (slots_and_root == root), order[jnp.minimum(k, m - 1)], agent4slot)
    return dict(
        s, k=k, j0=previous, searching=finished, agent4slot=agent4slot,
        minv=jnp.where(finished, jnp.inf, s["minv"]), used=s["used"] & ~finished,
        agent_in_tree=s["agent_in_tree"] & ~finished)

  def where(condition, a, b):
    return jax.tree.map(lambda x, y: jnp.where(condition, x, y), a, b)

  def step(s):
    # A step that finds a free slot also takes the first augmenting move, so an agent whose path has one edge
    # (the common case) costs one step.
    s = where(s["searching"], search(s), s)
    s = where(s["searching"], s, augment(s))
    return dict(s, steps=s["steps"] + 1)

  state = jax.lax.while_loop(lambda s: (s["k"] < num_pending) & (s["steps"] < max_steps), step, state)
  assigned = state["agent4slot"][:n]
  row4col = jnp.full((m,), -1, jnp.int32).at[jnp.where(assigned >= 0, assigned, m)].set(slots, mode="drop")
  return jnp.where(active, row4col, -1)


def linear_sum_assignment(cost: jax.Array, maximize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Exact linear sum assignment in pure JAX, with the contract of `scipy.optimize.linear_sum_assignment`.

  Works under `jit` and `vmap`. `cost` is a finite `[n, m]` float matrix (float64 needs x64 enabled); non-finite
  entries give an unspecified assignment rather than an error, since nothing can be raised from inside `jit`.

  Returns `(row_ind, col_ind)`, int32 `[min(n, m)]` each: `row_ind` ascending, and
  `cost[row_ind, col_ind].sum()` minimal (maximal with `maximize=True`).
  """
  cost = jnp.asarray(cost)
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment expects a 2-D cost matrix; got shape {cost.shape}. "
                     "Use jax.vmap for a batch.")
  if not jnp.issubdtype(cost.dtype, jnp.floating):
    cost = cost.astype(jnp.result_type(float))
  n, m = cost.shape
  if maximize:
    cost = -cost
  if n < m:
    return jnp.arange(n, dtype=jnp.int32), _assign_columns(cost.T, jnp.ones((n,), bool))
  row4col = _assign_columns(cost, jnp.ones((m,), bool))
  order = jnp.argsort(row4col)
  return row4col[order], order.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Batched matching of queries to padded targets.
# ----------------------------------------------------------------------------------------------------------------

def _match_on_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """scipy on each `[Q, M]` matrix of `cost` `[..., Q, M]`, with padded columns sliced away first."""
  cost = np.asarray(cost)
  valid = np.broadcast_to(valid, cost.shape[:-2] + valid.shape[-1:])  # vmap may leave valid unbatched
  query_index = np.full(valid.shape, -1, np.int32)
  for index in np.ndindex(valid.shape[:-1]):
    real = np.flatnonzero(valid[index])
    rows, cols = scipy.optimize.linear_sum_assignment(cost[index][:, real])
    query_index[index + (real[cols],)] = rows
  return query_index


def _host_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_match_on_host, out, cost, valid, vmap_method="expand_dims")


_SOLVERS = {"device": jax.vmap(_assign_columns), "host": _host_match}


def _batch_axes(cost: jax.Array, mesh) -> tuple:
  """Mesh axes that shard the batch dimension of `cost`: read off its type when the mesh axes are explicit,
  else the mesh's 'data' axis if it has one."""
  spec = getattr(getattr(jax.typeof(cost), "sharding", None), "spec", None)
  if spec and spec[0] is not None:
    return spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return ("data",) if "data" in mesh.axis_names else ()


def match_queries(cost: jax.Array, valid: jax.Array, *, backend: str = "device") -> jax.Array:
  """Minimum-cost matching of the real targets of each image to distinct queries.

  Args:
    cost: float `[B, Q, M]` matching costs, queries by target slots. Must be finite (see `matching_cost`).
    valid: bool `[B, M]`, which target slots hold real segments. Padded slots are never matched.
    backend: 'device' runs the exact in-graph solver (`linear_sum_assignment`'s core), whose work grows with the
      number of real targets (for TPUs); 'host' runs scipy through `jax.pure_callback` (for CPUs and GPUs). Both
      give assignments of equal (minimal) cost. When a mesh is set (`jax.set_mesh`), either runs inside
      `jax.shard_map` over the batch's mesh axes, so each device solves its own part of the batch
      (when the batch splits evenly over them).

  Returns:
    `query_index` int32 `[B, M]`: the query matched to each real target slot, -1 for padded slots. No gradient.
  """
  if backend not in _SOLVERS:
    raise ValueError(f"Unknown matcher backend {backend!r}; choose one of {tuple(_SOLVERS)}.")
  if cost.ndim != 3 or valid.shape != (cost.shape[0], cost.shape[2]):
    raise ValueError(f"match_queries expects cost [B, Q, M] and valid [B, M]; got {cost.shape} and {valid.shape}.")
  if cost.shape[2] > cost.shape[1]:
    raise ValueError(f"{cost.shape[2]} target slots but only {cost.shape[1]} queries: every real segment needs its "
                     "own query, so set data.max_segments <= model.num_queries.")
  cost, valid = jax.lax.stop_gradient(cost), valid.astype(bool)
  solve = _SOLVERS[backend]
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else _batch_axes(cost, mesh)
  # A batch the axes cannot split evenly (e.g. one image at a time under vmap) is solved whole.
  if not axes or cost.shape[0] % int(np.prod([mesh.shape[axis] for axis in axes])):
    return solve(cost, valid)
  spec = jax.P(axes)
  # check_vma=False: the solver's loop state starts from constants, which the varying-axes check would reject.
  return jax.shard_map(solve, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)(cost, valid)


# ----------------------------------------------------------------------------------------------------------------
# MaskFormer's matching cost.
# ----------------------------------------------------------------------------------------------------------------

def sigmoid_and_softplus(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(sigmoid(x), softplus(x))` from one exp and one log1p; softplus(-x) is then softplus(x) - x. The mask terms
  are elementwise over every pixel of every mask, where transcendentals dominate the time."""
  e = jnp.exp(-jnp.abs(x))
  return jnp.where(x >= 0, 1, e) / (1 + e), jnp.maximum(x, 0) + jnp.log1p(e)


def _pairwise(a: jax.Array, b: jax.Array) -> jax.Array:
  """`[B, Q, P] x [B, M, P] -> [B, Q, M]` in full float32 (TPUs would otherwise multiply in bfloat16)."""
  return jnp.einsum("bqp,bmp->bqm", a, b, precision=jax.lax.Precision.HIGHEST)


def matching_cost(pred_logits: jax.Array, pred_masks: jax.Array, labels: jax.Array, masks: jax.Array,
                  valid: jax.Array, *, class_weight: float = 1.0, mask_weight: float = 20.0, dice_weight: float = 1.0,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> jax.Array:
  """MaskFormer's matching cost, float32 `[B, Q, M]`, with no `[Q, M, H*W]` intermediate.

  Args:
    pred_logits: `[B, Q, K+1]` class logits.
    pred_masks: `[B, Q, h, w]` mask logits (stride 4).
    labels: int `[B, M]` target classes in [0, K).
    masks: bool or uint8 `[B, M, H, W]` target masks at input resolution; brought to `h x w` by nearest.
    valid: bool `[B, M]`; padded columns get a constant cost (they are never matched).

  The cost is class_weight x (-p(label)) + mask_weight x pairwise sigmoid focal (mean over pixels) + dice_weight x
  pairwise dice (+1 smoothing); non-finite entries become `NONFINITE_COST`.
  """
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  cost_class = -jnp.take_along_axis(probs, jnp.clip(labels, 0, probs.shape[-1] - 1)[:, None, :], axis=-1)

  logits = pred_masks.astype(jnp.float32).reshape(*pred_masks.shape[:2], -1)  # [B, Q, P]
  # Targets to the prediction grid by PyTorch's legacy nearest rule, as the reference matcher does.
  rows, cols = (nearest_indices(size, out) for size, out in zip(masks.shape[-2:], pred_masks.shape[-2:]))
  targets = masks[:, :, rows[:, None], cols[None, :]].astype(jnp.float32)
  targets = targets.reshape(*targets.shape[:2], -1)  # [B, M, P]
  num_pixels = logits.shape[-1]

  prob, softplus = sigmoid_and_softplus(logits)
  # Focal terms for target 1 and target 0 at every pixel (BCE is softplus(-x) and softplus(x)); the pairwise sum
  # over pixels of pos * t + neg * (1 - t) is (pos - neg) @ t + sum(neg).
  focal_pos = focal_alpha * (1 - prob) ** focal_gamma * (softplus - logits)
  focal_neg = (1 - focal_alpha) * prob ** focal_gamma * softplus
  cost_focal = (_pairwise(focal_pos - focal_neg, targets) + focal_neg.sum(-1)[..., None]) / num_pixels
  cost_dice = 1 - (2 * _pairwise(prob, targets) + 1) / (prob.sum(-1)[..., None] + targets.sum(-1)[:, None, :] + 1)

  cost = class_weight * cost_class + mask_weight * cost_focal + dice_weight * cost_dice
  cost = jnp.where(jnp.isfinite(cost), cost, NONFINITE_COST)
  return jnp.where(valid[:, None, :], cost, 0.0)

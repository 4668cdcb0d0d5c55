"""Judge heads on hashed sparse features: a linear or one-hidden-layer MLP scorer, trained with optax.

params (plain dict):
  w [dim, H]   sparse-feature embedding (H = 1 for linear)
  v [F, H]     dense-feature weights (features standardised with `mean`/`std`)
  c [H]        hidden bias
  u [H]        output weights (MLP only; linear uses u = 1)
  b []         output bias
The row score is s = u . act(sum_j val_j w[id_j] + dense_std v + c) + b, with
act = identity (linear) or relu (MLP). Pointwise judges read sigmoid(s);
the pairwise judge is Bradley-Terry: P(a beats b) = sigmoid(s_a - s_b), which
is position-free by construction (prefer(a, b) = 1 - prefer(b, a)).

Training is full-batch Adam for a fixed number of steps from a fixed PRNG key
(deterministic on one machine), loss = (optionally pair-weighted) soft-label binary
cross-entropy + l2 on w and v.

Length control (pairwise, `length_control`): the dense length features (log
chars/words/lines, list items, markdown marks) get no l2 penalty, so the length
preference of the labels is absorbed by those few weights rather than spread
over n-grams that co-occur with long answers; the shipped head then has those
rows of v set to 0, i.e. both answers are scored as if they had equal length
(the "length term" is dropped at inference; the AlpacaEval length-controlled
win rate's recipe, applied to the judge itself). `balance` reweights training
pairs so that "the longer answer wins" carries half the total weight and "the
shorter wins" the other half, so length no longer predicts the weighted label.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from h3jax.evaluation.judges.features import Sparse


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  hidden: int = 0  # 0: linear; > 0: MLP width H
  steps: int = 300
  lr: float = 0.05
  l2: float = 1e-4
  seed: int = 0
  length_control: bool = False  # pairwise: free length weights in training, zeroed at inference
  balance: bool = False  # pairwise: equal total weight for longer-preferred and shorter-preferred pairs

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def dense_stats(x: Sparse):
  """Per-feature mean/std of the dense block (std floored so constants stay finite)."""
  return x.dense.mean(0), np.maximum(x.dense.std(0), 1e-3)


def init_head(dim: int, n_dense: int, hp: HeadConfig, mean, std) -> dict:
  H = max(hp.hidden, 1)
  k_w, k_u = jax.random.split(jax.random.key(hp.seed))
  scale = 0.0 if hp.hidden == 0 else 0.1  # MLP needs symmetry breaking; linear starts at 0
  p = {"w": scale * jax.random.normal(k_w, (dim, H), jnp.float32),  # [dim, H]
       "v": jnp.zeros((n_dense, H), jnp.float32), "c": jnp.zeros((H,), jnp.float32),
       "b": jnp.zeros((), jnp.float32),
       "mean": jnp.asarray(mean, jnp.float32), "std": jnp.asarray(std, jnp.float32)}
  if hp.hidden:
    p["u"] = jax.random.normal(k_u, (H,), jnp.float32) / np.sqrt(H)
  return p


def _scores(p, ids, vals, rows, dense_NF, n: int):
  """Row scores [N]."""
  h_NH = jax.ops.segment_sum(vals[:, None] * p["w"][ids], rows, num_segments=n)
  h_NH = h_NH + ((dense_NF - p["mean"]) / p["std"]) @ p["v"] + p["c"]
  if "u" in p:
    return jax.nn.relu(h_NH) @ p["u"] + p["b"]
  return h_NH[:, 0] + p["b"]


@functools.partial(jax.jit, static_argnames=("n",))
def _scores_jit(p, ids, vals, rows, dense_NF, n):
  return _scores(p, ids, vals, rows, dense_NF, n)


def scores(p: dict, x: Sparse) -> np.ndarray:
  """Float scores (logits) [N] of a featurised batch."""
  if x.n == 0:
    return np.zeros(0, np.float32)
  p = {k: jnp.asarray(v) for k, v in p.items()}
  return np.asarray(_scores_jit(p, x.ids, x.vals, x.rows, x.dense, x.n))


def _bce(logit, y, weight=None):
  loss = optax.sigmoid_binary_cross_entropy(logit, y)
  return loss.mean() if weight is None else jnp.sum(weight * loss) / jnp.sum(weight)


def _fit(p, loss_fn, batch: dict, hp: HeadConfig, free_dense=()):
  """Full-batch Adam; `batch` is an argument, not a closure, so XLA does not constant-fold the data."""
  trainable = {k: v for k, v in p.items() if k not in ("mean", "std")}
  fixed = {k: p[k] for k in ("mean", "std")}
  opt = optax.adam(hp.lr)

  pen_F1 = np.ones((p["v"].shape[0], 1), np.float32)
  pen_F1[list(free_dense)] = 0.0  # unpenalised dense rows (length control)

  def total_loss(t, batch):
    return loss_fn({**t, **fixed}, batch) + hp.l2 * (jnp.sum(t["w"] ** 2) + jnp.sum(pen_F1 * t["v"] ** 2))

  @jax.jit
  def run(trainable, batch):
    def step(carry, _):
      t, s = carry
      loss, g = jax.value_and_grad(total_loss)(t, batch)
      upd, s = opt.update(g, s, t)
      return (optax.apply_updates(t, upd), s), loss
    (t, _), losses = jax.lax.scan(step, (trainable, opt.init(trainable)), None, length=hp.steps)
    return t, losses

  t, losses = run(trainable, batch)
  return {k: np.asarray(v) for k, v in {**t, **fixed}.items()}, np.asarray(losses)


def _batch(x: Sparse, **extra) -> dict:
  return dict(ids=jnp.asarray(x.ids), vals=jnp.asarray(x.vals), rows=jnp.asarray(x.rows),
              dense=jnp.asarray(x.dense), **{k: jnp.asarray(v) for k, v in extra.items()})


def train_pointwise(x: Sparse, y, dim: int, hp: HeadConfig):
  """Fits P(label) = sigmoid(score); y [N] soft labels in [0, 1]. Returns (params, losses)."""
  p = init_head(dim, x.dense.shape[1], hp, *dense_stats(x))
  n = x.n

  def loss(p, b):
    return _bce(_scores(p, b["ids"], b["vals"], b["rows"], b["dense"], n), b["y"])
  return _fit(p, loss, _batch(x, y=np.asarray(y, np.float32)), hp)


def balance_weights(y, longer_a) -> np.ndarray:
  """Pair weights [P] giving pairs where the longer answer is preferred (y > 0.5 == longer_a) and pairs
  where the shorter one is (or ties) equal total weight; mean weight 1."""
  agree = (np.asarray(y) > 0.5) == np.asarray(longer_a, bool)
  n, k = len(agree), int(agree.sum())
  if k in (0, n):
    return np.ones(n, np.float32)
  return np.where(agree, n / (2 * k), n / (2 * (n - k))).astype(np.float32)


def length_rows(names) -> list:
  """Indices of the dense features that measure length (neutralised by length control)."""
  return [i for i, nm in enumerate(names) if nm in LENGTH_FEATURES]


LENGTH_FEATURES = ("log_chars", "log_words", "log_lines", "list_items", "md_marks")


def train_pairwise(x: Sparse, a_idx, b_idx, y, dim: int, hp: HeadConfig, *, length_idx=()):
  """Bradley-Terry on rows of x: P(row a_idx[i] beats b_idx[i]) = y[i]. Returns (params, losses).

  With hp.length_control the dense rows `length_idx` train without l2 and are zeroed in the returned
  params (their trained values are returned as params["length_v"] for the card, not used in scoring);
  with hp.balance pairs are weighted by `balance_weights` on dense[:, 0] (log chars)."""
  p = init_head(dim, x.dense.shape[1], hp, *dense_stats(x))
  n = x.n
  a_idx, b_idx = np.asarray(a_idx), np.asarray(b_idx)
  weight = np.ones(len(a_idx), np.float32)
  if hp.balance:
    weight = balance_weights(y, x.dense[a_idx, 0] > x.dense[b_idx, 0])

  def loss(p, b):
    s_N = _scores(p, b["ids"], b["vals"], b["rows"], b["dense"], n)
    return _bce(s_N[b["a"]] - s_N[b["b"]], b["y"], b["weight"])
  free = list(length_idx) if hp.length_control else []
  p, losses = _fit(p, loss, _batch(x, a=a_idx, b=b_idx, y=np.asarray(y, np.float32), weight=weight), hp, free)
  if hp.length_control:
    p["v"] = np.array(p["v"])
    p["length_v"] = p["v"][free].copy()
    p["v"][free] = 0.0
  return p, losses

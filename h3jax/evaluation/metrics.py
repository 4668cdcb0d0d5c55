"""Judge-agnostic metric arithmetic: rates, win rates, length-controlled win rate.

Every metric is reported as a dict {"value", "n", "stderr"} so tables can show
sample sizes and uncertainty next to the number.

Length-controlled win rate (the idea of AlpacaEval LC, Dubois et al. 2024,
reduced to one model against one reference): fit a logistic regression of the
judge's soft preference p_i = P(model beats reference on item i) on the
standardised length difference,

  logit p_i = b0 + b1 * tanh((len_model_i - len_ref_i) / sd(len diff)),

by L2-regularised maximum likelihood (soft targets, Newton's method), then
report sigmoid(b0): the predicted win rate at zero length difference. A judge
that only rewards length gives LC ~ 0.5 however long the model writes; a
judge that ignores length gives LC ~ the raw win rate. AlpacaEval's GLM also
has per-instruction difficulty terms; with a single model pair those are not
identifiable, so they are left out.

Below LC_MIN_N items the two-parameter fit nearly interpolates the items (at
n = 2 exactly), so sigmoid(b0) swings anywhere in (0, 1) and its delta-method
error explodes (a run printed 1.1 ± 2073.1 at n = 2): the value and error are
then NaN, shown as "n/a", and only the raw win rate is reported.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LC_MIN_N = 20  # items below which the length-controlled win rate is not estimated


def summary(values, n=None) -> dict:
  """Mean of per-item values in [0, 1] with its standard error."""
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    return {"value": float("nan"), "n": 0, "stderr": float("nan")}
  se = float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
  return {"value": float(np.mean(v)), "n": int(v.size if n is None else n), "stderr": se}


def rate(flags) -> dict:
  """Fraction of True among per-item booleans."""
  return summary(np.asarray(flags, bool).astype(np.float64))


def win_rate(prob_model_better) -> dict:
  """AlpacaEval win rate: the mean preference for the model (a tie counts 0.5)."""
  p = np.asarray(prob_model_better, np.float64)
  if np.any((p < 0) | (p > 1)):
    raise ValueError("win_rate: preferences must be probabilities in [0, 1]")
  return summary(p)


def _fit_logistic(X_NF, y_N, l2: float, iters: int = 50):
  """Minimise mean soft-label cross-entropy + l2/2 * |w[1:]|^2 by Newton steps."""
  w_F = np.zeros(X_NF.shape[1])
  reg_F = np.full(X_NF.shape[1], l2)
  reg_F[0] = 0.0  # the intercept is not shrunk
  for _ in range(iters):
    p_N = 1.0 / (1.0 + np.exp(-X_NF @ w_F))
    grad_F = X_NF.T @ (p_N - y_N) / len(y_N) + reg_F * w_F
    hess_FF = (X_NF.T * (p_N * (1 - p_N))) @ X_NF / len(y_N) + np.diag(reg_F) + 1e-9 * np.eye(len(w_F))
    step_F = np.linalg.solve(hess_FF, grad_F)
    w_F = w_F - step_F
    if np.max(np.abs(step_F)) < 1e-10:
      break
  return w_F


def lc_features(len_model: Sequence[float], len_ref: Sequence[float]):
  """[N, 2] design matrix: intercept and tanh of the standardised length difference."""
  diff = np.asarray(len_model, np.float64) - np.asarray(len_ref, np.float64)
  sd = np.std(diff)
  z = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)
  return np.stack([np.ones_like(z), z], axis=1)


def length_controlled_win_rate(prob_model_better, len_model, len_ref, *, l2: float = 1e-3) -> dict:
  """sigmoid(b0) of the length-difference GLM above; lengths in characters.

  The returned dict adds "length_coef" (b1) and "raw" (the plain win rate).
  stderr is a delta-method approximation from the same fit.
  """
  p = np.asarray(prob_model_better, np.float64)
  if not (len(p) == len(len_model) == len(len_ref)):
    raise ValueError(f"length_controlled_win_rate: {len(p)} preferences but {len(len_model)} model "
                     f"and {len(len_ref)} reference lengths")
  if len(p) < LC_MIN_N:  # undefined (n = 0) or unstable: see the module docstring
    return {"value": float("nan"), "n": int(len(p)), "stderr": float("nan"), "length_coef": float("nan"),
            "raw": float(np.mean(p)) if len(p) else float("nan")}
  X_NF = lc_features(len_model, len_ref)
  w_F = _fit_logistic(X_NF, np.clip(p, 0.0, 1.0), l2)
  lc = 1.0 / (1.0 + np.exp(-w_F[0]))
  p_N = 1.0 / (1.0 + np.exp(-X_NF @ w_F))
  fisher_FF = (X_NF.T * (p_N * (1 - p_N))) @ X_NF + 1e-9 * np.eye(2)
  var_b0 = float(np.linalg.inv(fisher_FF)[0, 0])
  se = float(lc * (1 - lc) * np.sqrt(max(var_b0, 0.0)))
  if not (np.isfinite(se) and se <= 0.5):  # a rate's error cannot exceed 0.5: the fit is degenerate
    se = float("nan")
  return {"value": float(lc), "n": int(len(p)), "stderr": se,
          "length_coef": float(w_F[1]), "raw": float(np.mean(p))}

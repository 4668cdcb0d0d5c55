"""Float comparisons that hold on any x86-64 CPU (Intel or AMD, AVX2 or AVX-512).

BLAS / XLA:CPU kernels sum in an order that depends on the CPU's vector width and
blocking, so two float32 results of the same math differ by a few ulp of the
*terms* summed, not of the result: an element that is a near-cancelling sum can
differ by much more than eps x its own value. A tolerance is therefore relative
to the magnitude of the data (see docs/testing.md):

  |actual - desired| <= rtol * |desired| + atol_rel * max|desired| + atol

`atol_rel` scales with the array (the size of the terms a cancelling element came
from is about the array's scale); `atol` is only for arrays whose expected value
is all zeros. `rel_err` is the Frobenius-norm relative error, for whole-tensor
checks (SVD / solver outputs) where elementwise bounds say little.
"""

from __future__ import annotations

import jax
import numpy as np


def _f64(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float64)


def assert_close(actual, desired, *, rtol: float, atol_rel: float = 0.0, atol: float = 0.0, err_msg: str = ""):
  """Elementwise |actual - desired| <= rtol |desired| + atol_rel max|desired| + atol."""
  a, d = _f64(actual), _f64(desired)
  scale = float(np.max(np.abs(d))) if d.size else 0.0
  np.testing.assert_allclose(a, d, rtol=rtol, atol=atol_rel * scale + atol, err_msg=err_msg)


def assert_tree_close(actual, desired, **kw):
  """assert_close per leaf (each leaf scaled by its own magnitude)."""
  jax.tree.map(lambda a, d: assert_close(a, d, **kw), actual, desired)


def rel_err(actual, desired) -> float:
  """||actual - desired||_F / ||desired||_F (0 when both are zero)."""
  a, d = _f64(actual), _f64(desired)
  den = float(np.linalg.norm(d.ravel()))
  num = float(np.linalg.norm((a - d).ravel()))
  return num / den if den else num


def max_err_rel(actual, desired) -> float:
  """max|actual - desired| / max|desired|: a max-abs error in units of the data's scale."""
  a, d = _f64(actual), _f64(desired)
  scale = float(np.max(np.abs(d))) if d.size else 0.0
  err = float(np.max(np.abs(a - d))) if d.size else 0.0
  return err / scale if scale else err


def assert_greedy_equal(toks_BN, ref_BN, ref_scores_NBV, *, gap_rel: float = 1e-4):
  """Greedy token streams agree up to the first near-tie of the reference.

  At a step where the reference's two best logits are within gap_rel x max|logit|, a different
  summation order (another CPU) may pick either, and every later token follows from that pick;
  from there on a row is not compared. Returns the number of tokens compared (assert it is > 0).
  """
  toks_BN, ref_BN = np.asarray(toks_BN), np.asarray(ref_BN)
  scores = np.stack([np.asarray(s, np.float64) for s in ref_scores_NBV])  # [N, B, V]
  compared = 0
  for b in range(ref_BN.shape[0]):
    for t in range(ref_BN.shape[1]):
      top2 = np.sort(scores[t, b])[-2:]
      if top2[1] - top2[0] <= gap_rel * np.max(np.abs(scores[t, b])):
        break
      assert toks_BN[b, t] == ref_BN[b, t], f"row {b} step {t}: {toks_BN[b, :t + 1]} vs {ref_BN[b, :t + 1]}"
      compared += 1
  return compared

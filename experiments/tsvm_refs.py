"""Float64 yardsticks of experiments/tsvm_vs_fusionbench.py: FusionBench's TSV-M and Iso-CTS re-computed
from the same float32 task vectors, and the numbers that explain a merge's distance from them.

tests/test_experiment_tsvm_refs.py checks them against h3jax where the answer is well defined.
"""

from __future__ import annotations

import re

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
RANK_RTOL = 1e-5  # h3jax's default rank_rtol for rank_cap='numerical'
# A cap between the LoRA triples and the rounding floor: on the quickstart experts sigma_8 / sigma_1 >=
# 0.2 and sigma_9 / sigma_1 ~ 1e-5 (measured; docs/merging.md), so 1e-3 keeps exactly the LoRA rank.
LORA_RTOL = 1e-3


def polar64(x, partial: bool = False):
  """U V^T of the thin SVD: FusionBench's (torch's U_u @ Vh_u); partial: only the directions with
  s > blocks.POLAR_RANK_RTOL s_1 (h3jax's blocks.polar, which the capped stacks [A | 0] need to be
  well defined)."""
  from h3jax.merging import blocks
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  if partial:
    u = u * (s > blocks.POLAR_RANK_RTOL * s[0]) if s.size and s[0] > 0 else u * 0
  return u @ vt


def tsv_m_delta64(svds, k: int, rank_rtol=None):
  """FusionBench's TSV-M Delta from each task's float64 thin SVD; rank_rtol: h3jax's
  rank_cap='numerical' (triples below rank_rtol * s_1 zeroed, partial polar factors)."""
  us, ss, vs = [], [], []
  for u, s, vt in svds:
    keep = np.ones(k, bool) if rank_rtol is None else s[:k] > rank_rtol * s[0]
    us.append(u[:, :k] * keep), ss.append(s[:k] * keep), vs.append(vt[:k].T * keep)
  partial = rank_rtol is not None
  u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
  return (polar64(u, partial) * s) @ polar64(v, partial).T


def iso_cts_delta64(taus, fraction: float = 0.8):
  """FusionBench's Iso-CTS Delta in float64 (common subspace of sum(tau) + each task's top residual
  directions, full polar factors, every singular value set to the mean)."""
  from h3jax.merging.svd import iso_cts_sizes
  kc, kt = iso_cts_sizes(taus[0].shape, len(taus), fraction)
  u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
  uc = u[:, :kc]
  us, ss, vs = [], [], []
  for t in taus:
    ut, st, vtt = np.linalg.svd(t - uc @ (uc.T @ t), full_matrices=False)
    us.append(ut[:, :kt]), ss.append(st[:kt]), vs.append(vtt[:kt].T)
  us, ss, vs = us + [uc], ss + [s[:kc]], vs + [vt[:kc].T]
  s_all = np.concatenate(ss)
  return (polar64(np.concatenate(us, 1)) * s_all.mean()) @ polar64(np.concatenate(vs, 1)).T


def float32_perturbed(svds, seed: int = 0):
  """tau + E, E Gaussian with ||E||_2 ~ eps32 * s_1(tau) (entries of std eps32 s_1 / (sqrt M + sqrt N)):
  the backward error every float32 SVD of tau commits, so no float32 TSV-M tells tau and tau + E apart."""
  rng = np.random.default_rng(seed)
  out = []
  for u, s, vt in svds:
    m, n = u.shape[0], vt.shape[1]
    out.append((u * s) @ vt + EPS32 * s[0] / (np.sqrt(m) + np.sqrt(n)) * rng.standard_normal((m, n)))
  return out


def cliff_rank(s, k: int) -> int:
  """Where the spectrum drops most, s_r / s_(r+1) largest among the top k: the LoRA rank here."""
  top = s[:k + 1]
  return int(np.argmax(top[:-1] / np.maximum(top[1:], 1e-300))) + 1


def signal_share(delta, svds, rank_rtol: float = LORA_RTOL) -> float:
  """||P_U delta P_V|| / ||delta||, P_U, P_V the projectors on the span of every task's numerically
  non-zero (s > rank_rtol s_1) left / right singular vectors: how much of a merge's delta lies in
  directions the experts actually moved (1 for the capped TSV-M; the rest is set by rounding noise)."""
  def basis(cols):
    q, r = np.linalg.qr(np.concatenate(cols, 1))
    return q[:, np.abs(np.diag(r)) > 1e-10]
  qu = basis([u[:, s > rank_rtol * s[0]] for u, s, _ in svds])
  qv = basis([vt[s > rank_rtol * s[0]].T for _, s, vt in svds])
  d = np.linalg.norm(delta)
  return float(np.linalg.norm(qu.T @ delta @ qv) / d) if d > 0 else 1.0


def reference_stats(b, ms, outs: dict) -> dict:
  """Each output's error against the float64 references, and the spectra that explain them."""
  taus = [m.astype(np.float64) - b for m in ms]
  svds = [np.linalg.svd(t, full_matrices=False) for t in taus]
  k = min(b.shape) // len(ms)
  ref, ref_cap = tsv_m_delta64(svds, k), tsv_m_delta64(svds, k, LORA_RTOL)
  ref_num = tsv_m_delta64(svds, k, RANK_RTOL)
  ref_pert = tsv_m_delta64([np.linalg.svd(t, full_matrices=False) for t in float32_perturbed(svds)], k)
  ref_iso = iso_cts_delta64(taus)
  err = lambda x, r: float(np.linalg.norm(x.astype(np.float64) - b - r) / np.linalg.norm(r))
  st = {f"{n} vs ref": err(outs[n], ref) for n in ("tsv_m", "tsv_m_svd", "resm", "fb_tsv_m") if n in outs}
  st["tsv_m_numerical vs ref_numerical"] = err(outs["tsv_m_numerical"], ref_num)
  st["tsv_m_cap1e-3 vs ref_cap1e-3"] = err(outs["tsv_m_cap1e-3"], ref_cap)
  st.update({f"{n} vs ref_iso": err(outs[n], ref_iso) for n in ("iso_cts", "fb_iso_cts") if n in outs})
  st["ref(tau + E) vs ref"] = err(ref_pert + b, ref)
  st["ref_cap1e-3 vs ref"] = err(ref_cap + b, ref)
  st["signal_share"] = {n: signal_share(d, svds) for n, d in
                        [("ref", ref), ("ref_cap1e-3", ref_cap), ("ref_iso", ref_iso)]
                        + [(n, outs[n].astype(np.float64) - b) for n in ("tsv_m", "fb_tsv_m", "iso_cts",
                                                                       "fb_iso_cts") if n in outs]}
  ranks = [cliff_rank(s, k) for _, s, _ in svds]
  st["cliff_rank"] = ranks
  # How much the tasks' LoRA spans coincide: mean cos^2 of the principal angles per pair (1 = the same
  # span). TSV-M's polar step pushes overlapping task directions apart, into whatever else is kept.
  pairs = [(i, j) for i in range(len(svds)) for j in range(i + 1, len(svds))]
  for side, vecs in (("output side (U)", [u[:, :r] for (u, _, _), r in zip(svds, ranks)]),
                     ("input side (V)", [vt[:r].T for (_, _, vt), r in zip(svds, ranks)])):
    st[f"LoRA span overlap, {side}"] = [float(np.sum((vecs[i].T @ vecs[j]) ** 2) / min(ranks[i], ranks[j]))
                                       for i, j in pairs]
  st["triples_above_1e-5"] = [int(np.sum(s[:k] > RANK_RTOL * s[0])) for _, s, _ in svds]
  st["s_r / s_1"] = [float(s[r - 1] / s[0]) for (_, s, _), r in zip(svds, ranks)]
  st["s_(r+1) / s_1"] = [float(s[r] / s[0]) for (_, s, _), r in zip(svds, ranks)]
  # The rounding of theta_t = fl(theta_0 + tau_t) to float32: iid errors of std ulp(theta_0) / sqrt(12),
  # whose largest singular value is ~ std * (sqrt M + sqrt N).
  ulp_rms = float(np.sqrt(np.mean(np.spacing(np.abs(b)).astype(np.float64) ** 2)))
  st["rounding floor / s_1"] = [ulp_rms / 12 ** 0.5 * sum(d ** 0.5 for d in b.shape) / s[0] for _, s, _ in svds]
  # Spacing of the kept rounding-noise singular values: a float32 SVD (backward error ~ eps32 * s_1)
  # cannot order or orient directions whose gaps are below that.
  st["noise gap / s_1 (median)"] = [float(np.median(-np.diff(s[r:k + 1])) / s[0])
                                    for (_, s, _), r in zip(svds, ranks)]
  st["‖tau‖ / ‖base‖"] = [float(np.linalg.norm(t) / np.linalg.norm(b)) for t in taus]
  return st


def group_of(name: str) -> str:
  if "mlp." in name:
    return "ffn " + re.search(r"mlp\.(\w+)_proj", name).group(1)
  return ("attention" if "self_attn" in name else "embedding" if "embed" in name
          else "norms" if "norm" in name else "other")

"""One-pass counts over |model - base| for the streaming TIES cuts (`tau_select.cc`), called through ctypes.

`brackets` gives, in one pass over a tensor's base and all its models, per model j the counts of u > hi_j,
u == hi_j and u == lo_j and the entries with lo_j < u < hi_j, where u is the bit pattern of |model_j - base|
as float32 (for finite values the unsigned order of the bits is the order of the magnitudes), and the number
of NaN / inf entries in the inputs. `tie_index` finds the need-th entry equal to a threshold. The caller
(`h3jax.merging.streaming.host_topk`) picks each bracket from a sample, exactly as the numpy path does, so
both give the same cut. `supported` says where the kernel applies: float32 or bfloat16 inputs of one dtype,
contiguous, cast to nothing narrower than themselves; elsewhere the numpy path runs.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import ml_dtypes
import numpy as np

from h3jax.kernels import native

_I64, _U32, _PTR = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
_fns: dict = {}


def _fn(kind: str, dtype: np.dtype):
  key = (kind, dtype)
  if key not in _fns:
    f = getattr(native.library(), f"H3jaxTau{kind}{_NAMES[dtype]}")
    f.restype = _I64
    f.argtypes = ([_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR] if kind == "Brackets" else
                  [_PTR, _PTR, _I64, _U32, _I64])
    _fns[key] = f
  return _fns[key]


def supported(model: np.ndarray, base: np.ndarray, load_dtype=None) -> bool:
  """Whether the kernel computes |model - base| exactly as `host_topk` would: the same float32 or bfloat16
  dtype, C-contiguous, and a load dtype (mergekit's `dtype`) that is the inputs' own or float32."""
  dt = model.dtype
  return (dt == base.dtype and dt in _NAMES and model.size == base.size and model.flags.c_contiguous
          and base.flags.c_contiguous and (load_dtype is None or np.dtype(load_dtype) in (dt, np.float32))
          and native.library() is not None)


def _addresses(arrays) -> np.ndarray:
  return np.array([a.ctypes.data for a in arrays], np.uintp)


def brackets(models: Sequence[np.ndarray], base: np.ndarray, lo_M, hi_M, cap_M
             ) -> Optional[tuple[np.ndarray, list, int]]:
  """(counts [M, 3]: #u > hi, #u == hi, #u == lo; per model the u with lo < u < hi in index order; the number
  of NaN / inf entries in base and models) for u = bits(|model_j - base|) as uint32, one pass over all the
  inputs; None where more than cap_M[j] entries of some model fall strictly inside (nothing complete)."""
  M = len(models)
  lo_M, hi_M = np.asarray(lo_M, np.uint32), np.asarray(hi_M, np.uint32)
  cap_M = np.asarray(cap_M, np.int64)
  cands = [np.empty(int(c) + 1, np.uint32) for c in cap_M]  # one spare slot for the branchless append
  counts_M3, n_cand_M, bad = np.zeros((M, 3), np.int64), np.zeros(M, np.int64), np.zeros(1, np.int64)
  ptrs_M, cand_ptrs_M = _addresses(models), _addresses(cands)
  rc = _fn("Brackets", base.dtype)(ptrs_M.ctypes.data, M, base.ctypes.data, base.size, lo_M.ctypes.data,
                                   hi_M.ctypes.data, counts_M3.ctypes.data, cand_ptrs_M.ctypes.data,
                                   cap_M.ctypes.data, n_cand_M.ctypes.data, bad.ctypes.data)
  if rc < 0:
    return None
  return counts_M3, [c[:k] for c, k in zip(cands, n_cand_M)], int(bad[0])


def tie_index(model: np.ndarray, base: np.ndarray, thr: int, need: int) -> int:
  """Flat index of the need-th entry (1-based) whose u equals thr."""
  i = _fn("TieIndex", model.dtype)(model.ctypes.data, base.ctypes.data, model.size, int(thr), int(need))
  if i < 0:
    raise AssertionError("unreachable: fewer tied entries than counted")
  return int(i)

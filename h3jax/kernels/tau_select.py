"""One-pass counts over |model - base| for the streaming TIES cuts (`tau_select.cc`), called through ctypes.

`bracket` gives, in one pass over the two inputs, the counts of u > hi, u == hi and u == lo and the entries
with lo < u < hi, where u is the bit pattern of |model - base| as float32 (for finite values the unsigned order of
the bits is the order of the magnitudes). `tie_index` finds the need-th entry equal to a threshold. The
caller (`h3jax.merging.streaming.host_topk`) picks the bracket from a sample, exactly as the numpy path does,
so both give the same cut. `supported` says where the kernel applies: float32 or bfloat16 inputs of one
dtype, contiguous, cast to nothing narrower than themselves; elsewhere the numpy path runs.
"""

from __future__ import annotations

import ctypes
from typing import Optional

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
    f.argtypes = ([_PTR, _PTR, _I64, _U32, _U32, _PTR, _PTR, _I64] if kind == "Bracket" else
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


def bracket(model: np.ndarray, base: np.ndarray, lo: int, hi: int, cap: int
            ) -> Optional[tuple[int, int, int, np.ndarray]]:
  """(#u > hi, #u == hi, #u == lo, the u with lo < u < hi in index order) for u = bits(|model - base|) as
  uint32; None where more than `cap` fall strictly inside (nothing is then counted)."""
  counts = np.zeros(3, np.int64)
  cand = np.empty(cap + 1, np.uint32)  # one spare slot: the kernel's branchless append writes past the last
  c = _fn("Bracket", model.dtype)(model.ctypes.data, base.ctypes.data, model.size, int(lo), int(hi),
                                  counts.ctypes.data, cand.ctypes.data, cap)
  if c < 0:
    return None
  return int(counts[0]), int(counts[1]), int(counts[2]), cand[:c]


def tie_index(model: np.ndarray, base: np.ndarray, thr: int, need: int) -> int:
  """Flat index of the need-th entry (1-based) whose u equals thr."""
  i = _fn("TieIndex", model.dtype)(model.ctypes.data, base.ctypes.data, model.size, int(thr), int(need))
  if i < 0:
    raise AssertionError("unreachable: fewer tied entries than counted")
  return int(i)

"""Collective bytes of a compiled (after-optimizations) HLO module, per device and per mesh axis.

`collective_bytes(hlo_text, mesh_shape)` walks the module's computations, gives
each one its execution count (a `while` body runs `known_trip_count` times per
run of its parent: the layer scan, the microbatch scan), and sums over every
collective the bytes of its per-device buffer:

  all-reduce, all-to-all, all-gather, collective-permute   result bytes
  reduce-scatter                                           result bytes x group size (its input)

Each collective is attributed to the mesh axes its replica group spans
("expert", "data+expert", ...), from the group holding device 0. This is the
quantity `benchmarks/scale_plan.py` predicts; wire traffic of a ring algorithm
is (g - 1) / g of it (twice that for an all-reduce).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Sequence

import numpy as np

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_INSTR = re.compile(r"^\s+(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z\-]+)\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _bytes(result_type: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(result_type):
    if dt in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _computations(text: str):
  """{name: [instruction lines]} and the ENTRY computation's name."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and line.rstrip().endswith("{"):
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
    elif cur is not None and line.startswith("}"):
      cur = None
    elif cur is not None:
      comps[cur].append(line)
  return comps, entry


def _multiplicity(comps, entry) -> Dict[str, int]:
  """How many times each computation runs per execution of the module."""
  mult = {entry: 1}
  order = [entry]
  i = 0
  while i < len(order):
    c = order[i]
    i += 1
    for line in comps.get(c, ()):
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      for kind, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%([\w.\-]+)", line):
        n = int(trip.group(1)) if (kind == "body" and trip) else 1
        if kind == "body" and not trip:
          raise ValueError(f"while loop without a known trip count in computation {c}")
        mult[callee] = mult.get(callee, 0) + mult[c] * n
        if callee not in order:
          order.append(callee)
  return mult


def _group0(line: str, n_devices: int):
  """Device ids of the replica group holding device 0."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if m:
    return sorted(int(x) for x in m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
  if m:
    ids = np.arange(n_devices).reshape([int(x) for x in m.group(3).split(",")])
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return sorted(ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist())
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
                r"\s*\{([^}]*)\}", line)
  if m:  # mesh[axis sizes], optional device_ids=([iota shape]T(perm)) laying ids out on it, {grouped axes}
    dims = [(a, int(s)) for a, s in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
    grouped = set(re.findall(r"'(\w+)'", m.group(4)))
    ids = np.arange(n_devices)
    if m.group(2):
      ids = ids.reshape([int(x) for x in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape([s for _, s in dims])
    idx = tuple(slice(None) if a in grouped else 0 for a, _ in dims)
    return sorted(ids[idx].reshape(-1).tolist())
  if "replica_groups={}" in line or "replica_groups=" not in line:
    return list(range(n_devices))
  raise ValueError(f"unparsed replica groups in: {line[:300]}")


def axes_of_group(group: Sequence[int], mesh_shape: Mapping[str, int]) -> str:
  """'+'-joined names of the mesh axes along which the group's devices differ (row-major device ids)."""
  names = list(mesh_shape)
  coords = np.stack(np.unravel_index(np.asarray(group), [mesh_shape[a] for a in names]), -1)
  varying = [a for i, a in enumerate(names) if len(set(coords[:, i].tolist())) > 1]
  return "+".join(varying) or "none"


def collective_bytes(text: str, mesh_shape: Mapping[str, int], *, by_op: bool = False) -> Dict[str, int]:
  """{axes: bytes per device per module execution} (keys "axes/op" with by_op)."""
  comps, entry = _computations(text)
  mult = _multiplicity(comps, entry)
  n = math.prod(mesh_shape.values())
  out: Dict[str, int] = {}
  for c, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      op = m.group(2).removesuffix("-start")
      if op not in OPS:
        continue
      group = _group0(line, n)
      b = _bytes(m.group(1))
      if op == "reduce-scatter":
        b *= len(group)
      key = axes_of_group(group, mesh_shape) + (f"/{op}" if by_op else "")
      out[key] = out.get(key, 0) + b * mult.get(c, 0)
  return out

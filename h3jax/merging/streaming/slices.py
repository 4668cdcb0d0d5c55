"""mergekit `slices` with `merge_method: passthrough`: layer stacking / depth up-scaling.

  slices:
    - sources: [{model: A, layer_range: [0, 6]}]
    - sources: [{model: B, layer_range: [2, 8], parameters: {scale: 0.5}}]
  merge_method: passthrough

Output layer j is source layer `layer_range[0] + i` of its slice's one model,
renamed to `model.layers.{j}`, times `scale` if given (mergekit 0.1.5
semantics). The embeddings come from the first slice's model and the final norm
and lm_head from the last slice's (mergekit's pre / post weights; that slice's
`scale` applies to them too, as in mergekit's planner), config.json
from base_model (else the first slice's model) with num_hidden_layers = the
total. Slices with several sources (merging inside a slice) are an error.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import tempfile
from typing import Mapping, Tuple

import numpy as np

from h3jax.hf.st_io import SafetensorsWriter
from h3jax.merging.streaming.inputs import DTYPES, TIED_HEAD, Input, MergeError, write_sidecars
from h3jax.merging.streaming.settings import MergeConfigError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
Slice = Tuple[str, int, int, object]  # (model, start, end, scale or None)
SLICE_KEYS = {"slices", "merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source", "chat_template"}


def parse_slices(raw, where: str, model_path) -> Tuple[Slice, ...]:
  """The `slices` list of a mergekit YAML -> ((model, start, end, scale), ...), checked."""
  if raw.get("merge_method") != "passthrough":
    raise MergeConfigError(f"{where}: 'slices' is implemented for merge_method: passthrough only (layer stacking), "
                           f"got {raw.get('merge_method')!r}")
  extra = sorted(set(raw) - SLICE_KEYS)
  if extra:
    raise MergeConfigError(f"{where}: with 'slices', unknown or unsupported top-level key(s) {extra}")
  slices = raw.get("slices")
  if not isinstance(slices, list) or not slices:
    raise MergeConfigError(f"{where}: 'slices' must be a non-empty list")
  out = []
  for i, s in enumerate(slices):
    if not isinstance(s, Mapping) or set(s) - {"sources"} or not isinstance(s.get("sources"), list):
      raise MergeConfigError(f"{where}: slices[{i}] must be a mapping with a 'sources' list")
    if len(s["sources"]) != 1:
      raise MergeConfigError(f"{where}: slices[{i}] has {len(s['sources'])} sources; merging inside a slice is "
                             f"not implemented (passthrough takes one source per slice)")
    src = s["sources"][0]
    if not isinstance(src, Mapping) or set(src) - {"model", "layer_range", "parameters"} or "model" not in src:
      raise MergeConfigError(f"{where}: slices[{i}].sources[0] takes model, layer_range, parameters")
    lr = src.get("layer_range")
    if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr) and 0 <= lr[0] < lr[1]):
      raise MergeConfigError(f"{where}: slices[{i}] layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
    params = dict(src.get("parameters") or {})
    if set(params) - {"scale"}:
      raise MergeConfigError(f"{where}: slices[{i}] parameters: passthrough takes only 'scale', got {sorted(params)}")
    scale = params.get("scale")
    if scale is not None and not isinstance(scale, (int, float)):
      raise MergeConfigError(f"{where}: slices[{i}] scale must be a number (gradients are not implemented here)")
    out.append((model_path(src["model"], f"{where}: slices[{i}]"), lr[0], lr[1], scale))
  return tuple(out)


def run_slices(spec, out_dir, *, overwrite: bool = False, max_shard_size=None) -> dict:
  """Writes the stacked model; every check before the first byte, the output appears atomically."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise MergeError(f"output folder {out_dir} already exists (pass overwrite=True / --overwrite)")
  paths = list(dict.fromkeys(([spec.base_model] if spec.base_model else []) + [s[0] for s in spec.slices]))
  inputs = {p: Input(p) for p in paths}
  try:
    return _write(spec, inputs, out_dir, max_shard_size or spec.max_shard_size)
  finally:
    for i in inputs.values():
      i.reader.close()


def _layers_of(inp: Input) -> int:
  idx = [int(m.group(1)) for n in inp.reader.keys() for m in [_LAYER.match(n)] if m]
  return max(idx) + 1 if idx else 0


def _write(spec, inputs, out_dir, max_shard_size) -> dict:
  donor = inputs[spec.base_model or spec.slices[0][0]]
  for p, inp in inputs.items():
    if (inp.config is None) != (donor.config is None):
      raise MergeError("cannot mix HF folders and raw safetensors inputs in slices")
    for key in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size"):
      if inp.config and inp.config.get(key) != donor.config.get(key):
        raise MergeError(f"slices: {p} has {key} = {inp.config.get(key)!r} but {donor.path} has "
                         f"{donor.config.get(key)!r}")
  plan = []  # (out name, input, in name, scale)
  first, last = inputs[spec.slices[0][0]], inputs[spec.slices[-1][0]]
  for name in first.reader.keys():  # mergekit reads their parameters (scale) from the first / last slice too
    if not _LAYER.match(name) and "embed_tokens" in name:
      plan.append((name, first, name, spec.slices[0][3]))
  j = 0
  for model, start, end, scale in spec.slices:
    inp = inputs[model]
    n = _layers_of(inp)
    if end > n:
      raise MergeError(f"slices: layer_range [{start}, {end}) is outside {model}'s {n} layers")
    for l in range(start, end):
      for name in inp.reader.keys():
        m = _LAYER.match(name)
        if m and int(m.group(1)) == l:
          plan.append((f"model.layers.{j}.{m.group(2)}", inp, name, scale))
      j += 1
  out_tied = donor.tied
  for name in last.reader.keys():
    if not _LAYER.match(name) and "embed_tokens" not in name and not (out_tied and name == TIED_HEAD):
      plan.append((name, last, name, spec.slices[-1][3]))
  out_np = DTYPES.get(spec.out_dtype or spec.dtype or "")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    writer = SafetensorsWriter(tmp, max_shard_size=max_shard_size, metadata={"h3jax_merge_method": "passthrough"})
    for out_name, inp, name, scale in plan:
      t = inp.get(name)
      if spec.dtype:
        t = t.astype(DTYPES[spec.dtype])
      if scale is not None:
        t = (t.astype(np.float32) * np.float32(scale)).astype(t.dtype)
      writer.add(out_name, t.astype(out_np) if out_np is not None else t)
    writer.close()
    write_sidecars(spec, donor, tmp, out_tied, {})
    if (tmp / "config.json").is_file():
      cfg = json.loads((tmp / "config.json").read_text())
      cfg["num_hidden_layers"] = j
      (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out_dir": str(out_dir), "tensors": len(plan), "num_layers": j, "tensor_stats": {}}

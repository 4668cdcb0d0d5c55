"""Out-of-core merging: (sharded) safetensors in, sharded safetensors out, one tensor at a time.

For each tensor name the driver reads that tensor from the base and every model
(memory-mapped, one at a time), resolves the hyper-parameters for that tensor
(mergekit filters and per-layer gradients, from the layer index in the name),
runs the jitted array-level transform from `h3jax.merging`, casts, hands the
result to a streaming `SafetensorsWriter`, and drops everything. Peak host
memory is therefore about (inputs + 1) x the largest tensor (in float32), not
the model size. Everything is written into a temporary folder next to `out_dir`
and renamed into place at the end, so a failed merge leaves nothing behind.

Inputs are Llama-family HF folders (config.json + model.safetensors or a sharded
index) or raw `.safetensors` files/folders without a config. A tied `lm_head`
(absent from the files) is neither read nor written; an input that lacks
`lm_head.weight` while others have it contributes its `embed_tokens.weight`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil
import tempfile
import zlib
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from h3jax.hf.st_io import SafetensorsReader, SafetensorsWriter
from h3jax.merging import config as mcfg

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Config keys that must agree for two HF folders to be mergeable.
_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
# Non-weight files copied from the tokenizer source (tokenizer_source: base).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")
TIED_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


# Methods whose output is not one model, or that need per-tensor statistics the
# driver does not stream: use the pytree API (h3jax.merging.<method>) for these.
NOT_STREAMABLE = {
    "emr": "EMR returns one task-specific model per input (use h3jax.merging.emr on params trees)",
    "fisher": "Fisher merging needs Fisher statistics (use h3jax.merging.compute_fisher + fisher)",
    "regmean": "RegMean needs Gram matrices (use h3jax.merging.compute_regmean_grams + regmean)",
}
# Transforms that return statistics computed on host (not traceable as a whole): called
# eagerly, their per-tensor kernels are still jitted inside h3jax.merging.
EAGER = ("resm",)


class MergeError(ValueError):
  """Inputs that cannot be merged; raised before anything is written."""


def enable_compilation_cache(path) -> None:
  """Persist compiled per-shape kernels across runs (a model has ~6 distinct tensor shapes, each
  compiled once per method and hyper-parameters; on a busy CPU that is seconds per shape)."""
  path = pathlib.Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def layer_position(name: str, num_layers: int) -> float:
  """mergekit's t: layer / (L - 1) for layer tensors (1 when L == 1), 0 otherwise."""
  m = _LAYER_RE.search(name)
  if m is None:
    return 0.0
  if num_layers <= 1:
    return 1.0
  return int(m.group(1)) / (num_layers - 1)


def tensor_key(seed: int, name: str) -> jax.Array:
  """PRNG key folded with the tensor name: reproducible, independent of tensor order."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


class _Input:
  """One input checkpoint: a tensor reader and (for HF folders) its config.json."""

  def __init__(self, path: str):
    self.path = path
    p = pathlib.Path(path)
    if not p.exists():
      raise MergeError(f"input not found: {path}")
    self.reader = SafetensorsReader(p)
    self.folder = p if p.is_dir() else None
    cfg_file = p / "config.json" if p.is_dir() else None
    self.config = json.loads(cfg_file.read_text()) if cfg_file and cfg_file.exists() else None

  @property
  def tied(self) -> bool:
    return bool(self.config and self.config.get("tie_word_embeddings", False))

  def has(self, name) -> bool:
    return name in self.reader or (name == TIED_HEAD and EMBED in self.reader)

  def shape(self, name):
    return self.reader.shape(self._alias(name))

  def dtype(self, name):
    return self.reader.dtype(self._alias(name))

  def get(self, name):
    return self.reader.get(self._alias(name))

  def _alias(self, name):
    return EMBED if name == TIED_HEAD and name not in self.reader else name


def _check_compatible(inputs: List[_Input]):
  """Same architecture, tensor names and shapes in every input (else one clear error)."""
  ref = inputs[0]
  configs = [i for i in inputs if i.config is not None]
  if configs and len(configs) != len(inputs):
    raise MergeError("cannot mix HF folders (with config.json) and raw safetensors inputs: "
                     + ", ".join(i.path for i in inputs if i.config is None))
  for other in configs[1:]:
    for key in _ARCH_KEYS:
      a, b = configs[0].config.get(key), other.config.get(key)
      if a != b:
        raise MergeError(f"models have different architectures: {key} = {a!r} in {configs[0].path} "
                         f"but {b!r} in {other.path}")
  names = [n for n in ref.reader.keys()]
  ref_set = set(names) - {TIED_HEAD}
  for other in inputs[1:]:
    other_set = set(other.reader.keys()) - {TIED_HEAD}
    if other_set != ref_set:
      missing, extra = sorted(ref_set - other_set)[:3], sorted(other_set - ref_set)[:3]
      raise MergeError(f"models have different tensors: {other.path} lacks {missing} and has extra {extra} "
                       f"compared with {ref.path}")
    for n in names:
      if other.has(n) and other.shape(n) != ref.shape(n):
        raise MergeError(f"models have different shapes for {n}: {ref.shape(n)} in {ref.path} but "
                         f"{other.shape(n)} in {other.path}")


def plan_tensors(inputs: List[_Input], out_tied: bool) -> List[str]:
  """Tensor names to write, in the reference input's order; a tied head is left out."""
  names = list(inputs[0].reader.keys())
  if TIED_HEAD not in names and any(TIED_HEAD in i.reader for i in inputs) and not out_tied:
    names.append(TIED_HEAD)
  if out_tied:
    names = [n for n in names if n != TIED_HEAD]
  return names


def _num_layers(inputs: List[_Input]) -> int:
  cfg = inputs[0].config
  if cfg and "num_hidden_layers" in cfg:
    return int(cfg["num_hidden_layers"])
  idx = [int(m.group(1)) for n in inputs[0].reader.keys() for m in [_LAYER_RE.search(n)] if m]
  return max(idx) + 1 if idx else 0


@functools.lru_cache(maxsize=256)
def _jitted(method: str, kwargs_items: tuple, randomized: bool, load_dtype: Optional[str]) -> Callable:
  """method over one tensor -> (merged float32, stats or None), hyper-parameters static.

  Inputs arrive in their stored dtype and are cast inside the jit: through
  `load_dtype` first (mergekit's `dtype`), then float32.
  """
  from h3jax import merging
  fn = merging.get_method(method)
  kwargs = dict(kwargs_items)
  load_dt = None if load_dtype is None else jnp.dtype(_DTYPES[load_dtype])

  def cast(x):
    x = x if load_dt is None else x.astype(load_dt)
    return x.astype(jnp.float32)

  def run(base_X, models, key):
    base_X = None if base_X is None else cast(base_X)
    models = [cast(m) for m in models]
    extra = {"seed": key} if randomized else {}
    if method in EAGER:
      merged, stats = fn(base_X, models, return_stats=True, **extra, **kwargs)
      return merged, stats.get("", stats)
    return fn(base_X, models, **extra, **kwargs), None

  return run if method in EAGER else jax.jit(run)


def _freeze(v):
  return tuple(_freeze(e) for e in v) if isinstance(v, (list, tuple)) else v


def _method_info(name: str):
  """(callable, accepted keyword names or None, takes a PRNG key)."""
  from h3jax import merging
  fn = merging.get_method(name)
  accepted = mcfg._accepted_kwargs(fn)
  return fn, accepted, accepted is not None and "seed" in accepted


def _kwargs_for(spec: mcfg.MergeSpec, name: str, t: float, accepted) -> Dict:
  shared, per_model = mcfg.resolve_tensor_params(spec, name, t, mcfg.method_defaults(spec))
  kwargs = mcfg.h3jax_kwargs(shared, per_model, spec)
  if spec.flavour == "mergekit" and accepted is not None:
    defaults, model_defaults = mcfg.MERGEKIT_METHODS[spec.method]
    for key in list(kwargs):
      if key not in accepted and key.rstrip("_") not in accepted:
        mk = "lambda" if key == "lambda_" else key
        if mk in defaults and kwargs[key] == defaults[mk] or \
            mk in model_defaults and all(v == model_defaults[mk] for v in kwargs[key]):
          del kwargs[key]  # mergekit's default, which is h3jax's behaviour too
        else:
          raise MergeError(f"{spec.method}: mergekit parameter {mk}={kwargs[key]!r} is not supported by h3jax")
  for d in np.ravel(np.asarray(kwargs.get("density", ()), dtype=object)):
    if d is not None and not (isinstance(d, (int, float)) and 0 < d <= 1):
      raise MergeError(f"density must be in (0, 1], got {d!r} for {name}")
  return kwargs


def run_merge(spec: mcfg.MergeSpec, out_dir, *, overwrite: bool = False, progress: bool = True,
              max_shard_size: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
  """Merge `spec`'s inputs into the HF folder `out_dir`; returns a small report dict.

  Every check (inputs, shapes, architectures, hyper-parameters for every tensor)
  runs before the first byte is written; the output appears atomically.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise MergeError(f"output folder {out_dir} already exists (pass overwrite=True / --overwrite)")
  if spec.dtype is not None and spec.dtype not in _DTYPES:
    raise MergeError(f"unknown dtype {spec.dtype!r}")
  if spec.method in NOT_STREAMABLE:
    raise MergeError(f"{spec.method} cannot be run by the file-to-file driver: {NOT_STREAMABLE[spec.method]}")
  inputs = [_Input(p) for p in spec.inputs]
  base = inputs[0] if spec.base_model else None
  models = inputs[1:] if spec.base_model else inputs
  _check_compatible(inputs)
  ref = inputs[0]
  out_tied = ref.tied if ref.config is not None else TIED_HEAD not in ref.reader
  names = plan_tensors(inputs, out_tied)
  L = _num_layers(inputs)
  fn, accepted, randomized = _method_info(spec.method)

  # Resolve everything first: a bad parameter fails before anything is written.
  plan = []
  for name in names:
    rule = spec.rule_for(name)
    action = rule.action if rule is not None else "merge"
    if action == "merge" and not np.issubdtype(ref.dtype(name), np.floating) \
        and ref.dtype(name) != ml_dtypes.bfloat16:
      action = "base"  # integer buffers are copied
    kwargs = _kwargs_for(spec, name, layer_position(name, L), accepted) if action == "merge" else {}
    if action == "merge" and spec.method == "model_stock" and accepted and "in_axis" in accepted \
        and "in_axis" not in kwargs:
      kwargs["in_axis"] = max(len(ref.shape(name)) - 1, 0)  # mergekit: filters along the last axis
    plan.append((name, action, kwargs))

  plan = _global_pre_passes(spec, plan, base, models)

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    writer = SafetensorsWriter(tmp, max_shard_size=max_shard_size or spec.max_shard_size,
                               metadata={"h3jax_merge_method": spec.method})
    bar = _progress(plan, progress)
    largest, stats = 0, {}
    for name, action, kwargs in bar:
      if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(name, refresh=False)
      if action == "skip":
        continue
      src = base if base is not None else models[0]
      out_np_dtype = _out_dtype(spec, src.dtype(name))
      if action == "base":
        writer.add(name, np.asarray(src.get(name)).astype(out_np_dtype))
        continue
      # Each numpy read is handed to jax at once and dropped.
      base_x = jnp.asarray(base.get(name)) if base is not None else None
      xs = [jnp.asarray(m.get(name)) for m in models]
      largest = max(largest, int(np.prod(xs[0].shape)) * 4)
      jfn = _jitted(spec.method, tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())),
                    randomized, spec.dtype)
      out, tensor_stats = jfn(base_x, xs, tensor_key(spec.seed, name) if randomized else None)
      out = np.asarray(out)
      del base_x, xs
      if tensor_stats and np.all(np.asarray(tensor_stats.get("rank", 1)) > 0):  # SVD-path tensors only
        stats[name] = {k: np.asarray(v).tolist() for k, v in tensor_stats.items()}
        log(f"{spec.method} {name}: " + ", ".join(f"{k}={np.round(v, 4)}" for k, v in stats[name].items()))
      writer.add(name, out.astype(out_np_dtype))
      del out
    writer.close()
    _write_sidecars(spec, ref, tmp, out_tied, stats)
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    for i in inputs:
      i.reader.close()
  return {"out_dir": str(out_dir), "tensors": len([p for p in plan if p[1] != "skip"]),
          "largest_tensor_bytes": largest, "tensor_stats": stats}


def _global_pre_passes(spec, plan, base, models):
  """Whole-model statistics some methods need, computed by streaming passes (O(tensor) memory).

  * ties mode='fusion_bench' (global trim): each model's exact k-th largest |tau| over
    all merged tensors, from two histogram passes over the float32 bit patterns;
  * resm rank_mode='sparsity': the (min, max) layer sparsity over all 2-D tensors.
  """
  merged = [(n, kw) for n, a, kw in plan if a == "merge"]
  if not merged or base is None:
    return plan
  kw0 = merged[0][1]
  extra = {}
  if spec.method == "ties" and kw0.get("mode") == "fusion_bench" and \
      kw0.get("trim_scope", "global") == "global" and "thresholds" not in kw0:
    density = kw0.get("density", 1.0)
    density = density if isinstance(density, tuple) else (density,) * len(models)
    extra["thresholds"] = _streaming_thresholds([n for n, _ in merged], base, models, density)
  if spec.method == "resm" and kw0.get("rank_mode") == "sparsity" and "sp_range" not in kw0:
    from h3jax.merging.resm import layer_sparsity
    vals = []
    for name, kw in merged:
      if len(base.shape(name)) == 2 and 0 not in base.shape(name):
        d = np.stack([m.get(name).astype(np.float32) for m in models]) - base.get(name).astype(np.float32)
        vals.append(float(layer_sparsity(jnp.asarray(d), kw.get("eps_sp", 1e-3))))
    extra["sp_range"] = (min(vals), max(vals)) if vals else (0.0, 0.0)
  if not extra:
    return plan
  return [(n, a, {**kw, **extra} if a == "merge" else kw) for n, a, kw in plan]


def _streaming_thresholds(names, base, models, density) -> tuple:
  """FusionBench's per-model threshold: the (n - int(n * density))-th smallest |tau| over
  the whole model, exactly, in two passes (|tau| as float32 bits sorts like uint32)."""
  n_models = len(models)
  total = 0
  hi = np.zeros((n_models, 1 << 16), np.int64)
  for name in names:
    b = base.get(name).astype(np.float32)
    total += b.size
    for i, m in enumerate(models):
      bits = np.abs(m.get(name).astype(np.float32) - b).view(np.uint32).ravel()
      hi[i] += np.bincount(bits >> 16, minlength=1 << 16)
  targets, bins = [], []
  for i in range(n_models):
    k = max(total - int(total * density[i]), 1)
    c = np.cumsum(hi[i])
    bin_i = int(np.searchsorted(c, k))
    targets.append(k - (int(c[bin_i - 1]) if bin_i else 0))
    bins.append(bin_i)
  lo = np.zeros((n_models, 1 << 16), np.int64)
  for name in names:
    b = base.get(name).astype(np.float32)
    for i, m in enumerate(models):
      bits = np.abs(m.get(name).astype(np.float32) - b).view(np.uint32).ravel()
      sel = bits[(bits >> 16) == bins[i]]
      lo[i] += np.bincount(sel & 0xFFFF, minlength=1 << 16)
  out = []
  for i in range(n_models):
    j = int(np.searchsorted(np.cumsum(lo[i]), targets[i]))
    out.append(float(np.array([(bins[i] << 16) | j], np.uint32).view(np.float32)[0]))
  return tuple(out)


def _out_dtype(spec: mcfg.MergeSpec, src_dtype) -> np.dtype:
  name = spec.out_dtype or spec.dtype
  if name is not None:
    return np.dtype(_DTYPES[name])
  return np.dtype(src_dtype)


def _progress(plan, enabled):
  if not enabled:
    return plan
  from tqdm.auto import tqdm
  return tqdm(plan, desc="merge", unit="tensor")


def _write_sidecars(spec: mcfg.MergeSpec, ref: _Input, tmp: pathlib.Path, out_tied: bool, stats: dict):
  """config.json (dtype updated), generation config and the base's tokenizer files."""
  if ref.config is not None:
    cfg = dict(ref.config)
    dt = spec.out_dtype or spec.dtype
    if dt is not None:
      cfg["dtype"] = dt
      cfg.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  names = ("generation_config.json",) + (_TOKENIZER_FILES if spec.tokenizer_source == "base" else ())
  for fname in names if ref.folder is not None else ():
    src = ref.folder / fname
    if src.is_file():
      shutil.copy2(src, tmp / fname)
  stats = {n: {k: (None if isinstance(v, float) and v != v else v) for k, v in s.items()}
           for n, s in stats.items()}  # NaN (undefined statistic) -> null: strict JSON
  (tmp / "h3jax_merge.json").write_text(json.dumps({
      "merge_method": spec.method, "base_model": spec.base_model, "models": list(spec.models),
      "flavour": spec.flavour, "seed": spec.seed, "dtype": spec.dtype, "out_dtype": spec.out_dtype,
      "tensor_stats": stats,
  }, indent=2) + "\n")

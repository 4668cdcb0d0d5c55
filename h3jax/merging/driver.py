"""Out-of-core merging: (sharded) safetensors in, sharded safetensors out, one tensor at a time.

For each tensor name the driver reads that tensor from the base and every model
(one at a time), resolves the hyper-parameters for that tensor (mergekit filters
and per-layer gradients, from the layer index in the name), runs the jitted
array-level transform from `h3jax.merging` (compiled once per tensor shape and
hyper-parameters), casts, hands the result to a streaming `SafetensorsWriter`,
and drops everything. Peak host memory is therefore a few float32 copies of the largest
tensor (`tensor_memory_bytes`: (inputs + 1) times a measured per-method factor), not the model size. Everything is written into a
temporary folder next to `out_dir` and renamed into place at the end, so a
failed merge leaves nothing behind (`h3jax.io_atomic`: the output may not be, hold or lie in
an input; the old output is replaced only once the new one is complete). Inputs: `h3jax.merging.inputs`.

Every input tensor and every merged tensor is checked for NaN/inf: by default a
non-finite one stops the merge (`MergeError` naming the tensor and the method,
nothing written); `nonfinite='keep_base'` writes the base tensor there instead
and lists it in the report (`nonfinite_kept_base`).
"""

from __future__ import annotations

import collections
import functools
import inspect
import pathlib
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from h3jax import compile_cache, io_atomic
from h3jax.hf.st_io import SafetensorsWriter
from h3jax.merging import config as mcfg
from h3jax.merging import host_topk, vocab
from h3jax.merging.inputs import (DTYPES, EMBED, TIED_HEAD, Input, MergeError,  # noqa: F401
                                  check_compatible, layer_position, num_layers, plan_tensors,
                                  tokenizer_input, write_sidecars)
from h3jax.merging.prepass import global_pre_passes, needs_pre_pass

# Methods whose output is not one model, or that need per-tensor statistics the
# driver does not stream: use the pytree API (h3jax.merging.<method>) for these.
NOT_STREAMABLE = {
    "emr": "EMR returns one task-specific model per input (use h3jax.merging.emr on params trees)",
    "fisher": "Fisher merging needs Fisher statistics (use h3jax.merging.compute_fisher + fisher)",
    "regmean": "RegMean needs Gram matrices (use h3jax.merging.compute_regmean_grams + regmean)",
}
NONFINITE_POLICIES = ("error", "keep_base")

# Transforms that return statistics computed on host (not traceable as a whole): called
# eagerly, their per-tensor kernels are still jitted inside h3jax.merging.
EAGER = ("resm",)


# Host memory of one tensor's merge, in units of (inputs + 1) float32 copies of it: the inputs, the
# output, and what the kernel and the loader add (a numpy read while it is copied to jax; TIES's host
# top-k deltas; DARE's random bits and rescaling sums). Measured as the peak anonymous RSS growth of a
# merge of one 128 MiB tensor with 4 inputs (benchmarks/merge_memory.py, README "Merging"); methods
# not measured are assumed to need twice the inputs. The scheduler admits tensors by this cost.
# Measured (this CPU, 4 inputs of 128 MiB; budgeted): linear 782 (960), TIES 1174 (1408), DARE-TIES
# 1985 (2240) MiB; the AMD host measured 888 / 1155 / 1926.
MEMORY_FACTOR = {"linear": 1.5, "task_arithmetic": 1.5, "ties": 2.2, "dare_ties": 3.5}
DEFAULT_MEMORY_FACTOR = 2.0


def tensor_memory_bytes(method: str, n_inputs: int, shape) -> int:
  """Host bytes the driver budgets for merging one tensor of `shape` (see MEMORY_FACTOR)."""
  factor = MEMORY_FACTOR.get(method, DEFAULT_MEMORY_FACTOR)
  return int(factor * (n_inputs + 1) * _f32_bytes(shape))


def enable_compilation_cache(path) -> None:
  """Persist compiled per-shape kernels across runs (a model has ~6 distinct tensor shapes, each
  compiled once per method and hyper-parameters; on a busy CPU that is seconds per shape)."""
  compile_cache.enable(path, min_compile_secs=0.0)  # merge kernels compile in ~0.2 s each


def tensor_key(seed: int, name: str) -> jax.Array:
  """PRNG key folded with the tensor name: reproducible, independent of tensor order."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


@functools.lru_cache(maxsize=256)
def _jitted(method: str, kwargs_items: tuple, randomized: bool, load_dtype: Optional[str]) -> Callable:
  """method over one tensor -> (merged float32, stats or None), hyper-parameters static.

  Inputs arrive in their stored dtype and are cast inside the jit: through
  `load_dtype` first (mergekit's `dtype`), then float32.
  """
  from h3jax import merging
  fn = merging.get_method(method)
  kwargs = dict(kwargs_items)
  load_dt = None if load_dtype is None else jnp.dtype(DTYPES[load_dtype])

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
  _check_weight_sum(spec.method, kwargs, len(spec.models), name)
  return kwargs


# Methods that divide by sum(weight) when normalizing, and their `normalize` default.
_NORMALIZING = {"linear": True, "task_arithmetic": False}


def _check_weight_sum(method: str, kwargs: dict, n_models: int, name: str) -> None:
  """A normalized linear / task-arithmetic merge whose weights sum to zero divides by zero
  (linear: every output value is +-inf or NaN); refuse it while planning."""
  if method not in _NORMALIZING or not kwargs.get("normalize", _NORMALIZING[method]):
    return
  w = kwargs.get("weight", 1.0)
  total = float(np.sum(np.asarray(w, np.float64))) * (n_models if np.ndim(w) == 0 else 1)
  if abs(total) < 1e-8:
    raise MergeError(f"{method} with normalize: the weights {list(np.ravel(w))} of {name!r} sum to "
                     f"{total:g}, so the normalized merge divides by zero; use weights with a non-zero sum "
                     f"or normalize: false")


def _per_model(kwargs: Dict, key: str, fn, n: int) -> list:
  """kwargs[key] (or fn's default) as one value per model."""
  param = inspect.signature(fn).parameters.get(key)
  v = kwargs.get(key, None if param is None else param.default)
  return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _check_ranges(method: str, fn, kwargs: Dict, n_models: int, name: str):
  """Knob ranges the kernels would only reject mid-merge (after bytes were written)."""
  if method in ("breadcrumbs", "breadcrumbs_ties"):
    for g in _per_model(kwargs, "gamma", fn, n_models):
      if not (isinstance(g, (int, float)) and 0 <= g < 1):
        raise MergeError(f"{method}: gamma (the fraction of largest task-vector entries dropped) must be "
                         f"in [0, 1), got {g!r} for {name}")
  if method in ("della", "della_linear"):
    for d, e in zip(_per_model(kwargs, "density", fn, n_models), _per_model(kwargs, "epsilon", fn, n_models)):
      if not (isinstance(e, (int, float)) and e >= 0 and 0 < d - e and d + e < 1):
        raise MergeError(f"{method}: epsilon must be >= 0 with density +/- epsilon in (0, 1) (keep "
                         f"probabilities), got density={d}, epsilon={e} for {name}")


def run_merge(spec: mcfg.MergeSpec, out_dir, *, overwrite: bool = False, progress: bool = True,
              max_shard_size: Optional[str] = None, log: Callable[[str], None] = print,
              devices: Optional[Sequence] = None, nonfinite: str = "error") -> dict:
  """Merge `spec`'s inputs into the HF folder `out_dir`; returns a small report dict.

  Every check (inputs, shapes, architectures, hyper-parameters for every tensor)
  runs before the first byte is written; the output appears atomically.
  `devices`: merged tensors go round-robin to these (default: the first local
  device), so per-tensor kernels run concurrently, one per device: for hosts where one
  kernel does not fill the machine (many cores, several accelerators). On a 2-core CPU the
  kernels already use both cores and two devices are slower.
  `nonfinite`: 'error' (a NaN/inf in an input or a merged tensor stops the merge, nothing
  written) | 'keep_base' (that tensor is the base's, else the first model's, and the report's
  `nonfinite_kept_base` lists it; a non-finite base tensor is still an error).
  """
  if nonfinite not in NONFINITE_POLICIES:
    raise MergeError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
  if spec.slices:  # passthrough layer stacking: a renaming copy, no per-tensor kernel
    from h3jax.merging import slices
    return slices.run_slices(spec, out_dir, overwrite=overwrite, max_shard_size=max_shard_size)
  devices = list(devices) if devices else jax.local_devices()[:1]
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise MergeError(f"output folder {out_dir} already exists (pass overwrite=True / --overwrite)")
  tok_src = () if spec.tokenizer_source in (None, *vocab.SOURCES) else (vocab.source_folder(spec.tokenizer_source),)
  try:  # before reading anything: --out must not be, hold or lie in an input, nor be someone's folder
    io_atomic.check_not_overlapping(out_dir, spec.inputs + tok_src)
    io_atomic.check_replaceable(out_dir)
  except io_atomic.UnsafeOutputError as e:
    raise MergeError(str(e)) from None
  if spec.dtype is not None and spec.dtype not in DTYPES:
    raise MergeError(f"unknown dtype {spec.dtype!r}")
  if spec.method in NOT_STREAMABLE:
    raise MergeError(f"{spec.method} cannot be run by the file-to-file driver: {NOT_STREAMABLE[spec.method]}")
  inputs = [Input(p) for p in spec.inputs]
  base = inputs[0] if spec.base_model else None
  models = inputs[1:] if spec.base_model else inputs
  try:  # vocabularies that differ: every vocabulary-indexed tensor re-indexed by token string
    align = vocab.build(spec, inputs, spec.tokenizer_base)
  except ValueError as e:
    raise MergeError(str(e)) from None
  check_compatible(inputs, vocab.VOCAB_AXES if align is not None else None)
  ref = inputs[0]
  out_tied = ref.tied if ref.config is not None else TIED_HEAD not in ref.reader
  names = plan_tensors(inputs, out_tied)
  L = num_layers(inputs)
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
    if action == "merge":
      _check_ranges(spec.method, fn, kwargs, len(models), name)
    if action == "merge" and spec.method == "model_stock" and accepted and "in_axis" in accepted \
        and "in_axis" not in kwargs:
      kwargs["in_axis"] = max(len(ref.shape(name)) - 1, 0)  # mergekit: filters along the last axis
    plan.append((name, action, kwargs))

  if align is not None and needs_pre_pass(spec, plan, base):
    raise MergeError(f"{spec.method} with these parameters needs whole-model passes, which do not align "
                     f"vocabularies; merge inputs that share a vocabulary")
  plan = global_pre_passes(spec, plan, base, models)
  tok = tokenizer_input(inputs) if align is None else None

  try:
    # Built in a sibling temp folder, then swapped in (old aside -> new in -> old deleted).
    with io_atomic.output_dir(out_dir, overwrite=True, inputs=spec.inputs) as tmp:
      writer = SafetensorsWriter(tmp, max_shard_size=max_shard_size or spec.max_shard_size,
                                 metadata={"h3jax_merge_method": spec.method})
      stats, kept = {}, []
      largest, budget = _stream_tensors(spec, plan, base, models, devices, randomized, writer, stats, log,
                                        _progress(plan, progress), nonfinite, kept, align)
      writer.close()
      write_sidecars(spec, ref, tmp, out_tied, stats, tok, align)
  finally:
    for i in inputs:
      i.reader.close()
  return {"out_dir": str(out_dir), "tensors": len([p for p in plan if p[1] != "skip"]),
          "largest_tensor_bytes": largest, "memory_budget_bytes": budget, "tensor_stats": stats,
          "nonfinite_kept_base": kept}


def _stream_tensors(spec, plan, base, models, devices, randomized, writer, stats, log, bar,
                    nonfinite="error", kept=None, align=None) -> int:
  """Reads, merges and writes the planned tensors in order; returns (the largest merged tensor's
  float32 bytes, the memory budget).

  Three stages overlap: two reader threads load tensors (and, for mergekit TIES, find the host
  top-k cuts), the caller's thread dispatches each loaded tensor's kernel to the next device,
  and a writer thread waits for the result and writes it. A tensor counts
  `tensor_memory_bytes` (inputs, output and the kernel's intermediates) from load to written,
  and tensors are admitted while the sum fits in len(devices) x that of the largest: small
  tensors pipeline deeply, the largest runs alone, and host memory stays within the budget
  (XLA on CPU may alias numpy inputs until the kernel that reads them is done).
  `align` (h3jax.merging.vocab.Alignment): vocabulary-indexed tensors are re-indexed as they are read.
  """
  src = base if base is not None else models[0]
  srcs = ([base] if base is not None else []) + list(models)
  aligned = (lambda name: False) if align is None else align.applies
  shape = lambda name: align.shape(name, src.shape(name)) if aligned(name) else src.shape(name)  # noqa: E731
  cost = {name: (tensor_memory_bytes(spec.method, len(srcs), shape(name)) if action == "merge" else
                 2 * _f32_bytes(shape(name)))  # a copied tensor: read + cast
          for name, action, _ in plan if action != "skip"}
  budget = len(devices) * max(cost.values(), default=0)
  load_dt = None if spec.dtype is None else np.dtype(DTYPES[spec.dtype])
  loading, writing = collections.deque(), collections.deque()  # (name, future), oldest first
  in_flight, n_merged, largest = 0, 0, 0

  def fallback(name, why):  # the base tensor where a merge is not finite, or a clear error
    ref = np.asarray(align.tensors(name, [i.get(name) for i in srcs], load_dt)[0] if aligned(name) else
                     src.get(name))
    if nonfinite != "keep_base" or not _finite(ref):
      raise MergeError(f"{spec.method}: {why}; nothing was written" + (
          " (pass --nonfinite=keep_base to keep the base tensor there)" if nonfinite == "error"
          else f" (the {'base' if base is not None else 'first model'}'s tensor is not finite either)"))
    log(f"warning: {spec.method}: {why}; kept the {'base' if base is not None else 'first model'}'s tensor")
    kept.append(name)
    return ref

  def checked(inp, name):  # every input tensor is checked on the reader thread, as it is read
    x = inp.get(name)
    if not _finite(x):
      raise _NonFinite(f"input tensor {name!r} of {inp.path} has {_count_nonfinite(x)}")
    return x

  def read(name, to=lambda x: x):  # every input's tensor, in input order
    if aligned(name):
      return [to(x) for x in align.tensors(name, [checked(i, name) for i in srcs], load_dt)]
    return [to(checked(i, name)) for i in srcs]

  def load(name, action, kwargs, dev):  # on a reader thread
    out_dt = _out_dtype(spec, src.dtype(name), action, [i.dtype(name) for i in srcs])
    try:
      if action == "base":
        x = read(name)[0] if aligned(name) else checked(src, name)
        return out_dt, np.asarray(x).astype(out_dt), None
      fast = host_topk.ties_hparams(spec.method, kwargs, len(models)) if base is not None else None
      # Numpy reads stay on the host only where the host needs them (the TIES cuts); otherwise
      # each is handed to jax at once and dropped.
      to_jax = (lambda x: x) if fast is not None else (lambda x: jnp.asarray(x, device=dev))
      arrays = read(name, to_jax)
    except _NonFinite as e:
      return out_dt, fallback(name, str(e)).astype(out_dt), None
    base_x, xs = (arrays[0], arrays[1:]) if base is not None else (None, arrays)
    cuts = None if fast is None else host_topk.host_cuts(base_x, xs, dict(fast)["density"], load_dt)
    return out_dt, None, (kwargs, base_x, xs, fast, cuts, dev)

  def dispatch():
    name, fut = loading.popleft()
    out_dt, copied, job = fut.result()  # re-raises a read error here
    if job is None:
      result = (copied, None)
    else:
      kwargs, base_x, xs, fast, cuts, dev = job
      del job
      with jax.default_device(dev):
        result = _merge_tensor(spec, name, kwargs, base_x, xs, randomized, fast, cuts)
      del base_x, xs
    writing.append((name, write_pool.submit(_finish, writer, stats, log, spec, name, out_dt, result,
                                            fallback)))

  def retire():
    nonlocal in_flight
    name, fut = writing.popleft()
    fut.result()  # re-raises a merge or write error here
    in_flight -= cost[name]

  with ThreadPoolExecutor(2, thread_name_prefix="merge-read") as readers, \
      ThreadPoolExecutor(1, thread_name_prefix="merge-write") as write_pool:
    for name, action, kwargs in bar:
      if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(name, refresh=False)
      if action == "skip":
        continue
      while (loading or writing) and in_flight + cost[name] > budget:
        dispatch() if loading else retire()
      dev = devices[n_merged % len(devices)]
      if action != "base":
        n_merged, largest = n_merged + 1, max(largest, _f32_bytes(shape(name)))
      loading.append((name, readers.submit(load, name, action, kwargs, dev)))
      in_flight += cost[name]
      while loading and loading[0][1].done():
        dispatch()
    while loading:
      dispatch()
    while writing:
      retire()
  return largest, budget


def _merge_tensor(spec, name, kwargs, base_x, xs, randomized, fast, cuts=None):
  """Dispatches the merge of one tensor (asynchronously); returns (merged, stats or None).

  fast: `host_topk.ties_hparams` for mergekit TIES (numpy inputs and their `host_topk.host_cuts`:
  the rest runs in one jitted kernel), else None (the method's kernel).
  """
  if fast is not None:
    return host_topk.ties_kernel(fast, spec.dtype)(base_x, xs, *cuts), None
  jfn = _jitted(spec.method, tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())),
                randomized, spec.dtype)
  return jfn(base_x, xs, tensor_key(spec.seed, name) if randomized else None)


class _NonFinite(Exception):
  pass


def _finite(x) -> bool:
  x = np.asarray(x)
  return not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16) or \
      bool(np.isfinite(x).all())


def _count_nonfinite(x) -> str:
  x = np.asarray(x)
  return f"{int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} inf entries"


def _finish(writer, stats, log, spec, name, out_np_dtype, result, fallback=None):
  """Waits for one merged tensor, checks it is finite, records its statistics and writes it."""
  out, tensor_stats = result
  out = np.asarray(out)
  if spec.method == "multislerp" and np.isnan(out).any():  # the kernel's mark: mergekit raises here
    raise MergeError(f"multislerp: the weighted sum of the unit task vectors of {name!r} is zero "
                     f"(antipodal vectors with balancing weights); use different weights")
  out = out.astype(out_np_dtype, copy=False)
  if not _finite(out):  # NaN/inf from the method, or a cast that overflows (float16)
    why = f"merged tensor {name!r} has {_count_nonfinite(out)}"
    if fallback is None:
      raise MergeError(f"{spec.method}: {why}; nothing was written")
    out, tensor_stats = fallback(name, why).astype(out_np_dtype), None
  if tensor_stats and np.all(np.asarray(tensor_stats.get("rank", 1)) > 0):  # SVD-path tensors only
    stats[name] = {k: np.asarray(v).tolist() for k, v in tensor_stats.items()}
    log(f"{spec.method} {name}: " + ", ".join(f"{k}={np.round(v, 4)}" for k, v in stats[name].items()))
  writer.add(name, out.astype(out_np_dtype, copy=False))


def _f32_bytes(shape) -> int:
  return 4 * int(np.prod(shape, dtype=np.int64))


# mergekit 0.1.5 methods whose kernels promote a half-precision input to float32 (a float32
# mask or ratio enters the arithmetic: arcee_fusion's `fusion_mask.float()`, ramplus_tl's rho);
# mergekit writes the kernel's dtype when out_dtype is unset.
MERGEKIT_FLOAT32_RESULT = ("arcee_fusion", "ramplus_tl")


def _out_dtype(spec: mcfg.MergeSpec, src_dtype, action: str = "merge", in_dtypes=()) -> np.dtype:
  """The written dtype: out_dtype, else (mergekit YAML) what mergekit 0.1.5 writes: its kernel's
  result dtype for inputs cast to `dtype` or, unset, promoted to a common dtype (mixed half
  dtypes -> float32); else (h3jax) dtype, else the base's (or first model's) dtype."""
  if spec.out_dtype is not None:
    return np.dtype(DTYPES[spec.out_dtype])
  if spec.flavour == "mergekit" and action == "merge":
    if spec.dtype is not None:
      dt = np.dtype(DTYPES[spec.dtype])
    else:
      dts = {np.dtype(d) for d in in_dtypes} or {np.dtype(src_dtype)}
      dt = dts.pop() if len(dts) == 1 else np.dtype(np.float32)
    if spec.method in MERGEKIT_FLOAT32_RESULT and dt.itemsize < 4:
      dt = np.dtype(np.float32)
    return dt
  if spec.dtype is not None:
    return np.dtype(DTYPES[spec.dtype])
  return np.dtype(src_dtype)


def _progress(plan, enabled):
  if not enabled:
    return plan
  from tqdm.auto import tqdm
  return tqdm(plan, desc="merge", unit="tensor")



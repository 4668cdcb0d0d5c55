"""Out-of-core merging: (sharded) safetensors in, sharded safetensors out, one tensor at a time.

For each tensor name the driver reads that tensor from the base and every model
(one at a time), resolves the hyper-parameters for that tensor (mergekit filters
and per-layer gradients, from the layer index in the name), runs the jitted
array-level transform from `h3jax.merging` (compiled once per tensor shape and
hyper-parameters), casts, hands the result to a streaming `SafetensorsWriter`,
and drops everything. Peak host memory is therefore a few float32 copies of the largest
tensor (`tensor_memory_bytes`: (inputs + 1) times a measured per-method factor), not the model size. Everything is
written into a temporary folder next to `out_dir` and renamed into place at the end, so a
failed merge leaves nothing behind (`h3jax.io_atomic`: the output may not be, hold or lie in
an input; the old output is replaced only once the new one is complete). Inputs: `h3jax.merging.streaming.inputs`.

Every input tensor and every merged tensor is checked for NaN/inf: by default a
non-finite one stops the merge (`MergeError` naming the tensor and the method,
nothing written); `nonfinite='keep_base'` writes the base tensor there instead
and lists it in the report (`nonfinite_kept_base`).
"""

from __future__ import annotations

import collections
import functools
import pathlib
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from h3jax import compile_cache, io_atomic
from h3jax import progress as progress_lib
from h3jax.hf.st_io import SafetensorsWriter
from h3jax.merging.streaming import host_topk, vocab
from h3jax.merging.streaming.inputs import (DTYPES, TIED_HEAD, Input, MergeError, check_compatible, num_layers,
                                            plan_tensors, tokenizer_input, write_sidecars)
from h3jax.merging.streaming.plan import (f32_bytes, method_info, out_dtype, resolve_plan,
                                          tensor_memory_bytes)
from h3jax.merging.streaming.prepass import global_pre_passes, needs_pre_pass
from h3jax.merging.streaming.spec import MergeSpec

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


def run_merge(spec: MergeSpec, out_dir, *, overwrite: bool = False, progress: bool = True,
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
    from h3jax.merging.streaming import slices
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
  _, _, randomized = method_info(spec.method)
  plan = resolve_plan(spec, names, ref, num_layers(inputs), len(models))

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
                                        progress_lib.bar(plan, desc="merge", unit="tensor", enabled=progress),
                                        nonfinite, kept, align)
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
  `align` (h3jax.merging.streaming.vocab.Alignment): vocabulary-indexed tensors are re-indexed as they are read.
  """
  src = base if base is not None else models[0]
  srcs = ([base] if base is not None else []) + list(models)
  aligned = (lambda name: False) if align is None else align.applies
  shape = lambda name: align.shape(name, src.shape(name)) if aligned(name) else src.shape(name)  # noqa: E731
  cost = {name: (tensor_memory_bytes(spec.method, len(srcs), shape(name)) if action == "merge" else
                 2 * f32_bytes(shape(name)))  # a copied tensor: read + cast
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

  def check(inp, name, x):
    if not _finite(x):
      raise _NonFinite(f"input tensor {name!r} of {inp.path} has {_count_nonfinite(x)}")
    return x

  def checked(inp, name):  # every input tensor is checked on the reader thread, as it is read
    return check(inp, name, inp.get(name))

  def read(name, to=lambda x: x):  # every input's tensor, in input order
    if aligned(name):
      return [to(x) for x in align.tensors(name, [checked(i, name) for i in srcs], load_dt)]
    return [to(checked(i, name)) for i in srcs]

  def load(name, action, kwargs, dev):  # on a reader thread
    out_dt = out_dtype(spec, src.dtype(name), action, [i.dtype(name) for i in srcs])
    try:
      if action == "base":
        x = read(name)[0] if aligned(name) else checked(src, name)
        return out_dt, np.asarray(x).astype(out_dt), None
      fast = host_topk.ties_hparams(spec.method, kwargs, len(models)) if base is not None else None
      cuts = None
      if fast is not None and not aligned(name):
        # Numpy reads stay on the host, where the TIES cuts read them; their pass also checks the
        # inputs for NaN / inf where it reads them all (else they are checked here, as below).
        arrays = [i.get(name) for i in srcs]
        *cuts, finite = host_topk.host_cuts_checked(arrays[0], arrays[1:], dict(fast)["density"], load_dt)
        if finite is not True:
          for inp, x in zip(srcs, arrays):
            check(inp, name, x)
      else:  # handed to jax at once and dropped (or kept on the host for the cuts below)
        arrays = read(name, (lambda x: x) if fast is not None else (lambda x: jnp.asarray(x, device=dev)))
    except _NonFinite as e:
      return out_dt, fallback(name, str(e)).astype(out_dt), None
    base_x, xs = (arrays[0], arrays[1:]) if base is not None else (None, arrays)
    if fast is not None and cuts is None:
      cuts = host_topk.host_cuts(base_x, xs, dict(fast)["density"], load_dt)
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
        n_merged, largest = n_merged + 1, max(largest, f32_bytes(shape(name)))
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


def local_devices(n: int) -> list:
  """The first n local devices; on a CPU host asks XLA for n CPU devices first (before the
  backend starts; a program that already started it keeps its count)."""
  if n < 1:
    raise MergeError(f"--devices must be >= 1, got {n}")
  if n > 1:
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
      pass
  devices = jax.local_devices()
  if n > len(devices):
    raise MergeError(f"--devices={n} but this process has {len(devices)} local devices")
  return devices[:n]


def merge_from_config(config, out_dir, *, overwrite: bool = False, seed=None, max_shard_size=None,
                      progress: bool = True, compilation_cache=None, devices: int = 1,
                      nonfinite: str = "error", where: Optional[str] = None) -> dict:
  """What `python -m h3jax.merge` runs: read the config (a mergekit YAML or `.py` path, or an
  already-loaded `.py` config with its overrides applied, named `where` in errors), then stream
  the merge onto `devices` local devices. `seed` / `max_shard_size` override the config's."""
  import dataclasses

  from h3jax.merging.streaming import config as mcfg
  spec = mcfg.load_config(config, where=where)
  if compilation_cache:
    enable_compilation_cache(compilation_cache)
  if seed is not None:
    spec = dataclasses.replace(spec, seed=seed)
  return run_merge(spec, out_dir, overwrite=overwrite, progress=progress, max_shard_size=max_shard_size,
                   devices=local_devices(devices), nonfinite=nonfinite)

"""Where TSV-M's time goes: h3jax's per-tensor TSV-M kernel vs the LAPACK calls it cannot avoid, and
matmul-only replacements for its polar SVDs (time and error against float64).

  .venv/bin/python benchmarks/tsvm_floor.py [--base artifacts/smollm2-135m-instruct]
      [--variants artifacts/merge_bench/variant0,...] [--repeats 3]

Inputs: the same base and three "fine-tuned" variants as benchmarks/merge_speed.py (made there, or here
if missing). For every distinct 2-D tensor shape of the model it takes the first real tensor of that shape
and times, in one process:
  * kernel: the jitted per-tensor TSV-M (`merging.svd._tsvm_array`, solver 'auto', alpha 1) that the
    streaming driver runs, inputs already in memory (no I/O);
  * lapack: only the decompositions that kernel makes, on precomputed inputs: per task the eigh of the
    short-side Gram matrix (or the SVD where the route falls back), then the polar factors of the
    concatenated U and V (SVD, or eigh of the Gram matrix where `blocks.polar` takes that route);
and multiplies by the number of tensors of that shape. lapack / kernel is the share no matmul tuning can
remove; merge_speed.py's no-merge I/O floor plus this LAPACK floor is the fastest a TSV-M built on these
decompositions can run. For the polar inputs that go to the SVD it also times matmul-only alternatives:
cubic Newton-Schulz (the fewest iterations, of a ladder, whose error vs float64 is within 2x the float32
SVD's) and QDWH (`jax.scipy.linalg.polar`). Prints tables and writes benchmarks/results/tsvm_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from timing import best_of, cpu_model

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NS_ITERS = (10, 15, 20, 25, 30, 40, 50, 60, 80)


def newton_schulz(x, iters: int):
  """Orthogonal polar factor by cubic Newton-Schulz: X <- 1.5 X - 0.5 X (X^T X) from X / ||X||_F
  (every singular value in (0, 1]; each step maps s to 1.5 s - 0.5 s^3, so s_min needs ~log_1.5(1/s_min)
  steps to reach 1). Matmuls only."""
  import jax
  import jax.numpy as jnp
  hi = jax.lax.Precision.HIGHEST
  x = x / jnp.linalg.norm(x)

  def step(_, x):
    return 1.5 * x - 0.5 * jnp.matmul(x, jnp.matmul(x.T, x, precision=hi), precision=hi)

  return jax.lax.fori_loop(0, iters, step, x)


def polar_f64(x) -> np.ndarray:
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


def rel_err(y, ref) -> float:
  return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def shape_classes(reader) -> dict:
  """{shape: [names]} of the 2-D tensors, in file order."""
  out = {}
  for name in reader.keys():
    shape = tuple(reader.shape(name))
    if len(shape) == 2:
      out.setdefault(shape, []).append(name)
  return out


def profile_shape(base_X, models_NX, repeats: int) -> dict:
  """Kernel time, LAPACK time and the polar alternatives for one tensor."""
  import jax
  import jax.numpy as jnp
  from h3jax.merging import blocks
  from h3jax.merging import svd as svd_lib

  hi = jax.lax.Precision.HIGHEST
  base_X, models_NX = jnp.asarray(base_X), jnp.asarray(models_NX)
  kernel = jax.jit(lambda b, m: svd_lib._tsvm_array(b, m, None))
  t_kernel = best_of(lambda: jax.block_until_ready(kernel(base_X, models_NX)), repeats)

  deltas = models_NX - base_X
  n_tasks, (m, n) = deltas.shape[0], base_X.shape
  k = min(m, n) // n_tasks
  eigh = jax.jit(jnp.linalg.eigh)
  svd = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False))
  t_lapack, routes = 0.0, []
  for t in range(n_tasks):  # top_k_triples(method='auto'): eigh of the short side's Gram, SVD fallback
    t_mn = deltas[t] if m >= n else deltas[t].T
    t_mn = t_mn / svd_lib._pow2_scale(t_mn)
    g = jnp.matmul(t_mn.T, t_mn, precision=hi)
    lam = np.sort(np.asarray(eigh(g)[0]))[::-1]
    s = np.sqrt(np.maximum(lam[:k], 0))
    if s[-1] >= svd_lib.GRAM_MIN_SV_RATIO * s[0] and s[-1] > 0:
      t_lapack += best_of(lambda: jax.block_until_ready(eigh(g)), repeats)
      routes.append("eigh")
    else:
      t_lapack += best_of(lambda: jax.block_until_ready(svd(deltas[t])), repeats)
      routes.append("svd")
  u, _, v = jax.jit(lambda d: svd_lib.tsv_factors(d, k, None, "auto"))(deltas)
  polars = {}
  for tag, x in (("U", u), ("V", v)):
    gram_route = x.shape[0] >= 2 * x.shape[1]
    if gram_route:
      gx = jnp.matmul(x.T, x, precision=hi)
      lam = np.asarray(eigh(gx)[0])
      gram_route = lam[0] >= blocks.POLAR_GRAM_MIN_RATIO * lam[-1] and lam[-1] > 0
    if gram_route:
      t_lapack += best_of(lambda: jax.block_until_ready(eigh(gx)), repeats)
      routes.append(f"polar {tag}: eigh")
      continue
    t_svd = best_of(lambda: jax.block_until_ready(svd(x)), repeats)
    t_lapack += t_svd
    routes.append(f"polar {tag}: svd")
    ref = polar_f64(x)
    sv = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    entry = {"shape": list(x.shape), "cond": float(sv[0] / sv[-1]), "svd_s": t_svd,
             "svd_err": rel_err(blocks.polar(x, "svd"), ref)}
    for iters in NS_ITERS:
      ns = jax.jit(lambda x, i=iters: newton_schulz(x, i))
      err = rel_err(ns(x), ref)
      if err <= 2 * entry["svd_err"]:
        entry.update(ns_iters=iters, ns_err=err, ns_s=best_of(lambda: jax.block_until_ready(ns(x)), repeats))
        break
    else:
      entry.update(ns_iters=None, ns_err=err, ns_s=None)
    qdwh = jax.jit(lambda x: jax.scipy.linalg.polar(x, method="qdwh")[0])
    entry.update(qdwh_err=rel_err(qdwh(x), ref), qdwh_s=best_of(lambda: jax.block_until_ready(qdwh(x)), repeats))
    polars[tag] = entry
  return {"kernel_s": t_kernel, "lapack_s": t_lapack, "routes": routes, "polar_svd_inputs": polars}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", default=str(REPO / "artifacts" / "smollm2-135m-instruct"))
  p.add_argument("--variants", default="", help="comma-separated; default: merge_speed.py's, made if missing")
  p.add_argument("--work", default=str(REPO / "artifacts" / "merge_bench"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tsvm_floor.json"))
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from h3jax.hf.st_io import SafetensorsReader

  base_dir = pathlib.Path(args.base)
  if args.variants:
    variants = [pathlib.Path(v) for v in args.variants.split(",")]
  else:
    import merge_speed
    variants = merge_speed.make_variants(base_dir, pathlib.Path(args.work))
  base_r = SafetensorsReader(str(base_dir))
  var_r = [SafetensorsReader(str(v)) for v in variants]
  t0 = time.perf_counter()
  rows = []
  for shape, names in shape_classes(base_r).items():
    name = names[0]
    base_X = base_r.get(name).astype(np.float32)
    models_NX = np.stack([r.get(name).astype(np.float32) for r in var_r])
    res = profile_shape(base_X, models_NX, args.repeats)
    rows.append({"shape": list(shape), "count": len(names), "example": name, **res})
    print(f"  {str(shape):>14} x{len(names):>3}: kernel {res['kernel_s'] * 1e3:8.1f} ms, LAPACK "
          f"{res['lapack_s'] * 1e3:8.1f} ms ({', '.join(res['routes'])})", flush=True)
  kernel = sum(r["kernel_s"] * r["count"] for r in rows)
  lapack = sum(r["lapack_s"] * r["count"] for r in rows)
  out = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cpus": os.cpu_count(),
         "jax": jax.__version__, "base": str(base_dir), "variants": [str(v) for v in variants],
         "rows": rows, "kernel_total_s": kernel, "lapack_total_s": lapack, "lapack_share": lapack / kernel,
         "wall_s": time.perf_counter() - t0}
  print(f"\n{'shape':>14}{'count':>6}{'kernel s':>10}{'LAPACK s':>10}{'share':>7}")
  for r in rows:
    print(f"{str(tuple(r['shape'])):>14}{r['count']:>6}{r['kernel_s'] * r['count']:>10.2f}"
          f"{r['lapack_s'] * r['count']:>10.2f}{r['lapack_s'] / r['kernel_s']:>7.0%}")
  print(f"{'all 2-D':>14}{sum(r['count'] for r in rows):>6}{kernel:>10.2f}{lapack:>10.2f}{lapack / kernel:>7.0%}")
  print("\npolar inputs that take the SVD (per call; error = relative Frobenius vs float64 polar):")
  print(f"{'input':>22}{'cond':>9}{'SVD ms':>8}{'err':>9}{'NS iters':>9}{'NS ms':>8}{'err':>9}{'QDWH ms':>9}"
        f"{'err':>9}")
  for r in rows:
    for tag, e in r["polar_svd_inputs"].items():
      ns_ms = f"{e['ns_s'] * 1e3:8.1f}" if e["ns_s"] else f"{'-':>8}"
      print(f"{str(tuple(r['shape'])) + ' ' + tag + str(tuple(e['shape'])):>22}{e['cond']:>9.3g}"
            f"{e['svd_s'] * 1e3:>8.1f}{e['svd_err']:>9.1e}{str(e['ns_iters']):>9}{ns_ms}{e['ns_err']:>9.1e}"
            f"{e['qdwh_s'] * 1e3:>9.1f}{e['qdwh_err']:>9.1e}")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

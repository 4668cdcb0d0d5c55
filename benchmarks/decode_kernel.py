r"""The CPU decode kernel alone against XLA's dots and the weight-streaming limit.

  .venv/bin/python benchmarks/decode_kernel.py

SmolLM2-135M's 30 layers of linears (q / k / v, o, gate / up, down: 425 MB of float32 weights, random, packed
in panels), chained as a decode step chains them, at 1 and 8 rows: `cpu_matmul`'s kernel and the XLA dot over
the same panels, each ÷ the time to stream the weights once at the read bandwidth measured in the same run.
Prints a table and writes benchmarks/results/decode_kernel.json. Rows of the same run are comparable; this
machine's absolute speed moves by 10-40% between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.kernels import cpu_matmul
from timing import best_of, cpu_model, read_bandwidth

D, F, KV, LAYERS = 576, 1536, 192, 30  # SmolLM2-135M


def layer_weights(rng) -> dict:
  mk = lambda i, o: cpu_matmul.pack_panels(jnp.asarray(0.02 * rng.standard_normal((i, o), np.float32)))
  return dict(qkv=(mk(D, D), mk(D, KV), mk(D, KV)), o=(mk(D, D),), gu=(mk(D, F), mk(D, F)), down=(mk(F, D),))


def chain(x_ND, layers, matmuls):
  for w in layers:
    q, _, _ = matmuls(x_ND, *w["qkv"])
    a, = matmuls(q, *w["o"])
    g, u = matmuls(a, *w["gu"])
    x_ND, = matmuls(g * u, *w["down"])
  return x_ND


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", default="1,8")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "decode_kernel.json"))
  args = ap.parse_args()
  if not cpu_matmul.available():
    raise SystemExit("error: the CPU decode kernel is not available here (no C++ compiler, or H3JAX_CPU_KERNELS=0)")
  layers = [layer_weights(np.random.default_rng(l)) for l in range(LAYERS)]
  nbytes = sum(int(p.size) * 4 for w in layers for g in w.values() for p in g)
  bw = read_bandwidth()
  stream_s = nbytes / bw
  res = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
         "jax": jax.__version__, "weight_bytes": nbytes, "read_bandwidth_gbs": bw / 1e9,
         "streaming_ms": 1e3 * stream_s, "rows": {}}
  print(f"decode kernel on {res['cpu_model']} ({res['cpu_count']} cores, load {res['load_average']:.1f}): "
        f"{nbytes / 1e6:.0f} MB of weights, read bandwidth {bw / 1e9:.1f} GB/s, streaming {1e3 * stream_s:.1f} ms")
  print("| rows | kernel ms | XLA dots ms | kernel GFLOP/s | kernel ÷ streaming limit | XLA ÷ kernel time |")
  print("|---:|---:|---:|---:|---:|---:|")
  for n in (int(r) for r in args.rows.split(",")):
    x = 0.1 * jnp.ones((n, D), jnp.float32)
    t = {}
    for name, mm in (("kernel", cpu_matmul._kernel_matmuls), ("xla", cpu_matmul._xla_matmuls)):
      f = jax.jit(lambda x, mm=mm: chain(x, layers, mm))
      f(x).block_until_ready()
      t[name] = best_of(lambda: f(x).block_until_ready(), args.repeats)
    row = {"kernel_ms": 1e3 * t["kernel"], "xla_ms": 1e3 * t["xla"],
           "kernel_gflops": 2 * n * nbytes / 4 / t["kernel"] / 1e9, "kernel_frac_of_streaming": stream_s / t["kernel"],
           "xla_over_kernel": t["xla"] / t["kernel"]}
    res["rows"][n] = row
    print(f"| {n} | {row['kernel_ms']:.1f} | {row['xla_ms']:.1f} | {row['kernel_gflops']:.0f} | "
          f"{100 * row['kernel_frac_of_streaming']:.0f}% | {row['xla_over_kernel']:.2f}x |")
  pathlib.Path(args.out).write_text(json.dumps(res, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

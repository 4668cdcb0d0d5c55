r"""The CPU decode kernel alone against XLA's dots and the weight-streaming limit.

  .venv/bin/python benchmarks/decode_kernel.py

SmolLM2-135M's 30 layers of linears (q / k / v, o, gate / up, down: 425 MB of float32 weights, random, packed
in panels), chained as a decode step chains them, at 1 and 8 rows: `cpu_matmul`'s kernel and the XLA dot over
the same panels, each ÷ the time to stream the weights once at the read bandwidth measured in the same run.
With --experts E (default 3; 0 skips it) it also times a top-2 MoE FFN of E packed SmolLM2-sized experts over
the same 30 layers at --moe_rows tokens, each routed to 2 random experts: `moe_dispatch.sparse_ffn` (the MoE
decode path) against the chosen experts' SwiGLUs called directly on the same rows (no routing), so the
dispatch's own cost and the experts' weight bytes per second show apart. With --call_rounds R (default 5; 0
skips it) the same layers' weights at 1 row are streamed in three call layouts, in R interleaved rounds with the
read bandwidth: one kernel call per weight (210), grouped as a step groups them (120), and up to 8 weights of the
same input width per call (27), so a per-call cost would show as a falling fraction with more calls. With
--attention_slots S (default 96 = model_speed's 32-token prompt and 64 new tokens; 0 skips it) it times one decode
step's attention over 30 layers' stacked caches of S slots at each --rows: XLA's path (the layer's slice, two
einsums) against the native kernel (`kernels/decode_attention.py`), and reading the caches once. Prints a
table and writes benchmarks/results/decode_kernel.json. Rows of the same run are comparable; this machine's
absolute speed moves by 10-40% between runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.kernels import cpu_matmul
from decode_limit import chained_calls
from timing import bandwidth_probe, best_of, cpu_model, interleaved_rounds, read_bandwidth

D, F, KV, LAYERS = 576, 1536, 192, 30  # SmolLM2-135M


def packed(rng, i: int, o: int):
  return cpu_matmul.pack_panels(jnp.asarray(0.02 * rng.standard_normal((i, o), np.float32)))


def layer_weights(rng) -> dict:
  mk = functools.partial(packed, rng)
  return dict(qkv=(mk(D, D), mk(D, KV), mk(D, KV)), o=(mk(D, D),), gu=(mk(D, F), mk(D, F)), down=(mk(F, D),))


def chain(x_ND, layers, matmuls):
  for w in layers:
    q, _, _ = matmuls(x_ND, *w["qkv"])
    a, = matmuls(q, *w["o"])
    g, u = matmuls(a, *w["gu"])
    x_ND, = matmuls(g * u, *w["down"])
  return x_ND


def jit_seconds(fn, x, repeats: int) -> float:
  """Best wall seconds of jit(fn)(x) (best_of's warm-up call compiles it)."""
  f = jax.jit(fn)
  return best_of(lambda: f(x).block_until_ready(), repeats)


def moe_rows(res: dict, experts: int, n: int, repeats: int, rng):
  """sparse_ffn vs the chosen experts' SwiGLUs called directly, `n` tokens x 30 layers (top-2 of `experts`)."""
  from h3jax.config import ModelConfig
  from h3jax.model import moe_dispatch
  cfg = ModelConfig(vocab_size=8, hidden_size=D, intermediate_size=F, num_layers=1, num_heads=9, num_kv_heads=3,
                    head_dim=64)
  mk = lambda i, o: {"kernel_panels": packed(rng, i, o)}
  layers = [[dict(gate_proj=mk(D, F), up_proj=mk(D, F), down_proj=mk(F, D)) for _ in range(experts)]
            for _ in range(LAYERS)]
  topi_NK = np.stack([rng.permutation(experts)[:2] for _ in range(n)]).astype(np.int32)
  used = sorted(set(topi_NK.reshape(-1).tolist()))
  combine_NK, valid_N = jnp.full((n, 2), 0.5, jnp.float32), jnp.ones((n,), bool)

  def sparse(x_ND):
    for ps in layers:
      x_ND = x_ND + 0.01 * moe_dispatch.sparse_ffn(ps, x_ND, jnp.asarray(topi_NK), combine_NK, valid_N, None, cfg)
    return x_ND

  def direct(x_ND):  # every chosen expert on all n rows: the weight bytes sparse_ffn reads, no routing
    for ps in layers:
      x_ND = x_ND + 0.01 * sum(moe_dispatch._swiglu_2d(ps[e], x_ND, {}, cfg) for e in used)
    return x_ND

  x = 0.1 * jnp.ones((n, D), jnp.float32)
  t = {name: jit_seconds(fn, x, repeats) for name, fn in (("sparse_ffn", sparse), ("direct", direct))}
  nbytes = LAYERS * len(used) * 3 * D * F * 4
  res["moe"] = {"experts": experts, "rows": n, "experts_used": len(used), "expert_bytes": nbytes,
                "sparse_ffn_ms": 1e3 * t["sparse_ffn"], "direct_ms": 1e3 * t["direct"],
                "sparse_ffn_gbs": nbytes / t["sparse_ffn"] / 1e9, "direct_gbs": nbytes / t["direct"] / 1e9}
  m = res["moe"]
  print(f"\nMoE FFN, {n} tokens, top-2 of {experts} experts ({len(used)} used, {nbytes / 1e6:.0f} MB of expert "
        f"weights), 30 layers:")
  print("| path | ms | expert weight GB/s |\n|---|---:|---:|")
  print(f"| `sparse_ffn` | {m['sparse_ffn_ms']:.1f} | {m['sparse_ffn_gbs']:.1f} |")
  print(f"| the chosen experts called directly | {m['direct_ms']:.1f} | {m['direct_gbs']:.1f} |")


def call_layouts(res: dict, layers, rounds: int):
  """The weights at 1 row in 210, 120 and 27 kernel calls, each chained through its input, against the
  read bandwidth of the same round (jnp.sum over 1 GiB, best of 3)."""
  ws = [w for layer in layers for g in ("qkv", "o", "gu", "down") for w in layer[g]]
  nbytes = sum(int(w.size) * 4 for w in ws)
  by_width = {}
  for w in ws:
    by_width.setdefault(w.shape[1], []).append(w)
  layouts = {"one call per weight": [[w] for w in ws],
             "as a step groups them": [layer[g] for layer in layers for g in ("qkv", "o", "gu", "down")],
             "8 per call, by input width": [g[i:i + 8] for g in by_width.values() for i in range(0, len(g), 8)]}
  runs = {"bandwidth": bandwidth_probe(1 << 30)}
  runs.update({k: chained_calls(g, 1) for k, g in layouts.items()})
  for fn in runs.values():
    fn()
  times = interleaved_rounds(runs, rounds, calls={k: 3 for k in runs})
  bw = [(1 << 30) / t for t in times["bandwidth"]]
  res["calls"] = {"weight_bytes": nbytes, "rounds": rounds, "bandwidth_gbs": [b / 1e9 for b in bw]}
  print(f"\n1 row, {nbytes / 1e6:.0f} MB of weights in three call layouts, {rounds} interleaved rounds "
        f"(read bandwidth {min(bw) / 1e9:.1f}-{max(bw) / 1e9:.1f} GB/s):")
  print("| layout | calls | best ms | fraction of the round's bandwidth: median (range) |\n|---|---:|---:|---|")
  for k, groups in layouts.items():
    frac = sorted(nbytes / t / b for t, b in zip(times[k], bw))
    res["calls"][k] = {"calls": len(groups), "ms": [1e3 * t for t in times[k]], "frac_of_bandwidth": frac}
    print(f"| {k} | {len(groups)} | {1e3 * min(times[k]):.1f} | {100 * float(np.median(frac)):.0f}% "
          f"({100 * frac[0]:.0f}-{100 * frac[-1]:.0f}%) |")


def attention_rows(res: dict, rows, slots: int, repeats: int):
  """One decode step's attention over 30 layers' caches [30, B, slots, 3, 64] (SmolLM2's kv heads), chained
  through the query: XLA's path against the native kernel, and the caches' bytes at the read bandwidth."""
  from h3jax.config import ModelConfig
  from h3jax.kernels import decode_attention
  from h3jax.model import layers as layers_lib
  K, R, Dh = 3, 3, 64
  cfg = ModelConfig(vocab_size=8, hidden_size=D, intermediate_size=F, num_layers=LAYERS, num_heads=K * R,
                    num_kv_heads=K, head_dim=Dh)
  xla = lambda q, k, v, m, l: layers_lib._cached_attend(q[:, None], k, v, m[:, None], l, slots, cfg)[:, 0]
  paths = {"XLA": xla, "kernel": lambda q, k, v, m, l: decode_attention.attend(q, k, v, m, l, xla)}
  bw = read_bandwidth()
  res["attention"] = {"slots": slots, "read_bandwidth_gbs": bw / 1e9, "rows": {}}
  print(f"\nDecode attention, 30 layers, {slots} cache slots (read bandwidth {bw / 1e9:.1f} GB/s):")
  print("| rows | XLA ms | kernel ms | reading the caches once ms | XLA ÷ kernel time |\n|---:|---:|---:|---:|---:|")
  for n in rows:
    rng = np.random.default_rng(n)
    k, v = (jnp.asarray(rng.standard_normal((LAYERS, n, slots, K, Dh), np.float32)) for _ in range(2))
    q, mask = jnp.asarray(rng.standard_normal((n, K, R, Dh), np.float32)), jnp.ones((n, slots), bool)

    def chain(q, k, v, mask, attend):
      out = q
      for layer in range(LAYERS):
        out = q + 1e-3 * attend(out, k, v, mask, jnp.int32(layer)).reshape(q.shape)
      return out

    t = {name: best_of(lambda f=jax.jit(functools.partial(chain, attend=a)): f(q, k, v, mask).block_until_ready(),
                       repeats) for name, a in paths.items()}
    read_s = 2 * k.size * 4 / bw
    res["attention"]["rows"][n] = {"xla_ms": 1e3 * t["XLA"], "kernel_ms": 1e3 * t["kernel"], "read_ms": 1e3 * read_s}
    print(f"| {n} | {1e3 * t['XLA']:.2f} | {1e3 * t['kernel']:.2f} | {1e3 * read_s:.2f} | "
          f"{t['XLA'] / t['kernel']:.2f}x |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", default="1,8")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--experts", type=int, default=3, help="MoE rows with this many experts (0: none)")
  ap.add_argument("--moe_rows", type=int, default=8)
  ap.add_argument("--call_rounds", type=int, default=5, help="rounds of the call-layout rows (0: none)")
  ap.add_argument("--attention_slots", type=int, default=96, help="cache slots of the attention rows (0: none)")
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
    t = {name: jit_seconds(lambda x, mm=mm: chain(x, layers, mm), x, args.repeats)
         for name, mm in (("kernel", cpu_matmul._kernel_matmuls), ("xla", cpu_matmul._xla_matmuls))}
    row = {"kernel_ms": 1e3 * t["kernel"], "xla_ms": 1e3 * t["xla"],
           "kernel_gflops": 2 * n * nbytes / 4 / t["kernel"] / 1e9, "kernel_frac_of_streaming": stream_s / t["kernel"],
           "xla_over_kernel": t["xla"] / t["kernel"]}
    res["rows"][n] = row
    print(f"| {n} | {row['kernel_ms']:.1f} | {row['xla_ms']:.1f} | {row['kernel_gflops']:.0f} | "
          f"{100 * row['kernel_frac_of_streaming']:.0f}% | {row['xla_over_kernel']:.2f}x |")
  if args.experts:
    moe_rows(res, args.experts, args.moe_rows, args.repeats, np.random.default_rng(LAYERS))
  if args.call_rounds:
    call_layouts(res, layers, args.call_rounds)
  if args.attention_slots:
    attention_rows(res, [int(r) for r in args.rows.split(",")], args.attention_slots, args.repeats)
  pathlib.Path(args.out).write_text(json.dumps(res, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

r"""Where a SmolLM2 train step's time goes: its GEMMs in XLA:CPU, torch (MKL / oneDNN) and numpy's OpenBLAS.

  .venv/bin/python benchmarks/step_gemms.py --model artifacts/smollm2-135m-instruct

Lists every 2-D matmul of one forward+backward step at B x T tokens (per layer: q, k, v, o, gate, up, down,
each as the forward x @ W, the input gradient g @ W^T and the weight gradient x^T @ g; then the tied or
untied vocabulary projection's three), times each distinct product alone in each library (best of
--repeats, transposes as views; XLA and OpenBLAS with h3jax's [in, out] kernels, torch with nn.Linear's
[out, in] weights as transformers runs it), and sums them with their counts. Beside that it times the whole
step in h3jax and in transformers, so the table splits each step into its GEMMs and the rest. Attention's
batched dots (QK^T, PV) are not GEMMs of this list; they fall in "the rest" of both, and are timed apart:
every layer's attention core (scores, mask, softmax, weighted values; no projections) forward+backward in
h3jax's two layouts (`layers.attend_heads_first`, the training path, and `layers.attend_in_place`, the decode
path) and in torch's fused scaled_dot_product_attention. Prints a table and writes
benchmarks/results/step_gemms.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import h3jax
from h3jax.model import layers
from model_speed import jax_train_step, torch_train_step
from timing import best_of, cpu_model

# How each product reads its operands: "nn" x[M,K] @ w[K,N]; "nt" x[M,K] @ w[N,K]^T; "tn" x[K,M]^T @ w[K,N].
LAYOUTS = ("nn", "nt", "tn")


def step_gemms(cfg, tokens: int) -> collections.Counter:
  """{(name, layout, M, K, N): count} for one forward+backward step of `tokens` tokens."""
  D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
  KV = cfg.num_kv_heads * cfg.head_dim
  out = collections.Counter()
  for name, I, O in (("q", D, E), ("k", D, KV), ("v", D, KV), ("o", E, D), ("gate", D, F), ("up", D, F),
                     ("down", F, D)):
    out[(name, "nn", tokens, I, O)] += cfg.num_layers  # y = x @ W
    out[(name, "nt", tokens, O, I)] += cfg.num_layers  # dx = g @ W^T
    out[(name, "tn", I, tokens, O)] += cfg.num_layers  # dW = x^T @ g
  V = cfg.vocab_size
  if cfg.tie_word_embeddings:  # logits = h @ E^T with E [V, D]
    out[("head", "nt", tokens, D, V)] += 1
    out[("head", "nn", tokens, V, D)] += 1  # dh = g @ E
    out[("head", "tn", V, tokens, D)] += 1  # dE = g^T @ h
  else:
    out[("head", "nn", tokens, D, V)] += 1
    out[("head", "nt", tokens, V, D)] += 1
    out[("head", "tn", D, tokens, V)] += 1
  return out


def operands(layout: str, M: int, K: int, N: int, rng):
  a = rng.standard_normal((K, M) if layout == "tn" else (M, K), dtype=np.float32)
  b = rng.standard_normal((N, K) if layout == "nt" else (K, N), dtype=np.float32)
  return a, b


def product(layout: str, lib):
  t = (lambda x: x.T) if lib is not torch else (lambda x: x.t())
  if layout == "nn":
    return lambda a, b: a @ b
  if layout == "nt":
    return lambda a, b: a @ t(b)
  return lambda a, b: t(a) @ b


def torch_layout(name: str, layout: str, M: int, K: int, N: int, tied: bool) -> tuple:
  """The same product as transformers computes it: nn.Linear keeps W as [out, in], so the forward reads W
  transposed, the input gradient does not, and the weight gradient comes out as [out, in]."""
  if name == "head" and tied:  # both keep the embedding [V, D]
    return layout, M, K, N
  return {"nn": ("nt", M, K, N), "nt": ("nn", M, K, N), "tn": ("tn", N, K, M)}[layout]


def time_gemm(layout: str, M: int, K: int, N: int, torch_shape: tuple, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  a, b = operands(layout, M, K, N, rng)
  xla = jax.jit(product(layout, jnp))
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = (torch.from_numpy(x) for x in operands(*torch_shape, rng))
  f_torch = product(torch_shape[0], torch)
  return {"xla": best_of(lambda: xla(ja, jb).block_until_ready(), repeats),
          "torch": best_of(lambda: f_torch(ta, tb), repeats),
          "openblas": best_of(lambda: product(layout, np)(a, b), repeats)}


def attention_s(cfg, B: int, T: int, repeats: int) -> dict:
  """Seconds of cfg.num_layers attention cores forward+backward at B x T, causal, per implementation."""
  K, R, Dh, L = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.num_layers
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((B, T, K, R, Dh), (B, T, K, Dh), (B, T, K, Dh)))
  g = rng.standard_normal((B, T, K * R * Dh), dtype=np.float32)
  mask = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
  out = {}
  for name in ("attend_heads_first", "attend_in_place"):
    attend = getattr(layers, name)
    grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, cfg) * g), argnums=(0, 1, 2))

    def layers_fwd_bwd(q, k, v):  # L dependent layers, as in the step's scan
      def body(c, _):
        dq, _, _ = grad(q + c, k, v)
        return c + 1e-6 * dq[0, 0, 0, 0, 0], None
      return jax.lax.scan(body, 0.0, None, length=L)[0]
    f = jax.jit(layers_fwd_bwd)
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    out[name] = best_of(lambda: f(jq, jk, jv).block_until_ready(), repeats)
  tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).requires_grad_()
                for x in (q.reshape(B, T, K * R, Dh), k, v))
  tg = torch.from_numpy(g.reshape(B, T, K * R, Dh).transpose(0, 2, 1, 3).copy())

  def torch_layers():
    for _ in range(L):
      o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
      (o * tg).sum().backward()
  out["torch_sdpa"] = best_of(torch_layers, repeats)
  return out


def bench(args) -> dict:
  torch.set_num_threads(os.cpu_count())
  cfg, params = h3jax.load_pretrained(args.model, dtype="float32")
  tokens = args.batch * args.seq
  res = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
         "jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__, "B": args.batch,
         "T": args.seq, "gemms": []}
  totals = collections.Counter()
  for (name, layout, M, K, N), count in sorted(step_gemms(cfg, tokens).items()):
    t_shape = torch_layout(name, layout, M, K, N, cfg.tie_word_embeddings)
    t = time_gemm(layout, M, K, N, t_shape, args.repeats)
    flop = 2.0 * M * K * N
    res["gemms"].append({"name": name, "layout": layout, "M": M, "K": K, "N": N, "count": count,
                         "torch_layout": t_shape[0],
                         **{f"{lib}_s": s for lib, s in t.items()},
                         **{f"{lib}_gflops": flop / s / 1e9 for lib, s in t.items()}})
    for lib, s in t.items():
      totals[lib] += count * s
    totals["flop"] += count * flop
  res["gemm_s"] = {lib: totals[lib] for lib in ("xla", "torch", "openblas")}
  res["gemm_gflop"] = totals["flop"] / 1e9
  res["attention_s"] = attention_s(cfg, args.batch, args.seq, args.repeats)

  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
  step = jax_train_step(params, cfg, jnp.asarray(ids))
  res["step_s_h3jax"] = best_of(lambda step=step: jax.block_until_ready(step(params)), args.repeats)
  del step
  hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
  res["step_s_torch"] = best_of(torch_train_step(hf, ids), args.repeats)
  return res


def table(res: dict) -> str:
  rows = [f"SmolLM2 train step GEMMs, B={res['B']} T={res['T']} on {res['cpu_model']} "
          f"({res['cpu_count']} cores, load {res['load_average']:.1f})",
          "| product | layout (torch's) | M x K x N | count | XLA GFLOP/s | torch GFLOP/s | OpenBLAS GFLOP/s "
          "| XLA ÷ torch time |",
          "|---|---|---|---|---|---|---|---|"]
  for g in res["gemms"]:
    rows.append(f"| {g['name']} | {g['layout']} ({g['torch_layout']}) | {g['M']}x{g['K']}x{g['N']} | {g['count']} | "
                f"{g['xla_gflops']:.1f} | {g['torch_gflops']:.1f} | {g['openblas_gflops']:.1f} | "
                f"{g['xla_s'] / g['torch_s']:.2f} |")
  s = res["gemm_s"]
  rows += ["", f"the step's GEMMs ({res['gemm_gflop']:.0f} GFLOP), summed: XLA {s['xla']:.2f} s, "
               f"torch {s['torch']:.2f} s, OpenBLAS {s['openblas']:.2f} s (XLA ÷ torch {s['xla'] / s['torch']:.2f})",
           f"whole step: h3jax {res['step_s_h3jax']:.2f} s (the rest {res['step_s_h3jax'] - s['xla']:.2f} s), "
           f"transformers {res['step_s_torch']:.2f} s (the rest {res['step_s_torch'] - s['torch']:.2f} s); "
           f"torch ÷ h3jax tokens/s {res['step_s_torch'] / res['step_s_h3jax']:.2f}",
           "attention cores, every layer forward+backward: " + ", ".join(
               f"{k} {v:.3f} s" for k, v in res["attention_s"].items())]
  return "\n".join(rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "step_gemms.json"))
  args = ap.parse_args()
  res = bench(args)
  print(table(res))
  pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

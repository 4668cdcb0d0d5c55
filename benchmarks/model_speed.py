r"""h3jax vs transformers (torch) on SmolLM2-135M-Instruct, same machine, same run.

  .venv/bin/python benchmarks/model_speed.py --model artifacts/smollm2-135m-instruct

Prints a table and writes benchmarks/results/model_speed.json:
  (a) forward+backward tokens/s (h3jax vs torch) and h3jax's achieved fraction of
      the jax fp32 matmul peak measured in this run;
  (b) greedy decode tokens/s at batch 1 and 8 (h3jax vs `generate`), with the
      weight-streaming limit (weight bytes per step / measured memory bandwidth);
  (c) load time (h3jax.load_pretrained vs from_pretrained).
Run it on an otherwise idle machine: every number is a ratio taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import h3jax
from h3jax import generation
from h3jax.model import llama, params as params_lib
from timing import best_of


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / best_of(lambda: f(a).block_until_ready(), repeats)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  return nbytes / best_of(lambda: f(x).block_until_ready(), repeats)


def train_flops(cfg, n_params: int, B: int, T: int) -> float:
  """6 N per token for the weights + causal attention scores and values (fwd+bwd)."""
  attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T * T * B  # 2 matmuls x 2 FLOP x 3 (fwd+bwd) / 2 causal
  return 6 * n_params * B * T + attn


def jax_train_step(params, cfg, ids):
  def loss_fn(p):
    logits_BTV = llama.forward(p, ids[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, ids[:, 1:]).mean()
  return jax.jit(jax.value_and_grad(loss_fn))


def bench(args) -> dict:
  torch.set_num_threads(os.cpu_count())
  res = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "jax": jax.__version__,
         "torch": torch.__version__, "B": args.batch, "T": args.seq}
  t0 = time.perf_counter()
  cfg, params = h3jax.load_pretrained(args.model, dtype="float32")
  jax.block_until_ready(params)
  res["load_s_h3jax"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
  res["load_s_torch"] = time.perf_counter() - t0

  res["matmul_peak_gflops"] = matmul_peak_flops() / 1e9
  res["read_bandwidth_gbs"] = read_bandwidth() / 1e9

  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
  step = jax_train_step(params, cfg, jnp.asarray(ids))
  jids = jnp.asarray(ids)
  t_jax = best_of(lambda: jax.block_until_ready(step(params)), args.repeats)
  tids = torch.as_tensor(ids)

  def torch_step():
    hf.zero_grad(set_to_none=True)
    out = hf(tids[:, :-1], labels=tids[:, :-1])
    out.loss.backward()
  hf.train()
  t_torch = best_of(torch_step, args.repeats)
  hf.eval()
  del jids
  n_params = params_lib.num_params(params)
  tokens = args.batch * args.seq
  res.update(train_tok_s_h3jax=tokens / t_jax, train_tok_s_torch=tokens / t_torch,
             train_speedup=t_torch / t_jax,
             train_frac_of_matmul_peak=train_flops(cfg, n_params, args.batch, args.seq) / t_jax
             / (res["matmul_peak_gflops"] * 1e9))

  # Weight bytes streamed per decode step: every matrix (the tied embedding once, as lm_head).
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"])) + params["embed"]["embedding"].nbytes
  res["decode_weight_streaming_limit_tok_s_b1"] = res["read_bandwidth_gbs"] * 1e9 / weight_bytes
  for B in (1, 8):
    prompt = np.random.RandomState(B).randint(3, cfg.vocab_size, (B, args.prompt_len))
    n = args.new_tokens

    def ours():
      generation.generate_tokens(params, cfg, prompt, np.ones_like(prompt), max_new_tokens=n)
    # Timing includes prefill; subtract a 1-token run to isolate decode steps.
    def ours1():
      generation.generate_tokens(params, cfg, prompt, np.ones_like(prompt), max_new_tokens=1)
    t_ours = best_of(ours, args.repeats) - best_of(ours1, args.repeats)
    tp = torch.as_tensor(prompt)

    def theirs(k):
      with torch.no_grad():
        hf.generate(tp, attention_mask=torch.ones_like(tp), do_sample=False, max_new_tokens=k, min_new_tokens=k,
                    pad_token_id=0)
    t_theirs = best_of(lambda: theirs(n), args.repeats) - best_of(lambda: theirs(1), args.repeats)
    res[f"decode_tok_s_h3jax_b{B}"] = B * (n - 1) / t_ours
    res[f"decode_tok_s_torch_b{B}"] = B * (n - 1) / t_theirs
    res[f"decode_speedup_b{B}"] = t_theirs / t_ours
  res["decode_frac_of_streaming_limit_b1"] = res["decode_tok_s_h3jax_b1"] / res["decode_weight_streaming_limit_tok_s_b1"]
  return res


def table(res: dict) -> str:
  rows = [
      ("fwd+bwd tokens/s", res["train_tok_s_h3jax"], res["train_tok_s_torch"], res["train_speedup"]),
      ("decode tokens/s, batch 1", res["decode_tok_s_h3jax_b1"], res["decode_tok_s_torch_b1"], res["decode_speedup_b1"]),
      ("decode tokens/s, batch 8", res["decode_tok_s_h3jax_b8"], res["decode_tok_s_torch_b8"], res["decode_speedup_b8"]),
      ("load time (s)", res["load_s_h3jax"], res["load_s_torch"], res["load_s_torch"] / res["load_s_h3jax"]),
  ]
  lines = ["| measure | h3jax | transformers | ratio |", "|---|---:|---:|---:|"]
  lines += [f"| {name} | {a:.1f} | {b:.1f} | {r:.2f}x |" for name, a, b, r in rows]
  lines += ["",
            f"fwd+bwd at {100 * res['train_frac_of_matmul_peak']:.0f}% of the measured fp32 matmul peak "
            f"({res['matmul_peak_gflops']:.0f} GFLOP/s); decode batch 1 at "
            f"{100 * res['decode_frac_of_streaming_limit_b1']:.0f}% of the weight-streaming limit "
            f"({res['decode_weight_streaming_limit_tok_s_b1']:.0f} tok/s at {res['read_bandwidth_gbs']:.1f} GB/s)."]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results/model_speed.json")
  args = ap.parse_args()
  res = bench(args)
  print(table(res))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

r"""Full train-step throughput: fused SmolLM2-135M 3-expert MoE in h3jax vs transformers' Mixtral (torch).

  python benchmarks/moe_train_speed.py                      # SmolLM2 shapes, B=4, T=256, top-2
  python benchmarks/moe_train_speed.py --layers=2 --steps=3  # quick check

Both sides get the same model shapes (SmolLM2-135M: D=576, F=1536, 30 layers, 9/3 heads, V=49152,
tied embeddings, E=3 experts, top-2), random weights, fp32, AdamW on every parameter, and the same
batch; one step = forward + backward + optimizer update. h3jax uses `h3jax.train.step.make_step`
(jitted; `--dispatch` picks the MoE backend, `--remat` the remat policy), torch uses `MixtralForCausalLM`
(eager). Reported: median seconds per step after warm-up (compile excluded) and tokens/s. Run both in one
process on the same CPU so the numbers are comparable; prints one JSON line per implementation.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from timing import time_steps


def shapes(layers: int) -> dict:
  return dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers, num_heads=9,
              num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
              max_position_embeddings=2048)


def batch(B: int, T: int, V: int, seed: int = 0):
  ids_BT = np.random.default_rng(seed).integers(0, V, (B, T)).astype(np.int32)
  ones = np.ones((B, T), np.int32)
  return {"input_ids_BT": ids_BT, "loss_mask_BT": ones, "attention_mask_BT": ones,
          "task_B": np.zeros((B,), np.int32)}


def bench_h3jax(a) -> dict:
  import jax
  import optax
  from h3jax.config import ModelConfig
  from h3jax.model import params as params_lib
  from h3jax.train import objective, optim, step as step_lib
  cfg = ModelConfig(**shapes(a.layers), num_experts=3, num_experts_per_tok=a.top_k, moe_dispatch=a.dispatch,
                    remat=a.remat)
  params = params_lib.init_params(cfg, jax.random.key(0))
  labels = optim.param_labels(params, optim.trainable_rules(lora=False, router=True, extra=("*",)))
  tx = optim.make_optimizer(labels, optax.constant_schedule(1e-5), clip_norm=0.0)
  fn = jax.jit(step_lib.make_step(cfg, objective.loss_config({}, cfg), labels, tx), donate_argnums=(0,))
  b = jax.tree.map(jax.numpy.asarray, batch(a.batch, a.seq, cfg.vocab_size))
  holder = {"s": step_lib.init_state(params, tx)}

  def step():
    holder["s"], m = fn(holder["s"], b)
    jax.block_until_ready(m["loss"])

  t = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t
  ts = time_steps(step, a.steps, a.warmup)
  return {"impl": f"h3jax ({a.dispatch}, remat {a.remat})", "compile_s": compile_s, **_summary(ts, a)}


def bench_torch(a) -> dict:
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM
  torch.manual_seed(0)
  s = shapes(a.layers)
  hf = MixtralConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                     intermediate_size=s["intermediate_size"], num_hidden_layers=a.layers,
                     num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                     head_dim=s["head_dim"], tie_word_embeddings=True, num_local_experts=3,
                     num_experts_per_tok=a.top_k, router_aux_loss_coef=0.0, output_router_logits=False,
                     max_position_embeddings=s["max_position_embeddings"])
  model = MixtralForCausalLM(hf).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
  ids = torch.as_tensor(batch(a.batch, a.seq, s["vocab_size"])["input_ids_BT"], dtype=torch.long)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()

  ts = time_steps(step, a.steps, a.warmup)
  return {"impl": f"torch {torch.__version__} MixtralForCausalLM", "threads": torch.get_num_threads(),
          **_summary(ts, a)}


def _summary(ts, a) -> dict:
  med = float(np.median(ts))
  return {"layers": a.layers, "batch": a.batch, "seq": a.seq, "top_k": a.top_k, "steps": len(ts),
          "sec_per_step": med, "tokens_per_s": a.batch * a.seq / med}


def main():
  from h3jax.config import REMAT
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--dispatch", default="capacity", choices=("dense", "capacity", "ragged"))
  p.add_argument("--remat", default=None, choices=REMAT,
                 help="h3jax's remat policy (default: what `h3jax.train` trains an MoE with, remat 'auto')")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--only", choices=("h3jax", "torch"), default=None)
  a = p.parse_args()
  if a.remat is None:
    from h3jax.train import defaults, stages
    a.remat = stages.resolve_remat(defaults.default_config(), moe=True)
  if a.only != "torch":
    print(json.dumps(bench_h3jax(a)), flush=True)
  if a.only != "h3jax":
    print(json.dumps(bench_torch(a)), flush=True)


if __name__ == "__main__":
  main()

r"""bf16 speed on an accelerator: train-step MFU of SmolLM2-135M and of its fused 3-expert top-2 MoE at >= 64k
tokens per step, and greedy decode tokens/s (issue 12's GPU check; benchmarks/gpu_check.sh adds the merges).

  python benchmarks/gpu_speed.py --out $OUT/gpu_speed.json            # on the GPU machine (~3-5 min)
  .venv/bin/python benchmarks/gpu_speed.py --tiny --out /tmp/g.json   # the same code on CPU, tiny sizes

Random weights of SmolLM2-135M's shapes (the 540 MB checkpoint does not need to travel), float32 master
weights, bfloat16 compute (`ModelConfig.dtype`), AdamW on every weight (the MoE: every weight too, as a
full Stage B would be the upper bound of its cost). MFU = model FLOPs per step (6 x weights read per token
x tokens + causal attention; the MoE counts the k experts a token uses) / step time / the chip's dense
bf16 peak (`--peak_tflops`, else a table of known chips). Prints a table and writes JSON with the date,
device and every setting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from h3jax import fusion  # noqa: E402
from h3jax.hf.config_io import hf_config_to_model_config  # noqa: E402
from h3jax.model import params as params_lib  # noqa: E402
from h3jax.train import objective, optim, step as step_lib  # noqa: E402
from timing import best_of, decode_tok_s, train_flops  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by device_kind substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, hidden_act="silu")
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def peak_flops(device, override: float | None) -> float | None:
  if override:
    return override * 1e12
  kind = getattr(device, "device_kind", "")
  return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def active_params(cfg, params) -> int:
  """Weights a token reads: every weight, less the experts it does not use (MoE: k of E)."""
  n = sum(x.size for x in jax.tree.leaves(params))
  if cfg.is_moe:
    experts = sum(x.size for x in jax.tree.leaves(params["layers"]["moe"]["experts"]))
    n -= experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
  return n


def step_seconds(cfg, params, B: int, T: int, accum: int, repeats: int) -> float:
  rs = np.random.RandomState(0)
  batch = {"input_ids_BT": rs.randint(3, cfg.vocab_size, (B, T)).astype(np.int32),
           "attention_mask_BT": np.ones((B, T), np.int32), "task_B": np.zeros((B,), np.int32),
           "loss_mask_BT": np.ones((B, T), np.int32)}
  batch = jax.device_put(batch)
  labels = optim.param_labels(params, optim.trainable_rules(lora=False, router=cfg.is_moe, extra=("*",)))
  tx = optim.make_optimizer(labels, optax.constant_schedule(1e-5))
  state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)  # a copy: the step donates its state
  fn = jax.jit(step_lib.make_step(cfg, objective.LossConfig(), labels, tx, accum=accum, seed=0),
               donate_argnums=0)
  holder = {"state": state}

  def run():
    holder["state"], _ = fn(holder["state"], batch)
    jax.block_until_ready(holder["state"])
  run()  # compile
  return best_of(run, repeats)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--accum", type=int, default=1, help="microbatches per step (the same tokens per step)")
  ap.add_argument("--remat", default="dots", help="none | full | dots")
  ap.add_argument("--decode_batches", default="1,8,64")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--sections", default="train,moe,decode")
  ap.add_argument("--peak_tflops", type=float, default=None)
  ap.add_argument("--tiny", action="store_true", help="tiny model and batch: check the script on a CPU")
  ap.add_argument("--out", default="benchmarks/results/gpu_speed.json")
  args = ap.parse_args()
  if args.tiny:
    args.batch, args.seq, args.decode_batches, args.new_tokens, args.repeats = 2, 64, "1,2", 32, 2
  dev = jax.devices()[0]
  res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "device": str(dev), "device_kind": getattr(dev, "device_kind", ""), "platform": dev.platform,
         "jax": jax.__version__, "settings": vars(args), "rows": []}
  peak = peak_flops(dev, args.peak_tflops)
  res["peak_bf16_tflops"] = peak / 1e12 if peak else None
  cfg = hf_config_to_model_config(TINY if args.tiny else SMOLLM2_135M).replace(dtype="bfloat16", remat=args.remat)
  params = params_lib.init_params(cfg, jax.random.key(0))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def record(row):
    res["rows"].append(row)
    print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    out.write_text(json.dumps(res, indent=1) + "\n")  # after every row: a cut-short run keeps what it measured

  sections = args.sections.split(",")
  B, T = args.batch, args.seq
  models = {"dense": (cfg, params)}
  if "moe" in sections:
    mcfg, mparams = fusion.fuse_params(cfg, params, [cfg] * 3, [params] * 3, top_k=2)
    models["moe"] = (mcfg.replace(dtype="bfloat16", remat=args.remat), mparams)
  for name, (c, p) in models.items():
    if name == "dense" and "train" not in sections:
      continue
    s = step_seconds(c, p, B, T, args.accum, args.repeats)
    flops = train_flops(c, active_params(c, p), B, T)
    record({"what": f"train step, {name}", "tokens_per_step": B * T, "step_s": s, "tok_s": B * T / s,
            "model_tflops": flops / s / 1e12, "mfu": flops / s / peak if peak else None,
            "moe_dispatch": c.moe_dispatch if c.is_moe else None})
  if "decode" in sections:
    for b in map(int, args.decode_batches.split(",")):
      record({"what": f"greedy decode, batch {b}", "tok_s": decode_tok_s(params, cfg, b, 32, args.new_tokens,
                                                                          args.repeats)[0]})
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

r"""h3jax vs transformers (torch) on SmolLM2-135M-Instruct, same machine, same run.

  .venv/bin/python benchmarks/model_speed.py --model artifacts/smollm2-135m-instruct

Prints a table and writes benchmarks/results/model_speed.json:
  (a) forward+backward tokens/s (h3jax vs torch) and h3jax's achieved fraction of
      the jax fp32 matmul peak measured in this run, h3jax with the training default's
      remat policy for a full fine-tune (`train.stages.resolve_remat`: "dots") and, beside it,
      with none (every activation saved), the three timed in interleaved rounds (best of
      --repeats each);
  (b) greedy decode tokens/s at batch 1 and 8 (h3jax vs `generate`), with the
      weight-streaming limit (weight bytes per step / the memory bandwidth, read in each
      of --decode_rounds rounds just before h3jax's decode is timed);
  (c) load time (h3jax.load_pretrained vs from_pretrained);
  (d) greedy decode tokens/s at batch 1 and 8 of a fused 3-expert top-2 MoE of the
      model (`--moe DIR`, else the model fused with itself with a random router,
      written as a Mixtral folder; either read with load_pretrained, whose default
      dispatch is `sparse`), with the sparse and the dense dispatch, each ÷ the dense
      model's decode tokens/s measured beside it; also as CPU-time ratios (less
      disturbed by other jobs) and the ratio at the weight-streaming limit (the dense
      model's weight bytes per step ÷ the MoE's, reading k experts per layer at batch
      1 and min(E, 8k) at batch 8);
  (e) a LoRA SFT step (frozen base, configs/smollm2.py's LoRA: r=8, alpha=4,
      dropout 0.1 on gate/up/down) ÷ a full fine-tune step, both AdamW, on the same
      --lora_batch x --lora_seq batch (each with the training default's remat, and the full
      step also at the LoRA step's), and the backprop floor (a step training only the
      norm scales: forward + activation gradients, no weight-gradient dot) ÷ the full step, the four
      timed in interleaved rounds (best of --repeats each).
`--sections` runs a subset (train,decode,load,moe,lora). Run it on an otherwise idle
machine: every number is a ratio taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import h3jax
from h3jax import fusion, generation
from h3jax.kernels import cpu_matmul, native
from h3jax.model import llama, params as params_lib
from h3jax.train import lora, objective, optim, step as step_lib
from decode_limit import decode_limit_rounds, kernel_calls
from timing import best_of, cpu_model, decode_tok_s, interleaved_rounds, read_bandwidth, train_flops


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / best_of(lambda: f(a).block_until_ready(), repeats)


def jax_train_step(params, cfg, ids):
  def loss_fn(p):
    logits_BTV = llama.forward(p, ids[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, ids[:, 1:]).mean()
  return jax.jit(jax.value_and_grad(loss_fn))


def torch_train_step(hf, ids):
  """transformers' forward+backward on ids[:, :-1] (labels shifted inside the model), gradients reset."""
  tids = torch.as_tensor(ids)

  def step():
    hf.zero_grad(set_to_none=True)
    hf(tids[:, :-1], labels=tids[:, :-1]).loss.backward()
  return step


def bench(args) -> dict:
  torch.set_num_threads(os.cpu_count())
  res = {"device": str(jax.devices()[0]), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
         "load_average": os.getloadavg()[0], "jax": jax.__version__,
         "torch": torch.__version__, "B": args.batch, "T": args.seq}
  t0 = time.perf_counter()
  cfg, params = h3jax.load_pretrained(args.model, dtype="float32")
  jax.block_until_ready(params)
  res["load_s_h3jax"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
  res["load_s_torch"] = time.perf_counter() - t0
  sections = set(args.sections.split(","))
  if not sections & {"train", "decode"}:
    hf = None  # only its load time was wanted: free the memory for the MoE

  res["matmul_peak_gflops"] = matmul_peak_flops() / 1e9
  res["read_bandwidth_gbs"] = read_bandwidth() / 1e9

  if "train" in sections:
    train_rows(res, cfg, params, hf, args)
  if "decode" in sections:
    decode_rows(res, cfg, params, hf, args)
  if "moe" in sections:
    moe_decode(res, cfg, params, args)
  if "lora" in sections:
    lora_vs_full_step(res, cfg, params, args)
  return res


def train_remat(lora_enabled: bool) -> str:
  """The remat policy `python -m h3jax.train` runs a full fine-tune (or a LoRA one) with by default."""
  from h3jax.train import defaults, stages
  config = defaults.default_config()
  config.lora.enabled = lora_enabled
  return stages.resolve_remat(config)


def train_rows(res: dict, cfg, params, hf, args):
  """(a), in interleaved rounds (this machine's speed drifts by 10-40% over minutes): h3jax with the training
  default's remat policy (the row) and with none (every activation saved), and transformers."""
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
  remat = train_remat(lora_enabled=False)
  runs = {}
  for name, r in (("h3jax", remat), ("h3jax_remat_none", "none")):
    step = jax_train_step(params, cfg.replace(remat=r), jnp.asarray(ids))
    runs[name] = lambda step=step: jax.block_until_ready(step(params))
  hf.train()
  runs["torch"] = torch_train_step(hf, ids)
  for run in runs.values():
    run()  # compile / warm up
  times = interleaved_rounds(runs, args.repeats)
  hf.eval()
  t_jax, t_none, t_torch = (min(times[k]) for k in ("h3jax", "h3jax_remat_none", "torch"))
  n_params = params_lib.num_params(params)
  tokens = args.batch * args.seq
  res.update(train_remat=remat, train_step_times_s=times,
             train_tok_s_h3jax=tokens / t_jax, train_tok_s_torch=tokens / t_torch,
             train_speedup=t_torch / t_jax, train_speedup_remat_none=t_torch / t_none,
             train_frac_of_matmul_peak=train_flops(cfg, n_params, args.batch, args.seq) / t_jax
             / (res["matmul_peak_gflops"] * 1e9))


def decode_rows(res: dict, cfg, params, hf, args):
  """(b), with the CPU decode kernel (h3jax.kernels.cpu_matmul, what `generate` uses on CPU) and without it
  (H3JAX_CPU_KERNELS=0: XLA's dots) in the same run."""
  n_matmul_params = params_lib.num_params(params) - params["embed"]["embedding"].size * (not cfg.tie_word_embeddings)
  # at batch 8 a step also cannot beat the matmul peak: 2 FLOP per weight (the head included) per token
  roof_tok_s = res["matmul_peak_gflops"] * 1e9 / (2 * n_matmul_params)
  res["decode_cpu_kernel"] = cpu_matmul.available()
  for B in (1, 8):
    prompt = np.random.RandomState(B).randint(3, cfg.vocab_size, (B, args.prompt_len))
    n = args.new_tokens
    for name, kernel in (("h3jax", "1"), ("h3jax_xla", "0")):
      os.environ[native.ENABLE_ENV] = kernel  # read when generation unstacks (and packs) the params
      p = llama.unstack_layers(params, cfg)  # once, as `generate` does for all its batches
      ours = lambda k, p=p: generation.generate_tokens(p, cfg, prompt, np.ones_like(prompt), max_new_tokens=k)
      if name == "h3jax":
        decode_limit_rounds(res, ours, kernel_calls(p, B), n, B, decode_weight_bytes(params), args.decode_rounds)
      else:  # timing includes prefill; subtract a 1-token run to isolate decode steps
        t = best_of(lambda: ours(n), args.repeats) - best_of(lambda: ours(1), args.repeats)
        res[f"decode_tok_s_{name}_b{B}"] = B * (n - 1) / t
      del p
    del os.environ[native.ENABLE_ENV]
    tp = torch.as_tensor(prompt)

    def theirs(k):
      with torch.no_grad():
        hf.generate(tp, attention_mask=torch.ones_like(tp), do_sample=False, max_new_tokens=k, min_new_tokens=k,
                    pad_token_id=0)
    t_theirs = best_of(lambda: theirs(n), args.repeats) - best_of(lambda: theirs(1), args.repeats)
    res[f"decode_tok_s_torch_b{B}"] = B * (n - 1) / t_theirs
    res[f"decode_speedup_b{B}"] = res[f"decode_tok_s_h3jax_b{B}"] / res[f"decode_tok_s_torch_b{B}"]
    res[f"decode_kernel_speedup_b{B}"] = res[f"decode_tok_s_h3jax_b{B}"] / res[f"decode_tok_s_h3jax_xla_b{B}"]
  res["decode_weight_streaming_limit_tok_s_b1"] = res["decode_streaming_limit_tok_s_best_round_b1"]
  res["decode_limit_tok_s_b8"] = min(8 * res["decode_streaming_limit_tok_s_best_round_b8"], roof_tok_s)
  res["decode_frac_of_streaming_limit_b1"] = (res["decode_tok_s_h3jax_b1"]
                                               / res["decode_weight_streaming_limit_tok_s_b1"])
  res["decode_frac_of_limit_b8"] = res["decode_tok_s_h3jax_b8"] / res["decode_limit_tok_s_b8"]
  r1, r8 = res["decode_rounds_b1"], res["decode_rounds_b8"]
  r8["frac_of_limit"] = [t / min(8 * lim, roof_tok_s) for t, lim in zip(r8["tok_s"], r8["streaming_limit_tok_s"])]
  res["decode_frac_median_round_b1"] = float(np.median(r1["frac_of_streaming"]))
  res["decode_frac_median_round_b8"] = float(np.median(r8["frac_of_limit"]))


def decode_weight_bytes(params, experts_read: int = 1, num_experts: int = 1) -> float:
  """Weight bytes a decode step streams: the layers and the head (a tied embedding once, as the head;
  the embedding lookup reads rows only); of an MoE's experts, `experts_read` of `num_experts`."""
  head = params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["embedding"]
  n = float(head.nbytes)
  for path, x in jax.tree_util.tree_leaves_with_path(params["layers"]):
    n += x.nbytes * (experts_read / num_experts if "experts" in jax.tree_util.keystr(path) else 1.0)
  return n


def write_self_fused(model: str, out: str):
  """The model fused with itself (3 experts, top-2, random router: near-balanced routing) as a Mixtral
  folder. Run in a child process: the fusion's transient copies never enter the measuring process."""
  cfg, params = h3jax.load_pretrained(model, dtype="float32")
  mcfg, mparams = fusion.fuse_params(cfg, params, [cfg] * 3, [params] * 3, top_k=2)
  h3jax.save_pretrained(mparams, mcfg, out)


def load_moe(args, tmp: str):
  """(source, (cfg, params)) of the MoE as load_pretrained reads it: --moe, else the self-fused model."""
  if args.moe:
    return args.moe, h3jax.load_pretrained(args.moe, dtype="float32")
  out = str(pathlib.Path(tmp) / "moe")
  child = multiprocessing.get_context("spawn").Process(target=write_self_fused, args=(args.model, out))
  child.start()
  child.join()
  if child.exitcode:
    raise RuntimeError(f"fusing {args.model} with itself failed (exit code {child.exitcode})")
  loaded = jax.block_until_ready(h3jax.load_pretrained(out, dtype="float32"))
  return "model fused with itself (3 experts, top-2, random router)", loaded


def moe_decode(res: dict, cfg, params, args):
  """(d): the fused MoE's decode tokens/s with the sparse and the dense dispatch ÷ the dense model's."""
  with tempfile.TemporaryDirectory() as tmp:
    res["moe_source"], (mcfg, mparams) = load_moe(args, tmp)
  res["moe_load_pretrained_dispatch"] = mcfg.moe_dispatch
  E, k = mcfg.num_experts, mcfg.num_experts_per_tok
  for B in (1, 8):
    res[f"moe_streaming_ratio_b{B}"] = decode_weight_bytes(params) / decode_weight_bytes(mparams, min(E, k * B), E)
    speed = lambda p, c: decode_tok_s(p, c, B, args.prompt_len, args.new_tokens, args.repeats)
    wall, cpu = speed(params, cfg)  # measured beside the MoE runs: the same load on the machine
    res[f"moe_baseline_tok_s_b{B}"], res[f"moe_baseline_tok_s_cpu_b{B}"] = wall, cpu
    for dispatch in ("sparse", "dense"):
      tok_s, tok_s_cpu = speed(mparams, mcfg.replace(moe_dispatch=dispatch))
      res[f"moe_decode_tok_s_{dispatch}_b{B}"] = tok_s
      res[f"moe_decode_ratio_{dispatch}_b{B}"] = tok_s / wall
      res[f"moe_decode_ratio_{dispatch}_cpu_b{B}"] = tok_s_cpu / cpu


def lora_vs_full_step(res: dict, cfg, params, args):
  """(e): seconds of a LoRA SFT step and of a full fine-tune step on the same batch."""
  B, T = args.lora_batch, args.lora_seq
  rs = np.random.RandomState(1)
  batch = {"input_ids_BT": rs.randint(3, cfg.vocab_size, (B, T)).astype(np.int32),
           "attention_mask_BT": np.ones((B, T), np.int32), "task_B": np.zeros((B,), np.int32),
           "loss_mask_BT": (np.arange(T)[None] >= T // 4).repeat(B, 0).astype(np.int32)}

  def step_fn(c, p, labels):
    """A compiled step on its own state, warmed up: call it to time one step."""
    tx = optim.make_optimizer(labels, optax.constant_schedule(1e-5))
    state = step_lib.init_state(p, tx)
    fn = jax.jit(step_lib.make_step(c, objective.LossConfig(), labels, tx, seed=0))  # no donation
    run = lambda: jax.block_until_ready(fn(state, batch))
    run()
    return run

  # Each as `h3jax.train` runs it by default: LoRA without remat, a full fine-tune with "dots"; the floor as the
  # LoRA step (it bounds that step). The full step without remat too: the ratio at one policy.
  full_cfg, lora_cfg = (cfg.replace(remat=train_remat(lora_enabled=e)) for e in (False, True))
  lp = lora.add_lora(params, lora.FFN_TARGETS, 8, jax.random.key(1))
  full_labels = optim.param_labels(params, optim.trainable_rules(lora=False, router=False, extra=("*",)))
  runs = {
      "lora": step_fn(lora.lora_model_config(lora_cfg, 8, 4.0, 0.1), lp,
                      optim.param_labels(lp, optim.trainable_rules(lora=True, router=False))),
      "full": step_fn(full_cfg, params, full_labels),
      "full_as_lora": step_fn(lora_cfg, params, full_labels),
      # The floor of any step that trains something in the first layer: the forward and the activation
      # gradients through every layer, no weight-gradient dot (only the per-layer norm scales are trained).
      "floor": step_fn(lora_cfg, params, optim.param_labels(params, optim.trainable_rules(
          lora=False, router=False, extra=("layers/attn_norm/*",)))),
  }
  times = interleaved_rounds(runs, args.repeats)
  t_lora, t_full, t_same, t_floor = (min(times[k]) for k in ("lora", "full", "full_as_lora", "floor"))
  res["lora_step_times_s"] = times
  res.update(lora_batch=B, lora_seq=T, lora_remat=lora_cfg.remat, full_remat=full_cfg.remat, lora_step_s=t_lora,
             full_step_s=t_full, lora_over_full_step=t_lora / t_full, full_step_same_remat_s=t_same,
             lora_over_full_step_same_remat=t_lora / t_same,
             backprop_floor_step_s=t_floor, backprop_floor_over_full_step=t_floor / t_full,
             backprop_floor_over_full_step_same_remat=t_floor / t_same)


def kernels_line(res: dict) -> str:
  """The decode step's kernel calls alone against the batch-1 streaming limit, per round, and the step's time
  outside them: how much of the gap to the limit is the kernels' and how much the rest of the step's."""
  r = res["decode_rounds_b1"]
  if "kernels_frac_of_streaming" not in r:
    return ""
  return (" Batch 1, the step's kernel calls alone: "
          + ", ".join(f"{100 * f:.0f}%" for f in r["kernels_frac_of_streaming"])
          + " of the limit per round; the step's time outside them: " + ", ".join(
              f"{t:.1f}" for t in r["step_ms_outside_kernels"]) + " ms.")


def table(res: dict) -> str:
  rows = []
  if "train_tok_s_h3jax" in res:
    rows.append(("fwd+bwd tokens/s", res["train_tok_s_h3jax"], res["train_tok_s_torch"], res["train_speedup"]))
  for B in (1, 8):
    if f"decode_tok_s_torch_b{B}" in res:
      rows.append((f"decode tokens/s, batch {B}", res[f"decode_tok_s_h3jax_b{B}"], res[f"decode_tok_s_torch_b{B}"],
                   res[f"decode_speedup_b{B}"]))
  rows.append(("load time (s)", res["load_s_h3jax"], res["load_s_torch"], res["load_s_torch"] / res["load_s_h3jax"]))
  lines = [f"{res['cpu_model']}, {res['cpu_count']} cores, load average {res['load_average']:.1f} at the start", "",
           "| measure | h3jax | transformers | ratio |", "|---|---:|---:|---:|"]
  lines += [f"| {name} | {a:.1f} | {b:.1f} | {r:.2f}x |" for name, a, b, r in rows]
  if "train_frac_of_matmul_peak" in res:
    lines += ["", f"fwd+bwd at {100 * res['train_frac_of_matmul_peak']:.0f}% of the measured fp32 matmul peak "
              f"({res['matmul_peak_gflops']:.0f} GFLOP/s), remat {res['train_remat']!r}; with every activation "
              f"saved (remat 'none') {res['train_speedup_remat_none']:.2f}x transformers."]
  if "decode_frac_of_streaming_limit_b1" in res:
    lines += ["", f"Decode batch 1 at {100 * res['decode_frac_of_streaming_limit_b1']:.0f}% of the weight-streaming "
              f"limit ({res['decode_weight_streaming_limit_tok_s_b1']:.1f} tok/s at "
              "the fastest bandwidth of the interleaved rounds); batch 8 at "
              f"{100 * res['decode_frac_of_limit_b8']:.0f}% of min(8 x that, the matmul peak's "
              f"{res['matmul_peak_gflops']:.0f} GFLOP/s ÷ 2 FLOP per weight) = {res['decode_limit_tok_s_b8']:.0f} "
              "tok/s. Per round (each against its own bandwidth): batch 1 " + ", ".join(
                  f"{100 * f:.0f}%" for f in res["decode_rounds_b1"]["frac_of_streaming"])
              + f" (median {100 * res['decode_frac_median_round_b1']:.0f}%), batch 8 " + ", ".join(
                  f"{100 * f:.0f}%" for f in res["decode_rounds_b8"]["frac_of_limit"])
              + f" (median {100 * res['decode_frac_median_round_b8']:.0f}%)." + kernels_line(res)
              + " CPU decode kernel "
              f"{'on' if res['decode_cpu_kernel'] else 'unavailable'}; XLA's dots alone: " + ", ".join(
                  f"batch {B} {res[f'decode_tok_s_h3jax_xla_b{B}']:.1f} tok/s "
                  f"(kernel {res[f'decode_kernel_speedup_b{B}']:.2f}x)" for B in (1, 8)) + "."]
  if "moe_decode_ratio_sparse_b1" in res:
    lines += ["", f"MoE ({res['moe_source']}; load_pretrained picks `{res['moe_load_pretrained_dispatch']}`) "
              "greedy decode tokens/s ÷ the dense model's, wall (CPU time):",
              "| model | batch 1 | batch 8 |", "|---|---:|---:|",
              "| dense model | " + " | ".join(f"{res[f'moe_baseline_tok_s_b{B}']:.1f} tok/s" for B in (1, 8)) + " |"]
    for d in ("sparse", "dense"):
      lines.append(f"| MoE, `{d}` dispatch | " + " | ".join(
          f"{res[f'moe_decode_tok_s_{d}_b{B}']:.1f} tok/s = {res[f'moe_decode_ratio_{d}_b{B}']:.2f}x "
          f"({res[f'moe_decode_ratio_{d}_cpu_b{B}']:.2f}x)" for B in (1, 8)) + " |")
    lines.append("| MoE at the weight-streaming limit | " + " | ".join(
        f"{res[f'moe_streaming_ratio_b{B}']:.2f}x" for B in (1, 8)) + " |")
  if "lora_over_full_step" in res:
    lines += ["", f"LoRA SFT step {res['lora_step_s']:.2f} s (remat {res['lora_remat']!r}) ÷ full fine-tune step "
              f"{res['full_step_s']:.2f} s (remat {res['full_remat']!r}), batch {res['lora_batch']} x "
              f"{res['lora_seq']}: {res['lora_over_full_step']:.2f}x; ÷ the full step at the LoRA step's remat "
              f"({res['full_step_same_remat_s']:.2f} s): {res['lora_over_full_step_same_remat']:.2f}x. The backprop "
              f"floor (forward + activation gradients, no weight-gradient dot: only the norm scales trained) "
              f"{res['backprop_floor_step_s']:.2f} s = {res['backprop_floor_over_full_step']:.2f}x / "
              f"{res['backprop_floor_over_full_step_same_remat']:.2f}x"]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--decode_rounds", type=int, default=5)
  ap.add_argument("--moe", default="", help="a fused Mixtral folder; empty: fuse --model with itself")
  ap.add_argument("--lora_batch", type=int, default=8)
  ap.add_argument("--lora_seq", type=int, default=256)
  ap.add_argument("--sections", default="train,decode,moe,lora")
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

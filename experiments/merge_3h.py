r"""Weight-space fusion of the three 3H experts (the RESM comparison), evaluated side by side.

  make quickstart   # makes runs/quickstart: base + helpful/harmless/honest LoRA experts
  H3JAX_DATA_ROOT=../shared/data .venv/bin/python experiments/merge_3h.py \
      --run runs/quickstart --out runs/merge_3h --limit 2

Loads the quickstart's base (SmolLM2-135M-Instruct) and its three Stage-A experts
(LoRA folded in), merges them with each method below, writes every merged model
as an HF folder under --out (the experts too, as they were merged), then runs the
3H evaluation on base, the experts, the MoE fusion of the same experts
(runs/quickstart/fusion/hf) and every merge, and prints one table (also
--out/eval/results.md, radar.png). --out/merge_stats.json holds each model's
distance from the base, ||x - base|| / ||base|| over all tensors, and how many
tensors it leaves exactly equal to the base. Expected: merges close to the base
on every axis, since the quickstart's experts train for a few steps only; use
configs/smollm2.py experts for a real comparison. RESM rows: `resm` with defaults
equals `tsv_m` (a reconstruction; see docs/merging.md), `resm_sparsity_sv` turns on
sparsity-aware ranks and singular-value outlier reweighting; `iso_cts` is Iso-CTS
(FusionBench defaults). Prompts use the chat template the experts were trained with
(--prompt_template; the evaluation's own default is Alpaca). Inputs and every merged
model are checked for NaN/inf before anything is saved or evaluated: a non-finite
tensor stops the run with one `error:` line naming the method and tensor.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

import h3jax
from h3jax import checkpoint, merging
from h3jax.fusion import merge_lora

AXES = ("helpful", "harmless", "honest")
METHODS = {
    "task_arithmetic": dict(lambda_=0.3),
    "ties": dict(density=0.2, lambda_=1.0),
    "dare_ties": dict(density=0.2, seed=0),
    "tsv_m": dict(alpha=1.0),
    "resm": dict(),
    "resm_sparsity_sv": dict(rank_mode="sparsity", outlier_mode="sv"),
    "iso_cts": dict(scaling_factor=1.0, common_space_fraction=0.8),
}


def load_expert(workdir: pathlib.Path):
  cfg, params = checkpoint.load_params(workdir / "checkpoints")
  return merge_lora(params, cfg.lora_scale)


def weight_stats(base, params) -> dict:
  """How far params are from base: ||x - base|| / ||base|| over every tensor (float64 sums), and
  the number of tensors exactly equal to the base's (FFN-only LoRA experts leave most unchanged)."""
  pairs = [(np.asarray(b), np.asarray(x)) for b, x in zip(jax.tree.leaves(base), jax.tree.leaves(params))]
  d2 = sum(float(np.sum((x.astype(np.float64) - b) ** 2)) for b, x in pairs)
  b2 = sum(float(np.sum(b.astype(np.float64) ** 2)) for b, _ in pairs)
  return {"rel_dist": (d2 / b2) ** 0.5, "tensors_equal_base": sum(np.array_equal(b, x) for b, x in pairs),
          "tensors": len(pairs)}


def eval_config(prompt_template: str = "chat", max_new_tokens=None):
  """The 3H evaluation settings: the quickstart's experts are trained with the chat template
  (configs/smollm2_quickstart.py), so every model is evaluated with it, as `make quickstart` does."""
  from h3jax.evaluation import runner
  c = runner.default_config()
  c.prompt_template = prompt_template
  if max_new_tokens:
    c.generation.max_new_tokens = max_new_tokens
  return c


def same_as_base(eval_dir, names) -> dict:
  """Per model, how many of its generations are the base's text exactly (greedy decoding): the
  closeness check for merges of experts that barely moved, finer than win rates on a few items."""
  def responses(name):
    rows = [json.loads(l) for l in (eval_dir / f"samples_{name}.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in rows if "response" in r}
  base = responses("base")
  return {n: {"same": sum(base.get(i) == r for i, r in ours.items()), "n": len(ours)}
          for n, ours in ((n, responses(n)) for n in names)}


def run(run_dir, base_dir, out_dir, limit: int, methods=tuple(METHODS), evaluate: bool = True,
        config=None, reuse: bool = False, moe_fusion: bool = True) -> dict:
  run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
  cfg, base = h3jax.load_pretrained(base_dir)
  merging.check_finite(base, f"base model {base_dir}")
  experts = [merging.check_finite(load_expert(run_dir / a), f"expert {run_dir / a}") for a in AXES]
  models, stats = {"base": str(base_dir)}, {}
  for axis, params in zip(AXES, experts):  # evaluated as merged: LoRA folded, in the base's dtype
    dest = out_dir / "models" / axis
    if not (reuse and (dest / "config.json").exists()):
      h3jax.save_pretrained(params, cfg.replace(lora_scale=1.0), dest, overwrite=True,
                            tokenizer_source=models["base"])
    models[axis], stats[axis] = str(dest), weight_stats(base, params)
  if moe_fusion and (run_dir / "fusion" / "hf").exists():
    models["moe_fusion"] = str(run_dir / "fusion" / "hf")
  timings = {}
  for name in methods:
    hp = dict(METHODS[name])
    method = merging.get_method("resm" if name.startswith("resm") else name)
    dest = out_dir / "models" / name
    if reuse and (dest / "config.json").exists():  # an earlier run's merge: re-evaluate, do not re-merge
      merged = merging.check_finite(h3jax.load_pretrained(dest)[1], f"earlier merge {dest}")
    else:
      t0 = time.perf_counter()
      merged = method(base, experts, **hp)  # stacked layers one at a time on CPU (h3jax.merging.tree)
      timings[name] = time.perf_counter() - t0
      merging.check_finite(merged, f"merge {name} ({method.__name__} {hp}), not saved")
      h3jax.save_pretrained(merged, cfg.replace(lora_scale=1.0), dest, overwrite=True,
                            tokenizer_source=models["base"])
      print(f"[merge_3h] {name}: merged in {timings[name]:.1f}s -> {dest}", flush=True)
    models[name], stats[name] = str(dest), weight_stats(base, merged)
  if timings:
    (out_dir / "merge_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
  (out_dir / "merge_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
  for name, st in stats.items():
    print(f"[merge_3h] {name}: ||x - base|| / ||base|| = {st['rel_dist']:.3g}, "
          f"{st['tensors_equal_base']} of {st['tensors']} tensors equal to the base", flush=True)
  if not evaluate:
    return {"models": models, "timings": timings}
  from h3jax.evaluation import runner
  results = runner.compare(models, out_dir / "eval", limit=limit, config=config or eval_config())
  same = same_as_base(out_dir / "eval", results["models"])
  (out_dir / "eval" / "same_as_base.json").write_text(json.dumps(same, indent=2) + "\n")
  print("[merge_3h] generations identical to the base's: "
        + ", ".join(f"{n} {c['same']}/{c['n']}" for n, c in same.items()), flush=True)
  return results


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", default="runs/quickstart", help="quickstart workdir holding the experts")
  ap.add_argument("--base", default="artifacts/smollm2-135m-instruct", help="the experts' base HF folder")
  ap.add_argument("--out", default="runs/merge_3h")
  ap.add_argument("--limit", type=int, default=2, help="items per eval set")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--skip_eval", action="store_true", help="only write the merged models")
  ap.add_argument("--reuse", action="store_true", help="evaluate the models an earlier run wrote to --out")
  ap.add_argument("--no_moe_fusion", action="store_true",
                  help="leave out the MoE fusion row (the slowest model to evaluate on CPU)")
  ap.add_argument("--prompt_template", default="chat",
                  help="evaluation prompt format (the quickstart's experts are trained with chat)")
  ap.add_argument("--max_new_tokens", type=int, default=None, help="generation length (default 256)")
  args = ap.parse_args()
  try:
    run(args.run, args.base, args.out, args.limit, tuple(args.methods.split(",")),
        evaluate=not args.skip_eval, config=eval_config(args.prompt_template, args.max_new_tokens),
        reuse=args.reuse, moe_fusion=not args.no_moe_fusion)
  except merging.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()

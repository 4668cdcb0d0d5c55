"""Offline 3H evaluation: metrics, eval sets, cached generation, reports.

  from h3jax.evaluation import runner
  runner.evaluate(runner.default_config(), ["base=artifacts/smollm2-135m-instruct"], "eval_out", limit=8)

Modules: metrics (rates, win rates, length control), truthfulqa (MC1/MC2 and
truth/info rates), harm (refusal-based rates), helpful (pairwise win rates),
sets (eval sets by name), cache (per-model JSONL cache), models (loading),
infer (cached generation, MC log-probs, router usage), scoring (one model's
metrics, cached judge answers), report (table and plots), runner (the
pipeline); judges live in `h3jax.evaluation.judges`.
"""

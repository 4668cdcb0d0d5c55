r"""Full offline 3H evaluation (every eval split, greedy, 256 new tokens, trained judges).

  H3JAX_DATA_ROOT=../shared/data python -m h3jax.evaluate --config=configs/eval_full.py \
      --model=smollm2=artifacts/smollm2-135m-instruct --out eval_out/smollm2

Expected output: a markdown table (metrics as rows, models as columns, values
in % ± one standard error, n per metric) on stdout and in eval_out/smollm2/
results.md, plus results.json, samples_smollm2.jsonl and axis_bars.png.
Sample sizes: alpaca_eval 433, harmbench 240, strongreject 313, advbench 403,
xstest_safe 250, xstest_unsafe 200, truthfulqa_gen 415, truthfulqa_mc 415.
Every item is generated once and cached, so the run can be stopped and
resumed. Measured on 2 shared CPU cores with SmolLM2-135M: `--limit 24
--config.generation.max_new_tokens=128` took 22.6 min (168 generations in
16.5 min, 24 MC items in 5.8 min). Extrapolated, the full run (2,254
generations x 256 tokens + 415 MC items) takes about 8-9 hours there; it was
not run to completion. Pass `--limit N` for
a quick run on the first N items of each set.
"""

from h3jax.evaluation.runner import default_config


def get_config():
  return default_config()

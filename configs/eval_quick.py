r"""CI-sized 3H evaluation: 4 items per set, 48 new tokens, Alpaca template (the `--limit` smoke run).

  H3JAX_DATA_ROOT=../shared/data python -m h3jax.evaluate --config=configs/eval_quick.py \
      --model=smollm2=artifacts/smollm2-135m-instruct --out /tmp/eval_quick

Expected output: the markdown table with n = 4 per set (all 15 metric rows
once the judges are built with `python -m h3jax.evaluation.judges.train`,
else they are rebuilt on first use, ~4.5 min) and the judges' held-out
agreement table; results.json, results.md, samples_smollm2.jsonl and
axis_bars.png in --out. Add more --model flags to also get radar.png.
Measured on 2 shared CPU cores: `--limit 1 --config.generation.max_new_tokens=16`
117 s (the CI test; 120 s for its whole test file at load average ~5 after the
evaluation was restructured), a cached re-run 26 s; eval_full.py with `--limit 8
--config.generation.max_new_tokens=128` 8.5 min.
"""

from h3jax.evaluation.runner import default_config


def get_config():
  c = default_config()
  c.limit = 4
  c.batch_size = 4
  c.router_prompts = 8
  c.generation.max_new_tokens = 48
  return c

r"""CI-sized 3H evaluation: 4 items per set, 48 new tokens (the `--limit` smoke run).

  H3JAX_DATA_ROOT=../shared/data python -m h3jax.evaluate --config=configs/eval_quick.py \
      --model=smollm2=artifacts/smollm2-135m-instruct --out /tmp/eval_quick

Expected output: the markdown table with n = 4 per set (MC1/MC2 over 4
questions; judge rows when the trained judges are available) in about 2-3
minutes on 2 CPU cores; results.json, results.md, samples_smollm2.jsonl and
axis_bars.png in --out. Add more --model flags to also get radar.png.
"""

from h3jax.evaluation.runner import default_config


def get_config():
  c = default_config()
  c.limit = 4
  c.batch_size = 4
  c.router_prompts = 8
  c.generation.max_new_tokens = 48
  return c

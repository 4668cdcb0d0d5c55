r"""Full offline 3H evaluation (every eval split, Alpaca template, greedy, 256 new tokens, trained judges).

One process (XLA:CPU decodes on about one core):

  mkdir -p runs/eval_full && H3JAX_DATA_ROOT=../shared/data nohup \
      .venv/bin/python -m h3jax.evaluate --config=configs/eval_full.py \
      --model=smollm2=artifacts/smollm2-135m-instruct --out runs/eval_full/smollm2 \
      >> runs/eval_full/log.txt 2>&1 &  # append: a resumed run keeps the earlier log

Two cores: the same command with --shard=0/2 and with --shard=1/2, started
together (each generates a disjoint half into the shared cache and exits),
then the command above without --shard scores everything (~1 min).

Expected output: a markdown table (metrics as rows, models as columns, values
in % ± one standard error, n per metric) on stdout and in runs/eval_full/
smollm2/results.md, plus results.json, samples_smollm2.jsonl and axis_bars.png.
Sample sizes: alpaca_eval 433, harmbench 240, strongreject 313, advbench 403,
xstest_safe 250, xstest_unsafe 200, truthfulqa_gen 415, truthfulqa_mc 415.
SmolLM2-135M-Instruct's table is in the README (win rate vs text_davinci_003
50.0 %, pooled harmful compliance 92.9 %, MC2 42.0 %).

Work: 2,229 distinct prompts (of 2,254) x <= 256 new tokens in batches of 32
(sorted by length, ~12 padded prompt lengths; long prompts use fewer rows; a
batch is compacted as its rows finish) and 3,118 distinct MC (question,
choice) rows (the 16-token shared prefix cached). Measured for SmolLM2-135M on
this 2-core machine, summed over every session that filled the cache
(results.json timing.smollm2.compute): generation 10,378 CPU s, MC 1,374 CPU
s, judges 8 CPU s, ~3.3 CPU-hours; with two shards and other jobs on the
machine, the last 1,269 generations took 64 min wall. Every generation, MC
log-prob and judge answer is cached with its compute time (runs/eval_full/
smollm2/cache/smollm2.jsonl), so the run can be stopped and re-started with
the same command. Pass `--limit N` for a quick run on the first N items of
each set (a prefix of the full run: it shares the cache).
"""

from h3jax.evaluation.runner import default_config


def get_config():
  c = default_config()
  c.batch_size = 32  # decode throughput ~2x batch 16 on this CPU (a step costs about the same)
  return c

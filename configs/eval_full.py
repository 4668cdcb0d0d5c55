r"""Full offline 3H evaluation (every eval split, Alpaca template, greedy, 256 new tokens, trained judges).

  mkdir -p runs/eval_full && H3JAX_DATA_ROOT=../shared/data nohup nice -n 19 \
      .venv/bin/python -m h3jax.evaluate --config=configs/eval_full.py \
      --model=smollm2=artifacts/smollm2-135m-instruct --out runs/eval_full/smollm2 \
      >> runs/eval_full/log.txt 2>&1 &  # append: a resumed run keeps the earlier log

Expected output: a markdown table (metrics as rows, models as columns, values
in % ± one standard error, n per metric) on stdout and in runs/eval_full/
smollm2/results.md, plus results.json, samples_smollm2.jsonl and axis_bars.png.
Sample sizes: alpaca_eval 433, harmbench 240, strongreject 313, advbench 403,
xstest_safe 250, xstest_unsafe 200, truthfulqa_gen 415, truthfulqa_mc 415.
Every generation, MC log-prob and judge answer is cached with its compute
time (runs/eval_full/smollm2/cache/smollm2.jsonl), so the run can be stopped
and re-started with the same command; results.json's timing.<model>.compute
sums wall and CPU seconds per stage over all sessions, and the log prints one
progress line (done/total, s/item, ETA) per batch.

Work: 2,229 distinct prompts (of 2,254) x <= 256 new tokens in batches of 32
(prompts sorted by length, padded to 48/64/96/... tokens: ~12 compiled shapes;
long prompt buckets use fewer rows), 3,118 distinct MC (question, choice) rows
(~140k padded tokens once the 16-token shared prefix is cached; the old
full-row scoring padded ~210k, ~685k with the QA primer), and n-gram judges
(seconds). Measured on the 2 shared CPU cores (load average 8-12 from other
jobs, this run at nice 19), SmolLM2-135M, 2026-11-23: the first generation
batch (32 prompts, compile included) took 411 s = 12.9 s/prompt; MC scoring
took 2.5 s/row (56 rows in 138 s after compiling; QA format). At those loaded
rates the full run needs ~8 h of generation + ~2 h of MC; on an idle machine
(decode ~4x faster) about 2-3 h in all. The previous code measured 14 s per
MC item (24 items in 5.8 min) and recompiled for each 16-token prompt length
(41 shapes).
Pass `--limit N` for a quick run on the first N items of each set (a prefix of
the full run: it shares the cache).
"""

from h3jax.evaluation.runner import default_config


def get_config():
  c = default_config()
  c.batch_size = 32  # decode throughput ~2x batch 16 on this CPU (a step costs about the same)
  return c

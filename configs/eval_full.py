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
(~1 ms per row). Measured on the 2 shared CPU cores (load average 8-12 from
other jobs, this run at nice 19), SmolLM2-135M, 2026-11-23 (MC runs first):
MC scoring 0.45 CPU s and 0.66 s wall per row (256-row steps of ~115 CPU s),
i.e. ~35 min wall for all 3,118 rows; generation batches of 32 short prompts
took 411 s (first, compile included) and 346 s wall, so ~70 batches need ~7 h
at that load (an idle machine should be 2-3x faster: not measured). The
previous code took 14 s per MC item (24 items in 5.8 min; 415 items ~1.6 h)
and recompiled generation for each 16-token prompt length (41 shapes).
Pass `--limit N` for a quick run on the first N items of each set (a prefix of
the full run: it shares the cache).
"""

from h3jax.evaluation.runner import default_config


def get_config():
  c = default_config()
  c.batch_size = 32  # decode throughput ~2x batch 16 on this CPU (a step costs about the same)
  return c

r"""`h3jax-evaluate` / `python -m h3jax.evaluate`: 3H evaluation of one or several models.

  python -m h3jax.evaluate --config=configs/eval_full.py \
      --model=base=artifacts/smollm2-135m-instruct [--model=fused=runs/fused/hf ...] \
      --limit 8 --out eval_out

Models are HF folders, training workdirs, PEFT adapter folders or BASE+ADAPTER. Writes
eval_out/{results.json, results.md, samples_<model>.jsonl, axis_bars.png,
radar.png (several models), router_<model>.png (MoE)} and caches generations,
MC log-probs and judge answers with their compute time in
eval_out/cache/<model>.jsonl, so a re-run (or an interrupted one) only computes
what is missing; progress goes to stderr, one line per batch. The library
function is `h3jax.evaluation.runner.evaluate`.

XLA:CPU decodes on about one core: `--shard=0/2` and `--shard=1/2` started
together fill two cores with disjoint halves of the missing generations (one
shared cache), then the same command without --shard scores everything.
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  common.define_config("config", "configs/eval_*.py")
  flags.DEFINE_multi_string("model", [], "[NAME=]DIR: an HF folder, a training workdir, a PEFT adapter "
                             "folder or BASE+ADAPTER; repeat to compare.")
  flags.DEFINE_integer("limit", None, "Items per eval set (0 = all); overrides config.limit.")
  flags.DEFINE_string("out", None, "Output folder (results, plots, generation cache).")
  flags.DEFINE_string("data_root", None, "Data root (overrides config.data_root and $H3JAX_DATA_ROOT).")
  common.define_compilation_cache("Persistent XLA compilation cache ('' disables): restarts and shards "
                                  "skip compiles.")
  flags.DEFINE_string("shard", None, "i/n: only generate part i of n of the missing responses into the "
                      "cache and exit (run n at once, one per core), then run without --shard to score.")


def main(argv):
  common.reject_args(argv)
  from h3jax.evaluation import report, runner
  config = FLAGS.config
  if FLAGS.data_root is not None:
    with config.unlocked():
      config.data_root = FLAGS.data_root
  if FLAGS.compilation_cache:
    from h3jax import compile_cache
    compile_cache.enable(FLAGS.compilation_cache)
  shard = runner.parse_shard(FLAGS.shard)
  if shard is not None:
    done = runner.generate_shards(config, FLAGS.model, FLAGS.out, shard, limit=FLAGS.limit)
    print(f"shard {FLAGS.shard}: responses cached per model: {done}; run without --shard to score")
    return
  from h3jax.merging.tree import NonFiniteError
  with common.one_line_errors(NonFiniteError):
    results = runner.evaluate(config, FLAGS.model, FLAGS.out, limit=FLAGS.limit)
  print(report.markdown_table(results))


def run():
  common.run(main, define_flags, required=["config", "out"])

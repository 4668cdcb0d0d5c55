r"""`h3jax-train` / `python -m h3jax.train`: train one stage.

  python -m h3jax.train --config=configs/tiny.py:sft --workdir=/tmp/run

Dotted overrides work: `--config.train.steps=20 --config.loss.gate_weight=0.01`.
Re-running the same command in the same workdir resumes from its latest
checkpoint. The library function is `h3jax.train.loop.train_and_evaluate`.
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  common.define_config("config", "Training config file (get_config()).")
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, export.")


def main(argv):
  del argv
  common.quiet_logs()  # Orbax logs every save at INFO; tqdm shows progress
  from h3jax.train import loop, sharding
  with common.one_line_errors(sharding.MeshError, code=2):  # raised before anything is loaded or compiled
    with common.one_line_errors(FloatingPointError, code=1):  # diverged: the bad state was not saved
      out = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(f"done: step {out['steps']} loss {out.get('loss', float('nan')):.4f} -> {out['workdir']}")


def run():
  common.run(main, define_flags, required=["config", "workdir"])

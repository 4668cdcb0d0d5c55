r"""Train one stage: `python -m h3jax.train --config=configs/tiny.py:sft --workdir=/tmp/run`.

Dotted overrides work: `--config.train.steps=20 --config.loss.gate_weight=0.01`.
Re-running the same command in the same workdir resumes from its latest
checkpoint. The library function is `h3jax.train.loop.train_and_evaluate`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines this CLI's flags (only when run as a program, so importing the module
  never collides with other CLIs' flags of the same name)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, export.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; tqdm shows progress
  from h3jax.train import loop, sharding
  try:
    out = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except sharding.MeshError as e:  # raised before anything is loaded or compiled
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # diverged: nothing of the bad state was saved or exported
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {out['steps']} loss {out.get('loss', float('nan')):.4f} -> {out['workdir']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""`h3jax-pipeline` / `python -m h3jax.pipeline`: the whole H^3Fusion chain in one call.

  python -m h3jax.pipeline --config=configs/smollm2_quickstart.py --workdir=runs/quickstart
  python -m h3jax.pipeline --config=configs/tiny.py:pipeline --workdir=/tmp/h3tiny

Stage A x N -> fuse -> Stage B -> Mixtral export -> answer, each stage resumed or skipped when the
command is re-run; `--config.x` overrides. The library function is
`h3jax.train.h3fusion.run_pipeline` (its docstring describes the config and the workdir).
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  common.define_config("config", "Pipeline config file (get_config()).")
  flags.DEFINE_string("workdir", None, "Run directory for every stage.")


def main(argv):
  del argv
  common.quiet_logs()
  from h3jax.train import h3fusion
  with common.one_line_errors(FloatingPointError, code=1):  # a stage diverged; its bad state was not saved
    h3fusion.run_pipeline(FLAGS.config, FLAGS.workdir)


def run():
  common.run(main, define_flags, required=["config", "workdir"])

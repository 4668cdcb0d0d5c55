r"""`python -m h3jax.study`: the 3H study as one resumable command.

  python -m h3jax.study --config=configs/study_smollm2.py --workdir=runs/study_smollm2 --workers=2
  python -m h3jax.study --config=configs/study_smollm2.py --workdir=runs/study_smollm2 --list
  python -m h3jax.study --config=configs/study_tiny.py --workdir=/tmp/study_tiny --only='train/*'

--only takes comma-separated globs over stage names (their pending dependencies run too); --list
prints every stage as done / ready / waiting with CPU time; --publish=DIR copies the results, plots,
recipes, timings, per-item samples, judges and expert adapters into DIR (e.g.
experiments/results/study_smollm2); --restore=DIR brings such a folder back into a fresh workdir (on
another machine), so the study goes on with the rows it lacks. A bad config
(unknown row, a merge without its experts, ...) is one `error:` line before any work.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (get_config()).", lock_config=False)
flags.DEFINE_string("workdir", None, "Study directory (every stage's outputs).")
flags.DEFINE_bool("list", False, "List the stages (done / ready / waiting) and exit.")
flags.DEFINE_list("only", [], "Run only the stages matching these globs (and their pending dependencies).")
flags.DEFINE_integer("workers", 1, "Independent stages run at once, each in its own process (0: one after "
                     "another in this process, which saves the start-up of a process per stage).")
flags.DEFINE_string("stage", None, "Internal: run exactly this stage in this process.")
flags.DEFINE_string("publish", None, "Copy results, plots, recipes, timings, samples and judges into this folder.")
flags.DEFINE_string("restore", None, "Restore the workdir from a published folder (its experts, scored rows and "
                    "stage records) to go on with the study on another machine; see h3jax/study/restore.py.")
flags.DEFINE_string("rescore", None, "Re-score a published folder's samples with its judges; print the largest "
                    "difference from its results.json.")


def main(argv):
  del argv
  from absl import logging
  from h3jax.study import plan, publish, runner
  logging.set_verbosity(logging.WARNING)
  sc = FLAGS.config
  try:
    plan.resolve_base(sc, FLAGS.workdir)
    stages = plan.build(sc)  # validates the config before any work
    if FLAGS.stage:
      stage = {s.name: s for s in stages}.get(FLAGS.stage)
      if stage is None:
        raise ValueError(f"unknown stage {FLAGS.stage!r}; see --list")
      runner.run_stage(sc, FLAGS.workdir, stage)
      return 0
    if FLAGS.list:
      print(runner.listing(sc, FLAGS.workdir, FLAGS.only))
      return 0
    if FLAGS.rescore:
      from h3jax.study import rescore
      out = rescore.rescore(sc, FLAGS.rescore)
      print(json.dumps(out, indent=1))
      return 0 if out["max_abs_diff"] <= 1e-9 else 1
    if FLAGS.restore:
      from h3jax.study import restore
      print(json.dumps(restore.restore(sc, FLAGS.workdir, FLAGS.restore), indent=1))
      return 0
    if FLAGS.publish:
      print(publish.publish(sc, FLAGS.workdir, FLAGS.publish))
      return 0
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    out = runner.run(sc, FLAGS.workdir, config_path=FLAGS["config"].config_filename, overrides=overrides,
                     patterns=FLAGS.only, workers=max(FLAGS.workers, 1), in_process=FLAGS.workers == 0)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 1 if out["failed"] else 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: sys.exit(main(argv)))

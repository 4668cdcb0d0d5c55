"""`h3jax-judges` / `python -m h3jax.evaluation.judges.train`: train the four local 3H judges.

  python -m h3jax.evaluation.judges.train --out artifacts/judges [--data_root ../shared/data]

Writes <out>/<task>.npz + <task>.json cards and <out>/judges.json and prints the agreement table.
The library function is `h3jax.evaluation.judges.train.build_judges` (its module docstring describes
the recipe).
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  from h3jax.evaluation.judges import JUDGE_NAMES
  from h3jax.evaluation.judges import train
  flags.DEFINE_string("out", "artifacts/judges", "output directory for the judge artifacts")
  flags.DEFINE_string("data_root", None, "data root (default $H3JAX_DATA_ROOT)")
  flags.DEFINE_list("only", [], f"subset of {JUDGE_NAMES}")
  flags.DEFINE_float("fraction", 1.0, "keep this fraction of split keys (quick builds)")
  flags.DEFINE_bool("fit_all_honesty", True, "ship truth/info judges refit on all rows (GPT-judge recipe)")
  flags.DEFINE_string("cache_dir", str(train.default_cache_dir()), "feature cache ('' disables)")
  flags.DEFINE_enum("pairwise_variant", train.DEFAULT_PAIRWISE_VARIANT, list(train.PAIRWISE_VARIANTS),
                    "pairwise head: length_controlled trains free length weights and drops them at inference")


def main(argv):
  del argv
  from h3jax.evaluation.judges import train
  train.build_judges(FLAGS.out, FLAGS.data_root, only=FLAGS.only or None, fraction=FLAGS.fraction,
                     fit_all_honesty=FLAGS.fit_all_honesty, cache_dir=FLAGS.cache_dir or None,
                     pairwise_variant=FLAGS.pairwise_variant)


def run():
  common.run(main, define_flags)

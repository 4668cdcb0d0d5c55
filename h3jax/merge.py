"""Merge HF checkpoints from a config file, out of core.

  python -m h3jax.merge --config=merge.yaml --out=OUT_DIR
  python -m h3jax.merge --config=merge_cfg.py --out=OUT_DIR [--seed=0] [--overwrite]

`--config` is a mergekit YAML (read unchanged, mergekit 0.1.5 semantics) or an
ml_collections `.py` file with `get_config()` (every h3jax method and knob); see
`h3jax.merging.streaming.config`. The output is an HF folder that transformers loads.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines this CLI's flags (only when run as a program, so importing the module
  never collides with other CLIs' flags of the same name)."""
  flags.DEFINE_string("config", None, "mergekit .yaml/.yml or ml_collections .py merge config")
  flags.DEFINE_string("out", None, "output HF folder (must not exist unless --overwrite)")
  flags.DEFINE_bool("overwrite", False, "replace an existing output folder")
  flags.DEFINE_integer("seed", None, "seed for randomized methods (overrides the config's)")
  flags.DEFINE_string("max_shard_size", None, "output shard size, e.g. 2GB (overrides the config's)")
  flags.DEFINE_bool("progress", True, "show a per-tensor progress bar")
  flags.DEFINE_string("compilation_cache", "~/.cache/h3jax/xla",
                      "persistent XLA compilation cache folder ('' to disable)")
  flags.DEFINE_integer("devices", 1, "merge tensors round-robin on this many local devices (on a CPU "
                       "host: that many CPU devices, e.g. one per core for SVD-heavy methods)")
  flags.DEFINE_enum("nonfinite", "error", ["error", "keep_base"],
                    "a NaN/inf in an input or merged tensor: 'error' stops the merge (nothing written); "
                    "'keep_base' writes the base tensor there and reports it")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from h3jax.merging.streaming import MergeConfigError, MergeError, merge_from_config
  try:
    report = merge_from_config(FLAGS.config, FLAGS.out, overwrite=FLAGS.overwrite, seed=FLAGS.seed,
                               max_shard_size=FLAGS.max_shard_size, progress=FLAGS.progress,
                               compilation_cache=FLAGS.compilation_cache, devices=FLAGS.devices,
                               nonfinite=FLAGS.nonfinite)
  except (MergeConfigError, MergeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"merged {report['tensors']} tensors into {report['out_dir']}")
  if report["nonfinite_kept_base"]:
    print(f"kept the base tensor for {len(report['nonfinite_kept_base'])} non-finite tensor(s): "
          + ", ".join(sorted(report["nonfinite_kept_base"])))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)

"""`h3jax-merge` / `python -m h3jax.merge`: merge HF checkpoints from a config file, out of core.

  python -m h3jax.merge --config=merge.yaml --out=OUT_DIR
  python -m h3jax.merge --config=merge_cfg.py --out=OUT_DIR [--seed=0] [--overwrite] [--config.seed=3]

`--config` is a mergekit YAML (read unchanged, mergekit 0.1.5 semantics) or an
ml_collections `.py` file with `get_config()` (every h3jax method and knob, and `--config.x`
overrides like every other h3jax command); see `h3jax.merging.streaming.config`. The output is an
HF folder that transformers loads. The library function is
`h3jax.merging.streaming.merge_from_config`.
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  common.define_config("config", "mergekit .yaml/.yml or ml_collections .py merge config", other_files=True)
  flags.DEFINE_string("out", None, "output HF folder (must not exist unless --overwrite)")
  flags.DEFINE_bool("overwrite", False, "replace an existing output folder")
  flags.DEFINE_integer("seed", None, "seed for randomized methods (overrides the config's)")
  flags.DEFINE_string("max_shard_size", None, "output shard size, e.g. 2GB (overrides the config's)")
  flags.DEFINE_bool("progress", True, "show a per-tensor progress bar")
  common.define_compilation_cache("persistent XLA compilation cache folder ('' to disable)")
  flags.DEFINE_integer("devices", 1, "merge tensors round-robin on this many local devices (on a CPU "
                       "host: that many CPU devices, e.g. one per core for SVD-heavy methods)")
  flags.DEFINE_enum("nonfinite", "error", ["error", "keep_base"],
                    "a NaN/inf in an input or merged tensor: 'error' stops the merge (nothing written); "
                    "'keep_base' writes the base tensor there and reports it")


def main(argv):
  common.reject_args(argv)
  from h3jax.merging.streaming import MergeConfigError, MergeError, merge_from_config
  with common.one_line_errors(MergeConfigError, MergeError, FileNotFoundError):
    report = merge_from_config(FLAGS.config, FLAGS.out, overwrite=FLAGS.overwrite, seed=FLAGS.seed,
                               max_shard_size=FLAGS.max_shard_size, progress=FLAGS.progress,
                               compilation_cache=FLAGS.compilation_cache, devices=FLAGS.devices,
                               nonfinite=FLAGS.nonfinite, where=common.config_filename("config"))
  print(f"merged {report['tensors']} tensors into {report['out_dir']}")
  if report["nonfinite_kept_base"]:
    print(f"kept the base tensor for {len(report['nonfinite_kept_base'])} non-finite tensor(s): "
          + ", ".join(sorted(report["nonfinite_kept_base"])))


def run():
  common.run(main, define_flags, required=["config", "out"])

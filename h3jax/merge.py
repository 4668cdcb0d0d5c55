"""Merge HF checkpoints from a config file, out of core.

  python -m h3jax.merge --config=merge.yaml --out=OUT_DIR
  python -m h3jax.merge --config=merge_cfg.py --out=OUT_DIR [--seed=0] [--overwrite]

`--config` is a mergekit YAML (read unchanged, mergekit 0.1.5 semantics) or an
ml_collections `.py` file with `get_config()` (every h3jax method and knob); see
`h3jax.merging.config`. The output is an HF folder that transformers loads.
"""

from __future__ import annotations

import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "mergekit .yaml/.yml or ml_collections .py merge config")
_OUT = flags.DEFINE_string("out", None, "output HF folder (must not exist unless --overwrite)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output folder")
_SEED = flags.DEFINE_integer("seed", None, "seed for randomized methods (overrides the config's)")
_SHARD = flags.DEFINE_string("max_shard_size", None, "output shard size, e.g. 2GB (overrides the config's)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a per-tensor progress bar")
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/h3jax/xla",
                             "persistent XLA compilation cache folder ('' to disable)")


def merge_from_config(config_path: str, out_dir: str, *, overwrite: bool = False, seed=None,
                      max_shard_size=None, progress: bool = True, compilation_cache=None) -> dict:
  """Library entry point of the CLI: parse the config, then stream the merge."""
  import dataclasses

  from h3jax.merging import config as mcfg
  from h3jax.merging import driver
  spec = mcfg.load_config(config_path)
  if compilation_cache:
    driver.enable_compilation_cache(compilation_cache)
  if seed is not None:
    spec = dataclasses.replace(spec, seed=seed)
  return driver.run_merge(spec, out_dir, overwrite=overwrite, progress=progress,
                          max_shard_size=max_shard_size)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from h3jax.merging.config import MergeConfigError
  from h3jax.merging.driver import MergeError
  try:
    report = merge_from_config(_CONFIG.value, _OUT.value, overwrite=_OVERWRITE.value, seed=_SEED.value,
                               max_shard_size=_SHARD.value, progress=_PROGRESS.value,
                               compilation_cache=_CACHE.value)
  except (MergeConfigError, MergeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"merged {report['tensors']} tensors into {report['out_dir']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)

r"""`h3jax-moe` / `python -m h3jax.moe`: a Mixtral MoE from a mergekit-moe YAML, read unchanged.

  python -m h3jax.moe --config=moe.yml --out=DIR [--seed=0] [--overwrite]

Same YAML as `mergekit-moe moe.yml DIR` (mergekit 0.1.5): base_model,
gate_mode (hidden | cheap_embed | random | uniform_random | hidden_avg),
experts[].source_model / positive_prompts / negative_prompts / residual_scale,
experts_per_token, dtype. --seed plays mergekit's --random-seed for the random
gate modes. Semantics and tolerances: h3jax/fusion/moe_config.py and docs/interop.md.
The result trains with Stage B (`fusion.moe_config=moe.yml` in a train config).
The library function is `h3jax.fusion.moe_config.build_moe_folder`.
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("config", None, "mergekit-moe YAML file.")
  flags.DEFINE_string("out", None, "Output folder (MixtralForCausalLM).")
  flags.DEFINE_integer("seed", 0, "Seed of the random gate modes (mergekit-moe --random-seed).")
  flags.DEFINE_string("dtype", None, "Override the YAML's dtype: float32 | bfloat16 | float16.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def main(argv):
  common.reject_args(argv)
  from h3jax.fusion import moe_config
  # MoEConfigError, AdapterError and mismatches are ValueErrors.
  with common.one_line_errors(ValueError, FileExistsError, FileNotFoundError):
    path = moe_config.build_moe_folder(FLAGS.config, FLAGS.out, seed=FLAGS.seed, overwrite=FLAGS.overwrite,
                                       dtype=FLAGS.dtype)
  print(path)


def run():
  common.run(main, define_flags, required=["config", "out"])

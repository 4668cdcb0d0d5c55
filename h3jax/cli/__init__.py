"""h3jax's command lines: each module parses flags and calls one library function.

  command                 python -m                          library function
  h3jax-train             h3jax.train                        train.loop.train_and_evaluate
  h3jax-pipeline          h3jax.pipeline                     train.h3fusion.run_pipeline
  h3jax-evaluate          h3jax.evaluate                     evaluation.runner.evaluate
  h3jax-export            h3jax.export                       hf.export.export_checkpoint
  h3jax-generate          h3jax.generate                     hf.loader.load_model + generation.generate
  h3jax-merge             h3jax.merge                        merging.streaming.merge_from_config
  h3jax-moe               h3jax.moe                          moe_config.build_moe_folder
  h3jax-extract-lora      h3jax.extract_lora                 merging.streaming.extract_lora.extract_lora
  h3jax-prepare           h3jax.prepare                      hf.gguf.prepare
  h3jax-judges            h3jax.evaluation.judges.train      evaluation.judges.train.build_judges
  h3jax-study             h3jax.study                        study.runner.run (CLI in study/__main__.py)
  h3jax-manifest          h3jax.data.manifest                data.manifest (CLI in data/manifest.py)

Every module has `define_flags()`, `main(argv)` and `run()` (the console script, `[project.scripts]` in
pyproject.toml); the `python -m` modules are shims that call `run()`. Shared flag helpers: `common`.
This package is the top import layer (docs/architecture.md): nothing in the library imports it.
"""

"""`python -m h3jax.pipeline`: the command line in h3jax/cli/pipeline.py (console script `h3jax-pipeline`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import pipeline

  pipeline.run()

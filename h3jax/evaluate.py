"""`python -m h3jax.evaluate`: the command line in h3jax/cli/evaluate.py (console script `h3jax-evaluate`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import evaluate

  evaluate.run()

"""`python -m h3jax.moe`: the command line in h3jax/cli/moe.py (console script `h3jax-moe`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import moe

  moe.run()

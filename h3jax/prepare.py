"""`python -m h3jax.prepare`: the command line in h3jax/cli/prepare.py (console script `h3jax-prepare`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import prepare

  prepare.run()

"""`python -m h3jax.merge`: the command line in h3jax/cli/merge.py (console script `h3jax-merge`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import merge

  merge.run()

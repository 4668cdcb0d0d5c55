"""`python -m h3jax.export`: the command line in h3jax/cli/export.py (console script `h3jax-export`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import export

  export.run()

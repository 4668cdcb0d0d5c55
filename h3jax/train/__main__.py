"""`python -m h3jax.train`: the command line in h3jax/cli/train.py (console script `h3jax-train`)."""

if __name__ == "__main__":
  from h3jax.cli import train

  train.run()

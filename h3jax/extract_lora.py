"""`python -m h3jax.extract_lora`: the command line in h3jax/cli/extract_lora.py (console script `h3jax-extract-lora`).

Only a program entry point: it imports nothing when imported.
"""

if __name__ == "__main__":
  from h3jax.cli import extract_lora

  extract_lora.run()

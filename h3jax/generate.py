"""`python -m h3jax.generate`: the command line in h3jax/cli/generate.py (console script `h3jax-generate`).

Only a program entry point. The library function is `h3jax.generate` (h3jax.generation.generate),
which `import h3jax.generate` would shadow with this module: import `h3jax.cli.generate` for the
command's code instead.
"""

if __name__ == "__main__":
  from h3jax.cli import generate

  generate.run()

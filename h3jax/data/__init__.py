"""3H data: sources, hash splits, formatting, tokenization, batching, manifest.

  sources    one loader per data file (`load_source(name, data_root)`), from a
             data root (arg or $H3JAX_DATA_ROOT, laid out as ../shared/data) or
             the Hugging Face hub; errors name the file, line and layout
  splits     per-axis SFT train / eval splits by the data README's hash rule
             (`helpfulness`, `harmlessness`, `honesty`, `axis_split`)
  format     Alpaca (the paper's) / chat / plain prompt templates
  tokenize   response-only loss masks, max length, truncation policy
  pipeline   the 3-axis mixture, `load_records`, `make_iterator` (deterministic,
             resumable, optional packing); its docstring is the trainer's API
  manifest   third_party/datasets.json (checksums, licences, split rules)

Submodules are imported explicitly (`from h3jax.data import pipeline`): the
`datasets` import is paid only by code that loads data.
"""

"""h3jax.merging: weight-merging methods as jitted pytree -> pytree transforms.

Every method is `method(base, models, **hparams)` over params trees (as returned by
`h3jax.load_pretrained`) or single arrays; `base` may be None where a method needs
none; per-model values are sequences aligned with `models`. See docs/merging.md.

Note: `merging.resm` / `merging.emr` are the functions; their modules are
importable as `h3jax.merging.resm` etc. (`from h3jax.merging.resm import ...`).

This package holds the pure methods and their building blocks (`blocks`, `select`, `rules`, the
pytree engine `tree`); `h3jax.merging.streaming` runs them file to file, one tensor at a time
(mergekit YAML / `.py` configs, `python -m h3jax.merge`), and imports this package, never the reverse.
"""

# Re-exported: the package's public names (noqa F401: imported to be used as h3jax.merging.<name>).
from h3jax.merging import blocks, rules  # noqa: F401
from h3jax.merging.basic import (breadcrumbs, breadcrumbs_ties, consensus_ta, consensus_ties,
                                 dare_linear, dare_ties, della, della_linear, linear,
                                 model_stock, slerp, task_arithmetic)
from h3jax.merging.data_dependent import (compute_fisher, compute_regmean_grams, fisher,  # noqa: F401
                                          regmean)
from h3jax.merging.emr import emr, emr_tensor  # noqa: F401
from h3jax.merging.mergekit_extra import arcee_fusion, nearswap, passthrough, ram, ramplus_tl, sce
from h3jax.merging.resm import layer_sparsity, resm, sparsity_range  # noqa: F401
from h3jax.merging.spherical import karcher, multislerp, nuslerp
from h3jax.merging.svd import iso_c, iso_cts, tsv_m
from h3jax.merging.ties import global_thresholds, ties  # noqa: F401
from h3jax.merging.tree import (NonFiniteError, check_finite, fold_lora, merge_leaf, merge_tree,  # noqa: F401
                                nonfinite_leaves)

METHODS = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "slerp": slerp,
    "model_stock": model_stock,
    "consensus_ta": consensus_ta,
    "consensus_ties": consensus_ties,
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "emr": emr,
    "resm": resm,
    "fisher": fisher,
    "regmean": regmean,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "nearswap": nearswap,
    "sce": sce,
    "passthrough": passthrough,
    "arcee_fusion": arcee_fusion,
    "ram": ram,
    "ramplus_tl": ramplus_tl,
}

# Methods that need no base model (base may be None; nuslerp / multislerp / karcher use one if given).
BASE_FREE = ("linear", "fisher", "regmean", "nuslerp", "multislerp", "karcher", "passthrough")


def get_method(name: str):
  """The merge function called `name`; ValueError listing the known ones otherwise."""
  if name not in METHODS:
    raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}")
  return METHODS[name]


def check_hparams(name: str, hparams: dict, n_models: int = 3) -> None:
  """ValueError for hyper-parameters `name` rejects (unknown names, values out of range or not one of
  a mode's choices), found without reading a tensor: the method runs on empty trees, where only its
  argument checks do work. For planners (the study) that must fail before hours of merging."""
  fn = get_method(name)
  try:
    fn({}, [{} for _ in range(n_models)], **hparams)
  except TypeError as e:
    raise ValueError(f"{name}: {e}") from None

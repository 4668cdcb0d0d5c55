"""Optimizer built from path -> rule tables (big_vision style).

Every per-parameter policy is a tuple of `(pattern, value)` pairs matched
against the slash-joined path ("layers/attn/q_proj/lora_a") in the one rule
dialect of `h3jax.rules` (glob, `re:` regex or `sub:` substring); the first
match wins. Frozen leaves get `optax.set_to_zero()` through
`optax.partition`, so they hold no optimizer state at all (not even Adam
moments), and `apply_trainable` leaves them untouched, so they stay
bit-identical. Gradient accumulation is done in the train step (one optimizer
update per global batch), not with `optax.MultiSteps`, whose accumulator would
hold a full-size buffer for frozen leaves too.
"""

from __future__ import annotations

from typing import Sequence

import jax
import optax

from h3jax import rules as rules_lib
from h3jax.rules import Rules, path_str  # noqa: F401  (path_str re-exported)
from h3jax.model.params import flatten_dict, unflatten_dict

FROZEN = "frozen"
match_rule = rules_lib.first_match


def map_rules(tree: dict, rules: Rules, default=None) -> dict:
  """Nested dict of rule values with the same structure as `tree`."""
  flat = flatten_dict(tree)
  return unflatten_dict({k: match_rule(path_str(k), rules, default) for k in flat})


def trainable_rules(*, lora: bool, router: bool, extra: Sequence[str] = ()) -> tuple:
  """The trainable-leaf rule table: LoRA factors, the MoE router, extra patterns (`h3jax.rules`)."""
  rules = []
  if lora:
    rules.append(("re:/lora_[ab]$", True))
  if router:
    rules.append(("layers/moe/router/*", True))
  rules += [(pattern, True) for pattern in extra]
  return rules_lib.check_rules(rules, "trainable rules")


def param_labels(params: dict, train_rules: Rules, lr_mults: Rules = ()) -> dict:
  """'frozen' | 'train' | 'train*<mult>' per leaf (a multiplier of 0 is an error: freeze instead)."""
  flat = flatten_dict(params)
  out = {}
  for k in flat:
    p = path_str(k)
    if not match_rule(p, train_rules, False):
      out[k] = FROZEN
      continue
    mult = float(match_rule(p, lr_mults, 1.0))
    if mult <= 0:
      raise ValueError(f"lr multiplier for {p!r} is {mult}; freeze a parameter with the trainable rules instead")
    out[k] = "train" if mult == 1.0 else f"train*{mult:g}"
  if all(v == FROZEN for v in out.values()):
    raise ValueError("no trainable parameters: the trainable rules match no leaf "
                     f"(rules: {[r for r, _ in train_rules]})")
  return unflatten_dict(out)


def make_schedule(lr: float, total_steps: int, *, warmup_steps: int = 0, decay: str = "linear",
                  end_lr_frac: float = 0.0):
  """Linear warmup from 0 to `lr`, then linear / cosine decay to lr*end_lr_frac, or constant."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
  decay_steps = max(total_steps - warmup_steps, 1)
  end = lr * end_lr_frac
  if decay == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  elif decay == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_frac)
  elif decay == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown lr decay {decay!r}; expected linear | cosine | constant")
  if warmup_steps == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def make_optimizer(labels: dict, schedule, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   clip_norm=1.0) -> optax.GradientTransformation:
  """AdamW per lr group, global-norm clipping over trainable leaves, set_to_zero for frozen ones."""
  groups = sorted({v for v in jax.tree.leaves(labels) if v != FROZEN})

  def adamw(group):
    mult = 1.0 if group == "train" else float(group.split("*")[1])
    lr = schedule if mult == 1.0 else (lambda count: mult * schedule(count))
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  zero_frozen = optax.partition({FROZEN: optax.set_to_zero(), **{g: optax.identity() for g in groups}},
                                labels)
  clip = optax.clip_by_global_norm(clip_norm) if clip_norm and clip_norm > 0 else optax.identity()
  update = optax.partition({FROZEN: optax.set_to_zero(), **{g: adamw(g) for g in groups}}, labels)
  return optax.chain(zero_frozen, clip, update)


def split_trainable(params: dict, labels: dict):
  """(trainable, frozen) partial nested dicts; `merge_trees` undoes it."""
  flat, lab = flatten_dict(params), flatten_dict(labels)
  train = {k: v for k, v in flat.items() if lab[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if lab[k] == FROZEN}
  return unflatten_dict(train), unflatten_dict(frozen)


def merge_trees(*trees: dict) -> dict:
  flat = {}
  for t in trees:
    flat.update(flatten_dict(t))
  return unflatten_dict(flat)


def apply_trainable(params: dict, updates: dict, labels: dict) -> dict:
  """params + updates on trainable leaves; frozen leaves are returned as they are (bit-identical)."""
  return jax.tree.map(lambda lab, p, u: p if lab == FROZEN else optax.apply_updates(p, u),
                      labels, params, updates)


def full_grads(train_grads: dict, params: dict, labels: dict) -> dict:
  """Gradient tree over all params: trainable grads, zeros for frozen leaves (dead code under jit)."""
  flat_g = flatten_dict(train_grads)
  flat_p, lab = flatten_dict(params), flatten_dict(labels)
  return unflatten_dict({k: flat_g[k] if lab[k] != FROZEN else jax.numpy.zeros_like(v)
                            for k, v in flat_p.items()})

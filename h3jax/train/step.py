"""The train step: gradients of the trainable sub-tree only, microbatch accumulation, one update.

  state = {"params": full params tree, "opt_state": optax state, "step": int32 []}
  step_fn(state, batch, init_params) -> (state, metrics)

Gradients are taken w.r.t. the trainable leaves only (frozen ones are closed
over as constants, so their backward matmuls are never built). A batch
[B, ...] is split into `accum` microbatches [accum, B/accum, ...] run under
`lax.scan`; the LM loss is normalised by the global target-token count, so
accumulation changes memory, not the loss. Dropout keys are
fold_in(fold_in(seed_key, step), microbatch): a resumed run draws the same
masks. Frozen leaves come back as the same arrays (bit-identical).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from h3jax.config import ModelConfig
from h3jax.train import objective, optim


def init_state(params, tx: optax.GradientTransformation):
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def split_micro(batch: dict, accum: int) -> dict:
  B = batch["task_B"].shape[0]
  if B % accum:
    raise ValueError(f"batch size {B} is not divisible by grad_accum_steps={accum}")
  return jax.tree.map(lambda x: x.reshape(accum, B // accum, *x.shape[1:]), batch)


def make_step(cfg: ModelConfig, lc: objective.LossConfig, labels: dict, tx: optax.GradientTransformation,
              *, accum: int = 1, seed: int = 0, schedule=None):
  """Un-jitted step function; the loop jits it (with shardings when a mesh is used)."""
  use_dropout = cfg.lora_dropout > 0

  def step_fn(state, batch, init_params=None):
    params = state["params"]
    train_p, frozen_p = optim.split_trainable(params, labels)
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    n_tok = jnp.sum(objective.target_mask(batch))
    micro = split_micro(batch, accum)

    def loss_of(tp, mb, i):
      rng = jax.random.fold_in(step_key, i) if use_dropout else None
      return objective.micro_loss(optim.merge_trees(tp, frozen_p), mb, cfg, lc, n_tok, accum, rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def body(carry, xs):
      g_acc, loss_acc, m_acc = carry
      mb, i = xs
      (loss, m), g = grad_fn(train_p, mb, i)
      return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, jax.tree.map(jnp.add, m_acc, m)), None

    m0 = jax.eval_shape(lambda: loss_of(train_p, jax.tree.map(lambda x: x[0], micro), 0)[1])
    carry0 = (jax.tree.map(jnp.zeros_like, train_p), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0))
    (grads, loss, metrics), _ = jax.lax.scan(body, carry0, (micro, jnp.arange(accum)))
    if lc.drift_weights:  # params-only term: once per step, not per microbatch
      drift, g_drift = jax.value_and_grad(
          lambda tp: objective.drift_term(optim.merge_trees(tp, frozen_p), init_params, cfg, lc))(train_p)
      grads = jax.tree.map(jnp.add, grads, g_drift)
      loss = loss + drift
      metrics["drift"] = drift
    updates, opt_state = tx.update(optim.full_grads(grads, params, labels), state["opt_state"], params)
    new_params = optim.apply_trainable(params, updates, labels)
    # The loss is computed before the update: an inf gradient or an inf lr gives a finite loss and
    # non-finite params, so the loop also needs these two to never save such a state.
    new_train, _ = optim.split_trainable(new_params, labels)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_train)]))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), params_finite=params_finite)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return step_fn


def make_eval_step(cfg: ModelConfig, lc: objective.LossConfig):
  """Mean target-token loss (and router stats for an MoE) of one batch, no gradients."""

  def eval_fn(params, batch):
    n_tok = jnp.sum(objective.target_mask(batch))
    _, m = objective.micro_loss(params, batch, cfg, lc, n_tok, 1)
    return m

  return eval_fn

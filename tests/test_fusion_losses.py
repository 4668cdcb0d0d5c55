"""Stage-B loss terms against hand-computed values and transformers' Mixtral load-balancing loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from h3jax.fusion import losses as fl

# Router probabilities [L=2, B=2, T=3, E=3]; token 2 of example 0 is padding.
PROBS = np.array([
    [[[.5, .3, .2], [.1, .8, .1], [1., 0., 0.]],
     [[.2, .2, .6], [.3, .3, .4], [.1, .1, .8]]],
    [[[.3, .5, .2], [.1, .6, .3], [1., 0., 0.]],
     [[.4, .4, .2], [.1, .1, .8], [.3, .3, .4]]],
], np.float32)
MASK = np.array([[1, 1, 0], [0, 1, 1]], bool)
TASK = np.array([1, 2])


def test_gating_loss_masked_by_hand():
  # ex0: layer-mean of tokens 0,1 = [.4,.4,.2], [.1,.7,.2] -> P̄ = [.25,.55,.2]; label 1.
  # ex1: tokens 1,2: [.2,.2,.6], [.2,.2,.6] -> P̄ = [.2,.2,.6]; label 2.
  want = -(math.log(.55) + math.log(.6)) / 2
  got = fl.gating_loss(jnp.asarray(PROBS), jnp.asarray(TASK), jnp.asarray(MASK))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_gating_loss_unmasked_by_hand():
  # ex0 all 3 tokens: [.4,.4,.2], [.1,.7,.2], [1,0,0] -> P̄_1 = 1.1/3;
  # ex1: [.3,.3,.4], [.2,.2,.6], [.2,.2,.6] -> P̄_2 = 1.6/3
  want = -(math.log(1.1 / 3) + math.log(1.6 / 3)) / 2
  got = fl.gating_loss(jnp.asarray(PROBS), jnp.asarray(TASK), jnp.asarray(MASK), unmasked=True)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_gating_loss_double_softmax_matches_spec_bounds():
  # Reference code: torch CrossEntropyLoss on probabilities. Perfect -> log(e+2) - 1 ≈ 0.551,
  # uniform -> log 3, all mass on a wrong expert -> log(e+2) ≈ 1.551 (docs/h3fusion.md, defect #6).
  onehot = np.eye(3, dtype=np.float32)
  probs = np.stack([onehot[[1, 1]], np.full((2, 3), 1 / 3, np.float32), onehot[[0, 0]]])  # B=3, T=2
  probs_LBTE = jnp.asarray(probs[None])
  per_ex = [float(fl.gating_loss(probs_LBTE[:, i:i + 1], jnp.array([1]), double_softmax=True))
            for i in range(3)]
  np.testing.assert_allclose(per_ex, [math.log(math.e + 2) - 1, math.log(3), math.log(math.e + 2)], rtol=1e-6)
  # and the torch formula itself on the batch
  pbar = torch.tensor(probs.mean(1))
  want = torch.nn.CrossEntropyLoss()(pbar, torch.nn.functional.one_hot(torch.tensor([1, 1, 1]), 3).float())
  got = fl.gating_loss(probs_LBTE, jnp.array([1, 1, 1]), double_softmax=True)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_gating_loss_ignores_negative_labels_and_grad_is_finite():
  got = fl.gating_loss(jnp.asarray(PROBS), jnp.array([1, -1]), jnp.asarray(MASK))
  np.testing.assert_allclose(float(got), -math.log(.55), rtol=1e-6)
  g = jax.grad(lambda p: fl.gating_loss(p, jnp.asarray(TASK), jnp.asarray(MASK)))(jnp.asarray(PROBS))
  assert np.isfinite(np.asarray(g)).all()
  assert float(jnp.abs(g[:, 0, 2]).max()) == 0.0  # padding token gets no gradient


def test_router_accuracy():
  acc = fl.router_accuracy(jnp.asarray(PROBS), jnp.array([1, 0]), jnp.asarray(MASK))
  assert float(acc) == 0.5


def test_gating_loss_bad_labels():
  with pytest.raises(ValueError, match=r"task labels must be \[B=2\]"):
    fl.gating_loss(jnp.asarray(PROBS), jnp.array([0, 1, 2]))


def _experts_tree(kernels, lora=None):
  ex = {n: {"kernel": jnp.asarray(k)} for n, k in kernels.items()}
  if lora:
    for n, (a, b) in lora.items():
      ex[n]["lora_a"], ex[n]["lora_b"] = jnp.asarray(a), jnp.asarray(b)
  return {"layers": {"moe": {"experts": ex}}}


def _zeros(L=2, E=2, D=2, F=3):
  return {"gate_proj": np.zeros((L, E, D, F), np.float32), "up_proj": np.zeros((L, E, D, F), np.float32),
          "down_proj": np.zeros((L, E, F, D), np.float32)}


def test_drift_frobenius_by_hand():
  init = _zeros()
  cur = {n: v.copy() for n, v in init.items()}
  cur["gate_proj"][0, 0, 0, :2] = [3., 4.]  # expert 0 layer 0: norm 5
  cur["down_proj"][1, 0, 2, 1] = -2.  # expert 0 layer 1: norm 2
  cur["up_proj"][1, 1, 1, 0] = 1.  # expert 1 layer 1: norm 1
  got = fl.drift_penalty(_experts_tree(cur), _experts_tree(init), [0.1, 3.0])
  np.testing.assert_allclose(float(got), (0.1 * (5 + 2) + 3.0 * 1) / 2, rtol=1e-6)


def test_drift_lora_modes_by_hand():
  L, E, D, F, r = 2, 2, 2, 3, 1
  k = _zeros(L, E, D, F)
  lora = {n: (np.zeros(v.shape[:3] + (r,), np.float32), np.zeros((L, E, r, v.shape[3]), np.float32))
          for n, v in k.items()}
  lora["gate_proj"][0][0, 1, :, 0] = [1., 0.]  # A: norm 1
  lora["gate_proj"][1][0, 1, 0, :] = [2., 0., 0.]  # B: norm 2 -> A@B norm 2
  params, init = _experts_tree(k, lora), _experts_tree(k)
  s = 0.5
  # expert 1: ‖s·A·B‖ = 1 (layer 0); /L=2
  for mode in ("frobenius", "lora_delta"):
    got = fl.drift_penalty(params, init, [10.0, 0.25], lora_scale=s, mode=mode)
    np.testing.assert_allclose(float(got), 0.25 * 1.0 / 2, rtol=1e-6, err_msg=mode)
  # reference: (‖A‖ + ‖B‖) / 32, plus constant kernel norms (all zero here)
  got = fl.drift_penalty(params, init, [10.0, 0.25], lora_scale=s, mode="lora_a_plus_b", layer_divisor=32)
  np.testing.assert_allclose(float(got), 0.25 * 3.0 / 32, rtol=1e-6)


def test_drift_lora_delta_equals_frobenius_and_safe_grad():
  rng = np.random.default_rng(0)
  k = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in _zeros(2, 3, 4, 5).items()}
  lora = {n: (rng.normal(size=v.shape[:3] + (2,)).astype(np.float32),
              rng.normal(size=(2, 3, 2, v.shape[3])).astype(np.float32)) for n, v in k.items()}
  params, init = _experts_tree(k, lora), _experts_tree(k)
  g = [1.0, 0.5, 2.0]
  a = fl.drift_penalty(params, init, g, lora_scale=0.7)
  b = fl.drift_penalty(params, init, g, lora_scale=0.7, mode="lora_delta")
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  # B = 0 (fresh LoRA): value 0 and finite, zero gradients (jnp.linalg.norm would give NaN)
  zero_b = {n: (a_, np.zeros_like(b_)) for n, (a_, b_) in lora.items()}
  for mode in fl.DRIFT_MODES:
    f = jax.jit(lambda p: fl.drift_penalty(p, init, g, lora_scale=0.7, mode=mode))
    grads = jax.jit(jax.grad(f))(_experts_tree(k, zero_b))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves), mode
    if mode != "lora_a_plus_b":
      assert float(f(_experts_tree(k, zero_b))) == 0.0


def test_drift_bad_gammas():
  t = _experts_tree(_zeros(E=3))
  with pytest.raises(ValueError, match="one entry per expert: got 2 for an MoE with 3 experts"):
    fl.drift_penalty(t, t, [1.0, 2.0])
  with pytest.raises(ValueError, match="needs LoRA leaves"):
    fl.drift_penalty(t, t, [1.0, 2.0, 3.0], mode="lora_delta")


def test_load_balance_matches_transformers():
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  rng = np.random.default_rng(1)
  L, B, T, E, k = 3, 2, 5, 4, 2
  logits = rng.normal(size=(L, B, T, E)).astype(np.float32) * 2
  mask = np.ones((B, T), np.int64)
  mask[1, 3:] = 0
  probs = jax.nn.softmax(jnp.asarray(logits), -1)
  topi = jax.lax.top_k(probs, k)[1]
  gate = tuple(torch.tensor(logits[l].reshape(B * T, E)) for l in range(L))
  for m in (None, mask):
    want = load_balancing_loss_func(gate, E, k, None if m is None else torch.tensor(m))
    got = fl.load_balance_loss(probs, topi, None if m is None else jnp.asarray(m))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  # perfectly balanced routing gives k
  flat = jnp.full((1, 1, E, E), 1.0 / E)
  topi_bal = jnp.stack([jnp.arange(E), (jnp.arange(E) + 1) % E], -1)[None, None]
  np.testing.assert_allclose(float(fl.load_balance_loss(flat, topi_bal)), k, rtol=1e-6)


def test_router_z_loss_by_hand():
  logits = np.zeros((2, 1, 3, 4), np.float32)
  logits[1, 0, 2] = [1e3, 0., 0., 0.]  # masked out; would dominate otherwise
  got = fl.router_z_loss(jnp.asarray(logits), jnp.array([[1, 1, 0]]))
  np.testing.assert_allclose(float(got), math.log(4) ** 2, rtol=1e-6)

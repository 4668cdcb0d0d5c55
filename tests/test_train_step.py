"""Train step: frozen leaves, accumulation, sharding, LM loss oracle, gating-only router learning, bad λ/γ."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from h3jax.config import ModelConfig
from h3jax.model import params as params_lib
from h3jax.model.params import flatten_dict
from h3jax.train import lora, objective, optim, sharding, step as step_lib

V, T = 64, 16


def tiny_cfg(**kw):
  base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, max_position_embeddings=64)
  base.update(kw)
  return ModelConfig(**base)


def batch_of(B, seed=0, task_tokens=False):
  """Right-padded rows; the second half of each row is the 'response'. With task_tokens, row b's
  tokens come from a vocab band owned by its task (so the task is recoverable from the hidden states)."""
  rng = np.random.default_rng(seed)
  task_B = rng.integers(0, 3, B).astype(np.int32)
  if task_tokens:
    lo_B = 3 + 20 * task_B
    ids_BT = (lo_B[:, None] + rng.integers(0, 20, (B, T))).astype(np.int32)
  else:
    ids_BT = rng.integers(3, V, (B, T)).astype(np.int32)
  lens_B = rng.integers(T // 2 + 2, T + 1, B)
  attn_BT = (np.arange(T)[None] < lens_B[:, None]).astype(np.int32)
  loss_BT = ((np.arange(T)[None] >= T // 2) & (attn_BT > 0)).astype(np.int32)
  ids_BT = np.where(attn_BT > 0, ids_BT, 0).astype(np.int32)
  return {"input_ids_BT": ids_BT, "loss_mask_BT": loss_BT, "attention_mask_BT": attn_BT, "task_B": task_B}


def lora_setup(cfg, key=0, targets=lora.FFN_TARGETS, router=False):
  params = params_lib.init_params(cfg, jax.random.key(key))
  params = lora.add_lora(params, targets, 4, jax.random.key(key + 1))
  # non-zero B so every LoRA factor gets a gradient from step 1
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, params)
  cfg = lora.lora_model_config(cfg, 4, 8.0, 0.0)
  labels = optim.param_labels(params, optim.trainable_rules(lora=True, router=router))
  return cfg, params, labels


def run_steps(cfg, params, labels, lc, batches, *, accum=1, lr=1e-2, jit_kw=None):
  sched = optax.constant_schedule(lr)
  tx = optim.make_optimizer(labels, sched, clip_norm=1.0)
  state = step_lib.init_state(params, tx)
  fn = jax.jit(step_lib.make_step(cfg, lc, labels, tx, accum=accum, seed=3), **(jit_kw or {}))
  ms = []
  for b in batches:
    state, m = fn(state, b)
    ms.append(jax.device_get(m))
  return state, ms


def mp_problem(num_experts=3):
  """Tiny fused-MoE Stage-B problem: LoRA on attention + experts, trainable router, gating + drift
  (dropless capacity dispatch)."""
  cfg = tiny_cfg(num_experts=num_experts, num_experts_per_tok=2, moe_dispatch="capacity")
  cfg, params, labels = lora_setup(cfg, targets=lora.FFN_TARGETS + lora.ATTN_TARGETS, router=True)
  lc = objective.loss_config({"gate_weight": 0.05, "drift_weights": (1e-3, 0.0, 1e-2, 0.0)[:num_experts]}, cfg)
  return cfg, params, labels, lc, [batch_of(8, s) for s in range(2)]


def sharded_steps(cfg, params, labels, lc, batches, mesh, lr=1e-2):
  """The same steps as run_steps, jitted with the path -> PartitionSpec table on `mesh`
  (params and batches must already be placed on their shardings)."""
  tx = optim.make_optimizer(labels, optax.constant_schedule(lr), clip_norm=1.0)
  p_sh = sharding.param_shardings(params, mesh)
  st_sh = {"params": p_sh, "opt_state": sharding.tree_shardings_like(jax.eval_shape(tx.init, params), params, mesh),
           "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
  b_sh = sharding.batch_shardings(batches[0], mesh)
  state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=st_sh)(params)
  fn = jax.jit(step_lib.make_step(cfg, lc, labels, tx, seed=3), in_shardings=(st_sh, b_sh),
               out_shardings=(st_sh, None))
  ms = []
  for b in batches:
    state, m = fn(state, b)
    ms.append(jax.device_get(m))
  return state, ms


@pytest.fixture(scope="module")
def moe_run():
  cfg, params, labels, lc, batches = mp_problem()
  p0 = jax.tree.map(np.asarray, params)
  state, ms = run_steps(cfg, params, labels, lc, batches)
  return cfg, p0, labels, lc, batches, state, ms


def test_frozen_leaves_bit_identical_and_stateless_moe(moe_run):
  cfg, p0, labels, lc, batches, state, ms = moe_run
  flat0, flat1, lab = flatten_dict(p0), flatten_dict(state["params"]), flatten_dict(labels)
  n_frozen = 0
  for k, lab_k in lab.items():
    if lab_k == optim.FROZEN:
      n_frozen += 1
      assert np.array_equal(np.asarray(flat1[k]), flat0[k]), k
      assert np.asarray(flat1[k]).dtype == flat0[k].dtype
    else:
      assert not np.array_equal(np.asarray(flat1[k]), flat0[k]), f"trainable {k} did not move"
  assert n_frozen >= 10 and lab[("layers", "moe", "router", "kernel")] != optim.FROZEN
  # optimizer state: Adam moments exist for trainable leaves only
  n_train = sum(v != optim.FROZEN for v in lab.values())
  shapes = [tuple(x.shape) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
  assert len(shapes) == 2 * n_train  # mu and nu
  frozen_shapes = {tuple(flat0[k].shape) for k, v in lab.items() if v == optim.FROZEN}
  train_shapes = {tuple(flat0[k].shape) for k, v in lab.items() if v != optim.FROZEN}
  assert not (set(shapes) & (frozen_shapes - train_shapes))
  assert all(np.isfinite(m["loss"]) for m in ms) and ms[0]["drift"] > 0 and ms[0]["gate_loss"] > 0


def test_lm_loss_matches_numpy_cross_entropy():
  cfg = tiny_cfg()
  params = params_lib.init_params(cfg, jax.random.key(1), std=0.5)
  b = batch_of(3, 1)
  from h3jax.model import llama
  logits = np.asarray(llama.forward(params, b["input_ids_BT"], cfg, attention_mask_BT=b["attention_mask_BT"]),
                      np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll, n = 0.0, 0
  for i in range(3):
    for t in range(T - 1):
      if b["loss_mask_BT"][i, t + 1] and b["attention_mask_BT"][i, t + 1]:
        nll += lse[i, t] - logits[i, t, b["input_ids_BT"][i, t + 1]]
        n += 1
  lc = objective.loss_config({}, cfg)
  loss, m = objective.micro_loss(params, jax.tree.map(jnp.asarray, b), cfg, lc, jnp.float32(n), 1)
  np.testing.assert_allclose(float(loss), nll / n, rtol=1e-5)
  assert int(m["n_tokens"]) == n


def test_grad_accumulation_equals_full_batch():
  cfg, params, labels = lora_setup(tiny_cfg())
  lc = objective.loss_config({}, cfg)
  bs = [batch_of(8, s) for s in range(2)]
  s1, m1 = run_steps(cfg, params, labels, lc, bs, accum=1)
  s4, m4 = run_steps(cfg, params, labels, lc, bs, accum=4)
  np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_sharded_step_equals_unsharded(moe_run):
  cfg, p0, labels, lc, batches, ref, mref = moe_run
  mesh = sharding.make_mesh(data=4, tensor=2)
  specs = flatten_dict(sharding.param_specs(p0, mesh))
  assert specs[("layers", "moe", "experts", "gate_proj", "kernel")] == jax.sharding.PartitionSpec(
      None, None, None, "tensor")
  assert specs[("layers", "attn", "o_proj", "kernel")] == jax.sharding.PartitionSpec(None, "tensor", None)
  params = jax.device_put(p0, sharding.param_shardings(p0, mesh))
  b_sh = sharding.batch_shardings(batches[0], mesh)
  state, ms = sharded_steps(cfg, params, labels, lc, [jax.device_put(b, b_sh) for b in batches], mesh)
  for m, mr in zip(ms, mref):
    np.testing.assert_allclose(float(m["loss"]), float(mr["loss"]), rtol=1e-5)
  q = state["params"]["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  assert len(q.addressable_shards) == 8
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)  # Adam amplifies order noise


def test_gating_loss_only_run_learns_task_routing():
  cfg = tiny_cfg(num_experts=3, num_experts_per_tok=1, moe_dispatch="dense")
  params = params_lib.init_params(cfg, jax.random.key(5))
  labels = optim.param_labels(params, optim.trainable_rules(lora=False, router=True))
  lc = objective.loss_config({"lm_weight": 0.0, "gate_weight": 1.0}, cfg)
  held_out = jax.tree.map(jnp.asarray, batch_of(60, 999, task_tokens=True))
  acc = lambda p: float(objective.micro_loss(p, held_out, cfg, lc, jnp.float32(1), 1)[1]["router_acc"])
  acc0 = acc(params)
  state, ms = run_steps(cfg, params, labels, lc, [batch_of(12, s, task_tokens=True) for s in range(40)], lr=0.05)
  acc1 = acc(state["params"])
  assert ms[-1]["gate_loss"] < 0.5 * ms[0]["gate_loss"]
  assert acc1 >= 0.9 > acc0 + 0.2, (acc0, acc1)  # chance is 1/3


@pytest.mark.parametrize("loss_kw, msg", [
    ({"drift_weights": (1e-3, 1e-3)}, "drift_weights (γ) has 2 values but the MoE has 3 experts"),
    ({"gate_weight": (0.1, 0.2)}, "loss.gate_weight (λ) must be a single number, got 2 values"),
])
def test_wrong_lambda_gamma_length_is_a_clear_error(loss_kw, msg):
  cfg = tiny_cfg(num_experts=3, num_experts_per_tok=2)
  with pytest.raises(ValueError) as e:
    objective.loss_config(loss_kw, cfg)
  assert msg in str(e.value)


def test_moe_terms_on_dense_model_rejected():
  with pytest.raises(ValueError, match=r"need a fused MoE model"):
    objective.loss_config({"gate_weight": 0.01}, tiny_cfg())


def test_bf16_compute_step_tracks_fp32():
  cfg, params, labels = lora_setup(tiny_cfg())
  lc = objective.loss_config({}, cfg)
  b = [batch_of(4, 0)]
  s32, m32 = run_steps(cfg, params, labels, lc, b)
  s16, m16 = run_steps(cfg.replace(dtype="bfloat16"), params, labels, lc, b)
  np.testing.assert_allclose(m16[0]["loss"], m32[0]["loss"], rtol=2e-2)
  a16 = s16["params"]["layers"]["mlp"]["up_proj"]["lora_a"]
  assert a16.dtype == jnp.float32  # params (and optimizer state) stay fp32; only matmuls run in bf16
  assert not np.array_equal(np.asarray(a16), np.asarray(params["layers"]["mlp"]["up_proj"]["lora_a"]))


def _lowered_step(cfg, params, labels, B=8):
  tx = optim.make_optimizer(labels, optax.constant_schedule(1e-3))
  fn = jax.jit(step_lib.make_step(cfg, objective.LossConfig(), labels, tx, seed=0))
  return fn.lower(step_lib.init_state(params, tx), batch_of(B))


def test_lora_step_has_no_weight_gradient_dot_for_frozen_kernels():
  """The LoRA step (dropout on) that jit builds holds no dot whose output is shaped like a frozen
  kernel ([in, out] or [out, in], alone or stacked on L): AD never builds weight gradients for the
  frozen leaves. The full fine-tune step of the same model holds them, and costs more FLOPs. Dims
  are chosen so that no activation or LoRA product has a kernel's pair of dims."""
  import re
  cfg = tiny_cfg(hidden_size=40, intermediate_size=56, num_heads=4, num_kv_heads=2, head_dim=6)
  params = params_lib.init_params(cfg, jax.random.key(0))
  kernels = {tuple(v.shape[-2:]) for k, v in flatten_dict(params).items() if k[-1] in ("kernel", "embedding")}
  pairs = kernels | {s[::-1] for s in kernels}

  def weight_grad_dots(lowered):
    shapes = re.findall(r"stablehlo\.dot_general.*?-> tensor<([\dx]+)xf32>", lowered.as_text())
    return [s for s in shapes if tuple(int(d) for d in s.split("x")[-2:]) in pairs]

  full_labels = optim.param_labels(params, optim.trainable_rules(lora=False, router=False, extra=("*",)))
  full = _lowered_step(cfg, params, full_labels)
  assert len(weight_grad_dots(full)) >= 4  # the check sees weight gradients where they exist
  lp = lora.add_lora(params, lora.FFN_TARGETS, 4, jax.random.key(1))
  lcfg = lora.lora_model_config(cfg, 4, 8.0, 0.1)
  lstep = _lowered_step(lcfg, lp, optim.param_labels(lp, optim.trainable_rules(lora=True, router=False)))
  assert weight_grad_dots(lstep) == []
  assert lstep.cost_analysis()["flops"] < full.cost_analysis()["flops"]


def test_weight_gradient_dots_contract_one_token_axis():
  """Every unbatched dot of the full and the LoRA train steps contracts a single axis: the linears and
  the vocabulary projection run on one [tokens, features] matrix, so a weight gradient (kernel,
  lora_a, lora_b, embedding) never contracts the batch and sequence axes apart, which XLA:CPU runs
  several times slower than one GEMM (layers.linear; a SmolLM2 full step 9.07 -> 7.52 s). Attention's
  batched dots (batching dims present) are exempt."""
  import re
  cfg = tiny_cfg(hidden_size=40, intermediate_size=56, num_heads=4, num_kv_heads=2, head_dim=6)
  params = params_lib.init_params(cfg, jax.random.key(0))

  def multi_axis_dots(lowered):
    dots = re.findall(r"stablehlo\.dot_general[^\n]*", lowered.as_text())
    assert dots
    return [d for d in dots if "batching_dims" not in d
            and len(re.search(r"contracting_dims = \[([\d, ]*)\]", d).group(1).split(",")) > 1]

  full_labels = optim.param_labels(params, optim.trainable_rules(lora=False, router=False, extra=("*",)))
  assert multi_axis_dots(_lowered_step(cfg, params, full_labels)) == []
  lp = lora.add_lora(params, lora.FFN_TARGETS + lora.ATTN_TARGETS, 4, jax.random.key(1))
  lcfg = lora.lora_model_config(cfg, 4, 8.0, 0.1)
  lstep = _lowered_step(lcfg, lp, optim.param_labels(lp, optim.trainable_rules(lora=True, router=False)))
  assert multi_axis_dots(lstep) == []

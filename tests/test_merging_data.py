"""Fisher / RegMean: statistics against transformers (torch) on a tiny Llama, and the closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import h3jax
from h3jax import merging as M
from tiny_hf import make_model, save_model
from numerics import assert_close


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = make_model("llama_mha_untied", num_hidden_layers=2)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path_factory.mktemp("tiny")))
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 128, (3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, 9:] = 0  # right padding
  return model, cfg, params, [{"input_ids": ids, "attention_mask": mask}]


def test_regmean_grams_match_torch_linear_inputs(tiny):
  model, cfg, params, batches = tiny
  grams = M.compute_regmean_grams(params, cfg, batches)
  mask = torch.as_tensor(batches[0]["attention_mask"]).bool()
  acc, hooks = {}, []
  for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear):
      def hook(m, inp, out, name=name):
        x = inp[0][mask].double()
        acc[name] = x.T @ x
      hooks.append(mod.register_forward_hook(hook))
  with torch.no_grad():
    model(torch.as_tensor(batches[0]["input_ids"]), attention_mask=mask.long())
  for h in hooks:
    h.remove()
  n = int(mask.sum())
  pairs = {"self_attn.q_proj": "layers/attn/q_proj/kernel", "self_attn.v_proj": "layers/attn/v_proj/kernel",
           "self_attn.o_proj": "layers/attn/o_proj/kernel", "mlp.up_proj": "layers/mlp/up_proj/kernel",
           "mlp.down_proj": "layers/mlp/down_proj/kernel"}
  for layer in range(cfg.num_layers):
    for hf, ours in pairs.items():
      ref = acc[f"model.layers.{layer}.{hf}"].numpy() / n
      np.testing.assert_allclose(grams[ours][layer], ref, rtol=2e-4, atol=2e-5 * np.abs(ref).max())
  ref = acc["lm_head"].numpy() / n
  np.testing.assert_allclose(grams["lm_head/kernel"], ref, rtol=2e-4, atol=2e-5 * np.abs(ref).max())


def test_fisher_matches_torch_per_sequence_gradients(tiny):
  model, cfg, params, batches = tiny
  fisher = M.compute_fisher(params, cfg, batches)
  ids, mask = (torch.as_tensor(batches[0][k]) for k in ("input_ids", "attention_mask"))
  sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
  for b in range(ids.shape[0]):
    model.zero_grad()
    logits = model(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0, :-1].float()
    ll = torch.log_softmax(logits, -1).gather(-1, ids[b, 1:, None])[:, 0]
    (ll * mask[b, 1:] * mask[b, :-1]).sum().backward()
    for n, p in model.named_parameters():
      sq[n] += p.grad.double() ** 2
  ref = {n: (v / ids.shape[0]).numpy() for n, v in sq.items()}
  close = lambda a, r: np.testing.assert_allclose(a, r, rtol=2e-3, atol=1e-3 * np.abs(r).max())
  close(fisher["embed"]["embedding"], ref["model.embed_tokens.weight"])
  close(fisher["lm_head"]["kernel"], ref["lm_head.weight"].T)
  close(fisher["final_norm"]["scale"], ref["model.norm.weight"])
  for layer in range(cfg.num_layers):
    close(fisher["layers"]["attn"]["k_proj"]["kernel"][layer], ref[f"model.layers.{layer}.self_attn.k_proj.weight"].T)
    close(fisher["layers"]["mlp"]["down_proj"]["kernel"][layer], ref[f"model.layers.{layer}.mlp.down_proj.weight"].T)
    close(fisher["layers"]["attn_norm"]["scale"][layer], ref[f"model.layers.{layer}.input_layernorm.weight"])


def test_fisher_merge_closed_form():
  t1, t2 = np.array([1.0, 2.0]), np.array([3.0, -2.0])
  f1, f2 = np.array([1.0, 3.0]), np.array([3.0, 1.0])
  out = M.fisher(None, [t1, t2], fishers=[f1, f2], normalize_fisher_weight=False, minimal_fisher_weight=0.0)
  np.testing.assert_allclose(out, [(1 + 9) / 4, (6 - 2) / 4])
  # Normalised: c_i proportional to 1/||F_i|| (equal norms here -> unchanged), times weights.
  out = M.fisher(None, [t1, t2], fishers=[f1, f2], weight=[1.0, 3.0], minimal_fisher_weight=0.0)
  np.testing.assert_allclose(out, [(1 + 27) / 10, (6 - 6) / 6], rtol=1e-6)
  with pytest.raises(ValueError, match="need one Fisher tree per model"):
    M.fisher(None, [t1, t2], fishers=[f1])


def test_regmean_closed_form_and_objective(tiny):
  model, cfg, params, batches = tiny
  rng = np.random.default_rng(0)
  w = [rng.normal(size=(5, 3)) for _ in range(2)]
  g = [np.cov(rng.normal(size=(5, 40))) for _ in range(2)]
  tree = lambda x: {"kernel": x, "bias": x[0]}
  out = M.regmean(None, [tree(w[0]), tree(w[1])], grams=[{"kernel": g[0]}, {"kernel": g[1]}],
                  reduce_non_diagonal_ratio=0.5)
  gt = [np.where(np.eye(5, dtype=bool), x, 0.5 * x) for x in g]
  assert_close(out["kernel"], np.linalg.solve(gt[0] + gt[1], gt[0] @ w[0] + gt[1] @ w[1]), rtol=1e-4,
               atol_rel=1e-5)
  np.testing.assert_allclose(out["bias"], (w[0][0] + w[1][0]) / 2, rtol=1e-6)
  # Same Grams -> plain average.
  out = M.regmean(None, [tree(w[0]), tree(w[1])], grams=[{"kernel": g[0]}] * 2, reduce_non_diagonal_ratio=1.0)
  assert_close(out["kernel"], (w[0] + w[1]) / 2, rtol=1e-4, atol_rel=1e-5)
  # With the model's own statistics and alpha = 1, RegMean minimises sum_i ||X W - X W_i||^2.
  other = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  grams = [M.compute_regmean_grams(p, cfg, batches) for p in (params, other)]
  merged = M.regmean(None, [params, other], grams=grams, reduce_non_diagonal_ratio=1.0)
  avg = M.linear(None, [params, other])
  k = lambda t: t["layers"]["mlp"]["down_proj"]["kernel"][0]

  def obj(x):
    return sum(float(jnp.trace((x - k(p)).T @ gr["layers/mlp/down_proj/kernel"][0] @ (x - k(p))))
               for p, gr in zip((params, other), grams))
  assert obj(k(merged)) < obj(k(avg))

"""MoE fusion: experts = each model's FFN, shared weights from the base, router inits, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from h3jax import fusion
from h3jax.model import llama
import tiny_hf
from numerics import assert_close


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A tiny base Llama and three 'aligned' copies whose FFNs differ (attention identical)."""
  root = tmp_path_factory.mktemp("fusion")
  base = tiny_hf.make_model("llama_mha_untied", seed=0)
  out = {"base": tiny_hf.save_model(base, root / "base"), "experts": [], "torch": [base]}
  for i in range(3):
    m = tiny_hf.make_model("llama_mha_untied", seed=0)
    torch.manual_seed(100 + i)
    with torch.no_grad():
      for layer in m.model.layers:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
          lin.weight.add_(0.05 * torch.randn_like(lin.weight))
    out["experts"].append(tiny_hf.save_model(m, root / f"expert{i}"))
    out["torch"].append(m)
  return out


def test_experts_are_the_models_ffns_and_shared_from_base(folders):
  cfg, p = fusion.build_moe(folders["base"], folders["experts"], top_k=2, expert_names=("h", "s", "t"))
  assert cfg.num_experts == 3 and cfg.num_experts_per_tok == 2 and cfg.expert_names == ("h", "s", "t")
  assert "mlp" not in p["layers"]
  for i, m in enumerate(folders["torch"][1:]):
    for l, layer in enumerate(m.model.layers):
      for name in ("gate_proj", "up_proj", "down_proj"):
        want = getattr(layer.mlp, name).weight.detach().numpy().T
        np.testing.assert_array_equal(np.asarray(p["layers"]["moe"]["experts"][name]["kernel"][l, i]), want)
  base = folders["torch"][0]
  np.testing.assert_array_equal(np.asarray(p["layers"]["attn"]["q_proj"]["kernel"][1]),
                                base.model.layers[1].self_attn.q_proj.weight.detach().numpy().T)
  np.testing.assert_array_equal(np.asarray(p["embed"]["embedding"]), base.model.embed_tokens.weight.detach().numpy())
  r = np.asarray(p["layers"]["moe"]["router"]["kernel"])
  assert r.shape == (2, 64, 3) and 0.015 < r.std() < 0.025
  # experts are distinct (not aliased): no two expert slices are equal
  g = np.asarray(p["layers"]["moe"]["experts"]["gate_proj"]["kernel"])
  assert not np.array_equal(g[:, 0], g[:, 1]) and not np.array_equal(g[:, 1], g[:, 2])


def test_identical_experts_reproduce_dense_logits(folders):
  from h3jax.hf.load import load_pretrained
  dcfg, dp = load_pretrained(folders["base"])
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)))
  want = llama.forward(dp, ids, dcfg)
  for init, k in (("random", 1), ("zeros", 2), ("random", 3)):
    cfg, p = fusion.build_moe(folders["base"], [folders["base"]] * 3, router_init=init, top_k=k, seed=k)
    got = llama.forward(p, ids, cfg)
    assert_close(got, want, rtol=1e-5, atol_rel=1e-5, err_msg=f"{init} k={k}")


def test_attn_average_and_alias_switch(folders):
  from h3jax.hf.load import load_pretrained
  loaded = [load_pretrained(d) for d in folders["experts"][:2]]
  bcfg, bp = load_pretrained(folders["base"])
  # make expert attention differ so the average is visible
  loaded[1][1]["layers"]["attn"]["o_proj"]["kernel"] = loaded[1][1]["layers"]["attn"]["o_proj"]["kernel"] + 1.0
  cfg, p = fusion.fuse_params(bcfg, bp, [c for c, _ in loaded], [q for _, q in loaded], attn_from="average")
  want = (loaded[0][1]["layers"]["attn"]["o_proj"]["kernel"] + loaded[1][1]["layers"]["attn"]["o_proj"]["kernel"]) / 2
  np.testing.assert_allclose(np.asarray(p["layers"]["attn"]["o_proj"]["kernel"]), np.asarray(want), rtol=1e-6)
  # reference defect #1: every expert = W_base + Σ_i (W_i - W_base)
  cfg, p = fusion.fuse_params(bcfg, bp, [c for c, _ in loaded], [q for _, q in loaded], alias_experts=True)
  w0 = bp["layers"]["mlp"]["up_proj"]["kernel"]
  want = w0 + sum(q["layers"]["mlp"]["up_proj"]["kernel"] - w0 for _, q in loaded)
  got = np.asarray(p["layers"]["moe"]["experts"]["up_proj"]["kernel"])
  assert_close(got[:, 0], want, rtol=1e-6, atol_rel=1e-6)
  np.testing.assert_array_equal(got[:, 0], got[:, 1])


def test_lora_experts_merged_with_scale(folders):
  from h3jax.hf.load import load_pretrained
  bcfg, bp = load_pretrained(folders["base"])
  rng = np.random.default_rng(3)
  experts = []
  for i in range(2):
    q = jax.tree.map(lambda x: x, bp)
    mlp = q["layers"]["mlp"]["down_proj"]
    mlp["lora_a"] = jnp.asarray(rng.normal(size=(2, 96, 4)), jnp.float32)
    mlp["lora_b"] = jnp.asarray(rng.normal(size=(2, 4, 64)), jnp.float32)
    experts.append(q)
  ecfg = bcfg.replace(lora_scale=0.5)
  for mode, s in (("lora", 0.5), ("one", 1.0)):
    cfg, p = fusion.fuse_params(bcfg, bp, [ecfg] * 2, experts, delta_scale=mode)
    for i, q in enumerate(experts):
      d = q["layers"]["mlp"]["down_proj"]
      want = d["kernel"] + s * jnp.einsum("lir,lro->lio", d["lora_a"], d["lora_b"])
      assert_close(p["layers"]["moe"]["experts"]["down_proj"]["kernel"][:, i], want, rtol=1e-5, atol_rel=1e-5)
    assert "lora_a" not in p["layers"]["moe"]["experts"]["down_proj"] and cfg.lora_scale == 1.0


def test_hidden_router_matches_transformers_mlp_inputs(folders):
  prompts = [[[5, 6, 7, 8]], [[9, 10], [11, 12, 13]], [[20, 21, 22]]]
  cfg, p = fusion.build_moe(folders["base"], folders["experts"], router_init="hidden", hidden_prompts=prompts)
  base = folders["torch"][0]
  captured = {}
  hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args, l=l: captured.setdefault(l, []).append(args[0]))
           for l, layer in enumerate(base.model.layers)]
  try:
    want = np.zeros((2, 64, 3), np.float32)
    for e, ps in enumerate(prompts):
      captured.clear()
      with torch.no_grad():
        for ids in ps:
          base(torch.tensor([ids]))
      for l in range(2):
        v = torch.cat([h[0] for h in captured[l]], 0).mean(0).numpy()
        want[l, :, e] = v / np.linalg.norm(v)
  finally:
    for h in hooks:
      h.remove()
  assert_close(p["layers"]["moe"]["router"]["kernel"], want, rtol=1e-4, atol_rel=2e-5)  # torch token means


def test_bad_input(folders, tmp_path):
  with pytest.raises(ValueError, match=r"top_k=4 must be in \[1, number of experts=3\]"):
    fusion.build_moe(folders["base"], folders["experts"], top_k=4)
  with pytest.raises(ValueError, match="at least 2 experts, got 1"):
    fusion.build_moe(folders["base"], folders["experts"][:1], top_k=1)
  wide = tiny_hf.save_model(tiny_hf.make_model("llama_mha_untied", intermediate_size=80), tmp_path / "wide")
  with pytest.raises(ValueError, match=r"expert 1 does not match the base model: intermediate_size=80 vs 96"):
    fusion.build_moe(folders["base"], [folders["experts"][0], wide])
  qwen = tiny_hf.save_model(tiny_hf.make_model("qwen2_bias", num_key_value_heads=4, tie_word_embeddings=False),
                            tmp_path / "qwen")
  with pytest.raises(ValueError, match=r"expert 0 does not match the base model: architecture='qwen2' vs 'llama'"):
    fusion.build_moe(folders["base"], [qwen, folders["experts"][0]])
  with pytest.raises(ValueError, match="router_init='hidden' needs hidden prompts"):
    fusion.build_moe(folders["base"], folders["experts"], router_init="hidden")
  with pytest.raises(ValueError, match="expert_names has 2 entries for 3 experts"):
    fusion.build_moe(folders["base"], folders["experts"], expert_names=("a", "b"))


def test_fused_moe_exports_as_mixtral_with_matching_logits(folders, tmp_path):
  """Fuse -> h3jax.save_pretrained -> transformers MixtralForCausalLM: same logits (fp32)."""
  from h3jax.hf.export import save_pretrained
  import transformers
  cfg, p = fusion.build_moe(folders["base"], folders["experts"], top_k=2)
  p["layers"]["moe"]["router"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(2), (2, 64, 3))
  # a few stage-B LoRA leaves on the experts: the export must merge them
  lora = p["layers"]["moe"]["experts"]["up_proj"]
  lora["lora_a"] = 0.1 * jax.random.normal(jax.random.key(0), (2, 3, 64, 4))
  lora["lora_b"] = 0.1 * jax.random.normal(jax.random.key(1), (2, 3, 4, 96))
  cfg = cfg.replace(lora_scale=0.5)
  out = save_pretrained(p, cfg, tmp_path / "mixtral")
  hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = np.random.default_rng(1).integers(0, 128, (2, 9))
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  got = llama.forward(p, jnp.asarray(ids), cfg)
  assert_close(got, want, rtol=1e-4, atol_rel=1e-5)


def test_expert_from_h3jax_checkpoint_with_lora(folders, tmp_path):
  """Stage A hands over an Orbax checkpoint (LoRA leaves + cfg.lora_scale): merged into its expert."""
  from h3jax.checkpoint import Checkpointer
  from h3jax.hf.load import load_pretrained
  cfg, p = load_pretrained(folders["experts"][1])
  up = p["layers"]["mlp"]["up_proj"]
  up["lora_a"] = jax.random.normal(jax.random.key(0), (2, 64, 2))
  up["lora_b"] = jax.random.normal(jax.random.key(1), (2, 2, 96))
  cfg = cfg.replace(lora_scale=0.5)
  ck = Checkpointer(tmp_path / "ckpt")
  ck.save(3, params=p, config=cfg, force=True)
  ck.wait()
  ck.close()
  mcfg, mp = fusion.build_moe(folders["base"], [folders["experts"][0], tmp_path / "ckpt"], top_k=1)
  want = up["kernel"] + 0.5 * jnp.einsum("lir,lro->lio", up["lora_a"], up["lora_b"])
  assert_close(mp["layers"]["moe"]["experts"]["up_proj"]["kernel"][:, 1], want, rtol=1e-5, atol_rel=1e-5)
  assert mcfg.num_experts == 2 and mcfg.num_experts_per_tok == 1

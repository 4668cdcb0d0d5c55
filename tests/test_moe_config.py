"""mergekit-moe YAML reading (h3jax.fusion.moe_config): torch's RNG without torch, bad YAML, Stage B from a YAML
of PEFT adapters (the docs/interop.md worked example). The mergekit-moe oracle is in test_interop_oracles.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import merge_fixtures as mf
from h3jax.fusion import moe_config
from h3jax.model.params import flatten_dict

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("shape", [(2, 3, 32), (3, 5, 7), (4, 2, 16)])
def test_torch_rng_reproduced_without_torch(shape):
  torch.manual_seed(11)
  want = torch.randn(shape).numpy()
  np.testing.assert_allclose(moe_config.torch_randn(11, shape), want, rtol=1e-6, atol=1e-6)
  torch.manual_seed(12)
  np.testing.assert_array_equal(moe_config.torch_rand(12, shape), torch.rand(shape).numpy())


def test_bad_yaml_is_one_error_and_nothing_written(tmp_path):
  base, experts, _ = mf.llama_family(tmp_path / "fam", n_models=3)

  def y(mode="random", **kw):
    return {"base_model": base, "gate_mode": mode,
            "experts": [{"source_model": e, "positive_prompts": [f"p{i}"]} for i, e in enumerate(experts)], **kw}
  bad = [(y(shared_experts=[{"source_model": base}]), "shared_experts"),
         ({**y(), "experts": [{"source_model": experts[0], "noise_scale": 0.1}, {"source_model": experts[1]}]},
          "noise_scale"),
         (y("hidden_sparse"), "unknown gate_mode"),
         (y(experts_per_token=4), "experts_per_token must be in"),
         ({**y("hidden"), "experts": [{"source_model": e} for e in experts]}, "no positive_prompts"),
         (y(architecture="qwen"), "architecture"),
         (y(merge_method="linear"), "unknown key 'merge_method'")]
  for i, (d, msg) in enumerate(bad):
    f = tmp_path / f"bad{i}.yml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(moe_config.MoEConfigError, match=msg):
      moe_config.build_moe_folder(f, tmp_path / "out")
    assert not (tmp_path / "out").exists()
  # the CLI: one `error:` line, exit code 2 (one subprocess: each costs a JAX import)
  r = subprocess.run([sys.executable, "-m", "h3jax.moe", f"--config={tmp_path / 'bad0.yml'}",
                      f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=mf.REPO)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "shared_experts" in r.stderr
  assert not (tmp_path / "out").exists()


def test_stage_b_trains_the_router_of_a_moe_yaml_of_peft_adapters(tmp_path):
  """docs/interop.md's worked example at tiny scale: three PEFT adapters -> mergekit-moe YAML ->
  Stage B with only the router trainable; experts are the adapters merged into the base."""
  import transformers
  from h3jax.train import loop, optim, stages
  from h3jax.train.defaults import load_config_file
  cfg = mf.llama_config(False, vocab_size=260)
  base = mf.write_llama(tmp_path / "base", mf.random_base(mf.llama_shapes(cfg), 0), cfg)
  adapters, merged = [], []
  for i in range(3):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(i)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                    target_modules=["gate_proj", "up_proj", "down_proj"]))
    pm.save_pretrained(tmp_path / f"ad{i}")
    adapters.append(str(tmp_path / f"ad{i}"))
    merged.append(pm.merge_and_unload().model.layers[1].mlp.up_proj.weight.detach().numpy().copy())
  (tmp_path / "moe.yml").write_text(yaml.safe_dump({
      "base_model": base, "gate_mode": "random", "experts_per_token": 2,
      "experts": [{"source_model": a} for a in adapters]}))
  data = tmp_path / "d.jsonl"
  data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}", "task": i % 3}) + "\n"
                          for i in range(24)))
  c = load_config_file(mf.REPO / "configs" / "tiny.py", "fusion")
  c.fusion.moe_config, c.lora.enabled, c.export.enabled = str(tmp_path / "moe.yml"), False, False
  c.loss.drift_weights = ()  # the drift term regularises Stage-B LoRA, which this router-only run has none of
  c.data.sources, c.data.tasks, c.data.seq_len, c.train.batch_size = (str(data),), (), 32, 6
  c.train.steps, c.train.checkpoint_every, c.train.eval_every, c.train.progress = 3, 3, 0, False
  run = stages.setup(c)
  trainable = sorted(optim.path_str(k) for k, v in flatten_dict(run.labels).items() if v != optim.FROZEN)
  assert trainable == ["layers/moe/router/kernel"] and run.cfg.num_experts == 3
  up = np.asarray(run.params["layers"]["moe"]["experts"]["up_proj"]["kernel"][1])  # [E, in, out]
  for i in range(3):
    np.testing.assert_allclose(up[i], merged[i].T, rtol=1e-5, atol=1e-6)
  router0 = np.asarray(run.params["layers"]["moe"]["router"]["kernel"])
  want = np.transpose(moe_config.torch_randn(c.seed, (3, 3, 32)), (0, 2, 1))  # mergekit-moe's random gate
  np.testing.assert_allclose(router0, want, rtol=1e-6, atol=1e-6)
  out = loop.train_and_evaluate(c, tmp_path / "run", run=run)
  router1 = np.asarray(out["params"]["layers"]["moe"]["router"]["kernel"])
  assert np.abs(router1 - router0).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(out["params"]["layers"]["moe"]["experts"]["up_proj"]["kernel"][1]), up)

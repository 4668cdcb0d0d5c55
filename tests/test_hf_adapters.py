"""PEFT LoRA adapters in and out, checked against `peft` itself (logits, tensors, bad input)."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

import h3jax  # noqa: E402 (after the importorskip)
from h3jax.hf import adapters  # noqa: E402
from h3jax.model import llama  # noqa: E402
from h3jax.train import lora as lora_lib  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from tiny_hf import make_model, save_model  # noqa: E402

IDS = np.array([[1, 5, 9, 33, 7, 100, 64, 3, 17, 42, 11, 2]], np.int32)


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


def make_adapter(model, out, seed=1, **kw):
  """A PEFT adapter with random (non-zero) A and B, so it changes the logits."""
  torch.manual_seed(seed)
  config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})
  pm = peft.get_peft_model(model, config)
  pm.save_pretrained(out)
  with torch.no_grad():
    logits = pm(torch.tensor(IDS)).logits.numpy()
  pm.unload()  # give the caller its base model back unchanged
  return str(out), logits


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  model = make_model("llama_mha_untied")
  return model, save_model(model, tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    dict(target_modules="all-linear", use_rslora=True, lora_alpha=6),
    dict(target_modules=["up_proj", "o_proj"], layers_to_transform=[1], modules_to_save=["lm_head"]),
])
def test_peft_adapter_in_matches_peft_logits(base, tmp_path, kw):
  model, base_dir = base
  ad, want = make_adapter(model, tmp_path / "ad", **kw)
  cfg, params = adapters.load_with_adapter(base_dir, ad)
  got = np.asarray(llama.forward_jit(params, jnp.asarray(IDS), cfg))
  assert rel_err(got, want) < 1e-5
  with torch.no_grad():  # the adapter really changes the model
    plain = model(torch.tensor(IDS)).logits.numpy()
  assert rel_err(plain, want) > 1e-3


def test_round_trip_peft_h3jax_peft_is_bit_identical(base, tmp_path):
  model, base_dir = base
  ad, _ = make_adapter(model, tmp_path / "ad", target_modules=["k_proj", "up_proj"], use_rslora=True,
                       layers_to_transform=[0], modules_to_save=["lm_head"])
  a = adapters.read_adapter(ad)
  cfg, params = adapters.load_with_adapter(base_dir, ad)
  out = adapters.save_adapter(cfg, params, tmp_path / "out", adapter_config=a.config)
  before, after = load_file(f"{ad}/adapter_model.safetensors"), load_file(f"{out}/adapter_model.safetensors")
  assert sorted(before) == sorted(after)
  for k in before:
    assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), k
  c0, c1 = a.config, json.loads((out / "adapter_config.json").read_text())
  for key in ("r", "lora_alpha", "use_rslora", "layers_to_transform"):
    assert c0[key] == c1[key]
  assert sorted(c0["target_modules"]) == sorted(c1["target_modules"])
  assert c1["modules_to_save"] == ["lm_head"]


def test_trained_h3jax_lora_exports_to_peft(base, tmp_path):
  """An h3jax LoRA tree (as Stage A trains it: rank 8, alpha 4 on FFN and attention)
  loads in PeftModel.from_pretrained with the same logits."""
  model, base_dir = base
  cfg, params = h3jax.load_pretrained(base_dir)
  params = lora_lib.add_lora(params, lora_lib.FFN_TARGETS + lora_lib.ATTN_TARGETS, 8, jax.random.key(0))
  cfg = lora_lib.lora_model_config(cfg, 8, 4.0, 0.1)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # B != 0: as after training
      lambda p, x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype) if p[-1].key == "lora_b" else x, params)
  ours = np.asarray(llama.forward_jit(params, jnp.asarray(IDS), cfg.replace(lora_dropout=0.0)))
  out = adapters.save_adapter(cfg, params, tmp_path / "peft", base_model_name_or_path=base_dir)
  pm = peft.PeftModel.from_pretrained(model, str(out))
  with torch.no_grad():
    theirs = pm(torch.tensor(IDS)).logits.numpy()
  pm.unload()
  assert rel_err(ours, theirs) < 1e-4
  assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 4
  # and back in: the same tree
  cfg2, params2 = adapters.load_with_adapter(base_dir, out)
  assert cfg2.lora_scale == cfg.lora_scale
  for path in (("layers", "mlp", "up_proj"), ("layers", "attn", "q_proj")):
    node, node2 = params, params2
    for k in path:
      node, node2 = node[k], node2[k]
    np.testing.assert_array_equal(node["lora_a"], node2["lora_a"])
    np.testing.assert_array_equal(node["lora_b"], node2["lora_b"])


def test_bad_adapters_are_one_clear_error(base, tmp_path):
  model, base_dir = base
  dora, _ = make_adapter(model, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
  with pytest.raises(adapters.AdapterError, match="DoRA"):
    adapters.read_adapter(dora)
  other = make_model("llama_mha_untied", intermediate_size=80)
  wrong, _ = make_adapter(other, tmp_path / "wrong", target_modules=["up_proj"])
  with pytest.raises(adapters.AdapterError, match="another base model"):
    adapters.load_with_adapter(base_dir, wrong)
  ok, _ = make_adapter(model, tmp_path / "ok", target_modules=["q_proj"])
  cfg_path = tmp_path / "ok" / "adapter_config.json"
  c = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps(dict(c, target_modules=["q_proj", "c_attn"])))
  with pytest.raises(adapters.AdapterError, match="unknown target module.*c_attn"):
    adapters.load_with_adapter(base_dir, ok)
  cfg_path.write_text(json.dumps(dict(c, peft_type="IA3")))
  with pytest.raises(adapters.AdapterError, match="LoRA adapters only"):
    adapters.read_adapter(ok)
  cfg, params = h3jax.load_pretrained(base_dir)
  with pytest.raises(adapters.AdapterError, match="no LoRA factors"):
    adapters.save_adapter(cfg, params, tmp_path / "none")
  assert not (tmp_path / "none").exists()


def test_build_moe_from_peft_adapters_matches_peft_merged_weights(base, tmp_path):
  """Experts given as PEFT adapter folders (on build_moe's base) or BASE+ADAPTER: each expert's
  FFN is PEFT's merge_and_unload weight of that adapter."""
  from h3jax import fusion
  model, base_dir = base
  ads, merged = [], []
  for i in range(3):
    ad, _ = make_adapter(model, tmp_path / f"ad{i}", seed=10 + i, r=2 + i, lora_alpha=4,
                         target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
    ads.append(ad)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), ad)  # merge_and_unload edits its base
    sd = {k: v.detach().numpy().copy() for k, v in pm.merge_and_unload().state_dict().items()}
    merged.append(sd)
  cfg, p = fusion.build_moe(base_dir, [ads[0], ads[1], f"{base_dir}+{ads[2]}"], top_k=2, router_init="zeros")
  assert cfg.num_experts == 3 and cfg.lora_scale == 1.0
  for i, sd in enumerate(merged):
    for name in ("gate_proj", "up_proj", "down_proj"):
      got = np.asarray(p["layers"]["moe"]["experts"][name]["kernel"][1, i])
      np.testing.assert_allclose(got, sd[f"model.layers.1.mlp.{name}.weight"].T, rtol=1e-5, atol=1e-6)
  # attention comes from the base (attn_from="base"), not from the adapters' q_proj LoRA
  np.testing.assert_array_equal(np.asarray(p["layers"]["attn"]["q_proj"]["kernel"][0]),
                                model.model.layers[0].self_attn.q_proj.weight.detach().numpy().T)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
  """A tiny model with SmolLM2's vocabulary size and tokenizer files, plus a PEFT adapter."""
  import shutil
  from conftest import SMOLLM2_DIR
  if not (SMOLLM2_DIR / "tokenizer.json").is_file():
    pytest.skip(f"SmolLM2 tokenizer not found at {SMOLLM2_DIR}")
  root = tmp_path_factory.mktemp("tok")
  model = make_model("llama_gqa_tied_llama3", std=0.3, vocab_size=49152, eos_token_id=None)
  base_dir = save_model(model, root / "base")
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(SMOLLM2_DIR / f, root / "base" / f)
  ad, _ = make_adapter(model, root / "ad", seed=3, target_modules=["q_proj", "up_proj"])
  c = json.loads((root / "ad" / "adapter_config.json").read_text())  # as if trained on the saved base
  (root / "ad" / "adapter_config.json").write_text(json.dumps(dict(c, base_model_name_or_path=base_dir)))
  return model, base_dir, ad


def test_generate_and_evaluate_load_adapters(with_tokenizer):
  """`generate` on BASE+ADAPTER / an adapter folder is greedy-identical to PeftModel.generate;
  the evaluation loader gives the same tree and the base's tokenizer."""
  from h3jax import generation
  from h3jax.evaluation import models as eval_models
  from h3jax.hf import loader
  model, base_dir, ad = with_tokenizer
  cfg, params = loader.load_model(f"{base_dir}+{ad}", "float32")  # what `generate --model` loads
  tok = loader.load_tokenizer(f"{base_dir}+{ad}")
  ids = np.asarray([tok("The quick brown fox")["input_ids"]], np.int32)
  pm = peft.PeftModel.from_pretrained(model, ad)
  with torch.no_grad():
    ref = pm.generate(input_ids=torch.as_tensor(ids), do_sample=False, max_new_tokens=12,
                      pad_token_id=0)[:, ids.shape[1]:].numpy()
  pm.unload()
  toks, _ = generation.generate_tokens(params, cfg, ids, np.ones_like(ids), max_new_tokens=12)
  np.testing.assert_array_equal(toks, ref)
  m = eval_models.load_entry(f"expertA={ad}")  # base from the adapter's base_model_name_or_path
  assert m["name"] == "expertA" and m["cfg"].lora_scale == cfg.lora_scale
  np.testing.assert_array_equal(m["params"]["layers"]["mlp"]["up_proj"]["lora_b"],
                                params["layers"]["mlp"]["up_proj"]["lora_b"])
  assert m["tokenizer"]("hi")["input_ids"] == tok("hi")["input_ids"]


def test_generate_cli_on_an_adapter(with_tokenizer):
  """`python -m h3jax.generate --model BASE+ADAPTER` prints the library's greedy completion."""
  import pathlib
  import subprocess
  import sys
  from h3jax import generation
  from h3jax.hf import loader
  _, base_dir, ad = with_tokenizer
  cfg, params = loader.load_model(f"{base_dir}+{ad}", "float32")
  want = generation.generate(params, cfg, loader.load_tokenizer(f"{base_dir}+{ad}"), ["The quick brown fox"],
                             max_new_tokens=8)[0]
  r = subprocess.run([sys.executable, "-m", "h3jax.generate", f"--model={base_dir}+{ad}",
                      "--prompt=The quick brown fox", "--max_new_tokens=8"], capture_output=True, text=True,
                     cwd=pathlib.Path(__file__).resolve().parents[1], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout == f"### prompt\nThe quick brown fox\n### completion\n{want}\n\n"


@pytest.mark.slow  # a short Stage A run + the export CLI in a subprocess
def test_stage_a_run_exports_as_peft_adapter(tmp_path):
  """A real Stage A LoRA run (configs/tiny.py on an HF base), exported with
  `python -m h3jax.export --format=peft`: PeftModel.from_pretrained gives h3jax's logits."""
  import pathlib
  import subprocess
  import sys
  from h3jax.checkpoint import load_params
  from h3jax.train import loop
  from h3jax.train.defaults import load_config_file
  repo = pathlib.Path(__file__).resolve().parents[1]
  model = make_model("llama_gqa_tied_llama3", vocab_size=260)  # the byte tokenizer's 259 ids fit
  base_dir = save_model(model, tmp_path / "base")
  c = load_config_file(repo / "configs" / "tiny.py", "helpful")
  data = tmp_path / "d.jsonl"
  data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"answer {i}"}) + "\n" for i in range(16)))
  c.data.sources, c.data.tasks = (str(data),), ()
  c.model.hf_dir, c.lora.targets = base_dir, ("ffn", "attn")
  c.train.steps, c.train.checkpoint_every, c.train.eval_every, c.train.progress = 4, 4, 0, False
  c.data.seq_len, c.train.batch_size, c.train.lr = 32, 4, 3e-2
  loop.train_and_evaluate(c, tmp_path / "run")
  cmd = [sys.executable, "-m", "h3jax.export", f"--checkpoint={tmp_path / 'run' / 'checkpoints'}",
         f"--out={tmp_path / 'peft'}", "--format=peft", f"--base={base_dir}"]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
  assert r.returncode == 0, r.stderr[-2000:]
  cfg, params = load_params(tmp_path / "run" / "checkpoints")
  assert np.abs(np.asarray(params["layers"]["mlp"]["up_proj"]["lora_b"])).max() > 0  # it trained
  ours = np.asarray(llama.forward_jit(params, jnp.asarray(IDS), cfg.replace(lora_dropout=0.0)))
  pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft"))
  with torch.no_grad():
    theirs = pm(torch.tensor(IDS)).logits.numpy()
  pm.unload()
  assert rel_err(ours, theirs) < 1e-4
  # a run that changed a non-LoRA weight cannot become an adapter: one error, nothing written
  other = make_model("llama_gqa_tied_llama3", vocab_size=260, seed=7)
  r = subprocess.run(cmd[:4] + [f"--out={tmp_path / 'bad'}", "--format=peft",
                                f"--base={save_model(other, tmp_path / 'other')}"],
                     capture_output=True, text=True, cwd=repo)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: the run changed non-LoRA")
  assert not (tmp_path / "bad").exists()

"""Interop with PEFT adapters and mergekit tools, checked against mergekit 0.1.5 (own venv).

One mergekit process per module runs every merge case (imports cost ~15 s).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import merge_fixtures as mf

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from h3jax.merging.streaming import config as mcfg  # noqa: E402
from h3jax.merging.streaming import driver  # noqa: E402
from h3jax.merging.streaming.inputs import MergeError  # noqa: E402

pytestmark = [pytest.mark.oracle,
              pytest.mark.skipif(not mf.MERGEKIT_PY.exists(),
                                 reason="mergekit oracle venv missing: run scripts/setup_oracles.sh")]


def write_adapter(base_dir, out, seed, **kw):
  """A PEFT LoRA adapter with random non-zero factors on the tiny base at base_dir."""
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  torch.manual_seed(seed)
  cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 16, "init_lora_weights": False, **kw})
  pm = peft.get_peft_model(model, cfg)
  with torch.no_grad():  # larger factors than PEFT's init, so the delta is not negligible
    for n, p in pm.named_parameters():
      if "lora_B" in n:
        p.mul_(20.0)
  pm.save_pretrained(out)
  return str(out)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
  root = tmp_path_factory.mktemp("lorafam")
  base, models, _ = mf.llama_family(root, n_models=2)
  ads = [write_adapter(base, root / "ad0", 1, target_modules=["q_proj", "up_proj", "down_proj"]),
         write_adapter(base, root / "ad1", 2, target_modules="all-linear", use_rslora=True,
                       modules_to_save=["lm_head"])]
  return root, base, models, ads


CASES = {
    "task_arithmetic_lora": lambda b, ms, ads: dict(
        merge_method="task_arithmetic", base_model=b,
        models=[dict(model=f"{b}+{ads[0]}", parameters=dict(weight=0.7)),
                dict(model=f"{b}+{ads[1]}", parameters=dict(weight=0.4)),
                dict(model=ms[0], parameters=dict(weight=0.5))]),
    "linear_lora_on_other_model": lambda b, ms, ads: dict(
        merge_method="linear",
        models=[dict(model=f"{ms[1]}+{ads[0]}", parameters=dict(weight=1.0)),
                dict(model={"model": {"path": ms[0]}, "lora": {"path": ads[1]}}, parameters=dict(weight=2.0))]),
}


@pytest.fixture(scope="module")
def mergekit_outputs(family):
  root, base, models, ads = family
  jobs = []
  for name, make in CASES.items():
    jobs.append({"yaml": yaml.safe_dump(make(base, models, ads)), "out": str(root / f"mk_{name}"),
                 "lora_cache": str(root / "mk_lora_cache")})
  (root / "jobs.json").write_text(json.dumps(jobs))
  mf.run_oracle(mf.MERGEKIT_PY, mf.MERGEKIT_BATCH, root / "jobs.json")
  return {name: root / f"mk_{name}" for name in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_plus_lora_merge_matches_mergekit(family, mergekit_outputs, tmp_path, case):
  root, base, models, ads = family
  cfg_file = tmp_path / "merge.yml"
  cfg_file.write_text(yaml.safe_dump(CASES[case](base, models, ads)))
  spec = mcfg.load_config(cfg_file)
  driver.run_merge(spec, tmp_path / "out", progress=False)
  ours, theirs = mf.read_tensors(tmp_path / "out"), mf.read_tensors(mergekit_outputs[case])
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # the adapters really moved the merged tensors away from the LoRA-free merge
  plain = mf.read_tensors(base if case.startswith("task") else models[1])
  assert np.abs(ours["model.layers.0.mlp.up_proj.weight"] - plain["model.layers.0.mlp.up_proj.weight"]).max() > 1e-3


def test_model_plus_lora_bad_input_is_one_error(family, tmp_path):
  root, base, models, ads = family
  dora = write_adapter(base, tmp_path / "dora", 3, target_modules=["q_proj"], use_dora=True)
  raw = dict(merge_method="task_arithmetic", base_model=base,
             models=[dict(model=f"{base}+{dora}", parameters=dict(weight=1.0))])
  with pytest.raises(mcfg.MergeConfigError, match="DoRA"):
    mcfg.from_mergekit_dict(raw)
  # an adapter whose shapes belong to another base: found before anything is written
  other_cfg = mf.llama_config(False, intermediate_size=40)
  other = mf.write_llama(tmp_path / "other", mf.random_base(mf.llama_shapes(other_cfg), 5), other_cfg)
  wrong = write_adapter(other, tmp_path / "wrong", 4, target_modules=["up_proj"])
  spec = mcfg.from_mergekit_dict(dict(merge_method="task_arithmetic", base_model=base,
                                      models=[dict(model=f"{base}+{wrong}", parameters=dict(weight=1.0))]))
  with pytest.raises(MergeError, match="another base model"):
    driver.run_merge(spec, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# mergekit-moe YAML -> Mixtral, vs mergekit-moe 0.1.5.

MOE_BATCH = r"""
import json, sys, yaml, logging
logging.disable(logging.WARNING)
from mergekit.moe.config import MoEMergeConfig
from mergekit.options import MergeOptions
from mergekit.scripts.moe import build
for job in json.load(open(sys.argv[1])):
  opts = MergeOptions(device="cpu", random_seed=job["seed"], quiet=True, write_model_card=False)
  opts.apply_global_options()
  build(MoEMergeConfig.model_validate(yaml.safe_load(job["yaml"])), job["out"], opts, device="cpu")
print("ok")
"""

PROMPTS = [(["How do I bake bread?", "Give me a recipe for soup."], ["Write a poem."]),
           (["Solve 2x + 3 = 7.", "What is the derivative of x^2?"], []),
           (["Tell me a story about a dragon.", "Write a haiku about rain.", "Compose a limerick."],
            ["How do I bake bread?"])]


def moe_yaml(base, experts, mode, k=2, dtype=None):
  d = {"base_model": base, "gate_mode": mode, "experts_per_token": k,
       "experts": [{"source_model": m, "positive_prompts": p, **({"negative_prompts": n} if n else {})}
                   for m, (p, n) in zip(experts, PROMPTS)]}
  if dtype:
    d["dtype"] = dtype
  return d


MOE_CASES = {"random": ("random", 7), "uniform_random": ("uniform_random", 3), "cheap_embed": ("cheap_embed", 0),
             "hidden": ("hidden", 0)}


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory):
  """A tiny Llama with SmolLM2's tokenizer (so prompts tokenize as in real use) and 3 experts."""
  import shutil
  from conftest import SMOLLM2_DIR
  if not (SMOLLM2_DIR / "tokenizer.json").is_file():
    pytest.skip(f"SmolLM2 tokenizer not found at {SMOLLM2_DIR}")
  root = tmp_path_factory.mktemp("moefam")
  cfg = mf.llama_config(False, vocab_size=49152, bos_token_id=1, eos_token_id=2)
  base = mf.random_base(mf.llama_shapes(cfg), 0)
  base_dir = mf.write_llama(root / "base", base, cfg)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(SMOLLM2_DIR / f, root / "base" / f)
  experts = [mf.write_llama(root / f"e{i}", mf.perturb(base, 50 + i, 0.05), cfg) for i in range(3)]
  jobs = [{"yaml": yaml.safe_dump(moe_yaml(base_dir, experts, mode)), "out": str(root / f"mk_{name}"),
           "seed": seed} for name, (mode, seed) in MOE_CASES.items()]
  (root / "moe_jobs.json").write_text(json.dumps(jobs))
  mf.run_oracle(mf.MERGEKIT_PY, MOE_BATCH, root / "moe_jobs.json")
  return root, base_dir, experts


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_mergekit_moe_yaml_matches_mergekit_moe(moe_family, tmp_path, case):
  import subprocess
  import sys
  import h3jax
  root, base_dir, experts = moe_family
  mode, seed = MOE_CASES[case]
  cfg_file = tmp_path / "moe.yml"
  cfg_file.write_text(yaml.safe_dump(moe_yaml(base_dir, experts, mode)))
  r = subprocess.run([sys.executable, "-m", "h3jax.moe", f"--config={cfg_file}", f"--out={tmp_path / 'out'}",
                      f"--seed={seed}"], capture_output=True, text=True, cwd=mf.REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert out_cfg["architectures"] == ["MixtralForCausalLM"] and out_cfg["num_local_experts"] == 3
  assert out_cfg["num_experts_per_tok"] == 2
  cfg_o, ours = h3jax.load_pretrained(tmp_path / "out")
  cfg_m, theirs = h3jax.load_pretrained(root / f"mk_{case}")  # mergekit writes transformers-5's fused layout
  assert cfg_o.num_experts == cfg_m.num_experts == 3
  ro, rm = (np.asarray(t["layers"]["moe"]["router"]["kernel"]) for t in (ours, theirs))
  if mode == "hidden":  # mergekit computes hidden states in bfloat16, h3jax in float32
    err = np.linalg.norm(ro - rm, axis=1) / np.linalg.norm(rm, axis=1)  # per layer and expert
    assert err.max() < 3e-2, err
    cos = (ro * rm).sum(1) / np.linalg.norm(ro, axis=1) / np.linalg.norm(rm, axis=1)
    assert cos.min() > 0.999
  else:
    np.testing.assert_allclose(ro, rm, rtol=1e-5, atol=2e-6)
  assert np.abs(ro[:, :, 0] - ro[:, :, 1]).max() > 1e-2  # experts get different rows
  from h3jax.model.params import flatten_dict
  fo, fm = flatten_dict(ours), flatten_dict(theirs)
  assert sorted(fo) == sorted(fm)
  for k in fo:
    if k[-2:] != ("router", "kernel"):
      np.testing.assert_array_equal(np.asarray(fo[k]), np.asarray(fm[k]), err_msg="/".join(k))


# ---------------------------------------------------------------------------
# LoRA extraction vs mergekit-extract-lora 0.1.5.

EXTRACT_BATCH = r"""
import json, sys, logging
logging.disable(logging.WARNING)
from mergekit.scripts.extract_lora import main
for job in json.load(open(sys.argv[1])):
  main(["--model", job["model"], "--base-model", job["base"], "--out-path", job["out"],
        "--max-rank", str(job["rank"]), "--device", "cpu", "--no-lazy-unpickle"], standalone_mode=False)
print("ok")
"""

TRUE_RANK = 3


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """base and a 'fine-tune' = base + rank-3 deltas on every linear layer, new norms and embeddings."""
  root = tmp_path_factory.mktemp("extract")
  cfg = mf.llama_config(False)
  base = mf.random_base(mf.llama_shapes(cfg), 0)
  rng = np.random.default_rng(1)
  ft = {}
  for n, w in base.items():
    if "norm" in n:
      ft[n] = (w + 0.1 * rng.standard_normal(w.shape)).astype(np.float32)
    elif "embed" in n or "lm_head" in n:
      ft[n] = (w + 0.02 * rng.standard_normal(w.shape)).astype(np.float32)
    else:
      u, v = rng.standard_normal((w.shape[0], TRUE_RANK)), rng.standard_normal((TRUE_RANK, w.shape[1]))
      ft[n] = (w + 0.03 * (u * [3.0, 2.0, 1.0]) @ v / np.sqrt(w.shape[1])).astype(np.float32)
  base_dir, ft_dir = mf.write_llama(root / "base", base, cfg), mf.write_llama(root / "ft", ft, cfg)
  jobs = [{"base": base_dir, "model": ft_dir, "out": str(root / "mk_r4"), "rank": 4}]
  (root / "jobs.json").write_text(json.dumps(jobs))
  mf.run_oracle(mf.MERGEKIT_PY, EXTRACT_BATCH, root / "jobs.json")
  return root, base_dir, ft_dir


def _logits(folder_or_model, ids, adapter=None):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
  if adapter is not None:
    model = peft.PeftModel.from_pretrained(model, adapter)
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


def test_extract_lora_matches_mergekit_extract_lora(finetuned, tmp_path):
  import subprocess
  import sys
  from safetensors.numpy import load_file
  root, base_dir, ft_dir = finetuned
  r = subprocess.run([sys.executable, "-m", "h3jax.extract_lora", f"--base={base_dir}", f"--model={ft_dir}",
                      "--rank=4", f"--out={tmp_path / 'ours'}"], capture_output=True, text=True, cwd=mf.REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "ours", root / "mk_r4"))
  assert sorted(ours) == sorted(theirs)
  co = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  cm = json.loads((root / "mk_r4" / "adapter_config.json").read_text())
  for key in ("r", "lora_alpha", "rank_pattern", "use_rslora"):
    assert co[key] == cm[key], key
  assert sorted(co["target_modules"]) == sorted(cm["target_modules"])
  assert sorted(co["modules_to_save"]) == sorted(cm["modules_to_save"])
  for k in ours:
    if ".lora_A." in k:
      kb = k.replace("lora_A", "lora_B")
      d_o, d_m = ours[kb] @ ours[k], theirs[kb] @ theirs[k]
      assert np.linalg.norm(d_o - d_m) <= 1e-5 * np.linalg.norm(d_m), k
      # same singular subspace: the top TRUE_RANK factors agree up to sign
      np.testing.assert_allclose(np.abs(ours[k][:TRUE_RANK]), np.abs(theirs[k][:TRUE_RANK]), rtol=1e-3, atol=1e-5)
    elif ".lora_B." not in k:
      np.testing.assert_array_equal(ours[k], theirs[k])


def test_extracted_adapter_reproduces_the_finetune(finetuned, tmp_path):
  """Rank >= the true delta rank: base + adapter gives the fine-tune's logits (PEFT and h3jax);
  below it, the error the rank allows (reported in docs/interop.md)."""
  import jax.numpy as jnp
  from h3jax.hf import adapters
  from h3jax.merging.streaming.extract_lora import extract_lora
  from h3jax.model import llama
  root, base_dir, ft_dir = finetuned
  ids = np.array([[1, 5, 9, 33, 7, 90, 64, 3, 17, 42]], np.int32)
  want = _logits(ft_dir, ids)
  errs = {}
  for rank in (1, 2, 4):
    out = extract_lora(base_dir, ft_dir, tmp_path / f"r{rank}", rank)
    got = _logits(base_dir, ids, str(out))
    errs[rank] = np.linalg.norm(got - want) / np.linalg.norm(want)
    cfg, params = adapters.load_with_adapter(base_dir, out)
    ours = np.asarray(llama.forward_jit(params, jnp.asarray(ids), cfg))
    assert np.linalg.norm(ours - got) <= 1e-5 * np.linalg.norm(got)
  assert errs[4] < 1e-5, errs
  assert errs[1] > errs[2] > errs[4] and errs[2] > 1e-4, errs  # truncation below the true rank costs accuracy
  # per-module ranks (rank_pattern) load in PEFT and h3jax alike
  out = extract_lora(base_dir, ft_dir, tmp_path / "pattern", 4, rank_pattern={r"mlp\.": 2}, embed="skip")
  c = json.loads((out / "adapter_config.json").read_text())
  assert c["rank_pattern"]["model.layers.0.mlp.up_proj"] == 2 and c["modules_to_save"] == [
      "input_layernorm", "norm", "post_attention_layernorm"]
  got = _logits(base_dir, ids, str(out))
  cfg, params = adapters.load_with_adapter(base_dir, out)
  ours = np.asarray(llama.forward_jit(params, jnp.asarray(ids), cfg))
  assert np.linalg.norm(ours - got) <= 1e-5 * np.linalg.norm(got)


def test_extract_lora_bad_input(finetuned, tmp_path):
  import subprocess
  import sys
  root, base_dir, ft_dir = finetuned
  other_cfg = mf.llama_config(False, intermediate_size=40)
  other = mf.write_llama(tmp_path / "other", mf.random_base(mf.llama_shapes(other_cfg), 5), other_cfg)
  from h3jax.hf.adapters import AdapterError
  from h3jax.merging.streaming.extract_lora import extract_lora
  for args, kw, msg in [((other, ft_dir, 4), {}, "does not fine-tune"), ((base_dir, ft_dir, 0), {}, "rank must be"),
                        ((base_dir, ft_dir, 2), {"rank_pattern": {"mlp": 0}}, "rank_pattern ranks")]:
    with pytest.raises(AdapterError, match=msg):
      extract_lora(args[0], args[1], tmp_path / "out", args[2], **kw)
    assert not (tmp_path / "out").exists()
  r = subprocess.run([sys.executable, "-m", "h3jax.extract_lora", f"--base={base_dir}", f"--model={ft_dir}",
                      "--rank=2", "--rank_pattern=mlp", f"--out={tmp_path / 'out'}"],
                     capture_output=True, text=True, cwd=mf.REPO)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "REGEX=RANK" in r.stderr
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# slices / passthrough (depth up-scaling) vs mergekit-yaml.


def test_passthrough_slices_match_mergekit(family, tmp_path):
  root, base, models, ads = family
  doc = dict(merge_method="passthrough", dtype="float32", slices=[
      dict(sources=[dict(model=models[0], layer_range=[0, 2])]),
      dict(sources=[dict(model=models[1], layer_range=[1, 3], parameters=dict(scale=0.5))]),
      dict(sources=[dict(model=base, layer_range=[2, 3])])])
  (tmp_path / "jobs.json").write_text(json.dumps([{"yaml": yaml.safe_dump(doc), "out": str(tmp_path / "mk")}]))
  mf.run_oracle(mf.MERGEKIT_PY, mf.MERGEKIT_BATCH, tmp_path / "jobs.json")
  (tmp_path / "s.yml").write_text(yaml.safe_dump(doc))
  driver.run_merge(mcfg.load_config(tmp_path / "s.yml"), tmp_path / "out", progress=False)
  ours, theirs = mf.read_tensors(tmp_path / "out"), mf.read_tensors(tmp_path / "mk")
  assert sorted(ours) == sorted(theirs) and "model.layers.4.mlp.up_proj.weight" in ours
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  c_o = json.loads((tmp_path / "out" / "config.json").read_text())
  c_m = json.loads((tmp_path / "mk" / "config.json").read_text())
  assert c_o["num_hidden_layers"] == c_m["num_hidden_layers"] == 5
  # layer 3 is models[1]'s layer 2, halved
  m1 = mf.read_tensors(models[1])
  np.testing.assert_array_equal(ours["model.layers.3.self_attn.q_proj.weight"],
                                m1["model.layers.2.self_attn.q_proj.weight"] * np.float32(0.5))
  m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads as a 5-layer Llama
  assert len(m.model.layers) == 5

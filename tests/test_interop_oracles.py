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

from h3jax.merging import config as mcfg  # noqa: E402
from h3jax.merging import driver  # noqa: E402
from h3jax.merging.inputs import MergeError  # noqa: E402

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

"""Stage set-up: the paper's Stage-A LoRA, full-FFN SFT, and the tiny end-to-end pipeline (optin)."""

import json
import pathlib

import pytest

from h3jax.model.params import flatten_dict
from h3jax.train import optim, stages
from h3jax.train.defaults import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny(tmp_path, arg="helpful"):
  c = load_config_file(REPO / "configs" / "tiny.py", arg)
  data = tmp_path / "d.jsonl"
  data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}", "task": i % 3}) + "\n"
                          for i in range(12)))
  c.data.sources = (str(data),)
  return c


def trainable(run):
  return sorted(optim.path_str(k) for k, v in flatten_dict(run.labels).items() if v != optim.FROZEN)


def test_stage_a_paper_lora_trains_only_ffn_adapters(tmp_path):
  run = stages.setup(tiny(tmp_path))
  assert run.cfg.lora_scale == 0.5 and run.cfg.lora_dropout == 0.1  # r=8, alpha=4
  assert run.cfg.remat == "none"  # remat "auto": a LoRA step saves few activations
  assert trainable(run) == sorted(f"layers/mlp/{m}_proj/lora_{ab}" for m in ("gate", "up", "down")
                                  for ab in "ab")
  assert run.params["layers"]["mlp"]["up_proj"]["lora_a"].shape == (2, 32, 8)
  assert run.train.batch(0)["input_ids_BT"].shape == (8, 64)
  assert run.eval is not None


def test_stage_a_full_ffn_option(tmp_path):
  c = tiny(tmp_path)
  c.lora.enabled = False
  c.train.trainable = ("layers/mlp/*",)
  run = stages.setup(c)
  assert trainable(run) == sorted(f"layers/mlp/{m}_proj/kernel" for m in ("gate", "up", "down"))
  assert run.cfg.remat == "dots"  # remat "auto": a dense model whose base weights train
  assert stages.resolve_remat(c, moe=True) == "none"  # an MoE's expert matmuls are batched: "dots" recomputes them
  c.model.remat = "full"
  assert stages.setup(c).cfg.remat == "full"
  assert "lora_a" not in run.params["layers"]["mlp"]["up_proj"]


def test_bad_stage_and_vocab_mismatch(tmp_path):
  c = tiny(tmp_path)
  c.stage = "dpo"
  with pytest.raises(ValueError, match=r"unknown stage 'dpo'; expected one of \('sft', 'fusion'\)"):
    stages.setup(c)
  c = tiny(tmp_path)
  c.model.remat = "partial"
  with pytest.raises(ValueError, match=r"model.remat must be one of \('auto', 'none', 'full', 'dots'\), got 'partial'"):
    stages.setup(c)
  c = tiny(tmp_path)
  c.model.tiny.vocab_size = 64
  with pytest.raises(ValueError, match=r">= model vocab_size 64: tokenizer and model do not match"):
    stages.setup(c)


@pytest.mark.slow
@pytest.mark.optin  # 5 training runs + export + generation: ~2 min idle, ~6 min on the busy box
def test_tiny_pipeline_end_to_end(tmp_path):
  from h3jax.train import h3fusion as pipeline
  c = load_config_file(REPO / "configs" / "tiny.py", "pipeline")
  c.pipeline.stage_a_steps = 3
  c.train.steps = 3
  c.train.progress = False
  c.data.max_examples = 16
  out = pipeline.run_pipeline(c, tmp_path)
  hf_cfg = json.loads((pathlib.Path(out["export_dir"]) / "config.json").read_text())
  assert hf_cfg["architectures"] == ["MixtralForCausalLM"] and hf_cfg["num_local_experts"] == 3
  rows = [json.loads(l) for l in (tmp_path / "fusion" / "metrics.jsonl").read_text().splitlines()]
  assert "train/router_acc" in rows[0] and "train/gate_loss" in rows[0] and "train/drift" in rows[0]
  assert (tmp_path / "answer.txt").read_text().startswith("Q: What is the capital of France?")

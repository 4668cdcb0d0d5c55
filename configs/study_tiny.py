r"""The 3H study's whole DAG on a random tiny Llama (SmolLM2's tokenizer), in a few minutes on 2 CPU cores.

  python -m h3jax.study --config=configs/study_tiny.py --workdir=/tmp/study_tiny --workers=2

Needs artifacts/smollm2-135m-instruct (for its tokenizer) and the shared data. Every kind of stage of
configs/study_smollm2.py runs (random tiny base, Stage A x3, mixture SFT, merges with a validation grid,
the output ensemble, H3Fusion variants incl. the reference switches and a two-point γ sweep, sharded
generation, scoring, analysis) on a handful of items with 8 new tokens: it checks structure, not quality
(the text is gibberish). Expected: `[study] finished N stage(s), 0 failed` and
/tmp/study_tiny/analysis/results.{json,md} plus the plots.
"""

import pathlib

import ml_collections

from h3jax.study.defaults import default_study_config

SMOLLM2 = str(pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-135m-instruct")


def get_config():
  c = default_study_config()
  c.name = "study_tiny"
  c.base = ""
  c.tokenizer = SMOLLM2
  c.tiny_base = ml_collections.ConfigDict(dict(
      hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0))
  c.tiny_std = 0.05
  c.rows = ("base", "expert_helpful", "expert_harmless", "expert_honest", "mixture_sft", "ensemble_logits",
            "merge_ties", "merge_tsv_m", "moe_untrained", "moe_gate_drift", "moe_reference")
  c.merges.merge_ties.grid = [dict(density=0.5, lambda_=1.0), dict(density=0.2, lambda_=1.0)]
  c.merges.merge_tsv_m.grid = [dict(alpha=1.0), dict(alpha=1.0, rank_cap="numerical", rank_rtol=1e-3)]
  c.expert_steps = ml_collections.ConfigDict(dict(helpful=3, harmless=3, honest=3))
  c.stage_b_steps = 2
  c.gamma_sweep = (1e-3, 1e-1)
  c.stage_a.data.seq_len = 64
  c.stage_a.data.max_examples = 16
  c.stage_a.train.batch_size = 2
  c.stage_a.train.checkpoint_every = 2
  c.stage_a.train.warmup_steps = 0
  c.stage_b.fusion.hidden_prompts = 4
  c.eval.batch_size = 4
  c.eval.router_prompts = 4
  c.eval.generation.max_new_tokens = 8
  c.eval.sample = ml_collections.ConfigDict(dict(
      alpaca_eval=3, harmbench=2, strongreject=2, advbench=2, xstest_safe=2, xstest_unsafe=2, truthfulqa_gen=3,
      truthfulqa_mc=3))
  c.eval.holdout = ml_collections.ConfigDict(dict(
      alpaca_eval=2, harmbench=1, strongreject=1, advbench=0, xstest_safe=0, xstest_unsafe=0, truthfulqa_gen=2,
      truthfulqa_mc=2))
  c.validation.generation.max_new_tokens = 4
  c.bootstrap.samples = 200
  c.progress = False
  c.cost = ml_collections.ConfigDict(dict(train_step=1.0, moe_step=2.0, merge=5.0, gen_item=0.5, gen_item_val=0.5,
                                          mc_item=0.5, score=10.0))
  c.judges = ml_collections.ConfigDict(dict(dir="", build_if_missing=True))
  return c

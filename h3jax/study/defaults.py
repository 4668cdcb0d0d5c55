"""Default study config: the rows, their recipes, the evaluation sample and the analysis.

configs/study_*.py start from `default_study_config()` and override. Recipes are nested dicts merged
into `h3jax.train.defaults.default_config()` (Stage A, the mixture SFT and every Stage B variant), into
`h3jax.evaluation.runner.default_config()` (evaluation and validation), or passed to
`h3jax.merging` methods (merge grids). docs/study.md explains every choice.
"""

from __future__ import annotations

import ml_collections

AXES = ("helpful", "harmless", "honest")
MERGE_ROWS = ("merge_linear", "merge_task_arithmetic", "merge_ties", "merge_dare_ties", "merge_tsv_m",
              "merge_iso_cts", "merge_resm", "merge_resm_tuned")
MOE_ROWS = ("moe_untrained", "moe_lm", "moe_gate", "moe_gate_drift", "moe_gate_drift_top1", "moe_reference")
ROWS = (("base",) + tuple(f"expert_{a}" for a in AXES) + ("mixture_sft", "ensemble_logits") + MERGE_ROWS
        + MOE_ROWS)


def _merge_grids() -> dict:
  """Per merge row: the h3jax.merging method and its validation grid (every point is merged and scored
  on the validation split; the best 3H mean is evaluated)."""
  return {
      "merge_linear": dict(method="linear", grid=[dict()]),  # model soup: uniform weights
      "merge_task_arithmetic": dict(method="task_arithmetic", grid=[dict(lambda_=l) for l in (0.3, 0.6, 1.0)]),
      "merge_ties": dict(method="ties", grid=[dict(density=d, lambda_=1.0) for d in (0.2, 0.5)]
                         + [dict(density=0.5, lambda_=0.6)]),
      "merge_dare_ties": dict(method="dare_ties", grid=[dict(density=d, lambda_=1.0, seed=0) for d in (0.3, 0.6)]),
      # The capped point drops the float32-rounding triples a LoRA expert's rank-8 task vector leaves
      # beyond its 8 real ones, which the polar factors otherwise mix in (docs/merging.md, "TSV-M vs
      # fusion-bench on FFN-only LoRA experts").
      "merge_tsv_m": dict(method="tsv_m", grid=[dict(alpha=a) for a in (0.6, 1.0)]
                          + [dict(alpha=1.0, rank_cap="numerical", rank_rtol=1e-3)]),
      "merge_iso_cts": dict(method="iso_cts", grid=[dict(scaling_factor=a) for a in (0.6, 1.0)]),
      "merge_resm": dict(method="resm", grid=[dict()]),  # defaults = TSV-M (alpha 1)
      "merge_resm_tuned": dict(method="resm", grid=[
          dict(rank_mode="sparsity", outlier_mode="none"),
          # sv_rtol (the default): the outlier statistics skip a LoRA task vector's rounding triples
          # (docs/merging.md, RESM); without it both points merged to within 1e-4 of the base
          dict(rank_mode="uniform", outlier_mode="sv", sv_rtol=1e-3),
          dict(rank_mode="sparsity", outlier_mode="sv", sv_rtol=1e-3)]),
  }


def _moe_rows(gate: float, gamma: float) -> dict:
  """Stage B variants: overrides of the Stage B recipe (steps 0 = no Stage B)."""
  g3 = (gamma, gamma, gamma)
  return {
      "moe_untrained": dict(steps=0),
      "moe_lm": dict(loss=dict(gate_weight=0.0, drift_weights=())),
      "moe_gate": dict(loss=dict(gate_weight=gate, drift_weights=())),
      "moe_gate_drift": dict(loss=dict(gate_weight=gate, drift_weights=g3)),
      "moe_gate_drift_top1": dict(loss=dict(gate_weight=gate, drift_weights=g3), fusion=dict(top_k=1)),
      # Every reference-code defect switch (docs/h3fusion.md, "Reference-code defects"): aliased experts (#1),
      # unscaled deltas (#2), frozen random router (#4), cumulative task labels (#5), double-softmax unmasked
      # gating loss (#6), ||A|| + ||B|| drift over a hard-coded 32 layers (#7).
      "moe_reference": dict(
          loss=dict(gate_weight=gate, drift_weights=g3, gate_mode="double_softmax", gate_masked=False,
                    drift_mode="lora_a_plus_b", drift_layer_divisor=32.0),
          fusion=dict(alias_experts=True, delta_scale="one", router_init="random"),
          train=dict(router_trainable=False), data=dict(task_labels="cumulative", tasks=())),
  }


def default_study_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "study"
  c.base = ""  # HF folder of the base model ("" = a random tiny model, see configs/study_tiny.py)
  c.seed = 42
  c.compile_cache = True  # <workdir>/jax_cache/<machine tag>: stages reuse each other's compiled executables
  c.rows = ROWS
  c.tokenizer = ""  # "" = the base folder's
  # Stage A (one LoRA expert per axis): merged into h3jax.train.defaults.default_config().
  c.expert_steps = ml_collections.ConfigDict(dict(helpful=60, harmless=60, honest=60))
  # Each axis' training data (an h3jax.data.pipeline.load_records spec), used by its expert, the data
  # mixture and Stage B alike.
  c.axis_data = ml_collections.ConfigDict(dict(helpful="helpful", harmless="harmless", honest="honest"))
  c.stage_a = ml_collections.ConfigDict(dict(
      data=dict(template="chat", seq_len=256, pack=True, eval_fraction=0.0),
      train=dict(batch_size=8, lr=1e-3, warmup_steps=5, decay="linear", checkpoint_every=20,
                 keep_checkpoints=10, eval_every=0),
      lora=dict(rank=8, alpha=4.0, dropout=0.1, targets=("ffn",)),
      model=dict(remat="none")))
  # The data-mixture baseline: the Stage A recipe on the three training sets mixed, with as many steps as
  # the three experts together (same total examples, same optimizer settings).
  c.mixture_steps = 0  # 0 = sum(expert_steps)
  # Stage B (H3Fusion): fresh LoRA on attention and every expert's FFN, trainable router, Mixtral export.
  c.stage_b_steps = 40
  c.gate_weight = 0.01  # λ (the reference README / evaluation scripts)
  c.gamma = 1e-3  # γ per expert (the reference README's suggestion)
  c.gamma_sweep = (1e-4, 1e-3, 1e-2, 1e-1)  # γ of the helpful expert (γ1), as the reference README's figure
  c.stage_b = ml_collections.ConfigDict(dict(
      fusion=dict(top_k=2, dispatch="capacity", router_init="hidden", hidden_prompts=32),
      lora=dict(targets=("ffn", "attn")),
      # Three experts' FFN activations without remat need > 15 GB at batch 8 x 256 (SmolLM2, OOM-killed);
      # full remat keeps only the layer inputs: 7.1 GB peak RSS, measured.
      model=dict(remat="full")))
  c.moe = ml_collections.ConfigDict(_moe_rows(c.gate_weight, c.gamma))
  c.merges = ml_collections.ConfigDict(_merge_grids())
  c.ensemble_mode = "prob"  # prob: mean of next-token probabilities | logprob: mean of log-probabilities
  # Evaluation: a seeded random sample of each eval split, the same items for every row.
  c.eval = ml_collections.ConfigDict(dict(
      prompt_template="chat", batch_size=32, router_prompts=64,
      generation=dict(max_new_tokens=256, repetition_penalty=1.0, penalize_eos=True),
      sample=dict(alpaca_eval=120, harmbench=60, strongreject=60, advbench=60, xstest_safe=60,
                  xstest_unsafe=60, truthfulqa_gen=150, truthfulqa_mc=0),  # 0 = every non-held-out item
      # Held out of the evaluation for validation: the first items of each set's seeded order (TruthfulQA
      # generation and MC share one order over questions, so a held-out question is out of both).
      holdout=dict(alpaca_eval=40, harmbench=20, strongreject=20, advbench=0, xstest_safe=0, xstest_unsafe=0,
                   truthfulqa_gen=60, truthfulqa_mc=60),
      sample_seed=0, shards=2))
  # Validation (merge hyper-parameters, RESM knobs) runs on the held-out items; shorter answers keep the
  # grid cheap. Metric: the mean of the three axis scores below.
  c.validation = ml_collections.ConfigDict(dict(
      generation=dict(max_new_tokens=128),
      sets=("alpaca_eval", "harmbench", "strongreject", "truthfulqa_gen", "truthfulqa_mc")))
  # Analysis: paired bootstrap over items.
  c.bootstrap = ml_collections.ConfigDict(dict(samples=2000, seed=0))
  return c

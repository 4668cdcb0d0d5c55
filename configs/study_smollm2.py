r"""The 3H fusion study on SmolLM2-135M-Instruct, sized for a 2-core CPU (~15 CPU-hours in all).

  python -m h3jax.study --config=configs/study_smollm2.py --workdir=runs/study_smollm2 --workers=2
  python -m h3jax.study --config=configs/study_smollm2.py --workdir=runs/study_smollm2 --list

Needs artifacts/smollm2-135m-instruct (`python -m h3jax.prepare smollm2`), the shared data
(H3JAX_DATA_ROOT) and the judges (artifacts/judges, built on first use). Every stage (a training
run, a merge, a validation or evaluation shard, a score) writes its output atomically and is skipped
when done, so re-running after a kill continues where it stopped; `--only='train/*'` restricts the
run. `--publish=experiments/results/study_smollm2` copies results.json, results.md, the plots, the
recipes, the timings and the per-item samples there. Expected: one row per model in `rows` with
the eval sample sizes below; results.md compares H3Fusion with the experts, the output ensemble,
the merges and the data-mixture SFT with paired bootstrap 95% CIs.

Recipe (chosen from the calibration runs recorded in docs/study.md): the chat template end to end
(training, generation and MC), LoRA r=8 alpha=4 dropout 0.1 on gate/up/down (the paper's Stage A),
packed rows of 256 tokens, batch 8, lr 1e-3 linear decay, 20 warm-up steps.

Decoding (measured on the 140 held-out validation items, base model, 256 new tokens; docs/study.md):
plain greedy loops (62% of answers cut, 56 of 85 cut ones repeating a 12-token span); transformers'
repetition penalty 1.2 ends the loops but still cuts 62%, because the chat prompt holds the end-of-turn
token and the penalty pushes every answer away from ending; 1.2 with EOS exempt cuts 20% (TruthfulQA
3%, AlpacaEval 22%, harmful prompts 42%). The study decodes greedily with penalty 1.2, EOS exempt, 256
new tokens: the issue's <= 5% cut would need ~2x the generation budget; each row reports its cut rate.
"""

import pathlib

import ml_collections

from h3jax.study.defaults import default_study_config

SMOLLM2 = str(pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-135m-instruct")


def get_config():
  c = default_study_config()
  c.name = "study_smollm2"
  c.base = SMOLLM2
  c.expert_steps = ml_collections.ConfigDict(dict(helpful=80, harmless=60, honest=80))
  # HH-RLHF's "chosen" replies are the less harmful of two, mostly evasive rather than refusing: trained on
  # them alone, expert_harmless did not move pooled harmful compliance (92.8 -> 92.8 %). The data README's
  # remedy: add the 260 refusal_direction harmful_train instructions with template refusals (synthetic).
  c.axis_data.harmless = "harmless+refusals"
  c.stage_b_steps = 40
  c.eval.generation.repetition_penalty = 1.2
  c.eval.generation.penalize_eos = False
  # Row order = the order the stages start in (the runs take several sessions): the expert bar and the
  # headline comparisons first.
  c.rows = ("base", "expert_helpful", "expert_harmless", "expert_honest", "mixture_sft", "moe_gate_drift",
            "ensemble_logits", "merge_tsv_m", "merge_ties", "merge_resm", "merge_resm_tuned", "moe_reference",
            "merge_task_arithmetic", "merge_linear", "merge_dare_ties", "merge_iso_cts", "moe_untrained", "moe_lm",
            "moe_gate", "moe_gate_drift_top1")
  return c

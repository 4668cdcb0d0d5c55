"""H³Fusion: N aligned dense models fused into one Mixtral-style MoE, and its training losses.

  build       `build_moe` / `fuse_params` (pure): experts' FFNs + a router; the reference code's
              defect switches (docs/h3fusion.md)
  losses      gating loss, per-expert drift regularizer, load balance, router z-loss
              (`h3jax.train.objective` combines them with the LM loss)
  moe_config  mergekit-moe YAML (`h3jax-moe`): gate vectors as mergekit-moe computes them, then
              `fuse_params`; `fusion.moe_config=moe.yml` trains it with Stage B
"""

from h3jax.fusion.build import (ATTN_FROM, ROUTER_INITS, build_moe, check_compatible,  # noqa: F401
                                fuse_params, hidden_router, merge_lora, mlp_inputs)

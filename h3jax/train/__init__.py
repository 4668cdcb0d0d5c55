"""Training: optimizer rules, LoRA, losses, sharding, the jitted step and the loop."""

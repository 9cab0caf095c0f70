"""
Everything that removes structure (shared/docs/ALGORITHMS.md):
  1. PrunedLoRA: rank pruning of LoRA adapters during fine-tuning, and its baselines.
  2. Structured pruning of the base model: dependency groups of a LLaMA block (query heads with GQA,
     MLP channels), their importance (LoRAPrune, LLM-Pruner, Wanda-sp, magnitude, random), masks and
     real compaction.
The training loop calls these as plain functions: score -> choose -> update -> mask.
"""

# ============================================================================ 1. PrunedLoRA: rank pruning


# ============================================================================ 2. Structured pruning of the base

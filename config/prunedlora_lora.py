# The baseline every rank-pruning run must beat: plain LoRA trained at the final rank from the start, on
# the same data and steps as config/prunedlora_64to8.py. Compare at equal scale too: alpha = 8 (s = 1,
# the pruned runs' scale) as well as alpha = 16 (experiments/table_prunedlora.py runs both).
dataset = 'gsm8k'
out_dir = 'out/prunedlora_lora_r8'
lora_r = 8
lora_alpha = 8.0
rank_prune = False   # the adapters keep rank lora_r (train.py's default prunes them: PrunedLoRA)
warmup_iters = 30
max_iters = 400

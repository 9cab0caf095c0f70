# PrunedLoRA (docs/ALGORITHMS.md §1) on GSM8K: every adapter starts at r0 = 64 (alpha = r0, s = 1)
# and loses 2 components every 10 optimizer steps after the warmup, down to rank 8, then trains on at
# rank 8. Score and update are prunedlora.py's defaults (scale-correct Fisher score, compensation with a trust
# region). experiments/table_prunedlora.py runs the table of baselines and ablations around this config.
dataset = 'gsm8k'
out_dir = 'out/prunedlora_64to8'
lora_r = 64
lora_alpha = 64.0
warmup_iters = 30
max_iters = 400        # pruning from step 30 to 30 + 28 events x 10 = 310, then 90 steps at rank 8
rank_prune = True
rank_target = 8
rank_every = 10        # K1
rank_k = 2             # K2
rank_start = 30        # after the warmup

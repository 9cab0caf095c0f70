# LoRA recovery of a model pruned in one shot by prune.py (magnitude, random, wanda, llm_pruner), with the same
# budget as config/loraprune.py (LLM-Pruner recovers with LoRA r=8, lr 1e-4, on Alpaca):
#   python prune.py --model models/smollm2-135m-instruct --method wanda --sparsity 0.2 --out_dir out/structured/wanda-0.2
#   python train.py config/structured_recover.py --model=out/structured/wanda-0.2 --out_dir=out/structured/wanda-0.2-lora
# The merged, recovered model is written to out_dir/merged.
dataset = 'alpaca'
out_dir = 'out/structured_recover'
lora_r = 8
lora_alpha = 16.0
rank_prune = False   # the adapters keep rank lora_r (train.py's default prunes them: PrunedLoRA)
learning_rate = 1e-4
max_iters = 200
export_merged = True

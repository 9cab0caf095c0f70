# LoRAPrune (docs/ALGORITHMS.md §2) on the default model: LoRA r=8 on every projection while the heads
# and MLP channels of the frozen base are masked every 10 optimizer steps along a cubic schedule (10% warm-up,
# 10% cool-down) up to struct_sparsity of ALL parameters, lowest LoRA-guided importance first
# (G_W ~ s (G_B A + B G_A - G_B G_A), element importance (G_W * (W0 + s B A))^2, moving average lambda = 0.9);
# the first 10% of the layers and the last stay whole. At the end the masked groups are removed for real and
# the merged, smaller model is written to out_dir/merged. experiments/table_structured.py runs the table around it.
dataset = 'alpaca'
out_dir = 'out/loraprune'
lora_r = 8
lora_alpha = 16.0
rank_prune = False   # the adapters keep rank lora_r (train.py's default prunes them: PrunedLoRA)
learning_rate = 1e-4   # the paper's setting (LLaMA-7B, r=8)
max_iters = 200
struct_prune = True
struct_sparsity = 0.2
struct_every = 10

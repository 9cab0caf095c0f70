# LoRA r=8 (alpha 16, all seven projections) on the Alpaca sample (950 instructions, 103k training tokens), the
# loss on the responses only; LLM-Pruner's recovery recipe (lr 1e-4) at the scale of the default model.
# Sized for one GPU: 4,096 tokens per step, 200 steps (about 8 epochs of the sample).
dataset = 'alpaca'
out_dir = 'out/lora_alpaca'
lora_r = 8
lora_alpha = 16.0
rank_prune = False   # the adapters keep rank lora_r (train.py's default prunes them: PrunedLoRA)
lora_dropout = 0.05
block_size = 512
batch_size = 8
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
max_iters = 200
eval_interval = 25
eval_iters = 10
export_merged = True

# LoRA r=8 (alpha 16, all seven projections) on GSM8K train, the loss on the answers only: the plain fine-tune
# that rank pruning is measured against. Sized for one GPU: 8,192 tokens per step, 600 steps (about 3 epochs
# of the 1.58M training tokens). `python train.py --rank_prune=False --lora_r=8 --lora_alpha=16 --out_dir=out-lora8` is a small CPU version.
dataset = 'gsm8k'
out_dir = 'out/lora_gsm8k'
lora_r = 8
lora_alpha = 16.0
rank_prune = False   # the adapters keep rank lora_r (train.py's default prunes them: PrunedLoRA)
lora_dropout = 0.05
block_size = 512
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 30
max_iters = 600
eval_interval = 50
eval_iters = 20

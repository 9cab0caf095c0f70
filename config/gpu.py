# train.py at a GPU's size: the same PrunedLoRA 64 -> 8 run as the CPU default, with longer sequences, 16 of them
# per step, 1000 steps, and the paper's schedule (an event every K1 = 10 steps after a 30-step warmup, K2 = 2).
#   python train.py config/gpu.py          (other settings after it still apply: --max_iters=400 ...)
block_size = 512
batch_size = 16
max_iters = 1000
eval_interval = 100
eval_iters = 20
compile = True
rank_every = 10
rank_start = 30

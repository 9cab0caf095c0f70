"""
LoRA fine-tuning of a pretrained LLaMA-family model folder, nanoGPT style: the settings are the globals below,
overridden by config files and --key=value (configurator.py; `python train.py --help` lists them).

    python train.py                                   # PrunedLoRA 64 -> 8 on GSM8K with the default model
    python train.py config/gpu.py                     # the same at a GPU's size (the paper's schedule)
    python train.py config/lora_gsm8k.py              # plain LoRA r=8
    python train.py config/loraprune.py               # LoRAPrune: heads and channels of the base pruned
    python train.py --init_from=resume                # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=4 train.py --gradient_accumulation_steps=4   # DDP

The base model is frozen; AdamW trains only the adapters (lora.py). Data are flat token streams
data/<dataset>/{train,val}.bin (data/<dataset>/prepare.py writes them); instruction data also have
{train,val}_mask.bin, 1 where a token belongs to a response: only those tokens count in the loss.
"""
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import download
from data.tokens import prepared, windows
import prunedlora
from checkpoint import append_jsonl
from runs import check_settings, oom_hint, start_or_resume, trim_jsonl, write_checkpoint
from configurator import configure, fail, settings
from lora import apply_lora, lora_modules, save_adapter, save_model
from model import Transformer
from prune import add_masks, compact, count_params, loraprune_step, masked_params, prune_plan

# ----------------------------------------------------------------------------- settings
# I/O
out_dir = 'out'           # the run's folder: ckpt.pt, adapter/, metrics.jsonl, rank_pruning.jsonl
model = 'models/smollm2-135m-instruct'  # a Hugging Face llama folder (the default one is made if missing)
init_from = 'pretrained'  # pretrained: new adapters | resume: continue out_dir/ckpt.pt | auto: resume if there is one
eval_interval = 50        # optimizer steps between evaluations
eval_iters = 8            # batches per split in an evaluation (always the same batches)
log_interval = 1          # optimizer steps between log lines
eval_only = False         # evaluate once and exit
always_save_checkpoint = True  # save at every evaluation (False: only when the val loss improved)
export_merged = False     # also write out_dir/merged: a plain model folder with the adapter merged in
# data
dataset = 'gsm8k'         # data/<dataset>/prepare.py makes its tokens: gsm8k, alpaca, shakespeare, pydocs
data_dir = ''             # the prepared tokens (default data/<dataset>)
block_size = 256          # tokens per sequence
batch_size = 1            # sequences per micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step, in total over all DDP processes
# LoRA (lora.py)
lora_r = 64               # the adapters' rank (PrunedLoRA's starting rank r0)
lora_alpha = 64.0         # scale s = alpha / r (alpha = r0, s = 1, is the paper's best for PrunedLoRA)
lora_dropout = 0.05       # dropout on the adapters' input
lora_targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')  # wrapped layers
use_rslora = False        # s = alpha / sqrt(r)
# PrunedLoRA (prunedlora.py): the adapters' rank pruned from lora_r down to rank_target while training
rank_prune = True         # False: plain LoRA at rank lora_r
rank_method = 'prunedlora'  # the score: prunedlora, prunedlora_paper, obs, activation_obs, magnitude, taylor, adalora, random
rank_target = 8           # the final rank (uniform), the mean final rank (global)
rank_every = 2            # K1: a pruning event every K1 optimizer steps (the paper: 10, config/gpu.py)
rank_k = 2                # K2: components removed per adapter and event (the paper: 2)
rank_start = 10           # the statistics restart here, after the warmup; the first event comes K1 steps later
rank_allocation = 'uniform'  # uniform: K2 per adapter | global: the K2 * n lowest scores over all adapters
rank_floor = 1            # global allocation: no adapter goes below this rank
rank_recovery = True      # the surviving components move to compensate (False: score only)
rank_recovery_lr = 0.0    # share of the Newton step -F^-1 g in that move (0: compensation only)
rank_tau = 0.1            # trust region: a row's survivors move by at most tau * |row| (<= 0: no limit)
rank_recovery_side = 'B'  # B | AB: the factors that compensate
rank_damp = 0.01          # damping of the Fisher: this fraction of its mean diagonal
rank_seed = 0             # rank_method='random' draws from this seed
rank_ranking_test = True  # at the first event: predicted against actual change of single components of one adapter
# LoRAPrune (prune.py): heads and MLP channels of the base masked along a cubic schedule, removed at the end
struct_prune = False      # True: LoRAPrune (with rank_prune off unless it is set as well)
struct_sparsity = 0.2     # fraction of ALL parameters removed at the end (embeddings included, LoRA excluded)
struct_every = 10         # optimizer steps between pruning events
struct_whole_groups = False  # prune whole GQA groups (a key/value head with its query heads)
# AdamW on the adapters, the learning rate warmed up linearly then decayed along a cosine to min_lr
learning_rate = 2e-4      # peak learning rate
max_iters = 100           # optimizer steps
weight_decay = 0.0        # AdamW's decoupled weight decay of the adapters
beta1 = 0.9               # AdamW's first-moment decay
beta2 = 0.999             # AdamW's second-moment decay
grad_clip = 1.0           # clip the gradient norm at this value (0: no clipping)
skip_nonfinite = False    # a NaN/Inf loss skips its step (no update, counted) instead of stopping the run
decay_lr = True           # False: a constant learning rate
warmup_iters = 10         # steps of linear warmup
lr_decay_iters = 0        # the cosine ends here (0: max_iters)
min_lr = 2e-5             # the learning rate at the end of the cosine
# system
device = 'auto'           # auto (cuda if available), cpu, cuda, cuda:1, ...
dtype = 'auto'            # of the frozen base: float32, bfloat16, auto (bfloat16 where it is fast)
compile = False           # torch.compile the model
gradient_checkpointing = False  # recompute the blocks in backward: less memory, more time
seed = 1337               # adapters, batches and dropout
gpu_peak_flops = 989e12   # one GPU's bf16 dense peak, for MFU (H100 SXM; A100: 312e12)
# -----------------------------------------------------------------------------
config_keys = list(settings(globals()))  # what a checkpoint records as the run's settings
overridden = configure(globals(), sys.argv[1:], script=__file__, renamed={'model_dir': 'model'})
RANK_KEYS = [k for k in globals() if k.startswith('rank_') and k != 'rank_prune']
if struct_prune and 'rank_prune' not in overridden:
    rank_prune = False  # LoRAPrune alone unless rank pruning is asked for too

# ----------------------------------------------------------------------------- resume, or a new run
# a resumed run keeps its adapter's shape, and the rest of its settings unless they are given again
checkpoint = start_or_resume(globals(), overridden, fixed=('lora_r', 'lora_alpha', 'lora_targets', 'use_rslora'),
                             kept=('rank_prune', *RANK_KEYS, 'struct_prune', 'struct_sparsity', 'struct_every',
                                   'struct_whole_groups'))
check_settings(globals(), RANK_KEYS)  # settings that would fail deep inside the run are refused here
config = {k: globals()[k] for k in config_keys}  # what was run, saved in checkpoints

# ----------------------------------------------------------------------------- devices, DDP, precision
ddp = int(os.environ.get('RANK', -1)) != -1  # started by torchrun?
device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device != 'cpu' and not (device_type == 'cuda' and torch.cuda.is_available()):
    fail(f"device={device!r}, expected 'auto', 'cpu' or 'cuda[:N]'" + " (this torch sees no CUDA device)" * (device_type == 'cuda'))
if dtype == 'auto':  # bf16 where the hardware has it: on a CPU without AVX512-BF16 torch emulates it, slowly
    fast_bf16 = torch.cuda.is_bf16_supported() if device_type == 'cuda' else torch.cpu._is_avx512_bf16_supported()
    dtype = 'bfloat16' if fast_bf16 else 'float32'
rank, local_rank, world_size = 0, 0, 1
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the number of DDP "
             f"processes ({world_size})")
master = rank == 0  # only this process logs and writes files
local_accum = gradient_accumulation_steps // world_size
lr_decay_iters = lr_decay_iters or max_iters
say = print if master else (lambda *a, **k: None)
sys.excepthook = oom_hint(globals())  # out of GPU memory: which settings to lower, not a traceback
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
# the frozen base is stored in `dtype`, the adapters in float32 (what AdamW updates); CUDA adds bf16 autocast,
# on a CPU LoRALinear casts the adapters to the activations' dtype for its matmuls
ctx = torch.autocast('cuda', dtype=ptdtype) if device_type == 'cuda' and dtype != 'float32' else nullcontext()
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def on_master(make):
    """Run `make` (a download, a prepare script) once, on the master process, while the others wait."""
    if master:
        make()
    if ddp:
        dist.barrier()


# ----------------------------------------------------------------------------- model + adapters
if not (Path(model) / 'config.json').exists():
    if Path(model).resolve() != download.DEFAULT_DIR.resolve():
        fail(f"model={model!r} is not a model folder (no config.json)")
    say(f"{model} is missing: making the default model")
    on_master(lambda: download.default_model(model))
net = Transformer.from_pretrained(model, dtype=ptdtype, device=device)
if checkpoint is not None and checkpoint['model_config'] != net.config.to_hf():
    arch = lambda hf: {k: hf.get(k) for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size')}
    fail(f"{Path(out_dir) / 'ckpt.pt'} was made for the model {checkpoint['model_dir']} {arch(checkpoint['model_config'])}, "
         f"not for {model} {arch(net.config.to_hf())}: pass --model={checkpoint['model_dir']} or start a new out_dir")
torch.manual_seed(seed)  # the adapters start the same on every process
try:
    apply_lora(net, lora_targets, lora_r, lora_alpha, lora_dropout, use_rslora)
    if struct_prune:  # a sparsity the schedule cannot reach fails now, not in the middle of training
        add_masks(net)  # head / channel masks: buffers the checkpoint keeps with the adapters
        prune_plan(net, struct_sparsity, whole_groups=struct_whole_groups)
except ValueError as e:
    fail(e)
net.gradient_checkpointing = gradient_checkpointing
ADAPTER_TENSORS = ('lora_A', 'lora_B', 'rank_mask', 'head_mask', 'channel_mask')
adapter_state = lambda: {k: v for k, v in net.state_dict().items() if k.rsplit('.', 1)[-1] in ADAPTER_TENSORS}
if checkpoint is not None:
    ours, theirs = adapter_state(), checkpoint['adapter']
    for k in sorted(set(ours) | set(theirs)):
        if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape:
            fail(f"checkpoint adapter tensor {k}: {tuple(theirs[k].shape) if k in theirs else 'absent'} in the "
                 f"checkpoint, {tuple(ours[k].shape) if k in ours else 'absent'} in this model")
    net.load_state_dict(theirs, strict=False)
params = [p for p in net.parameters() if p.requires_grad]  # the adapters
n_params = sum(p.numel() for p in net.parameters())
say(f"model {model}: {n_params:,} parameters, {dtype} on {device}; LoRA r={lora_r} alpha={lora_alpha:g} on "
    f"{len(lora_modules(net))} modules ({', '.join(lora_targets)}): {sum(p.numel() for p in params):,} trainable")

# ----------------------------------------------------------------------------- data
on_master(lambda: prepared(dataset, data_dir))  # data/<dataset> is prepared if it is missing
data_dir, meta = prepared(dataset, data_dir, net.config.vocab_size, model, block_size)


def get_batch(split, n, generator):
    """n random windows of the split: inputs x (n, T), next tokens y (n, T), -1 where they do not count."""
    x, y = windows(data_dir, meta, split, n, block_size, generator)
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# ----------------------------------------------------------------------------- optimizer, state, wrappers
optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=device_type == 'cuda')
batch_gen = torch.Generator().manual_seed(seed)  # draws the training batches; its state is checkpointed
torch.manual_seed(seed + rank)                   # dropout differs between processes, like their data
iter_num, best_val_loss, struct_average = 0, 1e9, None  # struct_average: LoRAPrune's importance average
rank_cfg = {k: globals()[k] for k in RANK_KEYS}
rank_state = prunedlora.new_state(rank_cfg) if rank_prune else None  # the statistics since the last event
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    struct_average = checkpoint.get('struct_average')
    if rank_prune and checkpoint.get('rank_state'):
        prunedlora.load_state_dict(rank_state, checkpoint['rank_state'], say, device=device)
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    batch_gen.set_state(checkpoint['rng']['batches'])
    rng = checkpoint['rng']['torch'][rank if len(checkpoint['rng']['torch']) == world_size else 0]
    torch.set_rng_state(rng['cpu'])
    if device_type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'])
    say(f"resuming from {out_dir}/ckpt.pt at iter {iter_num}")
    checkpoint = None  # free the memory
train_model = torch.compile(net) if compile else net  # net stays the uncompiled, unwrapped model: what is saved
train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else train_model


def get_lr(it):
    if it < warmup_iters:  # linear warmup
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)  # cosine from lr to min_lr


@torch.no_grad()
def estimate_loss():
    """Mean loss of each split over eval_iters batches, the same batches every time. A batch with no counted
    token (instruction data: a window without a response) has no loss and is left out (NaN if all are)."""
    out = {}
    train_model.eval()
    for split in ('train', 'val'):
        generator, losses = torch.Generator().manual_seed(seed + 1), []
        for _ in range(eval_iters):
            x, y = get_batch(split, batch_size, generator)
            with ctx:
                losses += [train_model(x, y)[1].item()] if (y >= 0).any() else []
        out[split] = sum(losses) / len(losses) if losses else math.nan
    train_model.train()
    return out


def save_checkpoint():
    """Everything to continue exactly: adapters (with masks), optimizer, every process's RNG, the batch sampler,
    the rank-pruning statistics. Plain tensors and values only: torch.load(weights_only=True) reads it."""
    rng = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    rngs = [rng] * world_size
    if ddp:
        dist.all_gather_object(rngs, rng)
    saved_rank_state = prunedlora.state_dict(rank_state) if rank_prune else None  # on every process (all-reduce)
    if master:
        write_checkpoint({'adapter': adapter_state(), 'optimizer': optimizer.state_dict(), 'iter_num': iter_num,
                          'best_val_loss': best_val_loss, 'struct_average': struct_average, 'rank_state': saved_rank_state,
                          'config': config, 'model_dir': str(model), 'model_config': net.config.to_hf(),
                          'rng': {'torch': rngs, 'batches': batch_gen.get_state()}}, out_dir)
        say(f"saved checkpoint to {out_dir}/ckpt.pt")


# flops of a forward + backward pass per token: 6N + 12 L H Q T (PaLM, appendix B), N = all parameters. With a
# frozen base the backward skips its weight gradients (nearer 4N): the MFU is that of the full fine-tune's compute
cfg = net.config
flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * block_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
peak_mib = lambda: (torch.cuda.max_memory_allocated() if device_type == 'cuda' else  # Linux: maxrss in KiB
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
metrics_log, events_log = Path(out_dir) / 'metrics.jsonl', Path(out_dir) / 'rank_pruning.jsonl'
if master and not eval_only:  # a new run starts new logs; a resumed one forgets what came after its checkpoint
    os.makedirs(out_dir, exist_ok=True)
    for log, key, last in ((metrics_log, 'iter', iter_num - 1), (events_log, 'step', iter_num))[:1 + rank_prune]:
        trim_jsonl(log, last if init_from == 'resume' else -1, key)  # the checkpoint's own iteration is redone
say(f"data {data_dir} ({meta['dtype']}, {'loss on response tokens only' if meta.get('masked') else 'loss on every token'}); "
    f"{tokens_per_iter:,} tokens per iteration (micro-steps {gradient_accumulation_steps} x batch {batch_size} x "
    f"block {block_size}{f' over {world_size} processes' if ddp else ''}); {max_iters} iterations")
heldout = get_batch('val', batch_size, torch.Generator().manual_seed(seed + 2)) if rank_prune else None
if rank_prune and prunedlora.schedule_end(lora_r, rank_cfg) > max_iters:
    say(f"warning: the rank schedule ends at iter {prunedlora.schedule_end(lora_r, rank_cfg)}, after max_iters={max_iters}")

# ----------------------------------------------------------------------------- training loop
train_model.train()
skipped, t_start, first_iter = 0, time.time(), iter_num  # skipped: steps of a non-finite loss (skip_nonfinite)
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        say(f"step {iter_num}: train loss {losses['train']:.6f}, val loss {losses['val']:.6f}")
        if master and not eval_only:
            append_jsonl(metrics_log, {'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val']})
        if iter_num > 0 and not eval_only and (losses['val'] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
    if iter_num >= max_iters or eval_only:
        break

    t0 = time.time()
    # the global batch is drawn identically on every process, each takes its share: the data seen do not depend
    # on the number of processes (rows [rank * local_accum * batch_size, ...) are this process's)
    X, Y = get_batch('train', gradient_accumulation_steps * batch_size, batch_gen)
    X, Y = (t[rank * local_accum * batch_size:(rank + 1) * local_accum * batch_size] for t in (X, Y))
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(local_accum):
        x, y = (t[micro_step * batch_size:(micro_step + 1) * batch_size] for t in (X, Y))
        # DDP averages gradients over processes in the last micro-step's backward only
        with train_model.no_sync() if ddp and micro_step < local_accum - 1 else nullcontext(), ctx:
            loss = train_model(x, y)[1] / local_accum  # mean over micro-steps; DDP's average does the rest
        loss.backward()
        loss_sum += loss.detach()
        if rank_prune:  # the micro-batch's gradient and its outer product, for the pruning scores
            prunedlora.accumulate(net, rank_state, micro_step, local_accum, batch_size)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    finite = torch.isfinite(loss_sum + grad_norm).float()  # the gradients are all-reduced: NaN anywhere is NaN here
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every process takes the same decision
    if not finite.item():  # before the update: the adapters and the last checkpoint stay good
        if not skip_nonfinite:
            sys.exit(f"iter {iter_num}: loss {loss_sum.item()}, grad norm {grad_norm.item()}: not finite, stopping "
                     f"before the update (the last checkpoint in {out_dir} is untouched). Lower learning_rate, check "
                     f"the data and weights, or set --skip_nonfinite=True to skip such steps")
        skipped += 1
        say(f"iter {iter_num}: loss {loss_sum.item()}, not finite: step skipped ({skipped} skipped so far)")
        if rank_prune:  # the sums since the last event hold this step's NaN: start them afresh
            prunedlora.reset(rank_state)
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        continue
    if struct_prune:  # LoRAPrune, before the step: its estimate of G_W uses the A, B these gradients belong to
        struct_average = loraprune_step(net, struct_average, iter_num, max_iters, struct_sparsity, struct_every,
                                        whole_groups=struct_whole_groups)
        if iter_num % struct_every == 0 or iter_num == max_iters - 1:
            say(f"iter {iter_num}: {masked_params(net) / count_params(net):.2%} of all parameters masked")
    optimizer.step()
    # after the step, before zero_grad: p.grad still holds this step's gradients, the same on every process
    event = prunedlora.step(net, optimizer, iter_num + 1, rank_cfg, rank_state, heldout) if rank_prune else None
    if event:  # score -> choose -> recover -> mask (prunedlora.py)
        say(f"iter {iter_num}: pruned {event['pruned']} rank components, rank mean {event['rank_mean']:.2f} "
            f"(min {event['rank_min']}, max {event['rank_max']}); loss change predicted {event['predicted']:.5f}, "
            f"actual {event['actual']:.5f}" + (f"; ranking test: spearman {event['ranking']['spearman']:.2f}"
                                               if event['ranking'] else ''))
        if master:
            append_jsonl(events_log, event)
    optimizer.zero_grad(set_to_none=True)

    if iter_num % log_interval == 0:
        if ddp:
            dist.all_reduce(loss_sum)  # sum over processes of their mean loss
        lossf, dt = loss_sum.item() / world_size, time.time() - t0
        eta = (time.time() - t_start) / (iter_num + 1 - first_iter) * (max_iters - iter_num - 1)
        mfu = flops_per_token * tokens_per_iter / dt / (gpu_peak_flops * world_size) if device_type == 'cuda' else None
        say(f"iter {iter_num}/{max_iters}: loss {lossf:.6f}, lr {lr:.3e}, grad norm {grad_norm.item():.6f}, "
            f"{tokens_per_iter / dt:,.0f} tok/s, {dt * 1000:.1f} ms/iter, peak mem {peak_mib():,.0f} MiB"
            + (f", mfu {mfu * 100:.1f}%" if mfu else '') + f", ETA {eta / 60:.1f} min")
        if master:
            append_jsonl(metrics_log, {'iter': iter_num, 'loss': lossf, 'lr': lr, 'grad_norm': grad_norm.item(),
                                       'ms': dt * 1000, 'tokens': (iter_num + 1) * tokens_per_iter, 'mfu': mfu})
    iter_num += 1

# ----------------------------------------------------------------------------- the result
if master and not eval_only:
    out, base = Path(out_dir), model
    if rank_prune:
        prunedlora.slice_adapters(net)  # A and B at their exact final ranks
    if struct_prune:  # the masked heads and channels removed for real: a smaller ordinary model, the adapter's base
        dense = count_params(net)
        compact(net)
        base = out / 'base'
        save_model(net, base, dtype=ptdtype, tokenizer_from=model, merged=False)
        say(f"compacted: {count_params(net):,} of {dense:,} parameters left ({1 - count_params(net) / dense:.4%} "
            f"removed); the base it leaves, which the adapter belongs to, is in {base}")
    save_adapter(net, out / 'adapter', base_model_name_or_path=str(base))
    say(f"saved the adapter (peft format) to {out}/adapter")
    if export_merged or struct_prune or (out / 'merged').exists():  # an older merged/ never outlives its adapter
        save_model(net, out / 'merged', dtype=torch.bfloat16, tokenizer_from=model)
        say(f"saved the merged model to {out}/merged")
if ddp:
    del train_model  # the DDP wrapper holds the process group: free it before the group goes
    dist.destroy_process_group()

"""
LoRA fine-tuning of a pretrained LLaMA-family model folder, nanoGPT style: the settings are the globals
below, overridden by config files and --key=value (configurator.py).

    python train.py                                   # PrunedLoRA 64 -> 8 on GSM8K with the default model, any device
    python train.py config/lora_gsm8k.py              # plain LoRA r=8
    python train.py config/lora_alpaca.py --learning_rate=1e-4
    python train.py --init_from=resume                # continue out_dir/ckpt.pt exactly where it stopped
    python train.py --out_dir=out-2                   # another run: an out_dir that holds a run is not overwritten
    torchrun --standalone --nproc_per_node=4 train.py --gradient_accumulation_steps=4   # DDP

The base model is frozen; AdamW trains only the adapters (lora.py). Data are flat token streams
data/<dataset>/{train,val}.bin (data/<dataset>/prepare.py writes them); instruction data sets also have
{train,val}_mask.bin, 1 where a token is part of a response: only those tokens are predicted in the loss.
"""
import json
import math
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import download
from checkpoint import atomic_open
from configurator import configure
from lora import apply_lora, lora_modules, save_adapter, save_merged
from model import Transformer
import prunedlora
from prune import add_masks, compact, count_params, loraprune_step, masked_params, prune_plan  # LoRAPrune (§2)

# ----------------------------------------------------------------------------- default config
# I/O
out_dir = 'out'
model_dir = 'models/smollm2-135m-instruct'  # a Hugging Face llama folder (the default model is made if missing)
init_from = 'pretrained'  # 'pretrained': new adapters on model_dir; 'resume': continue from out_dir/ckpt.pt;
                          # 'auto': resume if out_dir has a ckpt.pt, else pretrained (a job restarted as it was started)
eval_interval = 50
eval_iters = 8            # batches per split in each evaluation (always the same batches)
log_interval = 1
eval_only = False         # evaluate once and exit
always_save_checkpoint = True  # else only when the val loss improved
export_merged = False     # also write out_dir/merged: a plain model folder with the adapter merged in
# data
dataset = 'gsm8k'
data_dir = ''             # default data/<dataset>
block_size = 256
batch_size = 1            # sequences per micro-step
gradient_accumulation_steps = 1  # micro-steps per optimizer step, in total over all DDP processes
# LoRA
lora_r = 64               # the default run is PrunedLoRA: adapters start at rank 64 ...
lora_alpha = 64.0         # ... with alpha = r0 (the paper's best scale; s = alpha / r = 1)
lora_dropout = 0.05
lora_targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
use_rslora = False
# rank pruning of the adapters (PrunedLoRA): from lora_r down to rank_target while training
rank_prune = True         # False: plain LoRA at rank lora_r (config/lora_gsm8k.py)
globals().update(prunedlora.DEFAULTS)  # rank_method, rank_target, rank_every (K1), rank_k (K2), ...: see prunedlora.py
rank_every, rank_start = 2, 10  # 28 events of K2 = 2 over iters 10..66 of 100 (CUDA_DEFAULTS: the paper's K1 = 10)
# structured pruning of the base (LoRAPrune): heads and MLP channels are masked along a cubic schedule while
# training and removed for real at the end; the smaller merged model goes to out_dir/merged
struct_prune = False
struct_sparsity = 0.2     # fraction of ALL parameters removed at the end (embeddings included, LoRA excluded)
struct_every = 10         # optimizer steps between pruning events
struct_whole_groups = False  # prune whole GQA groups (a key/value head together with its query heads)
# AdamW on the adapters
learning_rate = 2e-4
max_iters = 100
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0           # clip the gradient norm at this value; 0 = no clipping
skip_nonfinite = False    # a NaN/Inf loss skips its step (no update, counted) instead of stopping the run
# learning rate: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 10
lr_decay_iters = 0        # 0 = max_iters
min_lr = 2e-5
# system
device = 'auto'           # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'            # of the frozen base weights: 'float32', 'bfloat16', 'auto' (bfloat16 where fast)
compile = False           # torch.compile the model
gradient_checkpointing = False
seed = 1337
gpu_peak_flops = 989e12   # bf16 dense peak of one GPU, for MFU (H100 SXM; A100: 312e12)
# on CUDA, settings the user did not set come from here: a GPU does a real fine-tune in the same time
CUDA_DEFAULTS = dict(block_size=512, batch_size=16, max_iters=1000, eval_interval=100, eval_iters=20, compile=True,
                     rank_every=10, rank_start=30)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()  # the settings: lower-case globals of plain types
               if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str, tuple))]
overridden = configure(globals(), sys.argv[1:])

# ----------------------------------------------------------------------------- devices, DDP, precision
ddp = int(os.environ.get('RANK', -1)) != -1  # started by torchrun?
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device != 'cpu' and not (device_type == 'cuda' and torch.cuda.is_available()):
    sys.exit(f"config error: device={device!r}, expected 'auto', 'cpu' or 'cuda[:N]'"
             + (" (this torch sees no CUDA device)" if device_type == 'cuda' else ''))
if device_type == 'cuda':
    globals().update({k: v for k, v in CUDA_DEFAULTS.items() if k not in overridden})
if dtype == 'auto':  # on a 2-core CPU with AVX512-BF16 a LoRA step ran ~1.7x faster in bf16 than in float32
    fast_bf16 = torch.cuda.is_bf16_supported() if device_type == 'cuda' else torch.cpu._is_avx512_bf16_supported()
    dtype = 'bfloat16' if fast_bf16 else 'float32'
if dtype not in ('float32', 'bfloat16'):
    sys.exit(f"config error: dtype={dtype!r}, expected 'float32', 'bfloat16' or 'auto'")
if struct_prune and 'rank_prune' not in overridden:  # LoRAPrune alone unless rank pruning is asked for too
    rank_prune = False
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    if gradient_accumulation_steps % world_size:
        sys.exit(f"config error: gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple "
                 f"of the number of DDP processes ({world_size})")
else:
    rank, world_size = 0, 1
master = rank == 0  # only this process logs and writes files
local_accum = gradient_accumulation_steps // world_size
lr_decay_iters = lr_decay_iters or max_iters
config = {k: globals()[k] for k in config_keys}  # what was actually run, saved in checkpoints
say = print if master else (lambda *a, **k: None)


def explain_oom(kind, exc, tb):  # out of GPU memory: which settings to lower, instead of a traceback from torch
    if not issubclass(kind, torch.OutOfMemoryError):
        return sys.__excepthook__(kind, exc, tb)
    print(f"out of GPU memory ({str(exc).splitlines()[0]}). Lower batch_size={batch_size} (raising "
          f"gradient_accumulation_steps={gradient_accumulation_steps} keeps the tokens per iteration) or "
          f"block_size={block_size}, or set gradient_checkpointing=True (now {gradient_checkpointing}) and "
          f"dtype='bfloat16' (now {dtype!r})", file=sys.stderr)


sys.excepthook = explain_oom
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
# the frozen base weights are stored in `dtype`, the adapters always in float32 (what AdamW updates);
# CUDA adds bf16 autocast, on CPU LoRALinear casts the adapters to the activations' dtype for its matmuls
ctx = torch.autocast('cuda', dtype=ptdtype) if device_type == 'cuda' and dtype != 'float32' else nullcontext()
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def wait_for_master(make):
    """Run `make` (a download, a prepare script) once, on the master process, while the others wait."""
    if master:
        make()
    if ddp:
        dist.barrier()


# ----------------------------------------------------------------------------- resume: read the checkpoint first
checkpoint = None
RUN_FILES = ('ckpt.pt', 'adapter/adapter_config.json', 'merged/config.json')  # what says out_dir holds a run
if init_from == 'auto':
    init_from = 'resume' if (Path(out_dir) / 'ckpt.pt').exists() else 'pretrained'
if init_from == 'resume':
    ckpt_path = Path(out_dir) / 'ckpt.pt'
    if not ckpt_path.exists():
        sys.exit(f"init_from='resume' but there is no {ckpt_path} (out_dir={out_dir!r})")
    try:  # weights_only: tensors and plain values only, never code
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except Exception as e:  # damaged, or more than tensors and plain values (weights_only refuses to run code)
        why = next((line for line in str(e).splitlines() if 'GLOBAL' in line), str(e).split('. ')[0])
        sys.exit(f"{ckpt_path} cannot be read ({why}): damaged, or not a checkpoint of train.py; start a new out_dir")
    if 'model_dir' not in overridden:
        model_dir = checkpoint['model_dir']
    for k in ('lora_r', 'lora_alpha', 'lora_targets', 'use_rslora'):  # the adapter's shape is the checkpoint's
        globals()[k] = config[k] = checkpoint['config'][k]
    data_keys = ('dataset', 'data_dir') if not {'dataset', 'data_dir'} & overridden else ()  # one setting, the data
    for k in ('rank_prune', *prunedlora.DEFAULTS, 'struct_prune', 'struct_sparsity', 'struct_every', 'struct_whole_groups',
              *data_keys):
        if k not in overridden and k in checkpoint['config']:  # the run goes on as it was started
            globals()[k] = config[k] = checkpoint['config'][k]
    say(f"resuming from {ckpt_path} at iter {checkpoint['iter_num']}")
elif init_from != 'pretrained':
    sys.exit(f"config error: init_from={init_from!r}, expected 'pretrained', 'resume' or 'auto'")
elif found := next((f for f in RUN_FILES if (Path(out_dir) / f).exists()), None):  # nothing of the user's is lost
    if not eval_only:
        sys.exit(f"out_dir={out_dir!r} holds a run ({found}): choose another out_dir for a new run (or delete that "
                 f"one); --init_from=resume continues that same run, with its adapter's shape")
    say(f"note: --eval_only evaluates new adapters on {model_dir} (the base model); --init_from=resume evaluates "
        f"the run in {out_dir}")
config['model_dir'] = model_dir
for key, ok, expected in (  # settings that would fail deep inside the run (or worse, not fail) are refused here
        *((k, globals()[k] >= 1, 'at least 1') for k in ('block_size', 'batch_size', 'gradient_accumulation_steps',
                                                        'eval_interval', 'eval_iters', 'log_interval', 'rank_every',
                                                        'rank_k', 'rank_target', 'struct_every')),
        ('max_iters', max_iters >= (0 if eval_only else 1), 'at least 0 with eval_only' if eval_only else 'at least 1'),
        ('rank_method', rank_method in prunedlora.METHODS, f'one of {prunedlora.METHODS}'),
        ('rank_allocation', rank_allocation in ('uniform', 'global'), "'uniform' or 'global'"),
        ('rank_recovery_side', rank_recovery_side in ('B', 'AB'), "'B' or 'AB'"),
        ('lora_targets', len(lora_targets) > 0, 'at least one projection'),
        ('out_dir', Path(out_dir).is_dir() or not Path(out_dir).exists(), 'a folder (a file is there)')):
    if not ok:
        sys.exit(f"config error: {key}={globals()[key]!r}, expected {expected}")
if rank_prune and lora_r <= rank_target:
    sys.exit(f"config error: rank_prune=True prunes the adapters from lora_r={lora_r} down to "
             f"rank_target={rank_target}, so lora_r must be larger; for plain LoRA at rank {lora_r} set --rank_prune=False")

# ----------------------------------------------------------------------------- model + adapters
if not (Path(model_dir) / 'config.json').exists():
    if Path(model_dir).resolve() != download.DEFAULT_DIR.resolve():
        sys.exit(f"model_dir={model_dir!r} is not a model folder (no config.json)")
    say(f"{model_dir} is missing: making the default model")
    wait_for_master(lambda: download.default_model(model_dir))
model = Transformer.from_pretrained(model_dir, dtype=ptdtype, device=device)
if checkpoint is not None and checkpoint['model_config'] != model.config.to_hf():
    arch = lambda hf: {k: hf.get(k) for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size')}
    sys.exit(f"{Path(out_dir) / 'ckpt.pt'} was made for the model {checkpoint['model_dir']} "
             f"{arch(checkpoint['model_config'])}, not for {model_dir} {arch(model.config.to_hf())}: "
             f"pass --model_dir={checkpoint['model_dir']} or start a new out_dir")
torch.manual_seed(seed)  # the adapters' initialization is the same on every process
try:
    apply_lora(model, lora_targets, lora_r, lora_alpha, lora_dropout, use_rslora)
    if struct_prune:  # a sparsity the schedule cannot reach fails now, not in the middle of training
        add_masks(model)  # head / channel masks: buffers the checkpoint keeps with the adapters
        prune_plan(model, struct_sparsity, whole_groups=struct_whole_groups)
except ValueError as e:
    sys.exit(f"config error: {e}")
model.gradient_checkpointing = gradient_checkpointing
ADAPTER_TENSORS = ('lora_A', 'lora_B', 'rank_mask', 'head_mask', 'channel_mask')
if checkpoint is not None:
    ours = {k: v for k, v in model.state_dict().items() if k.rsplit('.', 1)[-1] in ADAPTER_TENSORS}
    theirs = checkpoint['adapter']
    for k in sorted(set(ours) | set(theirs)):
        if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape:
            sys.exit(f"checkpoint adapter tensor {k}: {tuple(theirs[k].shape) if k in theirs else 'absent'} in the "
                     f"checkpoint, {tuple(ours[k].shape) if k in ours else 'absent'} in this model")
    model.load_state_dict(theirs, strict=False)
params = [p for p in model.parameters() if p.requires_grad]  # the adapters
n_params = sum(p.numel() for p in model.parameters())
say(f"model {model_dir}: {n_params:,} parameters, {dtype} on {device}; LoRA r={lora_r} alpha={lora_alpha:g} "
    f"on {len(lora_modules(model))} modules ({', '.join(lora_targets)}): {sum(p.numel() for p in params):,} trainable")

# ----------------------------------------------------------------------------- data
data_dir = data_dir or os.path.join('data', dataset)
if not (Path(data_dir) / 'train.bin').exists():
    prepare = Path('data') / dataset / 'prepare.py'
    if data_dir != os.path.join('data', dataset) or not prepare.exists():
        sys.exit(f"{data_dir}: no train.bin; " + (f"make it with `python {prepare} --out {data_dir}`" if prepare.exists()
                                                  else f"there is no {prepare} to make it"))
    say(f"{data_dir}/train.bin is missing: running {prepare}")
    wait_for_master(lambda: subprocess.run([sys.executable, str(prepare)], check=True))
for f in (Path(data_dir) / name for name in ('meta.json', 'train.bin', 'val.bin')):
    if not f.exists() or f.stat().st_size == 0:
        sys.exit(f"{f} is {'empty' if f.exists() else 'missing'}: run data/<dataset>/prepare.py to (re)make {data_dir}")
meta = json.loads((Path(data_dir) / 'meta.json').read_text())
token_dtype, masked = np.dtype(meta['dtype']), bool(meta.get('masked', False))
if meta['vocab_size'] > model.config.vocab_size:
    sys.exit(f"{data_dir}: tokens up to vocab_size {meta['vocab_size']}, but the model has {model.config.vocab_size}")
for split in ('train', 'val'):  # token ids past the embedding table would fail deep inside the model
    top = int(np.memmap(Path(data_dir) / f'{split}.bin', dtype=token_dtype, mode='r').max())
    if top >= model.config.vocab_size:
        sys.exit(f"{data_dir}/{split}.bin: token id {top}, but the model's vocabulary has {model.config.vocab_size} ids "
                 f"(prepared with another tokenizer? run the prepare script with --model {model_dir})")


def get_batch(split, n, generator):
    """n windows of block_size tokens at random offsets of the split (drawn with `generator`): inputs x (n, T)
    and next tokens y (n, T), y = -1 where the loss mask says the token is not a response token."""
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=token_dtype, mode='r')  # reopened: memmaps leak
    if len(data) <= block_size:
        sys.exit(f"{data_dir}/{split}.bin has {len(data)} tokens, block_size={block_size} needs more than that")
    ix = torch.randint(len(data) - block_size, (n,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if masked:
        mask = np.memmap(os.path.join(data_dir, f'{split}_mask.bin'), dtype=np.uint8, mode='r')
        counted = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + block_size] != 0) for i in ix])
        y[~counted] = -1
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# ----------------------------------------------------------------------------- optimizer, schedule, wrappers
optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=device_type == 'cuda')
batch_gen = torch.Generator().manual_seed(seed)  # draws the training batches; its state is checkpointed
torch.manual_seed(seed + rank)                   # dropout differs between processes, like their data
iter_num, best_val_loss, struct_average = 0, 1e9, None  # struct_average: LoRAPrune's importance average
rank_cfg = {k: globals()[k] for k in prunedlora.DEFAULTS}
rank_state = prunedlora.new_state(rank_cfg) if rank_prune else None  # statistics since the last event


if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    struct_average = checkpoint.get('struct_average')
    if rank_prune and checkpoint.get('rank_state'):
        prunedlora.load_state_dict(rank_state, checkpoint['rank_state'], say=say, device=device)
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    batch_gen.set_state(checkpoint['rng']['batches'])
    rng = checkpoint['rng']['torch'][rank if len(checkpoint['rng']['torch']) == world_size else 0]
    torch.set_rng_state(rng['cpu'])
    if device_type == 'cuda' and rng['cuda'] is not None:
        torch.cuda.set_rng_state(rng['cuda'])
    checkpoint = None  # free the memory
raw_model = model  # the uncompiled, unwrapped model: what is saved
if compile:
    say("compiling the model...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def get_lr(it):
    if it < warmup_iters:  # linear warmup
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)  # cosine from lr to min_lr


@torch.no_grad()
def estimate_loss():
    """Mean loss of each split over eval_iters batches: the same batches at every evaluation. A batch with no
    counted token (instruction data: windows without a response) has no loss and is left out (NaN if all are)."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(seed + 1)
        losses = []
        for k in range(eval_iters):
            x, y = get_batch(split, batch_size, generator)
            with ctx:
                _, loss = model(x, y)
            losses += [loss.item()] if (y >= 0).any() else []
        out[split] = sum(losses) / len(losses) if losses else math.nan
    model.train()
    return out


def save_checkpoint():
    """Everything to continue exactly: adapters (with rank masks), optimizer, every process's RNG, the batch
    sampler's RNG, the rank-pruning statistics. Plain tensors and Python values only, so torch.load(weights_only=True)
    reads it."""
    rng = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    rngs = [rng] * world_size
    if ddp:
        dist.all_gather_object(rngs, rng)
    saved_rank_state = prunedlora.state_dict(rank_state) if rank_prune else None  # on every process (DDP all-reduce)
    if not master:
        return
    ckpt = {'adapter': {k: v for k, v in raw_model.state_dict().items() if k.rsplit('.', 1)[-1] in ADAPTER_TENSORS},
            'optimizer': optimizer.state_dict(), 'iter_num': iter_num, 'best_val_loss': best_val_loss,
            'struct_average': struct_average,
            'rank_state': saved_rank_state,
            'config': config, 'model_dir': str(model_dir), 'model_config': raw_model.config.to_hf(),
            'rng': {'torch': rngs, 'batches': batch_gen.get_state()}}
    with atomic_open(Path(out_dir) / 'ckpt.pt', 'wb') as f:
        torch.save(ckpt, f)
    say(f"saved checkpoint to {out_dir}/ckpt.pt")


# flops of a forward + backward pass, per token: 6N + 12 L H Q T (PaLM, appendix B), N = all parameters,
# frozen ones included. With frozen base weights the backward skips their weight gradients, so the real count
# is nearer 4N: the MFU printed is that of the full fine-tuning compute this run stands in for.
cfg = raw_model.config
flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * block_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master:
    os.makedirs(out_dir, exist_ok=True)
say(f"data {data_dir} ({meta['dtype']}, {'loss on response tokens only' if masked else 'loss on every token'}); "
    f"{tokens_per_iter:,} tokens per iteration (micro-steps {gradient_accumulation_steps} x batch {batch_size} x "
    f"block {block_size}{f' over {world_size} processes' if ddp else ''}); {max_iters} iterations")


def peak_memory_mib():
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def logged_step(line):  # the step of a line of rank_pruning.jsonl; a line cut short by a kill counts as after
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError):
        return float('inf')


# ----------------------------------------------------------------------------- training loop
if rank_prune:  # a fixed held-out batch measures each pruning event's actual loss change
    heldout = get_batch('val', batch_size, torch.Generator().manual_seed(seed + 2))
    if prunedlora.schedule_end(lora_r, rank_cfg) > max_iters:
        say(f"warning: the rank schedule ends at iter {prunedlora.schedule_end(lora_r, rank_cfg)}, after max_iters={max_iters}")
    events_log = Path(out_dir) / 'rank_pruning.jsonl'
    if master and not eval_only:  # a new run starts a new log; a resumed one forgets the events after its checkpoint
        kept = [line for line in events_log.read_text().splitlines() if logged_step(line) <= iter_num] \
            if init_from == 'resume' and events_log.exists() else []
        with atomic_open(events_log, 'w') as f:
            f.write(''.join(line + '\n' for line in kept))
model.train()
skipped = 0  # steps skipped for a non-finite loss (skip_nonfinite)
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr

    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        say(f"step {iter_num}: train loss {losses['train']:.6f}, val loss {losses['val']:.6f}")
        if iter_num > 0 and not eval_only and (losses['val'] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
    if iter_num >= max_iters or eval_only:
        break

    t0 = time.time()
    # the global batch is drawn identically on every process, which takes its share: the data seen do not
    # depend on the number of processes (rows [rank * local_accum * batch_size, ...) are this process's)
    X, Y = get_batch('train', gradient_accumulation_steps * batch_size, batch_gen)
    X, Y = (t[rank * local_accum * batch_size:(rank + 1) * local_accum * batch_size] for t in (X, Y))
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(local_accum):
        x, y = (t[micro_step * batch_size:(micro_step + 1) * batch_size] for t in (X, Y))
        # DDP averages gradients over processes in the last micro-step's backward only
        with model.no_sync() if ddp and micro_step < local_accum - 1 else nullcontext():
            with ctx:
                _, loss = model(x, y)
                loss = loss / local_accum  # mean over micro-steps; DDP's average over processes does the rest
            loss.backward()
        loss_sum += loss.detach()
        if rank_prune:  # the micro-batch's gradient and its outer product, for the pruning scores
            prunedlora.accumulate(raw_model, rank_state, micro_step, local_accum, batch_size)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    finite = torch.isfinite(loss_sum + grad_norm).float()  # the gradients are all-reduced: NaN anywhere is NaN here
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every process takes the same decision
    if not finite.item():  # before the update: the adapters and the last checkpoint stay good
        if not skip_nonfinite:
            sys.exit(f"iter {iter_num}: loss {loss_sum.item()}, grad norm {grad_norm.item()}: not finite, stopping before "
                     f"the update (the last checkpoint in {out_dir} is untouched). Lower learning_rate, check the data "
                     f"and weights, or set --skip_nonfinite=True to skip such steps")
        skipped += 1
        say(f"iter {iter_num}: loss {loss_sum.item()}, not finite: step skipped ({skipped} skipped so far)")
        if rank_prune:  # the sums since the last event hold this step's NaN: start them afresh
            prunedlora.reset(rank_state)
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        continue
    if struct_prune:  # LoRAPrune, before the step: its estimate of G_W uses the A, B these gradients belong to
        struct_average = loraprune_step(raw_model, struct_average, iter_num, max_iters, struct_sparsity,
                                        struct_every, whole_groups=struct_whole_groups)
        if iter_num % struct_every == 0 or iter_num == max_iters - 1:
            say(f"iter {iter_num}: {masked_params(raw_model) / count_params(raw_model):.2%} of all parameters masked")
    optimizer.step()
    # ------------------------------------------------------------------------- pruning schedule (prunedlora.py)
    # after the step, before zero_grad: p.grad still holds this step's gradients, the same on every process
    if rank_prune:  # every rank_every steps: score -> choose -> recovery update -> mask (prunedlora.py)
        event = prunedlora.step(raw_model, optimizer, iter_num + 1, rank_cfg, rank_state, heldout)
        if event:
            say(f"iter {iter_num}: pruned {event['pruned']} rank components, rank mean {event['rank_mean']:.2f} "
                f"(min {event['rank_min']}, max {event['rank_max']}); loss change predicted {event['predicted']:.5f}, "
                f"actual {event['actual']:.5f}" + (f"; ranking test: spearman {event['ranking']['spearman']:.2f}"
                                                   if event['ranking'] else ''))
            if master:
                with open(events_log, 'a') as f:
                    f.write(json.dumps(event) + '\n')
    optimizer.zero_grad(set_to_none=True)

    if iter_num % log_interval == 0:
        if ddp:
            dist.all_reduce(loss_sum)  # sum over processes of their mean loss
        lossf = loss_sum.item() / world_size
        dt = time.time() - t0
        mfu = f", mfu {flops_per_token * tokens_per_iter / dt / (gpu_peak_flops * world_size) * 100:.1f}%" \
            if device_type == 'cuda' else ''
        say(f"iter {iter_num}: loss {lossf:.6f}, lr {lr:.3e}, grad norm {grad_norm.item():.6f}, "
            f"{tokens_per_iter / dt:,.0f} tok/s, {dt * 1000:.1f} ms/iter, peak mem {peak_memory_mib():,.0f} MiB{mfu}")
    iter_num += 1

# ----------------------------------------------------------------------------- the result
if master and not eval_only:
    if rank_prune:
        prunedlora.slice_adapters(raw_model)  # A and B at their exact final ranks
    if struct_prune:  # remove the masked heads and channels for real: a smaller ordinary model
        dense = count_params(raw_model)
        compact(raw_model)
        say(f"compacted: {count_params(raw_model):,} of {dense:,} parameters left "
            f"({1 - count_params(raw_model) / dense:.4%} removed); the adapter fits the compacted base only")
    save_adapter(raw_model, Path(out_dir) / 'adapter', base_model_name_or_path=str(model_dir))
    say(f"saved the adapter (peft format) to {out_dir}/adapter")
    if export_merged or struct_prune:
        save_merged(raw_model, Path(out_dir) / 'merged', dtype=torch.bfloat16, tokenizer_from=model_dir)
        say(f"saved the merged model to {out_dir}/merged")
if ddp:
    # the DDP wrapper holds the process group: left to interpreter shutdown, gloo's threads were torn down late and
    # a process that finished before the others (rank 0 still writing files) sometimes aborted (SIGABRT)
    del model
    dist.destroy_process_group()

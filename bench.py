"""
Speed and memory of this project against transformers + peft: a LoRA training step, prefill and decode, and a
model compacted to half its width against the dense one.

  python bench.py --device cpu --threads 1    # the default model, batch 1 and 4 x 256 tokens, fp32 (and bf16
                                              # where the CPU has AVX512-BF16; elsewhere torch emulates it, ~100x slower)
  python bench.py                             # CUDA: the 135M and Llama-3.2-1B shapes and the default model,
                                              # eager and compiled, r = 8 and 512, batch 8 x 1024, bf16
  python bench.py --device cpu --rows train --batch 2 --dtype bfloat16 --loss masked --output out/bench.json

Rows (one per combination of the comma-separated options)
  train    forward, backward and an AdamW step on the LoRA parameters (rank r, alpha 2r, dropout 0, all seven
           projections) on random tokens. --loss masked: only the last --answer fraction of each row's
           positions count (targets -1 / labels -100 before: instruction tuning); all: every position counts.
  compact  the same step, ours dense against ours with half of every layer's query heads and MLP channels
           removed by prune.compact (transformers has no per-layer widths, so there is no "theirs").
  rankprune  ours alone: PrunedLoRA's cost at its start rank (--rank0), the step against prunedlora.accumulate after
           its backward and a pruning event (prunedlora.step) every --k1 steps: the share they add to training.
  loraprune  ours alone: LoRAPrune's cost at rank --rank, the step against the importance update after its
           backward (loraprune_update) and a masking step (loraprune_step, 20% sparsity) every 10 steps.
  prefill  one forward over --seq tokens filling the KV cache, logits of the last position only (no LoRA).
  decode   greedy generation from a --prompt token prompt, batch 1 (no LoRA): ms per token =
           (time for 1 + N new tokens - time for 1 new token) / N, N = --new_tokens.
  (--mode compile applies to train and compact rows; prefill and decode run eager.)
Sides
  ours             model.py + lora.py. bfloat16: base weights bf16, LoRA parameters fp32, LoRA products bf16.
  theirs           transformers' LlamaForCausalLM (attn_implementation "sdpa", use_cache=False in training) +
                   peft.get_peft_model. bfloat16: base weights bf16, the adapter in fp32 (peft's default
                   autocast_adapter_dtype) with its input cast to fp32.
  theirs-autocast  bfloat16 rows only: fp32 weights under torch.autocast(bfloat16), the usual Trainer recipe.
Measuring
  A row builds all its sides, then times them in turns (--steps calls each, --repeats turns) and reports the
  medians, so a busy machine slows every side alike. tokens/s = batch x seq / step time (every position, counted
  in the loss or not). "cpu ms" (CPU only) is the process's CPU time per step, steadier than the wall clock on a
  shared machine. Memory (train and compact rows): each side once more in a fresh process. CUDA: peak
  max_memory_allocated, in all and its growth during the steps; CPU: peak resident set (VmHWM, reset after
  setup), in all and its growth over the resident set after setup. MFU: model FLOPs per step (step_flops, the same
  count for both sides) / time / the peak: CUDA, the GPU's (PEAK_TFLOPS, dense bf16 tensor cores, fp32 without
  TF32; or --peak_tflops); CPU, a 2048^3 matmul's FLOP/s measured here in the row's dtype and thread count.
  The default model's rows also print both sides' first loss: they must agree (same weights, B = 0).
"""
import argparse
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch

import prunedlora
from configurator import renamed
from lora import ALL_TARGETS, apply_lora, lora_modules, lora_parameters
from model import KVCache, ModelConfig, Transformer
from prune import add_masks, loraprune_step, loraprune_update, masked_params

DEFAULT_MODEL = Path(__file__).parent / "models" / "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROWS = ("train", "compact", "rankprune", "loraprune", "prefill", "decode")
SHAPES = {  # random weights, Hugging Face config keys; "default" is the default model folder with its weights
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,  # Llama-3.2-1B
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
}  # (Llama-3.2's rope scaling is left out: computed once per forward, it changes no cost)
PEAK_TFLOPS = {  # name fragment -> (dense bf16 tensor core, fp32 without TF32), from NVIDIA's data sheets
    "H100 PCIe": (756.0, 51.2), "H100": (989.4, 66.9), "H200": (989.4, 66.9), "A100": (312.0, 19.5),
    "L40S": (362.1, 91.6), "A10G": (70.0, 31.2), "RTX 4090": (165.2, 82.6),
}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--shapes", default=None, help="of default, 135m, 1b (CUDA: 135m,1b,default; CPU: default)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the folder of the 'default' shape")
    p.add_argument("--dtype", default=None, help="CUDA: bfloat16; CPU: float32,bfloat16")
    p.add_argument("--batch", default=None, help="CUDA: 8; CPU: 1,4")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (CUDA: 1024; CPU: 256)")
    p.add_argument("--rank", default=None, help="LoRA ranks (CUDA: 8,512; CPU: 8)")
    p.add_argument("--rank0", default=None, help="rankprune rows: PrunedLoRA's start ranks (CUDA: 64,512; CPU: 64)")
    p.add_argument("--k1", type=int, default=10, help="rankprune rows: optimizer steps per pruning event")
    p.add_argument("--loss", default=None, help="masked (instruction tuning) and/or all (CUDA: masked; CPU: both)")
    p.add_argument("--answer", type=float, default=0.5, help="masked loss: fraction of positions that count")
    p.add_argument("--mode", default=None, help="eager and/or compile (torch.compile) (CUDA: both; CPU: eager)")
    p.add_argument("--sides", default="ours,theirs,theirs-autocast")
    p.add_argument("--steps", type=int, default=None, help="calls per turn (CUDA: 5; CPU: 1)")
    p.add_argument("--repeats", type=int, default=None, help="turns (CUDA: 5; CPU: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (CUDA: 3, compiled 5; CPU: 1)")
    p.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
    p.add_argument("--new_tokens", type=int, default=None, help="decode: N (CUDA: 128; CPU: 16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak for MFU (default: PEAK_TFLOPS; CPU: measured)")
    p.add_argument("--output", default=None, help="also write the results here (rewritten after every row)")
    renamed(p, {"--json": "--output"})
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one side's memory, in a fresh process
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    cpu_dtypes = "float32,bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"  # bf16 is emulated there
    defaults = dict(shapes="135m,1b,default" if gpu else "default", dtype="bfloat16" if gpu else cpu_dtypes,
                    batch="8" if gpu else "1,4", seq=1024 if gpu else 256, rank="8,512" if gpu else "8",
                    rank0="64,512" if gpu else "64",
                    loss="masked" if gpu else "masked,all",
                    mode="eager,compile" if gpu else "eager", steps=5 if gpu else 1, repeats=5 if gpu else 3,
                    warmup=3 if gpu else 1, new_tokens=128 if gpu else 16)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, known in (("rows", ROWS), ("shapes", (*SHAPES, "default")), ("dtype", tuple(DTYPES)), ("loss", ("masked", "all")),
                       ("mode", ("eager", "compile")), ("sides", ("ours", "theirs", "theirs-autocast"))):
        unknown = [x for x in getattr(args, key).split(",") if x not in known]
        if unknown:
            p.error(f"--{key}: unknown {unknown}; known: {', '.join(known)}")
    return args


# ----------------------------------------------------------------------------- building both sides
def hf_config(shape, model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text()) if shape == "default" else SHAPES[shape]


def build_ours(shape, dtype, device, model_dir):
    if shape == "default":
        return Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    cfg = ModelConfig.from_hf(SHAPES[shape], shape)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: torch.ones(v.shape, dtype=dtype, device=device) if "norm" in k else
             0.02 * torch.randn(v.shape, dtype=dtype, device=device)
             for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    return model.load_weights(state, dtype, device, shape)


def build_theirs(shape, dtype, device, model_dir):
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
    kw = dict(attn_implementation="sdpa")
    if shape == "default":
        return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw).to(device)
    with torch.device(device):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape], **kw)).to(dtype)


def half_width(model, seed=0):
    """Remove half of every layer's query heads and MLP channels (random ones) with prune.py's compaction."""
    import prune
    g = torch.Generator().manual_seed(seed)
    prune.add_masks(model)
    for block in model.model.layers:
        for mask in (block.self_attn.head_mask, block.mlp.channel_mask):
            keep = torch.randperm(len(mask), generator=g)[:(len(mask) + 1) // 2]
            mask.zero_()[keep.to(mask.device)] = 1
    return prune.compact(model)


def batch(vocab, B, T, loss, answer, device, seed=0):
    """Random tokens x (B, T); our targets y (next token, -1 = not counted) and transformers' labels (-100 = not
    counted; it shifts them itself), counting the same positions; and the number of counted positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (B, T), generator=g).to(device)
    prompt = T - int(answer * T) if loss == "masked" else 0
    y = torch.full_like(x, -1)
    y[:, prompt:-1] = x[:, prompt + 1:]
    labels = x.clone()
    labels[:, :prompt + 1] = -100
    return x, y, labels, int((y != -1).sum())


def training_step(side, shape, dtype, device, model_dir, r, x, y, labels, compile_, compact=False):
    """A function running one LoRA training step of `side`, the model and its optimizer."""
    if side == "ours":
        model = build_ours(shape, dtype, device, model_dir)
        apply_lora(model, ALL_TARGETS, r=r, alpha=2 * r)
        if compact:
            half_width(model)
        params = lora_parameters(model)
    else:
        import peft
        autocast = side == "theirs-autocast"
        base = build_theirs(shape, torch.float32 if autocast else dtype, device, model_dir)
        base.config.use_cache = False
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                          target_modules=list(ALL_TARGETS), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(params, lr=1e-4)
    context = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) \
        if side == "theirs-autocast" else torch.enable_grad

    def step():
        with context():
            loss = forward(x, y)[1] if side == "ours" else forward(input_ids=x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model, opt


def step_flops(model, B, T, counted):
    """Model FLOPs of one LoRA step of our model, PaLM's way (2 per weight per token forward, the attention
    scores and values counted in full, not causally halved), for a frozen base: backward computes its input
    gradient (2 more) but no weight gradient; LoRA's weights get theirs (4 more); the output layer runs only at
    the counted positions."""
    mods = lora_modules(model).values()
    base = sum(m.weight.numel() for m in mods)
    lora = sum(m.r * (m.in_features + m.out_features) for m in mods)
    attention = sum(12 * b.self_attn.n_head * b.self_attn.head_dim * T for b in model.model.layers)
    return B * T * (4 * base + 6 * lora + attention) + counted * 4 * model.lm_head.weight.numel()


# ----------------------------------------------------------------------------- measuring
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns, steps, repeats, warmup, device):
    """{name: (wall ms, cpu ms) per call}: the functions run in turns, `steps` calls each per turn; medians."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            sync(device)
            wall[name].append((time.perf_counter() - t0) * 1000 / steps)
            cpu[name].append((time.process_time() - c0) * 1000 / steps)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def status(key):  # kB from /proc/self/status (Linux)
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child_memory(spec):
    """Runs in a fresh process: one side of a row, setup, then the peak memory of 2 steps, in MB."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    x, y, labels, _ = batch(spec["vocab"], spec["B"], spec["T"], spec["loss"], spec["answer"], device)
    step, _, _ = training_step(spec["side"], spec["shape"], DTYPES[spec["dtype"]], device, spec["model_dir"],
                            spec["r"], x, y, labels, spec["compile"], spec["compact"])
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(), step()
        sync(device)
        peak = torch.cuda.max_memory_allocated()
        return dict(peak_mb=peak / 2**20, step_mb=(peak - before) / 2**20, how="cuda max_memory_allocated")
    try:  # "5" resets the peak resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        step(), step()
        peak = status("VmHWM")
        return dict(peak_mb=peak / 1024, step_mb=(peak - before) / 1024, how="VmHWM")
    except OSError:
        step(), step()
        return dict(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step_mb=None, how="ru_maxrss")


def memory(spec):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_flops(device, dtype, override):
    if override:
        return override * 1e12
    if not str(device).startswith("cuda"):
        return matmul_peak(dtype)
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, fp32) in PEAK_TFLOPS.items():
        if fragment in name:
            return (bf16 if dtype == torch.bfloat16 else fp32) * 1e12
    return None


_MATMUL_PEAK = {}


def matmul_peak(dtype, n=2048, calls=5):
    """CPU: FLOP/s of one large square matmul in `dtype` on this machine and thread count (the best of `calls`),
    the ceiling a step made of the same MKL / oneDNN matmuls can approach: MFU on CPU is measured against it."""
    if dtype not in _MATMUL_PEAK:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _MATMUL_PEAK[dtype] = 2 * n ** 3 / best
    return _MATMUL_PEAK[dtype]


# ----------------------------------------------------------------------------- the rows
def train_rows(args, sides, log, record):
    kinds = [kind for kind in ("train", "compact", "rankprune", "loraprune") if kind in args.rows.split(",")]
    for shape in args.shapes.split(","):
        hf = hf_config(shape, args.model)
        widest = min(hf["num_key_value_heads"] * hf.get("head_dim", 64), hf["hidden_size"])
        for dtype_name, B, kind in itertools.product(args.dtype.split(","), map(int, args.batch.split(",")), kinds):
            for r in map(int, (args.rank0 if kind == "rankprune" else args.rank).split(",")):
                if r > widest:
                    log(f"skip {shape} r={r}: above k_proj's {widest} outputs (ours refuses r > min(in, out))")
                    continue
                for loss, mode in itertools.product(args.loss.split(","), args.mode.split(",")):
                    how = (args, shape, dtype_name, DTYPES[dtype_name], B, r, loss, mode, hf["vocab_size"])
                    record(rank_pruning_row(*how) if kind == "rankprune" else loraprune_row(*how) if kind == "loraprune"
                           else train_row(*how, kind, sides, log, record))


def train_row(args, shape, dtype_name, dtype, B, r, loss, mode, vocab, kind, sides, log, record):
    T, device = args.seq, args.device
    x, y, labels, counted = batch(vocab, B, T, loss, args.answer, device)
    if kind == "compact":
        names = {"ours": ("ours", False), "ours-compact": ("ours", True)}
    else:
        names = {s: (s, False) for s in sides if s != "theirs-autocast" or dtype == torch.bfloat16}
    fns, models = {}, {}
    for name, (side, compact) in names.items():
        fns[name], models[name], _ = training_step(side, shape, dtype, device, args.model, r, x, y, labels,
                                                   mode == "compile", compact)
    if shape == "default" and kind == "train":
        log("first losses: " + ", ".join(f"{name} {fn().item():.5f}" for name, fn in fns.items()))
    warmup = args.warmup + (2 if mode == "compile" else 0)
    times = timed(fns, args.steps, args.repeats, warmup, device)
    peak = peak_flops(device, dtype, args.peak_tflops)
    row = dict(kind=kind, shape=shape, dtype=dtype_name, B=B, T=T, r=r, loss=loss, mode=mode, sides={})
    for name, (wall, cpu) in times.items():
        ours_model = models[name] if name.startswith("ours") else models["ours"] if "ours" in models else None
        flops = step_flops(ours_model, B, T, counted) if ours_model is not None else None
        row["sides"][name] = dict(ms=wall, cpu_ms=cpu, tokens_per_s=B * T / wall * 1000,
                                  mfu=flops / (wall / 1000) / peak if peak and flops else None)
    record(row, done=False)  # the times are kept even if the memory runs (compiling again) are cut short
    for name, entry in row["sides"].items():
        if args.memory:
            entry["memory"] = memory(dict(side=names[name][0], compact=names[name][1], shape=shape, dtype=dtype_name,
                                          device=device, model_dir=args.model, r=r, B=B, T=T, loss=loss,
                                          answer=args.answer, vocab=vocab, compile=mode == "compile",
                                          threads=args.threads))
    return row


def with_gradients_aside(model, step, x, y):
    """For the rows that time what runs after a backward: one step (AdamW's state), one more backward whose
    gradients are kept aside (steps clear .grad), and a function run(fn) calling fn with them in .grad."""
    step()
    model(x, y)[1].backward()
    grads = [(p, p.grad) for p in lora_parameters(model)]

    def run(fn):
        for p, g in grads:
            p.grad = g
        out = fn()
        for p, _ in grads:
            p.grad = None
        return out
    return run


def overhead_sides(times, B, T):
    """The JSON's sides of an overhead row: the step (with tokens/s) and what it is compared with."""
    return {name: dict(ms=wall, cpu_ms=cpu, tokens_per_s=B * T / wall * 1000 if name == "step" else None)
            for name, (wall, cpu) in times.items()}


def rank_pruning_row(args, shape, dtype_name, dtype, B, r0, loss, mode, vocab):
    """PrunedLoRA's own cost on top of the training step, at its start rank r0 (the most it costs): the
    statistics taken after every backward (prunedlora.accumulate: two r0 x r0 Gram matrices per adapter) and, every
    K1 steps, a pruning event (prunedlora.step: scores, choice, recovery update, masks; K2 = 2 components of
    every adapter). The event column includes one accumulate; overhead = (fisher + (event - fisher) / K1)
    / step, the time they add to training."""
    x, y, labels, _ = batch(vocab, B, args.seq, loss, args.answer, args.device)
    step, model, opt = training_step("ours", shape, dtype, args.device, args.model, r0, x, y, labels,
                                     mode == "compile")
    with_grads = with_gradients_aside(model, step, x, y)
    cfg = prunedlora.DEFAULTS | dict(rank_every=args.k1, rank_k=2, rank_target=1, rank_ranking_test=False)
    running, state = prunedlora.new_state(cfg), prunedlora.new_state(cfg)  # sums between events (fisher); events'
    steps, events = itertools.count(args.k1, args.k1), []

    def fisher(into):  # the statistics of one step, from the gradients kept aside
        with_grads(lambda: prunedlora.accumulate(model, into))

    def event():  # a pruning event, after the one step of statistics it needs
        fisher(state)
        events.append(prunedlora.step(model, opt, next(steps), cfg, state) is not None)

    fns = dict(step=step, fisher=lambda: fisher(running), event=event)
    times = timed(fns, args.steps, args.repeats, args.warmup, args.device)
    if not all(events):
        raise RuntimeError(f"rank pruning row: only {sum(events)} of {len(events)} calls were events (r0 {r0} too low)")
    (step_ms, _), (fisher_ms, _), (event_ms, _) = times["step"], times["fisher"], times["event"]
    return dict(kind="rankprune", shape=shape, dtype=dtype_name, B=B, T=args.seq, r=r0, loss=loss, mode=mode,
                k1=args.k1, overhead=(fisher_ms + (event_ms - fisher_ms) / args.k1) / step_ms,
                sides=overhead_sides(times, B, args.seq),
                events=len(events), ranks_after=sorted(set(prunedlora.active_ranks(lora_modules(model)).values())))


def loraprune_row(args, shape, dtype_name, dtype, B, r, loss, mode, vocab, every=10):
    """LoRAPrune's own cost: the importance update after every backward (loraprune_update: each base weight's
    gradient estimated from its adapter's, times the weight, squared and summed per head and channel) and, every
    `every` steps, a masking step (loraprune_step at mid-schedule: the update, the plan and the masks of 20%
    sparsity); overhead = (update + (masking - update) / every) / step."""
    x, y, labels, _ = batch(vocab, B, args.seq, loss, args.answer, args.device)
    step, model, _ = training_step("ours", shape, dtype, args.device, args.model, r, x, y, labels, mode == "compile")
    add_masks(model)
    with_grads, average = with_gradients_aside(model, step, x, y), {}

    def update(fn):  # fn(average) -> the new importance average, from the gradients kept aside
        average["now"] = with_grads(lambda: fn(average.get("now")))

    fns = dict(step=step, update=lambda: update(lambda avg: loraprune_update(model, avg)),
               masking=lambda: update(lambda avg: loraprune_step(model, avg, 50 * every, 100 * every, 0.2, every)))
    times = timed(fns, args.steps, args.repeats, args.warmup, args.device)
    (step_ms, _), (update_ms, _), (masking_ms, _) = times["step"], times["update"], times["masking"]
    return dict(kind="loraprune", shape=shape, dtype=dtype_name, B=B, T=args.seq, r=r, loss=loss, mode=mode,
                every=every, overhead=(update_ms + (masking_ms - update_ms) / every) / step_ms,
                sides=overhead_sides(times, B, args.seq), masked_params=masked_params(model))


def inference_rows(args, sides, record):
    device = args.device
    for shape in args.shapes.split(","):
        vocab = hf_config(shape, args.model)["vocab_size"]
        for dtype_name in args.dtype.split(","):
            dtype = DTYPES[dtype_name]
            models = {"ours": build_ours(shape, dtype, device, args.model).eval()}
            if "theirs" in sides:
                models["theirs"] = build_theirs(shape, dtype, device, args.model).eval()
            prompt = torch.randint(vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
            x = torch.randint(vocab, (1, args.seq), generator=torch.Generator().manual_seed(1)).to(device)

            def prefill(name):
                m = models[name]
                if name == "ours":
                    return lambda: m(x, cache=KVCache(m, 1, args.seq, dtype, device), last_only=True)
                return lambda: m(input_ids=x, use_cache=True, logits_to_keep=1)

            def generate(name, n):
                m = models[name]
                if name == "ours":
                    return lambda: m.generate(prompt, max_new_tokens=n)
                return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=0)

            with torch.no_grad():
                if "prefill" in args.rows.split(","):
                    times = timed({n: prefill(n) for n in models}, args.steps, args.repeats, args.warmup, device)
                    row = dict(kind="prefill", shape=shape, dtype=dtype_name, B=1, T=args.seq, sides={
                        n: dict(ms=w, cpu_ms=c, tokens_per_s=args.seq / w * 1000) for n, (w, c) in times.items()})
                    record(row)
                if "decode" in args.rows.split(","):
                    fns = {f"{n} {k}": generate(n, k) for n in models for k in (1, 1 + args.new_tokens)}
                    times = timed(fns, 1, args.repeats, 1, device)
                    N = args.new_tokens
                    per_token = {n: [(times[f"{n} {1 + N}"][i] - times[f"{n} 1"][i]) / N for i in (0, 1)] for n in models}
                    row = dict(kind="decode", shape=shape, dtype=dtype_name, B=1, T=args.prompt, sides={
                        n: dict(ms=w, cpu_ms=c, tokens_per_s=1000 / w) for n, (w, c) in per_token.items()})
                    record(row)
            models.clear()  # free them before the next dtype's


def format_row(row):
    what = {"train": f"r={row.get('r')} loss={row.get('loss')} {row.get('mode')}",
            "compact": f"r={row.get('r')} loss={row.get('loss')} {row.get('mode')}",
            "prefill": "", "decode": "per new token",
            "rankprune": f"r0={row.get('r')} loss={row.get('loss')} {row.get('mode')}, K1={row.get('k1')}: "
                         f"PrunedLoRA adds {100 * row.get('overhead', 0):.1f}% to training",
            "loraprune": f"r={row.get('r')} loss={row.get('loss')} {row.get('mode')}, masks every {row.get('every')}: "
                         f"LoRAPrune adds {100 * row.get('overhead', 0):.1f}% to training"}[row["kind"]]
    lines = [f"\n{row['kind']} | {row['shape']} {row['dtype']} B={row['B']} T={row['T']} {what}"]
    ref = row["sides"].get("ours")
    for name, e in row["sides"].items():
        mem = e.get("memory") or {}
        mem = (f"peak {mem['peak_mb']:.0f} MB (+{mem['step_mb']:.0f} in the step, {mem['how']})" if mem.get("step_mb")
               is not None else f"peak {mem['peak_mb']:.0f} MB ({mem['how']})" if "peak_mb" in mem else mem.get("error", ""))
        speed = "" if not ref or name == "ours" else f"x{ref['ms'] / e['ms']:.2f} dense" if name == "ours-compact" \
            else f"ours x{e['ms'] / ref['ms']:.2f}"
        mfu = f"MFU {100 * e['mfu']:.1f}%" if e.get("mfu") else ""
        tokens = f"{e['tokens_per_s']:9.1f} tok/s" if e.get("tokens_per_s") else ""
        lines.append(f"  {name:16s} {e['ms']:9.1f} ms  {tokens:15s}  cpu {e['cpu_ms']:9.1f} ms  "
                     f"{speed:14s} {mfu:10s} {mem}")
    return "\n".join(lines)


def environment(args):
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else None
    env = dict(date=str(date.today()), command="python " + " ".join(sys.argv), torch=torch.__version__,
               threads=torch.get_num_threads(), cpu=cpu.group(1) if cpu else platform.processor(),
               cores=os.cpu_count(), loadavg=os.getloadavg(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
               cpu_fast_bf16=torch.cpu._is_avx512_bf16_supported())
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(args.device)
    for lib in ("transformers", "peft"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            env[lib] = None
    return env


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(json.loads(args.child))))
        return
    env = environment(args)
    sides = args.sides.split(",")
    if env["transformers"] is None or env["peft"] is None:
        sides = [s for s in sides if not s.startswith("theirs")]
    log = lambda s: print(s, flush=True)
    if not args.device.startswith("cuda") and not args.peak_tflops:  # MFU's denominator on CPU
        env["matmul_peak_gflops"] = {d: round(matmul_peak(DTYPES[d]) / 1e9, 1) for d in args.dtype.split(",")}
    log(" | ".join(f"{k} {v}" for k, v in env.items()))
    if not args.device.startswith("cuda") and env["threads"] > 1 and env["loadavg"][0] > env["cores"]:
        log(f"warning: the machine is busy (load {env['loadavg'][0]:.1f} on {env['cores']} cores) and torch uses "
            f"{env['threads']} threads, which then wait on each other (steps 10x slower seen): try --threads 1")
    if env["transformers"] is None or env["peft"] is None:
        log("transformers + peft are not installed: ours only")
    if not args.device.startswith("cuda") and "bfloat16" in args.dtype and not env["cpu_fast_bf16"]:
        log(f"warning: this CPU has no AVX512-BF16 (torch's kernels: {env['cpu_capability']}): bf16 matmuls are "
            f"emulated, about 100x slower than fp32 (train.py's dtype='auto' takes float32 here)")
    rows = []

    def record(row, done=True):  # the JSON is rewritten after every row: a run cut short keeps the rows it has
        if not rows or rows[-1] is not row:
            rows.append(row)
        if done:
            log(format_row(row))
        env["loadavg_end"] = os.getloadavg()
        if args.output:  # whole or not at all, should a time limit stop the run mid-write
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output + ".tmp").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
            os.replace(args.output + ".tmp", args.output)

    train_rows(args, sides, log, record)
    inference_rows(args, sides, record)
    log(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()

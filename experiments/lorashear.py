"""
LoRAShear (ALGORITHMS.md §3) end to end on a model folder, written as a compacted model folder whose rows join the
20% / 50% table of experiments/structured.py (the same eval.py: WikiText-2 perplexity, the seven zero-shot tasks):

    python experiments/lorashear.py --sparsity 0.2 [--scale cpu-small|gpu] [--variant ramp|halfspace] [--eval]
    python experiments/plot_kda.py results/lorashear/lorashear-0.2-kda.json  # the figure (needs matplotlib)

  1. knowledge distribution analysis on the dense model (held-out val windows of the stage-1 sources): the gamma
     most sensitive node groups (one layer's attention or MLP) stay whole; prune.lorashear_plan shares the rest;
  2. LoRA warm-up of T_w steps, then P LHSPG periods of T_p steps on the stage-1 mixture: each period the next least
     salient groups (LoRAPrune's importance, its moving average over the steps so far) go to exactly zero while LoRA
     trains on; the adapters are merged and restarted at each period's end; then compaction removes the zero groups;
  3. dynamic knowledge recovery, LoRA on the compacted model, in two stages: (1) pretraining-style text (pydocs,
     shakespeare, GSM8K as plain text), (2) instruction data (alpaca, GSM8K, loss on the responses). Each round
     measures every source's degradation (pruned minus dense loss on its own held-out val batches), draws the next
     batches in proportion to it (with a floor per source), trains, and the stage stops when the mean val loss has
     not improved for `patience` rounds (the best adapters are kept and merged).
Only train and val splits are read, never an evaluation set (GSM8K's test split, WikiText-2, the zero-shot tasks).
Outputs (the name is lorashear_halfspace-<sparsity> for --variant halfspace):
out/lorashear/lorashear-<sparsity>/ (an ordinary model folder; pruning.json says how it was made) and
results/lorashear/lorashear-<sparsity>.json (the analysis, plan, losses along the way, tokens used per stage; the
analysis alone also in lorashear-<sparsity>-kda.json); with
--eval, eval.py's results go to results/structured/lorashear-<sparsity>.json beside the other rows of the table.
Sparsity = the fraction of ALL parameters removed (embeddings included, LoRA excluded), as in experiments/structured.py.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prune  # noqa: E402
from lora import apply_lora, lora_modules, lora_parameters  # noqa: E402
from model import Transformer  # noqa: E402

sys.path.insert(0, str(ROOT / "experiments"))
import structured  # noqa: E402  (the table's evaluation)

MODEL = ROOT / "models" / "smollm2-135m-instruct"
STAGES = {"stage1": {"pydocs": False, "shakespeare": False, "gsm8k": False},  # source: loss on responses only?
          "stage2": {"alpaca": True, "gsm8k": True}}
SCALES = {  # every key is also a command-line option overriding the scale's value
    "cpu-small": dict(seq_len=128, batch_size=4, kda_batches=2, kda_ratios="0.25,0.5", gamma=0.1, warmup=20,
                      periods=4, period_steps=20, round_batches=16, max_rounds=4, patience=1, val_batches=2,
                      floor=0.1, lr=2e-4, lora_r=8),
    "gpu": dict(seq_len=512, batch_size=16, kda_batches=8, kda_ratios="0.1,0.3,0.5", gamma=0.1, warmup=200,
                periods=5, period_steps=200, round_batches=100, max_rounds=20, patience=3, val_batches=8,
                floor=0.1, lr=2e-4, lora_r=8),
}


# ----------------------------------------------------------------------------- data
class Source:
    """Random windows of one prepared data set (data/<name>/<split>.bin, + <split>_mask.bin if masked)."""

    def __init__(self, name, split, masked, seq_len, seed):
        folder = ROOT / "data" / name
        meta = folder / "meta.json"
        if not meta.exists():
            raise SystemExit(f"{folder}: no prepared tokens; run `python data/{name}/prepare.py` first")
        if split not in ("train", "val"):
            raise ValueError(f"split {split!r}: LoRAShear reads train and val only, never an evaluation set")
        self.tokens = np.memmap(folder / f"{split}.bin", dtype=json.loads(meta.read_text())["dtype"], mode="r")
        self.mask = np.memmap(folder / f"{split}_mask.bin", dtype=np.uint8, mode="r") if masked else None
        self.seq_len, self.rng = seq_len, np.random.default_rng(seed)

    def batch(self, batch_size, device):
        """(x, y), both (batch_size, seq_len); y = -1 where the loss mask leaves a token out."""
        T = self.seq_len
        starts = self.rng.integers(0, len(self.tokens) - T - 1, batch_size)
        w = torch.from_numpy(np.stack([self.tokens[s:s + T + 1].astype(np.int64) for s in starts]))
        x, y = w[:, :-1], w[:, 1:].clone()
        if self.mask is not None:
            y[torch.from_numpy(np.stack([self.mask[s + 1:s + T + 1] == 0 for s in starts]))] = -1
        return x.to(device), y.to(device)


def held_out(cfg, device):
    """Fixed val batches per (stage, source): the same ones measure the dense model, each round and the plateau."""
    return {stage: {name: [Source(name, "val", masked, cfg.seq_len, 1000 + i).batch(cfg.batch_size, device)
                           for _ in range(cfg.val_batches)]
                    for i, (name, masked) in enumerate(sources.items())}
            for stage, sources in STAGES.items()}


# ----------------------------------------------------------------------------- training
def make_optimizer(model, cfg):
    return torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=0.0)


def train_step(model, optimizer, batch, ctx, before_step=None):
    """One LoRA step on batch (x, y); before_step() runs between backward (clipped gradients) and optimizer.step()."""
    model.train()
    with ctx:
        _, loss = model(*batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
    if before_step is not None:
        before_step()
    optimizer.step()
    return loss.item()


def count_tokens(used, stage, source, batch):
    x, y = batch
    entry = used.setdefault(stage, {}).setdefault(source, {"tokens": 0, "loss_tokens": 0, "batches": 0})
    entry["tokens"] += x.numel()
    entry["loss_tokens"] += int((y != -1).sum())
    entry["batches"] += 1


def lhspg(model, cfg, plan, mixture, used, ctx, log):
    """Warm-up, then the LHSPG periods (prune.next_redundant at each start, prune.lhspg_step after every step,
    prune.restart_adapters at each end). Returns the redundant set, every group of it exactly zero."""
    optimizer, average, redundant, step = make_optimizer(model, cfg), None, None, 0
    names = list(mixture)

    def saliency():  # LoRAPrune's importance of the groups from this step's LoRA gradients, a moving average
        nonlocal average
        average = prune.loraprune_update(model, average)

    def one_step(stage, hook=None):
        nonlocal step
        name = names[step % len(names)]  # the stage-1 sources in turn
        batch = mixture[name].batch(cfg.batch_size, cfg.device)
        count_tokens(used, stage, name, batch)
        loss = train_step(model, optimizer, batch, ctx, saliency)
        if hook is not None:
            hook()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        return loss

    for _ in range(cfg.warmup):
        loss = one_step("lhspg_warmup")
    log(f"LoRA warm-up: {cfg.warmup} steps, last loss {loss:.4f}")
    for period in range(cfg.periods):
        redundant, shrinking = prune.next_redundant(average, redundant, plan, period, cfg.periods)
        for t in range(cfg.period_steps):
            loss = one_step("lhspg_periods", lambda: prune.lhspg_step(model, redundant, shrinking, t, cfg.period_steps,
                                                                     cfg.variant, cfg.eps))
        zero = prune.groups_max_abs(model, redundant)
        prune.restart_adapters(model, torch.Generator(device=cfg.device).manual_seed(cfg.seed + period))
        optimizer.state.clear()  # the moments of the old adapters
        n_red = sum(int(g["heads"].sum()) + int(g["channels"].sum()) for g in redundant.values())
        log(f"LHSPG period {period + 1}/{cfg.periods}: {n_red} groups redundant, largest |weight| left on them "
            f"{zero:.1e}; last loss {loss:.4f}; adapters merged and restarted")
        if zero != 0.0:
            raise RuntimeError(f"LHSPG left {zero} on a redundant group at the end of period {period + 1}")
    return redundant


def snapshot(model):
    return {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in lora_modules(model).items()}


@torch.no_grad()
def restore(model, state):
    for name, m in lora_modules(model).items():
        m.lora_A.copy_(state[name][0])
        m.lora_B.copy_(state[name][1])


def recover(model, cfg, stage, val, dense, used, ctx, log):
    """One stage of dynamic knowledge recovery; returns its rounds (val losses, degradation, batches drawn)."""
    sources = {name: Source(name, "train", masked, cfg.seq_len, cfg.seed + 10 * i + (stage == "stage2"))
               for i, (name, masked) in enumerate(STAGES[stage].items())}
    optimizer, rng = make_optimizer(model, cfg), np.random.default_rng(cfg.seed)
    rounds, best, best_state, bad = [], float("inf"), snapshot(model), 0
    for r in range(cfg.max_rounds + 1):
        losses = {name: prune.mean_loss(model, val[name]) for name in sources}
        degradation = {name: losses[name] - dense[name] for name in sources}
        mean_val = sum(losses.values()) / len(losses)
        rounds.append(dict(round=r, val_loss=losses, degradation=degradation, mean_val_loss=mean_val))
        log(f"{stage} round {r}: val loss " + ", ".join(f"{n} {v:.4f} (+{degradation[n]:.4f})"
                                                        for n, v in losses.items()))
        if mean_val < best - 1e-4:
            best, best_state, bad = mean_val, snapshot(model), 0
        else:
            bad += 1
        if bad >= cfg.patience or r == cfg.max_rounds:  # a plateau (or the round budget): stop
            break
        counts = prune.recovery_counts(degradation, cfg.round_batches, cfg.floor)
        rounds[-1]["batches"] = counts
        order = [name for name, n in counts.items() for _ in range(n)]
        for name in rng.permutation(order):
            batch = sources[name].batch(cfg.batch_size, cfg.device)
            count_tokens(used, stage, str(name), batch)
            train_step(model, optimizer, batch, ctx)
            optimizer.zero_grad(set_to_none=True)
    restore(model, best_state)
    prune.restart_adapters(model)  # the stage's LoRA merged into the base; the next stage starts fresh adapters
    log(f"{stage}: best mean val loss {best:.4f} after {len(rounds) - 1} rounds")
    return rounds


# ----------------------------------------------------------------------------- the pipeline
def output_name(cfg):
    return f"lorashear{'' if cfg.variant == 'ramp' else '_' + cfg.variant}-{cfg.sparsity:g}"  # ramp: the default


def run(cfg):
    t0, lines = time.time(), []

    def log(msg):
        lines.append(msg)
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    torch.manual_seed(cfg.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda") else nullcontext()
    model = Transformer.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    dense_params = prune.count_params(model)
    val = held_out(cfg, cfg.device)
    with ctx:
        dense = {stage: {name: prune.mean_loss(model, b) for name, b in v.items()} for stage, v in val.items()}
    log(f"dense val losses: {json.dumps(dense)}")

    # 1. knowledge distribution analysis: held-out val windows of the stage-1 sources (not those of recovery)
    stage1 = list(STAGES["stage1"].items())
    kda_sources = [Source(name, "val", masked, cfg.seq_len, 2000 + i) for i, (name, masked) in enumerate(stage1)]
    kda_batches = [kda_sources[i % len(kda_sources)].batch(cfg.batch_size, cfg.device) for i in range(cfg.kda_batches)]
    with ctx:
        kda = prune.knowledge_distribution(model, kda_batches, cfg.kda_ratios, cfg.gamma)
    log(f"knowledge distribution: {len(kda['nodes'])} node groups, unprunable {kda['unprunable']}")
    plan, planned = prune.lorashear_plan(model, cfg.sparsity, kda["unprunable"])

    # 2. LHSPG on LoRA, then compaction
    apply_lora(model, r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.05)
    used = {"kda": {"val": {"tokens": sum(x.numel() for x, _ in kda_batches), "batches": len(kda_batches)}}}
    mixture = {name: Source(name, "train", masked, cfg.seq_len, cfg.seed + i)
               for i, (name, masked) in enumerate(stage1)}
    redundant = lhspg(model, cfg, plan, mixture, used, ctx, log)
    with ctx:
        zeroed = prune.mean_loss(model, val["stage1"]["pydocs"])
        prune.compact(prune.redundant_masks(model, redundant))
        compacted = prune.mean_loss(model, val["stage1"]["pydocs"])
    params = prune.count_params(model)
    log(f"compacted: {params:,} of {dense_params:,} parameters left ({1 - params / dense_params:.2%} removed, planned "
        f"{planned:.2%}); pydocs val loss {zeroed:.4f} zeroed, {compacted:.4f} compacted")

    # 3. dynamic knowledge recovery
    rounds = {stage: recover(model, cfg, stage, val[stage], dense[stage], used, ctx, log) for stage in STAGES}

    name = output_name(cfg)
    out, results = Path(cfg.out) / name, Path(cfg.results) / f"{name}.json"
    tokens = {stage: sum(v["tokens"] for v in per.values()) for stage, per in used.items()}
    info = dict(method="lorashear", variant=cfg.variant, target_sparsity=cfg.sparsity, planned_sparsity=planned,
                achieved_sparsity=1 - params / dense_params, params_before=dense_params, params_after=params,
                unprunable=kda["unprunable"], tokens=tokens, source=str(cfg.model), settings=vars(cfg))
    prune.save_pruned(model, out, cfg.model, info)
    result = dict(info, kda=kda, plan={str(l): list(p) for l, p in plan.items()}, dense_val_loss=dense,
                  lhspg_zeroed_loss=zeroed, compacted_loss=compacted, recovery=rounds, tokens_used=used,
                  heads=[b.self_attn.n_head for b in model.model.layers],
                  widths=[b.mlp.down_proj.in_features for b in model.model.layers], log=lines,
                  seconds=time.time() - t0)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")
    results.with_name(f"{name}-kda.json").write_text(json.dumps(kda, indent=1) + "\n")  # experiments/plot_kda.py
    log(f"wrote {out} and {results}; tokens per stage {tokens}")
    train_tokens = sum(tokens[stage] for stage in tokens if stage != "kda")  # the analysis reads val batches only
    if cfg.eval:  # the table's evaluation, the same as every other row's
        structured.evaluate(out, name, cfg.limit, cfg.ppl_pages, cfg.ppl_windows, train_tokens)
    else:
        log(f"its row of the table: rerun with --eval, or structured.evaluate({str(out)!r}, {name!r}, "
            f"{cfg.limit}, {cfg.ppl_pages}, {cfg.ppl_windows}, {train_tokens})")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of all parameters to remove (0.2, 0.5)")
    p.add_argument("--scale", default="cpu-small", choices=sorted(SCALES))
    p.add_argument("--variant", default="ramp", choices=prune.LHSPG_VARIANTS, help="LHSPG's shrink (prune.lhspg_step)")
    p.add_argument("--eps", type=float, default=0.05, help="the half-space variant's epsilon")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "lorashear", help="the model folder goes in here")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "lorashear")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="run eval.py on the result (as experiments/structured.py does)")
    p.add_argument("--limit", type=int, default=structured.LIMIT, help="zero-shot rows per task (0: all)")
    p.add_argument("--ppl_pages", type=int, default=structured.PPL_PAGES, help="WikiText-2 pages, word perplexity")
    p.add_argument("--ppl_windows", type=int, default=structured.PPL_WINDOWS, help="WikiText-2 windows, token ppl")
    for key, value in SCALES["cpu-small"].items():
        p.add_argument(f"--{key}", type=type(value), default=None, help="overrides the scale's value")
    cfg = p.parse_args(argv)
    for key, value in SCALES[cfg.scale].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    for key in ("seq_len", "batch_size", "kda_batches", "warmup", "periods", "period_steps", "val_batches", "patience",
                "lora_r"):
        if getattr(cfg, key) < 1:
            p.error(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.sparsity < 1:
        p.error(f"--sparsity must lie in [0, 1), got {cfg.sparsity}")
    try:  # what would fail after the slow work fails now
        cfg.kda_ratios = [float(r) for r in cfg.kda_ratios.split(",")]
        prune.check_out(cfg.out / output_name(cfg), cfg.model)
    except ValueError as e:
        bad_ratios = isinstance(cfg.kda_ratios, str)  # (still the text: it did not parse)
        p.error(f"--kda_ratios {cfg.kda_ratios!r}: expected numbers separated by commas" if bad_ratios else str(e))
    cfg.model, cfg.out, cfg.results = str(cfg.model), str(cfg.out), str(cfg.results)
    run(cfg)


if __name__ == "__main__":
    main()

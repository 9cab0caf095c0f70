"""
LoRAShear (docs/ALGORITHMS.md §3) on prune.py's groups (G1-G3), masks and compaction; it reads train and val splits
only, never an evaluation set.
  (S1) knowledge distribution analysis: the loss change of each node group (one layer's attention or MLP) thinned
       alone at a few ratios; the gamma most sensitive stay whole, prune.prune_plan shares the sparsity over the rest
  (S2) LHSPG ramp: after T_w LoRA warm-up steps, P periods of T_p steps; at a period's start the next least salient
       groups (LoRAPrune's (L3) average) become redundant and are scaled by (T_p - t - 1) / (T_p - t) at each step t
  (S3) LHSPG half-space: trial point x~ = x + s B A - lambda_g x / ||x||; the group is zeroed when x~ . x < eps ||x||^2
  (S4) at a period's end: merge s B A into W0 and restart the adapters; compaction then removes the zero groups
  (S5) dynamic knowledge recovery, LoRA on text, then on instruction data: each source's share of a round's batches
       is proportional to its degradation (pruned minus dense val loss), with a floor, until the val loss plateaus

    python lorashear.py --sparsity 0.2 [--scale cpu-small|gpu] [--variant ramp|halfspace] [--eval]

writes the model folder --out_dir (default out/lorashear/lorashear[_halfspace]-0.2) and the results --output
(default results/lorashear/<that name>.json; the analysis alone beside it as <name>-kda.json, for plot_kda.py).
"""
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import prune
from configurator import renamed
from lora import LoRALinear, apply_lora, lora_modules, lora_parameters
from model import Transformer

ROOT = Path(__file__).resolve().parent
LHSPG_VARIANTS = ("ramp", "halfspace")
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
# Groups: {layer: {"heads": bool (n_head,), "channels": bool (width,)}}; scores in prune.py's format.


# ----------------------------------------------------------------------------- (S1) knowledge distribution
@torch.no_grad()
def mean_loss(model, batches):
    """prune.batch_loss averaged over batches, in eval mode: every measurement of a run."""
    was_training = model.training
    model.eval()
    loss = sum(prune.batch_loss(model, b).item() for b in batches)
    model.train(was_training)
    return loss / len(batches)


@torch.no_grad()
def knowledge_distribution(model, batches, ratios=(0.1, 0.3, 0.5), gamma=0.1, scores=None):
    """(S1) Per node group and ratio: mean_loss with the round(ratio * n) lowest-scoring (default: magnitude) of its n
    heads / channels masked. The round(gamma * nodes) of highest mean |loss change| are unprunable. A JSON dict."""
    scores = prune.magnitude_scores(model) if scores is None else scores
    saved = [tuple(None if m is None else m.clone() for m in (b.self_attn.head_mask, b.mlp.channel_mask))
             for b in model.model.layers]
    prune.add_masks(model)
    base, nodes = mean_loss(model, batches), []
    try:
        for l, block in enumerate(model.model.layers):
            for kind, mask, key in (("attn", block.self_attn.head_mask, "heads"),
                                    ("mlp", block.mlp.channel_mask, "channels")):
                before, losses = mask.clone(), []
                live = int(before.sum())
                for ratio in ratios:
                    k = min(int(ratio * live + 0.5), live - 1)  # a node keeps at least one head / channel
                    mask.copy_(~prune.lowest(scores[l][key], before == 0, len(mask) - live + k))
                    losses.append(mean_loss(model, batches))
                    mask.copy_(before)
                change = [x - base for x in losses]
                nodes.append(dict(layer=l, kind=kind, losses=losses, change=change,
                                  sensitivity=sum(abs(c) for c in change) / len(change)))
    finally:
        for block, (heads, channels) in zip(model.model.layers, saved):
            block.self_attn.head_mask, block.mlp.channel_mask = heads, channels
    order = sorted(range(len(nodes)), key=lambda i: -nodes[i]["sensitivity"])  # stable: ties keep node order
    keep = sorted(order[:int(gamma * len(nodes) + 0.5)])
    return dict(base_loss=base, ratios=list(ratios), gamma=gamma, nodes=nodes,
                unprunable=[[nodes[i]["layer"], nodes[i]["kind"]] for i in keep])


# ----------------------------------------------------------------------------- (S2-S4) LHSPG
def next_redundant(scores, redundant, plan, period, n_periods):
    """(S2) At period `period`'s start, the least salient heads / channels join the redundant set (None at first)
    until it holds round(n (period + 1) / n_periods) of the plan's n; returns (redundant set, this period's new)."""
    now, new = {}, {}
    for l, counts in plan.items():
        now[l], new[l] = {}, {}
        for key, n in zip(("heads", "channels"), counts):
            s = scores[l][key]
            before = redundant[l][key] if redundant else torch.zeros(len(s), dtype=torch.bool, device=s.device)
            now[l][key] = prune.lowest(s, before, int(n * (period + 1) / n_periods + 0.5))
            new[l][key] = now[l][key] & ~before
    return now, new


def group_items(model, groups):
    """(block, module, axis, slots, key, index of the groups) per slice of the groups (G1, G3; key/value heads go at
    compaction): axis 0 rows of W0 and B, 1 columns of W0 and A; head_dim slots per head."""
    for l, g in groups.items():
        block, index = model.model.layers[l], {k: g[k].nonzero()[:, 0] for k in ("heads", "channels")}
        hd = block.self_attn.head_dim
        head_slots = (index["heads"][:, None] * hd + torch.arange(hd, device=index["heads"].device)).flatten()
        for name, module in prune.projections(block):
            key, axis = prune.COUPLED[name]
            if key != "kv" and len(index[key]):
                yield block, module, axis, head_slots if key == "heads" else index[key], key, index[key]


def lora_factor(module, axis):
    """The LoRA factor coupled to W0's slices on that axis: B (rows), A (columns); None without an adapter."""
    return (module.lora_B if axis == 0 else module.lora_A) if isinstance(module, LoRALinear) else None


def take(t, axis, slots):
    """The slots of t on axis as a (len(slots), other) float32 matrix: rows, or columns transposed (a view, whose
    layout fixes the order of the sums over it)."""
    return (t[slots] if axis == 0 else t[:, slots].T).float()


def put(t, axis, slots, value):
    """Write value, in take's layout, into the slots of t on axis."""
    if axis == 0:
        t[slots] = value.to(t.dtype)
    else:
        t[:, slots] = value.T.to(t.dtype)


def lora_part(module, axis, slots):
    """s B A on the slots in take's layout (what the adapter adds to W0 there); 0 without an adapter."""
    if not isinstance(module, LoRALinear) or module.merged:
        return 0.0
    B = module.lora_B * module.rank_mask
    return module.scale * (B[slots] @ module.lora_A if axis == 0 else (B @ module.lora_A[:, slots]).T)


@torch.no_grad()
def scale_groups(model, groups, factor):
    """Scale the groups' slices of W0 and of the LoRA factor coupled to them, so W0 + s B A there, by `factor`."""
    for _, module, axis, slots, _, _ in group_items(model, groups):
        for t in (module.weight, lora_factor(module, axis)):
            if t is not None:
                put(t, axis, slots, take(t, axis, slots) * factor)


@torch.no_grad()
def halfspace_project(model, groups, t, period_steps, eps=0.05):
    """(S3) at step t of T_p with lambda_g = ||x_g|| / (T_p - t), the ramp's pace: x_g <- x~_g, or 0 where x~_g
    crossed the half-space (and at t = T_p - 1); the LoRA slices are folded into x_g, so zeroed."""
    items = [(m, axis, slots, (block, key), take(m.weight, axis, slots).reshape(len(index), -1),
              lora_part(m, axis, slots)) for block, m, axis, slots, key, index in group_items(model, groups)]
    xx, xd = {}, {}  # per (block, kind): ||x_g||^2 and x_g . [s B A]_g, summed over the coupled slices
    for _, _, _, g, x, d in items:
        xx[g] = xx.get(g, 0) + x.pow(2).sum(1)
        if torch.is_tensor(d):
            xd[g] = xd.get(g, 0) + (x * d.reshape(len(x), -1)).sum(1)
    for m, axis, slots, g, x, d in items:
        sq = xx[g]
        lam = sq.sqrt() / (period_steps - t)
        trial_dot = sq + xd.get(g, 0) - lam * sq.sqrt()  # x~ . x
        zero = (trial_dot < eps * sq) | (sq == 0) | (t >= period_steps - 1)  # (S3) the half-space test
        d = d.reshape(len(x), -1) if torch.is_tensor(d) else 0.0
        trial = x + d - (lam / sq.sqrt().clamp_min(1e-30))[:, None] * x  # (S3) x~
        put(m.weight, axis, slots, torch.where(zero[:, None], 0.0, trial).reshape(len(slots), -1))
        factor = lora_factor(m, axis)
        if factor is not None:  # the LoRA part now lives in x_g
            put(factor, axis, slots, take(factor, axis, slots) * 0.0)


@torch.no_grad()
def lhspg_step(model, redundant, shrinking, t, period_steps, variant="ramp", eps=0.05):
    """After optimizer.step() at step t of a period: earlier periods' groups held at zero, this period's shrunk by the
    ramp (S2, the default: zero at the period's end, nothing to tune, as LoRAShear's code) or the half-space (S3)."""
    if variant not in LHSPG_VARIANTS:
        raise ValueError(f"LHSPG variant {variant!r}: choose from {LHSPG_VARIANTS}")
    if not 0 <= t < period_steps:
        raise ValueError(f"step {t} lies outside the period of {period_steps} steps")
    scale_groups(model, {l: {k: redundant[l][k] & ~shrinking[l][k] for k in g} for l, g in redundant.items()}, 0.0)
    if variant == "ramp":
        scale_groups(model, shrinking, (period_steps - t - 1) / (period_steps - t))  # (S2)
    else:
        halfspace_project(model, shrinking, t, period_steps, eps)


@torch.no_grad()
def restart_adapters(model, generator=None):
    """(S4) W0 <- W0 + s B A, then B = 0 and A drawn afresh as LoRALinear draws it: the same function. Clear the
    optimizer's state afterwards (its moments were the old A's and B's)."""
    for name, m in lora_modules(model).items():
        if m.merged:
            raise ValueError(f"{name}: the adapter is merged already; unmerge_lora(model) first")
        m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
        m.lora_B.zero_()
        torch.nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5), generator=generator)


@torch.no_grad()
def redundant_masks(model, redundant):
    """Mask the redundant groups for prune.compact; after LHSPG they are zero, so nothing computed changes."""
    prune.add_masks(model)
    for l, g in redundant.items():
        model.model.layers[l].self_attn.head_mask[g["heads"]] = 0.0
        model.model.layers[l].mlp.channel_mask[g["channels"]] = 0.0
    return model


@torch.no_grad()
def groups_max_abs(model, groups):
    """The largest |entry| of W0 + s B A over the groups' slices: exactly 0.0 once LHSPG has zeroed them."""
    return max((take(prune.effective_weight(m), axis, slots).abs().max().item()
                for _, m, axis, slots, _, _ in group_items(model, groups)), default=0.0)


# ----------------------------------------------------------------------------- (S5) dynamic knowledge recovery
def recovery_shares(degradation, floor=0.05):
    """(S5) p_i = floor + (1 - n floor) d_i / sum_j d_j, d_i = max(0, degradation_i); equal where none degraded."""
    n = len(degradation)
    if not 0 <= floor <= 1 / n:
        raise ValueError(f"recovery floor must lie in [0, 1/{n}] for {n} sources, got {floor}")
    d = {k: max(0.0, float(v)) for k, v in degradation.items()}
    total = sum(d.values())
    return {k: floor + (1 - n * floor) * (v / total if total > 0 else 1 / n) for k, v in d.items()}


def recovery_counts(degradation, n_batches, floor=0.05):
    """n_batches * recovery_shares, rounded by largest remainder (ties: the source listed first)."""
    exact = {k: p * n_batches for k, p in recovery_shares(degradation, floor).items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:n_batches - sum(counts.values())]:
        counts[k] += 1
    return counts


# ----------------------------------------------------------------------------- the loops
def sampler(name, split, masked, seq_len, seed):
    """batch(batch_size, device) -> (x, y): random windows of data/<name>/<split>.bin, y = -1 where its loss mask
    leaves a token out."""
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}: LoRAShear reads train and val only, never an evaluation set")
    tokens, rng = prune.token_file(name, split), np.random.default_rng(seed)
    mask = np.memmap(Path(tokens.filename).with_name(f"{split}_mask.bin"), dtype=np.uint8, mode="r") if masked else None

    def batch(batch_size, device):
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))
        x, y = w[:, :-1], w[:, 1:].clone()
        if mask is not None:
            y[torch.from_numpy(np.stack([mask[s + 1:s + seq_len + 1] == 0 for s in starts]))] = -1
        return x.to(device), y.to(device)
    return batch


def backward(model, batch, ctx, used, stage, source):
    """LoRA's forward and backward on batch (x, y), gradients clipped to norm 1, its tokens counted; the loss."""
    entry = used.setdefault(stage, {}).setdefault(source, {"tokens": 0, "loss_tokens": 0, "batches": 0})
    entry["tokens"], entry["batches"] = entry["tokens"] + batch[0].numel(), entry["batches"] + 1
    entry["loss_tokens"] += int((batch[1] != -1).sum())
    model.train()
    with ctx:
        _, loss = model(*batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
    return loss.item()


def lhspg(model, cfg, plan, mixture, used, ctx, log):
    """(S2-S4) T_w warm-up steps on the stage-1 sources in turn, then the periods: saliency (L3) after each backward,
    next_redundant at a period's start, lhspg_step after each step, restart_adapters at its end. The redundant set."""
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=0.0)
    names, average, redundant = list(mixture), None, None
    for step in range(cfg.warmup + cfg.periods * cfg.period_steps):
        period, t = divmod(step - cfg.warmup, cfg.period_steps)
        if step >= cfg.warmup and t == 0:
            redundant, shrinking = next_redundant(average, redundant, plan, period, cfg.periods)
        name = names[step % len(names)]
        stage = "lhspg_warmup" if step < cfg.warmup else "lhspg_periods"
        loss = backward(model, mixture[name](cfg.batch_size, cfg.device), ctx, used, stage, name)
        average = prune.loraprune_update(model, average)
        optimizer.step()
        if step >= cfg.warmup:
            lhspg_step(model, redundant, shrinking, t, cfg.period_steps, cfg.variant, cfg.eps)
        optimizer.zero_grad(set_to_none=True)
        if step == cfg.warmup - 1:
            log(f"LoRA warm-up: {cfg.warmup} steps, last loss {loss:.4f}")
        if step >= cfg.warmup and t == cfg.period_steps - 1:
            zero = groups_max_abs(model, redundant)
            restart_adapters(model, torch.Generator(device=cfg.device).manual_seed(cfg.seed + period))
            optimizer.state.clear()  # the moments of the old adapters
            n_red = sum(int(g["heads"].sum()) + int(g["channels"].sum()) for g in redundant.values())
            log(f"LHSPG period {period + 1}/{cfg.periods}: {n_red} groups redundant, largest |weight| left on them "
                f"{zero:.1e}; last loss {loss:.4f}; adapters merged and restarted")
            if zero != 0.0:
                raise RuntimeError(f"LHSPG left {zero} on a redundant group at the end of period {period + 1}")
    return redundant


def recover(model, cfg, stage, val, dense, used, ctx, log):
    """(S5) One stage of dynamic knowledge recovery; its rounds (val losses, degradation, batches drawn)."""
    sources = {name: sampler(name, "train", masked, cfg.seq_len, cfg.seed + 10 * i + (stage == "stage2"))
               for i, (name, masked) in enumerate(STAGES[stage].items())}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=0.0)
    snapshot = lambda: [p.detach().clone() for p in lora_parameters(model)]  # every A and B
    rng, rounds, best, best_state, bad = np.random.default_rng(cfg.seed), [], float("inf"), snapshot(), 0
    for r in range(cfg.max_rounds + 1):
        losses = {name: mean_loss(model, val[name]) for name in sources}
        degradation = {name: losses[name] - dense[name] for name in sources}
        mean_val = sum(losses.values()) / len(losses)
        rounds.append(dict(round=r, val_loss=losses, degradation=degradation, mean_val_loss=mean_val))
        log(f"{stage} round {r}: val loss " + ", ".join(f"{n} {v:.4f} (+{degradation[n]:.4f})"
                                                        for n, v in losses.items()))
        best, best_state, bad = (mean_val, snapshot(), 0) if mean_val < best - 1e-4 else (best, best_state, bad + 1)
        if bad >= cfg.patience or r == cfg.max_rounds:  # a plateau (or the round budget): stop
            break
        counts = rounds[-1]["batches"] = recovery_counts(degradation, cfg.round_batches, cfg.floor)
        for name in rng.permutation([name for name, n in counts.items() for _ in range(n)]):
            backward(model, sources[name](cfg.batch_size, cfg.device), ctx, used, stage, str(name))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the best adapters, merged into the base; the next stage starts fresh ones
        for p, kept in zip(lora_parameters(model), best_state):
            p.copy_(kept)
    restart_adapters(model)
    log(f"{stage}: best mean val loss {best:.4f} after {len(rounds) - 1} rounds")
    return rounds


# ----------------------------------------------------------------------------- the run and its command line
def shear(model, cfg, val, used, ctx, log):
    """(S1) on the dense model, then LoRA with LHSPG (S2-S4) and compaction: what the results file keeps of them."""
    stage1 = list(STAGES["stage1"].items())
    kda_sources = [sampler(name, "val", masked, cfg.seq_len, 2000 + i) for i, (name, masked) in enumerate(stage1)]
    kda_batches = [kda_sources[i % len(kda_sources)](cfg.batch_size, cfg.device) for i in range(cfg.kda_batches)]
    with ctx:
        kda = knowledge_distribution(model, kda_batches, cfg.kda_ratios, cfg.gamma)
    log(f"knowledge distribution: {len(kda['nodes'])} node groups, unprunable {kda['unprunable']}")
    plan, planned = prune.prune_plan(model, cfg.sparsity, kept_layers=(), kept_nodes=kda["unprunable"])
    apply_lora(model, r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.05)
    used["kda"] = {"val": {"tokens": sum(x.numel() for x, _ in kda_batches), "batches": len(kda_batches)}}
    mixture = {name: sampler(name, "train", masked, cfg.seq_len, cfg.seed + i) for i, (name, masked) in enumerate(stage1)}
    redundant = lhspg(model, cfg, plan, mixture, used, ctx, log)
    with ctx:
        zeroed = mean_loss(model, val["stage1"]["pydocs"])
        prune.compact(redundant_masks(model, redundant))
        compacted = mean_loss(model, val["stage1"]["pydocs"])
    return dict(kda=kda, plan={str(l): list(plan.get(l, (0, 0))) for l in range(len(model.model.layers))},
                planned=planned, lhspg_zeroed_loss=zeroed, compacted_loss=compacted)


def run(cfg):
    """shear, then (S5); the model folder, the results file (the analysis beside it) and, with --eval, the row."""
    t0, lines, used = time.time(), [], {}

    def log(msg):
        lines.append(msg)
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    torch.manual_seed(cfg.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda") else nullcontext()
    model = Transformer.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    val = {stage: {name: [sampler(name, "val", masked, cfg.seq_len, 1000 + i)(cfg.batch_size, cfg.device)
                          for _ in range(cfg.val_batches)] for i, (name, masked) in enumerate(sources.items())}
           for stage, sources in STAGES.items()}  # fixed: they measure the dense model, each round and the plateau
    with ctx:
        dense = {stage: {name: mean_loss(model, b) for name, b in v.items()} for stage, v in val.items()}
    log(f"dense val losses: {json.dumps(dense)}")
    dense_params, found = prune.count_params(model), shear(model, cfg, val, used, ctx, log)
    params, layers, output = prune.count_params(model), model.model.layers, Path(cfg.output)
    log(f"compacted: {params:,} of {dense_params:,} parameters left ({1 - params / dense_params:.2%} removed, planned "
        f"{found['planned']:.2%}); pydocs val loss {found['lhspg_zeroed_loss']:.4f} zeroed, "
        f"{found['compacted_loss']:.4f} compacted")
    rounds = {stage: recover(model, cfg, stage, val[stage], dense[stage], used, ctx, log) for stage in STAGES}
    tokens = {stage: sum(v["tokens"] for v in per.values()) for stage, per in used.items()}
    info = dict(method="lorashear", variant=cfg.variant, target_sparsity=cfg.sparsity, planned_sparsity=found["planned"],
                achieved_sparsity=1 - params / dense_params, params_before=dense_params, params_after=params,
                unprunable=found["kda"]["unprunable"], tokens=tokens, source=str(cfg.model), settings=vars(cfg))
    prune.save_pruned(model, cfg.out_dir, cfg.model, info)
    result = dict(info, kda=found["kda"], plan=found["plan"], dense_val_loss=dense,
                  lhspg_zeroed_loss=found["lhspg_zeroed_loss"], compacted_loss=found["compacted_loss"],
                  recovery=rounds, tokens_used=used, heads=[b.self_attn.n_head for b in layers],
                  widths=[b.mlp.down_proj.in_features for b in layers], log=lines, seconds=time.time() - t0)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    output.with_name(f"{output.stem}-kda.json").write_text(json.dumps(found["kda"], indent=1) + "\n")
    log(f"wrote {cfg.out_dir} and {output}; tokens per stage {tokens}")
    if not cfg.eval:
        return log("its row of the table (experiments/table_structured.py): rerun with --eval")
    sys.path.insert(0, str(ROOT / "experiments"))
    import table_structured  # the table's evaluation, the same as every other row's
    limits = {k: getattr(cfg, k) for k in ("limit", "ppl_pages", "ppl_windows") if getattr(cfg, k) is not None}
    train_tokens = sum(tokens[stage] for stage in tokens if stage != "kda")  # the analysis reads val batches only
    table_structured.evaluate(cfg.out_dir, cfg.name, train_tokens=train_tokens, **limits)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of all parameters to remove (0.2, 0.5)")
    p.add_argument("--scale", default="cpu-small", choices=sorted(SCALES))
    p.add_argument("--variant", default="ramp", choices=LHSPG_VARIANTS, help="LHSPG's shrink (lhspg_step)")
    p.add_argument("--eps", type=float, default=0.05, help="the half-space variant's epsilon")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    p.add_argument("--out_dir", type=Path, help="the pruned model folder (default out/lorashear/<name>)")
    p.add_argument("--output", type=Path, help="the run's results file (default results/lorashear/<name>.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="run eval.py on the result (as experiments/table_structured.py does)")
    p.add_argument("--limit", type=int, help="zero-shot rows per task (0: all; default: the table's)")
    p.add_argument("--ppl_pages", type=int, help="WikiText-2 pages, word perplexity (default: the table's)")
    p.add_argument("--ppl_windows", type=int, help="WikiText-2 windows, token perplexity (default: the table's)")
    for key, value in SCALES["cpu-small"].items():
        p.add_argument(f"--{key}", type=type(value), default=None, help="overrides the scale's value")
    renamed(p, {"--out": "--out_dir", "--results": "--output"})
    cfg = p.parse_args(argv)
    for key, value in SCALES[cfg.scale].items():
        setattr(cfg, key, value if getattr(cfg, key) is None else getattr(cfg, key))
    for key in ("seq_len", "batch_size", "kda_batches", "warmup", "periods", "period_steps", "val_batches", "patience",
                "lora_r"):
        if getattr(cfg, key) < 1:
            p.error(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.sparsity < 1:
        p.error(f"--sparsity must lie in [0, 1), got {cfg.sparsity}")
    cfg.name = f"lorashear{'' if cfg.variant == 'ramp' else '_' + cfg.variant}-{cfg.sparsity:g}"
    cfg.out_dir = str(cfg.out_dir or ROOT / "out" / "lorashear" / cfg.name)
    cfg.output, cfg.model = str(cfg.output or ROOT / "results" / "lorashear" / f"{cfg.name}.json"), str(cfg.model)
    try:  # what would fail after the slow work fails now
        cfg.kda_ratios = [float(r) for r in cfg.kda_ratios.split(",")]
        prune.check_out(cfg.out_dir, cfg.model)
        for name in dict.fromkeys(name for stage in STAGES.values() for name in stage):  # the data are prepared
            prune.token_file(name, "train"), prune.token_file(name, "val")
    except (ValueError, OSError) as e:
        bad_ratios = isinstance(cfg.kda_ratios, str)  # (still the text: it did not parse)
        p.error(f"--kda_ratios {cfg.kda_ratios!r}: expected numbers separated by commas" if bad_ratios else str(e))
    run(cfg)


if __name__ == "__main__":
    main()

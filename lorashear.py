"""
LoRAShear (docs/ALGORITHMS.md §3) on prune.py's groups (G1-G3), masks and compaction; it reads train and val splits
only, never an evaluation set.
  (S1) knowledge distribution: each node group (a layer's attention or MLP) thinned alone, least salient groups first
  (S2) LHSPG: P periods of T_p steps; each adds the least salient groups of all layers (saliency per parameter) to the
       redundant set, then shrinks them: the ramp scales them by (T_p - t - 1) / (T_p - t) at each step t
  (S3) half-space: x~ = x + s B A - lambda_g x / ||x||, zeroed when x~ . x < eps ||x||^2 (or at the period's end)
  (S4) at a period's end: merge s B A into W0 and restart the adapters; compaction then removes the zero groups
  (S5) recovery, LoRA on text, then on instruction data: each source's share of the batches follows its degradation

    python lorashear.py --sparsity 0.2 [--scale cpu-small|gpu] [--variant ramp|halfspace] [--selection global|uniform]
writes the model folder --out_dir (default out/lorashear/<name>) and the results --output (default
results/lorashear/<name>.json; the analysis beside it as <name>-kda.json, for plot_kda.py); --eval adds its row.
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
from data import tokens
from lora import LoRALinear, apply_lora, lora_modules, lora_parameters
from model import Transformer

ROOT = Path(__file__).resolve().parent
LHSPG_VARIANTS, SELECTIONS = ("ramp", "halfspace"), ("global", "uniform")
KINDS = (("attn", "heads"), ("mlp", "channels"))  # a node group's kind, the groups it holds
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
# Groups: {(layer, "heads" | "channels"): bool mask (n_head,) or (width,)}; scores in prune.py's format.


# ----------------------------------------------------------------------------- (S1) knowledge distribution
@torch.no_grad()
def mean_loss(model, batches):
    """prune.batch_loss averaged over batches, in eval mode (the model is left in it): every measurement of a run."""
    return sum(prune.batch_loss(model.eval(), b).item() for b in batches) / len(batches)


def knowledge_distribution(model, batches, ratios=(0.1, 0.3, 0.5), gamma=0.1, scores=None):
    """(S1) Per node group and ratio: mean_loss with the round(ratio * n) least salient of its n heads / channels masked
    (default saliency: LoRAPrune's (L1-L3) over the batches); the round(gamma * nodes) most sensitive are unprunable."""
    scores = prune.structured_scores(model.eval(), "loraprune", batches) if scores is None else scores
    saved = [tuple(None if m is None else m.clone() for m in (b.self_attn.head_mask, b.mlp.channel_mask))
             for b in model.model.layers]
    prune.add_masks(model)
    base, nodes = mean_loss(model, batches), []
    try:
        for l, block in enumerate(model.model.layers):
            for (kind, key), mask in zip(KINDS, (block.self_attn.head_mask, block.mlp.channel_mask)):
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


# ----------------------------------------------------------------------------- (S2) the redundant groups
def no_groups(scores):
    return {(l, k): torch.zeros(len(s[k]), dtype=torch.bool, device=s[k].device) for l, s in scores.items()
            for k in ("heads", "channels")}


def next_global(scores, redundant, budget, nodes):
    """(S2) One ranking of every prunable group of every layer by saliency per parameter, I_g / p_g: the lowest join
    the redundant set (None at first) until it holds `budget` parameters, each node keeping its most salient live
    group. Returns (the redundant set, this period's new groups)."""
    before = redundant or no_groups(scores)
    now, ratios, costs, where, held = {k: m.clone() for k, m in before.items()}, [], [], [], 0
    for (l, key), p in nodes.items():
        ratio, gone = scores[l][key].float().cpu() / p, before[l, key].cpu()
        held += p * int(gone.sum())
        free = ~gone
        free[torch.where(gone, float("-inf"), ratio).argmax()] = False  # the node's most salient live group stays
        ratios.append(ratio[free])
        costs.append(torch.full((int(free.sum()),), p))
        where += [((l, key), i) for i in free.nonzero()[:, 0].tolist()]
    order = torch.cat(ratios).argsort(stable=True)  # (S2) the one ranking, lowest first
    spent = torch.cat(costs)[order].cumsum(0)
    n = 0 if budget <= held else int(torch.searchsorted(spent, torch.tensor(math.ceil(budget - held)))) + 1
    if n > len(order):
        raise ValueError(f"sparsity out of reach: {math.ceil(budget):,} parameters must go, but the prunable node "
                         f"groups hold {held + int(spent[-1:].sum()):,} with one head and one channel left in each")
    for node, i in (where[i] for i in order[:n].tolist()):
        now[node][i] = True
    return now, {k: now[k] & ~before[k] for k in now}


def next_uniform(scores, redundant, plan, period, n_periods):
    """(S2, --selection uniform) In every layer of the plan (prune.prune_plan: one ratio everywhere), the least
    salient groups join the redundant set until it holds round(n (period + 1) / n_periods) of the plan's n."""
    before = redundant or no_groups(scores)
    now = {(l, key): prune.lowest(scores[l][key], before[l, key], int(n * (period + 1) / n_periods + 0.5))
           for l, counts in plan.items() for key, n in zip(("heads", "channels"), counts)}
    return now, {k: now[k] & ~before[k] for k in now}


def per_layer(groups, n_layer):
    """{"layer": [heads, channels]} of a set of groups, every layer listed."""
    count = lambda l, key: int(groups[l, key].sum()) if (l, key) in groups else 0
    return {str(l): [count(l, "heads"), count(l, "channels")] for l in range(n_layer)}


# ----------------------------------------------------------------------------- (S2-S4) LHSPG
def slices(model, groups):
    """Per coupled slice of the groups (G1, G3; key/value heads go at compaction): (node, number of groups, slots, W0
    and its LoRA factor with the slices as rows, W0 and B or W0^T and A^T (views that write through), the adapter's
    s B A there as rows). head_dim slots per head."""
    for (l, key), mask in groups.items():
        block, index = model.model.layers[l], mask.nonzero()[:, 0]
        hd = block.self_attn.head_dim
        slots = (index[:, None] * hd + torch.arange(hd, device=index.device)).flatten() if key == "heads" else index
        for name, m in prune.projections(block):
            if prune.COUPLED[name][0] != key or not len(index):
                continue
            if not isinstance(m, LoRALinear) or m.merged:
                raise ValueError(f"layer {l} {name}: LHSPG works on W0 and its LoRA adapter; apply_lora first (unmerged)")
            B, A = m.lora_B * m.rank_mask, m.lora_A
            if prune.COUPLED[name][1] == 0:  # rows of W0 go with rows of B
                yield (l, key), len(index), slots, m.weight, m.lora_B, m.scale * B[slots] @ A
            else:  # columns of W0 go with columns of A
                yield (l, key), len(index), slots, m.weight.T, m.lora_A.T, m.scale * A.T[slots] @ B.T


@torch.no_grad()
def scale_groups(model, groups, factor):
    """Scale the groups' slices of W0 and of the LoRA factor coupled to them, so W0 + s B A there, by `factor`."""
    for _, _, slots, w, f, _ in slices(model, groups):
        for t in (w, f):
            t[slots] = (t[slots].float() * factor).to(t.dtype)


@torch.no_grad()
def halfspace_project(model, groups, t, period_steps, eps=0.05):
    """(S3) at step t: x~ = x + [s B A]_g - lambda_g x / ||x||, lambda_g = sqrt(p_g) max_h RMS(x_h) / (T_p - t) (group
    lasso's weights; the group of largest RMS reaches zero at the period's end, smaller ones sooner); x <- 0 where
    x~ . x < eps ||x||^2 or t = T_p - 1, else x <- x~. The LoRA slices are zeroed: their part is now in x."""
    items = [(node, slots, w, f, w[slots].float().reshape(n, -1), part.reshape(n, -1))
             for node, n, slots, w, f, part in slices(model, groups)]
    xx, xd, size = {}, {}, {}  # per node: ||x_g||^2, x_g . [s B A]_g and p_g over the coupled slices
    for node, _, _, _, x, d in items:
        xx[node], xd[node] = xx.get(node, 0) + x.pow(2).sum(1), xd.get(node, 0) + (x * d).sum(1)
        size[node] = size.get(node, 0) + x.shape[1]
    lam = max([(xx[g] / size[g]).sqrt().max().item() for g in xx], default=0.0) / (period_steps - t)
    for node, slots, w, f, x, d in items:
        norm, lam_g = xx[node].sqrt(), lam * size[node] ** 0.5
        zero = (xx[node] + xd[node] - lam_g * norm < eps * xx[node]) | (norm == 0) | (t >= period_steps - 1)  # (S3)
        trial = x + d - (lam_g / norm.clamp_min(1e-30))[:, None] * x  # (S3) x~
        w[slots] = torch.where(zero[:, None], 0.0, trial).reshape(len(slots), -1).to(w.dtype)
        f[slots] = 0.0


@torch.no_grad()
def lhspg_step(model, redundant, shrinking, t, period_steps, variant="ramp", eps=0.05):
    """After optimizer.step() at step t of a period: earlier periods' groups held at zero, this period's shrunk by the
    ramp (S2, the default: zero at the period's end, as LoRAShear's code) or the half-space step (S3)."""
    if variant not in LHSPG_VARIANTS:
        raise ValueError(f"LHSPG variant {variant!r}: choose from {LHSPG_VARIANTS}")
    if not 0 <= t < period_steps:
        raise ValueError(f"step {t} lies outside the period of {period_steps} steps")
    scale_groups(model, {k: g & ~shrinking[k] if k in shrinking else g for k, g in redundant.items()}, 0.0)
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


# ----------------------------------------------------------------------------- (S5) dynamic knowledge recovery
def recovery_counts(degradation, n_batches, floor=0.05):
    """(S5) n_batches p_i, p_i = floor + (1 - n floor) d_i / sum_j d_j, d_i = max(0, degradation_i) (equal shares where
    none degraded), rounded to whole batches by largest remainder (ties: the source listed first)."""
    n = len(degradation)
    if not 0 <= floor <= 1 / n:
        raise ValueError(f"recovery floor must lie in [0, 1/{n}] for {n} sources, got {floor}")
    d = {k: max(0.0, float(v)) for k, v in degradation.items()}
    total = sum(d.values())
    exact = {k: (floor + (1 - n * floor) * (v / total if total > 0 else 1 / n)) * n_batches for k, v in d.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:n_batches - sum(counts.values())]:
        counts[k] += 1
    return counts


# ----------------------------------------------------------------------------- the loops
def sampler(name, split, masked, seq_len, seed):
    """batch(batch_size, device) -> (x, y): new random windows of data/<name>/<split>.bin at each call (data/tokens.py),
    y = -1 where a masked source's loss mask leaves a token out."""
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}: LoRAShear reads train and val only, never an evaluation set")
    (folder, meta), g = tokens.prepared(name), torch.Generator().manual_seed(seed)
    return lambda batch_size, device: tuple(t.to(device) for t in tokens.windows(
        folder, dict(meta, masked=masked), split, batch_size, seq_len, g))


def backward(model, batch, ctx, used, stage, source):
    """LoRA's forward and backward on batch (x, y), gradients clipped to norm 1, its tokens counted; the loss."""
    entry = used.setdefault(stage, {}).setdefault(source, {"tokens": 0, "loss_tokens": 0, "batches": 0})
    entry["tokens"], entry["batches"] = entry["tokens"] + batch[0].numel(), entry["batches"] + 1
    entry["loss_tokens"] += int((batch[1] != -1).sum())
    with ctx:
        _, loss = model.train()(*batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora_parameters(model), 1.0)
    return loss.item()


def lhspg(model, cfg, choose, mixture, used, ctx, log):
    """(S2-S4) T_w warm-up steps on the stage-1 sources in turn, then the periods: saliency (L3) after each backward,
    choose(saliency, redundant, period) at a period's start, lhspg_step after each step, restart_adapters at its end."""
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=0.0)
    names, average, redundant, chosen = list(mixture), None, None, []
    for step in range(cfg.warmup + cfg.periods * cfg.period_steps):
        period, t = divmod(step - cfg.warmup, cfg.period_steps)
        if step >= cfg.warmup and t == 0:
            redundant, shrinking = choose(average, redundant, period)
            chosen.append(per_layer(shrinking, len(model.model.layers)))
            log(f"LHSPG period {period + 1}/{cfg.periods} shrinks (layer: heads/channels) " + ", ".join(
                f"{l}: {h}/{c}" for l, (h, c) in chosen[-1].items() if h or c))
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
            zero = max(((w[slots].float() + part).abs().max().item() for _, _, slots, w, _, part in  # W0 + s B A
                        slices(model, redundant)), default=0.0)
            restart_adapters(model, torch.Generator(device=cfg.device).manual_seed(cfg.seed + period))
            optimizer.state.clear()  # the moments of the old adapters
            log(f"LHSPG period {period + 1}/{cfg.periods}: {sum(int(g.sum()) for g in redundant.values())} groups "
                f"redundant, largest |weight| left on them {zero:.1e}; last loss {loss:.4f}; adapters merged, restarted")
            if zero != 0.0:
                raise RuntimeError(f"LHSPG left {zero} on a redundant group at the end of period {period + 1}")
    return redundant, chosen


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
        log(f"{stage} round {r}: val loss " + ", ".join(f"{n} {v:.4f} (+{degradation[n]:.4f})" for n, v in losses.items()))
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
    """(S1) with fresh adapters, then LHSPG (S2-S4) and compaction: what the results file keeps of them."""
    stage1 = list(STAGES["stage1"].items())
    kda_sources = [sampler(name, "val", masked, cfg.seq_len, 2000 + i) for i, (name, masked) in enumerate(stage1)]
    kda_batches = [kda_sources[i % len(kda_sources)](cfg.batch_size, cfg.device) for i in range(cfg.kda_batches)]
    used["kda"] = {"val": {"tokens": sum(x.numel() for x, _ in kda_batches), "batches": len(kda_batches)}}
    apply_lora(model, r=cfg.lora_r, alpha=2 * cfg.lora_r, dropout=0.05)  # B = 0: the same function
    with ctx:
        kda = knowledge_distribution(model, kda_batches, cfg.kda_ratios, cfg.gamma)
    log(f"knowledge distribution: {len(kda['nodes'])} node groups, unprunable {kda['unprunable']}")
    total, layers = prune.count_params(model), model.model.layers
    if cfg.selection == "uniform":
        plan, _ = prune.prune_plan(model, cfg.sparsity, kept_layers=(), kept_nodes=kda["unprunable"])
        choose = lambda scores, redundant, p: next_uniform(scores, redundant, plan, p, cfg.periods)
    else:
        fixed, budget = {(int(l), kind) for l, kind in kda["unprunable"]}, cfg.sparsity * total
        nodes = {(l, key): prune.group_params(block)[key] for l, block in enumerate(layers)  # the prunable node groups
                 for kind, key in KINDS if (l, kind) not in fixed}
        choose = lambda scores, redundant, p: next_global(scores, redundant, budget * (p + 1) / cfg.periods, nodes)
        choose(prune.random_scores(model), None, cfg.periods - 1)  # an unreachable target fails now (any scores do)
    mixture = {name: sampler(name, "train", masked, cfg.seq_len, cfg.seed + i) for i, (name, masked) in enumerate(stage1)}
    redundant, periods = lhspg(model, cfg, choose, mixture, used, ctx, log)
    plan = per_layer(redundant, len(layers))
    planned = sum(h * prune.group_params(b)["heads"] + c * prune.group_params(b)["channels"]
                  for (h, c), b in zip(plan.values(), layers)) / total
    with ctx:
        zeroed = mean_loss(model, val["stage1"]["pydocs"])
        prune.add_masks(model)  # the redundant groups masked (they are zero: nothing computed changes) and removed
        for (l, key), g in redundant.items():
            (layers[l].self_attn.head_mask if key == "heads" else layers[l].mlp.channel_mask)[g] = 0.0
        prune.compact(model)
        compacted = mean_loss(model, val["stage1"]["pydocs"])
    return dict(kda=kda, plan=plan, periods=periods, planned=planned, lhspg_zeroed_loss=zeroed, compacted_loss=compacted)


def held_out(cfg):
    """{stage: {source: val_batches successive draws of its sampler}}: fixed, they measure every model of the run."""
    draws = lambda source: [source(cfg.batch_size, cfg.device) for _ in range(cfg.val_batches)]
    return {stage: {name: draws(sampler(name, "val", masked, cfg.seq_len, 1000 + i))
                    for i, (name, masked) in enumerate(sources.items())} for stage, sources in STAGES.items()}


def run(cfg):
    """shear, then (S5); the model folder, the results file (the analysis beside it) and, with --eval, the row."""
    t0, lines, used = time.time(), [], {}

    def log(msg):
        lines.append(msg)
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    torch.manual_seed(cfg.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda") else nullcontext()
    model = Transformer.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    val = held_out(cfg)
    with ctx:
        dense = {stage: {name: mean_loss(model, b) for name, b in v.items()} for stage, v in val.items()}
    log(f"dense val losses: {json.dumps(dense)}")
    dense_params, found = prune.count_params(model), shear(model, cfg, val, used, ctx, log)
    params, layers, output = prune.count_params(model), model.model.layers, Path(cfg.output)
    log(f"compacted: {params:,} of {dense_params:,} parameters left ({1 - params / dense_params:.2%} removed, planned "
        f"{found['planned']:.2%}); pydocs val loss {found['lhspg_zeroed_loss']:.4f} zeroed, "
        f"{found['compacted_loss']:.4f} compacted")
    rounds = {stage: recover(model, cfg, stage, val[stage], dense[stage], used, ctx, log) for stage in STAGES}
    n_tokens = {stage: sum(v["tokens"] for v in per.values()) for stage, per in used.items()}
    info = dict(method="lorashear", variant=cfg.variant, selection=cfg.selection, target_sparsity=cfg.sparsity,
                planned_sparsity=found["planned"], achieved_sparsity=1 - params / dense_params,
                params_before=dense_params, params_after=params, unprunable=found["kda"]["unprunable"],
                tokens=n_tokens, source=str(cfg.model), settings=vars(cfg))
    prune.save_pruned(model, cfg.out_dir, cfg.model, info)
    result = dict(info, kda=found["kda"], plan=found["plan"], periods=found["periods"], dense_val_loss=dense,
                  lhspg_zeroed_loss=found["lhspg_zeroed_loss"], compacted_loss=found["compacted_loss"],
                  recovery=rounds, tokens_used=used, heads=[b.self_attn.n_head for b in layers],
                  widths=[b.mlp.down_proj.in_features for b in layers], log=lines, seconds=time.time() - t0)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    output.with_name(f"{output.stem}-kda.json").write_text(json.dumps(found["kda"], indent=1) + "\n")
    log(f"wrote {cfg.out_dir} and {output}; tokens per stage {n_tokens}")
    if not cfg.eval:
        return log("its row of the table (experiments/table_structured.py): rerun with --eval")
    sys.path.insert(0, str(ROOT / "experiments"))
    import table_structured  # the table's evaluation, the same as every other row's
    limits = {k: getattr(cfg, k) for k in ("limit", "ppl_pages", "ppl_windows") if getattr(cfg, k) is not None}
    train_tokens = sum(n_tokens[stage] for stage in n_tokens if stage != "kda")  # the analysis reads val batches only
    table_structured.evaluate(cfg.out_dir, cfg.name, train_tokens=train_tokens, **limits)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--sparsity", type=float, default=0.2, help="fraction of all parameters to remove (0.2, 0.5)")
    p.add_argument("--scale", default="cpu-small", choices=sorted(SCALES))
    p.add_argument("--variant", default="ramp", choices=LHSPG_VARIANTS, help="LHSPG's shrink (lhspg_step)")
    p.add_argument("--selection", default="global", choices=SELECTIONS, help="next_global or next_uniform (S2)")
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
    cfg.name = "lorashear" + "".join(f"_{v}" for v in (cfg.variant, cfg.selection) if v not in ("ramp", "global")) + \
        f"-{cfg.sparsity:g}"
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

"""
Everything that removes structure (shared/docs/ALGORITHMS.md):
  1. PrunedLoRA: rank pruning of LoRA adapters during fine-tuning, and its baselines.
  2. Structured pruning of the base model: dependency groups of a LLaMA block (query heads with GQA,
     MLP channels), their importance (LoRAPrune, LLM-Pruner, Wanda-sp, magnitude, random), masks and
     real compaction.
  3. LoRAShear: knowledge distribution analysis, LHSPG (progressive zeroing of redundant groups while LoRA
     trains), the sampler of dynamic knowledge recovery.
The training loop calls these as plain functions: score -> choose -> update -> mask.
"""
import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear, lora_modules
from model import Transformer

# ============================================================================ 1. PrunedLoRA: rank pruning
# Component j of an adapter is column j of B with row j of A. Every adapter starts at rank r0; every K1
# optimizer steps after `rank_start` it loses K2 components (`uniform`), or the K2 * n_adapters lowest
# scores over all adapters go (`global`), until the target rank. A pruned component is zeroed, masked
# (rank_mask = 0, so its gradient is zero) and its AdamW state cleared: it never comes back. The loop:
#     state = rank_prune_state()
#     after each micro-batch backward:  accumulate_fisher(model, state, micro_step, grad_accum, batch_size)
#     after each optimizer step:        log = rank_prune_step(model, optimizer, step, cfg, state, heldout)
#     after training:                   slice_adapters(model); save_adapter(model, folder)
# The quadratic model, per row w of B (a vector over the active components S) with gradient g:
#     dL(d) ~ g.d + 1/2 d^T F d,   F (|S| x |S|) an empirical Fisher shared by the rows.
# `prunedlora` (the default) estimates F and g from the micro-batch gradients since the last event and
# scores a component by the model's value of the update that removes it: a loss change, so adapters
# compare. `prunedlora_paper` is the paper's formula, whose F is built from the very gradient it then
# inverts and is not in loss units (ALGORITHMS.md §1): kept for an honest reproduction row.
# The recovery defaults follow the prototype there: the compensation alone (recovery_lr 0; the Newton part
# -F^-1 g made the loss jump), inside a trust region tau = 0.1, on B only (the score's side: compensating
# on A as well would make up for the removal twice).
RANK_METHODS = ("prunedlora", "prunedlora_paper", "obs", "activation_obs", "magnitude", "taylor", "adalora", "random")
RANK_DEFAULTS = dict(
    rank_method="prunedlora",  # one of RANK_METHODS (obs: prunedlora with the gradient term off, g = 0)
    rank_target=8,             # final rank of every adapter (uniform), mean final rank (global)
    rank_every=10,             # K1: a pruning event every K1 optimizer steps (the paper's best 10) ...
    rank_k=2,                  # K2: ... removing K2 components per adapter (the paper's best 2)
    rank_start=0,              # statistics restart at this step; the first event is K1 steps later
    rank_allocation="uniform",  # uniform | global
    rank_floor=1,              # global: no adapter goes below this rank (peft needs r >= 1)
    rank_recovery=True,        # move the surviving components to compensate (False: score only)
    rank_recovery_lr=0.0,      # share of the Newton step -F^-1 g in the update (0: compensation only)
    rank_tau=0.1,              # trust region: a row's survivors move by <= tau * |row|; <= 0: none
    rank_recovery_side="B",    # B | AB: the factors that compensate (AB compensates the removal twice)
    rank_damp=0.01,            # damping: this fraction of the mean diagonal of F (SparseGPT)
    rank_seed=0,               # for `random`
    rank_ranking_test=True,    # at the first event (given a held-out batch): ranking_test on one adapter
)


STATISTICS = ("fisher_B", "fisher_A", "grad_B", "grad_A")  # the sums an event averages over steps (and processes)


def rank_prune_state(seed=0, sides="B"):
    """What the scores need, per adapter (dicts keyed by module name): sums since the last event. sides: the
    factors whose sums are kept, "B" (the scores' side) or "AB" (for rank_recovery_side="AB")."""
    if sides not in ("B", "AB"):
        raise ValueError(f"sides {sides!r}: expected 'B' or 'AB'")
    return dict(n_micro=0, batch_size=1, fisher_B={}, fisher_A={}, grad_B={}, grad_A={}, act={}, last_grad={},
                ipt={}, generator=torch.Generator().manual_seed(seed), ranked=False, sides=sides)


def reset_statistics(state):
    """Start the sums since the last event afresh (the step's gradient and AdaLoRA's averages stay)."""
    state["n_micro"] = 0
    for key in (*STATISTICS, "act"):
        state[key].clear()


def adapter_groups(mods, stack=True):
    """[(names)]: the adapters whose factors have the same shapes (one projection in every layer). The statistics
    and the events handle a group as one stack: a few ops per group, not per adapter (on a GPU each op is a
    kernel launch, and each read of a result waits for every launch before it). stack=False: one adapter per
    group, for a CPU's events: there an op costs microseconds, and one adapter's temporaries stay in the cache
    where a group's do not (the README's PrunedLoRA cost paragraph: `scripts/event_ops.py`)."""
    groups = {}
    for name, m in mods.items():
        groups.setdefault((m.lora_B.shape, m.lora_A.shape) if stack else name, []).append(name)
    return [tuple(names) for names in groups.values()]


def stacked(tensors):
    return torch.stack(list(tensors)).float()


def rank_masks(mods, names):
    """(n, r): 1 at the active components of the adapters `names`, 0 at the pruned ones."""
    return stacked(mods[name].rank_mask for name in names)


@torch.no_grad()
def accumulate_fisher(model, state, micro_step=0, loss_scale=1.0, batch_size=1):
    """Call after every micro-batch backward. micro_step: the micro-batch's index in the optimizer step
    (0: .grad holds this micro-batch alone; later: the increment since the previous call is used);
    loss_scale: what the loop divided the loss by (gradient accumulation steps); batch_size: sequences
    per micro-batch. Adds the micro-batch gradient G and G^T G (B: its rows are the samples), G G^T (A:
    its columns are) to the sums of state["sides"]. Under DDP the last micro-batch's increment also holds the
    other processes' gradients (averaged in its backward): an approximation; rank_prune_step averages the sums.
    Each group of adapter_groups goes together: batched products and multi-tensor adds."""
    mods = {name: m for name, m in lora_modules(model).items()
            if m.lora_B.grad is not None and m.lora_A.grad is not None}
    if not mods:
        raise ValueError("accumulate_fisher: no LoRA adapter has a gradient; call it after the micro-batch's backward")
    for names in adapter_groups(mods):
        grads = [stacked(getattr(mods[name], f"lora_{side}").grad for name in names) for side in "BA"]  # copies
        for i, side in enumerate("BA"):
            if side not in state["sides"]:
                continue
            d = grads[i]  # (n, out, r) for B, (n, r, in) for A
            if micro_step > 0:  # the increment since the previous micro-batch (none before it: all of it)
                d = d - torch.stack([state["last_grad"][name][i] if name in state["last_grad"] else torch.zeros_like(g)
                                     for name, g in zip(names, d)])
            d = d * loss_scale if loss_scale != 1 else d  # the gradient of this micro-batch's mean loss
            rows = d if side == "B" else d.mT  # (n, samples, r)
            for key, value in ((f"grad_{side}", d), (f"fisher_{side}", rows.mT @ rows)):
                sums = [state[key].get(name) for name in names]
                if all(t is not None for t in sums):
                    torch._foreach_add_(sums, list(value.unbind(0)))
                else:
                    for name, v, t in zip(names, value, sums):
                        state[key][name] = v.clone() if t is None else t.add_(v)
        for name, b, a in zip(names, *grads):  # in the end the step's gradient (paper, taylor, adalora)
            state["last_grad"][name] = (b, a)
    state["n_micro"] += 1
    state["batch_size"] = batch_size


@torch.no_grad()
def update_sensitivity(model, state, beta1=0.85, beta2=0.85):
    """AdaLoRA's smoothed sensitivity I_bar and uncertainty U_bar of every entry of A and B, with
    I = |theta * grad| of the step (AdaLoRA eq. 8-9); once per optimizer step."""
    for name, m in lora_modules(model).items():
        for p, g, key in zip((m.lora_B, m.lora_A), state["last_grad"].get(name, ()), "BA"):
            I = (p.float() * g).abs()
            I_bar, U_bar = state["ipt"].get((name, key), (torch.zeros_like(I), torch.zeros_like(I)))
            I_bar = beta1 * I_bar + (1 - beta1) * I
            U_bar = beta2 * U_bar + (1 - beta2) * (I - I_bar).abs()
            state["ipt"][(name, key)] = (I_bar, U_bar)


@torch.no_grad()
def activation_stats(model, batch, state):
    """Z Z^T over the tokens of batch (idx, targets) for every adapter, Z = A x its rank-space
    activations: SparseGPT's Hessian of the layer's output error (`activation_obs`)."""
    def hook(name):
        def fn(module, inputs, output):
            z = F.linear(inputs[0].to(module.lora_A.dtype), module.lora_A).reshape(-1, module.r).float()
            zz, n = state["act"].get(name, (0.0, 0))
            state["act"][name] = (zz + z.T @ z, n + z.shape[0])
        return fn
    handles = [m.register_forward_hook(hook(name)) for name, m in lora_modules(model).items()]
    try:
        heldout_loss(model, batch)
    finally:
        for h in handles:
            h.remove()


def active_ranks(mods):
    """{name: number of active components} of the adapters in `mods`, in one read of their masks."""
    return dict(zip(mods, torch.stack([m.rank_mask.sum() for m in mods.values()]).long().tolist()))


def in_place(op, tensors, others):
    """op (torch._foreach_add_ or _mul_) of every tensor with its slice of others (n, ...), broadcast to its
    shape: one multi-tensor op for the group (CUDA's fused one wants operands of the same shapes and strides;
    on a CPU it is a loop, which broadcasts)."""
    others = others.to(tensors[0].dtype)
    if tensors[0].is_cuda:
        others = others.expand(len(tensors), *tensors[0].shape).contiguous()
    op(tensors, list(others.unbind(0)))


def damped(H, frac, mask):
    """H + damp * I over the active components (damp = frac * their mean diagonal: SparseGPT's dampening; 1 where
    that is zero) and the identity over the pruned ones, whose rows and columns of H are zero. So H^-1 is
    block-diagonal too, and its active block is the inverse of H's active block. H (..., r, r), mask (..., r)."""
    damp = frac * (H.diagonal(dim1=-2, dim2=-1) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    return H + torch.diag_embed(torch.where(damp > 0, damp, 1.0) * mask + (1 - mask))


def curvature(mods, names, method, state, side="B", damp=0.01):
    """(W, G, H) of one factor of the same-shape adapters `names`, stacked: W (n, rows, r) the rows of B (side B)
    or the columns of A (side A), G its gradient, H (n, r, r) the damped curvature `method` uses. Over all r
    components, the pruned ones neutral (zero in W and G, apart in H: damped), so that what follows gives the
    active ones what it would over them alone. Inside a pruning event (state["event_cache"] set) each is
    computed once: the prediction, the scores and the recovery share it."""
    cache, key = state.get("event_cache"), (names, method, side, damp)
    if cache is None:
        return factor_curvature(mods, names, method, state, side, damp)
    if key not in cache:
        cache[key] = factor_curvature(mods, names, method, state, side, damp)
    return cache[key]


def factor_curvature(mods, names, method, state, side, damp):
    def rows(tensors):  # (n, rows, r): B as it is, A transposed (its columns are the rows)
        return stacked(tensors) if side == "B" else stacked(tensors).mT
    mask = rank_masks(mods, names)
    W = rows(mods[name].lora_B if side == "B" else mods[name].lora_A for name in names)
    if method == "prunedlora_paper":  # the step's own gradient, H = G^T G / n (PrunedLoRA)
        G = rows(state["last_grad"][name]["BA".index(side)] for name in names)
        H = G.mT @ G / G.shape[-2]
    elif method == "activation_obs" and side == "B":  # H_B = Z Z^T / n, Z = A x over calibration tokens
        G, H = torch.zeros_like(W), stacked(zz / n for zz, n in (state["act"][name] for name in names))
    elif state["n_micro"] == 0:
        raise ValueError(f"{method}: no gradients accumulated since the last pruning event; call "
                         f"accumulate_fisher(model, state, ...) after every micro-batch backward")
    elif side not in state["sides"]:
        raise ValueError(f"{method} on side {side}: its sums were not kept; make the state with "
                         f"rank_prune_state(sides='AB') for rank_recovery_side='AB'")
    else:
        n_micro = state["n_micro"]
        G = rows(state[f"grad_{side}"][name] for name in names) / n_micro  # the mean gradient since the last event
        # the per-sequence empirical Fisher: mean over micro-batches and rows of g g^T, times sequences per micro-batch
        H = stacked(state[f"fisher_{side}"][name] for name in names) * state["batch_size"] / (n_micro * W.shape[-2])
        G = torch.zeros_like(G) if method == "obs" else G
    # pruned components are zero in W and G already (zeroed and masked, so no gradient); their rows of H too
    return W, G, damped(H * mask[:, None, :] * mask[:, :, None], damp, mask)


def inverse(H):
    """H^-1 for the damped, so invertible, matrices here; unlike torch.linalg.inv it does not read back an error
    code, which on a GPU waits for every kernel queued before it."""
    return torch.linalg.inv_ex(H).inverse


def diagonal_row(M):
    """The diagonal of M (..., k, k) as a row, (..., 1, k)."""
    return M.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)


def lagrangian_scores(W, G, H):
    """Per component j: the sum over the rows w of W of the loss change 1/2 mu^2 [H^-1]_jj of the best
    update that zeroes w_j, mu = (w_j - (H^-1 g)_j) / [H^-1]_jj (PrunedLoRA's Lagrangian; G = 0:
    classical OBS, 1/2 w_j^2 / [H^-1]_jj). W, G (..., rows, k), H (..., k, k); returns (..., k)."""
    Hinv = inverse(H)
    hd = diagonal_row(Hinv)
    mu = (W - G @ Hinv) / hd  # H is symmetric: row i of G H^-1 is (H^-1 g_i)^T
    return (0.5 * mu ** 2 * hd).sum(-2)


def obs_updates(W, G, H, P, eta=1.0, tau=0.0, recovery=True):
    """For each set of components P[..., t, :] (a boolean mask over the k columns of W), the update
    D[..., :, t, :] of W that zeroes them: per row w with gradient g, minimise g.d + 1/2 d^T H d subject to
    (w + d)_Q = 0 (Q the set), with the Newton part scaled by eta (Lagrange):
        d = eta n - H^-1 E_Q mu,   n = -H^-1 g,   mu = [H^-1]_QQ^-1 (w_Q + eta n_Q)
    (Q = {j}, eta = 1: mu = (w_j - (H^-1 g)_j) / [H^-1]_jj, d = -H^-1 g - mu H^-1 e_j, the paper's update).
    [H^-1]_QQ is inverted as the k x k matrix equal to it on Q and to the identity off Q (mu is 0 there).
    tau > 0: the part on the surviving components is shrunk to norm <= tau * |w| (a trust region);
    recovery=False: the survivors do not move. W, G (..., rows, k), H (..., k, k), P (..., T, k).
    Returns D (..., rows, T, k), D[..., t, Q] = -w_Q exactly."""
    pruned = P.unsqueeze(-3)  # (..., 1, T, k)
    if not recovery:
        return torch.where(pruned, -W.unsqueeze(-2), 0.0)
    Hinv = inverse(H)
    on_QQ = P.unsqueeze(-1) & P.unsqueeze(-2)  # (..., T, k, k)
    H_QQ = torch.where(on_QQ, Hinv.unsqueeze(-3), torch.diag_embed((~P).to(W.dtype)))  # the identity off Q
    # in rows: d = n - (w + n) E_Q [H^-1]_QQ^-1 E_Q^T H^-1, one (rows, k) x (k, k) product per set
    K = inverse(H_QQ).masked_fill(~on_QQ, 0.0) @ Hinv.unsqueeze(-3)
    if eta == 0:  # compensation only (the default): n = 0
        D = -(W.unsqueeze(-3) @ K)
    else:
        n = -eta * G @ Hinv  # (..., rows, k): the Newton step, scaled
        D = n.unsqueeze(-3) - (W + n).unsqueeze(-3) @ K
    D = D.movedim(-3, -2).masked_fill(pruned, 0.0)  # (..., rows, T, k)
    if tau > 0:
        D = D * (tau * W.norm(dim=-1)[..., None, None] / D.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return torch.where(pruned, -W.unsqueeze(-2), D)


def quadratic_change(D, G, H):
    """g.d + 1/2 d^T H d summed over the rows: the loss change the quadratic model predicts for each of
    the updates D (..., rows, T, k). Returns (..., T)."""
    DH = (D.flatten(-3, -2) @ H).view_as(D)  # one (rows * T, k) x (k, k) product per stacked adapter
    return ((D * G.unsqueeze(-2)).sum(-1) + 0.5 * (DH * D).sum(-1)).sum(-2)


def removal_values(W, G, H, eta=0.0, tau=0.0, recovery=True):
    """quadratic_change(obs_updates(W, G, H, {j}, eta, tau, recovery)) for every single component j at
    once, in closed form, without the (rows, k, k) tensor of updates. Per row w, with h = H^-1 e_j,
    n = -eta H^-1 g, a = (w_j + n_j) / [H^-1]_jj, the survivors' part of the update is u = n - a h + w_j e_j,
    the trust region makes it t u, and d = t u - w_j e_j has the value
        g.d + 1/2 d^T H d = t g.u - w_j g_j + t^2/2 u^T H u - t w_j (H u)_j + w_j^2/2 H_jj,
    where (H h = e_j, H n = -eta g)  g.u = g.n - a (H^-1 g)_j + w_j g_j,  (H u)_j = -eta g_j - a + w_j H_jj,
        u^T H u = eta^2 g.H^-1 g + a^2 [H^-1]_jj + w_j^2 H_jj - 2 a n_j - 2 eta w_j g_j - 2 a w_j,
        |u|^2 = |n|^2 - 2 a (H^-1 n)_j + a^2 [H^-2]_jj - w_j^2.           W, G (..., rows, k); returns (..., k)."""
    Hinv = inverse(H)
    hd, WHd = diagonal_row(Hinv), W * diagonal_row(H)  # [H^-1]_jj, w_j H_jj
    # the value is c2 t^2 + c1 t + c0 in the trust region's factor t; c0 = w_j^2/2 H_jj - w_j g_j: the removal alone
    c0 = W * (0.5 * WHd - G)
    if not recovery:
        return c0.sum(-2)
    m = G @ Hinv  # (..., rows, k): row i is H^-1 g_i
    if eta == 0:  # compensation only (the default): n = 0, and a [H^-1]_jj = w_j shortens c2
        a = W / hd
        c1 = a * (W - m) + W * (G - WHd)
        c2 = 0.5 * W * (WHd - a)
    else:
        a = (W - eta * m) / hd
        gHg = (G * m).sum(-1, keepdim=True)
        c1 = a * (W - m) + W * ((1 + eta) * G - WHd) - eta * gHg  # g.u - w_j (H u)_j
        c2 = 0.5 * (eta ** 2 * gHg + a * (a * hd + 2 * eta * m - 2 * W) + W * (WHd - 2 * eta * G))  # u^T H u / 2
    if tau <= 0:
        return (c2 + c1 + c0).sum(-2)
    uu = a * a * (Hinv * Hinv).sum(-2, keepdim=True) - W * W  # |u|^2 without n; [H^-2]_jj: a column of H^-1 squared
    if eta != 0:
        uu = uu + eta * (eta * (m * m).sum(-1, keepdim=True) + 2 * a * (m @ Hinv))  # |n|^2 - 2 a (H^-1 n)_j
    t = (tau * W.norm(dim=-1, keepdim=True) / uu.clamp_min(0).sqrt().clamp_min(1e-30)).clamp(max=1.0)
    return (t * (t * c2 + c1) + c0).sum(-2)


@torch.no_grad()
def group_scores(mods, names, method, state, recovery=True, recovery_lr=0.0, tau=0.1, damp=0.01):
    """The score of every component of the same-shape adapters `names`, (n, r): low = prune first, +inf at
    the pruned ones."""
    def each(fn):  # fn(name) stacked over the group
        return stacked(fn(name) for name in names)
    if method in ("magnitude", "taylor"):
        B, A = each(lambda name: mods[name].lora_B), each(lambda name: mods[name].lora_A)
    if method == "magnitude":
        scores = B.norm(dim=-2) * A.norm(dim=-1)  # ||B[:, j]|| * ||A[j, :]||
    elif method == "random":  # one draw per active component, adapter after adapter
        active = rank_masks(mods, names).bool().cpu()
        draws = torch.rand(int(active.sum()), generator=state["generator"])
        scores = torch.zeros(active.shape).masked_scatter_(active, draws)
    elif method == "taylor":  # first-order Taylor (LLM-Pruner): |sum B[:, j] G_B[:, j]| + |sum A[j, :] G_A[j, :]|
        gB, gA = each(lambda name: state["last_grad"][name][0]), each(lambda name: state["last_grad"][name][1])
        scores = (B * gB).sum(-2).abs() + (A * gA).sum(-1).abs()
    elif method == "adalora":  # AdaLoRA: I_bar * U_bar summed over the component's entries
        IU_B, IU_A = (each(lambda name: torch.mul(*state["ipt"][(name, side)])) for side in "BA")
        scores = IU_B.sum(-2) + IU_A.sum(-1)
    elif method == "prunedlora_paper":  # the Lagrangian over the rows of B plus the columns of A
        scores = sum(lagrangian_scores(*curvature(mods, names, method, state, side, damp)) for side in "BA")
    elif method == "activation_obs":  # classical OBS with H_B = Z Z^T / n
        scores = lagrangian_scores(*curvature(mods, names, method, state, "B", damp))
    elif method in ("prunedlora", "obs"):
        # the score of record: the quadratic model's value of the update that removes j alone, with the
        # recovery settings of the run; B side only, as zeroing B[:, j] already removes the component
        scores = removal_values(*curvature(mods, names, method, state, "B", damp), recovery_lr, tau, recovery)
    else:
        raise ValueError(f"unknown rank pruning method {method!r}; choose from {RANK_METHODS}")
    mask = rank_masks(mods, names)
    return torch.where(mask > 0, scores.to(mask.device).float(), math.inf)


def rank_scores(mods, groups, method, state, **kw):
    """{group of names (adapter_groups): (n, r) scores}, +inf at the pruned components; kw as group_scores."""
    scores = {names: group_scores(mods, names, method, state, **kw) for names in groups}
    if torch.stack([s.isnan().any() for s in scores.values()]).any():  # one read for every adapter
        bad = [name for names, s in scores.items() for name, nan in zip(names, s.isnan().any(-1).tolist()) if nan]
        raise ValueError(f"{method}: a NaN score in {bad[0]}")
    return scores


def choose_components(scores, k, allocation="uniform", floor=1, budget=None):
    """{key: (..., r) scores, +inf at pruned components} -> {key: (..., r) bool, True at the components to
    prune}. uniform: the k lowest of every adapter; global: the k * n_adapters lowest over all adapters (at
    most `budget`), which makes ranks adaptive (the scores are loss changes, so they compare). No adapter goes
    below `floor` active components; ties go to the lower index."""
    if allocation not in ("uniform", "global"):
        raise ValueError(f"rank_allocation {allocation!r}: expected 'uniform' or 'global'")
    # a component's place in its adapter's order (0: the lowest), and how many the adapter may still lose
    place = {key: s.argsort(stable=True, dim=-1).argsort(dim=-1) for key, s in scores.items()}
    left = {key: s.isfinite().sum(-1, keepdim=True) - floor for key, s in scores.items()}
    if allocation == "uniform":
        return {key: place[key] < left[key].clamp(0, k) for key in scores}
    # global: of the components each adapter may lose (its lowest `left`), the n_prune lowest of all
    n_prune = k * sum(s[..., 0].numel() for s in scores.values())
    n_prune = n_prune if budget is None else min(n_prune, budget)
    flat = torch.cat([torch.where(place[key] < left[key], s, math.inf).flatten() for key, s in scores.items()])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.argsort(stable=True)[:n_prune]] = True
    chosen &= flat.isfinite()
    parts = chosen.split([s.numel() for s in scores.values()])
    return {key: part.view(s.shape) for (key, s), part in zip(scores.items(), parts)}


@torch.no_grad()
def apply_recovery(model, chosen, method, state, recovery_lr=0.0, tau=0.1, side="B", damp=0.01):
    """Move each adapter's surviving components by the update that compensates for removing its chosen
    ones ({group of names: (n, r) bool}) jointly (obs_updates, with the method's curvature, or the Fisher for
    scores that have none). The chosen components land at zero; prune_components then masks them."""
    mods = lora_modules(model)
    how = method if method in ("prunedlora_paper", "obs", "activation_obs") else "prunedlora"
    for names, P in chosen.items():
        # the active components move; an adapter with nothing chosen stays (with recovery_lr > 0 it would step)
        moves = rank_masks(mods, names)[:, None, :] * P.any(-1)[:, None, None]
        for sd in side:
            W, G, H = curvature(mods, names, how, state, sd, damp)
            D = obs_updates(W, G, H, P[:, None], recovery_lr, tau)[..., 0, :] * moves  # (n, rows, r)
            factors = [mods[name].lora_B if sd == "B" else mods[name].lora_A for name in names]
            in_place(torch._foreach_add_, factors, D if sd == "B" else D.mT)


@torch.no_grad()
def prune_components(model, optimizer, chosen):
    """Zero and mask the chosen components ({group of names: (n, r) bool}) and clear their optimizer state
    (AdamW's exp_avg, exp_avg_sq: the row of A, the column of B), so that they stay exactly zero."""
    mods = lora_modules(model)
    for names, P in chosen.items():
        keep = (~P).float()
        ms = [mods[name] for name in names]
        in_place(torch._foreach_mul_, [m.rank_mask for m in ms], keep)
        for params, k in (([m.lora_A for m in ms], keep[:, :, None]), ([m.lora_B for m in ms], keep[:, None, :])):
            in_place(torch._foreach_mul_, params, k)
            states = [optimizer.state.get(p, {}) if optimizer is not None else {} for p in params]
            for key in dict.fromkeys(key for s in states for key in s):  # AdamW: exp_avg, exp_avg_sq (step: a scalar)
                have = [i for i, (s, p) in enumerate(zip(states, params))
                        if torch.is_tensor(s.get(key)) and s[key].shape == p.shape]
                if have:
                    in_place(torch._foreach_mul_, [states[i][key] for i in have], k[have])


# --- measuring: does the predicted loss change match the actual one?
@torch.no_grad()
def heldout_loss(model, batch):
    was_training = model.training
    model.eval()
    _, loss = model(*batch)
    model.train(was_training)
    return loss.item()


def predicted_vs_actual(model, batch, event):
    """(predicted, actual) loss change on the held-out batch (idx, targets) of event(): a function that
    changes the model and returns the loss change it predicts."""
    before = heldout_loss(model, batch)
    predicted = event()
    return predicted, heldout_loss(model, batch) - before


def spearman(x, y):
    """Spearman's rank correlation of two sequences (without tie correction)."""
    rx, ry = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (x, y))
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def ranking_test(model, name, batch, state, method="prunedlora", n=16, recovery=True, **kw):
    """For n active components of adapter `name`, spread over its score order: the score (predicted)
    against the actual held-out loss change of removing only that one, with the recovery update of
    recovery, kw (recovery_lr, tau, damp); the adapter is restored after each. Once per run.
    Returns {"components", "predicted", "actual", "spearman"}."""
    mods = lora_modules(model)
    m, group = mods[name], (name,)
    scores = group_scores(mods, group, method, state, recovery, **kw)[0]  # +inf at the pruned
    n_active = int(m.rank_mask.count_nonzero())
    picks = scores.argsort()[torch.linspace(0, n_active - 1, min(n, n_active)).round().long()].tolist()
    saved = [t.detach().clone() for t in (m.lora_A, m.lora_B, m.rank_mask)]
    out = dict(components=picks, predicted=[], actual=[])
    for j in picks:
        chosen = {group: torch.arange(m.r, device=scores.device)[None] == j}  # (1, r): component j alone

        def event():
            if recovery:
                apply_recovery(model, chosen, method, state, side="B", **kw)
            prune_components(model, None, chosen)
            return scores[j].item()
        predicted, actual = predicted_vs_actual(model, batch, event)
        out["predicted"].append(predicted)
        out["actual"].append(actual)
        with torch.no_grad():
            for t, s in zip((m.lora_A, m.lora_B, m.rank_mask), saved):
                t.copy_(s)
    out["spearman"] = spearman(out["predicted"], out["actual"])
    return out


# --- the schedule
def average_over_processes(state):
    """Under DDP, replace each process's statistics by their mean over the processes, in place: one
    all-reduce of them all, flattened into one buffer (not one per adapter and statistic)."""
    if dist.is_available() and dist.is_initialized():
        sums = [t for key in STATISTICS for t in state[key].values()]
        if sums:
            flat = torch.cat([t.flatten() for t in sums])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            torch._foreach_copy_(sums, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in sums]), sums)])


def rank_prune_step(model, optimizer, step, cfg, state, batch=None):
    """Call after every optimizer step, step = optimizer steps done; cfg: RANK_DEFAULTS keys to override.
    On a pruning event: score -> choose -> recovery update -> mask, and return a log dict with the
    predicted and (given a held-out batch (idx, targets)) the actual loss change; otherwise None."""
    if set(cfg) - set(RANK_DEFAULTS):
        raise ValueError(f"unknown rank pruning settings {sorted(set(cfg) - set(RANK_DEFAULTS))}; "
                         f"known: {sorted(RANK_DEFAULTS)}")
    c = {key.removeprefix("rank_"): value for key, value in {**RANK_DEFAULTS, **cfg}.items()}
    if c["method"] not in RANK_METHODS:
        raise ValueError(f"rank_method {c['method']!r}: choose from {RANK_METHODS}")
    if c["recovery_side"] not in ("B", "AB"):
        raise ValueError(f"rank_recovery_side {c['recovery_side']!r}: expected 'B' or 'AB'")
    # the recovery's curvature comes from the sums of its side, except prunedlora_paper's (the step's gradient)
    if c["recovery"] and c["method"] != "prunedlora_paper" and not set(c["recovery_side"]) <= set(state["sides"]):
        raise ValueError(f"rank_recovery_side={c['recovery_side']!r} needs the statistics of A as well: make the "
                         f"state with rank_prune_state(sides={c['recovery_side']!r})")
    if c["method"] == "adalora":
        update_sensitivity(model, state)
    if step == c["start"]:  # statistics restart: those of the warmup are not the model's now
        reset_statistics(state)
    if step <= c["start"] or (step - c["start"]) % c["every"]:
        return None  # (before reading the masks: on a GPU every read would wait for the step to finish)
    mods = lora_modules(model)
    excess = sum(active_ranks(mods).values()) - c["target"] * len(mods)
    if excess <= 0:
        return None
    average_over_processes(state)  # every process must choose the same components
    if c["method"] == "activation_obs":
        if batch is None:
            raise ValueError("activation_obs needs calibration tokens: pass a held-out batch")
        activation_stats(model, batch, state)
    knobs = dict(recovery_lr=c["recovery_lr"], tau=c["tau"], damp=c["damp"])
    ranking = None
    if c["ranking_test"] and batch is not None and not state["ranked"]:
        name = list(mods)[len(mods) // 2]
        ranking = dict(adapter=name, **ranking_test(model, name, batch, state, c["method"], 16, c["recovery"], **knobs))
        state["ranked"] = True

    @torch.no_grad()
    def event():
        # the predicted change of every method: the Fisher's quadratic model (loss units) of the change of B
        groups = adapter_groups(mods, stack=next(iter(mods.values())).lora_A.device.type != "cpu")
        record = {names: curvature(mods, names, "prunedlora", state, "B", c["damp"])
                  for names in groups} if state["n_micro"] else None
        scores = rank_scores(mods, groups, c["method"], state, recovery=c["recovery"], **knobs)
        floor = c["target"] if c["allocation"] == "uniform" else c["floor"]
        chosen = choose_components(scores, c["k"], c["allocation"], floor, budget=excess)
        if c["recovery"]:
            apply_recovery(model, chosen, c["method"], state, side=c["recovery_side"], **knobs)
        if len(groups) == len(mods):  # one at a time (CPU); masking makes no temporaries: by groups of a shape
            rows = {name: row for names, P in chosen.items() for name, row in zip(names, P)}
            chosen = {names: torch.stack([rows[name] for name in names]) for names in adapter_groups(mods, stack=True)}
        prune_components(model, optimizer, chosen)
        if record is None:
            return math.nan
        changes = [quadratic_change((stacked(mods[name].lora_B for name in names) - W).unsqueeze(-2), G, H).sum()
                   for names, (W, G, H) in record.items()]
        return torch.stack(changes).sum(dtype=torch.float64).item()

    state["event_cache"] = {}  # until the masks, the adapters' active components and factors stay put
    try:
        predicted, actual = predicted_vs_actual(model, batch, event) if batch is not None else (event(), math.nan)
    finally:
        del state["event_cache"]
    reset_statistics(state)
    ranks = active_ranks(mods)
    return dict(step=step, pruned=excess - sum(r - c["target"] for r in ranks.values()), predicted=predicted,
                actual=actual, ranking=ranking, ranks=ranks, rank_mean=sum(ranks.values()) / len(ranks),
                rank_min=min(ranks.values()), rank_max=max(ranks.values()))


def rank_schedule_end(r0, cfg):
    """The optimizer step of the last pruning event of a uniform schedule from rank r0: train past it."""
    c = {**RANK_DEFAULTS, **cfg}
    return c["rank_start"] + c["rank_every"] * math.ceil(max(0, r0 - c["rank_target"]) / c["rank_k"])


@torch.no_grad()
def slice_adapters(model):
    """Cut A and B down to their active components: exact final ranks (s unchanged, alpha = s * r), which
    save_adapter writes as they are. After training: an optimizer would still hold the old tensors."""
    for name, m in lora_modules(model).items():
        keep = m.rank_mask.bool()
        if not keep.any():
            raise ValueError(f"{name}: every rank component is pruned; nothing to keep")
        if not keep.all():
            m.lora_A = nn.Parameter(m.lora_A[keep].clone(), requires_grad=m.lora_A.requires_grad)
            m.lora_B = nn.Parameter(m.lora_B[:, keep].clone(), requires_grad=m.lora_B.requires_grad)
            m.rank_mask = m.rank_mask[keep].clone()
            m.alpha = m.scale * (math.sqrt(m.r) if m.rslora else m.r)
    return model


# ============================================================================ 2. Structured pruning of the base
# The groups of a LLaMA block (ALGORITHMS.md §4), in a layer with head size hd:
#   query head h      rows h*hd:(h+1)*hd of q_proj (and of its LoRA B), the same columns of o_proj (and of its
#                     LoRA A);
#   key/value head g  rows g*hd:(g+1)*hd of k_proj and v_proj (and of their LoRA B); it goes when every query
#                     head that reads it has gone (with whole_groups: together with them, as one group);
#   MLP channel c     row c of gate_proj and up_proj (and of their LoRA B), column c of down_proj (and of its A).
# While training, a pruned group is masked (model.py's head_mask / channel_mask: its output is zero, base and
# LoRA alike); compact() then removes it for real and leaves an ordinary, smaller model whose config records
# the per-layer widths. Sparsity = the fraction of ALL parameters removed (embeddings included, LoRA excluded).
# Scores: {layer: {"heads": (n_head,), "kv": (n_kv_head,), "channels": (width,)}}, higher = more important.
COUPLED = {  # projection -> (the kind of group its slices belong to, the weight's axis they lie on: 0 rows, 1 columns)
    "q_proj": ("heads", 0), "k_proj": ("kv", 0), "v_proj": ("kv", 0), "o_proj": ("heads", 1),
    "gate_proj": ("channels", 0), "up_proj": ("channels", 0), "down_proj": ("channels", 1)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def projections(block):
    """(name, module) of a block's seven linear layers (plain or LoRALinear), in COUPLED's order."""
    return [(name, getattr(block.mlp if kind == "channels" else block.self_attn, name))
            for name, (kind, _) in COUPLED.items()]


def add_masks(model):
    """All-ones head and channel masks in every layer (existing masks are kept). They are buffers, so a training
    checkpoint carries them: call this before loading such a checkpoint into a fresh model."""
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if attn.head_mask is None:
            attn.head_mask = torch.ones(attn.n_head, device=attn.q_proj.weight.device)
        if mlp.channel_mask is None:
            mlp.channel_mask = torch.ones(mlp.down_proj.in_features, device=mlp.down_proj.weight.device)
    return model


def count_params(model):
    """Parameters of the base model, a tied embedding once, LoRA excluded: what sparsity is a fraction of."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)


def masked_params(model):
    """The number of parameters compact() would remove under the current masks."""
    hidden, removed = model.config.hidden_size, 0
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if attn.head_mask is not None:
            live = attn.head_mask > 0
            kv_gone = attn.n_kv_head - attn.kv_index[live].unique().numel()
            removed += 2 * attn.head_dim * hidden * (int((~live).sum()) + kv_gone)  # q rows + o columns; k + v rows
        if mlp.channel_mask is not None:
            removed += 3 * hidden * int((mlp.channel_mask == 0).sum())  # gate row, up row, down column
    return removed


# ----------------------------------------------------------------------------- how many groups go where
def default_kept_layers(n_layer):
    """LoRAPrune's rule (§2), used for every method so that they compare: the first 10% of the layers and the
    last layer stay whole."""
    return sorted(set(range(n_layer // 10)) | {n_layer - 1})


def prune_plan(model, sparsity, kept_layers=None, whole_groups=False):
    """Turn a target sparsity into the number of groups to remove per layer, {layer: (heads, channels)} (heads
    counts GQA groups with whole_groups): the same ratio rho in every prunable layer (round(rho * count)), rho
    chosen so that the removed fraction of all parameters is the closest to the target, every layer keeping at
    least one head (group) and one channel. Returns (plan, planned fraction). Without whole_groups the plan
    counts key/value heads as kept; compaction also removes those whose query heads all went, so the achieved
    fraction can be a little higher: count_params after compact() is the truth."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1) (the fraction of all parameters to remove), got {sparsity}")
    n_layer = len(model.model.layers)
    kept = set(default_kept_layers(n_layer) if kept_layers is None else kept_layers)
    hidden, total = model.config.hidden_size, count_params(model)
    sizes = {}  # layer -> (heads or groups, parameters of one, channels)
    for l, block in enumerate(model.model.layers):
        if l in kept:
            continue
        attn, head = block.self_attn, 2 * block.self_attn.head_dim * hidden  # a query head: q rows + o columns
        if whole_groups and not attn.uniform_gqa:
            raise ValueError(f"whole_groups needs even GQA groups; layer {l} maps its query heads to key/value "
                             f"heads {attn.kv_index.tolist()}")
        group = attn.n_head // attn.n_kv_head
        sizes[l] = ((attn.n_kv_head, (group + 1) * head) if whole_groups else (attn.n_head, head)) \
            + (block.mlp.down_proj.in_features,)

    def plan_at(rho):
        return {l: (int(rho * n + 0.5), int(rho * width + 0.5)) for l, (n, _, width) in sizes.items()}

    def removed(plan):
        return sum(h * sizes[l][1] + c * 3 * hidden for l, (h, c) in plan.items())

    steps = 4 * max([width for *_, width in sizes.values()], default=1)
    best = most = {l: (0, 0) for l in sizes}
    target = sparsity * total
    for k in range(1, steps):  # removed() grows with rho: stop where a layer would lose everything
        plan = plan_at(k / steps)
        if any(h >= sizes[l][0] or c >= sizes[l][2] for l, (h, c) in plan.items()):
            break
        most = plan
        if abs(removed(plan) - target) < abs(removed(best) - target):
            best = plan
    if target - removed(most) > 0.001 * total:
        raise ValueError(f"sparsity {sparsity} is out of reach: with layers {sorted(kept)} kept whole and one head "
                         f"and one channel left in every other layer, at most {removed(most) / total:.4f} of the "
                         f"parameters can go")
    return best, removed(best) / total


def lowest(scores, already, k):
    """A bool mask of the k lowest scores, the `already` ones first (a pruned group never comes back)."""
    order = torch.where(already, float("-inf"), scores.float()).argsort(stable=True)
    drop = torch.zeros_like(already)
    drop[order[:max(k, int(already.sum()))]] = True
    return drop


@torch.no_grad()
def choose_masks(model, scores, plan, whole_groups=False):
    """Mask, in every layer of the plan, its lowest-scoring heads (or GQA groups) and channels."""
    add_masks(model)
    for l, (n_heads, n_channels) in plan.items():
        attn, mlp, s = model.model.layers[l].self_attn, model.model.layers[l].mlp, scores[l]
        if whole_groups:  # a group's score: its key/value head's plus its query heads'
            group = s["kv"].float().index_add(0, attn.kv_index, s["heads"].float())
            live = torch.zeros(attn.n_kv_head, device=attn.head_mask.device).index_add(0, attn.kv_index, attn.head_mask)
            drop = lowest(group, live == 0, n_heads)[attn.kv_index]
        else:
            drop = lowest(s["heads"], attn.head_mask == 0, n_heads)
        attn.head_mask.copy_(~drop)
        mlp.channel_mask.copy_(~lowest(s["channels"], mlp.channel_mask == 0, n_channels))
    return model


# ----------------------------------------------------------------------------- compaction
def slice_linear(module, rows=None, cols=None):
    """Keep only `rows` (outputs) and/or `cols` (inputs) of a linear layer, and of its LoRA: B's rows, A's columns."""
    def cut(p, rows, cols):
        p = p if rows is None else p[rows]
        return nn.Parameter((p if cols is None else p[:, cols]).clone(), requires_grad=p.requires_grad)
    module.weight = cut(module.weight, rows, cols)
    module.out_features, module.in_features = module.weight.shape
    if isinstance(module, LoRALinear):
        module.lora_B, module.lora_A = cut(module.lora_B, rows, None), cut(module.lora_A, None, cols)


@torch.no_grad()
def compact(model):
    """Remove the masked groups for real, from the base weights and the LoRA matrices alike, and drop the masks:
    the result is an ordinary model of model.py (its config records the new per-layer widths, written as plain
    HF widths when every layer has the same), which save_pretrained / from_pretrained handle. An optimizer
    must be rebuilt afterwards: the parameters are new tensors."""
    kv_maps, widths = [], []
    add_masks(model)
    for l, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        heads = attn.head_mask.nonzero()[:, 0]
        if len(heads) == 0:
            raise ValueError(f"layer {l}: every attention head is masked; a layer needs at least one")
        kv_old = attn.kv_index[heads]
        kv_kept = kv_old.unique()  # sorted: a key/value head stays if a kept query head reads it
        kv_map = torch.searchsorted(kv_kept, kv_old)
        slots = lambda idx: (idx[:, None] * attn.head_dim + torch.arange(attn.head_dim, device=idx.device)).flatten()
        slice_linear(attn.q_proj, rows=slots(heads))
        slice_linear(attn.o_proj, cols=slots(heads))
        slice_linear(attn.k_proj, rows=slots(kv_kept))
        slice_linear(attn.v_proj, rows=slots(kv_kept))
        attn.n_head, attn.n_kv_head, attn.kv_index = len(heads), len(kv_kept), kv_map
        attn.uniform_gqa = kv_map.tolist() == even_kv_map(len(heads), len(kv_kept))
        channels = mlp.channel_mask.nonzero()[:, 0]
        if len(channels) == 0:
            raise ValueError(f"layer {l}: every MLP channel is masked; a layer needs at least one")
        slice_linear(mlp.gate_proj, rows=channels)
        slice_linear(mlp.up_proj, rows=channels)
        slice_linear(mlp.down_proj, cols=channels)
        attn.head_mask = mlp.channel_mask = None
        kv_maps.append(kv_map.tolist())
        widths.append(len(channels))
    set_widths(model.config, kv_maps, widths)
    return model


def even_kv_map(n_head, n_kv_head):
    """The map of an unpruned GQA layer (query head h reads key/value head h // group), None if groups are uneven."""
    return [h // (n_head // n_kv_head) for h in range(n_head)] if n_head % n_kv_head == 0 else None


def set_widths(cfg, kv_maps, widths):
    """Record per-layer widths in the config; widths every layer shares become the plain HF ones, so a uniformly
    pruned folder also loads in transformers."""
    n_head, n_kv_head = len(kv_maps[0]), max(kv_maps[0]) + 1
    if all(m == kv_maps[0] for m in kv_maps) and kv_maps[0] == even_kv_map(n_head, n_kv_head):
        cfg.n_head, cfg.n_kv_head, cfg.layer_kv_map = n_head, n_kv_head, None
    else:
        cfg.layer_kv_map = kv_maps
    if len(set(widths)) == 1:
        cfg.intermediate_size, cfg.layer_intermediate = widths[0], None
    else:
        cfg.layer_intermediate = widths
    cfg.validate("pruned config")


# ----------------------------------------------------------------------------- importance of the groups
def effective_weight(module):
    """W0 + s B A: the weight a plain or (unmerged) LoRA linear layer applies, in float32."""
    w = module.weight.float()
    if isinstance(module, LoRALinear) and not module.merged:  # one pass over W: W0 + s (B diag(mask)) A
        w = torch.addmm(w, (module.lora_B * module.rank_mask).float(), module.lora_A.float(), alpha=module.scale)
    return w


def group_sums(model, element_importance):
    """Sum an element importance, element_importance(module) -> a tensor shaped like module.weight (or None: the
    module adds nothing), over each group's slice of every coupled matrix."""
    scores = {}
    for l, block in enumerate(model.model.layers):
        attn, width = block.self_attn, block.mlp.down_proj.in_features
        dev = attn.q_proj.weight.device
        s = {"heads": torch.zeros(attn.n_head, device=dev), "kv": torch.zeros(attn.n_kv_head, device=dev),
             "channels": torch.zeros(width, device=dev)}
        for name, module in projections(block):
            kind, axis = COUPLED[name]
            e = element_importance(module)
            if e is not None:
                per_slot = e.float().sum(1 - axis)  # (rows,) or (columns,)
                s[kind] += per_slot.view(-1, 1 if kind == "channels" else attn.head_dim).sum(1)
        scores[l] = s
    return scores


@torch.no_grad()
def magnitude_scores(model):
    """The squared L2 norm of each group's weights (ranks as the L2 norm does)."""
    return group_sums(model, lambda m: effective_weight(m) ** 2)


def random_scores(model, seed=0):
    """Uniform random scores: the sanity floor every criterion must beat."""
    g = torch.Generator().manual_seed(seed)
    return {l: {"heads": torch.rand(b.self_attn.n_head, generator=g),
                "kv": torch.rand(b.self_attn.n_kv_head, generator=g),
                "channels": torch.rand(b.mlp.down_proj.in_features, generator=g)} for l, b in enumerate(model.model.layers)}


def batch_loss(model, batch):
    """Mean next-token loss of a (B, T + 1) batch of token ids."""
    return model(batch[:, :-1], targets=batch[:, 1:])[1]


@torch.no_grad()
def wanda_scores(model, batches):
    """Wanda, structured (§5): element importance |W_ij| * ||X_j||_2, with X_j the j-th input feature of the
    layer over all calibration tokens, summed over each group."""
    sq_norms, hooks = {}, []

    def record(module, args, output):
        x = args[0].float().flatten(0, -2)  # (tokens, in)
        sq_norms[module] = sq_norms.get(module, 0) + x.pow(2).sum(0)

    for block in model.model.layers:
        hooks += [module.register_forward_hook(record) for _, module in projections(block)]
    try:
        for batch in batches:
            batch_loss(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return group_sums(model, lambda m: effective_weight(m).abs() * sq_norms[m].sqrt())  # Wanda eq. (1): |W| ||X||


def taylor_scores(model, batches, order="first"):
    """LLM-Pruner (§5), one shot: element importance |W * G|, G the true gradient of the base weight W (mean
    over the calibration batches), summed over each group. order "second": |W * F * W| / 2 with the diagonal
    Fisher F = mean over batches of G_b^2; "mixed": |W G - W F W / 2| (LLM-Pruner's element-wise estimate
    with both terms)."""
    if order not in ("first", "second", "mixed"):
        raise ValueError(f"taylor order must be 'first', 'second' or 'mixed', got {order!r}")
    modules = [m for block in model.model.layers for _, m in projections(block)]
    was_trainable = [m.weight.requires_grad for m in modules]
    grad = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in modules}
    fisher = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in modules} if order != "first" else None
    try:
        for m in modules:
            m.weight.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(batch_loss(model, batch), [m.weight for m in modules])
            for m, g in zip(modules, grads):
                grad[m] += g.float() / len(batches)
                if fisher is not None:
                    fisher[m] += g.float() ** 2 / len(batches)
    finally:
        for m, flag in zip(modules, was_trainable):
            m.weight.requires_grad_(flag)

    def element(m):
        w = m.weight.float()
        first = w * grad[m]  # first-order Taylor term: dL/dW * W
        if order == "first":
            return first.abs()
        second = w * fisher[m] * w / 2  # second-order term with the diagonal-Fisher Hessian
        return second.abs() if order == "second" else (first - second).abs()
    with torch.no_grad():
        return group_sums(model, element)


# ----------------------------------------------------------------------------- LoRAPrune (§2)
@torch.no_grad()
def loraprune_grad_estimate(module):
    """The gradient of W0 estimated from the adapter's alone: one SGD step of unit rate on A and B changes s B A
    by -s (G_B A + B G_A - G_B G_A), so G_W ~ s (G_B A + B G_A - G_B G_A). None without an adapter or gradients."""
    if not isinstance(module, LoRALinear) or module.lora_A.grad is None or module.lora_B.grad is None:
        return None
    A, B, gA, gB = module.lora_A.float(), module.lora_B.float(), module.lora_A.grad.float(), module.lora_B.grad.float()
    # LoRAPrune: G_W ~ s (G_B A + B G_A - G_B G_A) = s [G_B, B - G_B] [A; G_A], one product of inner size 2r
    return (module.scale * torch.cat([gB, B - gB], 1)) @ torch.cat([A, gA], 0)


@torch.no_grad()
def loraprune_update(model, average=None, beta=0.9):
    """Call once per optimizer step, after backward: this step's group importance, from the element importance
    (G_W * (W0 + s B A))^2 (the public code uses the absolute value), folded into the moving average
    I_bar = beta * I_bar + (1 - beta) * I (LoRAPrune, lambda = 0.9). Returns the new average."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("LoRAPrune scores base weights through their LoRA adapters: apply_lora first")

    def element(module):
        grad_w = loraprune_grad_estimate(module)
        return None if grad_w is None else grad_w.mul_(effective_weight(module)).square_()  # LoRAPrune: (G_W * W)^2
    now = group_sums(model, element)
    if average is None:
        return now
    return {l: {k: beta * average[l][k].to(v.device) + (1 - beta) * v for k, v in now[l].items()} for l in now}


def cubic_sparsity(step, total_steps, final, initial=0.0, warmup=0.1, cooldown=0.1):
    """LoRAPrune's schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 between t0 = warmup * T and
    t1 = (1 - cooldown) * T; s_i before t0, s_f from t1 on."""
    t0, t1 = warmup * total_steps, (1 - cooldown) * total_steps
    if step <= t0 or t1 <= t0:
        return initial if step <= t0 else final
    if step >= t1:
        return final
    return final + (initial - final) * (1 - (step - t0) / (t1 - t0)) ** 3


def loraprune_step(model, average, step, total_steps, sparsity, every=10, kept_layers=None, whole_groups=False):
    """The training loop's call, once per optimizer step, after backward and before optimizer.step() (steps
    count from 0): update the importance average and, every `every` steps and at the last one, mask up to the
    scheduled sparsity.
    Returns the new average. At the end of training call compact(model) (then rebuild any optimizer)."""
    average = loraprune_update(model, average)
    if step % every == 0 or step == total_steps - 1:
        plan, _ = prune_plan(model, cubic_sparsity(step, total_steps, sparsity), kept_layers, whole_groups)
        choose_masks(model, average, plan, whole_groups)
    return average


def structured_scores(model, method, batches=None, seed=0, taylor="first"):
    """Group scores of one method, one shot. loraprune needs adapters (apply_lora) and averages over `batches`."""
    if method == "magnitude":
        return magnitude_scores(model)
    if method == "random":
        return random_scores(model, seed)
    if method in ("wanda", "llm_pruner", "loraprune") and not batches:
        raise ValueError(f"method {method!r} needs calibration batches")
    if method == "wanda":
        return wanda_scores(model, batches)
    if method == "llm_pruner":
        return taylor_scores(model, batches, taylor)
    if method == "loraprune":
        average = None
        for batch in batches:
            model.zero_grad(set_to_none=True)
            batch_loss(model, batch).backward()
            average = loraprune_update(model, average)
        model.zero_grad(set_to_none=True)
        return average
    raise ValueError(f"unknown method {method!r}; choose magnitude, random, wanda, llm_pruner or loraprune")


# ----------------------------------------------------------------------------- the one-shot command
def token_batches(source, n_tokens, seq_len=256, batch_size=8, seed=0, split="train"):
    """Random windows of seq_len + 1 tokens, in (batch, seq_len + 1) batches, from a token file written by
    data/<name>/prepare.py: `source` is a data set name (data/<source>/<split>.bin) or the path of a .bin file."""
    path, data = Path(source), Path(__file__).resolve().parent / "data"
    if path.suffix != ".bin":
        path = data / str(source) / f"{split}.bin"
    meta = path.parent / "meta.json"
    if not path.exists() or not meta.exists():
        known = ", ".join(sorted(p.parent.name for p in data.glob("*/prepare.py")))
        raise FileNotFoundError(f"{path}: no prepared tokens; " + (
            f"run `python data/{path.parent.name}/prepare.py` first" if (path.parent / "prepare.py").exists() else
            f"expected a data set name (one of {known}) or the path of a .bin file a prepare.py wrote"))
    data = np.memmap(path, dtype=json.loads(meta.read_text())["dtype"], mode="r")
    if len(data) <= seq_len + 1:
        raise ValueError(f"{path}: {len(data)} tokens, too few for windows of {seq_len + 1}")
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, max(1, n_tokens // seq_len))
    windows = torch.from_numpy(np.stack([data[s:s + seq_len + 1].astype(np.int64) for s in starts]))
    return list(windows.split(batch_size))


def check_out(out, source_dir):
    """Refuse an output folder whose replacement would lose something: anything but a missing or empty folder
    or an earlier result of save_pruned (it holds pruning.json), and the source model or a folder around it."""
    out, source = Path(out), Path(source_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there, not a folder")
    if out.resolve() in (source.resolve(), *source.resolve().parents, Path.cwd(), *Path.cwd().parents):
        raise ValueError(f"--out {out}: it is (or holds) the source model {source} or the current folder; "
                         f"choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "pruning.json").exists():
        raise ValueError(f"--out {out}: the folder exists and is not an earlier pruned model (no pruning.json); "
                         f"choose a new folder or empty it")


def save_pruned(model, out, source_dir, info, dtype=torch.bfloat16):
    """Write a model folder atomically (a temporary folder renamed into place), with the source's tokenizer files
    and `pruning.json` (how it was made). An earlier pruned model at `out` is replaced; check_out refuses the rest."""
    check_out(out, source_dir)
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, dtype)
    for f in TOKENIZER_FILES:
        if (Path(source_dir) / f).exists():
            shutil.copy(Path(source_dir) / f, tmp / f)
    (tmp / "pruning.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def layer_list(text, n_layer):
    """--keep_layers "0,1,29" -> [0, 1, 29], each a layer of the model."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--keep_layers {text!r}: expected layer numbers separated by commas") from None
    if any(not 0 <= k < n_layer for k in layers):
        raise ValueError(f"--keep_layers {text!r}: the model's layers are 0 to {n_layer - 1}")
    return layers


def main(argv=None):
    p = argparse.ArgumentParser(description="One-shot structured pruning (attention heads and MLP channels) of a "
                                "model folder, written as a smaller ordinary model folder.")
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--method", required=True, choices=("magnitude", "random", "wanda", "llm_pruner"))
    p.add_argument("--sparsity", type=float, required=True, help="fraction of all parameters to remove, in [0, 1)")
    p.add_argument("--calib", default="pydocs", help="data set name (data/<name>/train.bin) or a .bin token file")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--taylor", default="first", choices=("first", "second", "mixed"), help="llm_pruner's order")
    p.add_argument("--whole_groups", action="store_true", help="prune whole GQA groups (a kv head and its query heads)")
    p.add_argument("--keep_layers", default=None, help="comma-separated layers kept whole (default: first 10%% + last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", required=True, help="output model folder: new, empty or an earlier pruned model (replaced)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:  # everything that can be wrong with the arguments fails here, before the slow work, without a traceback
        if min(args.seq_len, args.calib_tokens) < 1:
            raise ValueError(f"--seq_len and --calib_tokens must be at least 1, got {args.seq_len}, {args.calib_tokens}")
        model = Transformer.from_pretrained(args.model, dtype=torch.float32).eval()
        kept = None if args.keep_layers is None else layer_list(args.keep_layers, model.config.n_layer)
        plan, planned = prune_plan(model, args.sparsity, kept, args.whole_groups)
        batches = token_batches(args.calib, args.calib_tokens, args.seq_len, seed=args.seed) \
            if args.method in ("wanda", "llm_pruner") else None
        check_out(args.out, args.model)
    except (ValueError, OSError) as e:
        p.error(str(e))
    t0 = time.time()
    scores = structured_scores(model, args.method, batches, args.seed, args.taylor)
    choose_masks(model, scores, plan, args.whole_groups)
    before = count_params(model)
    compact(model)
    after = count_params(model)
    info = dict(method=args.method, target_sparsity=args.sparsity, planned_sparsity=planned,
                achieved_sparsity=1 - after / before, params_before=before, params_after=after,
                kept_layers=default_kept_layers(model.config.n_layer) if kept is None else kept,
                whole_groups=args.whole_groups, taylor=args.taylor if args.method == "llm_pruner" else None,
                calib=args.calib if batches else None, calib_tokens=args.calib_tokens if batches else None,
                seq_len=args.seq_len, seed=args.seed, source=str(args.model))
    print(f"{args.method}: removed {before - after:,} of {before:,} parameters = {1 - after / before:.4%} of all "
          f"(target {args.sparsity:.2%}, planned {planned:.4%}); {after:,} left; scoring took {time.time() - t0:.1f}s")
    print("heads per layer:", [b.self_attn.n_head for b in model.model.layers])
    print("MLP width per layer:", [b.mlp.down_proj.in_features for b in model.model.layers])
    save_pruned(model, args.out, args.model, info, getattr(torch, args.dtype))
    print(f"wrote {args.out}")


# ============================================================================ 3. LoRAShear
# LoRAShear (Chen et al., 2023; ALGORITHMS.md §3) on the groups of section 2: query heads and MLP channels (a
# key/value head goes when compaction finds no query head reading it). The pieces, in the order of a run:
#   knowledge_distribution  which node groups (one layer's attention, one layer's MLP) hold the most knowledge: the
#                           loss change when each alone is thinned at a few ratios; the gamma most sensitive stay whole
#   lorashear_plan          how many heads / channels every other node group loses (one ratio everywhere)
#   LHSPG                   after a LoRA warm-up, P periods of T_p optimizer steps: at a period's start
#                           next_redundant() moves the next least salient groups into the redundant set; after every
#                           optimizer step lhspg_step() shrinks them (base rows / columns and the LoRA slices coupled
#                           to them) to exactly zero by the period's end while LoRA on the kept groups trains on; at
#                           the end restart_adapters() merges s B A into W0 and restarts the adapters
#   redundant_masks, compact  the zero groups removed for real (compacted == zeroed: they computed nothing)
#   recovery_counts         dynamic knowledge recovery: each round's batches shared between the data sources in
#                           proportion to how much each degraded (pruned vs dense loss), with a floor per source
# Groups are given as {layer: {"heads": bool (n_head,), "channels": bool (width,)}}. The loops are
# experiments/lorashear.py's.
NODE_GROUPS = {"attn": ("self_attn", "head_mask", "heads"), "mlp": ("mlp", "channel_mask", "channels")}
LHSPG_VARIANTS = ("ramp", "halfspace")


@torch.no_grad()
def mean_loss(model, batches):
    """Mean loss over batches, each a (B, T + 1) window tensor or an (x, y) pair (y = -1: not counted), in eval mode."""
    was_training = model.training
    model.eval()
    loss = sum((model(*b)[1] if isinstance(b, (tuple, list)) else batch_loss(model, b)).item() for b in batches)
    model.train(was_training)
    return loss / len(batches)


@torch.no_grad()
def knowledge_distribution(model, batches, ratios=(0.1, 0.3, 0.5), gamma=0.1, scores=None):
    """LoRAShear's knowledge distribution analysis. For every node group, (l, "attn") and (l, "mlp"), and every ratio:
    mask the round(ratio * n) lowest-scoring of its n heads / channels (that node alone; scores in section 2's format,
    default magnitude_scores, which sees W0 + s B A where adapters are), take the mean loss on the held-out `batches`
    (mean_loss), restore. A node's sensitivity is its mean |loss change| over the ratios; the round(gamma * nodes)
    most sensitive are unprunable (ties: the earlier node). Nothing random: the same model and batches give the same
    result. Returns a JSON-ready dict: base_loss, ratios, gamma, nodes [{layer, kind, losses, change, sensitivity}],
    unprunable [[layer, kind], ...]."""
    scores = magnitude_scores(model) if scores is None else scores
    saved = [tuple(None if m is None else m.clone() for m in (b.self_attn.head_mask, b.mlp.channel_mask))
             for b in model.model.layers]
    add_masks(model)
    base, nodes = mean_loss(model, batches), []
    try:
        for l, block in enumerate(model.model.layers):
            for kind, (part, mask_name, key) in NODE_GROUPS.items():
                mask = getattr(getattr(block, part), mask_name)
                before, losses = mask.clone(), []
                live = int(before.sum())
                for ratio in ratios:
                    k = min(int(ratio * live + 0.5), live - 1)  # a node keeps at least one head / channel
                    mask.copy_(~lowest(scores[l][key], before == 0, len(mask) - live + k))
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


def lorashear_plan(model, sparsity, unprunable=()):
    """prune_plan with node groups instead of whole layers kept: the same ratio rho of the query heads and of the MLP
    channels of every node group not in `unprunable` ([layer, "attn" | "mlp"] pairs, as knowledge_distribution gives
    them), rho chosen so that the removed fraction of all parameters is the closest to `sparsity`, every node keeping
    one head / channel. Returns ({layer: (heads, channels)}, planned fraction); key/value heads count as kept."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1) (the fraction of all parameters to remove), got {sparsity}")
    fixed = {(int(l), kind) for l, kind in unprunable}
    hidden, total = model.config.hidden_size, count_params(model)
    sizes = {l: (0 if (l, "attn") in fixed else b.self_attn.n_head,  # (heads, channels, parameters of a head)
                 0 if (l, "mlp") in fixed else b.mlp.down_proj.in_features,
                 2 * b.self_attn.head_dim * hidden) for l, b in enumerate(model.model.layers)}  # q rows + o columns

    def plan_at(rho):
        return {l: (int(rho * n + 0.5), int(rho * w + 0.5)) for l, (n, w, _) in sizes.items()}

    def removed(plan):
        return sum(h * sizes[l][2] + c * 3 * hidden for l, (h, c) in plan.items())  # a channel: gate, up, down

    steps = 4 * max(w for _, w, _ in sizes.values()) + 4
    best = most = plan_at(0.0)
    for k in range(1, steps):
        plan = plan_at(k / steps)
        if any((n and h >= n) or (w and c >= w) for (h, c), (n, w, _) in zip(plan.values(), sizes.values())):
            break
        most = plan
        if abs(removed(plan) - sparsity * total) < abs(removed(best) - sparsity * total):
            best = plan
    if sparsity * total - removed(most) > 0.001 * total:
        raise ValueError(f"sparsity {sparsity} is out of reach: with node groups {sorted(fixed)} kept whole and one "
                         f"head and one channel left in every other, at most {removed(most) / total:.4f} of the "
                         f"parameters can go")
    return best, removed(best) / total


def next_redundant(scores, redundant, plan, period, n_periods):
    """LHSPG's choice at the start of period `period` (0-based) of n_periods: in every layer of the plan the least
    salient heads / channels (scores in section 2's format, higher = more important: e.g. loraprune_update's average)
    join the redundant set until it holds round(n * (period + 1) / n_periods) of the plan's n (LoRAShear: K / P groups
    per period); a redundant group stays redundant. redundant: None at the first period. Returns (the redundant set,
    the groups new in this period), both {layer: {"heads": bool, "channels": bool}}."""
    now, new = {}, {}
    for l, counts in plan.items():
        now[l], new[l] = {}, {}
        for key, n in zip(("heads", "channels"), counts):
            s = scores[l][key]
            before = redundant[l][key] if redundant else torch.zeros(len(s), dtype=torch.bool, device=s.device)
            now[l][key] = lowest(s, before, int(n * (period + 1) / n_periods + 0.5))
            new[l][key] = now[l][key] & ~before
    return now, new


def group_slices(block, heads, channels):
    """(module, axis, slots, key) for each projection the query heads `heads` and MLP channels `channels` (index
    tensors) of a block write (axis 0: rows of W0 and of LoRA B) or read (axis 1: columns of W0 and of LoRA A);
    slots are grouped per head (head_dim each) or channel. Key/value projections are left to compaction."""
    hd = block.self_attn.head_dim
    head_slots = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()
    return [(module, axis, head_slots if kind == "heads" else channels, kind)
            for name, module in projections(block) for kind, axis in [COUPLED[name]] if kind != "kv"]


def lora_factor(module, axis):
    """The LoRA factor whose slices couple to a group's slices of W0 on that axis: B (rows), A (columns); or None."""
    return (module.lora_B if axis == 0 else module.lora_A) if isinstance(module, LoRALinear) else None


def take(t, axis, slots):
    """The slots of t on axis as a (len(slots), other) float32 matrix: rows, or columns transposed."""
    return (t[slots] if axis == 0 else t[:, slots].T).float()


def put(t, axis, slots, value):
    if axis == 0:
        t[slots] = value.to(t.dtype)
    else:
        t[:, slots] = value.T.to(t.dtype)


def lora_part(module, axis, slots):
    """s B A on the slots (take's layout): what the adapter adds to the group's slice of W0; 0 without one."""
    if not isinstance(module, LoRALinear) or module.merged:
        return 0.0
    B = module.lora_B * module.rank_mask
    return module.scale * (B[slots] @ module.lora_A if axis == 0 else (B @ module.lora_A[:, slots]).T)


def group_items(model, groups):
    """(block, module, axis, slots, key, index of the key's groups) over the groups' slices, skipping empty ones."""
    for l, g in groups.items():
        block, index = model.model.layers[l], {k: g[k].nonzero()[:, 0] for k in ("heads", "channels")}
        for module, axis, slots, key in group_slices(block, index["heads"], index["channels"]):
            if len(slots):
                yield block, module, axis, slots, key, index[key]


@torch.no_grad()
def scale_groups(model, groups, factor):
    """Multiply the groups' slices of W0 and of the LoRA factor coupled to them by `factor`: W0 + s B A on those rows /
    columns is scaled by factor, nothing else changes."""
    for _, module, axis, slots, _, _ in group_items(model, groups):
        for t in (module.weight, lora_factor(module, axis)):
            if t is not None:
                put(t, axis, slots, take(t, axis, slots) * factor)


@torch.no_grad()
def halfspace_project(model, groups, t, period_steps, eps=0.05):
    """The paper's LHSPG step on the groups, at step t of a period of T_p. With x_g the group's base slices and
    s B A its LoRA part, lambda_g = ||x_g|| / (T_p - t) (the pace at which a plain shrink would reach zero at the
    period's end, the ramp's) and the trial point
        x~_g = x_g + [s B A]_g - lambda_g x_g / ||x_g||                          (LoRAShear, the LHSPG trial iterate)
    the group goes to zero if x~_g . x_g < eps ||x_g||^2 (it crossed into the half-space away from x_g: the
    half-space projection), else x_g <- x~_g; either way its LoRA slices are zeroed (the update is folded into
    x_g). A group already zero stays zero, and every group is zero after t = T_p - 1."""
    items = list(group_items(model, groups))
    xx, xd = {}, {}  # per (block, key): ||x_g||^2 and x_g . [s B A]_g, summed over the coupled slices
    for block, module, axis, slots, key, index in items:
        x, d = take(module.weight, axis, slots).reshape(len(index), -1), lora_part(module, axis, slots)
        xx[block, key] = xx.get((block, key), 0) + x.pow(2).sum(1)
        if torch.is_tensor(d):
            xd[block, key] = xd.get((block, key), 0) + (x * d.reshape(len(index), -1)).sum(1)
    for block, module, axis, slots, key, index in items:
        sq = xx[block, key]
        lam = sq.sqrt() / (period_steps - t)
        trial_dot = sq + xd.get((block, key), 0) - lam * sq.sqrt()  # x~ . x
        zero = (trial_dot < eps * sq) | (sq == 0) | (t >= period_steps - 1)  # the half-space test (LoRAShear)
        x, d = take(module.weight, axis, slots).reshape(len(index), -1), lora_part(module, axis, slots)
        d = d.reshape(len(index), -1) if torch.is_tensor(d) else 0.0
        trial = x + d - (lam / sq.sqrt().clamp_min(1e-30))[:, None] * x  # x~ = x + s B A - lambda_g x / ||x||
        put(module.weight, axis, slots, torch.where(zero[:, None], 0.0, trial).reshape(len(slots), -1))
        factor = lora_factor(module, axis)
        if factor is not None:  # the LoRA part now lives in x_g
            put(factor, axis, slots, take(factor, axis, slots) * 0.0)


@torch.no_grad()
def lhspg_step(model, redundant, shrinking, t, period_steps, variant="ramp", eps=0.05):
    """Call after optimizer.step() at step t = 0 .. T_p - 1 of an LHSPG period. The groups of earlier periods
    (in `redundant`, not in `shrinking`) are held at zero; this period's (`shrinking`) go towards zero:
      ramp       x_g <- x_g (T_p - t - 1) / (T_p - t) on the base slices and the LoRA slices coupled to them
                 (LoRAShear's public code): W0 + s B A on the group shrinks linearly and is exactly zero after T_p - 1;
      halfspace  halfspace_project (the paper's step), forced to zero after T_p - 1.
    The ramp is the default: it reaches zero exactly at the period's end, at a pace known in advance, with nothing to
    tune, so the kept groups' LoRA has the whole period to take over the removed function; the half-space step
    (with the same pace lambda_g) differs only where the LoRA update itself pushes a group across the half-space
    boundary, and then cuts it at once, and it needs eps (on SmolLM2-135M at 50%, T_p = 8, eps = 0.05, no group crossed
    before the period's end: the two then differ only in folding LoRA's part into W0). It is also what the authors
    ran. Kept groups are not touched."""
    if variant not in LHSPG_VARIANTS:
        raise ValueError(f"LHSPG variant {variant!r}: choose from {LHSPG_VARIANTS}")
    if not 0 <= t < period_steps:
        raise ValueError(f"step {t} lies outside the period of {period_steps} steps")
    earlier = {l: {k: redundant[l][k] & ~shrinking[l][k] for k in g} for l, g in redundant.items()}
    scale_groups(model, earlier, 0.0)
    if variant == "ramp":
        scale_groups(model, shrinking, (period_steps - t - 1) / (period_steps - t))  # LoRAShear code: linear to 0
    else:
        halfspace_project(model, shrinking, t, period_steps, eps)


@torch.no_grad()
def restart_adapters(model, generator=None):
    """Merge every adapter into its base weight (W0 <- W0 + s B A) and restart it: B = 0, A drawn afresh as
    LoRALinear draws it. The model computes the same function (LoRAShear, at each LHSPG period's end); clear the
    optimizer's state afterwards (optimizer.state.clear()): its moments were the old A's and B's."""
    for name, m in lora_modules(model).items():
        if m.merged:
            raise ValueError(f"{name}: the adapter is merged already; unmerge_lora(model) first")
        m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
        m.lora_B.zero_()
        nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5), generator=generator)


@torch.no_grad()
def redundant_masks(model, redundant):
    """Mask the redundant groups (head_mask / channel_mask 0) for compact() to remove; after LHSPG they are zero
    already, so the masks change nothing the model computes."""
    add_masks(model)
    for l, g in redundant.items():
        model.model.layers[l].self_attn.head_mask[g["heads"]] = 0.0
        model.model.layers[l].mlp.channel_mask[g["channels"]] = 0.0
    return model


@torch.no_grad()
def groups_max_abs(model, groups):
    """The largest |entry| of W0 + s B A over the groups' slices: exactly 0.0 once LHSPG has zeroed them."""
    return max((take(effective_weight(m), axis, slots).abs().max().item()
                for _, m, axis, slots, _, _ in group_items(model, groups)), default=0.0)


def recovery_shares(degradation, floor=0.05):
    """Dynamic knowledge recovery's sampling distribution over the data sources ({source: loss increase}):
        p_i = floor + (1 - n floor) d_i / sum_j d_j,   d_i = max(0, pruned loss - dense loss on source i's held-out
    batches); equal shares where no source degraded. Every source keeps at least `floor`."""
    n = len(degradation)
    if not 0 <= floor <= 1 / n:
        raise ValueError(f"recovery floor must lie in [0, 1/{n}] for {n} sources, got {floor}")
    d = {k: max(0.0, float(v)) for k, v in degradation.items()}
    total = sum(d.values())
    return {k: floor + (1 - n * floor) * (v / total if total > 0 else 1 / n) for k, v in d.items()}


def recovery_counts(degradation, n_batches, floor=0.05):
    """How many of the next n_batches come from each source: n_batches * recovery_shares rounded by largest remainder
    (ties: the source listed first), so that they sum to n_batches."""
    exact = {k: p * n_batches for k, p in recovery_shares(degradation, floor).items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:n_batches - sum(counts.values())]:
        counts[k] += 1
    return counts


if __name__ == "__main__":
    main()

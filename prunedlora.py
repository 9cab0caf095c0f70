"""
PrunedLoRA: rank pruning of LoRA adapters while they train (docs/ALGORITHMS.md §1).
 (P1)  W = W0 + s B A; component j = column j of B with row j of A. Adapters start at rank r0 and lose components
       down to rank_target; a pruned one is zeroed, masked, its AdamW state cleared: it never comes back.
 (P2)  a change d of one row w of B costs  dL(d) ~ g.d + 1/2 d^T F d
 (P3)  g, F: the mean gradient and the empirical Fisher of the micro-batch gradients since the last event
 (P4)  damping: F + lambda I, lambda = rank_damp * mean diag(F)
 (P5)  the update that zeroes a set Q: d = eta n - F^-1 E_Q mu, n = -F^-1 g, mu = [F^-1]_QQ^-1 (w_Q + eta n_Q),
       eta = rank_recovery_lr (0: compensation only)
 (P6)  trust region: the survivors' part of d shrunk to norm <= tau |w|, tau = rank_tau
 (P7)  the score of record: (P2)'s value of the (P5-P6) update that removes j alone, summed over the rows of B
 (P8)  prunedlora_paper: 1/2 mu_j^2 [F^-1]_jj over the rows of B and columns of A, F = G^T G / n of the step's
       own gradient; obs: (P7) with g = 0
 (P9)  allocation: uniform (K2 per adapter) or global (the K2 n lowest of all adapters, a floor per adapter)
 (P10) an event every K1 = rank_every steps after rank_start, K2 = rank_k components each, down to the target;
       at the end the adapters are sliced to their final rank
The baselines (P11)-(P14) follow the method. The training loop calls
    state = new_state(cfg)
    after each micro-batch backward:  accumulate(model, state, micro_step, n_micro, batch_size)
    after each optimizer step:        event = step(model, optimizer, step, cfg, state, heldout)  # None or a log
    after a skipped step: reset(state); after training: slice_adapters(model)
The adapters of one shape go as one stack over all r0 components, the pruned ones neutral (zero in W and G, the
identity in F): each adapter gets what it would get alone.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lora import lora_modules

METHODS = ("prunedlora", "prunedlora_paper", "obs", "activation_obs", "magnitude", "taylor", "adalora", "random")
CURVED = {"prunedlora": "B", "obs": "B", "activation_obs": "B", "prunedlora_paper": "BA"}  # the sides they score


# ----------------------------------------------------------------------------- the method
def new_state(cfg):
    """Per adapter: the sums since the last event (of B; of A too for rank_recovery_side='AB'), the step's gradient,
    AdaLoRA's averages; the generator of `random`. Tensors and plain values only."""
    check_settings(cfg)
    return dict(n_micro=0, batch_size=1, sums={}, last_grad={}, ipt={}, ranked=False,
                sides=cfg["rank_recovery_side"], generator=torch.Generator().manual_seed(cfg["rank_seed"]))

def reset(state):
    state["n_micro"], state["sums"] = 0, {}

def adapter_groups(model, with_grad=False):
    """[{name: module}]: the adapters whose factors have the same shapes (one projection in every layer)."""
    groups = {}
    for name, m in lora_modules(model).items():
        if not with_grad or (m.lora_B.grad is not None and m.lora_A.grad is not None):
            groups.setdefault((m.lora_B.shape, m.lora_A.shape), {})[name] = m
    return list(groups.values())

def stack(tensors):
    return torch.stack(list(tensors)).float()

def factors(mods, side):
    return [getattr(m, f"lora_{side}") for m in mods.values()]

def masks(mods):  # (n, r): 1 at the active components, 0 at the pruned ones
    return stack(m.rank_mask for m in mods.values())

@torch.no_grad()
def accumulate(model, state, micro_step=0, n_micro=1, batch_size=1):
    """(P3) After each micro-batch backward: add its gradient G and G^T G (B: its rows are the samples; A: G G^T) to
    the sums. micro_step > 0: .grad holds the earlier micro-batches too (the increment is used); n_micro: what the
    loss was divided by. Under DDP the last increment holds all processes' gradients (an approximation)."""
    groups, last = adapter_groups(model, with_grad=True), state["last_grad"]
    if not groups:
        raise ValueError("accumulate: no LoRA adapter has a gradient; call it after the micro-batch's backward")
    for mods in groups:
        grads = {side: stack(p.grad for p in factors(mods, side)) for side in "BA"}  # (n, out, r), (n, r, in)
        for side in state["sides"]:
            d = grads[side]
            if micro_step > 0:  # the increment since the previous micro-batch
                d = d - stack(last[name][side] if name in last else torch.zeros_like(g) for name, g in zip(mods, d))
            d = d * n_micro if n_micro != 1 else d  # the gradient of this micro-batch's mean loss
            rows = d if side == "B" else d.mT  # (n, samples, r)
            for key, value in ((f"grad_{side}", d), (f"fisher_{side}", rows.mT @ rows)):
                sums = state["sums"].setdefault(key, {})
                sums.update({name: torch.zeros_like(v) for name, v in zip(mods, value) if name not in sums})
                foreach(torch._foreach_add_, [sums[name] for name in mods], value)
        last.update({name: dict(B=b, A=a) for name, b, a in zip(mods, grads["B"], grads["A"])})  # (P8, P12, P13)
    state["n_micro"] += 1
    state["batch_size"] = batch_size

def curvature(mods, state, method, side="B", damp=0.01, act=None):
    """(W, G, H) of one factor of a group: W (n, rows, r) the rows of B or the columns of A, G their mean gradient,
    H (n, r, r) the damped curvature of `method`."""
    T = (lambda t: t) if side == "B" else (lambda t: t.mT)  # A's columns are its rows
    W, mask = T(stack(factors(mods, side))), masks(mods)
    if method == "prunedlora_paper":  # (P8) the step's own gradient, H = G^T G / n
        G = T(stack(state["last_grad"][name][side] for name in mods))
        H = G.mT @ G / G.shape[-2]
    elif method == "activation_obs" and side == "B":  # (P14) H_B = Z Z^T / n over calibration tokens
        G, H = torch.zeros_like(W), stack(act[name] for name in mods)
    elif state["n_micro"] == 0:
        raise ValueError(f"{method}: no gradients accumulated since the last pruning event; call "
                         f"accumulate(model, state, ...) after every micro-batch backward")
    elif side not in state["sides"]:
        raise ValueError(f"{method} on side {side}: its sums were not kept; make the state with new_state(cfg) of "
                         f"rank_recovery_side='AB'")
    else:  # (P3) the mean gradient; the per-sequence Fisher: the mean over micro-batches and rows, times sequences
        n, sums = state["n_micro"], lambda key: stack(state["sums"][f"{key}_{side}"][name] for name in mods)
        G = torch.zeros_like(W) if method == "obs" else T(sums("grad")) / n
        H = sums("fisher") * state["batch_size"] / (n * W.shape[-2])
    # the pruned components are zero in W and G (zeroed and masked); zero their rows and columns of H too
    return W, G, damped(H * mask[:, None, :] * mask[:, :, None], damp, mask)

def damped(H, frac, mask):
    """(P4) over the active components (lambda = 1 where their diagonal is 0), the identity over the pruned ones: H^-1
    is block-diagonal, its active block the inverse of H's. mask (..., r)."""
    damp = frac * (H.diagonal(dim1=-2, dim2=-1) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    return H + torch.diag_embed(torch.where(damp > 0, damp, 1.0) * mask + (1 - mask))

def removal_update(W, G, H, P, eta=1.0, tau=0.0):
    """(P5-P6) The update D of W (..., rows, k) that zeroes the components P (..., k) (bool), per row: min
    g.d + 1/2 d^T H d subject to (w + d)_Q = 0, the Newton part scaled by eta."""
    Q = P.unsqueeze(-2)  # (..., 1, k)
    Hinv = torch.linalg.inv_ex(H).inverse  # inv_ex: no error code to read back (a wait on a GPU)
    on_QQ = P.unsqueeze(-1) & Q  # [H^-1]_QQ is inverted as the matrix equal to it on Q, the identity off Q
    H_QQ = torch.where(on_QQ, Hinv, torch.diag_embed((~P).to(W.dtype)))
    K = torch.linalg.inv_ex(H_QQ).inverse.masked_fill(~on_QQ, 0.0) @ Hinv
    n = -eta * G @ Hinv  # (..., rows, k): the Newton step, scaled
    D = (n - (W + n) @ K).masked_fill(Q, 0.0)  # in rows: d = n - (w + n) E_Q [H^-1]_QQ^-1 E_Q^T H^-1
    if tau > 0:  # (P6)
        D = D * (tau * W.norm(dim=-1, keepdim=True) / D.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return torch.where(Q, -W, D)

def quadratic_change(D, G, H):
    """(P2) summed over the rows of D (..., rows, k). Returns (...)."""
    return ((D * G).sum(-1) + 0.5 * ((D @ H) * D).sum(-1)).sum(-1)

def removal_values(W, G, H, eta=0.0, tau=0.0, recovery=True):
    """(P7) quadratic_change(removal_update(W, G, H, {j})) of every j at once, in closed form. Per row, with
    h = H^-1 e_j, n = -eta H^-1 g, a = (w_j + n_j) / [H^-1]_jj, the survivors' part u = n - a h + w_j e_j, clipped
    to t u: d = t u - w_j e_j is worth c2 t^2 + c1 t + c0, c0 = w_j^2/2 H_jj - w_j g_j, c1 = g.u - w_j (H u)_j,
    c2 = u^T H u / 2, where g.u = g.n - a (H^-1 g)_j + w_j g_j, (H u)_j = -eta g_j - a + w_j H_jj,
    u^T H u = eta^2 g.H^-1 g + a^2 [H^-1]_jj + w_j^2 H_jj - 2 a n_j - 2 eta w_j g_j - 2 a w_j,
    |u|^2 = |n|^2 - 2 a (H^-1 n)_j + a^2 [H^-2]_jj - w_j^2. Returns (..., k)."""
    Hinv = torch.linalg.inv_ex(H).inverse
    hd, WHd = Hinv.diagonal(dim1=-2, dim2=-1).unsqueeze(-2), W * H.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
    c0 = W * (0.5 * WHd - G)  # the removal alone
    if not recovery:
        return c0.sum(-2)
    m = G @ Hinv  # (..., rows, k): row i is H^-1 g_i
    a, gHg = (W - eta * m) / hd, (G * m).sum(-1, keepdim=True)
    c1 = a * (W - m) + W * ((1 + eta) * G - WHd) - eta * gHg
    if eta == 0:  # a [H^-1]_jj = w_j shortens c2
        c2 = 0.5 * W * (WHd - a)
    else:
        c2 = 0.5 * (eta ** 2 * gHg + a * (a * hd + 2 * eta * m - 2 * W) + W * (WHd - 2 * eta * G))
    if tau <= 0:
        return (c2 + c1 + c0).sum(-2)
    uu = a * a * (Hinv * Hinv).sum(-2, keepdim=True) - W * W  # [H^-2]_jj: a column of H^-1 squared
    if eta != 0:
        uu = uu + eta * (eta * (m * m).sum(-1, keepdim=True) + 2 * a * (m @ Hinv))
    t = (tau * W.norm(dim=-1, keepdim=True) / uu.clamp_min(0).sqrt().clamp_min(1e-30)).clamp(max=1.0)  # (P6)
    return (t * (t * c2 + c1) + c0).sum(-2)

def event_curvatures(groups, state, cfg, act=None):
    """The (W, G, H) of each group an event uses, {side: [...]} for the "predict"ion (P2, the Fisher's of B), the
    "score" and the "recover"y, each computed once, before anything moves."""
    method = cfg["rank_method"]
    how = method if method in CURVED else "prunedlora"  # a score without a curvature recovers with the Fisher's
    parts = dict(predict=[("prunedlora", "B")] if state["n_micro"] else [],
                 score=[(method, side) for side in CURVED.get(method, "")],
                 recover=[(how, side) for side in cfg["rank_recovery_side"] if cfg["rank_recovery"]])
    done = {key: [curvature(mods, state, *key, cfg["rank_damp"], act) for mods in groups]
            for key in dict.fromkeys(sum(parts.values(), []))}
    return {part: {side: done[m, side] for m, side in keys} for part, keys in parts.items()}

@torch.no_grad()
def scores(model, groups, cfg, state, curv):
    """[(n, r) of each group]: low = prune first, +inf at the pruned components. curv: event_curvatures' "score"."""
    method, active = cfg["rank_method"], [masks(mods) for mods in groups]
    if method in ("prunedlora", "obs"):  # (P7) on B: zeroing B[:, j] already removes the component
        out = [removal_values(*c, cfg["rank_recovery_lr"], cfg["rank_tau"], cfg["rank_recovery"]) for c in curv["B"]]
    elif method in ("prunedlora_paper", "activation_obs"):  # (P8); (P14) with g = 0
        out = [sum(lagrangian_scores(*curv[side][i]) for side in CURVED[method]) for i in range(len(groups))]
    elif method == "random":  # one draw per active component, adapter after adapter in the model's order
        ranks = {name: r for name, r in active_ranks(lora_modules(model)).items() if any(name in g for g in groups)}
        draws = torch.rand(sum(ranks.values()), generator=state["generator"]).split(list(ranks.values()))
        draws = dict(zip(ranks, draws))
        out = [torch.zeros(mask.shape).masked_scatter_(mask.bool().cpu(), torch.cat([draws[name] for name in mods]))
               for mods, mask in zip(groups, active)]
    else:
        out = [baseline_scores(mods, method, state) for mods in groups]
    out = [torch.where(mask > 0, s.to(mask.device).float(), math.inf) for mask, s in zip(active, out)]
    if torch.stack([s.isnan().any() for s in out]).any():  # one read for every adapter
        bad = [name for mods, s in zip(groups, out) for name, nan in zip(mods, s.isnan().any(-1).tolist()) if nan]
        raise ValueError(f"{method}: a NaN score in {bad[0]}")
    return out

def choose(scores, k, allocation="uniform", floor=1, budget=None):
    """(P9) [(..., r) scores, +inf at the pruned] -> [(..., r) bool, True: prune], each adapter keeping `floor` active
    components, at most `budget` in all; ties go to the lower index."""
    if allocation not in ("uniform", "global"):
        raise ValueError(f"rank_allocation {allocation!r}: expected 'uniform' or 'global'")
    place = [s.argsort(stable=True, dim=-1).argsort(dim=-1) for s in scores]  # 0: the adapter's lowest
    left = [s.isfinite().sum(-1, keepdim=True) - floor for s in scores]  # how many it may still lose
    if allocation == "uniform":
        return [p < n.clamp(0, k) for p, n in zip(place, left)]
    n_prune = k * sum(s[..., 0].numel() for s in scores)
    n_prune = n_prune if budget is None else min(n_prune, budget)
    flat = torch.cat([torch.where(p < n, s, math.inf).flatten() for s, p, n in zip(scores, place, left)])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.argsort(stable=True)[:n_prune]] = True
    chosen &= flat.isfinite()
    return [part.view(s.shape) for s, part in zip(scores, chosen.split([s.numel() for s in scores]))]

@torch.no_grad()
def recover(groups, chosen, curv, eta=0.0, tau=0.1):
    """(P5-P6) Move the survivors of each adapter to compensate for removing its chosen components together; the
    chosen land at zero. curv: event_curvatures' "recover", {side that moves: [(W, G, H) of each group]}."""
    for i, (mods, P) in enumerate(zip(groups, chosen)):
        # the active components move; an adapter with nothing chosen stays (with eta > 0 it would step)
        moves = masks(mods)[:, None, :] * P.any(-1)[:, None, None]
        for side, per_group in curv.items():
            D = removal_update(*per_group[i], P, eta, tau) * moves  # (n, rows, r)
            foreach(torch._foreach_add_, factors(mods, side), D if side == "B" else D.mT)

@torch.no_grad()
def mask_components(groups, chosen, optimizer=None):
    """Zero and mask the chosen components ([(n, r) bool] per group) and their optimizer state (AdamW's exp_avg,
    exp_avg_sq: the row of A, the column of B), so that they stay exactly zero."""
    for mods, P in zip(groups, chosen):
        keep = (~P).float()
        foreach(torch._foreach_mul_, [m.rank_mask for m in mods.values()], keep)
        for params, k in ((factors(mods, "A"), keep[:, :, None]), (factors(mods, "B"), keep[:, None, :])):
            foreach(torch._foreach_mul_, params, k)
            states = [optimizer.state.get(p, {}) if optimizer is not None else {} for p in params]
            for key in dict.fromkeys(key for s in states for key in s):  # (AdamW's step is a scalar)
                have = [torch.is_tensor(s.get(key)) and s[key].shape == p.shape for s, p in zip(states, params)]
                if any(have):
                    foreach(torch._foreach_mul_, [s[key] for s, h in zip(states, have) if h], k[have])

def foreach(op, tensors, values):
    """op (torch._foreach_add_ or _mul_) of each tensor with its slice of values (n, ...), broadcast to its shape."""
    op(tensors, list(values.to(tensors[0].dtype).expand(len(tensors), *tensors[0].shape).contiguous().unbind(0)))

@torch.no_grad()
def prune_event(model, optimizer, cfg, state, budget, act=None):
    """(P10) curvature -> scores -> choose -> recover -> mask. Returns the loss change (P2) with the Fisher predicts
    for the change of B (NaN without statistics)."""
    groups = adapter_groups(model)
    curv = event_curvatures(groups, state, cfg, act)
    floor = cfg["rank_target"] if cfg["rank_allocation"] == "uniform" else cfg["rank_floor"]
    chosen = choose(scores(model, groups, cfg, state, curv["score"]), cfg["rank_k"], cfg["rank_allocation"], floor,
                    budget)
    recover(groups, chosen, curv["recover"], cfg["rank_recovery_lr"], cfg["rank_tau"])
    mask_components(groups, chosen, optimizer)
    if not curv["predict"]:
        return math.nan
    changes = [quadratic_change(stack(factors(mods, "B")) - W, G, H)  # (n,): each adapter's
               for mods, (W, G, H) in zip(groups, curv["predict"]["B"])]
    return torch.cat(changes).sum(dtype=torch.float64).item()

def step(model, optimizer, step, cfg, state, heldout=None):
    """After every optimizer step (step = steps done): on an event (P10) prune and return its log, with the predicted
    and (given a held-out batch (idx, targets)) the actual loss change; otherwise None."""
    check_settings(cfg)
    method, start, side = cfg["rank_method"], cfg["rank_start"], cfg["rank_recovery_side"]
    if cfg["rank_recovery"] and method != "prunedlora_paper" and side not in state["sides"]:
        raise ValueError(f"rank_recovery_side={side!r} needs the statistics of A as well: make the state with "
                         f"new_state(cfg) of rank_recovery_side={side!r}")
    if method == "adalora":
        update_sensitivity(model, state)
    if step == start:  # the statistics restart: those of the warmup are not the model's now
        reset(state)
    if step <= start or (step - start) % cfg["rank_every"]:
        return None  # (before reading the masks: on a GPU a read waits for the step)
    mods = lora_modules(model)
    excess = sum(active_ranks(mods).values()) - cfg["rank_target"] * len(mods)
    if excess <= 0:
        return None
    average_over_processes(state["sums"])  # every process must choose the same components
    if method == "activation_obs" and heldout is None:
        raise ValueError("activation_obs needs calibration tokens: pass a held-out batch")
    act, ranking = activation_stats(model, heldout) if method == "activation_obs" else None, None
    if cfg["rank_ranking_test"] and heldout is not None and not state["ranked"]:
        name = list(mods)[len(mods) // 2]
        ranking, state["ranked"] = dict(adapter=name, **ranking_test(model, name, heldout, state, cfg, act=act)), True
    before = heldout_loss(model, heldout) if heldout is not None else math.nan
    predicted = prune_event(model, optimizer, cfg, state, excess, act)
    actual = heldout_loss(model, heldout) - before if heldout is not None else math.nan
    reset(state)
    ranks = active_ranks(mods)
    r = list(ranks.values())
    return dict(step=step, pruned=excess + cfg["rank_target"] * len(r) - sum(r), predicted=predicted, actual=actual,
                ranking=ranking, ranks=ranks, rank_mean=sum(r) / len(r), rank_min=min(r), rank_max=max(r))

def active_ranks(mods):
    """{name: its number of active components}, in one read of the masks."""
    return dict(zip(mods, torch.stack([m.rank_mask.sum() for m in mods.values()]).long().tolist()))

def schedule_end(r0, cfg):
    """(P10) The optimizer step of the last event of a uniform schedule from rank r0: train past it."""
    return cfg["rank_start"] + cfg["rank_every"] * math.ceil(max(0, r0 - cfg["rank_target"]) / cfg["rank_k"])

@torch.no_grad()
def slice_adapters(model):
    """(P10) After training, cut A and B to their active components: exact final ranks (s unchanged, alpha = s r)."""
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


# ----------------------------------------------------------------------------- baselines
def lagrangian_scores(W, G, H):
    """(P8) The sum over the rows w of W of 1/2 mu_j^2 [H^-1]_jj, mu_j = (w_j - (H^-1 g)_j) / [H^-1]_jj."""
    Hinv = torch.linalg.inv_ex(H).inverse
    hd = Hinv.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
    mu = (W - G @ Hinv) / hd  # H is symmetric: row i of G H^-1 is (H^-1 g_i)^T
    return (0.5 * mu ** 2 * hd).sum(-2)

def baseline_scores(mods, method, state):
    """(n, r) scores of a group: magnitude (P11), first-order Taylor (P12), AdaLoRA (P13)."""
    if method == "adalora":  # (P13) I_bar * U_bar summed over the component's entries
        IU = {side: stack(torch.mul(*state["ipt"][name, side]) for name in mods) for side in "BA"}
        return IU["B"].sum(-2) + IU["A"].sum(-1)
    B, A = stack(factors(mods, "B")), stack(factors(mods, "A"))
    if method == "magnitude":  # (P11) ||B[:, j]|| ||A[j, :]||
        return B.norm(dim=-2) * A.norm(dim=-1)
    if method == "taylor":  # (P12) |sum B[:, j] G_B[:, j]| + |sum A[j, :] G_A[j, :]| of the step's gradient
        gB, gA = (stack(state["last_grad"][name][side] for name in mods) for side in "BA")
        return (B * gB).sum(-2).abs() + (A * gA).sum(-1).abs()
    raise ValueError(f"unknown rank pruning method {method!r}; choose from {METHODS}")

@torch.no_grad()
def update_sensitivity(model, state, beta1=0.85, beta2=0.85):
    """(P13) Once per optimizer step: AdaLoRA's averages I_bar, U_bar of every entry of A and B, I = |theta grad|."""
    for name, m in lora_modules(model).items():
        for side, g in state["last_grad"].get(name, {}).items():
            I = (getattr(m, f"lora_{side}").float() * g).abs()
            I_bar, U_bar = state["ipt"].get((name, side), (torch.zeros_like(I), torch.zeros_like(I)))
            I_bar = beta1 * I_bar + (1 - beta1) * I
            state["ipt"][name, side] = (I_bar, beta2 * U_bar + (1 - beta2) * (I - I_bar).abs())

@torch.no_grad()
def activation_stats(model, batch):
    """(P14) {name: Z Z^T / n} over the tokens of batch (idx, targets), Z = A x: SparseGPT's Hessian."""
    sums, mods = {}, lora_modules(model)

    def hook(m, inputs, output):
        z = F.linear(inputs[0].to(m.lora_A.dtype), m.lora_A).reshape(-1, m.r).float()
        zz, n = sums.get(m, (0.0, 0))
        sums[m] = (zz + z.T @ z, n + z.shape[0])
    handles = [m.register_forward_hook(hook) for m in mods.values()]
    try:
        heldout_loss(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[m][0] / sums[m][1] for name, m in mods.items() if m in sums}


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def heldout_loss(model, batch):
    was_training = model.training
    model.eval()
    _, loss = model(*batch)
    model.train(was_training)
    return loss.item()

def spearman(x, y):
    """Spearman's rank correlation of two sequences (without tie correction)."""
    rx, ry = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (x, y))
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])

@torch.no_grad()
def ranking_test(model, name, batch, state, cfg, n=16, act=None):
    """For n active components of adapter `name`, spread over its score order: the score (predicted) against the
    held-out loss change of removing that one alone (with the run's recovery on B), the adapter restored after each."""
    m = lora_modules(model)[name]
    groups, cfg = [{name: m}], cfg | dict(rank_recovery_side="B")
    curv = event_curvatures(groups, state, cfg, act)
    s = scores(model, groups, cfg, state, curv["score"])[0][0]  # (r,), +inf at the pruned
    n_active = int(m.rank_mask.count_nonzero())
    picks = s.argsort()[torch.linspace(0, n_active - 1, min(n, n_active)).round().long()].tolist()
    saved, actual = [t.clone() for t in (m.lora_A, m.lora_B, m.rank_mask)], []
    for j in picks:
        chosen, before = [torch.arange(m.r, device=s.device)[None] == j], heldout_loss(model, batch)  # j alone
        recover(groups, chosen, curv["recover"], cfg["rank_recovery_lr"], cfg["rank_tau"])
        mask_components(groups, chosen)
        actual.append(heldout_loss(model, batch) - before)
        for t, v in zip((m.lora_A, m.lora_B, m.rank_mask), saved):
            t.copy_(v)
    predicted = s[picks].tolist()
    return dict(components=picks, predicted=predicted, actual=actual, spearman=spearman(predicted, actual))


# ----------------------------------------------------------------------------- plumbing: DDP, checkpoints, settings
def average_over_processes(sums):
    """Under DDP, each process's sums ({key: {name: tensor}}) become their mean over the processes, in place."""
    tensors = [t for s in sums.values() for t in s.values()]
    if dist.is_available() and dist.is_initialized() and tensors:
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        torch._foreach_copy_(tensors, [p.view_as(t) for p, t in zip(flat.split([t.numel() for t in tensors]), tensors)])

def state_dict(state):
    """For a checkpoint (tensors, plain values): the sums averaged over the DDP processes (each resumes from that mean),
    the generator as its state, no last_grad (the next micro-step rewrites it before anything reads it)."""
    sums = {key: {name: t.clone() for name, t in s.items()} for key, s in state["sums"].items()}
    average_over_processes(sums)
    return state | dict(sums=sums, last_grad={}, generator=state["generator"].get_state())

def load_state_dict(state, saved, say=print, device=None):
    """Restore state_dict's output (loaded on the CPU) into state, the tensors onto `device` (None: as they are). The
    statistics of A (rank_recovery_side='AB') from a checkpoint without them start afresh, and it says so."""
    sums = saved.get("sums", {key: saved[key] for key in ("grad_B", "grad_A", "fisher_B", "fisher_A") if key in saved})
    state.update(n_micro=saved["n_micro"], batch_size=saved["batch_size"], ranked=saved["ranked"],
                 sums={key: {name: t.to(device) for name, t in s.items()} for key, s in sums.items()},
                 ipt={key: tuple(t.to(device) for t in v) for key, v in saved["ipt"].items()},
                 generator=torch.Generator().set_state(saved["generator"]))  # (older checkpoints: the sums at the top)
    if state["sides"] not in saved["sides"]:  # "AB" from here on
        say(f"rank_recovery_side={state['sides']!r}: the checkpoint has no statistics of A; they start here")
        reset(state)

DEFAULTS = dict(  # for tests and scripts (train.py has its own, with rank_every=2, rank_start=10); see (P1)-(P10)
    rank_method="prunedlora", rank_target=8, rank_every=10, rank_k=2, rank_start=0, rank_allocation="uniform",
    rank_floor=1, rank_recovery=True, rank_recovery_lr=0.0, rank_tau=0.1, rank_recovery_side="B", rank_damp=0.01,
    rank_seed=0, rank_ranking_test=True)

def check_settings(cfg):
    """Raise ValueError with a one-line message for a missing, unknown or bad rank_* setting."""
    if set(cfg) != set(DEFAULTS):
        raise ValueError(f"rank pruning settings: unknown {sorted(set(cfg) - set(DEFAULTS))}, missing "
                         f"{sorted(set(DEFAULTS) - set(cfg))}; expected {sorted(DEFAULTS)}")
    for key, ok, expected in (
            ("rank_method", cfg["rank_method"] in METHODS, f"one of {METHODS}"),
            ("rank_allocation", cfg["rank_allocation"] in ("uniform", "global"), "'uniform' or 'global'"),
            ("rank_recovery_side", cfg["rank_recovery_side"] in ("B", "AB"), "'B' or 'AB'"),
            *((key, cfg[key] >= 1, "at least 1") for key in ("rank_target", "rank_every", "rank_k", "rank_floor"))):
        if not ok:
            raise ValueError(f"{key}={cfg[key]!r}, expected {expected}")

"""PrunedLoRA (prunedlora.py): closed-form checks of the Lagrangian score and update, pruned components neutral,
a group of adapters == each adapter alone, an event == the method written plainly per adapter, no reactivation,
exact final ranks, slicing == masking, saved and restored == uninterrupted, and that the default score is in loss
units."""
import math

import numpy as np
import pytest
import torch

import prunedlora
from conftest import tiny_model
from lora import apply_lora, load_adapter, lora_modules, save_adapter
from prunedlora import (METHODS, accumulate, activation_stats, adapter_groups, choose, damped, event_curvatures,
                        lagrangian_scores, mask_components, new_state, quadratic_change, ranking_test, recover,
                        removal_update, removal_values, schedule_end, scores, slice_adapters, spearman,
                        update_sensitivity)


def settings(**kw):
    return prunedlora.DEFAULTS | kw


def one_set(k, Q):
    """The (k,) mask of the set of components Q (removal_update's P)."""
    return (torch.arange(k)[:, None] == torch.tensor(Q)).any(-1)


def spd(k, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3 * k, k))
    return X.T @ X / (3 * k) + 0.1 * np.eye(k)


def kkt(H, g, w, Q):
    """min g.d + 1/2 d^T H d  s.t.  d_Q = -w_Q, by solving the KKT linear system; returns (d, value)."""
    k, q = len(g), len(Q)
    E = np.zeros((k, q))
    E[Q, range(q)] = 1.0
    K = np.block([[H, E], [E.T, np.zeros((q, q))]])
    d = np.linalg.solve(K, np.concatenate([-g, -w[Q]]))[:k]
    return d, g @ d + 0.5 * d @ H @ d


def updates_of_each(W, G, H, eta=1.0, tau=0.0, recovery=True):
    """(rows, k sets {j}, k): removal_update of every single component j; recovery=False: the removal alone."""
    k = W.shape[-1]
    if not recovery:
        return torch.stack([torch.where(one_set(k, [j]), -W, 0.0) for j in range(k)], -2)
    return torch.stack([removal_update(W, G, H, one_set(k, [j]), eta, tau) for j in range(k)], -2)


def test_lagrangian_score_and_update_match_kkt_solution():
    k, rows = 6, 5
    rng = np.random.default_rng(0)
    H, G, W = spd(k, 1), rng.normal(size=(rows, k)), rng.normal(size=(rows, k))
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    scores_ = lagrangian_scores(t(W), t(G), t(H))
    D = updates_of_each(t(W), t(G), t(H), eta=1.0)  # (rows, k sets {j}, k)
    values = quadratic_change(D.transpose(0, 1), t(G), t(H))
    newton_value = sum(-0.5 * g @ np.linalg.solve(H, g) for g in G)  # the j-independent term
    for j in range(k):
        ds, vals = zip(*(kkt(H, G[i], W[i], [j]) for i in range(rows)))
        np.testing.assert_allclose(D[:, j].numpy(), np.stack(ds), atol=1e-10)
        np.testing.assert_allclose(scores_[j].item(), sum(vals) - newton_value, rtol=1e-9)
        np.testing.assert_allclose(values[j].item(), sum(vals), rtol=1e-9)  # the score of record, eta = 1
    # a set of two components at once (the update an event applies)
    D2 = removal_update(t(W), t(G), t(H), one_set(k, [1, 4]), eta=1.0)
    np.testing.assert_allclose(D2.numpy(), np.stack([kkt(H, G[i], W[i], [1, 4])[0] for i in range(rows)]), atol=1e-10)


def test_gradient_term_off_is_classical_obs():
    k, rows = 5, 4
    H, W = spd(k, 2), np.random.default_rng(3).normal(size=(rows, k))
    Hinv = np.linalg.inv(H)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    scores_ = lagrangian_scores(t(W), torch.zeros(rows, k, dtype=torch.float64), t(H))
    D = updates_of_each(t(W), torch.zeros(rows, k, dtype=torch.float64), t(H), eta=1.0)
    for j in range(k):
        np.testing.assert_allclose(scores_[j].item(), (0.5 * W[:, j] ** 2 / Hinv[j, j]).sum(), rtol=1e-9)
        np.testing.assert_allclose(D[:, j].numpy(), -(W[:, j] / Hinv[j, j])[:, None] * Hinv[:, j], atol=1e-10)


def test_trust_region_bounds_survivors_and_zeroes_the_pruned():
    k, rows, tau = 6, 7, 0.05
    rng = np.random.default_rng(4)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    W, G, H = t(rng.normal(size=(rows, k))), t(100 * rng.normal(size=(rows, k))), t(spd(k, 5))
    D = removal_update(W, G, H, one_set(k, [2]), eta=1.0, tau=tau)
    assert torch.equal(D[:, 2], -W[:, 2])
    survivors = torch.cat([D[:, :2], D[:, 3:]], 1)
    assert (survivors.norm(dim=1) <= tau * W.norm(dim=1) * (1 + 1e-9)).all()
    assert (survivors.norm(dim=1) > 0.5 * tau * W.norm(dim=1)).all()  # the large Newton step was clipped, not dropped


@pytest.mark.parametrize("eta,tau,recovery", [(0.0, 0.0, True), (0.0, 0.1, True), (1.0, 0.0, True), (0.3, 0.05, True),
                                                (1.0, 1.0, True), (0.0, 0.1, False)])
def test_closed_form_score_of_record_equals_the_value_of_the_explicit_update(eta, tau, recovery):
    """removal_values (the score of record, without forming the updates) == quadratic_change of removal_update for
    each single component, trust region and Newton share included (recovery=False: of the removal alone)."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        k, rows = 7, 6
        W, G, H = (torch.tensor(a) for a in (rng.normal(size=(rows, k)), 10.0 ** (seed - 2) * rng.normal(size=(rows, k)),
                                             spd(k, seed + 10)))
        explicit = quadratic_change(updates_of_each(W, G, H, eta, tau, recovery).transpose(0, 1), G, H)
        torch.testing.assert_close(removal_values(W, G, H, eta, tau, recovery), explicit, rtol=1e-9, atol=1e-12)


def test_pruned_components_are_neutral():
    """Over all k components with some pruned (zero in W and G, zero rows and columns of H, then damped with
    the mask), every score and update of the active ones equals the one computed over the active ones alone."""
    k, rows = 7, 5
    rng = np.random.default_rng(6)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    mask = t([1, 0, 1, 1, 0, 1, 1])
    S = mask.bool()
    W, G = t(rng.normal(size=(rows, k))) * mask, t(rng.normal(size=(rows, k))) * mask
    H0 = t(spd(k, 7)) * mask[:, None] * mask[None, :]
    H, H_S = damped(H0, 0.01, mask), damped(H0[S][:, S], 0.01, torch.ones(int(S.sum()), dtype=torch.float64))
    torch.testing.assert_close(H[S][:, S], H_S, rtol=1e-12, atol=0)
    torch.testing.assert_close(lagrangian_scores(W, G, H)[S], lagrangian_scores(W[:, S], G[:, S], H_S), rtol=1e-9, atol=1e-12)
    for eta, tau, recovery in ((0.0, 0.1, True), (0.5, 0.0, True), (1.0, 0.3, True), (0.0, 0.0, False)):
        torch.testing.assert_close(removal_values(W, G, H, eta, tau, recovery)[S],
                                   removal_values(W[:, S], G[:, S], H_S, eta, tau, recovery), rtol=1e-9, atol=1e-12)
        if recovery:
            D = removal_update(W, G, H, one_set(k, [0, 3]), eta, tau)
            D_S = removal_update(W[:, S], G[:, S], H_S, one_set(k, [0, 3])[S], eta, tau)
            torch.testing.assert_close(D[:, S], D_S, rtol=1e-9, atol=1e-12)
            assert D[:, ~S].abs().max() < 1e-12  # the pruned stay where they are


# ----------------------------------------------------------------------------- on a tiny model
def data(seed, n=4, T=16):
    """Sequences of a fixed permutation walk of the vocabulary (learnable), as (idx, targets)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 97, (n, 1), generator=g)
    seq = (start * 5 ** torch.arange(T + 1)) % 97
    return seq[:, :-1], seq[:, 1:]


def lora_tiny(r=8, alpha=8, seed=0):
    model = tiny_model(seed)
    apply_lora(model, r=r, alpha=alpha)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)  # as after some training: both factors nonzero
    return model.train()


def adamw(model, lr=1e-2, **kw):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def train(model, opt, state, steps, cfg=None, heldout=None, first_step=1, grad_accum=2):
    logs = []
    for step in range(first_step, first_step + steps):
        for micro in range(grad_accum):
            _, loss = model(*data(1000 * step + micro))
            (loss / grad_accum).backward()
            accumulate(model, state, micro, grad_accum, batch_size=4)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg is not None:
            log = prunedlora.step(model, opt, step, cfg, state, heldout)
            logs.append(log) if log else None
    return logs


def alone(model):
    """Every adapter as a group of its own."""
    return [{name: m} for name, m in lora_modules(model).items()]


def test_pruned_component_and_its_adamw_state_stay_zero():
    model = lora_tiny()
    opt = adamw(model, weight_decay=0.1)
    state = new_state(settings())
    train(model, opt, state, 3)
    name = "model.layers.0.self_attn.q_proj"
    m = lora_modules(model)[name]
    assert opt.state[m.lora_A]["exp_avg"][3].abs().sum() > 0
    mask_components([{name: m}], [one_set(8, [3, 5])[None]], opt)
    train(model, opt, state, 3, first_step=4)
    for p, part in ((m.lora_A, lambda x: x[[3, 5]]), (m.lora_B, lambda x: x[:, [3, 5]])):
        assert part(p).abs().max() == 0
        assert part(opt.state[p]["exp_avg"]).abs().max() == 0 and part(opt.state[p]["exp_avg_sq"]).abs().max() == 0
    assert m.lora_A[[0, 1, 2, 4, 6, 7]].abs().min(dim=1).values.gt(0).all()  # the others still train


def trained_with_different_masks(sides="AB"):
    """A tiny model trained 4 steps whose adapters lost different components (i % 3 of them) after step 2."""
    model = lora_tiny()
    opt = adamw(model)
    state = new_state(settings(rank_recovery_side=sides))
    train(model, opt, state, 2)
    mask_components(alone(model), [one_set(8, list(range(i % 3)))[None] for i in range(len(alone(model)))], opt)
    train(model, opt, state, 2, first_step=3)
    return model, opt, state


@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_an_adapter_group_scores_and_recovers_as_its_adapters_alone(method):
    """An event stacks the adapters of a shape (adapter_groups); stacked, each scores and moves as it does alone,
    also when they have lost different components."""
    model, opt, state = trained_with_different_masks()
    mods, groups = lora_modules(model), adapter_groups(model)
    assert max(len(g) for g in groups) == 4  # q_proj and o_proj of both layers (32 x 32) go together
    update_sensitivity(model, state)
    act = activation_stats(model, data(7))
    cfg = settings(rank_method=method, rank_recovery_side="AB", rank_recovery_lr=0.5)
    each = alone(model)
    curv_each, curv_groups = event_curvatures(each, state, cfg, act), event_curvatures(groups, state, cfg, act)
    by_name = {name: s for g, s in zip(each, scores(model, each, cfg, state, curv_each["score"])) for name in g}
    for g, s in zip(groups, scores(model, groups, cfg, state, curv_groups["score"])):
        torch.testing.assert_close(s, torch.cat([by_name[name] for name in g]), rtol=1e-5, atol=1e-7)
    chosen = dict(zip(mods, choose([by_name[name] for name in mods], k=2)))
    idle = next(iter(mods))
    chosen[idle][:] = False  # an adapter that loses nothing this event does not move, Newton share or not
    before = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in mods.items()}
    recover(groups, [torch.cat([chosen[name] for name in g]) for g in groups], curv_groups["recover"], eta=0.5)
    after = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in mods.items()}
    for name, m in mods.items():
        with torch.no_grad():
            m.lora_A.copy_(before[name][0]), m.lora_B.copy_(before[name][1])
    recover(each, [chosen[name] for name in mods], curv_each["recover"], eta=0.5)
    for name, m in mods.items():
        torch.testing.assert_close(after[name][0], m.lora_A.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(after[name][1], m.lora_B.detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(after[name][1], before[name][1]) == (name == idle)
    was_active = {name: m.rank_mask.clone() for name, m in mods.items()}
    mask_components(groups, [torch.cat([chosen[name] for name in g]) for g in groups], opt)
    for name, m in mods.items():
        gone = chosen[name][0]
        assert torch.equal(m.rank_mask, was_active[name] * ~gone)
        for p, part in ((m.lora_A, lambda x: x[gone]), (m.lora_B, lambda x: x[:, gone])):
            assert part(p).abs().sum() == 0 and part(opt.state[p]["exp_avg"]).abs().sum() == 0


def plain_event(m, name, state, k, floor, eta, tau, damp=0.01, chosen=None):
    """PrunedLoRA for one adapter alone, written plainly over its active components S in float64 (KKT systems solved
    with torch.linalg.solve): {j: (P7) score}, and with `chosen` (a set of components) B[:, S] after its recovery
    and the (P2) value of that change."""
    S = m.rank_mask.bool()
    n, W = state["n_micro"], m.lora_B.detach().double()[:, S]
    G = state["sums"]["grad_B"][name].double()[:, S] / n
    F = state["sums"]["fisher_B"][name].double()[S][:, S] * state["batch_size"] / (n * W.shape[0])
    F = F + damp * F.diagonal().mean() * torch.eye(len(F), dtype=F.dtype)
    index = S.nonzero().flatten().tolist()  # position in S of each component

    def update(Q):  # each row: min (eta g).d + 1/2 d^T F d s.t. d_Q = -w_Q, the survivors' part clipped to tau |w|
        q, E = [index.index(j) for j in Q], torch.zeros(len(F), len(Q), dtype=F.dtype)
        E[q, range(len(Q))] = 1
        K = torch.cat([torch.cat([F, E], 1), torch.cat([E.T, torch.zeros(len(Q), len(Q), dtype=F.dtype)], 1)])
        d = torch.linalg.solve(K, torch.cat([-eta * G, -W[:, q]], 1).T).T[:, :len(F)]
        survivors = torch.ones(len(F), dtype=torch.bool)
        survivors[q] = False
        d[:, survivors] *= (tau * W.norm(dim=1) / d[:, survivors].norm(dim=1)).clamp(max=1)[:, None]
        return d
    value = lambda d: ((G * d).sum() + 0.5 * ((d @ F) * d).sum()).item()  # noqa: E731
    if chosen is None:
        return {j: value(update([j])) for j in index}
    d = update(sorted(chosen))
    return W + d, value(d)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_an_event_matches_the_method_written_plainly_per_adapter(allocation):
    """One event of the default method (compensation with a Newton share, trust region) on adapters that lost
    different components against plain_event: the same components go, B moves the same, the predicted change is
    the sum of the plain changes' values."""
    model, opt, state = trained_with_different_masks(sides="B")
    cfg = settings(rank_target=3, rank_every=1, rank_k=2, rank_start=0, rank_allocation=allocation, rank_floor=5,
                   rank_recovery_lr=0.3, rank_ranking_test=False)
    mods = lora_modules(model)
    plain = {name: plain_event(m, name, state, 2, 5, 0.3, 0.1) for name, m in mods.items()}
    left = {name: len(s) - (cfg["rank_target"] if allocation == "uniform" else cfg["rank_floor"]) for name, s in plain.items()}
    if allocation == "uniform":  # each adapter's 2 lowest
        expected = {name: set(sorted(s, key=s.get)[:min(2, left[name])]) for name, s in plain.items()}
    else:  # the 2 n lowest of all, no adapter below the floor
        expected = {name: set() for name in mods}
        for value, name, j in sorted((v, name, j) for name, s in plain.items() for j, v in s.items()):
            if sum(map(len, expected.values())) < 2 * len(mods) and len(expected[name]) < left[name]:
                expected[name].add(j)
    reference = {name: plain_event(m, name, state, 2, 5, 0.3, 0.1, chosen=expected[name])
                 for name, m in mods.items() if expected[name]}
    active = {name: m.rank_mask.bool().clone() for name, m in mods.items()}
    log = prunedlora.step(model, opt, 5, cfg, state)
    assert sum(map(len, expected.values())) == 2 * len(mods)
    assert allocation == "uniform" or len({len(e) for e in expected.values()}) > 1  # the floor bound some adapters
    for name, m in mods.items():
        assert set((active[name] & ~m.rank_mask.bool()).nonzero().flatten().tolist()) == expected[name], name
        if expected[name]:
            torch.testing.assert_close(m.lora_B.detach().double()[:, active[name]], reference[name][0], rtol=1e-4, atol=1e-6)
    assert log["predicted"] == pytest.approx(sum(value for _, value in reference.values()), rel=1e-4)


@pytest.mark.parametrize("sides", ["B", "AB"])
def test_accumulate_sees_each_micro_batch_gradient(sides):
    """With gradient accumulation (loss / 2 per micro-batch, .grad summed) the sums hold each micro-batch's
    own gradient: compare with gradients computed one micro-batch at a time. A's sums only when asked for."""
    model = lora_tiny()
    name = "model.layers.1.self_attn.v_proj"
    m = lora_modules(model)[name]
    singles = []
    for micro in range(2):
        model.zero_grad()
        model(*data(micro))[1].backward()
        singles.append((m.lora_B.grad.clone(), m.lora_A.grad.clone()))
    model.zero_grad(set_to_none=True)
    state = new_state(settings(rank_recovery_side=sides))
    for micro in range(2):
        (model(*data(micro))[1] / 2).backward()
        accumulate(model, state, micro, n_micro=2)
    sums = state["sums"]
    torch.testing.assert_close(sums["grad_B"][name], singles[0][0] + singles[1][0])
    torch.testing.assert_close(sums["fisher_B"][name], sum(gB.T @ gB for gB, _ in singles))
    if sides == "AB":
        torch.testing.assert_close(sums["grad_A"][name], singles[0][1] + singles[1][1])
        torch.testing.assert_close(sums["fisher_A"][name], sum(gA @ gA.T for _, gA in singles))
    else:
        assert "grad_A" not in sums and "fisher_A" not in sums
    assert state["n_micro"] == 2
    torch.testing.assert_close(state["last_grad"][name]["B"], m.lora_B.grad)  # the step's gradient, this adapter's
    torch.testing.assert_close(state["last_grad"][name]["A"], m.lora_A.grad)


def test_recovery_on_A_without_its_statistics_says_so_before_any_change():
    model = lora_tiny()
    opt = adamw(model)
    state = new_state(settings())  # sides "B"
    train(model, opt, state, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"new_state\(cfg\) of rank_recovery_side='AB'"):
        prunedlora.step(model, opt, 2, settings(rank_every=2, rank_recovery_side="AB"), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_paper_recovery_on_A_takes_the_steps_gradient_not_sums_of_A():
    """prunedlora_paper's curvature is the step's own gradient, which the state keeps for both factors: with
    rank_recovery_side='AB' it prunes the same from a state without the sums of A as from one with them."""
    cfg = settings(rank_every=2, rank_target=4, rank_method="prunedlora_paper", rank_recovery_side="AB")
    runs = []
    for sides in ("B", "AB"):
        model = lora_tiny()
        opt = adamw(model)
        logs = train(model, opt, new_state(cfg | dict(rank_recovery_side=sides)), 2, cfg)
        runs.append((logs, [p.detach().clone() for p in model.parameters()]))
    (logs_b, params_b), (logs_ab, params_ab) = runs
    assert len(logs_b) == 1 and logs_b[0]["pruned"] > 0 and logs_b[0]["ranks"] == logs_ab[0]["ranks"]
    assert all(torch.equal(p, q) for p, q in zip(params_b, params_ab))


def test_accumulate_before_a_backward_says_so():
    with pytest.raises(ValueError, match="after the micro-batch's backward"):
        accumulate(lora_tiny(), new_state(settings()))


def test_bad_settings_are_named():
    for bad, words in ((dict(rank_method="obs2"), ["rank_method='obs2'", "one of", "prunedlora_paper"]),
                       (dict(rank_allocation="local"), ["rank_allocation='local'", "'uniform' or 'global'"]),
                       (dict(rank_recovery_side="A"), ["rank_recovery_side='A'", "'B' or 'AB'"]),
                       (dict(rank_k=0), ["rank_k=0", "at least 1"]), (dict(rank_floor=0), ["rank_floor=0"]),
                       (dict(rank_kk=2), ["unknown ['rank_kk']"])):
        with pytest.raises(ValueError) as e:
            prunedlora.check_settings(settings(**bad))
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"missing \['rank_seed'\]"):
        new_state({k: v for k, v in settings().items() if k != "rank_seed"})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_final_ranks_are_exact(method, allocation):
    model = lora_tiny(r=8)
    opt = adamw(model, lr=1e-3)
    cfg = settings(rank_method=method, rank_target=3, rank_every=2, rank_k=2, rank_start=1, rank_allocation=allocation,
                   rank_floor=2, rank_recovery=method != "magnitude")
    state = new_state(cfg)
    logs = train(model, opt, state, schedule_end(8, cfg) + 2, cfg, heldout=data(7), grad_accum=1)
    ranks = [int(m.rank_mask.sum()) for m in lora_modules(model).values()]
    assert sum(ranks) == 3 * len(ranks)
    assert all(r == 3 for r in ranks) if allocation == "uniform" else all(r >= 2 for r in ranks)
    assert logs[-1]["step"] <= schedule_end(8, cfg) and all(math.isfinite(log["actual"]) for log in logs)
    for m in lora_modules(model).values():
        off = m.rank_mask == 0
        assert m.lora_A[off].abs().max() == 0 and m.lora_B[:, off].abs().max() == 0


def test_global_allocation_takes_the_lowest_scores_above_the_floor():
    scores_ = [torch.tensor([0.1, 0.2, 0.3, math.inf]), torch.tensor([5.0, 6.0, 0.05, 7.0])]
    chosen = choose(scores_, k=2, allocation="global", floor=2)  # 4 wanted; the first (3 active) may lose 1
    assert chosen[0].nonzero().flatten().tolist() == [0] and chosen[1].nonzero().flatten().tolist() == [0, 2]
    assert choose(scores_, k=3, allocation="uniform", floor=2)[1].nonzero().flatten().tolist() == [0, 2]
    # stacked adapters (a group) choose as they would alone
    both = choose([torch.stack(scores_)], k=2, allocation="global", floor=2)[0]
    assert torch.equal(both, torch.stack(chosen))


def test_saved_and_restored_state_continues_as_uninterrupted(tmp_path):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict into a new state, mid-way
    between events (random draws and AdaLoRA's averages included): the same events and adapters as without it."""
    for method in ("random", "adalora", "prunedlora"):
        cfg = settings(rank_method=method, rank_target=4, rank_every=3, rank_k=1, rank_start=1)
        runs = []
        for stop in (False, True):
            model = lora_tiny()
            opt = adamw(model, lr=1e-3)
            state = new_state(cfg)
            logs = train(model, opt, state, 5, cfg, heldout=data(7))
            if stop:
                torch.save(prunedlora.state_dict(state), tmp_path / "state.pt")
                state = new_state(cfg)
                prunedlora.load_state_dict(state, torch.load(tmp_path / "state.pt", weights_only=True))
            logs += train(model, opt, state, 5, cfg, heldout=data(7), first_step=6)
            runs.append((logs, [p.detach().clone() for p in model.parameters()]))
        (logs_a, params_a), (logs_b, params_b) = runs
        assert [log["ranks"] for log in logs_a] == [log["ranks"] for log in logs_b] and len(logs_a) == 3
        assert all(torch.equal(p, q) for p, q in zip(params_a, params_b)), method


def test_restoring_without_A_statistics_says_so():
    model, state = lora_tiny(), new_state(settings())
    model(*data(0))[1].backward()
    accumulate(model, state)
    said = []
    restored = new_state(settings(rank_recovery_side="AB"))
    prunedlora.load_state_dict(restored, prunedlora.state_dict(state), say=said.append)
    assert said == ["rank_recovery_side='AB': the checkpoint has no statistics of A; they start here"]
    assert restored["n_micro"] == 0 and restored["sums"] == {}


def average_in_process(rank, world, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sums = {key: {name: (rank + 1) * torch.arange(n, dtype=torch.float32).view(-1, 2) for name, n in (("a", 4), ("b", 6))}
            for key in ("grad_B", "fisher_B", "grad_A", "fisher_A")}  # process p holds (p + 1) * the same sums
    prunedlora.average_over_processes(sums)
    torch.save(sums, f"{out}{rank}.pt")
    torch.distributed.destroy_process_group()


def test_average_over_processes_leaves_every_process_the_mean(tmp_path):
    torch.multiprocessing.spawn(average_in_process, args=(2, tmp_path / "init", tmp_path / "out"), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"out{rank}.pt")
        for key in ("grad_B", "fisher_B", "grad_A", "fisher_A"):
            for name, n in (("a", 4), ("b", 6)):
                assert torch.equal(got[key][name], 1.5 * torch.arange(n, dtype=torch.float32).view(-1, 2))  # (1 + 2) / 2


def test_slicing_gives_the_masked_model_and_saves_exact_ranks(tmp_path):
    model = lora_tiny(r=8)
    opt = adamw(model, lr=1e-3)
    cfg = settings(rank_target=3, rank_every=1, rank_k=3, rank_allocation="global", rank_floor=1)
    train(model, opt, new_state(cfg), 3, cfg)
    idx = data(99)[0]
    model.eval()
    masked, _ = model(idx)
    ranks = {n: int(m.rank_mask.sum()) for n, m in lora_modules(model).items()}
    slice_adapters(model)
    assert {n: m.r for n, m in lora_modules(model).items()} == ranks
    torch.testing.assert_close(model(idx)[0], masked, atol=1e-6, rtol=0)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(tiny_model(0), tmp_path / "adapter").eval()
    assert {n: m.r for n, m in lora_modules(fresh).items()} == ranks
    torch.testing.assert_close(fresh(idx)[0], masked, atol=1e-6, rtol=0)


def test_prunedlora_prediction_is_in_loss_units():
    """One event on a trained tiny model: predicted and actual held-out loss change within 5x of each
    other (the paper's formula, by contrast, is off by orders of magnitude: ALGORITHMS.md §1)."""
    model = lora_tiny(r=16, alpha=16)
    opt = adamw(model, lr=3e-3)
    state = new_state(settings())
    train(model, opt, state, 30)
    cfg = settings(rank_target=8, rank_every=1, rank_k=8, rank_start=20)
    heldout = data(12345, n=16)
    log = prunedlora.step(model, opt, 30, cfg, state, heldout)
    assert log["pruned"] == 8 * 14
    assert log["actual"] > 1e-3, log
    assert 0.2 < log["predicted"] / log["actual"] < 5, log


def test_ranking_test_reports_a_correlation():
    model = lora_tiny(r=16, alpha=16)
    opt = adamw(model, lr=3e-3)
    state = new_state(settings())
    train(model, opt, state, 10)
    name = "model.layers.1.mlp.down_proj"
    before = lora_modules(model)[name].lora_B.clone()
    out = ranking_test(model, name, data(5, n=16), state, settings(), n=8)
    assert len(out["predicted"]) == 8 and -1 <= out["spearman"] <= 1
    assert torch.equal(lora_modules(model)[name].lora_B, before)  # restored
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)


def test_train_py_prunes_to_the_exact_rank(tmp_path):
    """train.py end to end on a tiny model folder and random token bins: events logged with both loss
    changes, the saved adapter at exactly rank_target."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    tiny_model(0).save_pretrained(tmp_path / "model", dtype=torch.float32)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 500)):
        rng.integers(0, 97, n).astype(np.uint16).tofile(tmp_path / "data" / f"{split}.bin")
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 97}))
    args = dict(model=tmp_path / "model", data_dir=tmp_path / "data", out_dir=tmp_path / "out", block_size=16,
                batch_size=2, gradient_accumulation_steps=2, dtype="float32", device="cpu", eval_iters=1,
                max_iters=12, lora_r=8, lora_alpha=8, rank_prune=True, rank_target=3, rank_every=2, rank_k=2,
                rank_start=2, learning_rate=1e-2)
    r = subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in args.items())], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "out" / "rank_pruning.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [4, 6, 8] and events[0]["ranking"]["spearman"] is not None
    assert all(math.isfinite(e["predicted"]) and math.isfinite(e["actual"]) for e in events)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {} and config["lora_alpha"] == 3  # s = 1 kept
